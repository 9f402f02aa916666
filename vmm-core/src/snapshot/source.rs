//! What a live migration's sender needs of a running VM: dirty-page logging, its memory,
//! pausing, and its state once paused.

use std::sync::Arc;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use rvmm_devices::cast::usize_from;

use super::VmState;
use super::dirty::{DirtyLogError, DirtyPages, PAGE_SIZE, clear_vmm_dirty, take_vmm_dirty};
use crate::machine::{Machine, SaveError};
use crate::memory::GuestMemoryMmap;
use crate::vm::{VmError, register_memory_with_flags};
use crate::{RunState, VmHandle};

/// A running VM being migrated away. Holds the VM's parts alive until dropped (then dirty
/// logging is switched off again).
#[derive(Debug)]
pub struct MigrationSource {
    machine: Arc<Machine>,
    handle: VmHandle,
    logging: bool,
}

fn vm_ioctl(e: VmError) -> kvm_ioctls::Error {
    match e {
        VmError::Ioctl(_, source)
        | VmError::OpenKvm { source, .. }
        | VmError::NotKvm { source, .. } => source,
        VmError::MissingCapability(_) | VmError::ApiVersion { .. } => {
            kvm_ioctls::Error::new(libc::ENOTSUP)
        }
    }
}

impl MigrationSource {
    /// The VM behind `handle`, if it still exists.
    pub fn new(handle: &VmHandle) -> Result<Self, DirtyLogError> {
        let machine = handle.machine.upgrade().ok_or(DirtyLogError::Gone)?;
        Ok(Self {
            machine,
            handle: handle.clone(),
            logging: false,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.machine.mem
    }

    /// Starts logging: from now on every page the vCPUs or the VMM write is reported by
    /// [`MigrationSource::dirty_pages`]. Fails with [`DirtyLogError::Unsupported`] where KVM
    /// cannot log.
    pub fn start_dirty_log(&mut self) -> Result<(), DirtyLogError> {
        register_memory_with_flags(
            &self.machine.vm_fd,
            &self.machine.mem,
            KVM_MEM_LOG_DIRTY_PAGES,
        )
        .map_err(|e| DirtyLogError::Unsupported(vm_ioctl(e)))?;
        self.logging = true;
        // What was logged before (the VMM's writes since boot) is covered by the first,
        // complete copy; KVM's log starts empty.
        clear_vmm_dirty(&self.machine.mem);
        Ok(())
    }

    /// Stops logging.
    pub fn stop_dirty_log(&mut self) -> Result<(), DirtyLogError> {
        if !self.logging {
            return Ok(());
        }
        self.logging = false;
        register_memory_with_flags(&self.machine.vm_fd, &self.machine.mem, 0)
            .map_err(|e| DirtyLogError::Switch("stop", vm_ioctl(e)))
    }

    /// The pages written since logging started or since the last call, which clears them.
    /// While the VM runs the devices are paused for the moment it takes to read their
    /// bitmap, so that every write they marked has landed.
    pub fn dirty_pages(&self) -> Result<DirtyPages, DirtyLogError> {
        let running = self.handle.state() == RunState::Running;
        if running {
            self.machine.pause_devices().map_err(DirtyLogError::Pause)?;
        }
        let mut pages = take_vmm_dirty(&self.machine.mem);
        if running {
            self.machine.resume_devices();
        }
        for (slot, region) in (0u32..).zip(pages.regions.iter_mut()) {
            let kvm = self
                .machine
                .vm_fd
                .get_dirty_log(slot, usize_from(region.len))
                .map_err(|e| DirtyLogError::Read(slot, e))?;
            for (mine, theirs) in region.bits.iter_mut().zip(kvm) {
                *mine |= theirs;
            }
        }
        Ok(pages)
    }

    /// Pauses the whole VM (see [`VmHandle::pause`]).
    pub fn pause(&self) -> bool {
        self.handle.pause()
    }

    /// Resumes it.
    pub fn resume(&self) -> bool {
        self.handle.resume()
    }

    /// The paused VM's state.
    pub fn save_state(&self) -> Result<VmState, SaveError> {
        if self.handle.state() != RunState::Paused {
            return Err(SaveError::NotPaused);
        }
        self.machine.save_state()
    }

    /// Bytes per page of the dirty logs.
    pub fn page_size(&self) -> u64 {
        PAGE_SIZE
    }
}

impl Drop for MigrationSource {
    fn drop(&mut self) {
        if let Err(e) = self.stop_dirty_log() {
            log::warn!("{e}");
        }
    }
}
