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
        let mut completed = 0;
        loop {
            self.queue.disable_notification(&self.mem)?;
            while self.busy < MAX_IN_FLIGHT {
                let Some(chain) = self.queue.iter(&self.mem)?.next() else {
                    break;
                };
                let head = chain.head_index();
                let parsed = self.request.parse_into(chain, &self.mem, &self.disk.limits);
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
        let mut completed = self.reap()?;
        self.notify_guest()?;
        if self.throttled && self.busy < MAX_IN_FLIGHT {
            self.throttled = false;
            completed += self.process_queue()?;
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
            self.disk.counters.errors.fetch_add(1, Ordering::Relaxed);
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
                self.disk.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            let status_len = u32::from(self.write_status(self.request.status_addr, status));
            self.complete(head, used + status_len)?;
            return Ok(1);
        }

        let ops = match req.request_type {
            RequestType::Discard | RequestType::WriteZeroes => req.ranges.len() as u32,
            _ => 1,
        };
        let used_len = match req.request_type {
            RequestType::In => req.data_len + 1,
            _ => 1,
        };
        let token = self.free.pop().unwrap_or_else(|| {
            self.in_flight.push(InFlight::default());
            (self.in_flight.len() - 1) as u32
        });
        self.in_flight[token as usize] = InFlight {
            head,
            status_addr: req.status_addr,
            request_type: Some(req.request_type),
            used_len,
            bytes: req.data_len,
            ops_left: ops,
            failed: false,
        };
        self.busy += 1;

        let offset = req.sector * SECTOR_SIZE;
        let token64 = u64::from(token);
        let started = match req.request_type {
            RequestType::In => self.backend.start(
                &self.mem,
                DiskOp::Read {
                    offset,
                    data: &req.data,
                },
                token64,
            ),
            RequestType::Out => self.backend.start(
                &self.mem,
                DiskOp::Write {
                    offset,
                    data: &req.data,
                },
                token64,
            ),
            RequestType::Flush => self.backend.start(&self.mem, DiskOp::Flush, token64),
            _ => {
                // Discard / write-zeroes: one operation per range.
                for range in &req.ranges {
                    let op = if req.request_type == RequestType::Discard {
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
                None
            }
        };
        if let Some(outcome) = started {
            self.done.push((token64, outcome));
        }
        // Synchronous results were parked in `done`; complete them now.
        self.finish_done()
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

        let counters = &self.disk.counters;
        let status = if entry.failed {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            VIRTIO_BLK_S_IOERR as u8
        } else {
            let bytes = u64::from(entry.bytes);
            match entry.request_type {
                Some(RequestType::In) => {
                    counters.reads.fetch_add(1, Ordering::Relaxed);
                    counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
                }
                Some(RequestType::Out) => {
                    counters.writes.fetch_add(1, Ordering::Relaxed);
                    counters.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                }
                Some(RequestType::Flush) => {
                    counters.flushes.fetch_add(1, Ordering::Relaxed);
                }
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
        self.complete(entry.head, len)?;
        Ok(1)
    }

    /// Writes the status byte; false if it could not be written.
    fn write_status(&self, addr: GuestAddress, status: u8) -> bool {
        // The address was checked at parse time; the guest cannot unmap its memory under us.
        self.mem.write_obj(status, addr).is_ok()
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
