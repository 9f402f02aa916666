//! The VMM's public types: exit codes, VM states, errors, settings.

use std::path::PathBuf;

use rvmm_core::boot::BootError;
use rvmm_core::seccomp::SpawnError;
use rvmm_core::{BuildError, CpuProfile};
use serde::Serialize;

use crate::config::{ConfigError, HostSettings, VmConfigFile};

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
    Waiter(#[source] SpawnError),
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
    Snapshot(#[source] super::snapshot::SnapshotError),
    /// Restoring a snapshot failed.
    #[error("Cannot restore the VM")]
    Restore(#[source] super::snapshot::SnapshotError),
    /// A live migration failed or was cancelled.
    #[error("Live migration failed")]
    Migration(#[source] super::migration::MigrationError),
    /// A migration is already under way.
    #[error("A migration is already in progress")]
    MigrationBusy,
    /// The VM handed its disks to a migration's receiver, which holds one still: it stays
    /// paused rather than write a disk another VM may be running on.
    #[error("Cannot resume: the migration's receiver has the disks")]
    DisksTaken(#[source] rvmm_core::DiskLockError),
    /// A NIC's DHCP server cannot start.
    #[error("Cannot start the DHCP server")]
    Dhcp(#[source] crate::dhcp::server::DhcpError),
    /// A file the reboot needs is gone or unreadable: the VM was left running.
    #[error("Cannot reboot: the VM keeps running")]
    RebootRefused(#[source] BootFileError),
    /// The VM stopped for a reboot and could not boot again: it is in state Shutdown.
    #[error("The VM stopped for a reboot and cannot boot again (state Shutdown)")]
    RebootFailed(#[source] Box<VmmError>),
}

/// A file a boot reads cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("Cannot open the {what} {}", path.display())]
pub struct BootFileError {
    /// `kernel`, `initrd` or `disk N`.
    pub(crate) what: String,
    /// The file.
    pub(crate) path: PathBuf,
    /// Cause.
    #[source]
    pub(crate) source: std::io::Error,
}

impl VmmError {
    /// True when the user's configuration, not the host, is at fault.
    pub fn is_bad_config(&self) -> bool {
        match self {
            Self::Config(_) | Self::Console(_) | Self::Url { .. } => true,
            Self::Boot(e) => is_config_build_error(e),
            Self::Restore(e) => e.is_bad_input(),
            Self::Dhcp(e) => e.is_bad_config(),
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
            | BuildError::DiskBoot(_)
            | BuildError::NoBootDisk(_)
            | BuildError::PciWithoutAcpi
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
pub type EventListener = Box<dyn Fn(&crate::events::Event) + Send + Sync>;

/// What a guest-initiated reset does (`--on-reboot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnReboot {
    /// The VM ends, as a microVM's does (exit 0).
    #[default]
    Exit,
    /// The guest boots again in the same process, as a PC reboots.
    Restart,
}

impl std::str::FromStr for OnReboot {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "exit" => Ok(Self::Exit),
            "restart" => Ok(Self::Restart),
            other => Err(format!("'{other}' is not restart or exit")),
        }
    }
}

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
    /// What a guest-initiated reset does.
    pub on_reboot: OnReboot,
    /// The VMM exits when the guest ends itself (power-off, crash; a reset unless restarted).
    /// When false the stopped VM stays defined, in state `Shutdown`, and [`Vmm::vm_end_code`]
    /// tells how it ended: virt-launcher mode exits once virt-handler deleted the domain.
    pub exit_when_guest_ends: bool,
}

impl VmmSettings {
    /// What every VM of this VMM takes from the host ([`VmConfigFile::validate`]).
    pub fn host(&self) -> HostSettings {
        HostSettings {
            kvm_path: self.kvm_path.clone(),
            cpu_profile: self.cpu_profile,
            seccomp: self.seccomp,
        }
    }
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
