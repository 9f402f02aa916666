//! The VMM's one VM and its life: create, boot, pause, resume, power button, shutdown, reboot,
//! delete. `rvmm run`, the control API and the shutdown signals all drive the VM through
//! [`Vmm`]; every change is reported to the event monitor.
//!
//! The VM stopping by itself (power-off, reset, crash) ends the VMM with the matching exit
//! code; a VM stopped through the API (`vm.shutdown`) stays defined and can boot again.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use vmm_core::boot::BootError;
use vmm_core::metrics::VmMetrics;
use vmm_core::{BuildError, CpuProfile, Outcome, StopReason, VmConfig, VmHandle};

use crate::cli::SerialMode;
use crate::config::{ConfigError, VmConfigFile};
use crate::console::Console;
use crate::events::EventMonitor;

#[path = "migration/mod.rs"]
pub mod migration;
#[path = "vmm_snapshot.rs"]
mod snapshot;
pub use snapshot::{SnapshotError, file_url_path};

/// An error and its causes on one line.
pub fn chain_text(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Exit code: the guest powered off or reset, or the VMM was asked to stop.
pub const EXIT_OK: u8 = 0;
/// Exit code: the VMM or the host failed.
pub const EXIT_VMM_ERROR: u8 = 1;
/// Exit code: the configuration is invalid.
pub const EXIT_BAD_CONFIG: u8 = 2;
/// Exit code: the guest crashed.
pub const EXIT_GUEST_CRASH: u8 = 3;

/// The VM's state as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Configured, never booted.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// Stopped; can boot again.
    Shutdown,
}

impl VmState {
    /// The state's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "Created",
            Self::Running => "Running",
            Self::Paused => "Paused",
            Self::Shutdown => "Shutdown",
        }
    }
}

/// What a VM-level request can fail with; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// No VM has been created.
    #[error("No VM has been created")]
    NotCreated,
    /// The request does not fit the VM's state.
    #[error("Cannot {action} a VM in state {}", state.name())]
    WrongState {
        /// What was asked.
        action: &'static str,
        /// The VM's state.
        state: VmState,
    },
    /// A VM already exists.
    #[error("A VM is already created (state {})", .0.name())]
    AlreadyCreated(VmState),
    /// The VMM is on its way out.
    #[error("The VMM is shutting down")]
    Exiting,
    /// The configuration is invalid.
    #[error("Invalid VM configuration")]
    Config(#[source] ConfigError),
    /// The console's host side cannot be set up.
    #[error("Cannot set up the serial console")]
    Console(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The VM cannot be built or started.
    #[error("Cannot boot the VM")]
    Boot(#[source] BuildError),
    /// The thread that waits for the VM's end cannot start.
    #[error("Cannot start the VM's waiter thread")]
    Waiter(#[source] std::io::Error),
    /// A snapshot or migration URL rvmm cannot use.
    #[error("{field}: {reason}")]
    Url {
        /// The request field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Taking a snapshot failed.
    #[error("Cannot snapshot the VM")]
    Snapshot(#[source] snapshot::SnapshotError),
    /// Restoring a snapshot failed.
    #[error("Cannot restore the VM")]
    Restore(#[source] snapshot::SnapshotError),
    /// A live migration failed or was cancelled.
    #[error("Live migration failed")]
    Migration(#[source] migration::MigrationError),
    /// A migration is already under way.
    #[error("A migration is already in progress")]
    MigrationBusy,
}

impl VmmError {
    /// True when the user's configuration, not the host, is at fault.
    pub fn is_bad_config(&self) -> bool {
        match self {
            Self::Config(_) | Self::Console(_) | Self::Url { .. } => true,
            Self::Boot(e) => is_config_build_error(e),
            Self::Restore(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// Configuration mistakes found while building (exit 2) versus failures of the VMM or host.
fn is_config_build_error(err: &BuildError) -> bool {
    matches!(
        err,
        BuildError::VcpuCount(_)
            | BuildError::Memory(_)
            | BuildError::Disk { .. }
            | BuildError::Net { .. }
            | BuildError::TooManyDevices(_)
            | BuildError::Boot(
                BootError::ReadKernel { .. }
                    | BootError::NotAKernel { .. }
                    | BootError::LoadKernel { .. }
                    | BootError::ReadInitrd { .. }
                    | BootError::InitrdTooLarge { .. }
                    | BootError::Cmdline(_),
            )
    )
}

/// Receives the VMM's events (see [`Vmm::on_event`]).
pub type EventListener = Box<dyn Fn(&str, &Value) + Send + Sync>;

/// Host-side settings that are not part of a VM's configuration.
#[derive(Clone, Debug)]
pub struct VmmSettings {
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// CPU features shown to guests.
    pub cpu_profile: CpuProfile,
    /// Copy of all console output.
    pub serial_log: Option<PathBuf>,
    /// Run every thread kind that has a filter under it (`--seccomp`; see `crate::seccomp`).
    pub seccomp: bool,
}

/// `vm.info`'s answer.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    /// The VM's configuration.
    pub config: VmConfigFile,
    /// Its state.
    pub state: VmState,
    /// Guest RAM in bytes.
    pub memory_actual_size: u64,
}

/// Why rvmm itself stopped a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopCause {
    /// `vm.shutdown` or `vm.delete`: the VM stays defined.
    Shutdown,
    /// `vm.reboot`: booted again at once.
    Reboot,
    /// The VMM is exiting.
    Exit,
}

#[derive(Debug)]
struct ActiveVm {
    generation: u64,
    handle: VmHandle,
    stop: Option<StopCause>,
}

#[derive(Debug)]
struct VmSlot {
    file: VmConfigFile,
    config: VmConfig,
    serial: SerialMode,
    console: Option<Console>,
    state: VmState,
    active: Option<ActiveVm>,
}

#[derive(Debug, Default)]
struct Inner {
    vm: Option<VmSlot>,
    exit_code: Option<u8>,
    generation: u64,
    shutdown_signalled: bool,
}

/// The VMM: at most one VM, driven from any thread.
pub struct Vmm {
    settings: VmmSettings,
    /// `--serial` given without a VM: the console of a restored or migrated-in VM.
    serial_override: Mutex<Option<SerialMode>>,
    migration: Mutex<migration::MigrationSlot>,
    events: EventMonitor,
    listeners: Mutex<Vec<EventListener>>,
    started: Instant,
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("settings", &self.settings)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// A VMM with no VM yet.
    pub fn new(settings: VmmSettings, events: EventMonitor) -> Arc<Self> {
        Arc::new(Self {
            settings,
            serial_override: Mutex::new(None),
            migration: Mutex::new(migration::MigrationSlot::default()),
            events,
            listeners: Mutex::new(Vec::new()),
            started: Instant::now(),
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
        })
    }

    /// A VMM for unit tests that never touches KVM: booting reaches the KVM device last and
    /// fails there (its path does not exist), or earlier on a bad configuration.
    #[cfg(test)]
    pub(crate) fn without_kvm() -> Arc<Self> {
        Self::new(
            VmmSettings {
                kvm_path: PathBuf::from("/nonexistent/kvm"),
                cpu_profile: CpuProfile::Host,
                serial_log: None,
                seccomp: false,
            },
            EventMonitor::disabled(),
        )
    }

    /// Calls `listener` with every event the event monitor gets (`vm.booted`, `vm.paused`,
    /// ..., `vmm.shutdown`) and its properties. It runs with the VMM's lock held, so it must
    /// not call back into the [`Vmm`]: hand the event to a thread of its own instead.
    pub fn on_event(&self, listener: EventListener) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }

    fn emit(&self, event: &str, properties: Value) {
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            listener(event, &properties);
        }
        self.events.emit(event, properties);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migration_slot(&self) -> MutexGuard<'_, migration::MigrationSlot> {
        self.migration.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last (or current) migration's figures.
    pub fn migration_stats(&self) -> Option<migration::MigrationStats> {
        self.migration_slot().last.clone()
    }

    /// Sets the console a restored or migrated-in VM gets instead of its own setting
    /// (`rvmm run --serial ...` without a VM).
    pub fn set_serial_override(&self, serial: Option<SerialMode>) {
        *self
            .serial_override
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = serial;
    }

    /// See [`Vmm::set_serial_override`].
    pub fn serial_override(&self) -> Option<SerialMode> {
        self.serial_override
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How long the VMM has been up.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The host-side settings.
    pub fn settings(&self) -> &VmmSettings {
        &self.settings
    }

    /// `vm.create`: validates `file` and keeps it as the VM to boot.
    pub fn create(&self, file: VmConfigFile) -> Result<(), VmmError> {
        let (mut config, serial) = file
            .validate(&self.settings.kvm_path, self.settings.cpu_profile)
            .map_err(VmmError::Config)?;
        config.seccomp = self.settings.seccomp;
        self.create_validated(file, config, serial)
    }

    /// Keeps an already validated VM (from the command line's flags).
    pub fn create_validated(
        &self,
        file: VmConfigFile,
        config: VmConfig,
        serial: SerialMode,
    ) -> Result<(), VmmError> {
        let mut inner = self.lock();
        if inner.exit_code.is_some() {
            return Err(VmmError::Exiting);
        }
        if let Some(slot) = &inner.vm {
            return Err(VmmError::AlreadyCreated(slot.state));
        }
        inner.vm = Some(VmSlot {
            file,
            config,
            serial,
            console: None,
            state: VmState::Created,
            active: None,
        });
        Ok(())
    }

    /// `vm.boot`: builds the VM and starts its vCPUs.
    pub fn boot(self: &Arc<Self>) -> Result<(), VmmError> {
        let mut inner = self.lock();
        self.boot_locked(&mut inner)?;
        self.emit("vm.booted", self.boot_properties(&inner));
        Ok(())
    }

    fn boot_locked(self: &Arc<Self>, inner: &mut Inner) -> Result<(), VmmError> {
        if inner.exit_code.is_some() {
            return Err(VmmError::Exiting);
        }
        let slot = inner.vm.as_mut().ok_or(VmmError::NotCreated)?;
        if !matches!(slot.state, VmState::Created | VmState::Shutdown) {
            return Err(VmmError::WrongState {
                action: "boot",
                state: slot.state,
            });
        }
        if slot.console.is_none() {
            let console = Console::open(&slot.serial, self.settings.serial_log.as_deref())
                .map_err(|e| VmmError::Console(e.into()))?;
            slot.console = Some(console);
        }
        let console = slot.console.as_mut().expect("opened above");
        log::info!(
            "Booting {} with {} vCPU(s), {} MiB, CPU profile {}",
            slot.config.kernel.display(),
            slot.config.vcpus,
            slot.config.memory_bytes >> 20,
            slot.config.cpu_profile.name()
        );
        let vm = vmm_core::build_vm(&slot.config, console.output()).map_err(VmmError::Boot)?;
        self.start_built(inner, vm, VmState::Running)
    }

    /// Starts a built (or restored) VM with a waiter for its end; the slot's state becomes
    /// `state` (a restored VM starts paused).
    fn start_built(
        self: &Arc<Self>,
        inner: &mut Inner,
        vm: vmm_core::Vm,
        state: VmState,
    ) -> Result<(), VmmError> {
        let slot = inner.vm.as_mut().ok_or(VmmError::NotCreated)?;
        let console = slot.console.as_mut().ok_or(VmmError::NotCreated)?;
        console.attach(vm.serial());
        inner.generation += 1;
        let generation = inner.generation;
        // The waiter exists before the vCPUs start, so a running VM always has someone to
        // notice its end.
        let (send_vm, receive_vm) = std::sync::mpsc::channel::<vmm_core::RunningVm>();
        let vmm = self.clone();
        std::thread::Builder::new()
            .name("vm-waiter".into())
            .spawn(move || {
                if let Ok(running) = receive_vm.recv() {
                    let reason = running.wait();
                    vmm.vm_stopped(generation, reason);
                }
            })
            .map_err(VmmError::Waiter)?;
        let running = vm.start().map_err(VmmError::Boot)?;
        let handle = running.handle();
        if let Err(unsent) = send_vm.send(running) {
            // The waiter died before taking the VM: end the VM here rather than leak it.
            let running = unsent.0;
            running.stop();
            running.wait();
            return Err(VmmError::Waiter(std::io::Error::other(
                "the waiter thread ended early",
            )));
        }
        let slot = inner.vm.as_mut().expect("checked above");
        slot.state = state;
        slot.active = Some(ActiveVm {
            generation,
            handle,
            stop: None,
        });
        Ok(())
    }

    fn boot_properties(&self, inner: &Inner) -> Value {
        match &inner.vm {
            Some(slot) => json!({
                "vcpus": slot.config.vcpus,
                "memory_bytes": slot.config.memory_bytes,
                "kernel": slot.config.kernel,
            }),
            None => Value::Null,
        }
    }

    /// Called on the waiter thread once the VM of `generation` has stopped and been torn down
    /// (its disks flushed).
    fn vm_stopped(&self, generation: u64, reason: StopReason) {
        let mut inner = self.lock();
        let Some(slot) = inner.vm.as_mut() else {
            return;
        };
        let Some(active) = slot.active.take_if(|a| a.generation == generation) else {
            return;
        };
        slot.state = VmState::Shutdown;
        if let Some(console) = &slot.console {
            console.detach();
        }
        let properties = json!({ "reason": reason.to_string() });
        match active.stop {
            Some(StopCause::Shutdown | StopCause::Exit) => self.emit("vm.shutdown", properties),
            Some(StopCause::Reboot) => {}
            None => {
                // The guest ended itself (or KVM could not run it): the VMM's job is done.
                let code = match reason.outcome() {
                    Outcome::Clean => {
                        log::info!("{reason}");
                        self.emit("vm.shutdown", properties);
                        EXIT_OK
                    }
                    Outcome::GuestCrash => {
                        eprintln!("rvmm: {reason}");
                        self.emit("guest.crashed", properties);
                        EXIT_GUEST_CRASH
                    }
                    Outcome::VmmError => {
                        eprintln!("rvmm: {reason}");
                        self.emit("vm.shutdown", properties);
                        EXIT_VMM_ERROR
                    }
                };
                inner.exit_code.get_or_insert(code);
            }
        }
        self.changed.notify_all();
    }

    /// Stops the active VM for `cause` and waits until it is torn down.
    fn stop_active<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        cause: StopCause,
    ) -> MutexGuard<'a, Inner> {
        let Some(active) = inner.vm.as_mut().and_then(|s| s.active.as_mut()) else {
            return inner;
        };
        active.stop.get_or_insert(cause);
        active.handle.stop();
        let generation = active.generation;
        while inner
            .vm
            .as_ref()
            .and_then(|s| s.active.as_ref())
            .is_some_and(|a| a.generation == generation)
        {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner
    }

    /// The VM's slot when its state is one of `allowed`.
    fn slot_in<'a>(
        inner: &'a mut Inner,
        action: &'static str,
        allowed: &[VmState],
    ) -> Result<&'a mut VmSlot, VmmError> {
        let slot = inner.vm.as_mut().ok_or(VmmError::NotCreated)?;
        if !allowed.contains(&slot.state) {
            return Err(VmmError::WrongState {
                action,
                state: slot.state,
            });
        }
        Ok(slot)
    }

    /// `vm.pause`.
    pub fn pause(&self) -> Result<(), VmmError> {
        let mut inner = self.lock();
        let slot = Self::slot_in(&mut inner, "pause", &[VmState::Running])?;
        if let Some(active) = &slot.active
            && active.handle.pause()
        {
            slot.state = VmState::Paused;
            self.emit("vm.paused", Value::Null);
        }
        Ok(())
    }

    /// `vm.resume`.
    pub fn resume(&self) -> Result<(), VmmError> {
        let mut inner = self.lock();
        let slot = Self::slot_in(&mut inner, "resume", &[VmState::Paused])?;
        if let Some(active) = &slot.active
            && active.handle.resume()
        {
            slot.state = VmState::Running;
            self.emit("vm.resumed", Value::Null);
        }
        Ok(())
    }

    /// `vm.power-button`: asks the guest to shut down (Ctrl-Alt-Del on the i8042).
    pub fn power_button(&self) -> Result<(), VmmError> {
        let mut inner = self.lock();
        let slot = Self::slot_in(&mut inner, "press the power button of", &[VmState::Running])?;
        if let Some(active) = &slot.active {
            active.handle.send_ctrl_alt_del();
        }
        Ok(())
    }

    /// `vm.shutdown`: stops the VM now; it can boot again.
    pub fn shutdown(&self) -> Result<(), VmmError> {
        let mut inner = self.lock();
        Self::slot_in(
            &mut inner,
            "shut down",
            &[VmState::Running, VmState::Paused],
        )?;
        drop(self.stop_active(inner, StopCause::Shutdown));
        Ok(())
    }

    /// `vm.reboot`: stops the VM and boots it again from its configuration.
    pub fn reboot(self: &Arc<Self>) -> Result<(), VmmError> {
        let mut inner = self.lock();
        Self::slot_in(&mut inner, "reboot", &[VmState::Running, VmState::Paused])?;
        let mut inner = self.stop_active(inner, StopCause::Reboot);
        self.boot_locked(&mut inner)?;
        self.emit("vm.rebooted", self.boot_properties(&inner));
        Ok(())
    }

    /// `vm.delete`: stops the VM if it runs and forgets it.
    pub fn delete(&self) -> Result<(), VmmError> {
        let inner = self.lock();
        if inner.vm.is_none() {
            return Err(VmmError::NotCreated);
        }
        let mut inner = self.stop_active(inner, StopCause::Shutdown);
        if let Some(slot) = inner.vm.take()
            && let Some(console) = slot.console
        {
            console.close();
        }
        Ok(())
    }

    /// `vm.info`.
    pub fn info(&self) -> Result<VmInfo, VmmError> {
        let inner = self.lock();
        let slot = inner.vm.as_ref().ok_or(VmmError::NotCreated)?;
        Ok(VmInfo {
            config: slot.file.clone(),
            state: slot.state,
            memory_actual_size: slot.config.memory_bytes,
        })
    }

    /// The statistics of the VM that runs (or is paused), for the Prometheus scrape.
    pub fn metrics(&self) -> Option<VmMetrics> {
        let inner = self.lock();
        let active = inner.vm.as_ref()?.active.as_ref()?;
        Some(active.handle.metrics())
    }

    /// `vm.counters`: per-device counters keyed by device id, as Cloud Hypervisor answers.
    pub fn counters(&self) -> Result<Value, VmmError> {
        let mut inner = self.lock();
        let slot = Self::slot_in(
            &mut inner,
            "read the counters of",
            &[VmState::Running, VmState::Paused],
        )?;
        let Some(active) = &slot.active else {
            return Ok(json!({}));
        };
        let metrics = active.handle.metrics();
        let mut counters = serde_json::Map::new();
        for d in &metrics.disks {
            counters.insert(
                d.id.clone(),
                json!({
                    "read_ops": d.reads,
                    "write_ops": d.writes,
                    "read_bytes": d.read_bytes,
                    "write_bytes": d.write_bytes,
                    "flushes": d.flushes,
                    "errors": d.errors,
                }),
            );
        }
        for n in &metrics.nets {
            counters.insert(
                n.id.clone(),
                json!({
                    "rx_frames": n.rx_packets,
                    "rx_bytes": n.rx_bytes,
                    "rx_drops": n.rx_drops,
                    "rx_errors": n.rx_errors,
                    "tx_frames": n.tx_packets,
                    "tx_bytes": n.tx_bytes,
                    "tx_drops": n.tx_drops,
                    "tx_errors": n.tx_errors,
                }),
            );
        }
        let exits: serde_json::Map<String, Value> = metrics
            .exits
            .iter()
            .map(|(reason, count)| ((*reason).to_string(), json!(count)))
            .collect();
        counters.insert("vcpu_exits".into(), Value::Object(exits));
        Ok(Value::Object(counters))
    }

    /// The VM's state, if there is a VM.
    pub fn state(&self) -> Option<VmState> {
        self.lock().vm.as_ref().map(|s| s.state)
    }

    /// Asks the VMM to exit with `code` (the first code asked for wins).
    pub fn request_exit(&self, code: u8) {
        self.lock().exit_code.get_or_insert(code);
        self.changed.notify_all();
    }

    /// Blocks until the VMM should exit; returns the exit code.
    pub fn wait_for_exit(&self) -> u8 {
        let mut inner = self.lock();
        loop {
            if let Some(code) = inner.exit_code {
                return code;
            }
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// SIGTERM/SIGINT: the first asks the guest to shut down and stops it after `grace`; a
    /// second stops it now. Without a running VM the VMM exits at once.
    pub fn shutdown_signal(self: &Arc<Self>, grace: Duration) {
        let mut inner = self.lock();
        let running = inner
            .vm
            .as_ref()
            .and_then(|s| s.active.as_ref().map(|a| (s.state, a.handle.clone())));
        let first = !std::mem::replace(&mut inner.shutdown_signalled, true);
        drop(inner);
        match running {
            Some((state, handle)) if first => {
                log::warn!(
                    "Shutdown signal: asking the guest to shut down (Ctrl-Alt-Del), {} s grace",
                    grace.as_secs()
                );
                if state == VmState::Paused {
                    // A paused guest cannot see the key press.
                    handle.resume();
                }
                handle.send_ctrl_alt_del();
                let vmm = self.clone();
                let timer = std::thread::Builder::new()
                    .name("grace".into())
                    .spawn(move || {
                        std::thread::sleep(grace);
                        log::warn!("Grace period over: stopping the VM");
                        vmm.request_exit(EXIT_OK);
                    });
                if let Err(e) = timer {
                    log::error!("Cannot start the grace timer, stopping now: {e}");
                    self.request_exit(EXIT_OK);
                }
            }
            Some(_) => {
                log::warn!("Second shutdown signal: stopping the VM now");
                self.request_exit(EXIT_OK);
            }
            None => self.request_exit(EXIT_OK),
        }
    }

    /// Stops the VM if it still runs (disks flushed), closes the console and reports
    /// `vmm.shutdown`. Call once, after [`Vmm::wait_for_exit`].
    pub fn teardown(&self) {
        let inner = self.lock();
        let mut inner = self.stop_active(inner, StopCause::Exit);
        if let Some(console) = inner.vm.as_mut().and_then(|s| s.console.take()) {
            console.close();
        }
        let code = inner.exit_code.unwrap_or(EXIT_OK);
        self.emit("vmm.shutdown", json!({ "exit_code": code }));
    }
}
