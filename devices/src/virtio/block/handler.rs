//! The virtio-blk worker: takes requests off the queue, runs them on the [`DiskBackend`] and
//! returns them to the guest.
//!
//! When the worker stops (the driver resets the device, or the VM is torn down) the handler is
//! dropped: it waits for the operations in flight and, if anything was written since the last
//! completed FLUSH, flushes the disk (`BlockHandler::drain_and_flush`).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::super::guest_view::{GuestView, HostBuf};
use super::super::{GuestMemoryMmap, InterruptKind, VirtioInterrupt};
use super::BlockCounters;
use super::backend::{Completions, DiskBackend, DiskOp};
use super::request::{
    BlockRequest, ID_BYTES, RequestLimits, RequestType, SECTOR_SIZE, STATUS_IOERR, STATUS_OK,
};
use crate::log_limit::LogLimiter;
use crate::{limited_log, limited_log_with};

mod lifecycle;

/// Requests handed to the backend and not yet completed, at most. A guest can keep refilling
/// the available ring while requests are in flight; beyond this the worker stops taking new
/// ones until some complete.
const MAX_IN_FLIGHT: usize = 256;

/// What the handler needs to know about the disk besides its queue.
#[derive(Debug)]
pub struct DiskContext {
    /// Geometry and limits requests are checked against.
    pub limits: RequestLimits,
    /// Writes, discards and write-zeroes are refused with IOERR.
    pub read_only: bool,
    /// GET_ID answer (NUL-padded).
    pub id: [u8; ID_BYTES],
    /// Statistics, shared with the device.
    pub counters: Arc<BlockCounters>,
    /// The disk's path, to name it in messages.
    pub path: PathBuf,
    /// Set while the image's locks are handed to another VMM ([`super::DiskSync::release_lock`],
    /// a live migration's receiver): the worker must not write the image, not even the flush
    /// when it stops (a qcow2 image's cached tables would overwrite the other VMM's).
    pub handed_over: Arc<AtomicBool>,
}

/// Token of the flush made when the worker stops (request tokens are `u32` slot indexes).
const STOP_FLUSH_TOKEN: u64 = u64::MAX;

/// Chains taken off the available ring and parsed before any of them is started (see
/// [`BlockHandler::take_batch`]).
const BATCH: usize = 32;

/// A request handed to the backend (or about to be).
#[derive(Clone, Debug, Default)]
struct InFlight {
    head: u16,
    status_addr: GuestAddress,
    request_type: Option<RequestType>,
    /// Used length when the request succeeds.
    used_len: u32,
    /// Data bytes, for the counters.
    bytes: u32,
    /// For a FLUSH: the writes started before it, which it makes durable when it succeeds.
    covers: u64,
    ops_left: usize,
    failed: bool,
}

/// A parsed request of the current batch, waiting to be started.
#[derive(Debug)]
struct Staged {
    entry: InFlight,
    /// Byte offset on the disk (IN/OUT).
    offset: u64,
    /// The data as one host buffer: IN/OUT with a single buffer inside the view's regions.
    buf: Option<HostBuf>,
    /// Completed when started (its outcome is in `entry.failed`).
    done: bool,
}

/// A request whose status is known, waiting for its status byte and used entry.
#[derive(Debug)]
struct Answer {
    head: u16,
    /// Where the status byte goes; `None` for a chain without a usable status descriptor.
    status_addr: Option<GuestAddress>,
    status: u8,
    /// Used length once the status byte is written.
    len: u32,
    /// Used length when it cannot be.
    len_without_status: u32,
}

/// Statistics of the current batch, published to the shared [`BlockCounters`] once per batch
/// (an atomic add per request and counter is a locked instruction on the hot path).
#[derive(Debug, Default)]
struct BatchCounters {
    reads: u64,
    writes: u64,
    bytes_read: u64,
    bytes_written: u64,
    flushes: u64,
    errors: u64,
    host_errors: u64,
}

impl BatchCounters {
    /// Adds the batch to `shared` and starts a new batch.
    fn publish(&mut self, shared: &BlockCounters) {
        let batch = std::mem::take(self);
        for (counter, n) in [
            (&shared.reads, batch.reads),
            (&shared.writes, batch.writes),
            (&shared.bytes_read, batch.bytes_read),
            (&shared.bytes_written, batch.bytes_written),
            (&shared.flushes, batch.flushes),
            (&shared.errors, batch.errors),
            (&shared.host_errors, batch.host_errors),
        ] {
            if n != 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Events the block worker waits for.
#[repr(u32)]
enum BlockEvent {
    /// The driver kicked the queue.
    QueueNotify = 0,
    /// The backend has completions.
    Completion = 1,
}

/// The worker's side of a virtio-blk device: owns the queue and the backend.
#[allow(missing_debug_implementations)]
pub struct BlockHandler<I: ?Sized + VirtioInterrupt = dyn VirtioInterrupt> {
    mem: GuestMemoryMmap,
    /// The same memory, for the per-request header, buffer and status accesses.
    view: GuestView,
    queue: Queue,
    notify: EventFd,
    interrupt: Arc<I>,
    backend: Box<dyn DiskBackend>,
    disk: DiskContext,
    /// Parsed requests of the current batch, index for index with `staged`; reused, so
    /// parsing allocates nothing in the steady state.
    requests: Vec<BlockRequest>,
    /// Requests of the current batch waiting to be started.
    staged: Vec<Staged>,
    /// Requests waiting for their status byte and used entry.
    answers: Vec<Answer>,
    in_flight: Vec<InFlight>,
    free: Vec<u32>,
    busy: usize,
    /// New requests wait for completions (see [`MAX_IN_FLIGHT`]).
    throttled: bool,
    done: Completions,
    /// Chains returned since the last notification check.
    added: usize,
    /// Set after a queue error: the device waits for a reset.
    broken: bool,
    /// Statistics not yet added to `disk.counters`.
    stats: BatchCounters,
    /// Host I/O errors are logged through this (a failing disk fails every request).
    host_error_log: LogLimiter,
    /// Writes, discards and write-zeroes started so far.
    writes_started: u64,
    /// How many of `writes_started` a completed FLUSH has made durable.
    writes_synced: u64,
}

impl<I: ?Sized + VirtioInterrupt> BlockHandler<I> {
    /// A handler over `queue` (exposed for tests, benchmarks and fuzzing).
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        notify: EventFd,
        interrupt: Arc<I>,
        backend: Box<dyn DiskBackend>,
        disk: DiskContext,
    ) -> Self {
        Self {
            view: GuestView::new(mem.clone()),
            mem,
            queue,
            notify,
            interrupt,
            backend,
            disk,
            requests: Vec::with_capacity(BATCH),
            staged: Vec::with_capacity(BATCH),
            answers: Vec::with_capacity(BATCH),
            in_flight: Vec::new(),
            free: Vec::new(),
            busy: 0,
            throttled: false,
            done: Vec::new(),
            added: 0,
            broken: false,
            stats: BatchCounters::default(),
            host_error_log: LogLimiter::new(),
            writes_started: 0,
            writes_synced: 0,
        }
    }

    /// The queue, e.g. to rewind it between benchmark iterations.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// The eventfd that signals completions of an asynchronous backend (`None` when every
    /// request completes during [`BlockHandler::process_queue`]).
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.backend.completion_fd()
    }

    /// Requests started and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.busy
    }

    /// Takes every available request, starts it, and returns those already completed.
    /// Returns how many requests were completed by this call.
    pub fn process_queue(&mut self) -> Result<usize, virtio_queue::Error> {
        let result = self.serve_queue();
        self.stats.publish(&self.disk.counters);
        result
    }

    /// virtio-queue's loop: notifications off, drain the available ring, re-enable and check
    /// again. The ring is drained in batches of up to [`BATCH`] chains, each in three stages
    /// (see [`BlockHandler::take_batch`]).
    fn serve_queue(&mut self) -> Result<usize, virtio_queue::Error> {
        let mut completed = 0;
        loop {
            self.queue.disable_notification(&self.view)?;
            while self.busy < MAX_IN_FLIGHT {
                let limit = BATCH.min(MAX_IN_FLIGHT - self.busy);
                let taken = self.take_batch(limit)?;
                self.start_batch();
                completed += self.flush_answers()?;
                if taken < limit {
                    // The available ring is empty.
                    break;
                }
            }
            if self.busy >= MAX_IN_FLIGHT {
                // Picked up again from process_completions once requests complete.
                self.throttled = true;
                break;
            }
            if !self.queue.enable_notification(&self.view)? {
                break;
            }
        }
        if let Err(e) = self.backend.submit() {
            // The operations stay queued; the next kick or completion submits them.
            log::warn!("virtio-blk: cannot submit I/O: {e}");
        }
        // Fast operations (page-cache hits) are often complete already.
        completed += self.reap()?;
        self.notify_guest()?;
        Ok(completed)
    }

    /// Stage 1 of a batch: takes up to `limit` chains off the available ring and parses them
    /// back to back (ring, descriptors and headers are read while they are still in the
    /// cache, before any data is copied). Requests that need I/O go to `staged`, in ring
    /// order, with their parsed form in `requests` at the same index; the others (rejected
    /// chains, GET_ID, writes to a read-only disk) are answered in `answers`. Returns how many
    /// chains were taken.
    ///
    /// Stage 2 ([`BlockHandler::start_batch`]) then starts the staged requests in order, and
    /// stage 3 ([`BlockHandler::flush_answers`]) writes the statuses and used entries. Every
    /// request still gets the checks of a request parsed on its own: parsing copies what it
    /// keeps out of guest memory, so a guest rewriting its descriptors or headers after the
    /// parse changes nothing.
    fn take_batch(&mut self, limit: usize) -> Result<usize, virtio_queue::Error> {
        self.staged.clear();
        let mut taken = 0;
        let mut chains = self.queue.iter(&self.view)?;
        while taken < limit {
            let Some(chain) = chains.next() else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let index = self.staged.len();
            if index == self.requests.len() {
                // Grows to BATCH entries once; their buffers are reused from then on.
                self.requests.push(BlockRequest::default());
            }
            let req = &mut self.requests[index];
            if let Err(rejected) = req.parse_in_view(chain, &self.view, &self.disk.limits) {
                log::debug!("virtio-blk: rejected request: {}", rejected.error);
                self.stats.errors += 1;
                self.answers.push(Answer {
                    head,
                    status_addr: rejected.status_addr,
                    status: rejected.error.status(),
                    len: 1,
                    len_without_status: 0,
                });
                continue;
            }
            let req = &*req;
            if req.request_type.writes() && self.disk.read_only {
                self.stats.errors += 1;
                self.answers.push(Answer {
                    head,
                    status_addr: Some(req.status_addr),
                    status: STATUS_IOERR,
                    len: 1,
                    len_without_status: 0,
                });
                continue;
            }
            if req.request_type == RequestType::GetId {
                let written = write_id(&self.mem, &self.disk.id, &req.data);
                self.answers.push(Answer {
                    head,
                    status_addr: Some(req.status_addr),
                    status: STATUS_OK,
                    len: written + 1,
                    len_without_status: written,
                });
                continue;
            }
            let is_rw = matches!(req.request_type, RequestType::In | RequestType::Out);
            if req.request_type == RequestType::In {
                // The disk's data goes in through host addresses: mark its pages now (a
                // migration reads the bitmap with the worker paused, so after it lands).
                for &(addr, len) in &req.data {
                    self.view.mark_written(addr, len);
                }
            }
            // A single data buffer inside the view's regions goes to the backend as a host
            // buffer (checked here, while the view is in the cache).
            let buf = match req.data.as_slice() {
                &[(addr, len)] if is_rw && len > 0 => self.view.host_buf(addr, len),
                _ => None,
            };
            self.staged.push(Staged {
                entry: InFlight {
                    head,
                    status_addr: req.status_addr,
                    request_type: Some(req.request_type),
                    used_len: match req.request_type {
                        RequestType::In => req.data_len + 1,
                        _ => 1,
                    },
                    bytes: req.data_len,
                    covers: 0,
                    ops_left: 1,
                    failed: false,
                },
                // Parsing checked `sector + sectors <= capacity` for IN/OUT, so this is a
                // byte offset inside the disk; the others carry no offset.
                offset: if is_rw { req.sector * SECTOR_SIZE } else { 0 },
                buf,
                done: false,
            });
        }
        Ok(taken)
    }

    /// Stage 2 of a batch: starts the staged requests in ring order, so the synchronous
    /// engine runs its system calls back to back and io_uring gets its entries queued in
    /// order (a FLUSH is queued with `IO_DRAIN`: it runs after everything queued before it).
    /// Requests that complete right away are answered in `answers`.
    fn start_batch(&mut self) {
        let mut staged = std::mem::take(&mut self.staged);
        for (index, staged) in staged.iter_mut().enumerate() {
            staged.done = self.start_staged(index, staged);
        }
        // The answers of requests that completed right away, after all the I/O (their
        // entries are read in order, while still in the cache).
        for staged in staged.drain(..) {
            if staged.done {
                self.answer(staged.entry);
            }
        }
        // Hand the buffer back so its capacity is reused.
        self.staged = staged;
    }

    /// Starts one staged request; `index` is its parsed form in `requests`. Returns true
    /// when it completed right away (then `staged.entry.failed` holds the outcome).
    fn start_staged(&mut self, index: usize, staged: &mut Staged) -> bool {
        // A FLUSH covers every write started before it: the sync engine runs them in order,
        // io_uring starts the flush only after them (`IO_DRAIN`).
        match staged.entry.request_type {
            Some(RequestType::Flush) => staged.entry.covers = self.writes_started,
            Some(t) if t.writes() => self.writes_started += 1,
            _ => {}
        }
        let offset = staged.offset;
        let data = &self.requests[index].data;
        let op = match (staged.entry.request_type, staged.buf) {
            (Some(RequestType::In), Some(buf)) => DiskOp::ReadBuf { offset, buf },
            (Some(RequestType::Out), Some(buf)) => DiskOp::WriteBuf { offset, buf },
            (Some(RequestType::In), None) => DiskOp::Read { offset, data },
            (Some(RequestType::Out), None) => DiskOp::Write { offset, data },
            (Some(RequestType::Flush), _) => DiskOp::Flush,
            _ => {
                self.start_ranges(index, staged.entry.clone());
                return false;
            }
        };
        // The slot this request gets if the operation completes later; taken only then, so a
        // synchronous completion (the sync engine, a page-cache hit) never touches the table.
        let token = self
            .free
            .last()
            .copied()
            .unwrap_or(slot_token(self.in_flight.len()));
        match self.backend.start(&self.mem, op, u64::from(token)) {
            Some(outcome) => {
                if let Err(e) = outcome {
                    self.host_error(staged.entry.request_type, &e);
                    staged.entry.failed = true;
                }
                true
            }
            None => {
                let taken = self.take_slot();
                debug_assert_eq!(taken, token);
                self.in_flight[taken as usize] = staged.entry.clone();
                false
            }
        }
    }

    /// Starts a discard or write-zeroes request (parsed in `requests[index]`): one operation
    /// per range.
    fn start_ranges(&mut self, index: usize, mut entry: InFlight) {
        entry.ops_left = self.requests[index].ranges.len();
        let token = self.take_slot();
        self.in_flight[token as usize] = entry;
        let req = &self.requests[index];
        let token64 = u64::from(token);
        let discard = req.request_type == RequestType::Discard;
        for range in &req.ranges {
            let op = if discard {
                DiskOp::Discard {
                    offset: range.offset(),
                    len: range.len(),
                }
            } else {
                DiskOp::WriteZeroes {
                    offset: range.offset(),
                    len: range.len(),
                    unmap: range.unmap,
                }
            };
            if let Some(outcome) = self.backend.start(&self.mem, op, token64) {
                self.done.push((token64, outcome));
            }
        }
        // Synchronous results were parked in `done`; account them now.
        self.finish_done();
    }

    /// Stage 3 of a batch (and of a round of completions): writes the status bytes and
    /// returns the chains to the guest, back to back. Returns how many were returned.
    fn flush_answers(&mut self) -> Result<usize, virtio_queue::Error> {
        let count = self.answers.len();
        for answer in self.answers.drain(..) {
            // Status addresses were checked at parse time; the guest cannot unmap its memory
            // under us.
            let len = match answer.status_addr {
                Some(addr) if self.view.write_u8(addr, answer.status) => answer.len,
                _ => answer.len_without_status,
            };
            self.queue.add_used(&self.view, answer.head, len)?;
            self.added += 1;
        }
        Ok(count)
    }

    /// Completes the requests the backend has finished; returns how many were completed.
    pub fn process_completions(&mut self) -> Result<usize, virtio_queue::Error> {
        if self.backend.completion_fd().is_none() {
            return Ok(0);
        }
        let result = self.serve_completions();
        self.stats.publish(&self.disk.counters);
        result
    }

    fn serve_completions(&mut self) -> Result<usize, virtio_queue::Error> {
        let mut completed = self.reap()?;
        self.notify_guest()?;
        if self.throttled && self.busy < MAX_IN_FLIGHT {
            self.throttled = false;
            completed += self.serve_queue()?;
        }
        Ok(completed)
    }

    fn reap(&mut self) -> Result<usize, virtio_queue::Error> {
        self.backend.reap(&mut self.done);
        self.finish_done();
        self.flush_answers()
    }

    /// Accounts the operations parked in `done`; finished requests go to `answers`.
    fn finish_done(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        for (token, outcome) in done.drain(..) {
            self.op_done(token, outcome);
        }
        // Hand the buffer back so its capacity is reused.
        self.done = done;
    }

    fn notify_guest(&mut self) -> Result<(), virtio_queue::Error> {
        if self.added == 0 {
            return Ok(());
        }
        self.added = 0;
        // One check per batch: with EVENT_IDX virtio-queue compares the driver's used_event
        // against everything added since the last check; without it one interrupt covers the
        // batch.
        if self.queue.needs_notification(&self.view)?
            && let Err(e) = self.interrupt.trigger(InterruptKind::Queue(0))
        {
            limited_log!(
                log::Level::Warn,
                "virtio-blk: cannot interrupt the guest: {e}"
            );
        }
        Ok(())
    }

    /// A free slot of the in-flight table, counted as busy.
    fn take_slot(&mut self) -> u32 {
        self.busy += 1;
        self.free.pop().unwrap_or_else(|| {
            self.in_flight.push(InFlight::default());
            slot_token(self.in_flight.len() - 1)
        })
    }

    /// Accounts one finished operation; answers its request when it was the last one.
    fn op_done(&mut self, token: u64, outcome: io::Result<()>) {
        let slot = u32::try_from(token)
            .ok()
            .filter(|&slot| (slot as usize) < self.in_flight.len());
        let Some(slot) = slot else {
            log::error!("virtio-blk: completion for unknown request {token}");
            return;
        };
        let request_type = self.in_flight[slot as usize].request_type;
        let failed = outcome.is_err();
        if let Err(e) = outcome {
            self.host_error(request_type, &e);
        }
        let entry = &mut self.in_flight[slot as usize];
        entry.failed |= failed;
        entry.ops_left = entry.ops_left.saturating_sub(1);
        if entry.ops_left > 0 {
            return;
        }
        let entry = std::mem::take(entry);
        self.free.push(slot);
        self.busy -= 1;
        self.answer(entry);
    }

    /// Accounts a request whose operations are all done and queues its answer.
    fn answer(&mut self, entry: InFlight) {
        let stats = &mut self.stats;
        let status = if entry.failed {
            stats.errors += 1;
            STATUS_IOERR
        } else {
            let bytes = u64::from(entry.bytes);
            match entry.request_type {
                Some(RequestType::In) => {
                    stats.reads += 1;
                    stats.bytes_read += bytes;
                }
                Some(RequestType::Out) => {
                    stats.writes += 1;
                    stats.bytes_written += bytes;
                }
                Some(RequestType::Flush) => {
                    stats.flushes += 1;
                    self.writes_synced = self.writes_synced.max(entry.covers);
                }
                _ => {}
            }
            STATUS_OK
        };
        self.answers.push(Answer {
            head: entry.head,
            status_addr: Some(entry.status_addr),
            status,
            len: if entry.failed { 1 } else { entry.used_len },
            len_without_status: 0,
        });
    }

    /// The host failed an operation of a valid request: counted, and logged at warn (rate
    /// limited), since the guest sees only IOERR and the host's operator must act (a full
    /// file system, a failing device, a truncated image).
    fn host_error(&mut self, request: Option<RequestType>, e: &io::Error) {
        self.stats.host_errors += 1;
        limited_log_with!(
            self.host_error_log,
            log::Level::Warn,
            "virtio-blk: host I/O error on {} ({}): {e}",
            self.disk.path.display(),
            request.map_or("request", RequestType::name)
        );
    }

    fn fail(&mut self, e: virtio_queue::Error) {
        limited_log!(
            log::Level::Warn,
            "virtio-blk: queue error, device needs reset: {e}"
        );
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

/// The token of in-flight slot `index`.
#[allow(
    clippy::cast_possible_truncation,
    reason = "at most MAX_IN_FLIGHT (256) slots"
)]
fn slot_token(index: usize) -> u32 {
    index as u32
}

/// Writes the id into the GET_ID buffers; returns the bytes written.
fn write_id(mem: &GuestMemoryMmap, id: &[u8; ID_BYTES], data: &[(GuestAddress, u32)]) -> u32 {
    let mut written = 0usize;
    for &(addr, len) in data {
        let n = (len as usize).min(ID_BYTES - written);
        if n == 0 {
            break;
        }
        if mem.write_slice(&id[written..written + n], addr).is_err() {
            break;
        }
        written += n;
    }
    #[allow(clippy::cast_possible_truncation, reason = "at most ID_BYTES (20)")]
    let written = written as u32;
    written
}
