//! The parts of a running VM that pausing and snapshots reach: the vCPUs' descriptors, the
//! devices, the VM-wide KVM state and guest memory.
//!
//! The [`RunningVm`](crate::RunningVm) owns the one strong reference; handles hold a `Weak`,
//! so that the devices (whose workers flush the disks when dropped) still go down where the
//! VM ends, not when the last handle is dropped.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::{Cap, Kvm, VmFd};
use rvmm_devices::virtio::mmio::MmioTransport;
use rvmm_devices::virtio::pci::VirtioPciTransport;
use rvmm_devices::virtio::persist::{self as device_persist, VirtioDeviceSnapshot};
use rvmm_devices::{Pausable, PauseError};

use crate::builder::{Keyboard, Power, Serial};
use crate::memory::{GuestMemoryMmap, MemoryLayout};
use crate::snapshot::{
    self, MemoryFileError, StateFileError, VcpuStateError, VmState, VmStateError, memory_regions,
    save_vcpu, save_vm_kvm_state,
};
use crate::vcpu::{SharedVcpuFd, lock_vcpu};

/// The size of the XSAVE area a snapshot holds (`struct kvm_xsave`).
const XSAVE_BYTES: i32 = 4096;

/// Errors saving a VM's state.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The VM is not paused.
    #[error("The VM must be paused")]
    NotPaused,
    /// The VM has stopped.
    #[error("The VM has stopped")]
    Gone,
    /// The VM has a device of the embedder's, whose state a snapshot cannot hold.
    #[error("Device {0} is the embedder's: a snapshot cannot hold its state")]
    CustomDevice(String),
    /// KVM's MSR list cannot be read.
    #[error("Cannot read KVM's list of MSRs")]
    MsrList(#[source] kvm_ioctls::Error),
    /// The host's XSAVE area does not fit the format.
    #[error("This host's XSAVE area is {0} bytes (KVM_CAP_XSAVE2); snapshots hold 4096")]
    Xsave(i32),
    /// A vCPU's state.
    #[error("Cannot save the vCPU state")]
    Vcpu(#[from] VcpuStateError),
    /// The clock, irqchip or PIT.
    #[error("Cannot save the VM state")]
    Vm(#[from] VmStateError),
    /// A device's state.
    #[error("Cannot save the state of virtio device {index}")]
    Device {
        /// Its slot.
        index: usize,
        /// Cause.
        #[source]
        source: rvmm_devices::virtio::persist::SaveError,
    },
    /// Writing the state file.
    #[error("Cannot write the snapshot state")]
    StateFile(#[from] StateFileError),
    /// Writing the memory file.
    #[error("Cannot write the snapshot memory")]
    MemoryFile(#[from] MemoryFileError),
    /// The snapshot directory cannot be created.
    #[error("Cannot create the snapshot directory {}", path.display())]
    Directory {
        /// The directory.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A vCPU as the machine keeps it.
#[derive(Debug)]
pub(crate) struct VcpuSlot {
    pub(crate) fd: SharedVcpuFd,
    pub(crate) cpuid: Vec<kvm_cpuid_entry2>,
}

/// What [`VmHandle::snapshot`](crate::VmHandle::snapshot) wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Bytes of guest memory data written (zero pages are holes).
    pub memory_bytes: u64,
    /// Guest memory size (the memory file's apparent size).
    pub memory_size: u64,
}

/// A virtio device's transport, as pausing and snapshots reach it.
#[derive(Clone, Debug)]
pub(crate) enum VirtioTransport {
    /// On virtio-mmio.
    Mmio(Arc<Mutex<MmioTransport>>),
    /// A virtio-pci function.
    Pci(Arc<Mutex<VirtioPciTransport>>),
}

impl VirtioTransport {
    fn pause(&self) -> Result<(), PauseError> {
        match self {
            Self::Mmio(t) => Pausable::pause(&mut *lock(t)),
            Self::Pci(t) => Pausable::pause(&mut *lock(t)),
        }
    }

    fn resume(&self) {
        match self {
            Self::Mmio(t) => lock(t).resume(),
            Self::Pci(t) => lock(t).resume(),
        }
    }

    fn save_state(&self) -> Result<VirtioDeviceSnapshot, device_persist::SaveError> {
        match self {
            Self::Mmio(t) => lock(t).save_state(),
            Self::Pci(t) => lock(t).save_state(),
        }
    }

    /// Puts the device and its transport into a snapshot's state.
    pub(crate) fn restore_state(
        &self,
        saved: &VirtioDeviceSnapshot,
    ) -> Result<(), device_persist::RestoreError> {
        match self {
            Self::Mmio(t) => lock(t).restore_state(saved),
            Self::Pci(t) => lock(t).restore_state(saved),
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Machine {
    // Dropped first: the devices stop (disks flushed) before the VM fd and the memory go.
    pub(crate) transports: Vec<VirtioTransport>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) keyboard: Arc<Mutex<Keyboard>>,
    /// The ACPI PM registers (none without ACPI).
    pub(crate) power: Option<Arc<Mutex<Power>>>,
    pub(crate) vcpus: Vec<VcpuSlot>,
    pub(crate) kvm: Kvm,
    // The VM fd before the memory it maps.
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) layout: MemoryLayout,
    /// The embedder's devices, by name: their state has no place in a snapshot.
    pub(crate) custom: Vec<String>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Machine {
    /// Pauses every device, after the vCPUs: the virtio devices complete their work in
    /// flight. On a failure the devices paused so far are resumed.
    pub(crate) fn pause_devices(&self) -> Result<(), PauseError> {
        let mut paused: Vec<&VirtioTransport> = Vec::new();
        for transport in &self.transports {
            if let Err(e) = transport.pause() {
                for t in paused {
                    t.resume();
                }
                return Err(e);
            }
            paused.push(transport);
        }
        // The legacy devices cannot fail to pause.
        let _ = lock(&self.serial).pause();
        let _ = lock(&self.keyboard).pause();
        Ok(())
    }

    /// Resumes every device, before the vCPUs.
    pub(crate) fn resume_devices(&self) {
        lock(&self.keyboard).resume();
        lock(&self.serial).resume();
        for transport in &self.transports {
            transport.resume();
        }
    }

    /// The MSRs a snapshot saves: those in KVM's list that this host lets us read.
    fn msr_indices(&self) -> Result<Vec<u32>, SaveError> {
        let list = self.kvm.get_msr_index_list().map_err(SaveError::MsrList)?;
        let Some(vcpu) = self.vcpus.first() else {
            return Ok(Vec::new());
        };
        let fd = lock_vcpu(&vcpu.fd);
        Ok(list
            .as_slice()
            .iter()
            .copied()
            .filter(|&index| {
                let entry = kvm_bindings::kvm_msr_entry {
                    index,
                    ..Default::default()
                };
                kvm_bindings::Msrs::from_entries(&[entry])
                    .ok()
                    .and_then(|mut one| fd.get_msrs(&mut one).ok())
                    == Some(1)
            })
            .collect())
    }

    /// The whole VM's state; the vCPUs and devices must be paused.
    pub(crate) fn save_state(&self) -> Result<VmState, SaveError> {
        if let Some(name) = self.custom.first() {
            return Err(SaveError::CustomDevice(name.clone()));
        }
        let xsave = self.kvm.check_extension_int(Cap::Xsave2);
        if xsave > XSAVE_BYTES {
            return Err(SaveError::Xsave(xsave));
        }
        let msr_indices = self.msr_indices()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let fd = lock_vcpu(&vcpu.fd);
            vcpus.push(save_vcpu(&fd, index, &vcpu.cpuid, &msr_indices)?);
        }
        let mut virtio = Vec::with_capacity(self.transports.len());
        for (index, transport) in self.transports.iter().enumerate() {
            let state = transport
                .save_state()
                .map_err(|source| SaveError::Device { index, source })?;
            virtio.push(state);
        }
        Ok(VmState {
            memory: memory_regions(&self.mem),
            vcpus,
            kvm: save_vm_kvm_state(&self.vm_fd)?,
            serial: lock(&self.serial).snapshot(),
            i8042: lock(&self.keyboard).snapshot(),
            virtio,
            acpi_pm: self.power.as_ref().map(|power| lock(power).snapshot()),
        })
    }

    /// Writes the state and memory files into `dir` (created if needed).
    pub(crate) fn snapshot_to(&self, dir: &Path) -> Result<SnapshotInfo, SaveError> {
        std::fs::create_dir_all(dir).map_err(|source| SaveError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let state = self.save_state()?;
        let state_bytes = snapshot::write_state(&dir.join(snapshot::STATE_FILE), &state)?;
        let memory_bytes =
            snapshot::write_memory_file(&self.mem, &dir.join(snapshot::MEMORY_FILE))?;
        Ok(SnapshotInfo {
            state_bytes,
            memory_bytes,
            memory_size: self.layout.size(),
        })
    }
}
