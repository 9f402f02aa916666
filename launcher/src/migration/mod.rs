//! Live migration with Cloud Hypervisor's API: `vm.send-migration` on the source,
//! `vm.receive-migration` on a fresh `rvmm run --api-socket` at the destination, over a unix
//! socket (`unix:/path`) or TCP (`tcp:host:port`).
//!
//! Pre-copy: the sender turns on KVM's dirty-page log, sends all non-zero memory, then again
//! and again the pages written meanwhile (by the vCPUs, which KVM logs, and by the devices,
//! which mark guest memory's bitmap), until what is left would go in the allowed downtime (or
//! after [`MAX_ROUNDS`] rounds). Then it pauses the VM, sends the last pages and the state,
//! and the receiver resumes it. Downtime is from that pause to the receiver's answer to
//! `Complete`. The protocol is in [`protocol`]. A migration that fails or is cancelled
//! leaves the source running; after a successful one the source VMM exits 0.

mod memory;
pub mod protocol;
mod receive;
mod send;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, UNIX_EPOCH};

use rvmm_core::MigrationReport;
use serde::Serialize;

pub use protocol::ProtocolError;
pub use receive::MigrationListener;
pub use send::SendOptions;

/// Pre-copy rounds at most before the final stop-and-copy.
pub const MAX_ROUNDS: u32 = 30;
/// Downtime the sender aims for by default (Cloud Hypervisor's default).
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);

/// Where a migration goes or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    /// `unix:/path`.
    Unix(PathBuf),
    /// `tcp:host:port`.
    Tcp(String),
}

impl MigrationUrl {
    /// Parses Cloud Hypervisor's URL forms; `field` names the request field in errors.
    pub fn parse(field: &'static str, url: &str) -> Result<Self, super::VmmError> {
        let bad = |reason: &str| super::VmmError::Url {
            field,
            reason: format!("{url:?}: {reason}"),
        };
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("no socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = url.strip_prefix("tcp:") {
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    return Ok(Self::Tcp(addr.to_string()));
                }
                _ => return Err(bad("expected tcp:HOST:PORT")),
            }
        }
        Err(bad("expected unix:PATH or tcp:HOST:PORT"))
    }
}

/// A migration connection.
pub(crate) trait Stream: Read + Write + Send {
    /// Ends the connection both ways, also for a thread blocked on it.
    fn shut_down(&self);
    /// Another handle to the connection.
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>>;
}

impl Stream for UnixStream {
    fn shut_down(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Stream for TcpStream {
    fn shut_down(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// Cancels a migration: raises the flag the sender checks and ends its connection, so a
/// sender waiting on a silent receiver returns at once.
#[derive(Default)]
pub(crate) struct Canceller {
    pub(crate) flag: AtomicBool,
    stream: std::sync::Mutex<Option<Box<dyn Stream>>>,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("flag", &self.flag)
            .finish_non_exhaustive()
    }
}

impl Canceller {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Stream>>> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a handle to the connection, to end it on a cancel.
    pub(crate) fn watch(&self, stream: &dyn Stream) {
        match stream.try_clone_stream() {
            Ok(clone) => *self.lock() = Some(clone),
            Err(e) => log::warn!("A cancel will wait for the receiver's next answer: {e}"),
        }
        if self.flag.load(std::sync::atomic::Ordering::SeqCst) {
            self.cancel();
        }
    }

    /// Raises the flag and ends the connection.
    pub(crate) fn cancel(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(stream) = self.lock().as_ref() {
            stream.shut_down();
        }
    }
}

/// Errors of a migration, at either end.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The other end or the connection.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Connecting to or listening on the URL.
    #[error("Cannot {action} {url}")]
    Connect {
        /// "connect to" or "listen on".
        action: &'static str,
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Dirty-page logging (names the missing capability where KVM lacks it).
    #[error("Cannot track the guest's memory writes")]
    DirtyLog(#[from] rvmm_core::snapshot::DirtyLogError),
    /// Reading the paused VM's state.
    #[error("Cannot save the VM's state")]
    Save(#[from] rvmm_core::SaveError),
    /// Encoding or decoding the state.
    #[error("Bad VM state")]
    State(#[from] rvmm_core::snapshot::StateFileError),
    /// Building the VM at the receiver.
    #[error("Cannot build the migrated VM")]
    Restore(#[from] rvmm_core::snapshot::RestoreError),
    /// The sender asked for something out of order or invalid.
    #[error("{0}")]
    Invalid(String),
    /// Cancelled (CancelVirtualMachineMigration, or the sender's Abandon).
    #[error("The migration was cancelled")]
    Cancelled,
    /// No VM, or not in a state to migrate.
    #[error(transparent)]
    Vmm(#[from] Box<super::VmmError>),
    /// The timeout passed before the pre-copy converged.
    #[error("The migration did not finish within {0:?}")]
    Timeout(Duration),
}

/// What the last migration did, for events, metrics and `vm.info`-style questions.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MigrationStats {
    /// "running", "completed", "failed" or "cancelled".
    pub status: &'static str,
    /// From the start to the receiver's last answer, in milliseconds.
    pub total_ms: f64,
    /// From the source's final pause to the receiver's answer to `Complete`.
    pub downtime_ms: f64,
    /// Pre-copy rounds (the final stop-and-copy not counted).
    pub rounds: u32,
    /// Guest memory bytes sent.
    pub memory_bytes: u64,
    /// Unix seconds of the start.
    pub start_timestamp: f64,
    /// Unix seconds of the end.
    pub end_timestamp: Option<f64>,
}

impl MigrationStats {
    /// The completed migration's figures, as its event reports them.
    pub fn report(&self) -> MigrationReport {
        let millis = |ms: f64| Duration::try_from_secs_f64(ms / 1e3).unwrap_or_default();
        let time =
            |seconds: f64| UNIX_EPOCH + Duration::try_from_secs_f64(seconds).unwrap_or_default();
        MigrationReport {
            total: millis(self.total_ms),
            downtime: millis(self.downtime_ms),
            rounds: self.rounds,
            memory_bytes: self.memory_bytes,
            started_at: time(self.start_timestamp),
            ended_at: time(self.end_timestamp.unwrap_or(self.start_timestamp)),
        }
    }
}

/// A migration in progress (and the last one's outcome), shared with whoever may cancel it.
#[derive(Debug, Default)]
pub(crate) struct MigrationSlot {
    pub(crate) cancel: Option<Arc<Canceller>>,
    pub(crate) last: Option<MigrationStats>,
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The Prometheus lines of the last migration (none before the first).
pub fn render_metrics(stats: Option<&MigrationStats>) -> String {
    use std::fmt::Write;
    let Some(stats) = stats else {
        return String::new();
    };
    let mut out = String::new();
    for (name, help, value) in [
        (
            "rvmm_migration_downtime_seconds",
            "Downtime of the last live migration (final pause to resume at the destination).",
            stats.downtime_ms / 1e3,
        ),
        (
            "rvmm_migration_total_seconds",
            "Duration of the last live migration.",
            stats.total_ms / 1e3,
        ),
        (
            "rvmm_migration_memory_bytes",
            "Guest memory bytes the last live migration sent.",
            stats.memory_bytes as f64,
        ),
        (
            "rvmm_migration_rounds",
            "Pre-copy rounds of the last live migration.",
            f64::from(stats.rounds),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name}{{status=\"{}\"}} {value}", stats.status);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_cloud_hypervisors_unix_and_tcp_forms() {
        assert_eq!(
            MigrationUrl::parse("receiver_url", "unix:/run/m.sock").unwrap(),
            MigrationUrl::Unix("/run/m.sock".into())
        );
        assert_eq!(
            MigrationUrl::parse("destination_url", "tcp:127.0.0.1:6000").unwrap(),
            MigrationUrl::Tcp("127.0.0.1:6000".into())
        );
        for bad in [
            "unix:",
            "tcp:127.0.0.1",
            "tcp::80",
            "file:///x",
            "tcp:h:99999",
        ] {
            let err = MigrationUrl::parse("destination_url", bad).unwrap_err();
            assert!(
                err.to_string().starts_with("destination_url: "),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn migrated_event_carries_the_figures_of_the_stats() {
        let started = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(3));
        let stats = MigrationStats {
            status: "completed",
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: 1.234_567,
            rounds: 4,
            memory_bytes: 64 << 20,
            start_timestamp: unix_now() - 1.0,
            end_timestamp: Some(unix_now()),
        };
        let event = crate::events::Event::from(rvmm_core::VmEvent::Migrated(stats.report()));
        assert_eq!(event.name(), "vm.migrated");
        assert_eq!(event.properties(), serde_json::json!(stats));
    }
}
