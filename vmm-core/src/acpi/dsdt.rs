//! The DSDT's AML: `\_S5` (the SLP_TYP of soft off), and under `\_SB` the serial port and the
//! i8042 (PNP devices Linux binds its drivers to), each virtio-mmio device (`LNRO0005`, how
//! Linux's virtio_mmio finds devices without command-line arguments), and the PCI host bridge
//! with its resources (bus 0, the configuration ports, the BAR windows) and a static `_PRT` for
//! INTx. Only named data objects: no methods, no loops.

use acpi_tables::Aml;
use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Interrupt, Memory32Fixed, Name,
    Package, Path, ResourceTemplate, Scope,
};
use rvmm_devices::legacy::{
    COM1_IRQ, COM1_PORT_BASE, I8042_KBD_IRQ, I8042_PORT_BASE, SERIAL_PORT_LEN, SLP_TYP_S5,
};

use super::{AcpiPlatform, PciHostBridge, VirtioMmioDevice};
use crate::layout::below_4g;
use crate::pci::access::{CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN};

/// An interrupt the device consumes: edge-triggered, active high, not shared (every interrupt
/// rvmm raises comes from an irqfd, i.e. as an edge).
fn edge_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

fn name(path: &str, value: &dyn Aml) -> Name {
    Name::new(Path::new(path), value)
}

/// Appends `device` to `aml`.
fn device(aml: &mut Vec<u8>, path: &str, children: &[&dyn Aml]) {
    Device::new(Path::new(path), children.to_vec()).to_aml_bytes(aml);
}

/// A port constant (the port space is 16 bits) or a length within a port block.
#[allow(
    clippy::cast_possible_truncation,
    reason = "legacy port constants below 0x1000"
)]
fn port(x: u64) -> u16 {
    debug_assert!(x <= 0xffff);
    x as u16
}

/// The length byte of an `IO` descriptor.
#[allow(clippy::cast_possible_truncation, reason = "port blocks of 8 bytes")]
fn port_len(x: u64) -> u8 {
    debug_assert!(x <= 0xff);
    x as u8
}

fn serial_and_keyboard(aml: &mut Vec<u8>) {
    let port_base = port(COM1_PORT_BASE);
    let ports = IO::new(port_base, port_base, 1, port_len(SERIAL_PORT_LEN));
    let irq = edge_interrupt(COM1_IRQ);
    let com1 = ResourceTemplate::new(vec![&ports, &irq]);
    device(
        aml,
        "COM1",
        &[
            &name("_HID", &EISAName::new("PNP0501")),
            &name("_UID", &1u8),
            &name("_CRS", &com1),
        ],
    );
    // The i8042 decodes its data port and its command/status port.
    let data = port(I8042_PORT_BASE);
    let command = data + 4;
    let data_port = IO::new(data, data, 1, 1);
    let command_port = IO::new(command, command, 1, 1);
    let irq = edge_interrupt(I8042_KBD_IRQ);
    let keyboard = ResourceTemplate::new(vec![&data_port, &command_port, &irq]);
    device(
        aml,
        "PS2K",
        &[
            &name("_HID", &EISAName::new("PNP0303")),
            &name("_CRS", &keyboard),
        ],
    );
}

fn virtio_mmio(aml: &mut Vec<u8>, index: usize, dev: &VirtioMmioDevice) {
    let window = Memory32Fixed::new(true, below_4g(dev.base), below_4g(dev.size));
    let irq = edge_interrupt(dev.irq);
    let resources = ResourceTemplate::new(vec![&window, &irq]);
    device(
        aml,
        &format!("VR{index:02X}"),
        &[
            &name("_HID", &"LNRO0005"),
            &name("_UID", &u32::try_from(index).unwrap_or(u32::MAX)),
            &name("_CRS", &resources),
        ],
    );
}

fn pci_host_bridge(aml: &mut Vec<u8>, pci: &PciHostBridge) {
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let ports = IO::new(
        port(CONFIG_ADDRESS_PORT),
        port(CONFIG_ADDRESS_PORT),
        1,
        port_len(CONFIG_PORTS_LEN),
    );
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        below_4g(pci.mmio32.start),
        below_4g(pci.mmio32.end - 1),
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio64.start,
        pci.mmio64.end - 1,
        None,
    );
    let resources = ResourceTemplate::new(vec![&bus, &ports, &mmio32, &mmio64]);
    // _PRT: (slot << 16 | 0xffff, INTA# = pin 0, source 0 = a GSI, the GSI).
    let entries: Vec<(u32, u32)> = pci
        .intx
        .iter()
        .map(|&(slot, gsi)| (u32::from(slot) << 16 | 0xffff, gsi))
        .collect();
    let routes: Vec<Package> = entries
        .iter()
        .map(|(address, gsi)| Package::new(vec![address, &0u8, &0u8, gsi]))
        .collect();
    let prt = Package::new(routes.iter().map(|r| r as &dyn Aml).collect());
    device(
        aml,
        "PCI0",
        &[
            &name("_HID", &EISAName::new("PNP0A08")),
            &name("_CID", &EISAName::new("PNP0A03")),
            &name("_ADR", &0u8),
            &name("_SEG", &0u8),
            &name("_UID", &0u8),
            &name("_CRS", &resources),
            &name("_PRT", &prt),
        ],
    );
}

/// The DSDT's definition blocks for `platform`.
pub(super) fn body(platform: &AcpiPlatform) -> Vec<u8> {
    let mut aml = Vec::new();
    // SLP_TYPa and SLP_TYPb of S5, then two reserved fields.
    #[allow(clippy::cast_possible_truncation, reason = "S5's SLP_TYP is 5")]
    let s5 = SLP_TYP_S5 as u8;
    name("\\_S5_", &Package::new(vec![&s5, &s5, &0u8, &0u8])).to_aml_bytes(&mut aml);
    let mut devices = Vec::new();
    serial_and_keyboard(&mut devices);
    for (index, dev) in platform.virtio_mmio.iter().enumerate() {
        virtio_mmio(&mut devices, index, dev);
    }
    if let Some(pci) = &platform.pci {
        pci_host_bridge(&mut devices, pci);
    }
    Scope::new(Path::new("\\_SB_"), vec![&RawAml(devices)]).to_aml_bytes(&mut aml);
    aml
}

/// AML already encoded.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}
