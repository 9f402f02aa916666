//! A running VM: pause, resume, stop, and waiting for the end.
//!
//! [`Vm::start`](crate::Vm::start) returns the [`RunningVm`], the VM's owner: it dereferences
//! to a [`VmHandle`], whose clones (from [`RunningVm::handle`]) control the VM from any thread:
//! [`pause`](VmHandle::pause), [`resume`](VmHandle::resume), [`stop`](VmHandle::stop),
//! [`request_shutdown`](VmHandle::request_shutdown) (ACPI power button or Ctrl-Alt-Del),
//! [`snapshot`](VmHandle::snapshot), [`metrics`](VmHandle::metrics), [`state`](VmHandle::state),
//! [`flush_disks`](VmHandle::flush_disks). The owner alone can [`wait`](RunningVm::wait) for
//! the end, which tells why the VM stopped.
//!
//! Teardown: the VM ends on the thread that calls [`RunningVm::wait`] or drops the
//! [`RunningVm`]. After the vCPU threads are joined the devices are dropped there, which stops
//! their workers: each virtio-blk worker completes its I/O in flight and flushes its disk if it
//! was written since the guest's last FLUSH (failures are logged with the disk's path). So when
//! `wait` returns, or the drop ends, every disk is flushed. [`VmHandle::flush_disks`] flushes
//! them again from any thread and returns the errors, for a launcher that wants them.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use rvmm_devices::legacy::PowerButton;
use rvmm_devices::virtio::block::{BlockError, DiskSync};

use crate::builder::{Keyboard, Power, Serial};
use crate::bus::Bus;
use crate::control::{RunState, StopReason, VmControl};
use crate::events::VmEvent;
use crate::machine::{Machine, SaveError, SnapshotInfo};
use crate::metrics::{MetricsHandle, VmMetrics};

/// Errors flushing the disks.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Some disks could not be flushed: the first failure is the cause, the others are logged.
    #[error("Cannot flush {failed} of {total} disks")]
    Disks {
        /// Disks that failed.
        failed: usize,
        /// Writable disks.
        total: usize,
        /// The first failure (names the disk).
        #[source]
        first: BlockError,
    },
}

/// Errors taking back the disks' image locks.
#[derive(Debug, thiserror::Error)]
pub enum DiskLockError {
    /// Another VMM has a disk for writing meanwhile (a migration's destination that runs the
    /// VM): this VM must not run.
    #[error("Cannot take the disks back")]
    Taken {
        /// The disk.
        path: std::path::PathBuf,
        /// Why (names who is in the way when it can).
        #[source]
        source: BlockError,
    },
}

/// A VM whose vCPUs are running (or paused). Dropping it stops the VM hard (like
/// [`VmHandle::stop`]) and tears it down like [`RunningVm::wait`].
///
/// It dereferences to its own [`VmHandle`], so the controls other threads use (pause, resume,
/// stop, state, metrics, flushing the disks) are called on it directly.
#[derive(Debug)]
pub struct RunningVm {
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    // The buses own the devices. The vCPU threads hold them too; once they are joined these
    // are the last references, so the devices (and their workers, which flush the disks) are
    // dropped on the thread ending the VM, before the VM fd and the memory.
    pub(crate) _pio: Arc<Bus>,
    pub(crate) _mmio: Arc<Bus>,
    pub(crate) handle: VmHandle,
    // The one strong reference: the devices, the VM fd and the memory (in that order) go
    // with it, after the buses.
    pub(crate) machine: Arc<Machine>,
}

impl RunningVm {
    /// The guest's serial console.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// Shared run control (pause, resume, stop from other threads).
    pub fn control(&self) -> Arc<VmControl> {
        self.handle.control.clone()
    }

    /// Guest RAM size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.machine.layout.size()
    }

    /// A handle other threads use to control the VM (signal handlers, an API server).
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Waits for the VM to stop, joins the vCPU threads, stops the devices (every disk
    /// written since the guest's last FLUSH is flushed) and says why it stopped.
    pub fn wait(mut self) -> StopReason {
        let reason = self.handle.control.wait_stopped();
        self.join_vcpus();
        // Dropping `self` now drops the devices (see the module documentation).
        reason
    }

    fn join_vcpus(&mut self) {
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("A vCPU thread panicked");
            }
        }
    }
}

impl std::ops::Deref for RunningVm {
    type Target = VmHandle;

    fn deref(&self) -> &VmHandle {
        &self.handle
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            // Dropped without `wait`: stop the vCPUs so the devices go down here, not on a
            // vCPU thread later (or never, at process exit).
            self.handle.stop();
            self.handle.control.wait_stopped();
            self.join_vcpus();
        }
        // The fields drop next, the buses (devices) first.
    }
}

/// Flushes every disk, going on after a failure.
fn flush_all(disks: &[DiskSync]) -> Result<(), FlushError> {
    let mut first = None;
    let mut failed = 0;
    for disk in disks {
        if let Err(e) = disk.sync() {
            failed += 1;
            match first {
                None => first = Some(e),
                Some(_) => {
                    let cause = std::error::Error::source(&e).map(ToString::to_string);
                    log::error!("{e}: {}", cause.unwrap_or_default());
                }
            }
        }
    }
    match first {
        None => Ok(()),
        Some(first) => Err(FlushError::Disks {
            failed,
            total: disks.len(),
            first,
        }),
    }
}

/// How a request for an orderly shutdown reached the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownRequest {
    /// The ACPI power button: the guest's OSPM handles it (and powers off).
    AcpiPowerButton,
    /// Ctrl-Alt-Del on the i8042, for a guest without ACPI (Linux reboots, which ends the VM).
    CtrlAltDel,
}

impl ShutdownRequest {
    /// How the request is named in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::AcpiPowerButton => "ACPI power button",
            Self::CtrlAltDel => "Ctrl-Alt-Del",
        }
    }
}

/// Controls a running VM from any thread.
#[derive(Clone, Debug)]
pub struct VmHandle {
    pub(crate) control: Arc<VmControl>,
    pub(crate) keyboard: Arc<Mutex<Keyboard>>,
    /// The ACPI power-management registers (none with `acpi` off).
    pub(crate) power: Option<Arc<Mutex<Power>>>,
    pub(crate) metrics: MetricsHandle,
    pub(crate) disk_syncs: Arc<[DiskSync]>,
    pub(crate) machine: Weak<Machine>,
}

impl VmHandle {
    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) {
        self.keyboard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trigger_ctrl_alt_del();
    }

    /// Asks the guest to shut down: the ACPI power button when the guest's OSPM has enabled it,
    /// Ctrl-Alt-Del otherwise.
    pub fn request_shutdown(&self) -> ShutdownRequest {
        if let Some(power) = &self.power {
            let pressed = power
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .press_power_button();
            if pressed == PowerButton::Delivered {
                return ShutdownRequest::AcpiPowerButton;
            }
        }
        self.send_ctrl_alt_del();
        ShutdownRequest::CtrlAltDel
    }

    /// Stops the VM now.
    pub fn stop(&self) {
        self.control.request_stop(StopReason::Requested);
    }

    /// Pauses the VM: every vCPU out of the guest, then every device (virtio devices finish
    /// their requests in flight); from then on nothing writes guest memory or the disks.
    /// False when the VM was not running. A device that cannot be paused (its worker has
    /// ended) is logged and the VM stays paused: such a device does no more work anyway, and
    /// a snapshot then refuses it by name.
    pub fn pause(&self) -> bool {
        if !self.control.pause() {
            return false;
        }
        if let Some(machine) = self.machine.upgrade()
            && let Err(e) = machine.pause_devices()
        {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            log::error!("{e}: {}", cause.unwrap_or_default());
        }
        true
    }

    /// Lets the devices, then the vCPUs, run again; false when the VM was not paused, or
    /// when its disks were handed over ([`VmHandle::release_disk_locks`]) and another VMM
    /// holds one now (logged with the disk).
    pub fn resume(&self) -> bool {
        if self.control.state() != RunState::Paused {
            return false;
        }
        if let Err(e) = self.reacquire_disk_locks() {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            log::error!("The VM stays paused: {e}: {}", cause.unwrap_or_default());
            return false;
        }
        if let Some(machine) = self.machine.upgrade() {
            machine.resume_devices();
        }
        self.control.resume()
    }

    /// The VM's events from now on, in the order they happen: [`VmEvent::Paused`] (once the
    /// vCPUs are out of the guest) and [`VmEvent::Resumed`], whoever paused or resumed it,
    /// then its end, [`VmEvent::Shutdown`] or [`VmEvent::Crashed`], once every vCPU has left
    /// (the event [`RunningVm::wait`]'s reason gives with [`StopReason::event`]), after which
    /// the channel closes. Subscribing after the end gives the end alone.
    pub fn events(&self) -> std::sync::mpsc::Receiver<VmEvent> {
        self.control.subscribe()
    }

    /// Writes a snapshot of the paused VM into `dir`: `state.bin` and the sparse
    /// `memory.bin` (see [`crate::snapshot`]). The VM stays paused.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, SaveError> {
        if self.control.state() != RunState::Paused {
            return Err(SaveError::NotPaused);
        }
        let machine = self.machine.upgrade().ok_or(SaveError::Gone)?;
        machine.snapshot_to(dir)
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.control.state()
    }

    /// The VM's statistics now.
    pub fn metrics(&self) -> VmMetrics {
        self.metrics.snapshot()
    }

    /// Reads the VM's statistics from any thread, also after the VM is gone (without the rest
    /// of the handle).
    pub fn metrics_handle(&self) -> MetricsHandle {
        self.metrics.clone()
    }

    /// Makes the writes completed so far on every writable disk durable (`fdatasync`), from
    /// the calling thread. Works after the VM is gone too: called once [`RunningVm::wait`] has
    /// returned it confirms the teardown's flush and reports failures.
    pub fn flush_disks(&self) -> Result<(), FlushError> {
        flush_all(&self.disk_syncs)
    }

    /// Hands the writable disks over to another VMM, as QEMU inactivates its images at the
    /// end of a migration: drops their image locks, so a live migration's destination can
    /// open them when it builds the VM. Call with the VM paused and its disks flushed; before
    /// it runs here again, the locks must be taken back ([`VmHandle::resume`] does).
    pub fn release_disk_locks(&self) {
        for disk in self.disk_syncs.iter() {
            disk.release_lock();
        }
    }

    /// Takes the writable disks' image locks back after [`VmHandle::release_disk_locks`] (a
    /// migration that failed). Fails, naming the disk, when another VMM holds one: then the
    /// destination may be running the VM, and this one must stay paused.
    pub fn reacquire_disk_locks(&self) -> Result<(), DiskLockError> {
        for disk in self.disk_syncs.iter() {
            disk.reacquire_lock()
                .map_err(|source| DiskLockError::Taken {
                    path: disk.path().to_owned(),
                    source,
                })?;
        }
        Ok(())
    }
}
