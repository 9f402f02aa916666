//! A lookup-light view of guest memory for the per-request accesses of device workers.
//!
//! A virtio-blk request checks its header, data and status addresses and later writes its
//! status; a virtio-net frame translates each buffer of its chain. Through
//! [`GuestMemoryMmap`] each of those is a region search through several pointers (collection,
//! `Arc`, mapping), which the data copy itself has usually evicted from the L1 cache by the
//! next request. [`GuestView`] keeps the bounds and host addresses of the first regions
//! inline, so the common case is a few compares on one cache line; anything else (more
//! regions, a buffer spanning two) goes to vm-memory as before.
//!
//! virtio-queue reads the rings and descriptors through the view as well: it implements
//! vm-memory's [`GuestMemory`], so an access inside an inline region becomes one
//! `VolatileSlice` at once, without vm-memory's region search and slice-iterator adapters
//! (their moves of large values were about a tenth of the block worker's time at 4 KiB;
//! README, virtio-blk request path).

use vm_memory::bitmap::{BS, Bitmap as _};
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress, Permissions, VolatileSlice,
};

use super::{Bitmap, GuestMemoryMmap};
use crate::cast::usize_from;

/// Regions kept inline (low memory and memory above the 32-bit hole cover most guests).
const FAST_REGIONS: usize = 2;

#[derive(Clone, Copy, Debug)]
struct FastRegion {
    start: u64,
    len: u64,
    host: *mut u8,
    /// The region's dirty bitmap (owned by the region, like `host`).
    dirty: *const Bitmap,
}

impl FastRegion {
    const EMPTY: Self = Self {
        start: 0,
        len: 0,
        host: std::ptr::null_mut(),
        dirty: std::ptr::null(),
    };
}

/// A guest buffer resolved to host memory by `GuestView` (the worker's view of guest memory):
/// `len` bytes at `ptr`, inside one mapping of the guest memory the view keeps alive. Only the
/// view builds one, after checking the bounds, so a backend handed a `HostBuf` together with
/// that memory may pass it to the kernel as it is.
#[derive(Clone, Copy, Debug)]
pub struct HostBuf {
    ptr: *mut u8,
    len: u32,
}

// SAFETY: a `HostBuf` is an address and a length; it grants nothing by itself (using it takes
// `unsafe` code that must hold the guest memory it came from), so moving it to another thread,
// with the worker that owns that memory, is sound.
unsafe impl Send for HostBuf {}

impl HostBuf {
    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `len` bytes at `offset` into the buffer (a part of it, so just as valid).
    ///
    /// # Panics
    ///
    /// When the part does not lie inside the buffer.
    pub fn slice(&self, offset: u32, len: u32) -> HostBuf {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "{offset}+{len} is outside a {}-byte buffer",
            self.len
        );
        HostBuf {
            // Inside the buffer: checked above.
            ptr: self.ptr.wrapping_add(offset as usize),
            len,
        }
    }

    /// Copies `src` into the buffer at `offset`. The guest memory the buffer came from must
    /// still be mapped: the caller holds it (a backend is handed it with every operation).
    ///
    /// # Panics
    ///
    /// When `src` does not fit.
    pub fn copy_from(&self, offset: u32, src: &[u8]) {
        let part = self.slice(offset, u32::try_from(src.len()).expect("fits the buffer"));
        // SAFETY: `part` lies inside this buffer, which `GuestView::host_buf` checked to be
        // inside one mapping of guest memory that the caller keeps mapped; `src` is host
        // memory, so the ranges do not overlap. Guest memory may change under us, which a
        // plain byte copy tolerates.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), part.ptr, src.len()) };
    }
}

/// Guest memory with its first regions resolved to host addresses. What the worker writes
/// through a host address it marks in the region's dirty bitmap itself ([`GuestView::mark_written`],
/// [`GuestView::write_u8`]).
#[derive(Debug)]
pub(crate) struct GuestView {
    /// Keeps the regions (and so the host mappings `fast` points into) alive.
    mem: GuestMemoryMmap,
    fast: [FastRegion; FAST_REGIONS],
}

// SAFETY: the raw pointers are host addresses of mappings owned by `mem` (through `Arc`s),
// which is itself `Send`; they are only dereferenced for volatile accesses to guest memory,
// which any thread holding the memory may make.
unsafe impl Send for GuestView {}

// SAFETY: every method takes `&self` and only reads the inline fields, makes volatile accesses
// to guest memory or marks the regions' atomic dirty bitmaps, as `&GuestMemoryMmap` (which is
// `Sync`) allows from several threads at once.
unsafe impl Sync for GuestView {}

impl GuestView {
    /// A view of `mem` (which it keeps alive).
    pub(crate) fn new(mem: GuestMemoryMmap) -> Self {
        let mut fast = [FastRegion::EMPTY; FAST_REGIONS];
        for (slot, region) in fast.iter_mut().zip(mem.iter()) {
            // A region without a host mapping stays empty: vm-memory handles it.
            if let Ok(len) = usize::try_from(region.len())
                && let Ok(slice) = region.get_slice(MemoryRegionAddress(0), len)
            {
                *slot = FastRegion {
                    start: region.start_addr().raw_value(),
                    len: region.len(),
                    host: slice.ptr_guard_mut().as_ptr(),
                    dirty: std::ops::Deref::deref(region).bitmap(),
                };
            }
        }
        Self { mem, fast }
    }

    /// The memory behind the view.
    pub(crate) fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The inline region holding `addr..addr + len`, with the offset of `addr` in it.
    #[inline]
    fn fast_region(&self, addr: GuestAddress, len: usize) -> Option<(&FastRegion, usize)> {
        self.fast.iter().find_map(|r| {
            // Wraps to a huge value below `start`, so one compare checks both ends; the
            // length check cannot overflow because `off < r.len`.
            let off = addr.raw_value().wrapping_sub(r.start);
            (off < r.len && len as u64 <= r.len - off).then_some((r, usize_from(off)))
        })
    }

    /// Host address of `addr..addr + len` when it lies inside one of the inline regions.
    #[inline]
    fn host(&self, addr: GuestAddress, len: usize) -> Option<*mut u8> {
        // In bounds of the mapping: `off + len <= r.len`.
        self.fast_region(addr, len)
            .map(|(r, off)| r.host.wrapping_add(off))
    }

    /// Marks `addr..addr + len` written in the dirty bitmap, for writes that do not go
    /// through vm-memory (the disk's data read into a guest buffer, a status byte).
    #[inline]
    pub(crate) fn mark_written(&self, addr: GuestAddress, len: u32) {
        if let Some((r, off)) = self.fast_region(addr, len as usize) {
            // SAFETY: `dirty` points at the bitmap of a region `self.mem` keeps alive.
            unsafe { &*r.dirty }.mark_dirty(off, len as usize);
            return;
        }
        // Elsewhere, or across regions: one region at a time.
        let (mut addr, mut left) = (addr, len as u64);
        while left > 0 {
            let Some(region) = self.mem.find_region(addr) else {
                return;
            };
            let off = addr.raw_value() - region.start_addr().raw_value();
            let n = left.min(region.len() - off);
            region.bitmap().mark_dirty(usize_from(off), usize_from(n));
            addr = GuestAddress(addr.raw_value() + n);
            left -= n;
        }
    }

    /// `addr..addr + len` as a host buffer, when it lies inside one of the inline regions.
    #[inline]
    pub(crate) fn host_buf(&self, addr: GuestAddress, len: u32) -> Option<HostBuf> {
        self.host(addr, len as usize)
            .map(|ptr| HostBuf { ptr, len })
    }

    /// Whether `addr..addr + len` is guest memory.
    #[inline]
    pub(crate) fn in_memory(&self, addr: GuestAddress, len: u32) -> bool {
        self.host(addr, len as usize).is_some()
            || GuestMemoryBackend::check_range(&self.mem, addr, len as usize)
    }

    /// Reads the `N` bytes at `addr`; `None` if they are not all guest memory.
    #[inline]
    pub(crate) fn read_array<const N: usize>(&self, addr: GuestAddress) -> Option<[u8; N]> {
        if let Some(ptr) = self.host(addr, N) {
            // SAFETY: `host` checked that the N bytes at `ptr` are inside a mapping owned by
            // `self.mem`; a byte array has alignment 1; the access is volatile because the
            // guest may write the memory concurrently.
            return Some(unsafe { std::ptr::read_volatile(ptr.cast::<[u8; N]>()) });
        }
        let mut buf = [0u8; N];
        self.mem.read_slice(&mut buf, addr).ok().map(|()| buf)
    }

    /// Writes one byte at `addr` (marking its page dirty); false if it is not guest memory.
    #[inline]
    pub(crate) fn write_u8(&self, addr: GuestAddress, value: u8) -> bool {
        if let Some((r, off)) = self.fast_region(addr, 1) {
            // SAFETY: `fast_region` checked that the byte at `off` is inside a mapping owned
            // by `self.mem`; volatile because the guest may access it concurrently.
            unsafe { std::ptr::write_volatile(r.host.wrapping_add(off), value) };
            // SAFETY: `dirty` points at the bitmap of a region `self.mem` keeps alive.
            unsafe { &*r.dirty }.mark_dirty(off, 1);
            return true;
        }
        self.mem.write_obj(value, addr).is_ok()
    }
}

/// The slices of one access through a [`GuestView`]: a single slice of an inline region, or
/// vm-memory's own iterator for anything else.
#[derive(Debug)]
pub(crate) enum ViewSlices<'a> {
    /// The access lies inside one inline region (`None` once yielded).
    Inline(Option<VolatileSlice<'a, BS<'a, Bitmap>>>),
    /// Elsewhere: vm-memory walks the regions.
    Regions(GuestMemoryBackendSliceIterator<'a, GuestMemoryMmap>),
}

impl<'a> Iterator for ViewSlices<'a> {
    type Item = vm_memory::guest_memory::Result<VolatileSlice<'a, BS<'a, Bitmap>>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Inline(slice) => slice.take().map(Ok),
            Self::Regions(regions) => regions.next(),
        }
    }
}

impl std::iter::FusedIterator for ViewSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, Bitmap>> for ViewSlices<'a> {
    /// vm-memory's rule (an error on the first slice fails the access, a later one ends it),
    /// with an inline slice handed over as it is rather than through `Peekable`.
    #[inline]
    fn stop_on_error(
        self,
    ) -> vm_memory::guest_memory::Result<impl Iterator<Item = VolatileSlice<'a, BS<'a, Bitmap>>>>
    {
        match self {
            Self::Inline(slice) => Ok(StopOnError::Inline(slice)),
            Self::Regions(regions) => {
                let mut regions = regions.peekable();
                if let Some(Err(e)) = regions.next_if(Result::is_err) {
                    return Err(e);
                }
                Ok(StopOnError::Regions(regions.map_while(Result::ok)))
            }
        }
    }
}

/// [`ViewSlices`] after [`GuestMemorySliceIterator::stop_on_error`].
enum StopOnError<'a, R> {
    Inline(Option<VolatileSlice<'a, BS<'a, Bitmap>>>),
    Regions(R),
}

impl<'a, R: Iterator<Item = VolatileSlice<'a, BS<'a, Bitmap>>>> Iterator for StopOnError<'a, R> {
    type Item = VolatileSlice<'a, BS<'a, Bitmap>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Inline(slice) => slice.take(),
            Self::Regions(regions) => regions.next(),
        }
    }
}

/// virtio-queue walks the rings and descriptor tables through the view: the same accesses
/// vm-memory makes, without its region search for the regions kept inline.
impl GuestMemory for GuestView {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = Bitmap;

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        self.host(addr, count).is_some() || GuestMemoryBackend::check_range(&self.mem, addr, count)
    }

    #[inline]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, Bitmap>>> {
        if count > 0
            && let Some((r, off)) = self.fast_region(addr, count)
        {
            // SAFETY: `fast_region` checked that `off..off + count` lies inside the region's
            // mapping, which `self.mem` keeps mapped for as long as `self` is borrowed; the
            // bitmap is the region's own, at the same offset, as vm-memory's `get_slice` pairs
            // them.
            let slice = unsafe {
                VolatileSlice::with_bitmap(r.host.add(off), count, (*r.dirty).slice_at(off), None)
            };
            return Ok(ViewSlices::Inline(Some(slice)));
        }
        Ok(ViewSlices::Regions(GuestMemoryBackend::get_slices(
            &self.mem, addr, count,
        )))
    }

    fn physical_memory(&self) -> Option<&GuestMemoryMmap> {
        Some(&self.mem)
    }
}
