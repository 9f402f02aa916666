//! The virtio-blk worker: takes requests off the queue, runs them on the [`DiskBackend`] and
//! returns them to the guest.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::super::{GuestMemoryMmap, InterruptKind, VirtioInterrupt};
use super::BlockCounters;
use super::backend::{Completions, DiskBackend, DiskOp};
use super::guest::GuestView;
use super::request::{
    BlockRequest, ID_BYTES, RejectedRequest, RequestLimits, RequestType, SECTOR_SIZE,
};

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
}

/// A request handed to the backend.
#[derive(Debug, Default)]
struct InFlight {
    head: u16,
    status_addr: GuestAddress,
    request_type: Option<RequestType>,
    /// Used length when the request succeeds.
    used_len: u32,
    /// Data bytes, for the counters.
    bytes: u32,
    ops_left: u32,
    failed: bool,
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
    /// Reused for every chain, so parsing allocates nothing in the steady state.
    request: BlockRequest,
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
            request: BlockRequest::default(),
            in_flight: Vec::new(),
            free: Vec::new(),
            busy: 0,
            throttled: false,
            done: Vec::new(),
            added: 0,
            broken: false,
            stats: BatchCounters::default(),
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

    fn serve_queue(&mut self) -> Result<usize, virtio_queue::Error> {
        let mut completed = 0;
        loop {
            self.queue.disable_notification(&self.mem)?;
            while self.busy < MAX_IN_FLIGHT {
                let Some(chain) = self.queue.iter(&self.mem)?.next() else {
                    break;
                };
                let head = chain.head_index();
                let parsed = self
                    .request
                    .parse_in_view(chain, &self.view, &self.disk.limits);
                completed += self.start_request(head, parsed)?;
            }
            if self.busy >= MAX_IN_FLIGHT {
                // Picked up again from process_completions once requests complete.
                self.throttled = true;
                break;
            }
            if !self.queue.enable_notification(&self.mem)? {
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
        self.finish_done()
    }

    /// Accounts the operations parked in `done`; returns how many requests completed.
    fn finish_done(&mut self) -> Result<usize, virtio_queue::Error> {
        let mut done = std::mem::take(&mut self.done);
        let mut completed = 0;
        let mut result = Ok(());
        for (token, outcome) in done.drain(..) {
            if result.is_ok() {
                match self.op_done(token, outcome) {
                    Ok(n) => completed += n,
                    Err(e) => result = Err(e),
                }
            }
        }
        // Hand the buffer back so its capacity is reused.
        self.done = done;
        result.map(|()| completed)
    }

    fn notify_guest(&mut self) -> Result<(), virtio_queue::Error> {
        if self.added == 0 {
            return Ok(());
        }
        self.added = 0;
        // One check per batch: with EVENT_IDX virtio-queue compares the driver's used_event
        // against everything added since the last check; without it one interrupt covers the
        // batch.
        if self.queue.needs_notification(&self.mem)?
            && let Err(e) = self.interrupt.trigger(InterruptKind::Queue)
        {
            log::warn!("virtio-blk: cannot interrupt the guest: {e}");
        }
        Ok(())
    }

    /// Starts the request just parsed into `self.request` (or answers a rejected chain);
    /// returns how many requests completed right away.
    fn start_request(
        &mut self,
        head: u16,
        parsed: Result<(), RejectedRequest>,
    ) -> Result<usize, virtio_queue::Error> {
        if let Err(rejected) = parsed {
            log::debug!("virtio-blk: rejected request: {}", rejected.error);
            self.stats.errors += 1;
            let len = match rejected.status_addr {
                Some(addr) => u32::from(self.write_status(addr, rejected.error.status())),
                None => 0,
            };
            self.complete(head, len)?;
            return Ok(1);
        }
        let req = &self.request;
        let fail_now = req.request_type.writes() && self.disk.read_only;
        if fail_now || req.request_type == RequestType::GetId {
            let (status, used) = if fail_now {
                (VIRTIO_BLK_S_IOERR as u8, 0)
            } else {
                (VIRTIO_BLK_S_OK as u8, self.write_id())
            };
            if status != VIRTIO_BLK_S_OK as u8 {
                self.stats.errors += 1;
            }
            let status_len = u32::from(self.write_status(self.request.status_addr, status));
            self.complete(head, used + status_len)?;
            return Ok(1);
        }

        let used_len = match req.request_type {
            RequestType::In => req.data_len + 1,
            _ => 1,
        };
        let entry = InFlight {
            head,
            status_addr: req.status_addr,
            request_type: Some(req.request_type),
            used_len,
            bytes: req.data_len,
            ops_left: 1,
            failed: false,
        };
        let offset = req.sector * SECTOR_SIZE;
        let op = match req.request_type {
            RequestType::In => DiskOp::Read {
                offset,
                data: &req.data,
            },
            RequestType::Out => DiskOp::Write {
                offset,
                data: &req.data,
            },
            RequestType::Flush => DiskOp::Flush,
            _ => return self.start_ranges(entry),
        };
        // The slot this request gets if the operation completes later; taken only then, so a
        // synchronous completion (the sync engine, a page-cache hit) never touches the table.
        let token = self
            .free
            .last()
            .copied()
            .unwrap_or(self.in_flight.len() as u32);
        match self.backend.start(&self.mem, op, u64::from(token)) {
            Some(outcome) => {
                let mut entry = entry;
                if let Err(e) = outcome {
                    log::debug!("virtio-blk: I/O error: {e}");
                    entry.failed = true;
                }
                self.finish_request(entry)?;
                Ok(1)
            }
            None => {
                let taken = self.take_slot();
                debug_assert_eq!(taken, token);
                self.in_flight[taken as usize] = entry;
                Ok(0)
            }
        }
    }

    /// Starts a discard or write-zeroes request: one operation per range.
    fn start_ranges(&mut self, mut entry: InFlight) -> Result<usize, virtio_queue::Error> {
        entry.ops_left = self.request.ranges.len() as u32;
        let token = self.take_slot();
        self.in_flight[token as usize] = entry;
        let token64 = u64::from(token);
        let discard = self.request.request_type == RequestType::Discard;
        for range in &self.request.ranges {
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
        // Synchronous results were parked in `done`; complete them now.
        self.finish_done()
    }

    /// A free slot of the in-flight table, counted as busy.
    fn take_slot(&mut self) -> u32 {
        self.busy += 1;
        self.free.pop().unwrap_or_else(|| {
            self.in_flight.push(InFlight::default());
            (self.in_flight.len() - 1) as u32
        })
    }

    /// Accounts one finished operation; completes its request when it was the last one.
    fn op_done(
        &mut self,
        token: u64,
        outcome: io::Result<()>,
    ) -> Result<usize, virtio_queue::Error> {
        let Some(entry) = self.in_flight.get_mut(token as usize) else {
            log::error!("virtio-blk: completion for unknown request {token}");
            return Ok(0);
        };
        if let Err(e) = outcome {
            log::debug!("virtio-blk: I/O error: {e}");
            entry.failed = true;
        }
        entry.ops_left = entry.ops_left.saturating_sub(1);
        if entry.ops_left > 0 {
            return Ok(0);
        }
        let entry = std::mem::take(entry);
        self.free.push(token as u32);
        self.busy -= 1;
        self.finish_request(entry)?;
        Ok(1)
    }

    /// Writes the status of a request whose operations are all done and returns it.
    fn finish_request(&mut self, entry: InFlight) -> Result<(), virtio_queue::Error> {
        let stats = &mut self.stats;
        let status = if entry.failed {
            stats.errors += 1;
            VIRTIO_BLK_S_IOERR as u8
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
                Some(RequestType::Flush) => stats.flushes += 1,
                _ => {}
            }
            VIRTIO_BLK_S_OK as u8
        };
        let len = if !self.write_status(entry.status_addr, status) {
            0
        } else if entry.failed {
            1
        } else {
            entry.used_len
        };
        self.complete(entry.head, len)
    }

    /// Writes the status byte; false if it could not be written.
    fn write_status(&self, addr: GuestAddress, status: u8) -> bool {
        // The address was checked at parse time; the guest cannot unmap its memory under us.
        self.view.write_u8(addr, status)
    }

    /// Writes the id into the GET_ID buffers; returns the bytes written.
    fn write_id(&self) -> u32 {
        let mut written = 0usize;
        for &(addr, len) in &self.request.data {
            let n = (len as usize).min(ID_BYTES - written);
            if n == 0 {
                break;
            }
            if self
                .mem
                .write_slice(&self.disk.id[written..written + n], addr)
                .is_err()
            {
                break;
            }
            written += n;
        }
        written as u32
    }

    fn complete(&mut self, head: u16, len: u32) -> Result<(), virtio_queue::Error> {
        self.queue.add_used(&self.mem, head, len)?;
        self.added += 1;
        Ok(())
    }

    fn fail(&mut self, e: virtio_queue::Error) {
        log::warn!("virtio-blk: queue error, device needs reset: {e}");
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

impl<I: ?Sized + VirtioInterrupt> MutEventSubscriber for BlockHandler<I> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let result = match events.data() {
            d if d == BlockEvent::QueueNotify as u32 => {
                let _ = self.notify.read();
                if self.broken {
                    return;
                }
                self.process_queue()
            }
            d if d == BlockEvent::Completion as u32 => {
                if let Some(fd) = self.backend.completion_fd() {
                    drain_eventfd(fd);
                }
                if self.broken {
                    return;
                }
                self.process_completions()
            }
            _ => return,
        };
        if let Err(e) = result {
            self.fail(e);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.notify,
            BlockEvent::QueueNotify as u32,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: cannot watch the queue: {e:?}");
        }
        if let Some(fd) = self.backend.completion_fd()
            && let Err(e) = ops.add(Events::with_data_raw(
                fd,
                BlockEvent::Completion as u32,
                EventSet::IN,
            ))
        {
            log::error!("virtio-blk: cannot watch I/O completions: {e:?}");
        }
        // Requests posted before activation are served now.
        if let Err(e) = self.process_queue() {
            self.fail(e);
        }
    }
}

/// Resets a non-blocking eventfd the handler does not own as an `EventFd`.
fn drain_eventfd(fd: std::os::fd::RawFd) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from an open eventfd (non-blocking).
    let _ = unsafe { libc::read(fd, (&raw mut value).cast(), std::mem::size_of::<u64>()) };
}
