//! The VMM's one VM and its life: create, boot, pause, resume, power button, shutdown, reboot,
//! delete. `rvmm run`, the control API and the shutdown signals all drive the VM through
//! [`Vmm`]; every change is reported to the event monitor.
//!
//! The VM stopping by itself (power-off, reset, crash) ends the VMM with the matching exit
//! code ([`VmmSettings::exit_when_guest_ends`]; virt-launcher mode keeps the stopped VM defined
//! until it is deleted instead); a VM stopped through the API (`vm.shutdown`) stays defined and
//! can boot again.
//!
//! A guest-initiated reset ends the VM, or with [`OnReboot::Restart`] boots it again in the
//! same process: the VM is torn down (vCPUs joined, devices and their workers dropped, disks
//! flushed, guest memory unmapped) and built afresh from its configuration by the `vm-restart`
//! thread, the same steps as `vm.boot` (kernel or disk boot source, every device reset), so
//! the guest finds the machine it booted on. The console, its socket and the VM's state
//! (`Running`) stay; `vm.rebooted` reports it. A reset that follows a power-button press is the
//! guest's way of powering off (Linux answers Ctrl-Alt-Del with a reboot) and ends the VM.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rvmm_core::metrics::VmMetrics;
use rvmm_core::seccomp::{SpawnError, spawn_filtered};
use rvmm_core::{
    BootInfo, MetricsHandle, RebootCause, ShutdownReason, ShutdownRequest, VmConfig, VmEvent,
    VmHandle,
};
use serde_json::{Value, json};

use crate::config::{SerialMode, VmConfigFile, VmSpec};
use crate::console::Console;
use crate::control_thread::ControlThread;
use crate::dhcp::served_nics;
use crate::dhcp::server::{DhcpServer, LeaseEvent};
use crate::errors::error_chain;
use crate::events::{Event, EventMonitor};
use crate::seccomp::{control_rules, thread_filter_for, waiter_rules};

#[path = "migration/mod.rs"]
pub mod migration;
#[path = "vmm_snapshot.rs"]
mod snapshot;
#[path = "vmm_stops.rs"]
mod stops;
pub use snapshot::{SnapshotError, file_url_path};
#[path = "vmm_types.rs"]
mod types;
pub use types::*;

/// Opens (and closes) every file a boot of `config` reads, as the boot would: the kernel, the
/// initrd (a disk boot reads its own from the disk) and the disks (read-write unless read-only). Image locks are not taken: the VM
/// being rebooted holds them.
fn check_boot_files(config: &VmConfig) -> Result<(), BootFileError> {
    let fail = |what: String, path: &std::path::Path| {
        let path = path.to_owned();
        move |source| BootFileError { what, path, source }
    };
    if let rvmm_core::BootSource::Kernel { kernel, initrd } = &config.boot {
        std::fs::File::open(kernel).map_err(fail("kernel".into(), kernel))?;
        if let Some(initrd) = initrd {
            std::fs::File::open(initrd).map_err(fail("initrd".into(), initrd))?;
        }
    }
    for (index, disk) in config.disks.iter().enumerate() {
        std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.readonly)
            .open(&disk.path)
            .map_err(fail(format!("disk {index}"), &disk.path))?;
    }
    Ok(())
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
    /// The power button was pressed: a guest reset from now on is its power-off.
    power_button_pressed: bool,
    /// The guest reset itself and the `vm-restart` thread is building the VM again; `handle`
    /// is the stopped VM's until then.
    restarting: bool,
}

#[derive(Debug)]
struct VmSlot {
    spec: VmSpec,
    /// Where the console's output is copied, instead of the settings' `serial_log`.
    serial_log: Option<PathBuf>,
    console: Option<Console>,
    state: VmState,
    active: Option<ActiveVm>,
    /// The NICs' DHCP server: runs while the VM does, across reboots.
    dhcp: Option<DhcpServer>,
}

#[derive(Debug, Default)]
struct Inner {
    vm: Option<VmSlot>,
    exit_code: Option<u8>,
    /// How the last VM ended by itself, as an exit code (see [`Vmm::vm_end_code`]).
    end_code: Option<u8>,
    generation: u64,
    shutdown_signalled: bool,
    /// Boots the VM again after a guest reset ([`OnReboot::Restart`]); started with the
    /// first boot.
    restarter: Option<ControlThread>,
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
    /// The running VM's statistics, readable while `inner` is held by a slow operation (a
    /// boot, a stop waiting for the teardown).
    live_metrics: Mutex<Option<MetricsHandle>>,
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
            live_metrics: Mutex::new(None),
        })
    }

    /// A VMM for unit tests that never touches KVM: booting reaches the KVM device last and
    /// fails there (its path does not exist), or earlier on a bad configuration.
    #[cfg(test)]
    pub(crate) fn without_kvm() -> Arc<Self> {
        Self::new(
            VmmSettings {
                kvm_path: PathBuf::from("/nonexistent/kvm"),
                cpu_profile: rvmm_core::CpuProfile::Host,
                serial_log: None,
                seccomp: false,
                on_reboot: OnReboot::Exit,
                exit_when_guest_ends: true,
            },
            EventMonitor::disabled(),
        )
    }

    /// Calls `listener` with every event the event monitor gets (the VM's booting, pausing,
    /// ..., the VMM's own end). It runs with the VMM's lock held, so it must not call back
    /// into the [`Vmm`]: hand the event to a thread of its own instead.
    pub fn on_event(&self, listener: EventListener) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }

    fn emit(&self, event: impl Into<Event>) {
        let event = event.into();
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            listener(&event);
        }
        self.events.emit(&event);
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

    /// `vm.create`: validates `file` with this VMM's host settings and keeps it as the VM to
    /// boot.
    pub fn create(&self, file: VmConfigFile) -> Result<(), VmmError> {
        let spec = file
            .validate(&self.settings.host())
            .map_err(VmmError::Config)?;
        self.create_spec(spec)
    }

    /// [`Vmm::create`] with the console's output also appended to `serial_log` (virt-launcher
    /// mode's `virt-serial0-log`).
    pub fn create_logged(
        &self,
        file: VmConfigFile,
        serial_log: Option<PathBuf>,
    ) -> Result<(), VmmError> {
        self.create(file)?;
        if let Some(slot) = self.lock().vm.as_mut() {
            slot.serial_log = serial_log;
        }
        Ok(())
    }

    /// Keeps a validated VM ([`VmConfigFile::validate`]; `rvmm run`'s flags or `--config`).
    pub fn create_spec(&self, spec: VmSpec) -> Result<(), VmmError> {
        let mut inner = self.lock();
        if inner.exit_code.is_some() {
            return Err(VmmError::Exiting);
        }
        if let Some(slot) = &inner.vm {
            return Err(VmmError::AlreadyCreated(slot.state));
        }
        inner.vm = Some(VmSlot {
            spec,
            serial_log: None,
            console: None,
            state: VmState::Created,
            active: None,
            dhcp: None,
        });
        Ok(())
    }

    /// The created VM's spec.
    #[cfg(test)]
    pub(crate) fn created_spec(&self) -> Option<VmSpec> {
        self.lock().vm.as_ref().map(|slot| slot.spec.clone())
    }

    /// `vm.boot`: builds the VM and starts its vCPUs.
    pub fn boot(self: &Arc<Self>) -> Result<(), VmmError> {
        let mut inner = self.lock();
        let boot = self.boot_locked(&mut inner)?;
        self.emit(VmEvent::Booted(boot));
        Ok(())
    }

    /// Boots the created (or shut down) VM; says what it booted.
    fn boot_locked(self: &Arc<Self>, inner: &mut Inner) -> Result<BootInfo, VmmError> {
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
            let log = slot
                .serial_log
                .as_ref()
                .or(self.settings.serial_log.as_ref());
            let console = Console::open(
                &slot.spec.serial,
                log.map(PathBuf::as_path),
                self.settings.seccomp,
            )
            .map_err(|e| VmmError::Console(e.into()))?;
            slot.console = Some(console);
        }
        let boot = BootInfo::of(&slot.spec.config);
        self.start_dhcp_in(inner)?;
        let started = self.start_vm(inner);
        if started.is_err()
            && let Some(slot) = inner.vm.as_mut()
        {
            // No VM runs: nobody to serve.
            slot.dhcp = None;
        }
        started.map(|()| boot)
    }

    /// Starts the slot's DHCP server unless it runs (a reboot keeps it), before the guest can
    /// ask: a VM booted, restored or received serves its NICs' DHCP.
    fn start_dhcp_in(self: &Arc<Self>, inner: &mut Inner) -> Result<(), VmmError> {
        let slot = inner.vm.as_mut().ok_or(VmmError::NotCreated)?;
        if slot.dhcp.is_none() {
            slot.dhcp = self.start_dhcp(slot)?;
        }
        Ok(())
    }

    /// The DHCP server of the NICs that have one.
    fn start_dhcp(self: &Arc<Self>, slot: &VmSlot) -> Result<Option<DhcpServer>, VmmError> {
        let nics = served_nics(&slot.spec);
        if nics.is_empty() {
            return Ok(None);
        }
        let vmm = Arc::downgrade(self);
        let listener = Box::new(move |event: &LeaseEvent| {
            if let Some(vmm) = vmm.upgrade() {
                vmm.emit(Event::Dhcp(event.clone()));
            }
        });
        DhcpServer::start(&nics, self.settings.seccomp, listener)
            .map(Some)
            .map_err(VmmError::Dhcp)
    }

    /// Builds the created VM and starts its vCPUs.
    fn start_vm(self: &Arc<Self>, inner: &mut Inner) -> Result<(), VmmError> {
        let slot = inner.vm.as_mut().expect("checked by boot_locked");
        let console = slot.console.as_mut().expect("opened by boot_locked");
        log::info!(
            "Booting {} with {} vCPU(s), {} MiB, CPU profile {}",
            BootInfo::of(&slot.spec.config).source,
            slot.spec.config.vcpus,
            slot.spec.config.memory_bytes >> 20,
            slot.spec.config.cpu_profile.name()
        );
        let vm =
            rvmm_core::build_vm(&slot.spec.config, console.output()).map_err(VmmError::Boot)?;
        self.start_built(inner, vm, VmState::Running)
    }

    /// Starts a built (or restored) VM with a waiter for its end; the slot's state becomes
    /// `state` (a restored VM starts paused).
    fn start_built(
        self: &Arc<Self>,
        inner: &mut Inner,
        vm: rvmm_core::Vm,
        state: VmState,
    ) -> Result<(), VmmError> {
        if inner.vm.as_ref().is_none_or(|slot| slot.console.is_none()) {
            return Err(VmmError::NotCreated);
        }
        if self.settings.on_reboot == OnReboot::Restart && inner.restarter.is_none() {
            // Started here, on a thread that may start threads, not by the waiter that needs it.
            let filter = thread_filter_for(self.settings.seccomp, control_rules())
                .map_err(|e| VmmError::Waiter(SpawnError::Filter(e)))?;
            let restarter = ControlThread::start("vm-restart", filter).map_err(VmmError::Waiter)?;
            inner.restarter = Some(restarter);
        }
        inner.generation += 1;
        let generation = inner.generation;
        let waiter_filter = thread_filter_for(self.settings.seccomp, waiter_rules())
            .map_err(|e| VmmError::Waiter(SpawnError::Filter(e)))?;
        let running = vm.start().map_err(VmmError::Boot)?;
        let handle = running.handle();
        // Console input and the waiter start once the vCPUs run: neither is on the way to the
        // guest's first instruction. Input before then is dropped, and the waiter notices an
        // end that came first. A waiter that cannot start drops the VM it was given, which
        // stops it.
        let serial = running.serial();
        let vmm = self.clone();
        spawn_filtered("vm-waiter", waiter_filter, move || {
            let reason = running.wait();
            vmm.vm_stopped(generation, reason);
        })
        .map_err(VmmError::Waiter)?;
        if let Some(console) = inner.vm.as_mut().and_then(|s| s.console.as_mut()) {
            console.attach(serial);
        }
        *self.live_metrics.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(handle.metrics_handle());
        let slot = inner.vm.as_mut().expect("checked above");
        if self.settings.seccomp {
            // Its devices are open: what the VMM does not need again goes (crate::privileges).
            crate::privileges::lower_after_boot(!slot.spec.config.nets.is_empty());
        }
        slot.state = state;
        slot.active = Some(ActiveVm {
            generation,
            handle,
            stop: None,
            power_button_pressed: false,
            restarting: false,
        });
        Ok(())
    }

    fn clear_live_metrics(&self) {
        *self.live_metrics.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
            self.emit(VmEvent::Paused);
        }
        Ok(())
    }

    /// `vm.resume`.
    pub fn resume(&self) -> Result<(), VmmError> {
        let mut inner = self.lock();
        let slot = Self::slot_in(&mut inner, "resume", &[VmState::Paused])?;
        if let Some(active) = &slot.active {
            active
                .handle
                .reacquire_disk_locks()
                .map_err(VmmError::DisksTaken)?;
        }
        if let Some(active) = &slot.active
            && active.handle.resume()
        {
            slot.state = VmState::Running;
            self.emit(VmEvent::Resumed);
        }
        Ok(())
    }

    /// `vm.power-button`: asks the guest to shut down, through the ACPI power button when the
    /// guest handles it, Ctrl-Alt-Del otherwise; says which.
    pub fn power_button(&self) -> Result<ShutdownRequest, VmmError> {
        let mut inner = self.lock();
        let slot = Self::slot_in(&mut inner, "press the power button of", &[VmState::Running])?;
        let request = match &mut slot.active {
            Some(active) => press_power_button(active),
            None => ShutdownRequest::CtrlAltDel,
        };
        Ok(request)
    }

    /// Asks the guest to shut down, as often as called (a booting guest can miss the press): the
    /// power button of a running VM, or of a paused one, whose guest then sees it when resumed.
    /// False when no VM runs or is paused.
    pub fn request_guest_shutdown(&self) -> bool {
        let mut inner = self.lock();
        let Some(active) = inner.vm.as_mut().and_then(|s| s.active.as_mut()) else {
            return false;
        };
        press_power_button(active);
        true
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
    ///
    /// A reboot never loses a VM silently: when a file the new boot reads (kernel, initrd,
    /// disks) can no longer be opened, the VM keeps running and the reboot fails
    /// ([`VmmError::RebootRefused`]); when the new boot fails after the old VM stopped (KVM,
    /// memory, a tap, a lock), the VM is left in Shutdown (it can boot again), `vm.shutdown`
    /// is reported with the reason, and the reboot fails ([`VmmError::RebootFailed`]). Both
    /// are the host's trouble, not the client's: 500.
    pub fn reboot(self: &Arc<Self>) -> Result<(), VmmError> {
        let mut inner = self.lock();
        let slot = Self::slot_in(&mut inner, "reboot", &[VmState::Running, VmState::Paused])?;
        check_boot_files(&slot.spec.config).map_err(VmmError::RebootRefused)?;
        let mut inner = self.stop_active(inner, StopCause::Reboot);
        let boot = match self.boot_locked(&mut inner) {
            Ok(boot) => boot,
            Err(e) => {
                let e = VmmError::RebootFailed(Box::new(e));
                let reason = error_chain(&e);
                log::error!("{reason}");
                self.emit(VmEvent::Shutdown(ShutdownReason::RebootFailed(reason)));
                return Err(e);
            }
        };
        self.emit(VmEvent::Rebooted {
            boot,
            cause: RebootCause::Host,
        });
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
            config: slot.spec.to_file(),
            state: slot.state,
            memory_actual_size: slot.spec.config.memory_bytes,
        })
    }

    /// The statistics of the VM that runs (or is paused), for the Prometheus scrape and
    /// GetDomainStats. Never waits for a VM operation in progress.
    pub fn metrics(&self) -> Option<VmMetrics> {
        let live = self.live_metrics.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().map(MetricsHandle::snapshot)
    }

    /// How the last VM ended by itself, as the VMM's exit code would say it: 0 (also when no VM
    /// ended by itself), 3 a guest crash, 1 a VMM failure.
    pub fn vm_end_code(&self) -> u8 {
        self.lock().end_code.unwrap_or(EXIT_OK)
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
                    "host_errors": d.host_errors,
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
        let m = &metrics.malformed_pci;
        counters.insert(
            "pci_malformed_accesses".into(),
            json!({"config": m.config, "bar": m.bar, "msix": m.msix}),
        );
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

    /// A shutdown signal (SIGTERM, SIGINT, ...): the first asks the guest to shut down and
    /// returns the grace period, after which the signal thread calls
    /// [`Vmm::grace_period_over`]; a second stops the VM now. Without a running VM the VMM
    /// exits at once.
    pub fn shutdown_signal(&self, grace: Duration) -> Option<Duration> {
        let mut inner = self.lock();
        let first = !std::mem::replace(&mut inner.shutdown_signalled, true);
        let mut was_paused = false;
        let running = inner.vm.as_mut().and_then(|slot| {
            let active = slot.active.as_mut()?;
            if !first {
                return Some(None);
            }
            // A paused guest cannot see the press: let it run to shut down (unless it cannot
            // run here: a failed migration's receiver holds its disks; the grace period
            // ends it then).
            if slot.state == VmState::Paused && active.handle.resume() {
                was_paused = true;
            }
            Some(Some(press_power_button(active)))
        });
        if was_paused {
            if let Some(slot) = inner.vm.as_mut() {
                slot.state = VmState::Running;
            }
            self.emit(VmEvent::Resumed);
        }
        drop(inner);
        match running {
            Some(Some(request)) => {
                log::warn!(
                    "Shutdown signal: asked the guest to shut down (power button: {}), {} s grace",
                    request.name(),
                    grace.as_secs()
                );
                return Some(grace);
            }
            Some(None) => {
                log::warn!("Second shutdown signal: stopping the VM now");
                self.request_exit(EXIT_OK);
            }
            None => self.request_exit(EXIT_OK),
        }
        None
    }

    /// The grace period after a shutdown signal ran out: the VM is stopped.
    pub fn grace_period_over(&self) {
        log::warn!("Grace period over: stopping the VM");
        self.request_exit(EXIT_OK);
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
        self.emit(Event::VmmShutdown { exit_code: code });
    }
}

/// The guest's power button: the ACPI power button when the guest's OSPM handles it,
/// Ctrl-Alt-Del on the i8042 otherwise. Every way rvmm asks a guest to shut down comes here.
fn press_power_button(active: &mut ActiveVm) -> ShutdownRequest {
    active.power_button_pressed = true;
    let request = active.handle.request_shutdown();
    log::info!("Power button: the guest got the {}", request.name());
    request
}
