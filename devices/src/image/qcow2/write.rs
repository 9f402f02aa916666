//! Writing a qcow2 image: allocation with copy-on-write, zeroing, and the ordered write-back
//! of metadata.

use std::io;

use crate::cast::usize_from;

use super::tables::{COPIED, Cluster, ZERO, encode_table, l2_entry};
use super::{L1_CHUNK, Qcow2, corrupt};

impl Qcow2 {
    /// Makes the guest range at `offset` writable in place and returns where it lives in the
    /// file: `(host offset, bytes)`, for the first `bytes <= len` of the range that are
    /// contiguous in the file. Unallocated, zero, compressed or shared clusters get a new
    /// cluster first, and the parts of it outside the range get the cluster's old content
    /// (written before this returns). The new mapping is in memory until [`Qcow2::flush`].
    pub fn map_write(&mut self, offset: u64, len: u64) -> io::Result<(u64, u64)> {
        self.check_range(offset, len)?;
        if self.refs.is_none() {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let cs = self.cluster_size();
        let mut start: Option<u64> = None;
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let within = at & (cs - 1);
            let n = (cs - within).min(len - done);
            let host = self.writable_cluster(at, within, n)?;
            match start {
                None => start = Some(host + within),
                Some(s) if s + done == host + within => {}
                // Mapped already; the caller's next call writes it in place.
                Some(_) => break,
            }
            done += n;
        }
        Ok((start.unwrap_or(0), done))
    }

    /// The L2 slot and index for the guest cluster at `offset`, creating its L2 table if
    /// there is none.
    fn l2_for_write(&mut self, offset: u64) -> io::Result<(usize, usize)> {
        let (l1_index, table, index) = self.l1_lookup(offset)?;
        if table == 0 {
            let new = self.alloc()?;
            self.metadata.insert(new);
            let victim = self.l2.victim();
            if let Some(v) = victim {
                self.write_back_l2(v)?;
            }
            let entries = 1usize << self.l2_bits;
            let slot = self.l2.insert(victim, new, vec![0u64; entries], true);
            self.l1[l1_index] = new | COPIED;
            self.l1_dirty.insert(l1_index / L1_CHUNK);
            return Ok((slot, index));
        }
        if self.l1[l1_index] & COPIED == 0 {
            return Err(corrupt(format!(
                "L1[{l1_index}] points to a shared L2 table (qemu-img check -r all repairs it)"
            )));
        }
        Ok((self.l2_slot(table)?, index))
    }

    /// The host cluster (aligned) the guest cluster holding `at` is written to in place,
    /// allocating and copying as needed so that everything outside `within..within + n`
    /// keeps its content.
    fn writable_cluster(&mut self, at: u64, within: u64, n: u64) -> io::Result<u64> {
        let cs = self.cluster_size();
        let (slot, index) = self.l2_for_write(at)?;
        let entry = self.l2.get(slot).data[index];
        let old = l2_entry(entry, self.cluster_bits, self.header.version)
            .map_err(|e| corrupt(format!("L2 entry of guest offset {at:#x}: {e}")))?;
        if let Cluster::Data { host, .. } | Cluster::ZeroAlloc { host, .. } = old
            && (host % cs != 0 || host + cs > self.limit)
        {
            return Err(corrupt(format!(
                "guest offset {at:#x} maps to {host:#x}, outside the image"
            )));
        }
        let in_place = |host: u64, meta: &std::collections::HashSet<u64>| {
            if meta.contains(&host) {
                Err(corrupt(format!(
                    "guest offset {at:#x} maps onto image metadata at {host:#x}"
                )))
            } else {
                Ok(host)
            }
        };
        if let Cluster::Data { host, copied: true } = old {
            return in_place(host, &self.metadata);
        }
        let (host, free) = match old {
            Cluster::ZeroAlloc { host, copied: true } => (in_place(host, &self.metadata)?, None),
            Cluster::Data { host, .. } | Cluster::ZeroAlloc { host, .. } => {
                (self.alloc()?, Some((host, cs)))
            }
            Cluster::Compressed { offset, sectors } => {
                (self.alloc()?, Some((offset & !511, sectors * 512)))
            }
            Cluster::Unallocated | Cluster::ZeroPlain => (self.alloc()?, None),
        };
        let tail = within + n;
        if within > 0 || tail < cs {
            self.fill_old(at - within, old)?;
            let (head, rest) = self.cluster_buf.split_at(usize_from(within));
            if !head.is_empty() {
                self.storage.write_at(head, host)?;
            }
            if tail < cs {
                self.storage.write_at(&rest[usize_from(n)..], host + tail)?;
            }
        }
        let table = self.l2.get_mut(slot);
        table.data[index] = host | COPIED;
        table.dirty = true;
        if let Some((offset, len)) = free
            && let Some(refs) = &mut self.refs
        {
            refs.free_later(offset, len);
        }
        Ok(host)
    }

    /// Puts the current content of the guest cluster at `start` (described by `old`) into
    /// `cluster_buf`.
    fn fill_old(&mut self, start: u64, old: Cluster) -> io::Result<()> {
        match old {
            Cluster::Unallocated if self.backing.is_some() => {
                // The last cluster may reach past the virtual size.
                let n = usize_from((self.header.size - start).min(self.cluster_size()));
                self.cluster_buf[n..].fill(0);
                let backing = self.backing.as_mut().expect("checked");
                backing.read_at(&mut self.cluster_buf[..n], start)
            }
            Cluster::Unallocated | Cluster::ZeroPlain | Cluster::ZeroAlloc { .. } => {
                self.cluster_buf.fill(0);
                Ok(())
            }
            Cluster::Data { host, .. } => self.storage.read_at(&mut self.cluster_buf, host),
            Cluster::Compressed { offset, sectors } => self.decompress(offset, sectors),
        }
    }

    /// Writes guest bytes at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (host, n) = self.map_write(at, (buf.len() - done) as u64)?;
            let n = usize_from(n);
            self.storage.write_at(&buf[done..done + n], host)?;
            done += n;
        }
        Ok(())
    }

    /// Makes the guest range read as zeroes: whole clusters become zero clusters (version
    /// 3; allocated ones stay allocated), partial ones are written with zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let cs = self.cluster_size();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let within = at & (cs - 1);
            let n = (cs - within).min(end - at);
            if within == 0 && n == cs && self.header.version >= 3 {
                self.zero_cluster(at)?;
            } else {
                let zeroes = vec![0u8; usize_from(n)];
                self.write_at(&zeroes, at)?;
            }
            at += n;
        }
        Ok(())
    }

    fn zero_cluster(&mut self, at: u64) -> io::Result<()> {
        if self.backing.is_none() && self.l2_position(at)?.is_none() {
            return Ok(()); // Unmapped and nothing below: zeroes already.
        }
        let cs = self.cluster_size();
        let (slot, index) = self.l2_for_write(at)?;
        let entry = self.l2.get(slot).data[index];
        let old = l2_entry(entry, self.cluster_bits, self.header.version)
            .map_err(|e| corrupt(format!("L2 entry of guest offset {at:#x}: {e}")))?;
        let (new, free) = match old {
            Cluster::ZeroPlain => return Ok(()),
            Cluster::Unallocated if self.backing.is_none() => return Ok(()),
            Cluster::Unallocated => (ZERO, None),
            Cluster::Data { host, copied: true } | Cluster::ZeroAlloc { host, copied: true } => {
                (ZERO | host | COPIED, None)
            }
            Cluster::Data { host, .. } | Cluster::ZeroAlloc { host, .. } => {
                (ZERO, Some((host, cs)))
            }
            Cluster::Compressed { offset, sectors } => (ZERO, Some((offset & !511, sectors * 512))),
        };
        let table = self.l2.get_mut(slot);
        table.data[index] = new;
        table.dirty = true;
        if let Some((offset, len)) = free
            && let Some(refs) = &mut self.refs
        {
            refs.free_later(offset, len);
        }
        Ok(())
    }

    /// Writes the cached metadata back (when open for writing) and makes everything written
    /// so far durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_metadata()?;
        self.storage.sync()
    }

    /// The write-back, in crash-safe order: (1) refcount blocks and table, sync; (2) L2
    /// tables; (3) sync, L1 entries; (4) sync, decrements of clusters no longer referenced.
    fn flush_metadata(&mut self) -> io::Result<()> {
        let Some(refs) = self.refs.as_mut() else {
            return Ok(());
        };
        let storage = self.storage.as_ref();
        let dirty_l2 = self.l2.dirty();
        if !refs.is_dirty() && dirty_l2.is_empty() && self.l1_dirty.is_empty() {
            return Ok(());
        }
        refs.write_dirty(storage)?;
        storage.sync()?;
        for slot in dirty_l2 {
            let s = self.l2.get(slot);
            storage.write_at(&encode_table(&s.data), s.offset)?;
            self.l2.get_mut(slot).dirty = false;
        }
        if !self.l1_dirty.is_empty() {
            storage.sync()?;
            let l1_offset = self.header.l1_table_offset;
            for chunk in std::mem::take(&mut self.l1_dirty) {
                let first = chunk * L1_CHUNK;
                let last = (first + L1_CHUNK).min(self.l1.len());
                storage.write_at(
                    &encode_table(&self.l1[first..last]),
                    l1_offset + first as u64 * 8,
                )?;
            }
        }
        if refs.has_frees() {
            storage.sync()?;
            refs.apply_frees(storage)?;
            refs.write_dirty(storage)?;
        }
        Ok(())
    }
}
