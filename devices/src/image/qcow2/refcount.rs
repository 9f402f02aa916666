//! Refcounts of a writable qcow2 image: the refcount table (held whole), refcount blocks
//! (cached, written back), cluster allocation at the end of the image, and growing the
//! table when the image outgrows it.
//!
//! Crash safety is about order: a cluster's refcount reaches the file before anything points
//! to it (see `Qcow2::flush_metadata`), and decrements only after the pointer is gone, so a
//! crash leaves leaked clusters at worst, never a referenced cluster with refcount 0.

use std::io;

use super::header::{REFCOUNT_TABLE_FIELD_OFFSET, refcount_table_field};
use super::tables::{Cache, decode_table, encode_table};
use crate::cast::usize_from;
use crate::image::Storage;

/// Refcount blocks kept in memory.
const BLOCK_CACHE: usize = 8;

/// The refcount structures of an image open for writing.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    /// log2 of the refcount width in bits.
    order: u32,
    /// Refcount table entries (native), covering `table.len()` blocks.
    pub(super) table: Vec<u64>,
    table_offset: u64,
    table_clusters: u32,
    /// Entries changed since the table was written.
    table_dirty: bool,
    pub(super) blocks: Cache<Vec<u8>>,
    /// The first cluster index past everything allocated (new clusters go here).
    pub(super) end: u64,
    /// Decrements waiting until the pointers to their clusters are written away.
    pending_frees: Vec<u64>,
    /// Clusters that became metadata (new blocks, a moved table) since last taken.
    pub(super) new_metadata: Vec<u64>,
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Refcounts {
    /// Loads the refcount table and finds the end of the allocated clusters (the last cluster
    /// with a refcount, or the end of the file if that is later).
    pub fn load(
        storage: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
        file_len: u64,
    ) -> io::Result<Self> {
        let mut bytes = vec![0u8; usize_from(u64::from(table_clusters) << cluster_bits)];
        storage.read_at(&mut bytes, table_offset)?;
        let table = decode_table(&bytes);
        let cs = 1u64 << cluster_bits;
        let mut refs = Self {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            blocks: Cache::new(BLOCK_CACHE),
            end: file_len.div_ceil(cs),
            pending_frees: Vec::new(),
            new_metadata: Vec::new(),
        };
        for (i, &entry) in refs.table.iter().enumerate() {
            if entry & (cs - 1) != 0 || entry & !super::tables::OFFSET_MASK != 0 {
                return Err(corrupt(format!(
                    "refcount table entry {i} ({entry:#x}) is not a cluster offset"
                )));
            }
            if entry != 0 && entry + cs > file_len {
                return Err(corrupt(format!(
                    "refcount block {i} at {entry:#x} lies past the end of the file"
                )));
            }
        }
        if let Some(last) = refs.table.iter().rposition(|&e| e != 0) {
            let per_block = refs.per_block();
            for c in (0..per_block).rev() {
                let cluster = last as u64 * per_block + c;
                if refs.get(storage, cluster)? != 0 {
                    refs.end = refs.end.max(cluster + 1);
                    break;
                }
            }
        }
        Ok(refs)
    }

    /// Refcounts per block.
    pub fn per_block(&self) -> u64 {
        ((1u64 << self.cluster_bits) * 8) >> self.order
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The cache slot of refcount block `index` of the table (loaded on a miss); `None` when
    /// the table has no block there.
    fn block(&mut self, storage: &dyn Storage, index: usize) -> io::Result<Option<usize>> {
        let offset = match self.table.get(index) {
            Some(&o) if o != 0 => o,
            _ => return Ok(None),
        };
        if let Some(slot) = self.blocks.find(offset) {
            return Ok(Some(slot));
        }
        let victim = self.blocks.victim();
        if let Some(v) = victim {
            self.write_back(storage, v)?;
        }
        let mut data = vec![0u8; usize_from(self.cluster_size())];
        storage.read_at(&mut data, offset)?;
        Ok(Some(self.blocks.insert(victim, offset, data, false)))
    }

    fn write_back(&mut self, storage: &dyn Storage, slot: usize) -> io::Result<()> {
        let s = self.blocks.get(slot);
        if s.dirty {
            storage.write_at(&s.data, s.offset)?;
            self.blocks.get_mut(slot).dirty = false;
        }
        Ok(())
    }

    /// The refcount of `cluster`.
    pub fn get(&mut self, storage: &dyn Storage, cluster: u64) -> io::Result<u64> {
        let per_block = self.per_block();
        let Ok(index) = usize::try_from(cluster / per_block) else {
            return Ok(0);
        };
        let Some(slot) = self.block(storage, index)? else {
            return Ok(0);
        };
        Ok(read_refcount(
            &self.blocks.get(slot).data,
            cluster % per_block,
            self.order,
        ))
    }

    /// Adds `delta` to the refcount of `cluster`, whose block must exist.
    fn add(&mut self, storage: &dyn Storage, cluster: u64, delta: i64) -> io::Result<()> {
        let per_block = self.per_block();
        let index = usize_from(cluster / per_block);
        let slot = self
            .block(storage, index)?
            .ok_or_else(|| corrupt(format!("cluster {cluster} has no refcount block")))?;
        let order = self.order;
        let block = &mut self.blocks.get_mut(slot);
        let old = read_refcount(&block.data, cluster % per_block, order);
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        let new = old
            .checked_add_signed(delta)
            .filter(|&n| n <= max)
            .ok_or_else(|| {
                corrupt(format!(
                    "refcount of cluster {cluster} would go from {old} by {delta}"
                ))
            })?;
        write_refcount(&mut block.data, cluster % per_block, order, new);
        block.dirty = true;
        Ok(())
    }

    /// Allocates one cluster at the end of the image (refcount 1, in memory until the next
    /// metadata flush) and returns its offset. A missing refcount block is put in the
    /// cluster it would describe first, so that it counts itself.
    pub fn alloc(&mut self, storage: &dyn Storage) -> io::Result<u64> {
        loop {
            let cluster = self.end;
            let index = cluster / self.per_block();
            if index >= self.table.len() as u64 {
                self.grow_table(storage, index + 1)?;
                continue;
            }
            if self.table[usize_from(index)] == 0 {
                let offset = cluster << self.cluster_bits;
                self.table[usize_from(index)] = offset;
                self.table_dirty = true;
                let victim = self.blocks.victim();
                if let Some(v) = victim {
                    self.write_back(storage, v)?;
                }
                let data = vec![0u8; usize_from(self.cluster_size())];
                self.blocks.insert(victim, offset, data, true);
                self.new_metadata.push(offset);
                self.add(storage, cluster, 1)?;
                self.end += 1;
                continue;
            }
            self.add(storage, cluster, 1)?;
            self.end += 1;
            return Ok(cluster << self.cluster_bits);
        }
    }

    /// Queues the release of the host clusters under `offset..offset + len` (a replaced
    /// compressed or shared cluster), applied by [`Refcounts::apply_frees`] once nothing on
    /// disk points to them.
    pub fn free_later(&mut self, offset: u64, len: u64) {
        let first = offset >> self.cluster_bits;
        let last = (offset + len.max(1) - 1) >> self.cluster_bits;
        self.pending_frees.extend(first..=last);
    }

    /// Applies the queued decrements (in memory; written by the next write-back).
    pub fn apply_frees(&mut self, storage: &dyn Storage) -> io::Result<()> {
        let frees = std::mem::take(&mut self.pending_frees);
        for cluster in frees {
            self.add(storage, cluster, -1)?;
        }
        Ok(())
    }

    /// Whether decrements wait.
    pub fn has_frees(&self) -> bool {
        !self.pending_frees.is_empty()
    }

    /// Whether anything waits to be written.
    pub fn is_dirty(&self) -> bool {
        self.table_dirty || self.blocks.any_dirty() || !self.pending_frees.is_empty()
    }

    /// Writes the dirty refcount blocks, then the table if it changed.
    pub fn write_dirty(&mut self, storage: &dyn Storage) -> io::Result<()> {
        for slot in self.blocks.dirty() {
            self.write_back(storage, slot)?;
        }
        if self.table_dirty {
            storage.write_at(&encode_table(&self.table), self.table_offset)?;
            self.table_dirty = false;
        }
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the image that has at least
    /// `min_entries` entries. The new blocks and table are written and synced before the
    /// header points to them; the old table's clusters are freed afterwards.
    fn grow_table(&mut self, storage: &dyn Storage, min_entries: u64) -> io::Result<()> {
        let cs = self.cluster_size();
        let per_block = self.per_block();
        let per_cluster = cs / 8;
        // Everything dirty first: the new table points to the same blocks.
        self.write_dirty(storage)?;
        let start = self.end;
        let has_block = |table: &[u64], i: u64| table.get(usize_from(i)).is_some_and(|&e| e != 0);
        let mut clusters =
            (u64::from(self.table_clusters) * 2).max(min_entries.div_ceil(per_cluster));
        let needed = loop {
            // New blocks for every range the new clusters reach that has none: a fixpoint,
            // as each new block is a cluster too.
            let mut count = 0u64;
            let needed = loop {
                let last = start + count + clusters - 1;
                let needed: Vec<u64> = (start / per_block..=last / per_block)
                    .filter(|&i| !has_block(&self.table, i))
                    .collect();
                if needed.len() as u64 == count {
                    break needed;
                }
                count = needed.len() as u64;
            };
            let last = start + count + clusters - 1;
            if clusters * per_cluster > last / per_block && clusters * per_cluster >= min_entries {
                break needed;
            }
            clusters *= 2;
        };
        if clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the refcount table would exceed QEMU's 8 MiB limit",
            ));
        }
        // Under the 8 MiB limit, so far below u32::MAX clusters.
        let new_clusters = u32::try_from(clusters)
            .map_err(|_| io::Error::new(io::ErrorKind::StorageFull, "refcount table too large"))?;
        self.table.resize(usize_from(clusters * per_cluster), 0);
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for (k, &index) in needed.iter().enumerate() {
            let at = (start + k as u64) * cs;
            self.table[usize_from(index)] = at;
            new_blocks.push((at, vec![0u8; usize_from(cs)]));
        }
        let table_at = (start + needed.len() as u64) * cs;
        let new_end = start + needed.len() as u64 + clusters;
        for cluster in start..new_end {
            let block = self.table[usize_from(cluster / per_block)];
            match new_blocks.iter_mut().find(|(o, _)| *o == block) {
                Some((_, data)) => write_refcount(data, cluster % per_block, self.order, 1),
                None => self.add(storage, cluster, 1)?,
            }
        }
        for (offset, data) in &new_blocks {
            storage.write_at(data, *offset)?;
            self.new_metadata.push(*offset);
        }
        self.new_metadata
            .extend((table_at..table_at + clusters * cs).step_by(usize_from(cs)));
        for slot in self.blocks.dirty() {
            self.write_back(storage, slot)?;
        }
        storage.write_at(&encode_table(&self.table), table_at)?;
        storage.sync()?;
        storage.write_at(
            &refcount_table_field(table_at, new_clusters),
            REFCOUNT_TABLE_FIELD_OFFSET,
        )?;
        storage.sync()?;
        let (old_offset, old_clusters) = (self.table_offset, self.table_clusters);
        self.table_offset = table_at;
        self.table_clusters = new_clusters;
        self.table_dirty = false;
        self.end = new_end;
        // The old table is unreferenced now: free its clusters.
        for c in 0..u64::from(old_clusters) {
            self.add(storage, (old_offset >> self.cluster_bits) + c, -1)?;
        }
        Ok(())
    }
}

/// Refcount `index` of a block with refcounts `1 << order` bits wide (big-endian).
pub fn read_refcount(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = usize_from(index) * bytes;
        block[at..at + bytes]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        // Sub-byte refcounts are packed from the least significant bit.
        u64::from(byte >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Sets refcount `index` (see [`read_refcount`]).
pub fn write_refcount(block: &mut [u8], index: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = usize_from(index) * bytes;
        block[at..at + bytes].copy_from_slice(&value.to_be_bytes()[8 - bytes..]);
    } else {
        let bit = index * bits;
        let mask = ((1u8 << bits) - 1) << (bit % 8);
        let byte = &mut block[(bit / 8) as usize];
        *byte = (*byte & !mask) | ((value.to_le_bytes()[0] << (bit % 8)) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6 {
            let mut block = vec![0u8; 1024];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for index in [0u64, 1, 7, 100] {
                write_refcount(&mut block, index, order, max);
                assert_eq!(read_refcount(&block, index, order), max, "order {order}");
                write_refcount(&mut block, index, order, 1);
                assert_eq!(read_refcount(&block, index, order), 1);
            }
            assert_eq!(read_refcount(&block, 2, order), 0);
        }
        // 16-bit refcounts are big-endian.
        let mut block = vec![0u8; 8];
        write_refcount(&mut block, 1, 4, 0x0102);
        assert_eq!(block[2..4], [1, 2]);
    }
}
