//! Disk I/O behind virtio-blk: the [`DiskBackend`] trait and its two engines, synchronous
//! system calls and io_uring. Both move data directly between the disk file and guest memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, register::Probe, squeue, types};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::super::GuestMemoryMmap;
use super::super::guest_view::HostBuf;
use crate::cast::usize_from;

/// How the device does its disk I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// Blocking system calls on the worker thread (`preadv`, `pwritev`, ...).
    #[default]
    Sync,
    /// io_uring: requests are submitted in batches and complete asynchronously. Falls back to
    /// [`Engine::Sync`] (with a warning) when the host cannot set up a ring.
    IoUring,
}

/// One disk operation. Data buffers are guest addresses already checked against guest memory.
#[derive(Clone, Copy, Debug)]
pub enum DiskOp<'a> {
    /// Read `data.len` bytes at `offset` into the guest buffers.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Guest buffers, in order.
        data: &'a [(GuestAddress, u32)],
    },
    /// Write the guest buffers at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Guest buffers, in order.
        data: &'a [(GuestAddress, u32)],
    },
    /// Read `buf.len()` bytes at `offset` into one guest buffer already resolved to host
    /// memory (the common single-buffer request; no iovec).
    ReadBuf {
        /// Byte offset on the disk.
        offset: u64,
        /// The guest buffer.
        buf: HostBuf,
    },
    /// Write one guest buffer already resolved to host memory at `offset`.
    WriteBuf {
        /// Byte offset on the disk.
        offset: u64,
        /// The guest buffer.
        buf: HostBuf,
    },
    /// Make every write completed so far durable.
    Flush,
    /// Deallocate a byte range (advisory: a host that cannot do it succeeds anyway).
    Discard {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Zero a byte range; with `unmap` the host may deallocate it.
    WriteZeroes {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Deallocating is allowed.
        unmap: bool,
    },
}

/// Finished operations: the token given to [`DiskBackend::start`] and the result.
pub type Completions = Vec<(u64, io::Result<()>)>;

/// Where a virtio-blk device's I/O goes. Request parsing and the queue are not its business.
pub trait DiskBackend: Send {
    /// Starts `op` on behalf of `token`. Returns the result if the operation completed now;
    /// `None` means it completes later and shows up in [`DiskBackend::reap`].
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        op: DiskOp<'_>,
        token: u64,
    ) -> Option<io::Result<()>>;

    /// Hands the operations started since the last call to the host (one system call for a
    /// batch). A failure leaves them queued for the next call.
    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Appends the operations that finished since the last call to `done`.
    fn reap(&mut self, _done: &mut Completions) {}

    /// Submits what is queued and blocks until every operation started has finished,
    /// appending them to `done`: nothing is in flight afterwards (unless it fails). Used when
    /// the device stops; backends that complete everything in [`DiskBackend::start`] have
    /// nothing to wait for.
    fn wait_all(&mut self, _done: &mut Completions) -> io::Result<()> {
        Ok(())
    }

    /// Writes back what the backend caches about the disk (a qcow2 image's metadata) and
    /// makes it durable, so that the file alone describes the disk: when the device pauses
    /// for a snapshot or a migration. Called with nothing in flight.
    fn write_back(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// An eventfd that becomes readable when [`DiskBackend::reap`] has something; `None` for
    /// backends that complete everything in [`DiskBackend::start`].
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// The engine actually used.
    fn engine(&self) -> Engine;
}

/// Opens the engine `wanted` over `file`; io_uring falls back to the synchronous engine with a
/// logged reason when the host cannot provide it.
pub fn open_backend(wanted: Engine, file: File) -> Box<dyn DiskBackend> {
    match wanted {
        Engine::Sync => Box::new(SyncEngine::new(file)),
        Engine::IoUring => match file.try_clone().and_then(IoUringEngine::new) {
            Ok(engine) => Box::new(engine),
            Err(e) => {
                log::warn!("virtio-blk: io_uring unavailable, using synchronous I/O: {e}");
                Box::new(SyncEngine::new(file))
            }
        },
    }
}

/// iovecs pointing into guest memory.
#[derive(Debug, Default)]
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are only dereferenced by the kernel, during system calls (or io_uring
// operations) made while the guest memory they point into is mapped; nothing in the vector is
// tied to the thread that built it.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Replaces the content with iovecs for `data`, split at guest memory region boundaries.
    fn fill(&mut self, mem: &GuestMemoryMmap, data: &[(GuestAddress, u32)]) -> io::Result<()> {
        self.0.clear();
        for &(addr, len) in data {
            // Fast path: the buffer is inside one region.
            if let Ok(slice) = mem.get_slice(addr, len as usize) {
                let guard = slice.ptr_guard_mut();
                self.0.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: guard.len(),
                });
                continue;
            }
            for slice in mem.get_slices(addr, len as usize) {
                let slice = slice.map_err(io::Error::other)?;
                let guard = slice.ptr_guard_mut();
                self.0.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: guard.len(),
                });
            }
        }
        Ok(())
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|v| v.iov_len as u64).sum()
    }
}

/// At most this many iovecs per `preadv`/`pwritev` (the kernel's `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// Zero buffer size for writing zeroes when the host cannot zero a range itself.
const ZERO_CHUNK: usize = 64 * 1024;

/// Blocking I/O on the worker thread.
#[derive(Debug)]
pub struct SyncEngine {
    file: File,
    iovecs: IoVecs,
}

impl SyncEngine {
    /// An engine doing its I/O on `file`.
    pub fn new(file: File) -> Self {
        Self {
            file,
            iovecs: IoVecs::default(),
        }
    }

    fn rw(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[(GuestAddress, u32)],
        mut offset: u64,
        write: bool,
    ) -> io::Result<()> {
        // One buffer inside one region (the common case): no iovec array, and pread/pwrite
        // skip the kernel's iovec import.
        if let [(addr, len)] = *data
            && len > 0
            && let Ok(slice) = mem.get_slice(addr, len as usize)
        {
            let guard = slice.ptr_guard_mut();
            return self.rw_one(guard.as_ptr(), guard.len(), offset, write);
        }
        self.iovecs.fill(mem, data)?;
        let iovecs = &mut self.iovecs.0;
        let mut first = 0;
        while first < iovecs.len() {
            let count = (iovecs.len() - first).min(IOV_MAX);
            let iovcnt = libc::c_int::try_from(count)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let offset_arg = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let iov = iovecs[first..].as_ptr();
            let fd = self.file.as_raw_fd();
            let n = if count == 1 {
                // One buffer (the common case): pread/pwrite skip the kernel's iovec import.
                let v = iovecs[first];
                if write {
                    // SAFETY: `v` describes guest memory mapped for as long as `mem` lives; the
                    // kernel only reads it.
                    unsafe { libc::pwrite(fd, v.iov_base, v.iov_len, offset_arg) }
                } else {
                    // SAFETY: as above; the kernel writes into guest memory the guest handed
                    // over to the device for this request.
                    unsafe { libc::pread(fd, v.iov_base, v.iov_len, offset_arg) }
                }
            } else if write {
                // SAFETY: `iov` points to `count` iovecs describing guest memory that is mapped
                // for as long as `mem` lives; the kernel only reads through them.
                unsafe { libc::pwritev(fd, iov, iovcnt, offset_arg) }
            } else {
                // SAFETY: as above; the kernel writes into guest memory, which the guest
                // handed over to the device for this request.
                unsafe { libc::preadv(fd, iov, iovcnt, offset_arg) }
            };
            let Some(n) = transferred(n, write)? else {
                continue;
            };
            offset += n as u64;
            first += advance(&mut iovecs[first..], n);
        }
        Ok(())
    }
}

/// The bytes one positioned read or write moved: `None` when a signal interrupted it (retry),
/// an error for a failure or for no progress (past the end of the file, or a device that
/// stopped taking data).
fn transferred(n: isize, write: bool) -> io::Result<Option<usize>> {
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(err)
        };
    }
    if n == 0 {
        return Err(if write {
            io::ErrorKind::WriteZero.into()
        } else {
            io::ErrorKind::UnexpectedEof.into()
        });
    }
    Ok(Some(n.unsigned_abs()))
}

impl SyncEngine {
    /// Transfers `len` bytes between the guest buffer at `buf` and the disk at `offset`.
    /// `buf..buf + len` must be a slice of guest memory that stays mapped during the call
    /// (the caller borrows the guest memory it came from).
    fn rw_one(&self, buf: *mut u8, len: usize, mut offset: u64, write: bool) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < len {
            let offset_arg = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // `done < len`, so the pointer stays inside the buffer.
            let ptr = buf.wrapping_add(done).cast::<libc::c_void>();
            let n = if write {
                // SAFETY: `ptr..ptr + len - done` is the tail of the guest buffer, mapped for
                // the whole call (see above); the kernel only reads it.
                unsafe { libc::pwrite(fd, ptr, len - done, offset_arg) }
            } else {
                // SAFETY: as above; the kernel writes into guest memory the guest handed over
                // to the device for this request.
                unsafe { libc::pread(fd, ptr, len - done, offset_arg) }
            };
            let Some(n) = transferred(n, write)? else {
                continue;
            };
            offset += n as u64;
            done += n;
        }
        Ok(())
    }
}

/// Consumes `n` bytes from the front of `iovecs`; returns how many iovecs are fully done.
fn advance(iovecs: &mut [libc::iovec], mut n: usize) -> usize {
    let mut done = 0;
    for v in iovecs.iter_mut() {
        if n < v.iov_len {
            // The pointer stays inside the buffer: `n` is below its length.
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        done += 1;
        if n == 0 {
            break;
        }
    }
    done
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: plain system call on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether a fallocate error means "this file system or device cannot do that mode".
fn unsupported(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

fn write_zeroes_by_hand(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeroes = vec![0u8; usize_from(len).min(ZERO_CHUNK)];
    let end = offset + len;
    while offset < end {
        let n = usize_from((end - offset).min(zeroes.len() as u64));
        file.write_all_at(&zeroes[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(file, PUNCH_HOLE, offset, len) {
        // Discard is a hint; a host that cannot deallocate just keeps the data.
        Err(e) if unsupported(&e) => Ok(()),
        other => other,
    }
}

fn write_zeroes(file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
    let mode = if unmap { PUNCH_HOLE } else { ZERO_RANGE };
    match fallocate(file, mode, offset, len) {
        Err(e) if unsupported(&e) => write_zeroes_by_hand(file, offset, len),
        other => other,
    }
}

impl DiskBackend for SyncEngine {
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        op: DiskOp<'_>,
        _token: u64,
    ) -> Option<io::Result<()>> {
        Some(match op {
            DiskOp::Read { offset, data } => self.rw(mem, data, offset, false),
            DiskOp::Write { offset, data } => self.rw(mem, data, offset, true),
            // `mem` (borrowed for the call) keeps the mapping `buf` points into alive.
            DiskOp::ReadBuf { offset, buf } => {
                self.rw_one(buf.as_ptr(), buf.len() as usize, offset, false)
            }
            DiskOp::WriteBuf { offset, buf } => {
                self.rw_one(buf.as_ptr(), buf.len() as usize, offset, true)
            }
            DiskOp::Flush => self.file.sync_data(),
            DiskOp::Discard { offset, len } => discard(&self.file, offset, len),
            DiskOp::WriteZeroes { offset, len, unmap } => {
                write_zeroes(&self.file, offset, len, unmap)
            }
        })
    }

    fn engine(&self) -> Engine {
        Engine::Sync
    }
}

/// Submission queue entries of the ring; the completion queue gets the kernel's default
/// (twice as many) and the kernel keeps overflowing completions rather than dropping them.
const RING_ENTRIES: u32 = 256;

/// Index of the disk file among the ring's registered files.
const FILE_INDEX: u32 = 0;

/// What an io_uring operation slot needs to remember until its completion.
#[derive(Debug, Default)]
struct Slot {
    token: u64,
    /// Bytes a read or write must transfer; a shorter result is an error.
    expected: u64,
    /// Set for write-zeroes, so an unsupported fallocate mode can be done by hand.
    zero_range: Option<(u64, u64)>,
    /// Discards succeed even when the host cannot deallocate.
    discard: bool,
    /// Kept until completion: the kernel may read the array when the operation is issued.
    iovecs: IoVecs,
}

/// Asynchronous I/O through io_uring, completions signalled on an eventfd.
///
/// FLUSH ordering: the fsync SQE carries `IO_DRAIN`, so the kernel starts it only after every
/// operation submitted before it has completed (and starts later ones only after it).
pub struct IoUringEngine {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
    event: EventFd,
    file: File,
}

impl std::fmt::Debug for IoUringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoUringEngine")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl IoUringEngine {
    /// Sets up a ring for `file`; fails when io_uring is unavailable or lacks an operation.
    pub fn new(file: File) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let needed = [
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::Readv::CODE,
            opcode::Writev::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
        ];
        if let Some(op) = needed.iter().find(|op| !probe.is_supported(**op)) {
            return Err(io::Error::other(format!(
                "io_uring operation {op} is not supported"
            )));
        }
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        // A registered file spares the kernel a file lookup and reference per operation.
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        Ok(Self {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            event,
            file,
        })
    }

    fn slot(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() - 1
        })
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer the entry points to (the slot's iovecs and the guest memory
            // they describe, or a `HostBuf` the worker's view checked against that memory)
            // stays valid until its completion is reaped: slots are only reused after that,
            // guest memory stays mapped while the worker holds it, and Drop waits for
            // everything in flight. The registered file is `self.file`, open as long as the
            // ring.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // Queue full: hand what is there to the kernel to make room.
            self.ring.submit()?;
        }
    }
}

impl DiskBackend for IoUringEngine {
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        op: DiskOp<'_>,
        token: u64,
    ) -> Option<io::Result<()>> {
        let index = self.slot();
        let fd = types::Fixed(FILE_INDEX);
        let slot = &mut self.slots[index];
        slot.token = token;
        slot.expected = 0;
        slot.zero_range = None;
        slot.discard = false;
        let entry = match op {
            DiskOp::Read { offset, data } | DiskOp::Write { offset, data } => {
                if let Err(e) = slot.iovecs.fill(mem, data) {
                    self.free.push(index);
                    return Some(Err(e));
                }
                slot.expected = slot.iovecs.total();
                let Ok(len) = u32::try_from(slot.iovecs.0.len()) else {
                    self.free.push(index);
                    return Some(Err(io::Error::from_raw_os_error(libc::EINVAL)));
                };
                let ptr = slot.iovecs.0.as_ptr();
                if matches!(op, DiskOp::Read { .. }) {
                    opcode::Readv::new(fd, ptr, len).offset(offset).build()
                } else {
                    opcode::Writev::new(fd, ptr, len).offset(offset).build()
                }
            }
            DiskOp::ReadBuf { offset, buf } => {
                // Non-vectored: the kernel imports no iovec.
                slot.expected = u64::from(buf.len());
                opcode::Read::new(fd, buf.as_ptr(), buf.len())
                    .offset(offset)
                    .build()
            }
            DiskOp::WriteBuf { offset, buf } => {
                slot.expected = u64::from(buf.len());
                opcode::Write::new(fd, buf.as_ptr(), buf.len())
                    .offset(offset)
                    .build()
            }
            DiskOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            DiskOp::Discard { offset, len } => {
                slot.discard = true;
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(PUNCH_HOLE)
                    .build()
            }
            DiskOp::WriteZeroes { offset, len, unmap } => {
                slot.zero_range = Some((offset, len));
                let mode = if unmap { PUNCH_HOLE } else { ZERO_RANGE };
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build()
            }
        };
        match self.push(entry.user_data(index as u64)) {
            Ok(()) => {
                self.in_flight += 1;
                None
            }
            Err(e) => {
                self.free.push(index);
                Some(Err(e))
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.ring.submit().map(|_| ())
    }

    fn reap(&mut self, done: &mut Completions) {
        for cqe in self.ring.completion() {
            let index = usize_from(cqe.user_data());
            let result = cqe.result();
            let Some(slot) = self.slots.get(index) else {
                log::error!("virtio-blk: io_uring completion for unknown slot {index}");
                continue;
            };
            let outcome = if result < 0 {
                let err = io::Error::from_raw_os_error(-result);
                match (slot.zero_range, slot.discard) {
                    (Some((offset, len)), _) if unsupported(&err) => {
                        write_zeroes_by_hand(&self.file, offset, len)
                    }
                    (_, true) if unsupported(&err) => Ok(()),
                    _ => Err(err),
                }
            } else if u64::from(result.unsigned_abs()) < slot.expected {
                // io_uring already retries short buffered transfers; what is left is the end
                // of the file or a full disk.
                Err(io::ErrorKind::UnexpectedEof.into())
            } else {
                Ok(())
            };
            done.push((slot.token, outcome));
            self.free.push(index);
            self.in_flight -= 1;
        }
    }

    fn wait_all(&mut self, done: &mut Completions) -> io::Result<()> {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.reap(done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.event.as_raw_fd())
    }

    fn engine(&self) -> Engine {
        Engine::IoUring
    }
}

impl Drop for IoUringEngine {
    fn drop(&mut self) {
        // The kernel may still be writing guest memory and reading the iovecs of operations in
        // flight: wait for them before the slots and the file go away.
        let mut done = Vec::new();
        if let Err(e) = self.wait_all(&mut done) {
            log::error!("virtio-blk: cannot wait for in-flight io_uring operations: {e}");
            // Better leak the iovecs than let the kernel read freed memory.
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}
