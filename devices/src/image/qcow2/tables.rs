//! L1/L2 entries and a small write-back cache of metadata clusters (L2 tables, refcount
//! blocks). Entry decoding is pure; the cache is a handful of slots searched linearly, which
//! on the read path costs less than hashing.

/// Host offset bits of L1 and standard L2 entries (9..=55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the cluster's refcount is exactly 1 (it may be written in place).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of an L2 entry (version 3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// L1 bits that must be zero.
const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Standard L2 bits that must be zero.
const L2_RESERVED: u64 = !(OFFSET_MASK | COPIED | COMPRESSED | ZERO);

/// What an L2 entry says of its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated: the backing file's data, or zeroes.
    Unallocated,
    /// Reads as zeroes; no host cluster.
    ZeroPlain,
    /// Reads as zeroes; `host` stays allocated (and may be reused in place when `copied`).
    ZeroAlloc {
        /// Host cluster offset.
        host: u64,
        /// Refcount is 1.
        copied: bool,
    },
    /// Data at `host`.
    Data {
        /// Host cluster offset.
        host: u64,
        /// Refcount is 1: writable in place.
        copied: bool,
    },
    /// Compressed data: `sectors` 512-byte sectors from `offset` (not aligned).
    Compressed {
        /// Host byte offset.
        offset: u64,
        /// Sectors the compressed data may span.
        sectors: u64,
    },
}

/// A corrupt table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Reserved bits are set.
    #[error("entry {0:#018x} has reserved bits set")]
    Reserved(u64),
    /// A zero cluster in a version 2 image.
    #[error("entry {0:#018x} is a zero cluster, which version 2 images do not have")]
    ZeroInV2(u64),
    /// A compressed cluster marked writable in place.
    #[error("entry {0:#018x} is compressed and marked copied")]
    CompressedCopied(u64),
}

/// The L2 table offset an L1 entry holds (0: none).
pub fn l1_entry(entry: u64) -> Result<u64, EntryError> {
    if entry & L1_RESERVED != 0 {
        return Err(EntryError::Reserved(entry));
    }
    Ok(entry & OFFSET_MASK)
}

/// Decodes a standard (64-bit) L2 entry of an image with `cluster_bits`.
pub fn l2_entry(entry: u64, cluster_bits: u32, version: u32) -> Result<Cluster, EntryError> {
    let copied = entry & COPIED != 0;
    if entry & COMPRESSED != 0 {
        if copied {
            return Err(EntryError::CompressedCopied(entry));
        }
        // x = 62 - (cluster_bits - 8) bits of offset, then the additional sector count.
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
        return Ok(Cluster::Compressed { offset, sectors });
    }
    if entry & L2_RESERVED != 0 {
        return Err(EntryError::Reserved(entry));
    }
    let host = entry & OFFSET_MASK;
    if entry & ZERO != 0 {
        if version < 3 {
            return Err(EntryError::ZeroInV2(entry));
        }
        return Ok(if host == 0 {
            Cluster::ZeroPlain
        } else {
            Cluster::ZeroAlloc { host, copied }
        });
    }
    Ok(match host {
        0 => Cluster::Unallocated,
        _ => Cluster::Data { host, copied },
    })
}

/// One cached cluster of metadata.
#[derive(Debug)]
pub struct Slot<T> {
    /// Host offset of the cluster.
    pub offset: u64,
    /// Its content.
    pub data: T,
    /// Changed since read or written.
    pub dirty: bool,
    used: u64,
}

/// A least-recently-used cache of a few metadata clusters.
#[derive(Debug)]
pub struct Cache<T> {
    slots: Vec<Slot<T>>,
    capacity: usize,
    clock: u64,
    last: usize,
}

impl<T> Cache<T> {
    /// A cache of at most `capacity` clusters (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: Vec::new(),
            capacity: capacity.max(1),
            clock: 0,
            last: 0,
        }
    }

    /// The slot of the cluster at `offset`, if cached.
    #[inline]
    pub fn find(&mut self, offset: u64) -> Option<usize> {
        let index = if self
            .slots
            .get(self.last)
            .is_some_and(|s| s.offset == offset)
        {
            self.last
        } else {
            self.slots.iter().position(|s| s.offset == offset)?
        };
        self.clock += 1;
        self.slots[index].used = self.clock;
        self.last = index;
        Some(index)
    }

    /// The slot at `index`.
    #[inline]
    pub fn get(&self, index: usize) -> &Slot<T> {
        &self.slots[index]
    }

    /// The slot at `index`, to change (the caller marks it dirty).
    #[inline]
    pub fn get_mut(&mut self, index: usize) -> &mut Slot<T> {
        &mut self.slots[index]
    }

    /// Whether inserting needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The slot an insertion would evict: the least recently used.
    pub fn victim(&self) -> Option<usize> {
        if !self.is_full() {
            return None;
        }
        self.slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
    }

    /// Inserts `data` for the cluster at `offset` in place of `victim` (from
    /// [`Cache::victim`], already written back if dirty) or in a new slot. Returns its index.
    pub fn insert(&mut self, victim: Option<usize>, offset: u64, data: T, dirty: bool) -> usize {
        self.clock += 1;
        let slot = Slot {
            offset,
            data,
            dirty,
            used: self.clock,
        };
        let index = match victim {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.last = index;
        index
    }

    /// Indexes of the dirty slots.
    pub fn dirty(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].dirty)
            .collect()
    }

    /// Whether any slot is dirty.
    pub fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }

    /// Slots whose clusters fall in `start..end` (to check writes against metadata).
    pub fn contains_offset(&self, offset: u64) -> bool {
        self.slots.iter().any(|s| s.offset == offset)
    }
}

/// Big-endian u64 table bytes to native entries.
pub fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Native entries to big-endian table bytes.
pub fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_entries_decode_by_kind() {
        assert_eq!(l2_entry(0, 16, 3), Ok(Cluster::Unallocated));
        assert_eq!(
            l2_entry(COPIED | 0x3_0000, 16, 3),
            Ok(Cluster::Data {
                host: 0x3_0000,
                copied: true
            })
        );
        assert_eq!(l2_entry(ZERO, 16, 3), Ok(Cluster::ZeroPlain));
        assert_eq!(
            l2_entry(ZERO | 0x5_0000, 16, 3),
            Ok(Cluster::ZeroAlloc {
                host: 0x5_0000,
                copied: false
            })
        );
        assert_eq!(l2_entry(ZERO, 16, 2), Err(EntryError::ZeroInV2(ZERO)));
        assert_eq!(l2_entry(1 << 60, 16, 3), Err(EntryError::Reserved(1 << 60)));
        assert_eq!(l1_entry(COPIED | 0x1_0000), Ok(0x1_0000));
        assert!(l1_entry(0x1_0001).is_err());
    }

    #[test]
    fn compressed_descriptor_splits_offset_and_sectors() {
        // 64 KiB clusters: x = 62 - 8 = 54 offset bits.
        let entry = COMPRESSED | (3 << 54) | 0x12_3456;
        assert_eq!(
            l2_entry(entry, 16, 3),
            Ok(Cluster::Compressed {
                offset: 0x12_3456,
                sectors: 4
            })
        );
        assert!(l2_entry(entry | COPIED, 16, 3).is_err());
    }

    #[test]
    fn cache_evicts_the_least_recently_used() {
        let mut cache = Cache::new(2);
        let a = cache.insert(None, 0x1000, 1u8, false);
        let _b = cache.insert(None, 0x2000, 2u8, false);
        assert_eq!(cache.find(0x1000), Some(a));
        let victim = cache.victim().unwrap();
        assert_eq!(cache.get(victim).offset, 0x2000);
        cache.insert(Some(victim), 0x3000, 3, true);
        assert_eq!(cache.find(0x2000), None);
        assert_eq!(cache.dirty().len(), 1);
    }
}
