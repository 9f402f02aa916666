//! Which guest pages were written since the last look: KVM's dirty log of the vCPUs' writes
//! (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_GET_DIRTY_LOG`) together with the VMM's own writes, which
//! the guest memory's bitmap records (see `rvmm_devices::virtio::GuestMemoryMmap`).

use rvmm_devices::cast::usize_from;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;

/// Page size of both logs.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of dirty-page logging.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// This host's KVM cannot log dirty pages: live migration cannot work here (snapshots
    /// still do).
    #[error(
        "KVM cannot log dirty pages on this host (KVM_MEM_LOG_DIRTY_PAGES refused): live migration needs it"
    )]
    Unsupported(#[source] kvm_ioctls::Error),
    /// Turning the log on or off failed.
    #[error("Cannot {0} KVM's dirty-page log")]
    Switch(&'static str, #[source] kvm_ioctls::Error),
    /// Reading the log of a memory slot failed.
    #[error("Cannot read KVM's dirty-page log of memory slot {0}")]
    Read(u32, #[source] kvm_ioctls::Error),
    /// The devices could not be paused to read the VMM's bitmap.
    #[error("Cannot pause the devices to read their dirty pages")]
    Pause(#[source] rvmm_devices::PauseError),
    /// The VM has stopped.
    #[error("The VM has stopped")]
    Gone,
}

/// The dirty pages of one memory region, one bit per page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionDirty {
    /// Guest address of the region.
    pub guest_addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Bit `n` set: page `n` was written.
    pub bits: Vec<u64>,
}

/// The pages written since the last collection, region by region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// In region order.
    pub regions: Vec<RegionDirty>,
}

impl DirtyPages {
    /// Every page of `mem` (the first round of a migration).
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        Self {
            regions: mem
                .iter()
                .map(|r| {
                    let pages = r.len().div_ceil(PAGE_SIZE);
                    let mut bits = vec![u64::MAX; usize_from(pages.div_ceil(64))];
                    if pages % 64 != 0 {
                        *bits.last_mut().expect("a region has pages") = (1 << (pages % 64)) - 1;
                    }
                    RegionDirty {
                        guest_addr: r.start_addr().0,
                        len: r.len(),
                        bits,
                    }
                })
                .collect(),
        }
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The dirty pages as (guest address, length) runs of consecutive pages.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for region in &self.regions {
            let pages = region.len.div_ceil(PAGE_SIZE);
            for page in 0..pages {
                let word = region.bits.get((page / 64) as usize).copied().unwrap_or(0);
                if word & (1 << (page % 64)) == 0 {
                    continue;
                }
                let addr = region.guest_addr + page * PAGE_SIZE;
                let len = PAGE_SIZE.min(region.len - page * PAGE_SIZE);
                match out.last_mut() {
                    Some((start, run)) if *start + *run == addr => *run += len,
                    _ => out.push((addr, len)),
                }
            }
        }
        out
    }

    /// Adds `other`'s pages (same regions) to these.
    pub fn merge(&mut self, other: &DirtyPages) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.bits.iter_mut().zip(&theirs.bits) {
                *a |= *b;
            }
        }
    }
}

/// Reads and clears the VMM's bitmap of `mem` (call with the devices paused).
pub(crate) fn take_vmm_dirty(mem: &GuestMemoryMmap) -> DirtyPages {
    DirtyPages {
        regions: mem
            .iter()
            .map(|r| {
                let bitmap = std::ops::Deref::deref(r).bitmap();
                let mut bits = bitmap.get_and_reset();
                // A word per 64 pages whatever the bitmap holds: KVM's log is merged into
                // these words, and a shorter bitmap would drop the rest of it.
                bits.resize(usize_from(r.len().div_ceil(PAGE_SIZE).div_ceil(64)), 0);
                RegionDirty {
                    guest_addr: r.start_addr().0,
                    len: r.len(),
                    bits,
                }
            })
            .collect(),
    }
}

/// Clears the VMM's bitmap of `mem` (when logging starts).
pub(crate) fn clear_vmm_dirty(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        std::ops::Deref::deref(r).bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_join_consecutive_pages_across_words_but_not_across_regions() {
        let mut pages = DirtyPages {
            regions: vec![
                RegionDirty {
                    guest_addr: 0,
                    len: 128 * PAGE_SIZE,
                    bits: vec![1 << 63 | 1, 0b11],
                },
                RegionDirty {
                    guest_addr: 1 << 32,
                    len: 3 * PAGE_SIZE,
                    bits: vec![0b101],
                },
            ],
        };
        assert_eq!(pages.count(), 6);
        assert_eq!(
            pages.ranges(),
            vec![
                (0, PAGE_SIZE),
                (63 * PAGE_SIZE, 3 * PAGE_SIZE),
                (1 << 32, PAGE_SIZE),
                ((1 << 32) + 2 * PAGE_SIZE, PAGE_SIZE),
            ]
        );
        let more = DirtyPages {
            regions: vec![
                RegionDirty {
                    guest_addr: 0,
                    len: 128 * PAGE_SIZE,
                    bits: vec![0b10, 0],
                },
                RegionDirty {
                    guest_addr: 1 << 32,
                    len: 3 * PAGE_SIZE,
                    bits: vec![0b10],
                },
            ],
        };
        pages.merge(&more);
        assert_eq!(pages.count(), 8);
        assert_eq!(pages.ranges()[0], (0, 2 * PAGE_SIZE));
    }

    #[test]
    fn all_pages_of_a_memory_are_every_page_and_nothing_past_its_end() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 100 * 4096)]).unwrap();
        let all = DirtyPages::all(&mem);
        assert_eq!(all.count(), 100);
        assert_eq!(all.ranges(), vec![(0, 100 * PAGE_SIZE)]);
    }

    #[test]
    fn the_vmm_bitmap_of_a_region_gives_a_word_per_64_pages_even_when_it_has_fewer() {
        use vm_memory::mmap::MmapRegionBuilder;
        // A region built without a bitmap of its size (vm-memory's default is empty).
        let mmap = MmapRegionBuilder::new(130 * 4096)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .build()
            .unwrap();
        let region = crate::memory::GuestRegionMmap::new(mmap, vm_memory::GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        let mut pages = take_vmm_dirty(&mem);
        assert_eq!(pages.regions[0].bits, vec![0; 3]);
        // What KVM's log adds is kept, to the last page.
        let kvm = DirtyPages {
            regions: vec![RegionDirty {
                guest_addr: 0,
                len: 130 * PAGE_SIZE,
                bits: vec![1, 0, 1 << 1],
            }],
        };
        pages.merge(&kvm);
        assert_eq!(
            pages.ranges(),
            vec![(0, PAGE_SIZE), (129 * PAGE_SIZE, PAGE_SIZE)]
        );
    }
}
