//! The VM controller behind the command server: virt-handler's commands mapped onto [`Vmm`].
//!
//! | command | rvmm |
//! | --- | --- |
//! | SyncVirtualMachine | plan the VMI ([`plan_with_formats`], with DisksInfo's formats), its pod network's DHCP ([`pod_network::set_up`]), prepare its files ([`prepare`]: overlays, no image copies), create and boot the VM (the DHCP server starts first); once this VMI's VM exists (running, paused or stopped): apply a new grace period, refuse any other change naming the field ([`live_update`]) |
//! | Pause / Unpause | [`Vmm::pause`] / [`Vmm::resume`]; a no-op when already so |
//! | ShutdownVirtualMachine | the power button (the ACPI power button, Ctrl-Alt-Del for a guest without ACPI: [`Vmm::request_guest_shutdown`]), on every call (virt-handler calls again every 5 s: a booting guest can miss it); the first starts the grace period (`DeletionTimestamp`), after which virt-handler calls Kill |
//! | KillVirtualMachine | [`Vmm::shutdown`]: stopped at once (disks flushed), still defined |
//! | DeleteVirtualMachine | [`Vmm::delete`], the final domain event, then the launcher exits |
//! | ResetVirtualMachine | [`Vmm::reboot`] |
//! | SoftRebootVirtualMachine | unsupported: it needs a guest agent (a guest's own reboot restarts it) |
//! | GetDomain | the domain ([`super::domain::build`]) in the state the VMM's events left it |
//! | GetDomainStats | [`super::stats::domain_stats`] from [`Vmm::metrics`] |
//! | MigrateVirtualMachine, SyncMigrationTarget, CancelVirtualMachineMigration, FinalizeVirtualMachineMigration, SignalTargetPodCleanup | see [`super::migration`] |
//!
//! One VMI per launcher: a Sync for another UID than `--uid` (or than the VMI already
//! running) fails.
//!
//! Commands run one at a time on the control thread; GetDomain and GetDomainStats run on the
//! gRPC runtime's thread meanwhile. So the record's locks are only ever held for a moment,
//! never across a call into the [`Vmm`] (which can take long: a boot, a stop flushing disks).

use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde_json::Value;

use super::domain::{self, DomainState, GuestAddresses, LifeCycle, Reason};
use super::domain_events::Change;
use super::grpc::{BackendError, LauncherBackend};
use super::migration::MigrationMetadata;
use super::pod_network::{self, HostLinks, PodNetworkError};
use super::proto::cmd::v1 as cmd;
use super::stats::domain_stats;
use super::vmi::{
    LaunchPlan, LauncherDirs, PrepareError, Vmi, live_update, plan_with_formats, prepare,
};
use crate::vmm::{VmState, Vmm, VmmError};

/// What the backend refuses or fails at beyond the VMI itself.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The VMI is not the one this launcher runs.
    #[error("VMI {got} is not this launcher's VMI {expected}")]
    WrongVmi {
        /// The launcher's VMI UID.
        expected: String,
        /// The UID in the request.
        got: String,
    },
    /// The domain was deleted; the launcher is ending.
    #[error("The domain was deleted")]
    Deleted,
    /// The guest side of the pod network cannot be set up.
    #[error("Cannot set up the pod network")]
    Network(#[source] PodNetworkError),
    /// A file the VM needs cannot be created.
    #[error("Cannot prepare the VM's files")]
    Prepare(#[source] PrepareError),
    /// The VM cannot be created or booted.
    #[error("Cannot start the VM")]
    Start(#[source] VmmError),
    /// A VM operation failed.
    #[error("Cannot {0} the VM")]
    Vm(&'static str, #[source] VmmError),
    /// The serial console's log file cannot be created.
    #[error("Cannot create the serial console log {}", .0.display())]
    SerialLog(PathBuf, #[source] std::io::Error),
}

fn failed(err: LaunchError) -> BackendError {
    BackendError::Controller(Box::new(err))
}

/// The launcher's one domain: the synced VMI and how it runs, shared by the command backend
/// and the domain-event thread.
#[derive(Debug, Default)]
pub struct DomainRecord {
    defined: Mutex<Option<Defined>>,
    /// The state the VMM's last event left the domain in (written by the event listener).
    state: Mutex<Option<DomainState>>,
    /// The migration metadata (`Spec.Metadata.KubeVirt.Migration`), once one started.
    migration: Mutex<Option<MigrationMetadata>>,
    /// The VM migrated away: its stop is reported as Shutoff (Migrated).
    migrated: AtomicBool,
    /// The addresses each guest NIC (by MAC) was leased by DHCP (written by the event
    /// listener).
    guest_addresses: Mutex<GuestAddresses>,
}

#[derive(Debug)]
struct Defined {
    vmi: Vmi,
    plan: LaunchPlan,
    /// DeleteVirtualMachine was called.
    deleted: bool,
    /// SIGTERM came: virt-handler should shut the VM down.
    marked_for_shutdown: bool,
    /// When the guest was asked to shut down.
    shutdown_started: Option<SystemTime>,
}

/// `vmi` is the defined VMI.
fn check_uid(d: &Defined, vmi: &Vmi) -> Result<(), BackendError> {
    if d.vmi.metadata.uid == vmi.metadata.uid {
        return Ok(());
    }
    Err(failed(LaunchError::WrongVmi {
        expected: d.vmi.metadata.uid.clone(),
        got: vmi.metadata.uid.clone(),
    }))
}

/// The defined, not deleted VM for a command about `vmi`.
fn defined_for<'a>(
    defined: &'a mut Option<Defined>,
    vmi: &Vmi,
) -> Result<&'a mut Defined, BackendError> {
    let d = defined.as_mut().ok_or(BackendError::NoVm)?;
    check_uid(d, vmi)?;
    if d.deleted {
        return Err(failed(LaunchError::Deleted));
    }
    Ok(d)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl DomainRecord {
    /// Records the state a VMM event left the domain in.
    pub fn set_state(&self, state: DomainState) {
        *lock(&self.state) = Some(state);
    }

    /// The state a VMM event means for this domain: a stop after the VM migrated away is
    /// Shutoff (Migrated).
    pub fn event_state(&self, state: DomainState) -> DomainState {
        if self.migrated.load(Ordering::SeqCst) && state.status == LifeCycle::Shutoff {
            DomainState::shutoff(Reason::Migrated)
        } else {
            state
        }
    }

    /// Marks the VM as migrated away (before it is stopped).
    pub fn set_migrated(&self) {
        self.migrated.store(true, Ordering::SeqCst);
    }

    /// The migration metadata.
    pub fn migration(&self) -> Option<MigrationMetadata> {
        lock(&self.migration).clone()
    }

    /// Changes the migration metadata.
    pub fn update_migration(&self, update: impl FnOnce(&mut Option<MigrationMetadata>)) {
        update(&mut lock(&self.migration));
    }

    /// The domain's state, once it has booted.
    pub fn state(&self) -> Option<DomainState> {
        *lock(&self.state)
    }

    /// Records that the NIC with `mac` holds `address` (`held`) or released it.
    pub fn set_guest_address(&self, mac: &str, address: IpAddr, held: bool) {
        let mut addresses = lock(&self.guest_addresses);
        let nic = addresses.entry(mac.to_owned()).or_default();
        if held {
            nic.insert(address);
        } else {
            nic.remove(&address);
        }
        if nic.is_empty() {
            addresses.remove(mac);
        }
    }

    /// Forgets every leased address (the VM stopped).
    pub fn clear_guest_addresses(&self) {
        lock(&self.guest_addresses).clear();
    }

    /// The domain in `state`, whether or not it was deleted since (events queued before the
    /// deletion still describe it); `None` before a sync.
    pub fn domain_in(&self, state: DomainState) -> Option<Value> {
        let defined = lock(&self.defined);
        let d = defined.as_ref()?;
        let mut domain = domain::build(&d.vmi, &d.plan, state);
        domain::set_graceful_shutdown(&mut domain, d.marked_for_shutdown, d.shutdown_started);
        if let Some(migration) = lock(&self.migration).as_ref() {
            domain["Spec"]["Metadata"]["KubeVirt"]["Migration"] = migration.to_json();
        }
        domain::set_guest_addresses(&mut domain, &lock(&self.guest_addresses));
        Some(domain)
    }

    /// Whether a VMI was synced.
    pub fn is_defined(&self) -> bool {
        lock(&self.defined).is_some()
    }

    /// A record of `vmi` synced as `plan` (for the event thread's tests).
    #[cfg(test)]
    pub(crate) fn synced(vmi: Vmi, plan: LaunchPlan) -> Self {
        Self {
            defined: Mutex::new(Some(Defined::new(vmi, plan))),
            ..Self::default()
        }
    }
}

impl Defined {
    fn new(vmi: Vmi, plan: LaunchPlan) -> Self {
        Self {
            vmi,
            plan,
            deleted: false,
            marked_for_shutdown: false,
            shutdown_started: None,
        }
    }
}

/// [`LauncherBackend`] over the VMM.
#[derive(Debug)]
pub struct KubevirtBackend {
    vmm: Arc<Vmm>,
    dirs: LauncherDirs,
    /// `--kubevirt-share-dir` (the migration proxies' sockets are under it).
    share_dir: PathBuf,
    /// `--uid`; empty: any.
    expected_uid: String,
    record: Arc<DomainRecord>,
    changes: Sender<Change>,
}

impl KubevirtBackend {
    /// A backend running VMIs with UID `expected_uid` (any when empty) on `vmm`, with volumes
    /// in `dirs`; it shares `record` with the event thread and queues changes on `changes`.
    pub fn new(
        vmm: Arc<Vmm>,
        dirs: LauncherDirs,
        expected_uid: String,
        record: Arc<DomainRecord>,
        changes: Sender<Change>,
    ) -> Self {
        Self {
            vmm,
            dirs,
            share_dir: PathBuf::from("/var/run/kubevirt"),
            expected_uid,
            record,
            changes,
        }
    }

    /// The backend with its `--kubevirt-share-dir`.
    pub fn with_share_dir(mut self, share_dir: PathBuf) -> Self {
        self.share_dir = share_dir;
        self
    }

    pub(super) fn vmm(&self) -> &Arc<Vmm> {
        &self.vmm
    }

    pub(super) fn dirs(&self) -> &LauncherDirs {
        &self.dirs
    }

    pub(super) fn share_dir(&self) -> &Path {
        &self.share_dir
    }

    pub(super) fn record(&self) -> &Arc<DomainRecord> {
        &self.record
    }

    pub(super) fn changes(&self) -> Sender<Change> {
        self.changes.clone()
    }

    pub(super) fn send_change(&self, change: Change) {
        self.notify(change);
    }

    /// `vmi` is this launcher's (`--uid`).
    pub(super) fn check_expected_uid(&self, vmi: &Vmi) -> Result<(), BackendError> {
        if !self.expected_uid.is_empty() && vmi.metadata.uid != self.expected_uid {
            return Err(failed(LaunchError::WrongVmi {
                expected: self.expected_uid.clone(),
                got: vmi.metadata.uid.clone(),
            }));
        }
        Ok(())
    }

    /// Defines `vmi` as a migration target (nothing boots); false when it is defined already.
    pub(super) fn define_target(&self, vmi: &Vmi, plan: &LaunchPlan) -> Result<bool, BackendError> {
        let mut defined = lock(&self.record.defined);
        if defined.is_some() {
            defined_for(&mut defined, vmi)?;
            return Ok(false);
        }
        *defined = Some(Defined::new(vmi.clone(), plan.clone()));
        Ok(true)
    }

    /// SIGTERM: marks the domain for a graceful shutdown, which virt-handler answers with
    /// ShutdownVirtualMachine, and tells whether a VM runs (or is paused) that needs one.
    pub fn mark_for_graceful_shutdown(&self) -> bool {
        if self.running_or_paused().is_none() {
            return false;
        }
        let mut defined = lock(&self.record.defined);
        let Some(d) = defined.as_mut().filter(|d| !d.deleted) else {
            return false;
        };
        if !std::mem::replace(&mut d.marked_for_shutdown, true) {
            self.notify(Change::Metadata);
        }
        true
    }

    /// Whether a VMI has been synced.
    pub fn has_synced(&self) -> bool {
        self.record.is_defined()
    }

    fn notify(&self, change: Change) {
        // The event thread ends only with the VMM; a change after that has no one to tell.
        let _ = self.changes.send(change);
    }

    /// Checks that `vmi`'s VM is defined and not deleted.
    pub(super) fn check_defined(&self, vmi: &Vmi) -> Result<(), BackendError> {
        defined_for(&mut lock(&self.record.defined), vmi).map(drop)
    }

    /// Runs `op` unless the VM is already in `done`; `op` needs a defined VM.
    fn transition(
        &self,
        vmi: &Vmi,
        done: VmState,
        action: &'static str,
        op: impl FnOnce(&Vmm) -> Result<(), VmmError>,
    ) -> Result<(), BackendError> {
        self.check_defined(vmi)?;
        if self.vmm.state() == Some(done) {
            return Ok(());
        }
        op(&self.vmm).map_err(|e| failed(LaunchError::Vm(action, e)))
    }

    /// A Sync of the VMI whose VM exists: applies what can change live, refuses the rest.
    fn resync(&self, d: &mut Defined, vmi: &Vmi) -> Result<(), BackendError> {
        check_uid(d, vmi)?;
        if d.deleted {
            return Err(failed(LaunchError::Deleted));
        }
        // Running, paused, or stopped for good (virt-handler then finishes the VMI; it does
        // not start it again).
        let update = live_update(&d.vmi, vmi).map_err(BackendError::Vmi)?;
        if update.grace_period_changed {
            // As KubeVirt's launcher: the domain's grace period follows the VMI's.
            d.vmi.spec.termination_grace_period_seconds = vmi.spec.termination_grace_period_seconds;
            self.notify(Change::Metadata);
        }
        Ok(())
    }

    fn running_or_paused(&self) -> Option<VmState> {
        self.vmm
            .state()
            .filter(|s| matches!(s, VmState::Running | VmState::Paused))
    }
}

impl LauncherBackend for KubevirtBackend {
    fn sync(&self, vmi: &Vmi, options: &cmd::VirtualMachineOptions) -> Result<(), BackendError> {
        if !self.expected_uid.is_empty() && vmi.metadata.uid != self.expected_uid {
            return Err(failed(LaunchError::WrongVmi {
                expected: self.expected_uid.clone(),
                got: vmi.metadata.uid.clone(),
            }));
        }
        if let Some(d) = lock(&self.record.defined).as_mut() {
            return self.resync(d, vmi);
        }
        // virt-handler's measured formats (qemu-img info) per volume, where it sent them.
        let formats = options
            .disks_info
            .iter()
            .filter(|(_, info)| !info.format.is_empty())
            .map(|(name, info)| (name.clone(), info.format.clone()))
            .collect();
        let mut plan = plan_with_formats(vmi, &self.dirs, &formats).map_err(BackendError::Vmi)?;
        pod_network::set_up(
            vmi,
            &mut plan,
            &self.dirs,
            &HostLinks,
            &options.interface_domain_attachment,
        )
        .map_err(|e| failed(LaunchError::Network(e)))?;
        let cluster_disables_log = options
            .cluster_config
            .as_ref()
            .is_some_and(|c| c.serial_console_log_disabled);
        if cluster_disables_log && vmi.spec.domain.devices.log_serial_console != Some(true) {
            plan.serial_log = None;
        }
        prepare(&plan).map_err(|e| failed(LaunchError::Prepare(e)))?;
        if let Some(log) = &plan.serial_log {
            create_serial_log(log).map_err(|e| failed(LaunchError::SerialLog(log.clone(), e)))?;
        }
        // Defined before the VM boots: the event thread builds the ADDED event from it.
        *lock(&self.record.defined) = Some(Defined::new(vmi.clone(), plan.clone()));
        let started = self
            .vmm
            .create_logged(plan.config, plan.serial_log.clone())
            .and_then(|()| self.vmm.boot());
        if let Err(e) = started {
            // Forget the VM so that the next Sync tries afresh.
            *lock(&self.record.defined) = None;
            let _ = self.vmm.delete();
            return Err(failed(LaunchError::Start(e)));
        }
        log::info!("VMI {} runs", plan.domain_name);
        Ok(())
    }

    fn pause(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.transition(vmi, VmState::Paused, "pause", Vmm::pause)
    }

    fn unpause(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.transition(vmi, VmState::Running, "resume", Vmm::resume)
    }

    fn shutdown(&self, vmi: &Vmi) -> Result<(), BackendError> {
        match self.check_defined(vmi) {
            Ok(()) => {}
            // Nothing to shut down, as KubeVirt answers for a missing domain.
            Err(BackendError::NoVm) => return Ok(()),
            Err(e) => return Err(e),
        }
        // Every call presses the button again; a paused guest sees it when resumed.
        if !self.vmm.request_guest_shutdown() {
            return Ok(()); // Already off.
        }
        let first = lock(&self.record.defined).as_mut().is_some_and(|d| {
            let first = d.shutdown_started.is_none();
            d.shutdown_started.get_or_insert_with(SystemTime::now);
            first
        });
        if first {
            // The grace period starts with the first request: virt-handler kills the VM when
            // it is over.
            self.notify(Change::Metadata);
        }
        Ok(())
    }

    fn kill(&self, vmi: &Vmi) -> Result<(), BackendError> {
        if let Some(d) = lock(&self.record.defined).as_ref() {
            check_uid(d, vmi)?;
        } else {
            return Ok(()); // Nothing to kill, as KubeVirt answers for a missing domain.
        }
        if self.running_or_paused().is_none() {
            return Ok(());
        }
        self.vmm
            .shutdown()
            .map_err(|e| failed(LaunchError::Vm("kill", e)))
    }

    fn delete(&self, vmi: &Vmi) -> Result<(), BackendError> {
        match lock(&self.record.defined).as_ref().filter(|d| !d.deleted) {
            Some(d) => check_uid(d, vmi)?,
            None => return Ok(()), // Nothing (more) to delete.
        }
        match self.vmm.delete() {
            Ok(()) | Err(VmmError::NotCreated) => {}
            Err(e) => return Err(failed(LaunchError::Vm("delete", e))),
        }
        if let Some(d) = lock(&self.record.defined).as_mut() {
            d.deleted = true;
        }
        self.notify(Change::Deleted);
        Ok(())
    }

    fn reset(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.check_defined(vmi)?;
        self.vmm
            .reboot()
            .map_err(|e| failed(LaunchError::Vm("reset", e)))
    }

    fn soft_reboot(&self, _vmi: &Vmi) -> Result<(), BackendError> {
        // KubeVirt's launcher asks the guest agent; without one it fails too.
        Err(BackendError::Unsupported(
            "A soft reboot (it needs a guest agent; ResetVirtualMachine restarts the guest)",
        ))
    }

    fn domain(&self) -> Option<Value> {
        let deleted = lock(&self.record.defined).as_ref().map(|d| d.deleted)?;
        if deleted {
            return None;
        }
        self.record.domain_in(self.record.state()?)
    }

    fn migrate(&self, vmi: &Vmi, options: &[u8]) -> Result<(), BackendError> {
        KubevirtBackend::migrate(self, vmi, options)
    }

    fn sync_migration_target(&self, vmi: &Vmi) -> Result<(), BackendError> {
        KubevirtBackend::sync_migration_target(self, vmi)
    }

    fn cancel_migration(&self, vmi: &Vmi) -> Result<(), BackendError> {
        KubevirtBackend::cancel_migration(self, vmi)
    }

    fn finalize_migration(&self, vmi: &Vmi) -> Result<(), BackendError> {
        KubevirtBackend::finalize_migration(self, vmi)
    }

    fn signal_target_pod_cleanup(&self, vmi: &Vmi) -> Result<(), BackendError> {
        KubevirtBackend::signal_target_pod_cleanup(self, vmi)
    }

    fn domain_stats(&self) -> Result<Option<Value>, BackendError> {
        let defined = lock(&self.record.defined);
        let Some(d) = defined.as_ref().filter(|d| !d.deleted) else {
            return Ok(None);
        };
        Ok(self
            .vmm
            .metrics()
            .map(|metrics| domain_stats(&d.vmi, &d.plan, &metrics)))
    }

    fn guest_ping_failed(&self) {
        self.notify(Change::GuestAgentPingFailed);
    }
}

/// Creates the serial console's log for KubeVirt's `guest-console-log` container (it runs as
/// KubeVirt's unprivileged user and follows the file): private to that user and rvmm.
fn create_serial_log(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(path, Some(KUBEVIRT_UID), Some(KUBEVIRT_UID))?;
    }
    Ok(())
}

/// KubeVirt's unprivileged user and group (`qemu`, 107), which reads the serial console log.
const KUBEVIRT_UID: u32 = 107;

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
