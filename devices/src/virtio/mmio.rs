//! The virtio-mmio transport, version 2 (virtio 1.x §4.2): feature negotiation, the device
//! status machine, queue setup, interrupt status/acknowledge, config space and reset.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::persist::{QueueSnapshot, RestoreError, SaveError, VirtioDeviceSnapshot};
use super::{
    ActiveQueue, GuestMemoryMmap, InterruptKind, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt,
    WorkerError,
};
use crate::BusDevice;

/// Each device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (where a VMM puts the queue ioeventfds).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d4d_5652; // "RVMM"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

// Device status bits.
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;
const STATUS_FAILED: u32 = 128;

// InterruptStatus bits.
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// The transport's side of the interrupt: the status register the driver reads and acks, and
/// the line (an irqfd) raised after updating it.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: EventFd,
}

impl MmioInterrupt {
    /// An interrupt that raises `line`.
    pub fn new(line: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
        }
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue => INT_VRING,
            InterruptKind::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.write(1)
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.trigger(InterruptKind::Config) {
            log::warn!("Cannot raise the needs-reset interrupt: {e}");
        }
    }
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue's eventfd cannot be created.
    #[error("Cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// A queue size the device gave is invalid.
    #[error("Invalid queue size {0}")]
    QueueSize(u16),
}

impl MmioTransport {
    /// Wraps `device`; its interrupts raise `interrupt_line`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt_line: EventFd,
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
            interrupt: Arc::new(MmioInterrupt::new(interrupt_line)),
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

    /// The eventfd of each queue, in queue order (a VMM registers them as ioeventfds on
    /// `QUEUE_NOTIFY_OFFSET` with the queue index as data).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            STATUS_NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change after feature negotiation and before DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = self.device.features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::SeqCst),
            0x70 => self.status(),
            // No shared memory regions: length and base read as all ones.
            0xb0 | 0xb4 | 0xb8 | 0xbc => u32::MAX,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.device_features_select = value,
            0x20 => self.write_driver_features(value),
            0x24 => self.driver_features_select = value,
            0x30 => self.queue_select = value,
            0x38 if self.queue_setup_allowed() => {
                if let Some(q) = self.selected_queue() {
                    // Sizes above the maximum are clamped to it by virtio-queue.
                    q.set_size(value as u16);
                }
            }
            0x44 if self.queue_setup_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            QUEUE_NOTIFY_OFFSET => self.notify_queue(value),
            0x64 => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            0x70 => self.write_status(value),
            0x80..=0xa4 if self.queue_setup_allowed() => self.write_queue_address(offset, value),
            _ => log::debug!("virtio-mmio: write {value:#x} to {offset:#x} ignored"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
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

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        match offset {
            0x80 => q.set_desc_table_address(Some(value), None),
            0x84 => q.set_desc_table_address(None, Some(value)),
            0x90 => q.set_avail_ring_address(Some(value), None),
            0x94 => q.set_avail_ring_address(None, Some(value)),
            0xa0 => q.set_used_ring_address(Some(value), None),
            0xa4 => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// Without an ioeventfd (tests, or a VMM that did not register one) the write lands here.
    fn notify_queue(&self, index: u32) {
        if let Some(event) = self.queue_events.get(index as usize)
            && let Err(e) = event.write(1)
        {
            log::warn!("Cannot notify queue {index}: {e}");
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver sets bits one step at a time and never clears them (except by reset).
        if value & self.status != self.status {
            log::debug!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}",
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
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.status & STATUS_DRIVER != 0
            && self.driver_features & !offered == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        if let Err(why) = self.try_activate() {
            self.fail(&why);
        }
    }

    /// Hands the device its queues; the error says what the driver got wrong.
    fn try_activate(&mut self) -> Result<(), String> {
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
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.device
            .activate(self.mem.clone(), interrupt, active)
            .map_err(|e| e.to_string())
    }

    /// The device cannot run with what the driver set up: NEEDS_RESET, and tell the driver.
    fn fail(&mut self, why: &str) {
        crate::limited_log!(
            log::Level::Warn,
            "virtio-mmio device type {}: {why}",
            self.device.device_type()
        );
        self.interrupt.signal_needs_reset();
    }

    fn reset(&mut self) {
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
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// virtio-mmio transport state, format version 1: the registers the driver programmed and
/// each queue (with the device's positions in its rings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device type behind the transport.
    pub device_type: u32,
    /// Device status (without NEEDS_RESET, kept apart).
    pub status: u32,
    /// DEVICE_NEEDS_RESET was signalled.
    pub needs_reset: bool,
    /// InterruptStatus not yet acknowledged.
    pub interrupt_status: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// DriverFeatures as written.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The queues, in order.
    pub queues: Vec<QueueSnapshot>,
}

impl MmioTransport {
    /// Pauses the device (see [`VirtioDevice::pause`]).
    pub fn pause(&mut self) -> Result<(), WorkerError> {
        self.device.pause()
    }

    /// Resumes the device.
    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// The transport's and the device's state; the device must be paused.
    pub fn save_state(&self) -> Result<VirtioDeviceSnapshot, SaveError> {
        let device = self.device.save_state();
        if !self.device.is_paused() {
            return Err(SaveError::NotPaused(device.kind()));
        }
        let queues: Vec<QueueState> = match self.device.active_queue_states() {
            Some(live) => live,
            None => self.queues.iter().map(Queue::state).collect(),
        };
        let transport = MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            needs_reset: self.interrupt.needs_reset.load(Ordering::SeqCst),
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            queues: queues.into_iter().map(QueueSnapshot::from).collect(),
        };
        Ok(VirtioDeviceSnapshot {
            transport: super::persist::TransportState::Mmio(transport),
            device,
        })
    }

    /// Puts a new transport (over a device built from the same configuration) into the saved
    /// state. The device is paused first; if the driver had it running it is activated again
    /// with the saved rings and starts once resumed.
    pub fn restore_state(&mut self, saved: &VirtioDeviceSnapshot) -> Result<(), RestoreError> {
        let super::persist::TransportState::Mmio(state) = &saved.transport;
        let configured = self.device.device_type();
        if state.device_type != configured {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                configured,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, own)) in state.queues.iter().zip(&self.queues).enumerate() {
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
        super::persist::check_features(state.driver_features, self.device.features())?;
        self.device.restore_state(&saved.device)?;
        self.device.pause().map_err(RestoreError::Pause)?;
        self.queues = queues;
        self.status = state.status;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        self.config_generation = state.config_generation;
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        self.interrupt
            .needs_reset
            .store(state.needs_reset, Ordering::SeqCst);
        let running = STATUS_DRIVER_OK | STATUS_FEATURES_OK;
        if self.status & (running | STATUS_FAILED) == running && !state.needs_reset {
            self.try_activate().map_err(RestoreError::Activate)?;
        }
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        // Registers are 32 bits wide and read aligned; anything else reads 0.
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_register(offset)
        } else {
            0
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data.fill(0);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let ([a, b, c, d], true) = (data, offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes([*a, *b, *c, *d]));
        }
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
