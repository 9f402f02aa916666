//! The builder's virtio steps: creating the configured devices, placing them on a transport
//! (virtio-mmio windows and interrupt lines, or PCI slots), and attaching them to the buses with
//! their interrupts and queue notifications wired through KVM.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use rvmm_devices::pci::MalformedPciAccesses;
use rvmm_devices::pci::msix::MsiRouter;
use rvmm_devices::virtio::VirtioDevice;
use rvmm_devices::virtio::block::Block;
use rvmm_devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use rvmm_devices::virtio::net::Net;
use rvmm_devices::virtio::pci::{PciPlacement, VIRTIO_BAR_SIZE, VirtioPciTransport};
use rvmm_devices::virtio::rng::Rng;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{BuildError, Transport, VirtioDevices, VmConfig};
use crate::acpi::{PciHostBridge, VirtioMmioDevice};
use crate::bus::Bus;
use crate::layout::{
    PCI_ECAM_SIZE, PCI_ECAM_START, PCI_INTX_GSI_COUNT, PCI_INTX_GSI_FIRST, PCI_MMIO32_SIZE,
    PCI_MMIO32_START, VIRTIO_MMIO_DEVICE_SIZE, virtio_slot,
};
use crate::memory::{GuestMemoryMmap, MemoryLayout};
use crate::metrics::{DiskSource, NicSource, device_id};
use crate::pci::access::{
    CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN, PciConfigPorts, PciEcam, PciWindow,
};
use crate::pci::msi::{GsiRoutes, KvmMsiVectors};
use crate::pci::{KvmIoEvents, PciRoot, device_slot};

/// Where a device sits on the PCI bus: its slot, its BAR's address, its INTA# line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PciSlot {
    pub slot: u8,
    pub bar: u64,
    pub intx_gsi: u32,
}

/// Where the virtio devices sit, in device order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// A virtio-mmio window and interrupt line each.
    Mmio(Vec<(u64, u32)>),
    /// A PCI slot each, from 00:01.0 in order: the guest's PCI addresses follow the order of
    /// the devices (disks, then interfaces, then the entropy device).
    Pci(Vec<PciSlot>),
}

/// The PCI slot of the `index`th device: 00:(index + 1).0, its BAR packed in the 32-bit window.
pub(super) fn pci_slot(index: usize) -> Option<PciSlot> {
    let slot = device_slot(index)?;
    let bar = PCI_MMIO32_START + index as u64 * VIRTIO_BAR_SIZE;
    (bar + VIRTIO_BAR_SIZE <= PCI_MMIO32_START + PCI_MMIO32_SIZE).then_some(PciSlot {
        slot,
        bar,
        intx_gsi: PCI_INTX_GSI_FIRST + u32::from(slot - 1) % PCI_INTX_GSI_COUNT,
    })
}

/// Where each of `count` devices goes on `transport`.
pub(crate) fn place(transport: Transport, count: usize) -> Result<Placement, BuildError> {
    match transport {
        Transport::Mmio => (0..count)
            .map(|i| virtio_slot(i).ok_or(BuildError::TooManyDevices(i)))
            .collect::<Result<_, _>>()
            .map(Placement::Mmio),
        Transport::Pci => (0..count)
            .map(|i| pci_slot(i).ok_or(BuildError::TooManyDevices(i)))
            .collect::<Result<_, _>>()
            .map(Placement::Pci),
    }
}

/// The 32-bit and 64-bit PCI windows of a VM with `layout`.
pub(super) fn pci_windows(layout: &MemoryLayout) -> [Range<u64>; 2] {
    let (start64, size64) = layout.pci_mmio64();
    [
        PCI_MMIO32_START..PCI_MMIO32_START + PCI_MMIO32_SIZE,
        start64..start64 + size64,
    ]
}

impl Placement {
    /// How the guest kernel learns of virtio-mmio devices without ACPI
    /// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`); with ACPI the DSDT has them instead, never both.
    pub(super) fn cmdline(&self, acpi: bool) -> Vec<String> {
        match self {
            Self::Mmio(slots) if !acpi => slots
                .iter()
                .map(|(base, irq)| format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The virtio-mmio devices as the DSDT lists them.
    pub(super) fn mmio_devices(&self) -> Vec<VirtioMmioDevice> {
        match self {
            Self::Mmio(slots) => slots
                .iter()
                .map(|&(base, irq)| VirtioMmioDevice {
                    base,
                    size: VIRTIO_MMIO_DEVICE_SIZE,
                    irq,
                })
                .collect(),
            Self::Pci(_) => Vec::new(),
        }
    }

    /// The PCI host bridge as the DSDT and MCFG describe it.
    pub(super) fn host_bridge(&self, layout: &MemoryLayout) -> Option<PciHostBridge> {
        let Self::Pci(slots) = self else {
            return None;
        };
        let [mmio32, mmio64] = pci_windows(layout);
        Some(PciHostBridge {
            ecam: PCI_ECAM_START,
            mmio32,
            mmio64,
            intx: slots.iter().map(|s| (s.slot, s.intx_gsi)).collect(),
        })
    }
}

/// The virtio devices the configuration asks for, in slot order, with their counters and
/// the writable disks' flush handles.
pub(crate) fn create_virtio_devices(config: &VmConfig) -> Result<VirtioDevices, BuildError> {
    let mut virtio = VirtioDevices {
        devices: Vec::new(),
        disks: Vec::new(),
        nets: Vec::new(),
        syncs: Vec::new(),
    };
    for (index, disk) in config.disks.iter().enumerate() {
        let disk_err = |source| BuildError::Disk { index, source };
        let block = Block::new(disk.clone()).map_err(disk_err)?;
        virtio.syncs.extend(block.disk_sync().map_err(disk_err)?);
        virtio.disks.push(DiskSource {
            id: device_id(disk.id.as_deref(), "disk", index),
            counters: block.counters(),
        });
        virtio.devices.push(Box::new(block));
    }
    for (index, net) in config.nets.iter().enumerate() {
        let nic = Net::new(net.clone()).map_err(|source| BuildError::Net { index, source })?;
        virtio.nets.push(NicSource {
            id: device_id(net.id.as_deref(), "net", index),
            counters: nic.counters(),
        });
        virtio.devices.push(Box::new(nic));
    }
    if config.rng {
        virtio.devices.push(Box::new(Rng::new()));
    }
    Ok(virtio)
}

/// Starts the devices' worker threads from this (unfiltered) thread, each filtered with its
/// own list when `seccomp` is set: started at activation by a vCPU, they would inherit its
/// filter, which does not allow starting threads.
pub(crate) fn start_worker_threads(
    devices: &mut [Box<dyn VirtioDevice>],
    seccomp: bool,
) -> Result<(), BuildError> {
    for (index, device) in devices.iter_mut().enumerate() {
        device
            .start_worker_thread(seccomp)
            .map_err(|source| BuildError::Worker { index, source })?;
    }
    Ok(())
}

/// Puts each device behind a virtio-mmio transport: interrupts through an irqfd, queue
/// notifications through ioeventfds so the vCPU thread never runs device code.
pub(super) fn attach_virtio_mmio(
    vm_fd: &VmFd,
    mmio: &mut Bus,
    mem: &GuestMemoryMmap,
    devices: Vec<Box<dyn VirtioDevice>>,
    slots: &[(u64, u32)],
) -> Result<Vec<Arc<Mutex<MmioTransport>>>, BuildError> {
    let mut transports = Vec::with_capacity(devices.len());
    for (index, (device, &(base, irq))) in devices.into_iter().zip(slots).enumerate() {
        let line = EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::Irq("virtio", e))?;
        vm_fd
            .register_irqfd(&line, irq)
            .map_err(|e| BuildError::Irq("virtio", e.into()))?;
        let transport = MmioTransport::new(device, mem.clone(), line)
            .map_err(|source| BuildError::Transport { index, source })?;
        for (queue, event) in (0u32..).zip(transport.queue_events()) {
            let notify = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            vm_fd
                .register_ioevent(event, &notify, queue)
                .map_err(|e| BuildError::IoEvent(index, e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, VIRTIO_MMIO_DEVICE_SIZE, transport.clone())?;
        transports.push(transport);
    }
    Ok(transports)
}

/// What [`attach_virtio_pci`] returns: the root complex (with the malformed-access counters)
/// and the transports.
type PciAttached = (Arc<PciRoot>, Vec<Arc<Mutex<VirtioPciTransport>>>);

/// KVM's GSI routing for MSI-X, or why the host refuses it (devices then offer INTx only).
fn msi_routes(vm_fd: &Arc<VmFd>) -> Option<Arc<GsiRoutes>> {
    match GsiRoutes::new(vm_fd.clone()) {
        Ok(routes) => Some(Arc::new(routes)),
        Err(e) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            log::warn!(
                "{e} ({}): virtio-pci devices interrupt through INTx only",
                cause.unwrap_or_default()
            );
            None
        }
    }
}

/// Puts each device behind a virtio-pci transport in its slot of a new PCI root complex, and
/// the root complex on the buses: configuration ports, ECAM window, BAR windows. Interrupts:
/// INTA# through a resampling irqfd (a level-triggered line the guest's EOI lowers), MSI-X
/// vectors through GSI routes and irqfds. Queue notifications become ioeventfds wherever the
/// guest maps the BAR. Returns the root complex and the transports.
pub(super) fn attach_virtio_pci(
    vm_fd: &Arc<VmFd>,
    pio: &mut Bus,
    mmio: &mut Bus,
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    devices: Vec<Box<dyn VirtioDevice>>,
    slots: &[PciSlot],
) -> Result<PciAttached, BuildError> {
    let malformed = Arc::new(MalformedPciAccesses::default());
    let windows = pci_windows(layout);
    let ioevents = Arc::new(KvmIoEvents(vm_fd.clone()));
    let mut root = PciRoot::new(windows.to_vec(), ioevents, malformed.clone());
    let routes = msi_routes(vm_fd);
    let mut transports = Vec::with_capacity(devices.len());
    for (index, (device, slot)) in devices.into_iter().zip(slots).enumerate() {
        let irq_err = |e: std::io::Error| BuildError::Irq("virtio-pci INTx", e);
        let intx = EventFd::new(EFD_NONBLOCK).map_err(irq_err)?;
        let resample = EventFd::new(EFD_NONBLOCK).map_err(irq_err)?;
        vm_fd
            .register_irqfd_with_resample(&intx, &resample, slot.intx_gsi)
            .map_err(|e| irq_err(e.into()))?;
        let msi = match &routes {
            Some(routes) => {
                let count = VirtioPciTransport::msix_vectors_for(&*device);
                let vectors = KvmMsiVectors::new(routes.clone(), count)
                    .map_err(|source| BuildError::Msi { index, source })?;
                Some(Arc::new(vectors) as Arc<dyn MsiRouter>)
            }
            None => None,
        };
        #[allow(clippy::cast_possible_truncation, reason = "INTx GSIs are 16 to 23")]
        let placement = PciPlacement {
            bar_addr: slot.bar,
            intx,
            intx_gsi: slot.intx_gsi as u8,
            msi,
            malformed: malformed.clone(),
        };
        let transport = VirtioPciTransport::new(device, mem.clone(), placement)
            .map_err(|source| BuildError::Transport { index, source })?;
        let transport = Arc::new(Mutex::new(transport));
        root.add(usize::from(slot.slot), transport.clone())?;
        transports.push(transport);
    }
    let root = Arc::new(root);
    let ports = PciConfigPorts::new(root.clone());
    pio.insert(
        CONFIG_ADDRESS_PORT,
        CONFIG_PORTS_LEN,
        Arc::new(Mutex::new(ports)),
    )?;
    let ecam = PciEcam::new(root.clone());
    mmio.insert(PCI_ECAM_START, PCI_ECAM_SIZE, Arc::new(Mutex::new(ecam)))?;
    for window in windows {
        let device = PciWindow::new(root.clone(), window.start);
        mmio.insert(
            window.start,
            window.end - window.start,
            Arc::new(Mutex::new(device)),
        )?;
    }
    Ok((root, transports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_slots_follow_device_order_and_share_intx_lines_past_eight() {
        assert_eq!(
            pci_slot(0),
            Some(PciSlot {
                slot: 1,
                bar: 0xc000_0000,
                intx_gsi: 16
            })
        );
        let ninth = pci_slot(8).unwrap();
        assert_eq!(
            (ninth.slot, ninth.bar, ninth.intx_gsi),
            (9, 0xc004_0000, 16)
        );
        assert_eq!(pci_slot(30).map(|s| s.slot), Some(31));
        assert_eq!(pci_slot(31), None);
    }

    #[test]
    fn mmio_devices_go_on_the_command_line_only_without_acpi() {
        let placement = place(Transport::Mmio, 2).unwrap();
        assert_eq!(
            placement.cmdline(false),
            vec![
                "virtio_mmio.device=4K@0xd0000000:5",
                "virtio_mmio.device=4K@0xd0001000:6"
            ]
        );
        assert!(placement.cmdline(true).is_empty());
        assert_eq!(placement.mmio_devices().len(), 2);
        let layout = MemoryLayout::new(64 << 20).unwrap();
        assert!(placement.host_bridge(&layout).is_none());
        let pci = place(Transport::Pci, 2).unwrap();
        assert!(pci.cmdline(false).is_empty());
        let bridge = pci.host_bridge(&layout).unwrap();
        assert_eq!(bridge.intx, vec![(1, 16), (2, 17)]);
        assert_eq!(bridge.mmio64, 4 << 30..68 << 30);
        assert!(matches!(
            place(Transport::Pci, 40),
            Err(BuildError::TooManyDevices(31))
        ));
    }
}
