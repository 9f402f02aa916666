//! qcow2 (versions 2 and 3): reading and writing through L1/L2 tables, refcounts, compressed
//! clusters (zlib, zstd), zero clusters and a backing image.
//!
//! The guest's data moves between guest memory and the image file in whatever engine the
//! device uses: [`Qcow2::map_read`] and [`Qcow2::map_write`] translate a guest range into a
//! host range of the file (allocating, and copying what the guest does not overwrite, first).
//! Metadata (L2 tables, refcount blocks, the L1 table) is cached and written back on
//! [`Qcow2::flush`] in an order that keeps the image consistent across a crash: refcounts
//! before the tables that point to their clusters, L2 tables before the L1 entries that point
//! to them, decrements last (see `flush`). A crash at any point leaves leaked clusters at
//! worst, which `qemu-img check` reports but which corrupt nothing.

mod compressed;
pub(crate) mod create;
pub mod header;
mod refcount;
pub mod tables;

use std::collections::{BTreeSet, HashSet};
use std::io;

use crate::cast::usize_from;

pub use create::create_overlay;

/// An empty qcow2 image without a backing file, of `size` bytes (for tests elsewhere).
#[doc(hidden)]
pub fn overlay_test_bytes(size: u64) -> Vec<u8> {
    let mut bytes = create::overlay_bytes(b"x", "raw", size).expect("valid size");
    // No backing file: offset and length zero.
    bytes[8..20].fill(0);
    bytes
}
use header::{AUTOCLEAR_OFFSET, Header, HeaderError, incompatible};
use refcount::Refcounts;
use tables::{Cache, Cluster, decode_table, encode_table, l1_entry, l2_entry};

use super::{DiskImage, Storage};

/// L2 tables kept in memory (each one cluster: 1 MiB with 64 KiB clusters, mapping 8 GiB).
const L2_CACHE: usize = 16;
/// L1 entries written back together (one 4 KiB block).
const L1_CHUNK: usize = 512;

/// How a guest range reads (see [`Qcow2::map_read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Image data at this host offset.
    Data(u64),
    /// Zeroes.
    Zero,
    /// The backing image's data (zeroes past its end).
    Backing,
    /// One compressed cluster (read through [`Qcow2::read_extent`]).
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// 512-byte sectors it may span.
        sectors: u64,
    },
}

/// Why an image cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The header is invalid or lies.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// A table cannot be read or is corrupt.
    #[error("cannot read its metadata")]
    Io(#[source] io::Error),
    /// Writing needs something rvmm does not do.
    #[error("{0}")]
    Unsupported(String),
}

/// A qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    storage: Box<dyn Storage>,
    header: Header,
    cluster_bits: u32,
    l2_bits: u32,
    l1: Vec<u64>,
    /// L1 chunks (of [`L1_CHUNK`] entries) changed since written.
    l1_dirty: BTreeSet<usize>,
    l2: Cache<Vec<u64>>,
    /// Present when the image is open for writing.
    refs: Option<Refcounts>,
    /// Host clusters holding metadata: guest writes in place must never land there.
    metadata: HashSet<u64>,
    backing: Option<Box<DiskImage>>,
    /// Valid host offsets lie below this (the file's length, then the allocation end).
    limit: u64,
    cluster_buf: Vec<u8>,
    compressed_buf: Vec<u8>,
}

fn corrupt(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Qcow2 {
    /// Opens the image in `storage` (already known to start with the qcow2 magic). The
    /// backing image, if the header names one, is the caller's to open and attach with
    /// [`Qcow2::set_backing`].
    pub fn open(storage: Box<dyn Storage>, writable: bool) -> Result<Self, OpenError> {
        let file_len = storage.len().map_err(OpenError::Io)?;
        let mut head = vec![0u8; usize_from(file_len.min(1 << header::MAX_CLUSTER_BITS))];
        storage.read_at(&mut head, 0).map_err(OpenError::Io)?;
        let header = Header::parse(&head, file_len)?;
        let cluster_bits = header.cluster_bits;
        if writable {
            let refuse = |what: &str| Err(OpenError::Unsupported(format!("writing {what}")));
            if header.nb_snapshots > 0 {
                return refuse("an image with internal snapshots (use an overlay)");
            }
            if header.incompatible & incompatible::DIRTY != 0 {
                return refuse(
                    "an image with dirty lazy refcounts (qemu-img check -r all repairs it)",
                );
            }
            if header.incompatible & incompatible::CORRUPT != 0 {
                return refuse("an image QEMU marked corrupt (qemu-img check -r all)");
            }
        }
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        storage
            .read_at(&mut l1_bytes, header.l1_table_offset)
            .map_err(OpenError::Io)?;
        let l1 = decode_table(&l1_bytes);
        let mut image = Self {
            cluster_bits,
            l2_bits: cluster_bits - 3,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: Cache::new(L2_CACHE),
            refs: None,
            metadata: HashSet::new(),
            backing: None,
            limit: file_len,
            cluster_buf: vec![0u8; 1 << cluster_bits],
            compressed_buf: Vec::new(),
            header,
            storage,
        };
        if writable {
            image.open_for_writing(file_len).map_err(OpenError::Io)?;
        }
        Ok(image)
    }

    fn open_for_writing(&mut self, file_len: u64) -> io::Result<()> {
        let h = &self.header;
        let refs = Refcounts::load(
            self.storage.as_ref(),
            self.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            file_len,
        )?;
        let cs = self.cluster_size();
        self.metadata.insert(0);
        let l1_end = h.l1_table_offset + u64::from(h.l1_size) * 8;
        self.metadata
            .extend((h.l1_table_offset..l1_end).step_by(usize_from(cs)));
        let rt_end =
            h.refcount_table_offset + (u64::from(h.refcount_table_clusters) << self.cluster_bits);
        self.metadata
            .extend((h.refcount_table_offset..rt_end).step_by(usize_from(cs)));
        self.metadata
            .extend(refs.table.iter().copied().filter(|&o| o != 0));
        for &entry in &self.l1 {
            let l2 = l1_entry(entry).map_err(|e| corrupt(format!("L1: {e}")))?;
            if l2 != 0 {
                self.metadata.insert(l2);
            }
        }
        self.limit = self.limit.max(refs.end << self.cluster_bits);
        self.refs = Some(refs);
        // Auto-clear features (bitmaps, ...) are invalid once anyone else writes: clear them,
        // as the specification asks of software that does not maintain them.
        if self.header.version >= 3 && self.header.autoclear != 0 {
            self.storage
                .write_at(&0u64.to_be_bytes(), AUTOCLEAR_OFFSET)?;
            self.storage.sync()?;
            self.header.autoclear = 0;
        }
        Ok(())
    }

    /// Attaches the backing image the header names.
    pub fn set_backing(&mut self, backing: DiskImage) {
        self.backing = Some(Box::new(backing));
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether the image was opened for writing.
    pub fn writable(&self) -> bool {
        self.refs.is_some()
    }

    /// The storage (its file carries the data clusters).
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{offset:#x}+{len:#x} is past the virtual size"),
            )),
        }
    }

    /// The cache slot of the L2 table at `offset`, read on a miss.
    fn l2_slot(&mut self, offset: u64) -> io::Result<usize> {
        if let Some(slot) = self.l2.find(offset) {
            return Ok(slot);
        }
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) || offset + cs > self.limit {
            return Err(corrupt(format!(
                "L2 table at {offset:#x} is not a cluster inside the image"
            )));
        }
        let victim = self.l2.victim();
        if let Some(v) = victim {
            self.write_back_l2(v)?;
        }
        let mut bytes = std::mem::take(&mut self.cluster_buf);
        let read = self.storage.read_at(&mut bytes, offset);
        let table = decode_table(&bytes);
        self.cluster_buf = bytes;
        read?;
        Ok(self.l2.insert(victim, offset, table, false))
    }

    /// Writes a dirty L2 table back, after the refcounts of every cluster it may point to.
    fn write_back_l2(&mut self, slot: usize) -> io::Result<()> {
        if !self.l2.get(slot).dirty {
            return Ok(());
        }
        if let Some(refs) = &mut self.refs
            && refs.is_dirty()
        {
            refs.write_dirty(self.storage.as_ref())?;
            self.storage.sync()?;
        }
        let s = self.l2.get(slot);
        self.storage.write_at(&encode_table(&s.data), s.offset)?;
        self.l2.get_mut(slot).dirty = false;
        Ok(())
    }

    /// The L2 entry of the guest cluster holding `offset`: (table slot, index), or `None`
    /// when no L2 table maps it.
    fn l2_position(&mut self, offset: u64) -> io::Result<Option<(usize, usize)>> {
        let (_, table, index) = self.l1_lookup(offset)?;
        if table == 0 {
            return Ok(None);
        }
        let slot = self.l2_slot(table)?;
        Ok(Some((slot, index)))
    }

    /// For the guest cluster holding `offset`: its L1 index, the L2 table's offset (0: none)
    /// and its index in that table.
    fn l1_lookup(&self, offset: u64) -> io::Result<(usize, u64, usize)> {
        let l1_index = usize_from(offset >> (self.cluster_bits + self.l2_bits));
        let index = usize_from((offset >> self.cluster_bits) & ((1 << self.l2_bits) - 1));
        let entry = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| corrupt("offset beyond the L1 table"))?;
        let table = l1_entry(entry).map_err(|e| corrupt(format!("L1[{l1_index}]: {e}")))?;
        Ok((l1_index, table, index))
    }

    fn cluster_at(&mut self, offset: u64) -> io::Result<Cluster> {
        let Some((slot, index)) = self.l2_position(offset)? else {
            return Ok(Cluster::Unallocated);
        };
        let entry = self.l2.get(slot).data[index];
        let cluster = l2_entry(entry, self.cluster_bits, self.header.version)
            .map_err(|e| corrupt(format!("L2 entry of guest offset {offset:#x}: {e}")))?;
        let cs = self.cluster_size();
        match cluster {
            Cluster::Data { host, .. } | Cluster::ZeroAlloc { host, .. }
                if host % cs != 0 || host + cs > self.limit =>
            {
                Err(corrupt(format!(
                    "guest offset {offset:#x} maps to {host:#x}, outside the image"
                )))
            }
            other => Ok(other),
        }
    }

    /// How the guest range at `offset` reads, and for how many bytes (at most `len`) it reads
    /// alike: consecutive data clusters that are consecutive in the file too, or a run of
    /// zero or unallocated clusters.
    pub fn map_read(&mut self, offset: u64, len: u64) -> io::Result<(Extent, u64)> {
        self.check_range(offset, len)?;
        let cs = self.cluster_size();
        let first = self.cluster_at(offset)?;
        let within = offset & (cs - 1);
        let extent = match first {
            Cluster::Data { host, .. } => Extent::Data(host + within),
            Cluster::ZeroPlain | Cluster::ZeroAlloc { .. } => Extent::Zero,
            Cluster::Unallocated if self.backing.is_some() => Extent::Backing,
            Cluster::Unallocated => Extent::Zero,
            Cluster::Compressed { offset, sectors } => {
                return Ok((Extent::Compressed { offset, sectors }, len.min(cs - within)));
            }
        };
        let mut done = (cs - within).min(len);
        while done < len {
            let next = self.cluster_at(offset + done)?;
            let alike = match (extent, next) {
                (Extent::Data(start), Cluster::Data { host, .. }) => host == start + done,
                (Extent::Zero, Cluster::ZeroPlain | Cluster::ZeroAlloc { .. }) => true,
                (Extent::Zero, Cluster::Unallocated) => self.backing.is_none(),
                (Extent::Backing, Cluster::Unallocated) => true,
                _ => false,
            };
            if !alike {
                break;
            }
            done = (done + cs).min(len);
        }
        Ok((extent, done))
    }

    /// Reads `buf.len()` bytes of `extent` (from [`Qcow2::map_read`] at `offset`).
    pub fn read_extent(&mut self, extent: Extent, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match extent {
            Extent::Data(host) => self.storage.read_at(buf, host),
            Extent::Zero => {
                buf.fill(0);
                Ok(())
            }
            Extent::Backing => self
                .backing
                .as_mut()
                .ok_or_else(|| corrupt("no backing image"))?
                .read_at(buf, offset),
            Extent::Compressed {
                offset: at,
                sectors,
            } => {
                self.decompress(at, sectors)?;
                let within = usize_from(offset & (self.cluster_size() - 1));
                buf.copy_from_slice(&self.cluster_buf[within..within + buf.len()]);
                Ok(())
            }
        }
    }

    /// Decompresses the cluster at host `offset` into `cluster_buf`.
    fn decompress(&mut self, offset: u64, sectors: u64) -> io::Result<()> {
        // QEMU: the data starts at `offset` and ends with the last of the sectors counted
        // from the sector holding `offset`.
        let len = (sectors * 512 - (offset & 511)).min(2 * self.cluster_size() + 512);
        self.compressed_buf.resize(usize_from(len), 0);
        let n = self.storage.read_upto(&mut self.compressed_buf, offset)?;
        compressed::decompress(
            self.header.compression,
            &self.compressed_buf[..n],
            &mut self.cluster_buf,
        )
    }

    /// Reads guest bytes at `offset` (any length inside the virtual size).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (extent, n) = self.map_read(at, (buf.len() - done) as u64)?;
            let n = usize_from(n);
            self.read_extent(extent, at, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Allocates a cluster (a new one at the end of the image) and returns its offset.
    fn alloc(&mut self) -> io::Result<u64> {
        let storage = self.storage.as_ref();
        let refs = self.refs.as_mut().ok_or(io::ErrorKind::PermissionDenied)?;
        let cluster = refs.alloc(storage)?;
        // Refcount blocks (and a moved refcount table) allocated on the way are metadata.
        self.metadata.extend(refs.new_metadata.drain(..));
        self.limit = self.limit.max(refs.end << self.cluster_bits);
        Ok(cluster)
    }
}

#[path = "write.rs"]
mod write;

#[cfg(test)]
#[path = "tests.rs"]
pub(crate) mod tests;
