//! The Intel MultiProcessor Specification 1.4 table, so a guest without ACPI finds every vCPU,
//! the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START, below_4g};
use crate::memory::GuestMemoryMmap;

/// The most vCPUs whose entries fit in the 1 KiB the table has in the EBDA.
pub const MAX_VCPUS: u8 = 32;

/// IOAPIC pins routed: the ISA IRQs and 16..23, which virtio-mmio devices use.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table has room for.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    /// No vCPUs.
    #[error("The MP table needs at least one vCPU")]
    NoCpus,
    /// The table would lie where its 32-bit pointer cannot reach.
    #[error("The MP table at {0:#x} lies above 4 GiB")]
    AboveFourGiB(u64),
    /// Guest memory write failed.
    #[error("Cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `cpus` vCPUs when placed at `base`: the floating pointer, then the
/// configuration table it points to.
pub fn mptable_bytes(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        // Signature: family 6; features: FPU and APIC.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&below_4g(IOAPIC_START).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // Bus IRQ n → IOAPIC pin n, conforming polarity and trigger (edge, active high).
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 is the 8259's ExtINT, LINT1 the NMI, on every local APIC.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = base + FLOATING_LEN as u64;
    let table_pointer = u32::try_from(table_addr).map_err(|_| MptableError::AboveFourGiB(base))?;
    #[allow(clippy::cast_possible_truncation, reason = "at most MAX_VCPUS entries")]
    let table_len = (HEADER_LEN + entries.len()) as u16;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.extend_from_slice(&[SPEC_REV, 0]); // checksum patched below
    header.extend_from_slice(b"RVMM    ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&below_4g(APIC_START).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_pointer.to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` vCPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = mptable_bytes(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, reason = "test values")]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn a_table_above_4_gib_is_refused_not_pointed_to_by_its_low_bits() {
        assert!(matches!(
            mptable_bytes(1, 1 << 32),
            Err(MptableError::AboveFourGiB(0x1_0000_0000))
        ));
    }

    #[test]
    fn floating_pointer_and_table_checksums_are_valid() {
        let bytes = mptable_bytes(4, EBDA_START).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[0..16]), 0);
        assert_eq!(u32_at(&bytes, 4) as u64, EBDA_START + 16);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16_at(table, 4) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        assert_eq!(u32_at(table, 36) as u64, APIC_START);
    }

    #[test]
    fn every_vcpu_has_an_enabled_processor_entry_and_only_the_first_is_bsp() {
        let bytes = mptable_bytes(3, EBDA_START).unwrap();
        let table = &bytes[16..];
        let count = u16_at(table, 34) as usize;
        let mut off = 44;
        let mut cpus = Vec::new();
        let mut ioapics = 0;
        let mut intsrcs = 0;
        for _ in 0..count {
            match table[off] {
                MP_PROCESSOR => {
                    cpus.push((table[off + 1], table[off + 3]));
                    off += 20;
                }
                MP_IOAPIC => {
                    ioapics += 1;
                    assert_eq!(u32_at(table, off + 4) as u64, IOAPIC_START);
                    off += 8;
                }
                MP_INTSRC => {
                    intsrcs += 1;
                    off += 8;
                }
                _ => off += 8,
            }
        }
        assert_eq!(off, table.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
        assert_eq!(ioapics, 1);
        assert_eq!(intsrcs, 24);
    }

    #[test]
    fn largest_table_fits_in_the_ebda() {
        let bytes = mptable_bytes(MAX_VCPUS, EBDA_START).unwrap();
        // The EBDA ends at 640 KiB, where the VGA hole starts.
        assert!(EBDA_START + bytes.len() as u64 <= 0xa0000);
    }

    #[test]
    fn zero_or_too_many_vcpus_are_rejected() {
        assert!(matches!(
            mptable_bytes(0, EBDA_START),
            Err(MptableError::NoCpus)
        ));
        assert!(matches!(
            mptable_bytes(MAX_VCPUS + 1, EBDA_START),
            Err(MptableError::TooManyCpus(33))
        ));
    }
}
