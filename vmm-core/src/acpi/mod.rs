//! The ACPI tables a guest reads at boot (ACPI 6.5 §5.2), built with rust-vmm's `acpi_tables`
//! and written to the BIOS area from [`ACPI_RSDP_START`]: RSDP → XSDT → FADT (→ FACS, DSDT),
//! MADT, and MCFG when the VM has PCI.
//!
//! The platform they describe is a full (not hardware-reduced) ACPI machine, as a PC's firmware
//! presents it: the PM1a blocks and reset register of [`rvmm_devices::legacy::AcpiPm`] (the power
//! button is a fixed event, S5 the only sleep state), the SCI on IRQ 9 made edge-triggered by
//! an interrupt source override (so an irqfd raises it), the IOAPIC and a local APIC per vCPU,
//! the i8042, and no CMOS RTC or VGA. The DSDT (module `dsdt`) is static data, no loops: AML runs
//! slowly on hosts that emulate the guest's instructions.

mod dsdt;

use std::ops::Range;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use rvmm_devices::legacy::{
    PM1_CONTROL_LEN, PM1_CONTROL_PORT, PM1_EVENT_LEN, PM1_EVENT_PORT, RESET_PORT, RESET_VALUE,
    SCI_IRQ,
};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{ACPI_RSDP_START, APIC_START, BIOS_END, IOAPIC_START, below_4g};
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"RVMM  ";
const OEM_REVISION: u32 = 1;
/// The FADT's IA-PC boot architecture flags: an i8042 is present (Linux drives it then), no VGA,
/// ASPM not the OS's to control, no CMOS RTC.
const IAPC_BOOT_ARCH: u16 = (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5);
/// MADT interrupt source override flags: active high, edge-triggered.
const ACTIVE_HIGH_EDGE: u16 = 0b0101;

/// The PCI host bridge as the DSDT and MCFG describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHostBridge {
    /// The ECAM window of bus 0.
    pub ecam: u64,
    /// The window for 32-bit BARs.
    pub mmio32: Range<u64>,
    /// The window for 64-bit BARs.
    pub mmio64: Range<u64>,
    /// Each occupied slot and the GSI of its INTA#.
    pub intx: Vec<(u8, u32)>,
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Register window.
    pub base: u64,
    /// Its size.
    pub size: u64,
    /// Interrupt line (GSI), edge-triggered.
    pub irq: u32,
}

/// What the tables describe beyond the fixed platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiPlatform {
    /// vCPUs (APIC IDs 0..vcpus).
    pub vcpus: u8,
    /// The PCI host bridge, with `--transport pci`.
    pub pci: Option<PciHostBridge>,
    /// The virtio-mmio devices, with `--transport mmio`.
    pub virtio_mmio: Vec<VirtioMmioDevice>,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the BIOS area.
    #[error("The ACPI tables need {needed} bytes, {room} are free")]
    TooLarge {
        /// Bytes the tables take.
        needed: u64,
        /// Bytes available.
        room: u64,
    },
    /// Guest memory rejected a table.
    #[error("Cannot write the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// MADT interrupt source override (ACPI 6.5 §5.2.12.5), which `acpi_tables` does not have.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

impl InterruptSourceOverride {
    fn new(source: u8, gsi: u32, flags: u16) -> Self {
        Self {
            kind: 2,
            length: 10,
            bus: 0, // ISA
            source,
            gsi: gsi.into(),
            flags: flags.into(),
        }
    }
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// Places tables one after the other from just past the RSDP, each aligned as ACPI wants.
struct Placement {
    next: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

impl Placement {
    fn add(&mut self, table: Vec<u8>, align: u64) -> u64 {
        let addr = self.next.next_multiple_of(align);
        self.next = addr + table.len() as u64;
        self.tables.push((addr, table));
        addr
    }
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"RVMMFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        // The power button is the fixed event (flag clear); there is no sleep button.
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .flag(Flags::Wbinvd);
    #[allow(clippy::cast_possible_truncation, reason = "IRQ 9")]
    let sci = SCI_IRQ as u16;
    fadt.sci_int = sci.into();
    // No SMI command port: the platform is in ACPI mode from the start (SCI_EN reads 1).
    fadt.pm1a_evt_blk = u32::from(PM1_EVENT_PORT).into();
    fadt.pm1_evt_len = PM1_EVENT_LEN;
    fadt.x_pm1a_evt_blk = io_register(PM1_EVENT_PORT, PM1_EVENT_LEN);
    fadt.pm1a_cnt_blk = u32::from(PM1_CONTROL_PORT).into();
    fadt.pm1_cnt_len = PM1_CONTROL_LEN;
    fadt.x_pm1a_cnt_blk = io_register(PM1_CONTROL_PORT, PM1_CONTROL_LEN);
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(RESET_PORT),
    );
    fadt.reset_value = RESET_VALUE;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    bytes(&fadt.finalize())
}

fn io_register(port: u16, len: u8) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        len * 8,
        0,
        AccessSize::WordAccess,
        u64::from(port),
    )
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"RVMMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(below_4g(APIC_START)),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The same IOAPIC ID as the MP table's.
    madt.add_structure(IoApic::new(vcpus, below_4g(IOAPIC_START), 0));
    #[allow(clippy::cast_possible_truncation, reason = "IRQ 9")]
    let sci_source = SCI_IRQ as u8;
    madt.add_structure(InterruptSourceOverride::new(
        sci_source,
        SCI_IRQ,
        ACTIVE_HIGH_EDGE,
    ));
    bytes(&madt)
}

/// Writes the tables for `platform` and returns the RSDP's address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, platform: &AcpiPlatform) -> Result<u64, AcpiError> {
    let mut placement = Placement {
        next: ACPI_RSDP_START + Rsdp::len() as u64,
        tables: Vec::new(),
    };
    // The FACS must be 64-byte aligned; the others 8 (for the 64-bit pointers to them).
    let facs = placement.add(bytes(&acpi_tables::facs::FACS::new()), 64);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"RVMMDSDT", OEM_REVISION);
    dsdt.append_slice(&dsdt::body(platform));
    let dsdt = placement.add(dsdt.as_slice().to_vec(), 8);
    let mut xsdt = XSDT::new(OEM_ID, *b"RVMMXSDT", OEM_REVISION);
    xsdt.add_entry(placement.add(fadt(dsdt, facs), 8));
    xsdt.add_entry(placement.add(madt(platform.vcpus), 8));
    if let Some(pci) = &platform.pci {
        let mut mcfg = MCFG::new(OEM_ID, *b"RVMMMCFG", OEM_REVISION);
        mcfg.add_ecam(pci.ecam, 0, 0, 0);
        xsdt.add_entry(placement.add(bytes(&mcfg), 8));
    }
    let xsdt = placement.add(bytes(&xsdt), 8);
    if placement.next > BIOS_END {
        return Err(AcpiError::TooLarge {
            needed: placement.next - ACPI_RSDP_START,
            room: BIOS_END - ACPI_RSDP_START,
        });
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt));
    placement.tables.push((ACPI_RSDP_START, rsdp));
    for (addr, table) in &placement.tables {
        mem.write_slice(table, GuestAddress(*addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(ACPI_RSDP_START)
}

#[cfg(test)]
mod tests;
