//! Shared pieces of the rvmm fuzz targets: guest memory, a counting interrupt, a driver-side
//! split queue writer and "mostly valid" selectors built on `arbitrary`.
//!
//! Guest memory is two adjacent 1 MiB regions (so buffers can straddle a region boundary)
//! ending at [`MEM_END`]; anything at or above it is outside guest memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, OnceLock};
use std::sync::atomic::{AtomicUsize, Ordering};

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::pci::msix::{MsiMessage, MsiRouter};
use rvmm_devices::virtio::{GuestMemoryMmap, InterruptKind, VirtioInterrupt};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use vm_memory::{Bytes, GuestAddress};

/// Size of each of the two memory regions.
pub const REGION_SIZE: u64 = 0x10_0000;
/// Where the second region starts (a buffer across it spans two regions).
pub const REGION_BOUNDARY: u64 = REGION_SIZE;
/// First address past guest memory.
pub const MEM_END: u64 = 2 * REGION_SIZE;
/// Where queues live (each queue of size 256 takes under 12 KiB).
pub const QUEUE_AREA: u64 = 0;
/// Indirect descriptor tables.
pub const INDIRECT_AREA: u64 = 0x2_0000;
/// Data buffers handed out by [`BufAlloc`].
pub const BUF_AREA: u64 = 0x4_0000;

pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Two adjacent regions, [0, 1 MiB) and [1 MiB, 2 MiB).
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SIZE as usize),
        (GuestAddress(REGION_BOUNDARY), REGION_SIZE as usize),
    ])
    .expect("guest memory")
}

/// Counts interrupts and needs-reset signals.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    pub queue: AtomicUsize,
    pub config: AtomicUsize,
    pub needs_reset: AtomicUsize,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Queue(_) => self.queue.fetch_add(1, Ordering::Relaxed),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::Relaxed);
    }
}

/// A 64 KiB disk, unlinked, reopened through /proc/self/fd for every block device.
pub fn disk_path() -> &'static str {
    static DISK: OnceLock<(File, String)> = OnceLock::new();
    &DISK
        .get_or_init(|| {
            let path =
                std::env::temp_dir().join(format!("rvmm-fuzz-disk-{}.img", std::process::id()));
            std::fs::write(&path, vec![0x5au8; 64 * 1024]).expect("temp disk");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open temp disk");
            let _ = std::fs::remove_file(&path);
            let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
            (file, proc_path)
        })
        .1
}

/// Makes one request available on `d`: a virtio-blk read of one sector when `block`, an
/// entropy request of `len` bytes (modulo 8 KiB) otherwise; buffers from `alloc`. Restarts at
/// descriptor 0 when the table is full.
pub fn push_request(
    d: &mut Driver<'_>,
    alloc: &mut BufAlloc,
    mem: &GuestMemoryMmap,
    block: bool,
    len: u16,
) {
    let parts: Vec<(u64, u32, u16)> = if block {
        let hdr = alloc.place(AddrSel::Alloc, 16);
        let _ = mem.write_obj(0u32, GuestAddress(hdr));
        let _ = mem.write_obj(0u64, GuestAddress(hdr + 8));
        let data = alloc.place(AddrSel::Alloc, 512);
        let status = alloc.place(AddrSel::Alloc, 1);
        vec![(hdr, 16, 0), (data, 512, F_WRITE), (status, 1, F_WRITE)]
    } else {
        let len = u32::from(len) % 8192;
        vec![(alloc.place(AddrSel::Alloc, len), len, F_WRITE)]
    };
    if d.next_desc as usize + parts.len() > usize::from(d.size) {
        d.next_desc = 0;
    }
    if let Some(head) = d.add_chain(&parts) {
        d.push_avail(head);
    }
}

/// MSI-X vectors of a fuzzed PCI function. Oracle: the transport only raises a vector that is in
/// range and routed (it routes a vector before it can first deliver it).
#[derive(Debug)]
pub struct CheckingMsiRouter {
    count: u16,
    routes: Mutex<BTreeMap<u16, MsiMessage>>,
    pub signals: AtomicUsize,
}

impl CheckingMsiRouter {
    /// A router of `count` vectors.
    pub fn new(count: u16) -> Self {
        Self {
            count,
            routes: Mutex::new(BTreeMap::new()),
            signals: AtomicUsize::new(0),
        }
    }
}

impl MsiRouter for CheckingMsiRouter {
    fn vector_count(&self) -> u16 {
        self.count
    }

    fn route(&self, vector: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        assert!(vector < self.count, "route of vector {vector} past the table");
        let mut routes = self.routes.lock().unwrap();
        match message {
            Some(m) => routes.insert(vector, m),
            None => routes.remove(&vector),
        };
        Ok(())
    }

    fn signal(&self, vector: u16) -> std::io::Result<()> {
        assert!(vector < self.count, "signal of vector {vector} past the table");
        assert!(
            self.routes.lock().unwrap().contains_key(&vector),
            "vector {vector} raised without a route"
        );
        self.signals.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// `true` with probability about `n`/256: lets inputs be mostly valid, with rare corruption
/// that the fuzzer can still reach by changing one byte. Zero bytes (and exhausted input)
/// mean "not rare", so short seeds are well-formed.
pub fn rarely(u: &mut Unstructured<'_>, n: u8) -> Result<bool> {
    Ok(u8::arbitrary(u)? > u8::MAX - n)
}

/// A valid queue size: a power of two from 1 to `max` (a power of two itself).
pub fn queue_size(u: &mut Unstructured<'_>, max: u16) -> Result<u16> {
    let shift = u8::arbitrary(u)? % 16;
    Ok((1u16 << shift).min(max))
}

/// Where a guest buffer goes.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrSel {
    /// The next free buffer (the valid case).
    Alloc,
    /// The next free buffer, but moved so it straddles the region boundary.
    Straddle,
    /// Ends `n` bytes past the end of guest memory.
    PastEnd(u16),
    /// Anything at all.
    Raw(u64),
}

impl AddrSel {
    /// Mostly `Alloc`; the others rarely.
    pub fn mostly_valid(u: &mut Unstructured<'_>) -> Result<Self> {
        if rarely(u, 24)? {
            Self::arbitrary(u)
        } else {
            Ok(Self::Alloc)
        }
    }

    /// Whether the resulting buffer is the plain, non-overlapping valid case.
    pub fn is_alloc(self) -> bool {
        matches!(self, Self::Alloc | Self::Straddle)
    }
}

/// Hands out non-overlapping buffers in [`BUF_AREA`]..[`MEM_END`]; when full, wraps (buffers
/// then overlap, which the device must survive but oracles must not rely on).
#[derive(Debug)]
pub struct BufAlloc {
    next: u64,
    straddle_used: bool,
    /// Set once buffers may overlap.
    pub overlapped: bool,
}

impl Default for BufAlloc {
    fn default() -> Self {
        Self {
            next: BUF_AREA,
            straddle_used: false,
            overlapped: false,
        }
    }
}

impl BufAlloc {
    /// The guest address of a `len`-byte buffer placed as `sel` says.
    pub fn place(&mut self, sel: AddrSel, len: u32) -> u64 {
        let len64 = u64::from(len);
        match sel {
            AddrSel::Alloc => self.alloc(len64),
            AddrSel::Straddle => {
                if self.straddle_used || len64 < 2 || len64 > REGION_SIZE / 2 {
                    return self.alloc(len64);
                }
                self.straddle_used = true;
                let addr = REGION_BOUNDARY - len64 / 2;
                // Whatever was allocated so far must stay below the straddled buffer.
                if self.next > addr {
                    self.overlapped = true;
                }
                addr
            }
            // Starts inside memory when it can (below the buffers' area never: a huge length
            // must not wrap the buffer onto the rings).
            AddrSel::PastEnd(n) if len64 <= MEM_END - BUF_AREA => MEM_END + u64::from(n) - len64,
            AddrSel::PastEnd(n) => MEM_END + u64::from(n),
            AddrSel::Raw(a) => a,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        // Keep clear of a straddled buffer around the boundary.
        let guard = REGION_SIZE / 2;
        let mut addr = self.next;
        if self.straddle_used
            && addr < REGION_BOUNDARY + guard
            && addr + len > REGION_BOUNDARY - guard
        {
            addr = REGION_BOUNDARY + guard;
        }
        if addr + len > MEM_END {
            self.overlapped = true;
            addr = BUF_AREA;
        }
        self.next = (addr + len + 15) & !15;
        addr
    }
}

/// A driver-side split queue: descriptors, the available ring and the used ring, written and
/// read straight in guest memory (no `unwrap`s on guest-controlled values).
pub struct Driver<'a> {
    pub mem: &'a GuestMemoryMmap,
    /// Descriptor table, available ring and used ring addresses.
    pub desc_table: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    /// Next free descriptor table index.
    pub next_desc: u16,
    /// Driver's avail idx.
    pub avail_idx: u16,
    /// Used entries already consumed by [`Driver::take_used`].
    pub used_seen: u16,
    /// Next free byte in the indirect area.
    pub next_indirect: u64,
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries at `base`: descriptor table, available ring, used ring, each
    /// right after the other (virtio 1.x §2.7 alignment). `MockSplitQueue::create` is not used
    /// for the layout: in virtio-queue 0.18 its available ring `end()` counts entries as bytes,
    /// so the used ring overlaps the available ring once more than size/2 entries are used.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc_table = base;
        let avail = desc_table + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            mem,
            desc_table,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_indirect: INDIRECT_AREA + (base >> 2),
        }
    }

    /// The device-side queue over this ring (`size` must be a valid queue size).
    pub fn queue(&self) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(self.size).expect("valid queue size");
        q.set_size(self.size);
        q.set_desc_table_address(
            Some(self.desc_table as u32),
            Some((self.desc_table >> 32) as u32),
        );
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    pub fn write_desc_at(&self, table: u64, index: u16, d: Descriptor) {
        let raw = RawDescriptor::from(d);
        let _ = self
            .mem
            .write_obj(raw, GuestAddress(table + 16 * u64::from(index)));
    }

    /// Writes a chain of (addr, len, flags) into the descriptor table, NEXT links filled in;
    /// returns the head index, or `None` when the table is full.
    pub fn add_chain(&mut self, parts: &[(u64, u32, u16)]) -> Option<u16> {
        let n = u16::try_from(parts.len()).ok()?;
        if n == 0 || u32::from(self.next_desc) + u32::from(n) > u32::from(self.size) {
            return None;
        }
        let head = self.next_desc;
        let table = self.desc_table;
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == parts.len();
            let flags = if last { flags } else { flags | F_NEXT };
            self.write_desc_at(table, index, Descriptor::new(addr, len, flags, index + 1));
        }
        self.next_desc += n;
        Some(head)
    }

    /// Writes `parts` as an indirect table and one descriptor pointing to it; returns the
    /// head index.
    pub fn add_indirect_chain(&mut self, parts: &[(u64, u32, u16)]) -> Option<u16> {
        if parts.is_empty() || self.next_desc >= self.size {
            return None;
        }
        let table = self.next_indirect;
        let table_len = 16 * parts.len() as u64;
        if table + table_len > BUF_AREA {
            return None;
        }
        self.next_indirect = table + table_len;
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let flags = if last { flags } else { flags | F_NEXT };
            self.write_desc_at(
                table,
                i as u16,
                Descriptor::new(addr, len, flags, i as u16 + 1),
            );
        }
        let head = self.next_desc;
        self.write_desc_at(
            self.desc_table,
            head,
            Descriptor::new(table, table_len as u32, F_INDIRECT, 0),
        );
        self.next_desc += 1;
        Some(head)
    }

    /// Makes `head` available (ring entry and idx).
    pub fn push_avail(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size.max(1));
        let ring = self.avail + 4;
        let _ = self.mem.write_obj(head, GuestAddress(ring + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.publish_avail_idx(self.avail_idx);
    }

    /// Writes the avail idx the device sees (may disagree with the ring: corruption).
    pub fn publish_avail_idx(&self, idx: u16) {
        let _ = self.mem.write_obj(idx, GuestAddress(self.avail + 2));
    }

    /// Writes an avail ring entry directly.
    pub fn set_avail_entry(&self, slot: u16, head: u16) {
        let ring = self.avail + 4;
        let slot = u64::from(slot % self.size.max(1));
        let _ = self.mem.write_obj(head, GuestAddress(ring + 2 * slot));
    }

    /// Writes `used_event` (the driver's interrupt threshold with EVENT_IDX).
    pub fn set_used_event(&self, value: u16) {
        let addr = self.avail + 4 + 2 * u64::from(self.size);
        let _ = self.mem.write_obj(value, GuestAddress(addr));
    }

    /// The device's used idx.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0)
    }

    /// The used entry at ring position `pos` (id, len).
    pub fn used_entry(&self, pos: u16) -> (u32, u32) {
        let slot = u64::from(pos % self.size.max(1));
        let addr = self.used + 4 + 8 * slot;
        let id = self.mem.read_obj(GuestAddress(addr)).unwrap_or(u32::MAX);
        let len = self
            .mem
            .read_obj(GuestAddress(addr + 4))
            .unwrap_or(u32::MAX);
        (id, len)
    }

    /// Used entries added since the last call, in order.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.used_seen != idx {
            out.push(self.used_entry(self.used_seen));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Reads `len` bytes of guest memory (zeros where it is not memory).
pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let _ = mem.read_slice(&mut buf, GuestAddress(addr));
    buf
}

/// Fills guest memory with a recognisable pattern.
pub fn fill_guest(mem: &GuestMemoryMmap, addr: u64, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let _ = mem.write_slice(&data, GuestAddress(addr));
}

/// A virtio-net worker over a socket pair: the handler, the network's end of the pair, and
/// the statistics.
pub fn net_handler(
    mem: &GuestMemoryMmap,
    rx: &Driver<'_>,
    tx: &Driver<'_>,
    mrg_rxbuf: bool,
    event_idx: bool,
) -> (
    rvmm_devices::virtio::net::NetHandler<CountingInterrupt>,
    std::os::unix::net::UnixDatagram,
    std::sync::Arc<rvmm_devices::virtio::net::NetCounters>,
) {
    use rvmm_devices::virtio::ActiveQueue;
    use rvmm_devices::virtio::net::{NetCounters, NetHandler, SocketBackend};
    use virtio_queue::QueueT;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    let (backend, peer) = SocketBackend::pair().expect("socket pair");
    let counters = std::sync::Arc::new(NetCounters::default());
    let active = |d: &Driver<'_>| {
        let mut queue = d.queue();
        queue.set_event_idx(event_idx);
        ActiveQueue {
            queue,
            notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    };
    let handler = NetHandler::new(
        mem.clone(),
        active(rx),
        active(tx),
        std::sync::Arc::new(CountingInterrupt::default()),
        Box::new(backend),
        counters.clone(),
        mrg_rxbuf,
    );
    (handler, peer, counters)
}

/// Deterministic frame bytes.
pub fn frame_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// A fresh directory `<temp>/rvmm-fuzz-<tag>-<pid>` for a target's fixture files. It is
/// removed when the fuzzer exits normally; a crash leaves it for reproducing.
pub fn fixture_dir(tag: &str) -> std::path::PathBuf {
    static DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    extern "C" fn remove_all() {
        for dir in DIRS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let dir = std::env::temp_dir().join(format!("rvmm-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fixture directory");
    DIRS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.clone());
    // SAFETY: registers a function without arguments that only removes directories.
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(remove_all);
    });
    dir
}

/// A vm-superio interrupt line that counts its triggers.
#[derive(Clone, Debug, Default)]
pub struct CountingTrigger(pub std::sync::Arc<AtomicUsize>);

impl vm_superio::Trigger for CountingTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
