//! The KVM VM: opening /dev/kvm, the in-kernel irqchip and PIT, KVM's private pages and the
//! guest memory slots.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VmFd};
use rvmm_devices::cast::usize_from;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::memory::GuestMemoryMmap;

/// The KVM device.
pub const KVM_PATH: &str = "/dev/kvm";

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("Cannot open {}", path.display())]
    OpenKvm {
        /// The device path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The device opened but does not answer KVM's API version query.
    #[error("{} is not a KVM device", path.display())]
    NotKvm {
        /// The device path.
        path: PathBuf,
        /// Cause (ENOTTY for a file or another device).
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM speaks another API version than the stable one (12).
    #[error("{} speaks KVM API version {version}, rvmm needs {KVM_API_VERSION}", path.display())]
    ApiVersion {
        /// The device path.
        path: PathBuf,
        /// What it answered.
        version: i32,
    },
    /// KVM lacks a capability rvmm needs.
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// A VM-level ioctl failed.
    #[error("Cannot {0}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

/// The stable KVM API version (`KVM_API_VERSION` in the kernel's headers).
const KVM_API_VERSION: i32 = 12;

/// Opens the KVM device at `path` and checks that it is one (KVM_GET_API_VERSION).
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let open_err = |source| VmError::OpenKvm {
        path: path.to_owned(),
        source,
    };
    let cpath = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(open_err)?;
    // KVM_GET_API_VERSION: any other file or device answers ENOTTY.
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(VmError::NotKvm {
            path: path.to_owned(),
            source: kvm_ioctls::Error::last(),
        });
    }
    if version != KVM_API_VERSION {
        return Err(VmError::ApiVersion {
            path: path.to_owned(),
            version,
        });
    }
    Ok(kvm)
}

/// Checks the capabilities rvmm relies on.
pub fn check_capabilities(kvm: &Kvm) -> Result<(), VmError> {
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    Ok(())
}

/// Creates the VM with an in-kernel irqchip (PIC, IOAPIC, local APICs) and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Ioctl("create the VM", e))?;
    vm.set_tss_address(usize_from(KVM_TSS_START))
        .map_err(|e| VmError::Ioctl("set the TSS address", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(|e| VmError::Ioctl("set the identity map address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Ioctl("create the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Ioctl("create the PIT", e))?;
    Ok(vm)
}

/// Registers every guest RAM region as a KVM memory slot.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    register_memory_with_flags(vm, mem, 0)
}

/// Registers (or re-registers, changing only `flags`) every guest RAM region as a KVM memory
/// slot; slot N is the Nth region.
pub fn register_memory_with_flags(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    flags: u32,
) -> Result<(), VmError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| {
                VmError::Ioctl(
                    "find a guest memory mapping",
                    kvm_ioctls::Error::new(libc::EFAULT),
                )
            })?;
        let slot_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes, owned by the Vm
        // together with this VM fd and unmapped only after the fd is closed.
        unsafe { vm.set_user_memory_region(slot_region) }
            .map_err(|e| VmError::Ioctl("register guest memory", e))?;
    }
    Ok(())
}
