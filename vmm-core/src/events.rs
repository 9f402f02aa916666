//! Typed events of a VM's life: what a VMM built on rvmm-core tells its users (an event stream,
//! an orchestrator) happened to the VM.
//!
//! The core decides the events it knows the cause of: how a VM ended
//! ([`StopReason::event`](crate::StopReason::event)) and what it booted ([`BootInfo::of`]).
//! The rest are named here so every embedder reports them alike; the VMM that drives the VM
//! (pause, snapshot, migration) emits them. Consumers `match` on the variants: no behaviour
//! hangs on a message's text, which is for people.
//!
//! ```
//! use rvmm_core::{RunningVm, VmEnd, VmEvent};
//!
//! /// Waits for the VM to end and reports it.
//! fn report_end(running: RunningVm, report: impl Fn(VmEvent)) {
//!     let end = running.wait().end();
//!     if let VmEnd::Crashed(reason) = &end {
//!         eprintln!("guest crashed: {reason}");
//!     }
//!     report(end.into());
//! }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::builder::{BootSource, VmConfig};
use crate::control::RegisterSnapshot;
use crate::machine::SnapshotInfo;

/// A change in a VM's life.
#[derive(Clone, Debug, PartialEq)]
pub enum VmEvent {
    /// The VM booted: its vCPUs run the guest.
    Booted(BootInfo),
    /// The vCPUs and devices are paused.
    Paused,
    /// The VM runs again after a pause.
    Resumed,
    /// The VM was torn down and booted again from its configuration.
    Rebooted {
        /// What it booted.
        boot: BootInfo,
        /// Who asked for the reboot.
        cause: RebootCause,
    },
    /// The VM stopped, the guest not at fault.
    Shutdown(ShutdownReason),
    /// The guest crashed and the VM stopped.
    Crashed(CrashReason),
    /// A snapshot of the paused VM was written.
    Snapshotted(SnapshotReport),
    /// The VM was restored from a snapshot; it is paused.
    Restored(RestoreReport),
    /// A live migration away started.
    MigrationStarted {
        /// Where the VM goes, as the user named it.
        destination: String,
    },
    /// The VM migrated away: it runs at the destination now.
    Migrated(MigrationReport),
    /// A live migration away ended without moving the VM, which runs on here.
    MigrationFailed {
        /// It was cancelled rather than failed.
        cancelled: bool,
        /// Why, for people.
        error: String,
    },
    /// A VM came in by live migration and runs here.
    MigrationReceived(ReceivedReport),
}

/// What a VM booted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The boot source: the kernel file, or `disk N (PATH)` for a boot from a disk.
    pub source: String,
}

impl BootInfo {
    /// What a VM built from `config` boots.
    pub fn of(config: &VmConfig) -> Self {
        let source = match &config.boot {
            BootSource::Kernel { kernel, .. } => kernel.display().to_string(),
            BootSource::Disk { index } => match config.disks.get(*index) {
                Some(disk) => format!("disk {index} ({})", disk.path.display()),
                None => format!("disk {index}"),
            },
        };
        Self {
            vcpus: config.vcpus,
            memory_bytes: config.memory_bytes,
            source,
        }
    }
}

/// Who rebooted a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebootCause {
    /// The VMM's user asked for it.
    Host,
    /// The guest reset itself and the VMM booted it again.
    Guest,
}

/// Why a VM stopped without the guest crashing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset itself and nothing booted it again (a microVM's end, or the reset a
    /// guest answers a power-button press with).
    Reset,
    /// The host stopped the VM.
    Requested,
    /// KVM could not run the guest.
    KvmFailure {
        /// The vCPU.
        vcpu: u8,
        /// The exit and its details.
        exit: String,
        /// Its registers.
        regs: Option<RegisterSnapshot>,
    },
    /// The VM stopped to boot again (a reboot, or a guest reset to restart) and could not
    /// boot: the error, for people.
    RebootFailed(String),
}

/// How a guest crashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashReason {
    /// The guest triple-faulted.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
        /// Its registers.
        regs: Option<RegisterSnapshot>,
    },
    /// The guest reported a crash (a panic notifier).
    Reported {
        /// The reporting vCPU.
        vcpu: u8,
    },
}

/// How a VM ended: the event its [`StopReason`](crate::StopReason) means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// Stopped, the guest not at fault.
    Shutdown(ShutdownReason),
    /// The guest crashed.
    Crashed(CrashReason),
}

impl From<VmEnd> for VmEvent {
    fn from(end: VmEnd) -> Self {
        match end {
            VmEnd::Shutdown(reason) => Self::Shutdown(reason),
            VmEnd::Crashed(reason) => Self::Crashed(reason),
        }
    }
}

/// What a snapshot wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The snapshot's directory.
    pub destination: PathBuf,
    /// The files' sizes.
    pub info: SnapshotInfo,
    /// How long writing it took.
    pub duration: Duration,
}

/// A restore from a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreReport {
    /// The snapshot, as the user named it.
    pub source: String,
    /// How long restoring took.
    pub duration: Duration,
}

/// A live migration away that completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    /// From the start to the destination's last answer.
    pub total: Duration,
    /// From the final pause here to the destination running the VM.
    pub downtime: Duration,
    /// Pre-copy rounds (the final stop-and-copy not counted).
    pub rounds: u32,
    /// Guest memory bytes sent.
    pub memory_bytes: u64,
    /// When it started.
    pub started_at: SystemTime,
    /// When it ended.
    pub ended_at: SystemTime,
}

/// A VM received by live migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedReport {
    /// Where it was received, as the user named it.
    pub receiver: String,
    /// Guest memory bytes received.
    pub memory_bytes: u64,
    /// From the sender's connection to the VM running here.
    pub duration: Duration,
}

fn with_regs(f: &mut fmt::Formatter<'_>, regs: &Option<RegisterSnapshot>) -> fmt::Result {
    match regs {
        Some(regs) => write!(f, " ({regs})"),
        None => Ok(()),
    }
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PowerOff => write!(f, "Guest powered off"),
            Self::Reset => write!(f, "Guest reset"),
            Self::Requested => write!(f, "Stopped on request"),
            Self::KvmFailure { vcpu, exit, regs } => {
                write!(f, "KVM cannot run vCPU {vcpu}: {exit}")?;
                with_regs(f, regs)
            }
            Self::RebootFailed(error) => f.write_str(error),
        }
    }
}

impl fmt::Display for CrashReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TripleFault { vcpu, regs } => {
                write!(f, "Guest triple fault on vCPU {vcpu} (KVM_EXIT_SHUTDOWN)")?;
                with_regs(f, regs)
            }
            Self::Reported { vcpu } => write!(f, "Guest reported a crash on vCPU {vcpu}"),
        }
    }
}

impl fmt::Display for VmEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shutdown(reason) => reason.fmt(f),
            Self::Crashed(reason) => reason.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::control::StopReason;

    fn config(boot: BootSource) -> VmConfig {
        VmConfig {
            vcpus: 2,
            memory_bytes: 64 << 20,
            boot,
            cmdline: String::new(),
            cpu_profile: crate::CpuProfile::Host,
            kvm_path: PathBuf::from("/dev/kvm"),
            rng: false,
            disks: Vec::new(),
            nets: Vec::new(),
            seccomp: false,
            transport: crate::Transport::Mmio,
            acpi: false,
        }
    }

    #[test]
    fn boot_info_names_the_kernel_or_the_boot_disk() {
        let kernel = BootInfo::of(&config(BootSource::kernel("/boot/vmlinux")));
        assert_eq!(
            kernel,
            BootInfo {
                vcpus: 2,
                memory_bytes: 64 << 20,
                source: "/boot/vmlinux".into()
            }
        );
        let disk = BootInfo::of(&config(BootSource::Disk { index: 3 }));
        assert_eq!(disk.source, "disk 3");
    }

    #[test]
    fn every_stop_reason_is_a_shutdown_or_a_crash_with_the_same_text() {
        let regs = Some(RegisterSnapshot {
            rip: 0x10,
            ..Default::default()
        });
        let cases = [
            (
                StopReason::PowerOff,
                VmEnd::Shutdown(ShutdownReason::PowerOff),
            ),
            (StopReason::Reset, VmEnd::Shutdown(ShutdownReason::Reset)),
            (
                StopReason::Requested,
                VmEnd::Shutdown(ShutdownReason::Requested),
            ),
            (
                StopReason::KvmFailure {
                    vcpu: 1,
                    exit: "KVM_EXIT_INTERNAL_ERROR".into(),
                    regs,
                },
                VmEnd::Shutdown(ShutdownReason::KvmFailure {
                    vcpu: 1,
                    exit: "KVM_EXIT_INTERNAL_ERROR".into(),
                    regs,
                }),
            ),
            (
                StopReason::TripleFault { vcpu: 0, regs },
                VmEnd::Crashed(CrashReason::TripleFault { vcpu: 0, regs }),
            ),
            (
                StopReason::GuestCrash { vcpu: 2 },
                VmEnd::Crashed(CrashReason::Reported { vcpu: 2 }),
            ),
        ];
        for (stop, end) in cases {
            assert_eq!(stop.end(), end, "{stop:?}");
            assert_eq!(stop.to_string(), end.to_string());
            assert_eq!(stop.event(), VmEvent::from(end));
        }
    }

    #[test]
    fn stop_texts_are_the_ones_users_see() {
        assert_eq!(ShutdownReason::PowerOff.to_string(), "Guest powered off");
        assert_eq!(ShutdownReason::Reset.to_string(), "Guest reset");
        assert_eq!(ShutdownReason::Requested.to_string(), "Stopped on request");
        let tf = CrashReason::TripleFault {
            vcpu: 0,
            regs: Some(RegisterSnapshot {
                rip: 0xfff0,
                ..Default::default()
            }),
        };
        assert_eq!(
            tf.to_string(),
            "Guest triple fault on vCPU 0 (KVM_EXIT_SHUTDOWN) (rip=0xfff0 cr0=0x0 cr3=0x0 cr4=0x0 efer=0x0)"
        );
        assert_eq!(
            ShutdownReason::RebootFailed("Cannot boot: x".into()).to_string(),
            "Cannot boot: x"
        );
    }
}
