//! The virtio-pci transport, modern only (virtio 1.x §4.1): one PCI function per device, with a
//! 64-bit memory BAR holding the common configuration, ISR status, device configuration, queue
//! notification and MSI-X regions, each announced by a capability; interrupts through MSI-X (a
//! vector per queue plus one for configuration changes) or the INTA# line.
//!
//! BAR 0 layout (each region on its own 4 KiB page, so a VMM can map them apart):
//!
//! | offset | region |
//! | --- | --- |
//! | 0x0000 | common configuration (`virtio_pci_common_cfg`) |
//! | 0x1000 | ISR status |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications: queue n at 0x3000 + 4n (a KVM ioeventfd each) |
//! | 0x4000 | MSI-X table |
//! | 0x6000 | MSI-X pending bits |

mod common_config;
mod interrupt;
mod persist;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use vmm_sys_util::eventfd::EventFd;

use self::common_config::{COMMON_CONFIG_LEN, CommonConfig};
pub use self::interrupt::{NO_VECTOR, PciInterrupt};
pub use self::persist::PciTransportState;
use super::transport_core::{TransportCore, TransportError};
use super::{GuestMemoryMmap, TYPE_BLOCK, TYPE_NET, VirtioDevice, WorkerError};
use crate::pci::msix::{MSIX_CAPABILITY_ID, MSIX_CONTROL_OFFSET, MsiRouter, Msix};
use crate::pci::{
    BarRegion, BarWriteEvent, COMMAND, ConfigSpace, MalformedPciAccesses, MemoryBar, PciAccessKind,
    PciDevice, PciIdentity,
};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// A modern device's ID is this plus its virtio type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The BAR holding every region.
pub const VIRTIO_BAR: u8 = 0;
/// Its size.
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Offset of the notification region in the BAR.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
const REGION_LEN: u64 = 0x1000;
/// Queues the notification region (up to the MSI-X table) has room for.
const MAX_QUEUES: u32 = 1024;
const _: () =
    assert!(NOTIFY_OFFSET + MAX_QUEUES as u64 * NOTIFY_OFF_MULTIPLIER as u64 <= MSIX_TABLE_OFFSET);
const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// The table's second page (a table of more than 256 vectors reaches into it).
const MSIX_TABLE_SECOND_PAGE: u64 = MSIX_TABLE_OFFSET + REGION_LEN;
const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Revision 1: a modern (non-transitional) device.
const REVISION: u8 = 1;
/// Non-transitional devices have a subsystem ID of 0x40 or more (§4.1.2.1).
const SUBSYSTEM_ID: u16 = 0x40;
/// `VIRTIO_PCI_CAP_*` configuration types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const VENDOR_CAPABILITY_ID: u8 = 0x09;
/// Offsets in the `VIRTIO_PCI_CAP_PCI_CFG` capability (from the capability's start).
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

/// A virtio device on the PCI bus.
pub struct VirtioPciTransport {
    core: TransportCore,
    config: ConfigSpace,
    msix: Option<Msix>,
    msix_capability: Option<usize>,
    pci_cfg_capability: usize,
    interrupt: Arc<PciInterrupt>,
    malformed: Arc<MalformedPciAccesses>,
}

impl std::fmt::Debug for VirtioPciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciTransport")
            .field("core", &self.core)
            .field("msix", &self.msix.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a virtio-pci function is and how it interrupts.
pub struct PciPlacement {
    /// Address of the BAR (as firmware assigns it; the guest may move it).
    pub bar_addr: u64,
    /// The INTx line (an irqfd) and the GSI it raises, written to the interrupt line register.
    pub intx: EventFd,
    /// The GSI `intx` raises.
    pub intx_gsi: u8,
    /// MSI-X vectors (`queues + 1`); none: the device offers no MSI-X capability.
    pub msi: Option<Arc<dyn MsiRouter>>,
    /// Where malformed accesses are counted.
    pub malformed: Arc<MalformedPciAccesses>,
}

impl std::fmt::Debug for PciPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciPlacement")
            .field("bar_addr", &self.bar_addr)
            .field("intx_gsi", &self.intx_gsi)
            .field("msi", &self.msi.is_some())
            .finish_non_exhaustive()
    }
}

impl VirtioPciTransport {
    /// How many MSI-X vectors a device wants: one per queue and one for configuration changes.
    pub fn msix_vectors_for(device: &dyn VirtioDevice) -> u16 {
        // More queues than that are refused by `new`.
        u16::try_from(device.queue_max_sizes().len()).map_or(u16::MAX, |n| n.saturating_add(1))
    }

    /// Wraps `device` as a PCI function placed as `placement` says.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        placement: PciPlacement,
    ) -> Result<Self, TransportError> {
        let core = TransportCore::new(device, mem)?;
        let queues = core.queues.len();
        let queue_count = u32::try_from(queues)
            .ok()
            .filter(|&n| n <= MAX_QUEUES)
            .ok_or(TransportError::TooManyQueues(queues, MAX_QUEUES as usize))?;
        let device_type = core.device.device_type();
        let identity = identity(device_type).ok_or(TransportError::DeviceType(device_type))?;
        let mut config = ConfigSpace::new(identity, 1, placement.intx_gsi);
        let bar = MemoryBar {
            size: VIRTIO_BAR_SIZE,
            is_64bit: true,
            prefetchable: false,
        };
        config.add_memory_bar(usize::from(VIRTIO_BAR), bar, placement.bar_addr);
        let msix = placement.msi.map(Msix::new);
        let msix_capability = msix.as_ref().map(|msix| {
            let (body, mask) = msix.capability(
                VIRTIO_BAR,
                in_bar(MSIX_TABLE_OFFSET),
                in_bar(MSIX_PBA_OFFSET),
            );
            config.add_capability(MSIX_CAPABILITY_ID, &body, &mask)
        });
        let notify_len = queue_count * NOTIFY_OFF_MULTIPLIER;
        add_virtio_capability(
            &mut config,
            CAP_COMMON,
            COMMON_OFFSET,
            in_bar(COMMON_CONFIG_LEN),
        );
        let mut notify = virtio_capability(CAP_NOTIFY, NOTIFY_OFFSET, notify_len).to_vec();
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(VENDOR_CAPABILITY_ID, &notify, &[0; 18]);
        add_virtio_capability(&mut config, CAP_ISR, ISR_OFFSET, 1);
        add_virtio_capability(
            &mut config,
            CAP_DEVICE,
            DEVICE_CONFIG_OFFSET,
            in_bar(REGION_LEN),
        );
        // The configuration access window: bar, offset, length and data are the driver's.
        let mut pci_cfg = virtio_capability(CAP_PCI_CFG, 0, 0).to_vec();
        pci_cfg.extend_from_slice(&[0; 4]);
        let mut pci_cfg_mask = [0u8; 18];
        pci_cfg_mask[PCI_CFG_BAR - 2] = 0xff;
        pci_cfg_mask[PCI_CFG_OFFSET - 2..].fill(0xff);
        let pci_cfg_capability =
            config.add_capability(VENDOR_CAPABILITY_ID, &pci_cfg, &pci_cfg_mask);
        let vectors = msix.as_ref().map(Msix::vectors);
        let interrupt = Arc::new(PciInterrupt::new(queues, vectors, placement.intx));
        Ok(Self {
            core,
            config,
            msix,
            msix_capability,
            pci_cfg_capability,
            interrupt,
            malformed: placement.malformed,
        })
    }

    /// The eventfd of each queue, in queue order.
    pub fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.core.device.device_type()
    }

    /// Pauses the device (see [`VirtioDevice::pause`]).
    pub fn pause(&mut self) -> Result<(), WorkerError> {
        self.core.pause()
    }

    /// Resumes the device.
    pub fn resume(&mut self) {
        self.core.resume();
    }

    fn malformed(&self, what: std::fmt::Arguments<'_>) {
        self.malformed.count(PciAccessKind::Bar, what);
    }

    fn read_region(&mut self, offset: u64, data: &mut [u8]) {
        let region_offset = offset % REGION_LEN;
        let ok = match offset - region_offset {
            COMMON_OFFSET => self.common().read(region_offset, data).is_ok(),
            ISR_OFFSET if region_offset == 0 && data.len() == 1 => {
                data[0] = self.interrupt.take_isr();
                true
            }
            DEVICE_CONFIG_OFFSET => {
                self.core.read_config(region_offset, data);
                true
            }
            // Notification addresses are write-only.
            NOTIFY_OFFSET => {
                data.fill(0);
                true
            }
            MSIX_TABLE_OFFSET | MSIX_TABLE_SECOND_PAGE => {
                self.read_msix(offset - MSIX_TABLE_OFFSET, data, false)
            }
            MSIX_PBA_OFFSET => self.read_msix(region_offset, data, true),
            _ => false,
        };
        if !ok {
            data.fill(0);
            self.malformed(format_args!(
                "read of {} bytes at BAR offset {offset:#x}",
                data.len()
            ));
        }
    }

    fn read_msix(&mut self, offset: u64, data: &mut [u8], pba: bool) -> bool {
        let Some(msix) = &self.msix else {
            return false;
        };
        let result = if pba {
            msix.read_pba(offset, data)
        } else {
            msix.read_table(offset, data)
        };
        if result.is_err() {
            // Counted as an MSI-X access, not a BAR one.
            data.fill(0);
            self.malformed.count(
                PciAccessKind::Msix,
                format_args!("read of {} bytes at {offset:#x}", data.len()),
            );
        }
        true
    }

    fn write_region(&mut self, offset: u64, data: &[u8]) {
        let region_offset = offset % REGION_LEN;
        let ok = match offset - region_offset {
            COMMON_OFFSET => self.common().write(region_offset, data).is_ok(),
            DEVICE_CONFIG_OFFSET => {
                self.core.write_config(region_offset, data);
                true
            }
            NOTIFY_OFFSET => self.notify(region_offset, data.len()),
            MSIX_TABLE_OFFSET | MSIX_TABLE_SECOND_PAGE => {
                let result = match self.msix.as_mut() {
                    Some(msix) => msix.write_table(offset - MSIX_TABLE_OFFSET, data),
                    None => return self.malformed(format_args!("MSI-X write without MSI-X")),
                };
                if result.is_err() {
                    self.malformed.count(
                        PciAccessKind::Msix,
                        format_args!("write of {} bytes at {offset:#x}", data.len()),
                    );
                }
                true
            }
            MSIX_PBA_OFFSET if self.msix.is_some() => {
                self.malformed
                    .count(PciAccessKind::Msix, format_args!("write to the PBA"));
                true
            }
            _ => false,
        };
        if !ok {
            self.malformed(format_args!(
                "write of {} bytes at BAR offset {offset:#x}",
                data.len()
            ));
        }
    }

    /// A write at `offset` in the notification region, when no ioeventfd took it.
    fn notify(&self, offset: u64, len: usize) -> bool {
        let queue = u32::try_from(offset / u64::from(NOTIFY_OFF_MULTIPLIER))
            .ok()
            .filter(|&queue| (queue as usize) < self.core.queues.len());
        match queue {
            Some(queue) if offset.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) && len <= 4 => {
                self.core.notify_queue(queue);
                true
            }
            _ => false,
        }
    }

    fn common(&mut self) -> CommonConfig<'_> {
        CommonConfig {
            core: &mut self.core,
            interrupt: &self.interrupt,
            msix_vectors: self.msix.as_ref().map_or(0, Msix::vector_count),
        }
    }

    /// The `VIRTIO_PCI_CAP_PCI_CFG` window: the BAR access its registers describe, if it is
    /// one the device has (BAR 0, a width of 1, 2 or 4 bytes, aligned, within the BAR).
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_capability;
        let mut bar = [0u8; 1];
        self.config.read(cap + PCI_CFG_BAR, &mut bar);
        let offset = u64::from(self.config.u32_at(cap + PCI_CFG_OFFSET));
        let len = self.config.u32_at(cap + PCI_CFG_LENGTH) as usize;
        let ok = bar[0] == VIRTIO_BAR
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= VIRTIO_BAR_SIZE;
        ok.then_some((offset, len))
    }

    fn pci_cfg_data_access(&self, offset: usize, len: usize) -> bool {
        let data = self.pci_cfg_capability + PCI_CFG_DATA;
        offset < data + 4 && offset + len > data
    }
}

/// A `virtio_pci_cap` body (after the ID and next pointer) for region `cfg_type` of BAR 0.
/// An offset or length inside the BAR, as the capabilities' `u32` fields hold it.
#[allow(
    clippy::cast_possible_truncation,
    reason = "inside the 32 KiB BAR (constants)"
)]
fn in_bar(x: u64) -> u32 {
    debug_assert!(x <= VIRTIO_BAR_SIZE);
    x as u32
}

fn virtio_capability(cfg_type: u8, offset: u64, len: u32) -> [u8; 14] {
    let mut body = [0u8; 14];
    // cap_len counts the whole capability: ID, next, this body and any trailing fields.
    body[0] = match cfg_type {
        CAP_NOTIFY | CAP_PCI_CFG => 20,
        _ => 16,
    };
    body[1] = cfg_type;
    body[2] = VIRTIO_BAR;
    body[6..10].copy_from_slice(&in_bar(offset).to_le_bytes());
    body[10..14].copy_from_slice(&len.to_le_bytes());
    body
}

fn add_virtio_capability(config: &mut ConfigSpace, cfg_type: u8, offset: u64, len: u32) {
    let body = virtio_capability(cfg_type, offset, len);
    config.add_capability(VENDOR_CAPABILITY_ID, &body, &[0; 14]);
}

/// The identification registers of a device of virtio type `device_type`: the class codes a
/// guest's generic tools show (QEMU's choices for the same devices).
fn identity(device_type: u32) -> Option<PciIdentity> {
    let (class, subclass) = match device_type {
        TYPE_NET => (0x02, 0x00),   // network, Ethernet
        TYPE_BLOCK => (0x01, 0x00), // mass storage, SCSI
        _ => (0xff, 0x00),          // unassigned class
    };
    let device = u16::try_from(device_type)
        .ok()
        .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))?;
    Some(PciIdentity {
        vendor: VIRTIO_PCI_VENDOR_ID,
        device,
        revision: REVISION,
        class,
        subclass,
        prog_if: 0,
        subsystem_vendor: VIRTIO_PCI_VENDOR_ID,
        subsystem: SUBSYSTEM_ID,
    })
}

impl PciDevice for VirtioPciTransport {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        if self.pci_cfg_data_access(offset, data.len()) {
            // Only whole-register reads of the data field go through to the BAR.
            let start = self.pci_cfg_capability + PCI_CFG_DATA;
            match self.pci_cfg_window() {
                Some((bar_offset, len)) if offset == start && data.len() >= len => {
                    data.fill(0);
                    self.read_region(bar_offset, &mut data[..len]);
                }
                _ => {
                    data.fill(0);
                    self.malformed(format_args!("pci_cfg_data read without a valid window"));
                }
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        if self.pci_cfg_data_access(offset, data.len()) {
            let start = self.pci_cfg_capability + PCI_CFG_DATA;
            match self.pci_cfg_window() {
                Some((bar_offset, len)) if offset == start && data.len() >= len => {
                    self.write_region(bar_offset, &data[..len]);
                }
                _ => self.malformed(format_args!("pci_cfg_data write without a valid window")),
            }
            return;
        }
        self.config.write(offset, data);
        if offset < COMMAND + 2 && offset + data.len() > COMMAND {
            self.interrupt
                .intx_enabled
                .store(self.config.intx_enabled(), Ordering::SeqCst);
        }
        if let (Some(cap), Some(msix)) = (self.msix_capability, self.msix.as_mut()) {
            let control = cap + MSIX_CONTROL_OFFSET;
            if offset < control + 2 && offset + data.len() > control {
                msix.write_control(self.config.u16_at(control));
            }
        }
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != VIRTIO_BAR || offset + data.len() as u64 > VIRTIO_BAR_SIZE {
            data.fill(0);
            self.malformed(format_args!("read past BAR {bar}"));
            return;
        }
        self.read_region(offset, data);
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != VIRTIO_BAR || offset + data.len() as u64 > VIRTIO_BAR_SIZE {
            self.malformed(format_args!("write past BAR {bar}"));
            return;
        }
        self.write_region(offset, data);
    }

    fn mapped_bars(&self) -> Vec<BarRegion> {
        self.config.mapped_bars()
    }

    fn bar_write_events(&self) -> Vec<BarWriteEvent<'_>> {
        self.core
            .queue_events()
            .iter()
            .enumerate()
            .map(|(queue, event)| BarWriteEvent {
                bar: VIRTIO_BAR,
                offset: NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                event,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
