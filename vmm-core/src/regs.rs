//! The state vCPU 0 starts in: GDT, identity page tables, segment and control registers for the
//! Linux 64-bit entry or the PVH 32-bit entry. Pure functions: tests compare the results.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_COUNT, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How vCPU 0 enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// The Linux 64-bit boot protocol: long mode, `rsi` = zero page.
    Linux64(GuestAddress),
    /// The PVH boot protocol: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh(GuestAddress),
}

/// Errors writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables failed.
    #[error("Cannot write the boot {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// Encodes a GDT descriptor from its flags (access byte and granularity nibble), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
}

/// The KVM segment a descriptor at GDT index `index` describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    #[allow(clippy::cast_possible_truncation, reason = "a 20-bit limit")]
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        padding: 0,
        unusable: if bit(47) == 1 { 0 } else { 1 },
    }
}

/// The GDT for an entry: null, code, data, TSS.
pub fn boot_gdt(entry: BootEntry) -> [u64; 4] {
    match entry {
        BootEntry::Linux64(_) => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        BootEntry::Pvh(_) => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit flat code
            gdt_entry(0xc093, 0, 0xfffff), // flat data
            gdt_entry(0x008b, 0, 0x67),    // TSS
        ],
    }
}

/// Page-table words: PML4 → one PDPT → four directories of 2 MiB pages mapping 0..4 GiB.
pub fn identity_page_tables() -> Vec<(u64, u64)> {
    let mut words = vec![(PML4_START, PDPTE_START | 0x3)];
    for dir in 0..PDE_COUNT {
        let pd = PDE_START + dir * 0x1000;
        words.push((PDPTE_START + dir * 8, pd | 0x3));
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            words.push((pd + i * 8, ((dir * 512 + i) << 21) | 0x83));
        }
    }
    words
}

/// Writes the GDT, an empty IDT and (for the 64-bit entry) the identity page tables.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: BootEntry) -> Result<(), RegsError> {
    for (i, desc) in boot_gdt(entry).iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|e| RegsError::Write("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| RegsError::Write("IDT", e))?;
    if let BootEntry::Linux64(_) = entry {
        for (addr, word) in identity_page_tables() {
            mem.write_obj(word, GuestAddress(addr))
                .map_err(|e| RegsError::Write("page tables", e))?;
        }
    }
    Ok(())
}

/// vCPU 0's special registers for `entry`, starting from KVM's defaults in `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: BootEntry) -> kvm_sregs {
    let gdt = boot_gdt(entry);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    #[allow(clippy::cast_possible_truncation, reason = "a 4-entry GDT")]
    let gdt_limit = (gdt.len() * 8 - 1) as u16;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        BootEntry::Linux64(_) => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
        }
    }
    sregs
}

/// vCPU 0's general registers for `entry`.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64(ip) => {
            regs.rip = ip.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootEntry::Pvh(ip) => {
            regs.rip = ip.0;
            regs.rbx = PVH_INFO_START;
        }
    }
    regs
}

/// The FPU state at reset: x87 control word and MXCSR defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test values"
)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_to_kvm_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.l, code.db, code.g, code.present),
            (8, 1, 0, 1, 1)
        );
        assert_eq!(
            (code.type_, code.s, code.limit, code.base),
            (0xb, 1, 0xffff_ffff, 0)
        );
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.db, data.l, data.type_), (16, 1, 0, 3));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0x1234_5678, 0x67), 3);
        assert_eq!(
            (tss.base, tss.limit, tss.g, tss.s),
            (0x1234_5678, 0x67, 0, 0)
        );
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn linux64_entry_starts_in_long_mode_with_the_zero_page_in_rsi() {
        let entry = BootEntry::Linux64(GuestAddress(0x100_0000));
        let sregs = boot_sregs(kvm_sregs::default(), entry);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cs.l, 1);
        let regs = boot_regs(entry);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x100_0000, ZERO_PAGE_START, BOOT_STACK_POINTER)
        );
    }

    #[test]
    fn pvh_entry_starts_in_protected_mode_without_paging() {
        let entry = BootEntry::Pvh(GuestAddress(0x100_0abc));
        let sregs = boot_sregs(kvm_sregs::default(), entry);
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(sregs.cr4, 0);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        let regs = boot_regs(entry);
        assert_eq!((regs.rip, regs.rbx), (0x100_0abc, PVH_INFO_START));
    }

    #[test]
    fn identity_map_covers_the_first_4_gib_with_2_mib_pages() {
        let words = identity_page_tables();
        let last_pd = PDE_START + (PDE_COUNT - 1) * 0x1000 + 511 * 8;
        let (_, last) = words.iter().find(|(a, _)| *a == last_pd).unwrap();
        assert_eq!(last & !0xfff, (4u64 << 30) - (2 << 20));
        assert_eq!(last & 0x83, 0x83);
        assert_eq!(words.len(), 1 + PDE_COUNT as usize * 513);
    }
}
