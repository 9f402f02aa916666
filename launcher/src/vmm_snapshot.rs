//! `vm.snapshot` and `vm.restore` (Cloud Hypervisor's API) and `rvmm run --restore`.
//!
//! A snapshot directory holds `config.json` (the VM's configuration, as `vm.info` shows it),
//! `state.bin` and `memory.bin` (see `rvmm_core::snapshot`). The disks are the user's business:
//! restore them (or leave them unchanged) alongside the snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rvmm_core::snapshot::{CONFIG_FILE, RestoreError};
use rvmm_core::{RestoreReport, SaveError, SnapshotReport, VmEvent};

use super::{Console, Inner, VmSlot, VmState, Vmm, VmmError};
use crate::config::SerialMode;
use crate::config::{ConfigError, VmConfigFile};

/// Errors of a snapshot or a restore besides the VM's state.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Saving the VM's state.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// Restoring it.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// `config.json` cannot be written or read.
    #[error("Cannot access {}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not a valid configuration.
    #[error("Invalid {}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ConfigError,
    },
}

impl SnapshotError {
    /// True when the snapshot (not the host) is at fault.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Config { .. } | Self::ConfigFile { .. } => true,
            Self::Restore(e) => !matches!(e, RestoreError::Build(_)),
            Self::Save(_) => false,
        }
    }
}

/// The directory of a `file://` URL (`file:///var/snap` → `/var/snap`).
pub fn file_url_path(field: &'static str, url: &str) -> Result<PathBuf, VmmError> {
    let bad = |reason: &str| VmmError::Url {
        field,
        reason: format!("{url:?}: {reason}"),
    };
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| bad("only file:// URLs are supported"))?;
    if path.is_empty() {
        return Err(bad("no path"));
    }
    Ok(PathBuf::from(path))
}

impl Vmm {
    /// `vm.snapshot`: writes the paused VM to `destination_url` (`file:///dir`).
    pub fn snapshot(&self, destination_url: &str) -> Result<(), VmmError> {
        let dir = file_url_path("destination_url", destination_url)?;
        let mut inner = self.lock();
        let slot = Self::slot_in(&mut inner, "snapshot", &[VmState::Paused])?;
        let Some(active) = &slot.active else {
            return Err(VmmError::NotCreated);
        };
        let started = std::time::Instant::now();
        let info = active
            .handle
            .snapshot(&dir)
            .map_err(|e| VmmError::Snapshot(e.into()))?;
        write_config(&dir, &slot.spec.to_file()).map_err(VmmError::Snapshot)?;
        log::info!(
            "Snapshot in {}: {} bytes of state, {} of {} bytes of memory written, {:?}",
            dir.display(),
            info.state_bytes,
            info.memory_bytes,
            info.memory_size,
            started.elapsed()
        );
        self.emit(VmEvent::Snapshotted(SnapshotReport {
            destination: dir,
            info,
            duration: started.elapsed(),
        }));
        Ok(())
    }

    /// `vm.restore` and `rvmm run --restore`: builds the VM of the snapshot at `source_url`
    /// paused (`vm.resume` lets it go on). `serial` replaces the snapshot's console setting
    /// (the command line's `--serial`). With `prefault` the memory is read in now rather than
    /// as the guest touches it.
    pub fn restore(
        self: &Arc<Self>,
        source_url: &str,
        prefault: bool,
        serial: Option<SerialMode>,
    ) -> Result<(), VmmError> {
        let dir = file_url_path("source_url", source_url)?;
        let started = std::time::Instant::now();
        if let Some(state) = self.state() {
            return Err(VmmError::AlreadyCreated(state));
        }
        let file = read_config(&dir).map_err(VmmError::Restore)?;
        let mut spec = file.validate(&self.settings.host()).map_err(|source| {
            VmmError::Restore(SnapshotError::Config {
                path: dir.join(CONFIG_FILE),
                source,
            })
        })?;
        let mut inner = self.lock();
        if inner.exit_code.is_some() {
            return Err(VmmError::Exiting);
        }
        if let Some(slot) = &inner.vm {
            return Err(VmmError::AlreadyCreated(slot.state));
        }
        if let Some(serial) = serial {
            spec.serial = serial;
        }
        let console = Console::open(
            &spec.serial,
            self.settings.serial_log.as_deref(),
            self.settings.seccomp,
        )
        .map_err(|e| VmmError::Console(e.into()))?;
        let vm = rvmm_core::snapshot::restore_vm(&spec.config, &dir, prefault, console.output())
            .map_err(|e| VmmError::Restore(e.into()))?;
        inner.vm = Some(VmSlot {
            spec,
            serial_log: None,
            console: Some(console),
            state: VmState::Created,
            active: None,
            dhcp: None,
        });
        let running = self
            .start_dhcp_in(&mut inner)
            .and_then(|()| self.start_built(&mut inner, vm, VmState::Paused));
        if let Err(e) = running {
            forget_vm(&mut inner);
            return Err(e);
        }
        log::info!(
            "Restored {} in {:?} (paused)",
            dir.display(),
            started.elapsed()
        );
        self.emit(VmEvent::Restored(RestoreReport {
            source: source_url.to_owned(),
            duration: started.elapsed(),
        }));
        Ok(())
    }
}

/// Drops a VM slot whose restore failed (its console closed).
fn forget_vm(inner: &mut Inner) {
    if let Some(slot) = inner.vm.take()
        && let Some(console) = slot.console
    {
        console.close();
    }
}

fn write_config(dir: &Path, file: &VmConfigFile) -> Result<(), SnapshotError> {
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(file).expect("a configuration always serialises");
    std::fs::write(&path, text).map_err(|source| SnapshotError::ConfigFile { path, source })
}

fn read_config(dir: &Path) -> Result<VmConfigFile, SnapshotError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| SnapshotError::ConfigFile {
        path: path.clone(),
        source,
    })?;
    VmConfigFile::from_json(&text).map_err(|source| SnapshotError::Config { path, source })
}
