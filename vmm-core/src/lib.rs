//! rvmm's virtual machine on KVM: guest memory, the VM and its vCPUs, boot loading, CPUID, the
//! port I/O and MMIO buses, the PCI root complex, ACPI tables, snapshots and the VM's
//! lifecycle. Knows nothing of HTTP, gRPC or Kubernetes: the `rvmm` launcher adds those.
//!
//! A VM is put together with a [`VmBuilder`] (memory, vCPUs, what it boots, devices), built
//! into a [`Vm`] and started; the [`RunningVm`] it becomes is the handle: [`VmHandle::pause`],
//! [`VmHandle::resume`], [`VmHandle::stop`], [`VmHandle::snapshot`], [`VmHandle::metrics`] and
//! [`RunningVm::wait`] for the end, which says why ([`StopReason`]). Clones of the
//! [`VmHandle`] control it from other threads.
//!
//! ```no_run
//! use rvmm_core::{BootSource, Outcome, VmBuilder};
//!
//! // A kernel (ELF vmlinux or bzImage) with its console on this process's stdout.
//! let vm = VmBuilder::new(BootSource::kernel("vmlinux"))
//!     .vcpus(2)
//!     .memory_mib(512)
//!     .cmdline("console=ttyS0 reboot=k panic=-1")
//!     .rng(true)
//!     .build(Box::new(std::io::stdout()))?
//!     .start()?;
//! let handle = vm.handle(); // for another thread: pause, resume, stop, metrics
//! std::thread::spawn(move || eprintln!("{:?}", handle.metrics().exits));
//! let reason = vm.wait();
//! assert_eq!(reason.outcome(), Outcome::Clean, "{reason}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! An embedder adds devices of its own without forking: a port I/O or MMIO device
//! ([`rvmm_devices::BusDevice`]) at a range of its choosing with an optional interrupt line
//! ([`CustomDevice`]), or a virtio device ([`rvmm_devices::virtio::VirtioDevice`]) on the VM's
//! transport ([`CustomVirtioDevice`]); see [`builder`] for the rules. The crate's examples
//! (`vmm-core/examples`: `boot`, `custom_device`, `disk_and_net`) run as they are.
//!
//! rvmm needs `/dev/kvm` and x86_64 Linux. The devices' and vCPUs' threads run under seccomp
//! filters unless [`VmBuilder::seccomp`] turns them off.

#![deny(missing_docs)]
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
pub use lifecycle::{DiskLockError, FlushError, RunningVm, ShutdownRequest, VmHandle};
pub use machine::{SaveError, SnapshotInfo};
pub use metrics::{DiskMetrics, MetricsHandle, NicMetrics, VmMetrics};
