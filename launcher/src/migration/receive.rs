//! The receiving side: `vm.receive-migration` on a VMM without a VM, and the target pod's
//! launcher in KubeVirt.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Instant;

use rvmm_core::memory::{MemoryLayout, create_guest_memory};
use rvmm_core::snapshot::{build_restored, decode_state};
use rvmm_core::{ReceivedReport, VmEvent};

use super::memory::receive_pages;
use super::protocol::{self, Command, MAX_CONFIG, ProtocolError, answer, read_header};
use super::{MigrationError, MigrationUrl, Stream};
use crate::config::{SerialMode, VmConfigFile, VmSpec};
use crate::vmm::{Console, VmSlot, VmState, Vmm, VmmError};

/// A bound migration socket, waiting for its sender.
#[derive(Debug)]
pub struct MigrationListener {
    url: String,
    socket: Listening,
}

#[derive(Debug)]
enum Listening {
    Unix(UnixListener, std::path::PathBuf),
    Tcp(TcpListener),
}

impl MigrationListener {
    /// Binds `url` (a stale unix socket is replaced).
    pub fn bind(receiver_url: &str) -> Result<Self, VmmError> {
        let url = MigrationUrl::parse("receiver_url", receiver_url)?;
        let err = |source| {
            VmmError::Migration(MigrationError::Connect {
                action: "listen on",
                url: receiver_url.to_string(),
                source,
            })
        };
        let socket = match url {
            MigrationUrl::Unix(path) => {
                let _ = std::fs::remove_file(&path);
                Listening::Unix(UnixListener::bind(&path).map_err(err)?, path)
            }
            MigrationUrl::Tcp(addr) => Listening::Tcp(TcpListener::bind(addr).map_err(err)?),
        };
        Ok(Self {
            url: receiver_url.to_string(),
            socket,
        })
    }

    /// Waits for the sender's one connection (the unix socket is removed once connected).
    fn accept(self) -> Result<Box<dyn Stream>, MigrationError> {
        let err = |source| MigrationError::Connect {
            action: "accept on",
            url: self.url.clone(),
            source,
        };
        Ok(match &self.socket {
            Listening::Unix(listener, path) => {
                let accepted = listener.accept().map_err(err);
                let _ = std::fs::remove_file(path);
                Box::new(accepted?.0)
            }
            Listening::Tcp(listener) => {
                let (stream, _) = listener.accept().map_err(err)?;
                stream.set_nodelay(true).map_err(err)?;
                Box::new(stream)
            }
        })
    }
}

/// What this end brings: a console setting, or a whole configuration of its own.
struct Local {
    serial: Option<SerialMode>,
    config: Option<VmConfigFile>,
}

/// What the receiver has so far.
struct Incoming {
    spec: VmSpec,
    memory: rvmm_core::memory::GuestMemoryMmap,
}

impl Vmm {
    /// `vm.receive-migration`: waits for a sender on `receiver_url`, builds the VM it sends
    /// and, on `Complete`, runs it. `serial` replaces the sender's console setting (the
    /// command line's `--serial`). Returns once the VM runs here, or the migration failed
    /// (then no VM is left).
    pub fn receive_migration(
        self: &Arc<Self>,
        receiver_url: &str,
        serial: Option<SerialMode>,
    ) -> Result<(), VmmError> {
        if let Some(state) = self.state() {
            return Err(VmmError::AlreadyCreated(state));
        }
        let listener = MigrationListener::bind(receiver_url)?;
        let local = Local {
            serial,
            config: None,
        };
        self.receive(listener, local)
    }

    /// Receives a VM on `listener` with this end's own configuration `config` (KubeVirt's
    /// target pod: its disks, tap and console are its own); the sender's must have the same
    /// vCPUs and memory.
    pub fn receive_migration_as(
        self: &Arc<Self>,
        listener: MigrationListener,
        config: VmConfigFile,
    ) -> Result<(), VmmError> {
        let local = Local {
            serial: None,
            config: Some(config),
        };
        self.receive(listener, local)
    }

    fn receive(
        self: &Arc<Self>,
        listener: MigrationListener,
        local: Local,
    ) -> Result<(), VmmError> {
        if let Some(state) = self.state() {
            return Err(VmmError::AlreadyCreated(state));
        }
        let receiver_url = listener.url.clone();
        let mut stream = listener.accept().map_err(VmmError::Migration)?;
        let started = Instant::now();
        let result = self.serve_migration(&mut *stream, local);
        match result {
            Ok(bytes) => {
                self.emit(VmEvent::MigrationReceived(ReceivedReport {
                    receiver: receiver_url,
                    memory_bytes: bytes,
                    duration: started.elapsed(),
                }));
                Ok(())
            }
            Err(e) => {
                self.drop_incoming_vm();
                Err(VmmError::Migration(e))
            }
        }
    }

    /// Answers the sender's requests until `Complete`; returns the memory bytes received.
    fn serve_migration(
        self: &Arc<Self>,
        stream: &mut dyn Stream,
        local: Local,
    ) -> Result<u64, MigrationError> {
        let mut incoming: Option<Incoming> = None;
        let mut started = false;
        let mut built = false;
        let mut bytes = 0u64;
        loop {
            let Some(header) = read_header(stream)? else {
                return Err(MigrationError::Invalid(
                    "the sender closed the connection before Complete".into(),
                ));
            };
            let step = match header.command {
                Command::Start => {
                    let payload = protocol::read_payload(stream, header, 8)?;
                    started = true;
                    protocol::check_start(&payload)
                }
                Command::Config if started && incoming.is_none() => {
                    let payload = protocol::read_payload(stream, header, MAX_CONFIG)?;
                    self.take_config(&payload, &local)
                        .map(|i| incoming = Some(i))
                }
                Command::Memory if !built => match &incoming {
                    Some(incoming) => {
                        bytes += receive_pages(stream, &incoming.memory, header)?;
                        Ok(())
                    }
                    None => return Err(out_of_order(header.command)),
                },
                Command::State if !built => {
                    let max = rvmm_core::snapshot::format::HEADER_LEN as u64
                        + rvmm_core::snapshot::format::MAX_PAYLOAD;
                    let payload = protocol::read_payload(stream, header, max)?;
                    let incoming = incoming
                        .take()
                        .ok_or_else(|| out_of_order(header.command))?;
                    let result = self.build_incoming(incoming, &payload);
                    built = result.is_ok();
                    result
                }
                Command::Complete if built => {
                    let resumed = self.resume_incoming();
                    let answered = answer(stream, resumed.clone());
                    if resumed.is_ok() {
                        // The VM runs here now, whether or not the sender hears so: dropping
                        // it could leave its writes to the disks behind an older VM's. The
                        // sender keeps its copy paused when the answer does not come.
                        if let Err(e) = answered {
                            log::warn!("The migrated VM runs here; the sender was not told: {e}");
                        }
                        return Ok(bytes);
                    }
                    answered.map_err(ProtocolError::Io)?;
                    return resumed.map(|()| bytes).map_err(MigrationError::Invalid);
                }
                Command::Abandon => return Err(MigrationError::Cancelled),
                other => return Err(out_of_order(other)),
            };
            let failed = step.as_ref().err().cloned();
            answer(stream, step).map_err(ProtocolError::Io)?;
            if let Some(why) = failed {
                return Err(MigrationError::Invalid(why));
            }
        }
    }

    /// The configuration (the sender's, or this end's own when it has one, then checked
    /// against the sender's), validated, and guest memory of its size.
    fn take_config(&self, payload: &[u8], local: &Local) -> Result<Incoming, String> {
        let text = std::str::from_utf8(payload).map_err(|_| "Config is not UTF-8".to_string())?;
        let sent = VmConfigFile::from_json(text).map_err(|e| crate::errors::error_chain(&e))?;
        let file = match &local.config {
            None => sent,
            Some(own) => {
                if (own.cpus.boot_vcpus, own.memory.size)
                    != (sent.cpus.boot_vcpus, sent.memory.size)
                {
                    return Err(format!(
                        "the sender's VM has {} vCPUs and {} bytes of memory, this end's {} and {}",
                        sent.cpus.boot_vcpus,
                        sent.memory.size,
                        own.cpus.boot_vcpus,
                        own.memory.size
                    ));
                }
                own.clone()
            }
        };
        let mut spec = file
            .validate(&self.settings.host())
            .map_err(|e| crate::errors::error_chain(&e))?;
        if let Some(serial) = &local.serial {
            spec.serial = serial.clone();
        }
        let layout = MemoryLayout::new(spec.config.memory_bytes)
            .map_err(|e| crate::errors::error_chain(&e))?;
        let memory = create_guest_memory(&layout).map_err(|e| crate::errors::error_chain(&e))?;
        Ok(Incoming { spec, memory })
    }

    /// Builds the VM from the received state, paused.
    fn build_incoming(self: &Arc<Self>, incoming: Incoming, state: &[u8]) -> Result<(), String> {
        let state = decode_state(state).map_err(|e| crate::errors::error_chain(&e))?;
        let mut inner = self.lock();
        if let Some(slot) = &inner.vm {
            return Err(format!(
                "a VM already exists here (state {})",
                slot.state.name()
            ));
        }
        let console = Console::open(
            &incoming.spec.serial,
            self.settings.serial_log.as_deref(),
            self.settings.seccomp,
        )
        .map_err(|e| format!("Cannot set up the serial console: {e}"))?;
        let vm = build_restored(
            &incoming.spec.config,
            &state,
            incoming.memory,
            console.output(),
        )
        .map_err(|e| crate::errors::error_chain(&e))?;
        inner.vm = Some(VmSlot {
            spec: incoming.spec,
            serial_log: None,
            console: Some(console),
            state: VmState::Created,
            active: None,
            dhcp: None,
        });
        self.start_dhcp_in(&mut inner)
            .and_then(|()| self.start_built(&mut inner, vm, VmState::Paused))
            .map_err(|e| crate::errors::error_chain(&e))
    }

    /// Runs the received VM; its `vm.migration-received` event follows (no `vm.resumed`: for
    /// KubeVirt the VM appears, `ADDED`, rather than resumes).
    fn resume_incoming(&self) -> Result<(), String> {
        let mut inner = self.lock();
        let slot = Self::slot_in(&mut inner, "resume", &[VmState::Paused])
            .map_err(|e| crate::errors::error_chain(&e))?;
        match &slot.active {
            Some(active) if active.handle.resume() => {
                slot.state = VmState::Running;
                Ok(())
            }
            _ => Err("the received VM cannot run".into()),
        }
    }

    /// Stops and forgets a VM a failed migration left half built.
    fn drop_incoming_vm(&self) {
        if self.state().is_some()
            && let Err(e) = self.delete()
        {
            log::warn!("Cannot drop the half-migrated VM: {e}");
        }
    }
}

fn out_of_order(command: Command) -> MigrationError {
    MigrationError::Invalid(format!("{command:?} request out of order"))
}
