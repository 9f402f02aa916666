//! The common configuration structure of a virtio-pci device (virtio 1.x §4.1.4.3,
//! `struct virtio_pci_common_cfg`): feature negotiation, device status, and per-queue setup
//! through `queue_select`. Each field is accessed at its own width; a 64-bit field also as two
//! 32-bit halves. Anything else is a malformed access.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::QueueT;

use super::interrupt::{NO_VECTOR, PciInterrupt};
use crate::cast::low_u32;
use crate::virtio::VirtioInterrupt;
use crate::virtio::transport_core::{STATUS_NEEDS_RESET, TransportCore};

/// Bytes of the structure (up to `queue_device`; rvmm offers no notification data or queue
/// reset, which add fields past it).
pub(super) const COMMON_CONFIG_LEN: u64 = 0x38;

/// Which part of a 64-bit field an access covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Low,
    High,
    Whole,
}

/// A field of the structure, as one access reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    ConfigMsixVector,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDesc(Part),
    QueueDriver(Part),
    QueueDevice(Part),
}

fn field(offset: u64, len: usize) -> Option<Field> {
    let part = |base: u64| match (offset - base, len) {
        (0, 4) => Some(Part::Low),
        (4, 4) => Some(Part::High),
        (0, 8) => Some(Part::Whole),
        _ => None,
    };
    Some(match (offset, len) {
        (0x00, 4) => Field::DeviceFeatureSelect,
        (0x04, 4) => Field::DeviceFeature,
        (0x08, 4) => Field::DriverFeatureSelect,
        (0x0c, 4) => Field::DriverFeature,
        (0x10, 2) => Field::ConfigMsixVector,
        (0x12, 2) => Field::NumQueues,
        (0x14, 1) => Field::DeviceStatus,
        (0x15, 1) => Field::ConfigGeneration,
        (0x16, 2) => Field::QueueSelect,
        (0x18, 2) => Field::QueueSize,
        (0x1a, 2) => Field::QueueMsixVector,
        (0x1c, 2) => Field::QueueEnable,
        (0x1e, 2) => Field::QueueNotifyOff,
        (0x20..0x28, _) => Field::QueueDesc(part(0x20)?),
        (0x28..0x30, _) => Field::QueueDriver(part(0x28)?),
        (0x30..0x38, _) => Field::QueueDevice(part(0x30)?),
        _ => return None,
    })
}

fn select(value: u64, part: Part) -> u64 {
    match part {
        Part::Low => value & 0xffff_ffff,
        Part::High => value >> 32,
        Part::Whole => value,
    }
}

/// `value` in its field's type; `field` matched the access width to the field's, so a value
/// too wide for it is a malformed access.
fn narrow<T: TryFrom<u64>>(value: u64) -> Result<T, Malformed> {
    T::try_from(value).map_err(|_| Malformed)
}

/// A malformed access: no field at that offset and width, or a write to a read-only field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Malformed;

/// The common configuration of one device: the driver-facing state and the interrupt vectors.
pub(super) struct CommonConfig<'a> {
    pub core: &'a mut TransportCore,
    pub interrupt: &'a Arc<PciInterrupt>,
    /// MSI-X table size (0: no MSI-X).
    pub msix_vectors: u16,
}

impl CommonConfig<'_> {
    /// The guest reads `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), Malformed> {
        let field = field(offset, data.len()).ok_or(Malformed)?;
        let value = self.value(field);
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        Ok(())
    }

    fn value(&mut self, field: Field) -> u64 {
        let interrupt = self.interrupt;
        let queue_index = self.core.queue_select as usize;
        let queue_vector = || {
            interrupt
                .queue_vectors
                .get(queue_index)
                .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
        };
        let core = &mut *self.core;
        match field {
            Field::DeviceFeatureSelect => u64::from(core.device_features_select),
            Field::DeviceFeature => u64::from(core.device_features_page()),
            Field::DriverFeatureSelect => u64::from(core.driver_features_select),
            Field::DriverFeature => u64::from(core.driver_features_page()),
            Field::ConfigMsixVector => u64::from(interrupt.config_vector.load(Ordering::SeqCst)),
            Field::NumQueues => core.queues.len() as u64,
            Field::DeviceStatus => {
                let needs_reset = interrupt.needs_reset.load(Ordering::SeqCst);
                u64::from(core.status | if needs_reset { STATUS_NEEDS_RESET } else { 0 })
            }
            // The one-byte field shows the generation's low byte (it only has to change).
            Field::ConfigGeneration => u64::from(core.config_generation & 0xff),
            Field::QueueSelect => u64::from(core.queue_select),
            Field::QueueMsixVector => u64::from(queue_vector()),
            Field::QueueNotifyOff => {
                // Queue n is notified at n times the multiplier.
                if queue_index < core.queues.len() {
                    queue_index as u64
                } else {
                    0
                }
            }
            Field::QueueSize => core.selected_queue().map_or(0, |q| u64::from(q.size())),
            Field::QueueEnable => core.selected_queue().map_or(0, |q| u64::from(q.ready())),
            Field::QueueDesc(part) => {
                select(core.selected_queue().map_or(0, |q| q.desc_table()), part)
            }
            Field::QueueDriver(part) => {
                select(core.selected_queue().map_or(0, |q| q.avail_ring()), part)
            }
            Field::QueueDevice(part) => {
                select(core.selected_queue().map_or(0, |q| q.used_ring()), part)
            }
        }
    }

    /// The guest writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Malformed> {
        let field = field(offset, data.len()).ok_or(Malformed)?;
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let setup = self.core.queue_setup_allowed();
        match field {
            Field::DeviceFeatureSelect => self.core.device_features_select = narrow(value)?,
            Field::DriverFeatureSelect => self.core.driver_features_select = narrow(value)?,
            Field::DriverFeature => self.core.write_driver_features_page(narrow(value)?),
            Field::ConfigMsixVector => {
                let vector = self.usable_vector(narrow(value)?);
                self.interrupt.config_vector.store(vector, Ordering::SeqCst);
            }
            Field::DeviceStatus => self.write_status(narrow(value)?),
            Field::QueueSelect => self.core.queue_select = u32::from(narrow::<u16>(value)?),
            Field::QueueMsixVector => {
                let vector = self.usable_vector(narrow(value)?);
                if let Some(slot) = self
                    .interrupt
                    .queue_vectors
                    .get(self.core.queue_select as usize)
                {
                    slot.store(vector, Ordering::SeqCst);
                }
            }
            Field::QueueSize if setup => {
                if let Some(q) = self.core.selected_queue() {
                    // Sizes virtio-queue finds invalid (not a power of two, above the
                    // maximum) leave the size as it was.
                    q.set_size(narrow(value)?);
                }
            }
            // Writing 0 is not allowed to the driver (§4.1.4.3.2) and has no effect.
            Field::QueueEnable if setup && value == 1 => {
                if let Some(q) = self.core.selected_queue() {
                    q.set_ready(true);
                }
            }
            Field::QueueDesc(part) if setup => self.write_address(part, value, Queue::Desc),
            Field::QueueDriver(part) if setup => self.write_address(part, value, Queue::Driver),
            Field::QueueDevice(part) if setup => self.write_address(part, value, Queue::Device),
            Field::QueueSize
            | Field::QueueEnable
            | Field::QueueDesc(_)
            | Field::QueueDriver(_)
            | Field::QueueDevice(_) => {
                log::debug!("virtio-pci: queue write outside setup ignored");
            }
            Field::DeviceFeature
            | Field::NumQueues
            | Field::ConfigGeneration
            | Field::QueueNotifyOff => return Err(Malformed),
        }
        Ok(())
    }

    /// `vector` if the MSI-X table has it, else "no vector", which tells the driver it cannot
    /// have it (§4.1.4.3.2).
    fn usable_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.core.reset();
            self.interrupt.reset();
            return;
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.core.write_status(value, &interrupt);
    }

    fn write_address(&mut self, part: Part, value: u64, which: Queue) {
        let Some(q) = self.core.selected_queue() else {
            return;
        };
        let (low, high) = match part {
            // A half is a 4-byte access: its value is 32 bits.
            Part::Low => (Some(low_u32(value)), None),
            Part::High => (None, Some(low_u32(value))),
            Part::Whole => (Some(low_u32(value)), Some((value >> 32) as u32)),
        };
        match which {
            Queue::Desc => q.set_desc_table_address(low, high),
            Queue::Driver => q.set_avail_ring_address(low, high),
            Queue::Device => q.set_used_ring_address(low, high),
        }
    }
}

/// The three areas of a split virtqueue.
#[derive(Clone, Copy, Debug)]
enum Queue {
    Desc,
    Driver,
    Device,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_at_their_offset_and_width_only() {
        assert_eq!(field(0x14, 1), Some(Field::DeviceStatus));
        assert_eq!(field(0x14, 2), None);
        assert_eq!(field(0x13, 1), None);
        assert_eq!(field(0x20, 8), Some(Field::QueueDesc(Part::Whole)));
        assert_eq!(field(0x24, 4), Some(Field::QueueDesc(Part::High)));
        assert_eq!(field(0x22, 4), None);
        assert_eq!(field(0x24, 8), None);
        assert_eq!(field(0x34, 4), Some(Field::QueueDevice(Part::High)));
        assert_eq!(field(0x38, 4), None);
        assert_eq!(field(u64::MAX, 1), None);
    }
}
