//! Devices an embedder brings: a port I/O or MMIO device ([`BusDevice`]) at an address range it
//! chooses, with an optional interrupt line, and virtio devices ([`VirtioDevice`]) on the VM's
//! transport; the rules are in the [`builder`](super) module's documentation.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use rvmm_devices::legacy::{
    ACPI_PM_PORT_BASE, ACPI_PM_PORT_LEN, COM1_PORT_BASE, I8042_PORT_BASE, I8042_PORT_LEN, SCI_IRQ,
    SERIAL_PORT_LEN,
};
use rvmm_devices::virtio::VirtioDevice;
use rvmm_devices::{BusDevice, EventFdTrigger};

use super::{BuildError, Placement};
use crate::bus::Bus;
use crate::layout::{
    APIC_START, IOAPIC_START, KVM_IDENTITY_MAP_START, MMIO_HOLE_END, PCI_ECAM_SIZE, PCI_ECAM_START,
    PCI_INTX_GSI_COUNT, PCI_INTX_GSI_FIRST, PCI_MMIO32_SIZE, PCI_MMIO32_START, VIRTIO_IRQ_FIRST,
    VIRTIO_IRQ_LAST, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::memory::MemoryLayout;
use crate::pci::access::{CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN};

/// What an embedder's factory returns when it cannot make its device (reported in
/// [`BuildError::CustomDevice`] with the device's name).
pub type FactoryError = Box<dyn std::error::Error + Send + Sync>;

/// Makes a bus device for a new VM, given its interrupt line when one was asked for.
type BusFactory = Arc<
    dyn Fn(Option<DeviceInterrupt>) -> Result<Arc<Mutex<dyn BusDevice>>, FactoryError>
        + Send
        + Sync,
>;
/// Makes a virtio device for a new VM.
type VirtioFactory = Arc<dyn Fn() -> Result<Box<dyn VirtioDevice>, FactoryError> + Send + Sync>;

/// The address space a bus device lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// x86 port I/O (`in`/`out`), ports 0 to 0xffff.
    Pio,
    /// Guest-physical MMIO.
    Mmio,
}

impl AddressSpace {
    /// The address space's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pio => "port I/O",
            Self::Mmio => "MMIO",
        }
    }
}

/// An interrupt line the builder wired for an embedder's device: triggering it raises the
/// line's GSI in the guest (an irqfd, so edge-triggered: one trigger, one interrupt).
#[derive(Debug)]
pub struct DeviceInterrupt {
    /// The IOAPIC pin the line raises (the guest's driver must know it).
    pub gsi: u32,
    /// Raises the interrupt ([`rvmm_devices::Trigger::trigger`]).
    pub trigger: EventFdTrigger,
}

/// An embedder's port I/O or MMIO device: where it sits and how to make it.
///
/// ```
/// use rvmm_core::CustomDevice;
/// use rvmm_devices::BusDevice;
///
/// /// Reads back the last byte written.
/// #[derive(Default)]
/// struct Latch(u8);
///
/// impl BusDevice for Latch {
///     fn read(&mut self, _offset: u64, data: &mut [u8]) {
///         data.fill(self.0);
///     }
///     fn write(&mut self, _offset: u64, data: &[u8]) {
///         self.0 = data.first().copied().unwrap_or(0);
///     }
/// }
///
/// let latch = CustomDevice::pio("latch", 0x700, 1, |_irq| Ok(Latch::default()));
/// assert_eq!(latch.range(), 0x700..0x701);
/// ```
#[derive(Clone)]
pub struct CustomDevice {
    name: String,
    space: AddressSpace,
    base: u64,
    len: u64,
    interrupt: bool,
    factory: BusFactory,
}

impl fmt::Debug for CustomDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomDevice")
            .field("name", &self.name)
            .field("space", &self.space)
            .field("range", &self.range())
            .field("interrupt", &self.interrupt)
            .finish_non_exhaustive()
    }
}

impl CustomDevice {
    /// A device on ports `base..base + len`, made by `factory` at every build.
    pub fn pio<D, F>(name: impl Into<String>, base: u16, len: u16, factory: F) -> Self
    where
        D: BusDevice + 'static,
        F: Fn(Option<DeviceInterrupt>) -> Result<D, FactoryError> + Send + Sync + 'static,
    {
        Self::new(
            name.into(),
            AddressSpace::Pio,
            u64::from(base),
            u64::from(len),
            factory,
        )
    }

    /// A device on guest-physical addresses `base..base + len`, made by `factory` at every
    /// build. Free for such devices: `0xd100_0000..0xe000_0000` and `0xe010_0000..0xfec0_0000`
    /// under 4 GiB, and everything above the 64-bit PCI window (see [`crate::layout`]).
    pub fn mmio<D, F>(name: impl Into<String>, base: u64, len: u64, factory: F) -> Self
    where
        D: BusDevice + 'static,
        F: Fn(Option<DeviceInterrupt>) -> Result<D, FactoryError> + Send + Sync + 'static,
    {
        Self::new(name.into(), AddressSpace::Mmio, base, len, factory)
    }

    fn new<D, F>(name: String, space: AddressSpace, base: u64, len: u64, factory: F) -> Self
    where
        D: BusDevice + 'static,
        F: Fn(Option<DeviceInterrupt>) -> Result<D, FactoryError> + Send + Sync + 'static,
    {
        let factory: BusFactory = Arc::new(move |irq| {
            let device = factory(irq)?;
            Ok(Arc::new(Mutex::new(device)) as Arc<Mutex<dyn BusDevice>>)
        });
        Self {
            name,
            space,
            base,
            len,
            interrupt: false,
            factory,
        }
    }

    /// Gives the device an interrupt line: the builder picks a free IOAPIC pin, wires an
    /// eventfd to it and hands both to the factory ([`DeviceInterrupt`]).
    pub fn with_interrupt(mut self) -> Self {
        self.interrupt = true;
        self
    }

    /// The device's name, in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it asked for an interrupt line ([`CustomDevice::with_interrupt`]).
    pub fn wants_interrupt(&self) -> bool {
        self.interrupt
    }

    /// Its address space.
    pub fn space(&self) -> AddressSpace {
        self.space
    }

    /// The addresses it claims (empty or saturated when the range is invalid; the build
    /// refuses those).
    pub fn range(&self) -> Range<u64> {
        self.base..self.base.saturating_add(self.len)
    }
}

/// An embedder's virtio device, on the VM's transport after rvmm's own devices (disks,
/// interfaces, the entropy device), so its virtio-mmio slot or PCI slot follows theirs.
#[derive(Clone)]
pub struct CustomVirtioDevice {
    name: String,
    factory: VirtioFactory,
}

impl fmt::Debug for CustomVirtioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomVirtioDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CustomVirtioDevice {
    /// A virtio device made by `factory` at every build.
    pub fn new<D, F>(name: impl Into<String>, factory: F) -> Self
    where
        D: VirtioDevice + 'static,
        F: Fn() -> Result<D, FactoryError> + Send + Sync + 'static,
    {
        Self {
            name: name.into(),
            factory: Arc::new(move || Ok(Box::new(factory()?) as Box<dyn VirtioDevice>)),
        }
    }

    /// The device's name, in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the device.
    pub(super) fn create(&self) -> Result<Box<dyn VirtioDevice>, BuildError> {
        (self.factory)().map_err(|source| BuildError::CustomDevice {
            name: self.name.clone(),
            source,
        })
    }
}

/// The embedder's devices of a VM.
#[derive(Clone, Debug, Default)]
pub(crate) struct CustomDevices {
    pub(crate) bus: Vec<CustomDevice>,
    pub(crate) virtio: Vec<CustomVirtioDevice>,
}

impl CustomDevices {
    /// The devices' names, for the snapshot's refusal.
    pub(crate) fn names(&self) -> Vec<String> {
        let bus = self.bus.iter().map(|d| d.name.clone());
        bus.chain(self.virtio.iter().map(|d| d.name.clone()))
            .collect()
    }
}

/// What rvmm itself uses of port I/O: its devices and those KVM emulates in the kernel (where
/// a device of the embedder would never see an access).
const RESERVED_PORTS: [(&str, u64, u64); 8] = [
    ("PIC (in KVM)", 0x20, 2),
    ("PIT (in KVM)", 0x40, 4),
    ("i8042", I8042_PORT_BASE, I8042_PORT_LEN),
    ("PIC (in KVM)", 0xa0, 2),
    ("COM1 serial port", COM1_PORT_BASE, SERIAL_PORT_LEN),
    ("ELCR (in KVM)", 0x4d0, 2),
    ("ACPI power management", ACPI_PM_PORT_BASE, ACPI_PM_PORT_LEN),
    (
        "PCI configuration ports",
        CONFIG_ADDRESS_PORT,
        CONFIG_PORTS_LEN,
    ),
];

/// What rvmm itself uses of the guest-physical address space with memory `layout`.
fn reserved_mmio(layout: &MemoryLayout) -> Vec<(&'static str, Range<u64>)> {
    let (pci64, pci64_size) = layout.pci_mmio64();
    let mut reserved: Vec<(&'static str, Range<u64>)> = layout
        .ram_regions()
        .into_iter()
        .map(|(start, len)| ("guest RAM", start.0..start.0 + len))
        .collect();
    reserved.extend([
        (
            "PCI 32-bit window",
            PCI_MMIO32_START..PCI_MMIO32_START + PCI_MMIO32_SIZE,
        ),
        (
            "virtio-mmio window",
            VIRTIO_MMIO_START..VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE,
        ),
        (
            "PCI ECAM window",
            PCI_ECAM_START..PCI_ECAM_START + PCI_ECAM_SIZE,
        ),
        ("IOAPIC", IOAPIC_START..IOAPIC_START + 0x1000),
        ("local APIC", APIC_START..APIC_START + 0x10_0000),
        (
            "KVM's TSS and identity map",
            KVM_IDENTITY_MAP_START..MMIO_HOLE_END,
        ),
        ("PCI 64-bit window", pci64..pci64 + pci64_size),
    ]);
    debug_assert!(reserved.iter().all(|(_, r)| r.start < r.end));
    reserved
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Refuses a device range that is empty, wraps, leaves port space, or overlaps rvmm's devices,
/// its windows, guest RAM or another embedder device.
pub(crate) fn check_ranges(
    layout: &MemoryLayout,
    devices: &[CustomDevice],
) -> Result<(), BuildError> {
    let mmio = reserved_mmio(layout);
    let ports: Vec<(&str, Range<u64>)> = RESERVED_PORTS
        .iter()
        .map(|&(owner, base, len)| (owner, base..base + len))
        .collect();
    for (index, device) in devices.iter().enumerate() {
        let limit = match device.space {
            AddressSpace::Pio => 0x1_0000,
            AddressSpace::Mmio => u64::MAX,
        };
        let valid = device.len > 0
            && device
                .base
                .checked_add(device.len)
                .is_some_and(|end| end <= limit);
        let refuse = |owner: String| BuildError::ReservedRange {
            name: device.name.clone(),
            space: device.space.name(),
            base: device.base,
            len: device.len,
            owner,
        };
        if !valid {
            return Err(refuse("nothing (the range is empty or too large)".into()));
        }
        let range = device.range();
        let reserved = match device.space {
            AddressSpace::Pio => &ports,
            AddressSpace::Mmio => &mmio,
        };
        if let Some((owner, r)) = reserved.iter().find(|(_, r)| overlaps(r, &range)) {
            return Err(refuse(format!("{owner} at {:#x}..{:#x}", r.start, r.end)));
        }
        let earlier = devices[..index]
            .iter()
            .find(|d| d.space == device.space && overlaps(&d.range(), &range));
        if let Some(other) = earlier {
            let r = other.range();
            return Err(refuse(format!(
                "device {} at {:#x}..{:#x}",
                other.name, r.start, r.end
            )));
        }
    }
    Ok(())
}

/// The GSIs for `count` device interrupts: the highest IOAPIC pins (of 5 to 23) that neither
/// the virtio devices in `placement` nor the SCI (with `acpi`) use.
pub(crate) fn interrupt_gsis(
    placement: &Placement,
    acpi: bool,
    count: usize,
) -> Result<Vec<u32>, BuildError> {
    let used = |gsi: u32| match placement {
        Placement::Mmio(slots) => slots.iter().any(|&(_, irq)| irq == gsi),
        Placement::Pci(_) => {
            (PCI_INTX_GSI_FIRST..PCI_INTX_GSI_FIRST + PCI_INTX_GSI_COUNT).contains(&gsi)
        }
    };
    let taken = |gsi: u32| used(gsi) || (acpi && gsi == SCI_IRQ);
    let free: Vec<u32> = (VIRTIO_IRQ_FIRST..=VIRTIO_IRQ_LAST)
        .rev()
        .filter(|&gsi| !taken(gsi))
        .take(count)
        .collect();
    match free.len() == count {
        true => Ok(free),
        false => Err(BuildError::NoFreeInterrupt { wanted: count }),
    }
}

/// Makes the embedder's bus devices, wires their interrupts to `gsis` (in order, for the
/// devices that asked for one) and puts them on the buses.
pub(crate) fn attach_custom_devices(
    vm_fd: &VmFd,
    (pio, mmio): (&mut Bus, &mut Bus),
    devices: &[CustomDevice],
    gsis: &[u32],
) -> Result<(), BuildError> {
    let mut gsis = gsis.iter().copied();
    for device in devices {
        let irq = match device.interrupt {
            true => {
                let gsi = gsis.next().ok_or(BuildError::NoFreeInterrupt {
                    wanted: devices.iter().filter(|d| d.interrupt).count(),
                })?;
                let trigger = EventFdTrigger::new().map_err(|e| BuildError::Irq("custom", e))?;
                vm_fd
                    .register_irqfd(&trigger, gsi)
                    .map_err(|e| BuildError::Irq("custom", e.into()))?;
                Some(DeviceInterrupt { gsi, trigger })
            }
            false => None,
        };
        let shared = (device.factory)(irq).map_err(|source| BuildError::CustomDevice {
            name: device.name.clone(),
            source,
        })?;
        let bus = match device.space {
            AddressSpace::Pio => &mut *pio,
            AddressSpace::Mmio => &mut *mmio,
        };
        bus.insert(device.base, device.len, shared)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{Transport, place};

    struct Nothing;

    impl BusDevice for Nothing {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    fn pio(name: &str, base: u16, len: u16) -> CustomDevice {
        CustomDevice::pio(name, base, len, |_| Ok(Nothing))
    }

    fn mmio(name: &str, base: u64, len: u64) -> CustomDevice {
        CustomDevice::mmio(name, base, len, |_| Ok(Nothing))
    }

    fn refusal(devices: &[CustomDevice]) -> String {
        let layout = MemoryLayout::new(256 << 20).unwrap();
        check_ranges(&layout, devices).unwrap_err().to_string()
    }

    #[test]
    fn ranges_clear_of_rvmm_and_each_other_are_accepted() {
        let layout = MemoryLayout::new(256 << 20).unwrap();
        let devices = [
            pio("a", 0x700, 8),
            pio("b", 0x708, 8),
            mmio("c", 0xd100_0000, 0x1000),
            mmio("d", 0xe010_0000, 0x1000),
            mmio("e", 100 << 30, 0x1000),
        ];
        check_ranges(&layout, &devices).unwrap();
    }

    #[test]
    fn a_range_over_rvmm_devices_is_refused_naming_both() {
        assert_eq!(
            refusal(&[pio("uart", 0x3f8, 1)]),
            "Device uart: port I/O range 0x3f8+0x1 overlaps COM1 serial port at 0x3f8..0x400"
        );
        assert!(refusal(&[pio("pci", 0xcfc, 4)]).contains("PCI configuration ports"));
        assert!(refusal(&[mmio("low", 0x10_0000, 4)]).contains("guest RAM at 0x0..0x10000000"));
        assert!(refusal(&[mmio("v", 0xd000_1000, 4)]).contains("virtio-mmio window"));
        assert!(refusal(&[mmio("io", 0xfec0_0000, 4)]).contains("IOAPIC"));
        assert!(refusal(&[mmio("hi", 5 << 30, 4)]).contains("PCI 64-bit window"));
    }

    #[test]
    fn empty_wrapping_and_overlapping_embedder_ranges_are_refused() {
        assert!(refusal(&[pio("zero", 0x700, 0)]).contains("empty or too large"));
        assert!(refusal(&[pio("end", 0xffff, 2)]).contains("empty or too large"));
        assert!(refusal(&[mmio("wrap", u64::MAX, 2)]).contains("empty or too large"));
        assert_eq!(
            refusal(&[pio("a", 0x700, 8), pio("b", 0x707, 2)]),
            "Device b: port I/O range 0x707+0x2 overlaps device a at 0x700..0x708"
        );
        // The same addresses in the other address space do not collide.
        let layout = MemoryLayout::new(256 << 20).unwrap();
        let devices = [pio("p", 0x700, 8), mmio("m", 0xd100_0700, 8)];
        check_ranges(&layout, &devices).unwrap();
    }

    #[test]
    fn interrupts_take_the_highest_pins_the_virtio_devices_and_sci_leave() {
        let mmio = place(Transport::Mmio, 2).unwrap();
        assert_eq!(interrupt_gsis(&mmio, true, 2).unwrap(), vec![23, 22]);
        let pci = place(Transport::Pci, 2).unwrap();
        assert_eq!(interrupt_gsis(&pci, true, 3).unwrap(), vec![15, 14, 13]);
        let all = interrupt_gsis(&pci, true, 10).unwrap();
        assert!(!all.contains(&SCI_IRQ));
        assert!(matches!(
            interrupt_gsis(&pci, true, 11),
            Err(BuildError::NoFreeInterrupt { wanted: 11 })
        ));
        let full = place(Transport::Mmio, 19).unwrap();
        assert!(interrupt_gsis(&full, false, 1).is_err());
    }
}
