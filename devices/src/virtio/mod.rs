//! Virtio devices and their transports (virtio 1.x): virtio-mmio (MMIO version 2) and
//! virtio-pci (modern only), both over the driver-facing state in [`transport_core`].
//!
//! A device implements [`VirtioDevice`]: what it offers (type, queues, features, config
//! space) and [`VirtioDevice::activate`], which hands it the queues once the driver is ready.
//! The device then runs a worker thread of its own that owns the queues, is woken by the queue
//! eventfds (KVM ioeventfds in a VM) and signals the driver through a [`VirtioInterrupt`].

pub mod block;
mod guest_view;
#[cfg(test)]
mod guest_view_tests;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod persist;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod transport_core;
mod worker;

use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use persist::{RestoreError, VirtioDeviceState};

pub use worker::{
    DeviceHandler, DeviceWorker, PAUSE_EVENT, STOP_EVENT, WorkerError, WorkerHandle, WorkerThread,
    spawn_worker,
};

/// Guest memory as the whole VMM sees it (rvmm's one alias). Each region has a dirty bitmap:
/// every page written through vm-memory (used rings, `write_slice`, ...) is marked in it, and
/// the devices mark the pages they write through raw host addresses themselves (block reads,
/// status bytes, net rx buffers) when they take the request. Live migration reads it, with
/// the devices paused so that every marked write has landed, beside KVM's log of the vCPUs'
/// writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<Bitmap>;
/// The dirty-page bitmap of a guest memory region.
pub type Bitmap = vm_memory::bitmap::AtomicBitmap;

/// Device type: network card.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Device type: block device.
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Device type: entropy source.
pub const TYPE_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

/// The "modern" virtio 1.x feature every rvmm device offers and requires.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Why the device interrupts the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// Used buffers were added to the queue of this index.
    Queue(u16),
    /// The configuration space changed (or the device needs a reset).
    Config,
}

/// How a device worker signals the driver. Generic so tests can count interrupts.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises an interrupt of `kind`.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;

    /// The device hit an error it cannot recover from without a reset (for example queue
    /// memory outside guest RAM): sets DEVICE_NEEDS_RESET and tells the driver.
    fn signal_needs_reset(&self);
}

/// A queue handed to the device at activation, with the eventfd the driver kicks it through.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue, as the driver set it up.
    pub queue: Queue,
    /// Written (by KVM or the transport) when the driver notifies this queue.
    pub notify: EventFd,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs.
    #[error("Device needs {expected} queues, the driver set up {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// Setting up the worker failed.
    #[error("Cannot start the device worker")]
    Worker(#[source] std::io::Error),
    /// The device is already active.
    #[error("Device is already active")]
    AlreadyActive,
    /// The worker thread cannot run the device.
    #[error("Cannot run the device worker")]
    Run(#[source] WorkerError),
}

/// The `N` queues of a device being activated, refusing a second activation while its worker
/// still runs.
pub fn take_queues<const N: usize>(
    worker: &DeviceWorker,
    queues: Vec<ActiveQueue>,
) -> Result<[ActiveQueue; N], ActivateError> {
    if worker.is_active() {
        return Err(ActivateError::AlreadyActive);
    }
    let got = queues.len();
    queues
        .try_into()
        .map_err(|_| ActivateError::QueueCount { expected: N, got })
}

/// A virtio device, independent of the transport that exposes it.
///
/// The transport (virtio-mmio or virtio-pci) handles the driver's side: feature negotiation,
/// queue set-up, status, interrupts. The device says what it offers and, at
/// [`VirtioDevice::activate`], takes the queues. rvmm's devices hand them to a worker thread
/// of their own ([`DeviceWorker`] with a [`DeviceHandler`], woken by the queues' eventfds):
/// [`rng`] is the shortest complete example. Only the methods without a default are required;
/// a device without a worker is paused whenever the vCPUs are, and one that does not
/// implement [`VirtioDevice::save_state`] makes snapshots of its VM fail.
///
/// ```
/// use std::sync::Arc;
///
/// use rvmm_devices::virtio::{
///     ActivateError, ActiveQueue, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice,
///     VirtioInterrupt,
/// };
///
/// /// One queue the driver fills and nobody empties (a real device gives the queues to a
/// /// worker, which pops the driver's buffers, uses them and interrupts the driver).
/// #[derive(Default)]
/// struct Sink(Vec<ActiveQueue>);
///
/// impl VirtioDevice for Sink {
///     fn device_type(&self) -> u32 {
///         42
///     }
///     fn queue_max_sizes(&self) -> &[u16] {
///         &[64]
///     }
///     fn features(&self) -> u64 {
///         VIRTIO_F_VERSION_1
///     }
///     fn ack_features(&mut self, _features: u64) {}
///     fn read_config(&self, _offset: u64, data: &mut [u8]) {
///         data.fill(0);
///     }
///     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
///     fn activate(
///         &mut self,
///         _mem: GuestMemoryMmap,
///         _interrupt: Arc<dyn VirtioInterrupt>,
///         queues: Vec<ActiveQueue>,
///     ) -> Result<(), ActivateError> {
///         self.0 = queues;
///         Ok(())
///     }
///     fn reset(&mut self) {
///         self.0.clear();
///     }
/// }
///
/// let sink = Sink::default();
/// assert!(sink.save_state().is_none() && sink.is_paused());
/// ```
pub trait VirtioDevice: Send {
    /// Virtio device type (`TYPE_BLOCK`, ...).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features offered to the driver (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;

    /// The features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, features: u64);

    /// Reads the device-specific configuration space at `offset`. Out-of-range bytes read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space. Read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device: from now on its worker owns `queues`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;

    /// Stops the worker (if any) so the device can be activated again; called when the driver
    /// resets the device.
    fn reset(&mut self);

    /// Starts the device's worker thread now, on the calling thread's behalf, with its seccomp
    /// filter when `seccomp` is set. The VMM calls this while building the VM, so the thread
    /// does not inherit the filter of the vCPU that later activates the device (which does not
    /// allow starting threads). Devices without a worker have nothing to do; a device with one
    /// starts an unfiltered thread at activation when this was not called.
    fn start_worker_thread(&mut self, _seccomp: bool) -> Result<(), WorkerError> {
        Ok(())
    }

    /// The device's worker, for [`VirtioDevice::pause`] and the queue states; `None` for a
    /// device without one (it never touches guest memory on its own).
    fn worker(&self) -> Option<&DeviceWorker> {
        None
    }

    /// Mutable access to [`VirtioDevice::worker`].
    fn worker_mut(&mut self) -> Option<&mut DeviceWorker> {
        None
    }

    /// Pauses the device: its work in flight completes (block requests are answered), then
    /// it neither processes its queues nor touches its backend until resumed. A device paused
    /// before activation starts paused.
    fn pause(&mut self) -> Result<(), WorkerError> {
        match self.worker_mut() {
            Some(worker) => worker.pause(),
            None => Ok(()),
        }
    }

    /// Lets a paused device work again.
    fn resume(&mut self) {
        if let Some(worker) = self.worker_mut() {
            worker.resume();
        }
    }

    /// Whether the device is paused (a device without a worker always is).
    fn is_paused(&self) -> bool {
        self.worker().is_none_or(DeviceWorker::paused)
    }

    /// The queue states of the active, paused device as its worker left them; `None` when
    /// the device is not active (the transport's queues are then the whole truth).
    fn active_queue_states(&self) -> Option<Vec<QueueState>> {
        self.worker().and_then(DeviceWorker::queue_states)
    }

    /// The device-specific state a snapshot keeps; `None` (the default) for a device that
    /// cannot be saved, such as an embedder's, whose state has no place in the snapshot format:
    /// a snapshot of its VM fails.
    fn save_state(&self) -> Option<VirtioDeviceState> {
        None
    }

    /// Takes the device-specific state of a snapshot, before the transport re-activates the
    /// device. Fails when the snapshot does not fit the configured device, and (the default)
    /// for a device that cannot be saved.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        Err(RestoreError::DeviceKind {
            saved: state.kind(),
            configured: "unsaved",
        })
    }
}

/// Copies the part of a device's configuration space `config` that a guest read at `offset`
/// covers into `data`; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(start..) {
        let n = data.len().min(available.len());
        data[..n].copy_from_slice(&available[..n]);
    }
}

#[cfg(test)]
mod tests {
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use virtio_queue::QueueT;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    fn queue() -> ActiveQueue {
        ActiveQueue {
            queue: Queue::new(16).unwrap(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    struct Idle;

    impl MutEventSubscriber for Idle {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
        fn init(&mut self, _ops: &mut EventOps) {}
    }

    #[test]
    fn take_queues_wants_exactly_the_device_queue_count() {
        let idle = DeviceWorker::new("test-idle");
        let [_rx, _tx] = take_queues::<2>(&idle, vec![queue(), queue()]).unwrap();
        let err = take_queues::<2>(&idle, vec![queue()]).unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 1
            }
        ));
    }

    impl DeviceHandler for Idle {
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
    }

    #[test]
    fn take_queues_refuses_a_second_activation_while_the_worker_runs() {
        let mut worker = DeviceWorker::new("test-idle");
        worker.activate(Idle).unwrap();
        let err = take_queues::<1>(&worker, vec![queue()]).unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActive));
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let mut data = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut data);
        assert_eq!(data, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
