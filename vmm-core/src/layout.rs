//! Where things live in the guest's physical address space (x86_64).
//!
//! Low memory follows the Linux boot protocol as other microVMs use it; the 32-bit hole under
//! 4 GiB holds the virtio-mmio window, the IOAPIC, the local APIC and KVM's private pages.

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
/// End of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: low RAM ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// The hole reaches up to 4 GiB.
pub const MMIO_HOLE_END: u64 = 1 << 32;
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
