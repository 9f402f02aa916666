//! MSI delivery through KVM: the VM's GSI routing table ([`GsiRoutes`]: the in-kernel
//! irqchip's pins as KVM sets them up by default, plus one MSI route per vector the guest
//! programmed) and a PCI function's MSI-X vectors as GSIs with an irqfd each
//! ([`KvmMsiVectors`], the devices' [`MsiRouter`]).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every change rewrites it from
//! [`routing_entries`]; it happens when the guest programs or unmasks a vector, not per
//! interrupt. Raising a vector is a write to its irqfd.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi,
};
use kvm_ioctls::VmFd;
use rvmm_devices::cast::low_u32;
use rvmm_devices::pci::msix::{MsiMessage, MsiRouter};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The IOAPIC's pins, which are GSIs 0-23; MSI routes use the GSIs after them.
pub const IOAPIC_PINS: u32 = 24;
/// GSIs 0-15 also reach the PIC pair (KVM's default routing keeps both).
const PIC_PINS: u32 = 16;

/// Errors setting up MSI delivery.
#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    /// KVM refused a routing table with an MSI route.
    #[error("KVM refuses MSI routes")]
    Routing(#[source] kvm_ioctls::Error),
    /// A vector's irqfd cannot be created or registered.
    #[error("Cannot set up the irqfd of GSI {0}")]
    Irqfd(u32, #[source] io::Error),
}

/// The irqchip routes KVM installs by default, then an MSI route per entry of `msi`.
pub fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        entry.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
        entry
    };
    let mut entries = Vec::with_capacity((PIC_PINS + IOAPIC_PINS) as usize + msi.len());
    for gsi in 0..PIC_PINS {
        let (chip, pin) = match gsi {
            0..8 => (KVM_IRQCHIP_PIC_MASTER, gsi),
            _ => (KVM_IRQCHIP_PIC_SLAVE, gsi - 8),
        };
        entries.push(irqchip(gsi, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, message) in msi {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi = kvm_irq_routing_msi {
            address_lo: low_u32(message.address),
            address_hi: (message.address >> 32) as u32,
            data: message.data,
            ..Default::default()
        };
        entries.push(entry);
    }
    entries
}

#[derive(Debug)]
struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// The VM's GSI routing table.
#[derive(Debug)]
pub struct GsiRoutes {
    vm_fd: Arc<VmFd>,
    table: Mutex<Table>,
}

impl GsiRoutes {
    /// The routing of `vm_fd`, checked to take MSI routes: an error names the host's refusal
    /// (the VM then offers INTx only).
    pub fn new(vm_fd: Arc<VmFd>) -> Result<Self, MsiError> {
        let routes = Self {
            vm_fd,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        };
        let probe = BTreeMap::from([(IOAPIC_PINS, MsiMessage::default())]);
        routes.commit(&probe).map_err(MsiError::Routing)?;
        routes.commit(&BTreeMap::new()).map_err(MsiError::Routing)?;
        Ok(routes)
    }

    fn commit(&self, msi: &BTreeMap<u32, MsiMessage>) -> Result<(), kvm_ioctls::Error> {
        let routing = KvmIrqRouting::from_entries(&routing_entries(msi))
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.vm_fd.set_gsi_routing(&routing)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `count` GSIs of their own, the first returned.
    fn allocate(&self, count: u32) -> u32 {
        let mut table = self.lock();
        let first = table.next_gsi;
        table.next_gsi += count;
        first
    }

    /// Routes `gsi` to `message`, or removes its route.
    fn set(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        let mut table = self.lock();
        let previous = match message {
            Some(m) => table.msi.insert(gsi, m),
            None => table.msi.remove(&gsi),
        };
        if let Err(e) = self.commit(&table.msi) {
            // Keep the table as KVM has it.
            match previous {
                Some(m) => table.msi.insert(gsi, m),
                None => table.msi.remove(&gsi),
            };
            return Err(e.into());
        }
        Ok(())
    }
}

/// A PCI function's MSI-X vectors: consecutive GSIs, each with an irqfd.
#[derive(Debug)]
pub struct KvmMsiVectors {
    routes: Arc<GsiRoutes>,
    first_gsi: u32,
    irqfds: Vec<EventFd>,
}

impl KvmMsiVectors {
    /// `count` vectors, their irqfds registered (unrouted until the guest programs them).
    pub fn new(routes: Arc<GsiRoutes>, count: u16) -> Result<Self, MsiError> {
        let first_gsi = routes.allocate(u32::from(count));
        let mut irqfds = Vec::with_capacity(usize::from(count));
        for gsi in first_gsi..first_gsi + u32::from(count) {
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|e| MsiError::Irqfd(gsi, e))?;
            routes
                .vm_fd
                .register_irqfd(&irqfd, gsi)
                .map_err(|e| MsiError::Irqfd(gsi, e.into()))?;
            irqfds.push(irqfd);
        }
        Ok(Self {
            routes,
            first_gsi,
            irqfds,
        })
    }
}

impl MsiRouter for KvmMsiVectors {
    #[allow(clippy::cast_possible_truncation, reason = "made for a u16 count")]
    fn vector_count(&self) -> u16 {
        self.irqfds.len() as u16
    }

    fn route(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
        if usize::from(vector) >= self.irqfds.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.routes.set(self.first_gsi + u32::from(vector), message)
    }

    fn signal(&self, vector: u16) -> io::Result<()> {
        match self.irqfds.get(usize::from(vector)) {
            Some(irqfd) => irqfd.write(1),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_kvms_default_irqchip_routes_and_adds_msi_routes() {
        let msi = BTreeMap::from([(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        )]);
        let entries = routing_entries(&msi);
        assert_eq!(entries.len(), 16 + 24 + 1);
        // GSI 9 reaches the slave PIC's pin 1 and IOAPIC pin 9.
        let gsi9: Vec<_> = entries.iter().filter(|e| e.gsi == 9).collect();
        assert_eq!(gsi9.len(), 2);
        // SAFETY: irqchip entries carry the irqchip member.
        let (pic, ioapic) = unsafe { (gsi9[0].u.irqchip, gsi9[1].u.irqchip) };
        assert_eq!((pic.irqchip, pic.pin), (KVM_IRQCHIP_PIC_SLAVE, 1));
        assert_eq!((ioapic.irqchip, ioapic.pin), (KVM_IRQCHIP_IOAPIC, 9));
        // GSIs 16-23 reach the IOAPIC only.
        assert_eq!(entries.iter().filter(|e| e.gsi == 20).count(), 1);
        let last = entries.last().unwrap();
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the msi member.
        let m = unsafe { last.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }
}
