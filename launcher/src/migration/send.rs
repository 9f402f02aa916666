//! The sending side: `vm.send-migration` and KubeVirt's MigrateVirtualMachine.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rvmm_core::VmEvent;
use rvmm_core::snapshot::{DirtyPages, MigrationSource, encode_state};

use super::memory::send_pages;
use super::protocol::{Command, read_answer, send_request, start_payload};
use super::{
    Canceller, DEFAULT_DOWNTIME, MAX_ROUNDS, MigrationError, MigrationStats, MigrationUrl, Stream,
    unix_now,
};
use crate::vmm::{VmState, Vmm, VmmError};

/// How to migrate.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Downtime to aim for: the pre-copy goes on until the rest would be sent within it.
    pub downtime: Duration,
    /// The whole migration's limit; past it, it is cancelled (the source goes on).
    pub timeout: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            downtime: DEFAULT_DOWNTIME,
            timeout: Duration::from_secs(3600),
        }
    }
}

/// How long the sender waits for a receiver that does not listen yet (it is usually told to
/// receive at about the same time).
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

fn connect(url: &MigrationUrl, text: &str) -> Result<Box<dyn Stream>, MigrationError> {
    let err = |source| MigrationError::Connect {
        action: "connect to",
        url: text.to_string(),
        source,
    };
    let started = Instant::now();
    loop {
        let attempt: std::io::Result<Box<dyn Stream>> = match url {
            MigrationUrl::Unix(path) => UnixStream::connect(path).map(|s| Box::new(s) as _),
            MigrationUrl::Tcp(addr) => std::net::TcpStream::connect(addr).and_then(|s| {
                // Requests are written whole, then answered: no use for Nagle's delay.
                s.set_nodelay(true)?;
                Ok(Box::new(s) as _)
            }),
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && started.elapsed() < CONNECT_PATIENCE =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(err(e)),
        }
    }
}

fn request(
    stream: &mut dyn Stream,
    command: Command,
    payload: &[u8],
) -> Result<(), MigrationError> {
    send_request(stream, command, payload).map_err(super::ProtocolError::Io)?;
    read_answer(stream, command)?;
    Ok(())
}

impl Vmm {
    /// `vm.send-migration`: migrates the running VM to `destination_url`; returns once the
    /// receiver runs it. The caller then ends this VMM (exit 0). On failure or cancellation
    /// the VM goes on here.
    pub fn send_migration(
        &self,
        destination_url: &str,
        options: &SendOptions,
    ) -> Result<MigrationStats, VmmError> {
        let url = MigrationUrl::parse("destination_url", destination_url)?;
        let (handle, config) = {
            let mut inner = self.lock();
            let slot = Self::slot_in(&mut inner, "migrate", &[VmState::Running])?;
            let handle = slot
                .active
                .as_ref()
                .map(|a| a.handle.clone())
                .ok_or(VmmError::NotCreated)?;
            let config = serde_json::to_vec(&slot.spec.to_file())
                .expect("a configuration always serialises");
            (handle, config)
        };
        let cancel = Arc::new(Canceller::default());
        {
            let mut slot = self.migration_slot();
            if slot.cancel.is_some() {
                return Err(VmmError::MigrationBusy);
            }
            slot.cancel = Some(cancel.clone());
            slot.last = Some(MigrationStats {
                status: "running",
                start_timestamp: unix_now(),
                ..Default::default()
            });
        }
        self.emit(VmEvent::MigrationStarted {
            destination: destination_url.to_owned(),
        });
        let mut stats = MigrationStats {
            start_timestamp: unix_now(),
            ..Default::default()
        };
        let outcome = migrate(
            &handle,
            &config,
            &url,
            destination_url,
            options,
            &cancel,
            &mut stats,
        );
        stats.end_timestamp = Some(unix_now());
        stats.status = match &outcome {
            Ok(()) => "completed",
            Err(MigrationError::Cancelled) => "cancelled",
            Err(_) => "failed",
        };
        {
            let mut slot = self.migration_slot();
            slot.cancel = None;
            slot.last = Some(stats.clone());
        }
        match outcome {
            Ok(()) => {
                log::info!(
                    "Migrated to {destination_url}: {:.0} ms in all, {:.1} ms down, {} rounds, {} bytes",
                    stats.total_ms,
                    stats.downtime_ms,
                    stats.rounds,
                    stats.memory_bytes
                );
                self.emit(VmEvent::Migrated(stats.report()));
                Ok(stats)
            }
            Err(e) => {
                self.note_left_paused(&handle);
                let text = crate::errors::error_chain(&e);
                log::warn!("Migration to {destination_url} {}: {text}", stats.status);
                self.emit(VmEvent::MigrationFailed {
                    cancelled: matches!(e, MigrationError::Cancelled),
                    error: text,
                });
                Err(VmmError::Migration(e))
            }
        }
    }

    /// After a failed migration whose VM could not run again here (its receiver kept a disk):
    /// the VM is Paused for the API too, and `vm.resume` retries once the disk is free.
    fn note_left_paused(&self, handle: &rvmm_core::VmHandle) {
        if handle.state() != rvmm_core::RunState::Paused {
            return;
        }
        let mut inner = self.lock();
        if let Some(slot) = inner.vm.as_mut()
            && slot.state == VmState::Running
        {
            slot.state = VmState::Paused;
            self.emit(VmEvent::Paused);
        }
    }

    /// Stops the migration in progress (the VM goes on here); false when there is none.
    pub fn cancel_migration(&self) -> bool {
        let cancel = self.migration_slot().cancel.clone();
        match cancel {
            Some(cancel) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }
}

/// The pre-copy rounds, the stop-and-copy and the hand-over. On an error the VM is resumed
/// if this paused it, and the receiver is told to abandon.
fn migrate(
    handle: &rvmm_core::VmHandle,
    config: &[u8],
    url: &MigrationUrl,
    text: &str,
    options: &SendOptions,
    canceller: &Canceller,
    stats: &mut MigrationStats,
) -> Result<(), MigrationError> {
    let started = Instant::now();
    let mut stream = connect(url, text)?;
    canceller.watch(&*stream);
    let cancel = &canceller.flag;
    let mut source = MigrationSource::new(handle)?;
    let mut paused = false;
    // Set once Complete is on its way: from then on the receiver may run the VM.
    let mut completing = false;
    let result = (|| {
        request(&mut *stream, Command::Start, &start_payload())?;
        request(&mut *stream, Command::Config, config)?;
        source.start_dirty_log()?;
        let mut dirty = DirtyPages::all(source.memory());
        let mut first = true;
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(MigrationError::Cancelled);
            }
            if started.elapsed() > options.timeout {
                return Err(MigrationError::Timeout(options.timeout));
            }
            let round = Instant::now();
            let ranges = dirty.ranges();
            let sent = send_pages(&mut *stream, source.memory(), &ranges, first, cancel)?;
            stats.memory_bytes += sent;
            stats.rounds += 1;
            first = false;
            // Bytes per second this round managed (at least one page's worth).
            let rate = (sent.max(4096) as f64) / round.elapsed().as_secs_f64().max(1e-6);
            dirty = source.dirty_pages()?;
            let left = dirty.count() * source.page_size();
            let eta = Duration::from_secs_f64(left as f64 / rate);
            log::debug!(
                "Migration round {}: {sent} bytes in {:?}, {left} bytes dirty (~{eta:?})",
                stats.rounds,
                round.elapsed()
            );
            if eta <= options.downtime || stats.rounds >= MAX_ROUNDS {
                break;
            }
        }
        // Stop and copy.
        let down = Instant::now();
        if !source.pause() {
            return Err(MigrationError::Invalid("the VM stopped running".into()));
        }
        paused = true;
        dirty.merge(&source.dirty_pages()?);
        stats.memory_bytes += send_pages(
            &mut *stream,
            source.memory(),
            &dirty.ranges(),
            false,
            cancel,
        )?;
        if let Err(e) = handle.flush_disks() {
            return Err(MigrationError::Invalid(crate::errors::error_chain(&e)));
        }
        // The receiver opens the disks when it builds the VM from State: it needs their
        // image locks (on shared storage the image is the same file).
        handle.release_disk_locks();
        let state = encode_state(&source.save_state()?)?;
        request(&mut *stream, Command::State, &state)?;
        if cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        completing = true;
        let completed = request(&mut *stream, Command::Complete, &[]);
        // A refusal is the receiver's word that the VM does not run there.
        if let Err(MigrationError::Protocol(super::ProtocolError::Refused { .. })) = &completed {
            completing = false;
        }
        completed?;
        stats.downtime_ms = down.elapsed().as_secs_f64() * 1e3;
        Ok(())
    })();
    stats.total_ms = started.elapsed().as_secs_f64() * 1e3;
    // A connection ended by a cancel fails with an I/O error: report the cancel.
    let result = match result {
        Err(_) if cancel.load(Ordering::SeqCst) => Err(MigrationError::Cancelled),
        other => other,
    };
    if result.is_err() {
        // Best effort: the receiver drops what it has; the connection may be gone already.
        let _ = send_request(&mut *stream, Command::Abandon, &[]);
        // After Complete went out the receiver may be running the VM (its answer lost, say):
        // this copy stays paused, for whoever manages the VM to decide (QEMU's source stays
        // in `postmigrate` likewise). Before, it runs again once its disks are this end's
        // again (`VmHandle::resume` takes them back; if someone holds one, it stays paused).
        if completing {
            log::error!(
                "The VM stays paused: the migration failed after Complete was sent, so the receiver may be running it"
            );
        } else if paused && !source.resume() {
            log::error!("The VM stays paused after the failed migration");
        }
    }
    result
}
