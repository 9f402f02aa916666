//! KubeVirt's live migration on rvmm: the five migration commands and the migration metadata
//! virt-handler reads in the domain.
//!
//! The flow, as KubeVirt's own launcher has it (pkg/virt-launcher/virtwrap/live-migration-
//! source.go, -target.go; the proxies of pkg/virt-handler/migration-proxy):
//!
//! - Target pod, SyncMigrationTarget: the VMI is planned and its files prepared as for a
//!   Sync, but nothing boots; the migration metadata starts (start timestamp, mode PreCopy);
//!   `<share-dir>/migrationproxy/` is created and rvmm listens on
//!   `<share-dir>/migrationproxy/<key>-49152-source.sock`, where virt-handler's target proxy
//!   delivers the source's stream (`<key>`: the source VMI's UID for a decentralized
//!   migration, the VMI's UID otherwise). Once the VM arrives and runs, the metadata gets its
//!   end timestamp and the domain goes out `ADDED`, Running.
//! - Source pod, MigrateVirtualMachine: the metadata starts (the migration UID from
//!   `status.migrationState`); the VM is sent (rvmm's migration protocol, see
//!   [`crate::vmm::migration`]) to `<share-dir>/migrationproxy/<vmi-uid>-49152-source.sock`,
//!   virt-handler's source proxy. The call returns at once; the end timestamp (and
//!   `Failed`, `FailureReason`) is set when it finishes, and a successful one leaves the domain
//!   Shutoff (Migrated). A migration UID already run is refused, one in progress is a no-op.
//! - CancelVirtualMachineMigration: abort status `Aborting`, the migration stops (the VM goes
//!   on here), then `Succeeded` and the result "Live migration has been aborted"; ignored when
//!   nothing migrates.
//! - FinalizeVirtualMachineMigration (target): succeeds once the migrated VM runs here.
//! - SignalTargetPodCleanup: a target pod (`POD_NAME` is the VMI's target pod) that has not
//!   received its VM ends its launcher.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rvmm_core::seccomp::{spawn_confined, spawn_filtered};
use serde_json::{Value, json};

use super::backend::{DomainRecord, KubevirtBackend};
use super::domain::rfc3339;
use super::domain_events::Change;
use super::grpc::BackendError;
use super::vmi::{Vmi, plan, prepare};
use crate::seccomp::{control_rules, migration_send_rules, thread_filter_for};
use crate::vmm::migration::{MigrationError, MigrationListener, SendOptions};
use crate::vmm::{EXIT_OK, VmState, Vmm, VmmError};

/// The port KubeVirt's proxies name the direct migration stream after.
pub const DIRECT_MIGRATION_PORT: u16 = 49152;

/// `api.MigrationMetadata`, as virt-handler reads it from the domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationMetadata {
    /// The migration's UID.
    pub uid: String,
    /// When it started.
    pub start: Option<SystemTime>,
    /// When it ended (either way).
    pub end: Option<SystemTime>,
    /// It failed (or was aborted).
    pub failed: bool,
    /// Why.
    pub failure_reason: String,
    /// "", "Aborting", "Succeeded" or "Failed".
    pub abort_status: String,
    /// "PreCopy".
    pub mode: String,
}

impl MigrationMetadata {
    fn started(uid: String) -> Self {
        Self {
            uid,
            start: Some(SystemTime::now()),
            mode: "PreCopy".into(),
            ..Default::default()
        }
    }

    /// The JSON of `Spec.Metadata.KubeVirt.Migration` (Go's field names; timestamps in
    /// RFC 3339; empty fields left out as Go's `omitempty` does).
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |key: &str, value: Value| {
            m.insert(key.into(), value);
        };
        if !self.uid.is_empty() {
            put("UID", json!(self.uid));
        }
        if let Some(t) = self.start {
            put("StartTimestamp", json!(rfc3339(t)));
        }
        if let Some(t) = self.end {
            put("EndTimestamp", json!(rfc3339(t)));
        }
        if self.failed {
            put("Failed", json!(true));
        }
        if !self.failure_reason.is_empty() {
            put("FailureReason", json!(self.failure_reason));
        }
        if !self.abort_status.is_empty() {
            put("AbortStatus", json!(self.abort_status));
        }
        if !self.mode.is_empty() {
            put("Mode", json!(self.mode));
        }
        Value::Object(m)
    }
}

/// `<share-dir>/migrationproxy/<key>-<port>-source.sock` (KubeVirt's `SourceUnixFile`).
pub fn proxy_socket(share_dir: &Path, key: &str) -> PathBuf {
    share_dir
        .join("migrationproxy")
        .join(format!("{key}-{DIRECT_MIGRATION_PORT}-source.sock"))
}

/// KubeVirt's `MigrationUID`: the source state's when there is one.
pub fn migration_uid(vmi: &Vmi) -> String {
    let Some(state) = &vmi.status.migration_state else {
        return String::new();
    };
    match &state.source_state {
        Some(source) => source.migration_uid.clone(),
        None => state.migration_uid.clone(),
    }
}

/// The key of the target's proxy socket: the source VMI's UID for a decentralized
/// migration over unix sockets, the VMI's own otherwise (virt-handler's `migrationProxyKey`).
pub fn target_proxy_key(vmi: &Vmi) -> String {
    let source_uid = vmi
        .status
        .migration_state
        .as_ref()
        .and_then(|s| s.source_state.as_ref())
        .and_then(|s| s.vmi_uid.clone());
    match source_uid {
        Some(uid) if vmi.status.migration_transport == "Unix" => uid,
        _ => vmi.metadata.uid.clone(),
    }
}

fn invalid(message: String) -> BackendError {
    BackendError::Controller(message.into())
}

/// Options of MigrateVirtualMachine (KubeVirt's `MigrationOptions` JSON) rvmm honours: a
/// timeout from `CompletionTimeoutPerGiB` (seconds per GiB of guest memory).
fn send_options(options: &[u8], memory_bytes: u64) -> SendOptions {
    let mut send = SendOptions::default();
    let parsed: Value = serde_json::from_slice(options).unwrap_or(Value::Null);
    if let Some(per_gib) = parsed["CompletionTimeoutPerGiB"]
        .as_u64()
        .filter(|s| *s > 0)
    {
        let gib = memory_bytes.div_ceil(1 << 30).max(1);
        send.timeout = std::time::Duration::from_secs(per_gib.saturating_mul(gib));
    }
    send
}

impl KubevirtBackend {
    fn set_migration(&self, update: impl FnOnce(&mut Option<MigrationMetadata>)) {
        self.record().update_migration(update);
        self.send_change(Change::Metadata);
    }

    /// MigrateVirtualMachine.
    pub(super) fn migrate(&self, vmi: &Vmi, options: &[u8]) -> Result<(), BackendError> {
        self.check_defined(vmi)?;
        let uid = migration_uid(vmi);
        if vmi.status.migration_state.is_none() {
            return Err(invalid(
                "cannot migrate VMI until migrationState is ready".into(),
            ));
        }
        if let Some(m) = self.record().migration().filter(|m| m.uid == uid) {
            return match m.end {
                None => Ok(()),
                Some(end) => Err(invalid(format!(
                    "migration job {uid} already executed, finished at {}, failed: {}, abortStatus: {}",
                    rfc3339(end),
                    m.failed,
                    m.abort_status
                ))),
            };
        }
        if self.vmm().state() != Some(VmState::Running) {
            return Err(invalid("only a running VM can migrate".into()));
        }
        self.set_migration(|m| *m = Some(MigrationMetadata::started(uid)));
        let url = format!(
            "unix:{}",
            proxy_socket(self.share_dir(), &vmi.metadata.uid).display()
        );
        let memory = self
            .vmm()
            .info()
            .map(|i| i.memory_actual_size)
            .unwrap_or_default();
        let options = send_options(options, memory);
        let (vmm, record, changes) = (self.vmm().clone(), self.record().clone(), self.changes());
        // It only moves memory and state and stops the VM: its own filter, no capabilities
        // (the proxy socket is virt-handler's, made for the launcher's user).
        let filter = thread_filter_for(vmm.settings().seccomp, migration_send_rules())
            .map_err(|e| invalid(format!("Cannot filter the migration thread: {e}")))?;
        spawn_filtered("kubevirt-migrate", filter, move || {
            let result = vmm.send_migration(&url, &options);
            finish_source(&vmm, &record, result);
            let _ = changes.send(Change::Metadata);
        })
        .map_err(|e| invalid(format!("Cannot start the migration thread: {e}")))?;
        Ok(())
    }

    /// CancelVirtualMachineMigration.
    pub(super) fn cancel_migration(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.check_defined(vmi)?;
        let Some(m) = self.record().migration() else {
            return Ok(());
        };
        if m.end.is_some() || m.failed || m.start.is_none() || !m.abort_status.is_empty() {
            log::info!("Cancel migration ignored: the VMI is not migrating");
            return Ok(());
        }
        self.set_migration(|m| {
            if let Some(m) = m {
                m.abort_status = "Aborting".into();
            }
        });
        if !self.vmm().cancel_migration() {
            // It ended meanwhile: nothing was aborted.
            self.set_migration(|m| {
                if let Some(m) = m {
                    m.abort_status = "Failed".into();
                }
            });
        }
        Ok(())
    }

    /// SyncMigrationTarget.
    pub(super) fn sync_migration_target(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.check_expected_uid(vmi)?;
        let plan = plan(vmi, self.dirs()).map_err(BackendError::Vmi)?;
        if !self.define_target(vmi, &plan)? {
            return Ok(()); // Already waiting for (or running) this VMI.
        }
        prepare(&plan).map_err(failed_prepare)?;
        self.set_migration(|m| *m = Some(MigrationMetadata::started(migration_uid(vmi))));
        let dir = self.share_dir().join("migrationproxy");
        std::fs::create_dir_all(&dir)
            .map_err(|e| invalid(format!("Cannot create {}: {e}", dir.display())))?;
        let url = format!(
            "unix:{}",
            proxy_socket(self.share_dir(), &target_proxy_key(vmi)).display()
        );
        // Bound before the answer: virt-handler's proxy may connect right after it.
        let listener =
            MigrationListener::bind(&url).map_err(|e| invalid(crate::errors::error_chain(&e)))?;
        let (vmm, record, changes) = (self.vmm().clone(), self.record().clone(), self.changes());
        let config = plan.config.clone();
        log::info!("Prepared migration target pod, listening on {url}");
        // It builds the VM it receives (KVM, disks, taps, the console; the VM's threads), as
        // the control thread boots one: the control filter, and the capabilities the control
        // thread has now (opening devices may need them; the VM's start lowers them).
        let filter = thread_filter_for(vmm.settings().seccomp, control_rules())
            .map_err(|e| invalid(format!("Cannot filter the migration thread: {e}")))?;
        spawn_confined("kubevirt-receive", filter, None, move || {
            let result = vmm.receive_migration_as(listener, config);
            record.update_migration(|m| {
                if let Some(m) = m {
                    m.end = Some(SystemTime::now());
                    if let Err(e) = &result {
                        m.failed = true;
                        m.failure_reason = crate::errors::error_chain(e);
                    }
                }
            });
            if let Err(e) = result {
                log::error!(
                    "Incoming migration failed: {}",
                    crate::errors::error_chain(&e)
                );
            }
            let _ = changes.send(Change::Metadata);
        })
        .map_err(|e| invalid(format!("Cannot start the migration thread: {e}")))?;
        Ok(())
    }

    /// FinalizeVirtualMachineMigration (target).
    pub(super) fn finalize_migration(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.check_defined(vmi)?;
        match self.vmm().state() {
            Some(VmState::Running | VmState::Paused) => Ok(()),
            _ => Err(invalid("no migrated VM runs here".into())),
        }
    }

    /// SignalTargetPodCleanup.
    pub(super) fn signal_target_pod_cleanup(&self, vmi: &Vmi) -> Result<(), BackendError> {
        let me = std::env::var("POD_NAME").unwrap_or_default();
        let target = vmi
            .status
            .migration_state
            .as_ref()
            .map(|s| s.target_pod.as_str())
            .unwrap_or_default();
        if !me.is_empty() && me == target && self.vmm().state().is_none() {
            log::info!("Signaled target pod {me} to clean up: the launcher ends");
            self.vmm().request_exit(EXIT_OK);
        }
        Ok(())
    }
}

fn failed_prepare(e: super::vmi::PrepareError) -> BackendError {
    BackendError::Controller(Box::new(super::backend::LaunchError::Prepare(e)))
}

/// Records the source's result; a migrated VM is stopped, and its domain goes Shutoff
/// (Migrated) instead of Destroyed (see [`DomainRecord::set_migrated`]).
fn finish_source(
    vmm: &Arc<Vmm>,
    record: &DomainRecord,
    result: Result<crate::vmm::migration::MigrationStats, VmmError>,
) {
    let aborted = matches!(&result, Err(VmmError::Migration(MigrationError::Cancelled)));
    if result.is_ok() {
        // Stopped first: once the end is recorded, virt-handler finds the domain gone here.
        record.set_migrated();
        if let Err(e) = vmm.shutdown() {
            log::warn!("Cannot stop the migrated VM: {e}");
        }
    }
    record.update_migration(|m| {
        if let Some(m) = m {
            m.end = Some(SystemTime::now());
            if aborted {
                m.abort_status = "Succeeded".into();
            }
            match &result {
                Ok(_) => {}
                Err(_) if aborted => {
                    m.failed = true;
                    m.failure_reason = "Live migration has been aborted".into();
                }
                Err(e) => {
                    m.failed = true;
                    m.failure_reason =
                        format!("Live migration failed. {}", crate::errors::error_chain(e));
                }
            }
        }
    });
}
