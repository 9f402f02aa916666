//! Where things live in the guest's physical address space (x86_64).
//!
//! Low memory follows the Linux boot protocol as other microVMs use it, with the ACPI tables in
//! the BIOS area; the 32-bit hole under 4 GiB holds the PCI BAR window, the virtio-mmio window,
//! the PCIe ECAM window, the IOAPIC, the local APIC and KVM's private pages. A second PCI BAR
//! window for 64-bit BARs lies above guest RAM ([`crate::memory::MemoryLayout::pci_mmio64`]).

/// The GDT the vCPUs start with.
pub const BOOT_GDT_START: u64 = 0x500;
/// A zero-length IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, up to the zero page.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four page directories (maps 4 GiB with 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// The first of four page directories.
pub const PDE_START: u64 = 0xb000;
/// How many page directories the identity map uses (one per GiB).
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux/x86 `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table lives at its start (Linux scans 639 KiB..640 KiB).
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI RSDP, where Linux also looks for it without a pointer (the BIOS read-only area);
/// the other ACPI tables follow it, up to [`BIOS_END`].
pub const ACPI_RSDP_START: u64 = 0xe_0000;
/// End of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: low RAM ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// The hole reaches up to 4 GiB.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// The PCI window for BARs below 4 GiB (every BAR rvmm assigns goes here).
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Its size: up to the virtio-mmio window.
pub const PCI_MMIO32_SIZE: u64 = 0x1000_0000;
/// Size of the 64-bit PCI window above RAM, for BARs a guest moves there.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// The PCIe enhanced configuration (ECAM) window of segment 0, bus 0.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// One bus: 32 devices of 8 functions of 4 KiB.
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// Reserved window for virtio-mmio devices, one 4 KiB page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of the virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x0100_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's identity-map page (needed on Intel; harmless elsewhere).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's TSS (three pages).
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// RAM that does not fit under the hole continues here.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// First interrupt line for virtio-mmio devices (0-4 are the PIT, keyboard, cascade, COM2,
/// COM1).
pub const VIRTIO_IRQ_FIRST: u32 = 5;
/// Last interrupt line: the IOAPIC has 24 pins.
pub const VIRTIO_IRQ_LAST: u32 = 23;
/// The GSIs of the PCI INTx lines: slot n's INTA# is `PCI_INTX_GSI_FIRST + (n - 1) % 8` (the
/// IOAPIC pins above the ISA interrupts; the PCI transport has no virtio-mmio devices).
pub const PCI_INTX_GSI_FIRST: u32 = 16;
/// How many GSIs the INTx lines share.
pub const PCI_INTX_GSI_COUNT: u32 = 8;
/// Size of one virtio-mmio device's register window.
pub const VIRTIO_MMIO_DEVICE_SIZE: u64 = 0x1000;

/// The MMIO window and interrupt line of the `index`th virtio device, if there is room.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    let irq = VIRTIO_IRQ_FIRST.checked_add(u32::try_from(index).ok()?)?;
    let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_DEVICE_SIZE;
    (irq <= VIRTIO_IRQ_LAST
        && base + VIRTIO_MMIO_DEVICE_SIZE <= VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE)
        .then_some((base, irq))
}

/// `addr` as the 32-bit field of a firmware table (MP table, MADT, DSDT resources): the
/// layout places everything such tables name below 4 GiB.
#[allow(
    clippy::cast_possible_truncation,
    reason = "the layout's addresses below 4 GiB"
)]
pub(crate) fn below_4g(addr: u64) -> u32 {
    debug_assert!(addr <= u64::from(u32::MAX));
    addr as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_are_consecutive_pages_with_their_own_irqs_until_the_pins_run_out() {
        assert_eq!(virtio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_slot(1), Some((0xd000_1000, 6)));
        assert_eq!(virtio_slot(18), Some((0xd001_2000, 23)));
        assert_eq!(virtio_slot(19), None);
        assert_eq!(virtio_slot(usize::MAX), None);
    }
}
