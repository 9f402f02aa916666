//! A running VM: pause, resume, stop, and waiting for the end.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::VmFd;

use crate::builder::{Keyboard, Serial};
use crate::control::{RunState, StopReason, VmControl};
use crate::memory::{GuestMemoryMmap, MemoryLayout};

/// A VM whose vCPUs are running (or paused).
#[derive(Debug)]
pub struct RunningVm {
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) keyboard: Arc<Mutex<Keyboard>>,
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

    /// Presses Ctrl-Alt-Del on the guest's keyboard: a Linux guest reboots in an orderly way,
    /// which ends a microVM (`reboot=k`).
    pub fn send_ctrl_alt_del(&self) {
        self.handle().send_ctrl_alt_del();
    }

    /// A handle other threads use to control the VM (signal handlers, an API server).
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            control: self.control.clone(),
            keyboard: self.keyboard.clone(),
        }
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

/// Controls a running VM from any thread.
#[derive(Clone, Debug)]
pub struct VmHandle {
    control: Arc<VmControl>,
    keyboard: Arc<Mutex<Keyboard>>,
}

impl VmHandle {
    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) {
        self.keyboard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trigger_ctrl_alt_del();
    }

    /// Stops the VM now.
    pub fn stop(&self) {
        self.control.request_stop(StopReason::Requested);
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.control.state()
    }
}
