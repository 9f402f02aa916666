//! A running VM: pause, resume, stop, and waiting for the end.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::VmFd;

use crate::builder::Serial;
use crate::control::{RunState, StopReason, VmControl};
use crate::memory::{GuestMemoryMmap, MemoryLayout};

/// A VM whose vCPUs are running (or paused).
#[derive(Debug)]
pub struct RunningVm {
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    // Kept alive while the vCPUs run; the VM fd is closed before the memory is unmapped.
    pub(crate) _vm_fd: VmFd,
    pub(crate) _mem: GuestMemoryMmap,
    pub(crate) layout: MemoryLayout,
}

impl RunningVm {
    /// The guest's serial console.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// Shared run control (pause, resume, stop from other threads).
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.control.state()
    }

    /// Guest RAM size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.layout.size()
    }

    /// Takes every vCPU out of the guest; false when the VM was not running.
    pub fn pause(&self) -> bool {
        self.control.pause()
    }

    /// Lets the vCPUs run again; false when the VM was not paused.
    pub fn resume(&self) -> bool {
        self.control.resume()
    }

    /// Stops the VM.
    pub fn stop(&self) {
        self.control.request_stop(StopReason::Requested);
    }

    /// Waits for the VM to stop, joins the vCPU threads and says why it stopped.
    pub fn wait(self) -> StopReason {
        let reason = self.control.wait_stopped();
        for thread in self.threads {
            if thread.join().is_err() {
                log::error!("A vCPU thread panicked");
            }
        }
        reason
    }
}
