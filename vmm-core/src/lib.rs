//! rvmm's virtual machine: guest memory, the KVM VM and its vCPUs, boot loading, CPUID, the
//! port I/O and MMIO buses, and the VM's lifecycle. Knows nothing of HTTP, gRPC or Kubernetes.

#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod acpi;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod control;
pub mod cpuid;
pub mod disk_boot;
pub mod events;
pub mod exit;
pub mod layout;
pub mod lifecycle;
mod machine;
pub mod memory;
pub mod metrics;
pub mod mptable;
pub mod pci;
pub mod regs;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use builder::{
    AddressSpace, BootSource, BuildError, CustomDevice, CustomVirtioDevice, DeviceInterrupt,
    FactoryError, Serial, SerialOutput, Transport, Vm, VmBuilder, VmConfig, build_vm,
};
pub use control::{Outcome, RunState, StopReason, VmControl};
pub use cpuid::CpuProfile;
pub use events::{
    BootInfo, CrashReason, MigrationReport, RebootCause, ReceivedReport, RestoreReport,
    ShutdownReason, SnapshotReport, VmEnd, VmEvent,
};
pub use exit::ExitReason;
pub use lifecycle::{FlushError, RunningVm, ShutdownRequest, VmHandle};
pub use machine::{SaveError, SnapshotInfo};
pub use metrics::{DiskMetrics, MetricsHandle, NicMetrics, VmMetrics};
