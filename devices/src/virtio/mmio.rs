//! The virtio-mmio transport, version 2 (virtio 1.x §4.2): feature negotiation, the device
//! status machine, queue setup, interrupt status/acknowledge, config space and reset.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::persist::{
    QueueSnapshot, RestoreError, SaveError, TransportState, VirtioDeviceSnapshot,
};
pub use super::transport_core::TransportError;
use super::transport_core::{CoreRegisters, STATUS_NEEDS_RESET, TransportCore};
use super::{GuestMemoryMmap, InterruptKind, VirtioDevice, VirtioInterrupt, WorkerError};
use crate::BusDevice;

/// Each device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (where a VMM puts the queue ioeventfds).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d4d_5652; // "RVMM"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

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
            InterruptKind::Queue(_) => INT_VRING,
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
    core: TransportCore,
    interrupt: Arc<MmioInterrupt>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`; its interrupts raise `interrupt_line`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt_line: EventFd,
    ) -> Result<Self, TransportError> {
        Ok(Self {
            core: TransportCore::new(device, mem)?,
            interrupt: Arc::new(MmioInterrupt::new(interrupt_line)),
        })
    }

    /// The eventfd of each queue, in queue order (a VMM registers them as ioeventfds on
    /// `QUEUE_NOTIFY_OFFSET` with the queue index as data).
    pub fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.core.device.device_type()
    }

    fn status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            STATUS_NEEDS_RESET
        } else {
            0
        };
        self.core.status | needs_reset
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.core.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => self.core.device_features_page(),
            0x34 => self
                .core
                .selected_queue()
                .map_or(0, |q| u32::from(q.max_size())),
            0x44 => self
                .core
                .selected_queue()
                .map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::SeqCst),
            0x70 => self.status(),
            // No shared memory regions: length and base read as all ones.
            0xb0 | 0xb4 | 0xb8 | 0xbc => u32::MAX,
            0xfc => self.core.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let setup = self.core.queue_setup_allowed();
        match offset {
            0x14 => self.core.device_features_select = value,
            0x20 => self.core.write_driver_features_page(value),
            0x24 => self.core.driver_features_select = value,
            0x30 => self.core.queue_select = value,
            0x38 if setup => {
                // A size past 16 bits is invalid, like any other invalid size (not cut to
                // its low bits): the size stays as it was.
                if let (Some(q), Ok(size)) = (self.core.selected_queue(), u16::try_from(value)) {
                    // Sizes above the maximum are clamped to it by virtio-queue.
                    q.set_size(size);
                }
            }
            0x44 if setup => {
                if let Some(q) = self.core.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            QUEUE_NOTIFY_OFFSET => self.core.notify_queue(value),
            0x64 => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            0x70 => self.write_status(value),
            0x80..=0xa4 if setup => self.write_queue_address(offset, value),
            _ => log::debug!("virtio-mmio: write {value:#x} to {offset:#x} ignored"),
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.core.selected_queue() else {
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

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.core.reset();
            self.interrupt.status.store(0, Ordering::SeqCst);
            self.interrupt.needs_reset.store(false, Ordering::SeqCst);
            return;
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.core.write_status(value, &interrupt);
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
        self.core.pause()
    }

    /// Resumes the device.
    pub fn resume(&mut self) {
        self.core.resume();
    }

    /// The transport's and the device's state; the device must be paused.
    pub fn save_state(&self) -> Result<VirtioDeviceSnapshot, SaveError> {
        let (device, queues) = self.core.save()?;
        let core = &self.core;
        let transport = MmioTransportState {
            device_type: core.device.device_type(),
            status: core.status,
            needs_reset: self.interrupt.needs_reset.load(Ordering::SeqCst),
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            device_features_select: core.device_features_select,
            driver_features_select: core.driver_features_select,
            driver_features: core.driver_features,
            queue_select: core.queue_select,
            config_generation: core.config_generation,
            queues,
        };
        Ok(VirtioDeviceSnapshot {
            transport: TransportState::Mmio(transport),
            device,
        })
    }

    /// Puts a new transport (over a device built from the same configuration) into the saved
    /// state. The device is paused first; if the driver had it running it is activated again
    /// with the saved rings and starts once resumed.
    pub fn restore_state(&mut self, saved: &VirtioDeviceSnapshot) -> Result<(), RestoreError> {
        let state = match &saved.transport {
            TransportState::Mmio(state) => state,
            other => {
                return Err(RestoreError::Transport {
                    saved: other.name(),
                    configured: "virtio-mmio",
                });
            }
        };
        let registers = CoreRegisters {
            device_type: state.device_type,
            status: state.status,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            driver_features: state.driver_features,
            queue_select: state.queue_select,
            config_generation: state.config_generation,
            queues: &state.queues,
        };
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.core
            .restore(registers, &saved.device, state.needs_reset, &interrupt)?;
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        self.interrupt
            .needs_reset
            .store(state.needs_reset, Ordering::SeqCst);
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.core.read_config(offset - CONFIG_SPACE_OFFSET, data);
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
            self.core.write_config(offset - CONFIG_SPACE_OFFSET, data);
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
