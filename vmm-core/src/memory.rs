//! Guest RAM: the layout of its regions, the E820 map derived from it, and the mmap backing.

use rvmm_devices::cast::usize_from;
use vm_memory::GuestAddress;

use crate::layout::{
    BIOS_END, EBDA_START, HIGH_RAM_START, HIMEM_START, MMIO_HOLE_START, PCI_MMIO64_SIZE, PDE_COUNT,
};

/// Guest memory: the one alias, shared with the devices.
pub use rvmm_devices::virtio::GuestMemoryMmap;
/// A region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<rvmm_devices::virtio::Bitmap>;

/// Smallest guest: room for the boot structures, a kernel at 1 MiB and its initrd.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Largest guest the identity map and the layout are built for (1 TiB).
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
const PAGE_SIZE: u64 = 4096;

/// E820 "usable RAM".
pub const E820_RAM: u32 = 1;
/// E820 "reserved".
pub const E820_RESERVED: u32 = 2;

/// Errors from laying out guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Memory smaller than the boot structures need.
    #[error("Guest memory of {size} bytes is below the minimum of {min} bytes")]
    TooSmall {
        /// Requested size.
        size: u64,
        /// Minimum size.
        min: u64,
    },
    /// Memory larger than rvmm lays out.
    #[error("Guest memory of {size} bytes is above the maximum of {max} bytes")]
    TooLarge {
        /// Requested size.
        size: u64,
        /// Maximum size.
        max: u64,
    },
    /// Memory not a whole number of pages.
    #[error("Guest memory of {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    /// mmap of the guest RAM failed.
    #[error("Cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// One entry of the firmware memory map the guest is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// How guest RAM is split around the 32-bit MMIO hole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    size: u64,
}

impl MemoryLayout {
    /// Lays out `size` bytes of RAM.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_MEMORY_BYTES {
            return Err(MemoryError::TooSmall {
                size,
                min: MIN_MEMORY_BYTES,
            });
        }
        if size > MAX_MEMORY_BYTES {
            return Err(MemoryError::TooLarge {
                size,
                max: MAX_MEMORY_BYTES,
            });
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Unaligned(size));
        }
        Ok(Self { size })
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// End (exclusive) of RAM below the MMIO hole.
    pub fn low_ram_end(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }

    /// RAM regions as (start, length): below the hole, and above 4 GiB for the rest.
    pub fn ram_regions(&self) -> Vec<(GuestAddress, u64)> {
        let mut regions = vec![(GuestAddress(0), self.low_ram_end())];
        let high = self.size - self.low_ram_end();
        if high > 0 {
            regions.push((GuestAddress(HIGH_RAM_START), high));
        }
        regions
    }

    /// The E820 map: RAM below the EBDA, the EBDA and BIOS area reserved, RAM from 1 MiB.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            },
            E820Entry {
                addr: EBDA_START,
                size: BIOS_END - EBDA_START,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: HIMEM_START,
                size: self.low_ram_end() - HIMEM_START,
                kind: E820_RAM,
            },
        ];
        if let Some(&(start, len)) = self.ram_regions().get(1) {
            map.push(E820Entry {
                addr: start.0,
                size: len,
                kind: E820_RAM,
            });
        }
        map
    }

    /// The E820 map with `reserved` ranges (`(start, length)`, in the MMIO hole: the PCIe
    /// ECAM window) added as reserved entries, in address order.
    pub fn e820_with_reserved(&self, reserved: &[(u64, u64)]) -> Vec<E820Entry> {
        let mut map = self.e820();
        map.extend(reserved.iter().map(|&(addr, size)| E820Entry {
            addr,
            size,
            kind: E820_RESERVED,
        }));
        map.sort_by_key(|e| e.addr);
        map
    }

    /// The 64-bit PCI window: from the first 1 GiB boundary above guest RAM (and 4 GiB),
    /// [`PCI_MMIO64_SIZE`] bytes.
    pub fn pci_mmio64(&self) -> (u64, u64) {
        let ram_end = match self.ram_regions().get(1) {
            Some(&(start, len)) => start.0 + len,
            None => HIGH_RAM_START,
        };
        (ram_end.next_multiple_of(1 << 30), PCI_MMIO64_SIZE)
    }

    /// Whether the boot identity map (first `PDE_COUNT` GiB) covers `addr`.
    pub fn identity_mapped(addr: u64) -> bool {
        addr < PDE_COUNT << 30
    }
}

/// Maps the RAM of `layout` (anonymous, populated lazily by the kernel on first touch).
pub fn create_guest_memory(layout: &MemoryLayout) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram_regions()
        .into_iter()
        .map(|(start, len)| (start, usize_from(len)))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_guest_has_one_region_below_the_hole() {
        let layout = MemoryLayout::new(512 * MIB).unwrap();
        assert_eq!(layout.ram_regions(), vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(layout.low_ram_end(), 512 * MIB);
    }

    #[test]
    fn large_guest_continues_above_4_gib() {
        let layout = MemoryLayout::new(4 * GIB).unwrap();
        assert_eq!(
            layout.ram_regions(),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), GIB)]
        );
    }

    #[test]
    fn e820_covers_all_ram_and_reserves_the_bios_area() {
        let layout = MemoryLayout::new(4 * GIB).unwrap();
        let map = layout.e820();
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: MIB,
                    size: 3 * GIB - MIB,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 4 * GIB,
                    size: GIB,
                    kind: E820_RAM
                },
            ]
        );
        // Nothing usable in the MMIO hole.
        assert!(
            map.iter()
                .filter(|e| e.kind == E820_RAM)
                .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= HIGH_RAM_START)
        );
    }

    #[test]
    fn reserved_ranges_join_the_e820_map_in_address_order() {
        let layout = MemoryLayout::new(4 * GIB).unwrap();
        let map = layout.e820_with_reserved(&[(0xe000_0000, MIB)]);
        assert_eq!(map.len(), 5);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 0xe000_0000,
                size: MIB,
                kind: E820_RESERVED
            }
        );
        assert!(map.windows(2).all(|w| w[0].addr < w[1].addr));
    }

    #[test]
    fn the_64bit_pci_window_starts_above_ram_on_a_gib_boundary() {
        assert_eq!(
            MemoryLayout::new(512 * MIB).unwrap().pci_mmio64(),
            (4 * GIB, 64 * GIB)
        );
        assert_eq!(
            MemoryLayout::new(4 * GIB + 4096).unwrap().pci_mmio64().0,
            6 * GIB
        );
    }

    #[test]
    fn too_small_too_large_and_unaligned_sizes_are_rejected() {
        assert!(matches!(
            MemoryLayout::new(MIB),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(2 << 40),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(64 * MIB + 1),
            Err(MemoryError::Unaligned(_))
        ));
    }

    #[test]
    fn guest_memory_matches_the_layout_and_is_not_populated_eagerly() {
        let layout = MemoryLayout::new(4 * GIB).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        assert_eq!(total, 4 * GIB);
        assert!(mem.address_in_range(GuestAddress(4 * GIB + GIB - 1)));
        assert!(!mem.address_in_range(GuestAddress(3 * GIB)));
    }
}
