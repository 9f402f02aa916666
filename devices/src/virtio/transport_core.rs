//! What every virtio transport keeps for the driver (virtio 1.x §2.1-2.6, §3.1): feature
//! negotiation, the device status machine, the queues being set up, activation and reset. The
//! MMIO and PCI transports decode their registers onto a [`TransportCore`]; its fields are plain
//! data so a transport's state can be saved and restored.

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::persist::{QueueSnapshot, RestoreError, SaveError, VirtioDeviceState, check_features};
use super::{
    ActiveQueue, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, WorkerError,
};
use crate::cast::low_u32;

// Device status bits.
pub(crate) const STATUS_DRIVER: u32 = 2;
pub(crate) const STATUS_DRIVER_OK: u32 = 4;
pub(crate) const STATUS_FEATURES_OK: u32 = 8;
pub(crate) const STATUS_NEEDS_RESET: u32 = 64;
pub(crate) const STATUS_FAILED: u32 = 128;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue's eventfd cannot be created.
    #[error("Cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// A queue size the device gave is invalid.
    #[error("Invalid queue size {0}")]
    QueueSize(u16),
    /// The device has more queues than the transport can notify.
    #[error("{0} queues is more than the transport's {1}")]
    TooManyQueues(usize, usize),
    /// The device type has no PCI device ID (0x1040 + type must fit 16 bits).
    #[error("Device type {0} has no virtio PCI device ID")]
    DeviceType(u32),
    /// The interrupt line cannot be duplicated for the transport.
    #[error("Cannot set up the interrupt")]
    Interrupt(#[source] std::io::Error),
}

/// The driver-facing state of one virtio device, whatever its transport.
pub struct TransportCore {
    /// The device.
    pub device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    /// The queues as the driver sets them up.
    pub queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    /// Device status (without NEEDS_RESET, which the interrupt side records).
    pub status: u32,
    /// Which 32 feature bits the device feature register shows.
    pub device_features_select: u32,
    /// Which 32 feature bits the driver feature register takes.
    pub driver_features_select: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// The queue the queue registers show.
    pub queue_select: u32,
    /// Bumped on every write to the device configuration space.
    pub config_generation: u32,
}

impl std::fmt::Debug for TransportCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportCore")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl TransportCore {
    /// The driver-facing state of `device`, with a queue and a notification eventfd for each of
    /// its queues.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &size in device.queue_max_sizes() {
            queues.push(Queue::new(size).map_err(|_| TransportError::QueueSize(size))?);
            queue_events.push(EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            queues,
            queue_events,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
        })
    }

    /// The eventfd of each queue, in queue order (a VMM registers them as ioeventfds).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The 32 device feature bits `device_features_select` shows.
    pub fn device_features_page(&self) -> u32 {
        feature_page(self.device.features(), self.device_features_select)
    }

    /// The 32 driver feature bits `driver_features_select` shows.
    pub fn driver_features_page(&self) -> u32 {
        feature_page(self.driver_features, self.driver_features_select)
    }

    /// The driver writes 32 feature bits; only between DRIVER and FEATURES_OK.
    pub fn write_driver_features_page(&mut self, value: u32) {
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            return;
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.driver_features =
            (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
    }

    /// The queue the queue registers show, if it exists.
    pub fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change after feature negotiation and before DRIVER_OK.
    pub fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    /// A driver notification for queue `index`, when no ioeventfd took it (tests, a VMM that
    /// registered none, a BAR moved out of the windows).
    pub fn notify_queue(&self, index: u32) {
        if let Some(event) = self.queue_events.get(index as usize)
            && let Err(e) = event.write(1)
        {
            log::warn!("Cannot notify queue {index}: {e}");
        }
    }

    /// Reads the device configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        self.device.read_config(offset, data);
    }

    /// Writes the device configuration space (a new configuration generation).
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// The driver writes a non-zero device status (zero is a reset: [`TransportCore::reset`]);
    /// DRIVER_OK activates the device with `interrupt`.
    pub fn write_status(&mut self, value: u32, interrupt: &Arc<dyn VirtioInterrupt>) {
        // The driver sets bits one step at a time and never clears them (except by reset).
        if value & self.status != self.status {
            log::debug!(
                "virtio: status {value:#x} clears bits of {:#x}",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK unset tells the driver the features were refused; a DRIVER_OK
            // in the same write cannot stand either, as nothing was activated.
            self.status = value & !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
            return;
        }
        if added & STATUS_FEATURES_OK != 0 {
            self.device.ack_features(self.driver_features);
            let event_idx = 1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
            for q in &mut self.queues {
                q.set_event_idx(self.driver_features & event_idx != 0);
            }
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 {
            self.activate(interrupt);
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.status & STATUS_DRIVER != 0
            && self.driver_features & !offered == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) {
        if let Err(why) = self.try_activate(interrupt) {
            self.fail(&why, interrupt);
        }
    }

    /// Hands the device its queues; the error says what the driver got wrong.
    fn try_activate(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) -> Result<(), String> {
        if self.status & STATUS_FEATURES_OK == 0 {
            return Err("DRIVER_OK before FEATURES_OK".into());
        }
        let mut active = Vec::with_capacity(self.queues.len());
        for (index, (queue, event)) in self.queues.iter().zip(&self.queue_events).enumerate() {
            if !queue.ready() || !queue.is_valid(&self.mem) {
                return Err(format!("queue {index} is not ready or not in guest memory"));
            }
            let notify = event
                .try_clone()
                .map_err(|e| format!("cannot clone the queue {index} eventfd: {e}"))?;
            // The whole state, ring positions included: a restored device goes on where it
            // was; a new activation starts at 0.
            let copy = Queue::try_from(queue.state())
                .map_err(|_| format!("queue {index} has an invalid size"))?;
            active.push(ActiveQueue {
                queue: copy,
                notify,
            });
        }
        self.device
            .activate(self.mem.clone(), interrupt.clone(), active)
            .map_err(|e| e.to_string())
    }

    /// The device cannot run with what the driver set up: NEEDS_RESET, and tell the driver.
    fn fail(&self, why: &str, interrupt: &Arc<dyn VirtioInterrupt>) {
        crate::limited_log!(
            log::Level::Warn,
            "virtio device type {}: {why}",
            self.device.device_type()
        );
        interrupt.signal_needs_reset();
    }

    /// Resets the device and the driver-facing state (the transport resets its interrupt state).
    pub fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        for event in &self.queue_events {
            // Drop notifications the old worker never consumed.
            let _ = event.read();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }
}

/// The driver-facing registers a transport's saved state holds (each transport's state
/// structure keeps them in its own fields and format).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CoreRegisters<'a> {
    pub(crate) device_type: u32,
    pub(crate) status: u32,
    pub(crate) device_features_select: u32,
    pub(crate) driver_features_select: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_select: u32,
    pub(crate) config_generation: u32,
    pub(crate) queues: &'a [QueueSnapshot],
}

impl TransportCore {
    /// Pauses the device (see [`VirtioDevice::pause`]).
    pub fn pause(&mut self) -> Result<(), WorkerError> {
        self.device.pause()
    }

    /// Resumes the device.
    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// The device's own state and the queues (with the device's positions in its rings while
    /// it runs); the device must be paused.
    pub(crate) fn save(&self) -> Result<(VirtioDeviceState, Vec<QueueSnapshot>), SaveError> {
        let device = self
            .device
            .save_state()
            .ok_or(SaveError::Unsaved(self.device.device_type()))?;
        if !self.device.is_paused() {
            return Err(SaveError::NotPaused(device.kind()));
        }
        let queues: Vec<QueueState> = match self.device.active_queue_states() {
            Some(live) => live,
            None => self.queues.iter().map(Queue::state).collect(),
        };
        let queues = queues.into_iter().map(QueueSnapshot::from).collect();
        Ok((device, queues))
    }

    /// Puts a new core (over a device built from the same configuration) into the saved state,
    /// everything checked first: a snapshot is untrusted input. The device is paused first; if
    /// the driver had it running (and it did not need a reset) it is activated again with the
    /// saved rings and starts once resumed. The transport restores its own registers.
    pub(crate) fn restore(
        &mut self,
        saved: CoreRegisters<'_>,
        device: &VirtioDeviceState,
        needs_reset: bool,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> Result<(), RestoreError> {
        let configured = self.device.device_type();
        if saved.device_type != configured {
            return Err(RestoreError::DeviceType {
                saved: saved.device_type,
                configured,
            });
        }
        if saved.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: saved.queues.len(),
                device: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (index, (saved, own)) in saved.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != own.max_size() {
                return Err(RestoreError::Queue {
                    index,
                    source: virtio_queue::Error::InvalidSize,
                });
            }
            let queue = Queue::try_from(QueueState::from(*saved))
                .map_err(|source| RestoreError::Queue { index, source })?;
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(RestoreError::QueueMemory(index));
            }
            queues.push(queue);
        }
        check_features(saved.driver_features, self.device.features())?;
        self.device.restore_state(device)?;
        self.device.pause().map_err(RestoreError::Pause)?;
        self.queues = queues;
        self.status = saved.status;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.driver_features = saved.driver_features;
        self.queue_select = saved.queue_select;
        self.config_generation = saved.config_generation;
        let running = STATUS_DRIVER_OK | STATUS_FEATURES_OK;
        if self.status & (running | STATUS_FAILED) == running && !needs_reset {
            self.try_activate(interrupt)
                .map_err(RestoreError::Activate)?;
        }
        Ok(())
    }
}

fn feature_page(features: u64, select: u32) -> u32 {
    match select {
        0 => low_u32(features),
        1 => (features >> 32) as u32,
        _ => 0,
    }
}
