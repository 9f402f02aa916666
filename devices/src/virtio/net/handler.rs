//! The virtio-net worker: moves frames between the rx/tx queues and the [`NetBackend`].
//!
//! TX: each chain (header + frame, device-readable only) is gathered straight from guest
//! memory into one `writev`. When the backend cannot take a frame (`EAGAIN`) the chain goes
//! back to the available ring and the worker waits for the backend to become writable: no frame
//! is lost.
//!
//! RX: a frame is read only once a guest chain is at hand. Each descriptor's guest address is
//! checked and translated once, when the chain is popped. A chain of at most [`BOUNCE_READ_MAX`]
//! bytes (mergeable buffers) takes the frame through a host bounce buffer: one plain `read`,
//! then a copy of the frame (header with `num_buffers` already set) into the chain, cheaper for
//! such frames than a `readv` straight into guest memory. A larger chain is read into directly,
//! with the bounce buffer behind it for what does not fit. With `VIRTIO_NET_F_MRG_RXBUF`
//! the overflow is copied into further chains (`num_buffers` says how many); without it a frame
//! larger than its chain is dropped and counted. When the guest has no buffer left the backend
//! is no longer polled for reads (frames wait in the tap's own queue) until the driver kicks the
//! rx queue. A frame already read that needs more buffers than are posted waits in the bounce
//! buffer (one pending frame) and goes first once the driver adds buffers; it is dropped and
//! counted only if the whole ring could not hold it.
//!
//! Statistics are counted locally and added to the shared [`NetCounters`] once per batch.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{GuestMemory, Permissions};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::super::guest_view::GuestView;
use super::super::{ActiveQueue, DeviceHandler, GuestMemoryMmap, InterruptKind, VirtioInterrupt};
use super::NetCounters;
use super::backend::{IoBufs, IovecCache, NetBackend, VNET_HDR_LEN};

/// Largest frame (without header) the device sends or receives: a 64 KiB GSO packet with an
/// Ethernet header and one VLAN tag.
pub const MAX_FRAME_LEN: usize = 65_536 + 14 + 4;
/// Largest header + frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Frames handled per backend wake-up at most, so tx gets its turn under an rx flood (the
/// backend descriptor is level-triggered: the rest are picked up on the next round).
const RX_BUDGET: usize = 256;
/// The receive queue's index (virtio 1.x §5.1.2).
const RX_QUEUE: u16 = 0;
/// The transmit queue's index.
const TX_QUEUE: u16 = 1;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest rx chain a frame is read into through the bounce buffer (then copied): up to a page,
/// the copy costs less than `readv`'s iovec import on top of `read`. Larger chains are read
/// into directly.
pub(super) const BOUNCE_READ_MAX: usize = 4096;

/// Events the net worker waits for.
#[repr(u32)]
enum NetEvent {
    /// The driver added rx buffers.
    RxQueue = 0,
    /// The driver added tx frames.
    TxQueue = 1,
    /// The backend is readable (frames for the guest) or writable again.
    Backend = 2,
}

/// What became of one attempt to receive a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxStep {
    Delivered,
    Dropped,
    /// The backend has no frame.
    Empty,
    /// The guest has no (or not enough) buffers.
    NoBuffers,
}

/// A chain popped from the rx queue.
#[derive(Clone, Copy, Debug)]
struct RxChain {
    head: u16,
    /// Writable bytes.
    cap: usize,
    /// Descriptors in the chain.
    descs: usize,
    /// Device-writable guest memory throughout.
    valid: bool,
}

/// Statistics counted during a batch, added to [`NetCounters`] at its end.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    rx_packets: u64,
    rx_bytes: u64,
    rx_dropped: u64,
    rx_errors: u64,
    tx_packets: u64,
    tx_bytes: u64,
    tx_dropped: u64,
    tx_errors: u64,
}

impl Tally {
    /// Adds the batch's counts to `counters` (one atomic add per non-zero counter).
    fn flush(&mut self, counters: &NetCounters) {
        let t = std::mem::take(self);
        for (counter, n) in [
            (&counters.rx_packets, t.rx_packets),
            (&counters.rx_bytes, t.rx_bytes),
            (&counters.rx_dropped, t.rx_dropped),
            (&counters.rx_errors, t.rx_errors),
            (&counters.tx_packets, t.tx_packets),
            (&counters.tx_bytes, t.tx_bytes),
            (&counters.tx_dropped, t.tx_dropped),
            (&counters.tx_errors, t.tx_errors),
        ] {
            if n != 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// The worker's side of a virtio-net device: owns both queues and the backend.
#[allow(missing_debug_implementations)]
pub struct NetHandler<I: ?Sized + VirtioInterrupt = dyn VirtioInterrupt> {
    /// Guest memory through the worker's lookup-light view; shared so the rx path can hold
    /// guest slices while it updates the handler.
    mem: Arc<GuestView>,
    rx: Queue,
    rx_notify: EventFd,
    tx: Queue,
    tx_notify: EventFd,
    interrupt: Arc<I>,
    backend: Box<dyn NetBackend>,
    counters: Arc<NetCounters>,
    mrg_rxbuf: bool,
    /// Where a frame's overflow lands, and where a pending frame waits.
    bounce: Vec<u8>,
    /// Length of the frame waiting in `bounce` for guest buffers.
    pending: Option<usize>,
    /// Writable buffers of the chain taking a frame's header (storage only, empty at rest).
    head_iovs: IovecCache,
    /// Writable buffers of a further chain of a merged frame (storage only, empty at rest).
    more_iovs: IovecCache,
    /// Further chains of a merged frame and their used lengths.
    more_chains: Vec<(u16, u32)>,
    iov_cache: IovecCache,
    /// Statistics of the current batch, not yet added to `counters`.
    tally: Tally,
    /// The guest has no rx buffer: the backend is not polled for reads.
    rx_stalled: bool,
    /// The backend refused a frame: tx waits for it to become writable.
    tx_blocked: bool,
    /// The backend failed for good (read error, hang-up): it is no longer polled.
    backend_gone: bool,
    /// What the backend descriptor is registered for (empty: not registered).
    registered: EventSet,
    /// The available index when the rx ring was last found empty.
    rx_seen: u16,
    rx_added: usize,
    tx_added: usize,
    /// Set after a queue error: the device waits for a reset.
    broken: bool,
}

impl<I: ?Sized + VirtioInterrupt> NetHandler<I> {
    /// A handler over the rx and tx queues (exposed for tests, benchmarks and fuzzing).
    pub fn new(
        mem: GuestMemoryMmap,
        rx: ActiveQueue,
        tx: ActiveQueue,
        interrupt: Arc<I>,
        backend: Box<dyn NetBackend>,
        counters: Arc<NetCounters>,
        mrg_rxbuf: bool,
    ) -> Self {
        Self {
            mem: Arc::new(GuestView::new(mem)),
            rx: rx.queue,
            rx_notify: rx.notify,
            tx: tx.queue,
            tx_notify: tx.notify,
            interrupt,
            backend,
            counters,
            mrg_rxbuf,
            bounce: vec![0; MAX_BUFFER_LEN + 1],
            pending: None,
            head_iovs: IovecCache::default(),
            more_iovs: IovecCache::default(),
            more_chains: Vec::new(),
            iov_cache: IovecCache::default(),
            tally: Tally::default(),
            rx_stalled: false,
            tx_blocked: false,
            backend_gone: false,
            registered: EventSet::empty(),
            rx_seen: 0,
            rx_added: 0,
            tx_added: 0,
            broken: false,
        }
    }

    /// The rx queue, e.g. to rewind it between benchmark iterations.
    pub fn rx_queue_mut(&mut self) -> &mut Queue {
        &mut self.rx
    }

    /// The tx queue, e.g. to rewind it between benchmark iterations.
    pub fn tx_queue_mut(&mut self) -> &mut Queue {
        &mut self.tx
    }

    /// Whether the worker watches the backend for frames to receive (false while the guest
    /// has no rx buffer, until it kicks the rx queue).
    pub fn polls_backend_for_rx(&self) -> bool {
        !self.rx_stalled && !self.backend_gone && !self.broken
    }

    /// Whether tx waits for the backend to become writable.
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked
    }

    /// Whether a frame read from the backend waits for guest buffers.
    pub fn has_pending_frame(&self) -> bool {
        self.pending.is_some()
    }

    /// Sends every frame the driver made available; returns how many went to the backend.
    pub fn process_tx(&mut self) -> Result<usize, virtio_queue::Error> {
        if self.tx_blocked {
            return Ok(0);
        }
        let result = self.tx_drain();
        self.tally.flush(&self.counters);
        let sent = result?;
        signal(
            &mut self.tx,
            TX_QUEUE,
            &self.mem,
            &mut self.tx_added,
            &*self.interrupt,
        )?;
        Ok(sent)
    }

    fn tx_drain(&mut self) -> Result<usize, virtio_queue::Error> {
        let mem = &*self.mem;
        let mut sent = 0;
        'drain: loop {
            self.tx.disable_notification(mem)?;
            while let Some(chain) = self.tx.iter(mem)?.next() {
                let head = chain.head_index();
                let mut bufs = IoBufs::new(std::mem::take(&mut self.iov_cache));
                let mut valid = true;
                for desc in chain {
                    if desc.is_write_only() || !push_guest(&mut bufs, mem, &desc) {
                        valid = false;
                        break;
                    }
                }
                let len = bufs.len();
                let result = if valid && (VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&len) {
                    Some(self.backend.write_frame(&bufs))
                } else {
                    None
                };
                self.iov_cache = bufs.into_cache();
                let tally = &mut self.tally;
                match result {
                    None => {
                        log::debug!("virtio-net: malformed tx chain ({len} bytes)");
                        tally.tx_errors += 1;
                    }
                    Some(Ok(_)) => {
                        tally.tx_packets += 1;
                        tally.tx_bytes += (len - VNET_HDR_LEN) as u64;
                        sent += 1;
                    }
                    Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Back to the ring; resumed when the backend is writable.
                        self.tx.go_to_previous_position();
                        self.tx_blocked = true;
                        break 'drain;
                    }
                    Some(Err(e)) => {
                        log::debug!("virtio-net: backend refused a frame: {e}");
                        tally.tx_dropped += 1;
                    }
                }
                self.tx.add_used(mem, head, 0)?;
                self.tx_added += 1;
            }
            if !self.tx.enable_notification(mem)? {
                break;
            }
        }
        Ok(sent)
    }

    /// Receives frames from the backend while the guest has buffers (at most a budget's
    /// worth); returns how many were delivered.
    pub fn process_rx(&mut self) -> Result<usize, virtio_queue::Error> {
        self.rx_stalled = false;
        // Guest slices borrow this, not `self`, while the frame is handled.
        let mem = Arc::clone(&self.mem);
        let result = self.rx_drain(&mem);
        self.tally.flush(&self.counters);
        let delivered = result?;
        signal(
            &mut self.rx,
            RX_QUEUE,
            &mem,
            &mut self.rx_added,
            &*self.interrupt,
        )?;
        Ok(delivered)
    }

    fn rx_drain(&mut self, mem: &GuestView) -> Result<usize, virtio_queue::Error> {
        let mut delivered = 0;
        // The driver need not kick while buffers remain: re-enabled when they run out.
        self.rx.disable_notification(mem)?;
        let mut budget = RX_BUDGET;
        while budget > 0 && !self.backend_gone {
            match self.rx_frame(mem)? {
                RxStep::Delivered => {
                    delivered += 1;
                    budget -= 1;
                }
                RxStep::Dropped => budget -= 1,
                RxStep::Empty => break,
                RxStep::NoBuffers => {
                    // Ask for a kick when buffers come past those already seen (some may have
                    // gone back to the ring, too few for a pending frame); re-check for ones
                    // that just came.
                    let next = self.rx.next_avail();
                    self.rx.set_next_avail(self.rx_seen);
                    let more = self.rx.enable_notification(mem);
                    self.rx.set_next_avail(next);
                    if more? {
                        continue;
                    }
                    self.rx_stalled = true;
                    break;
                }
            }
        }
        Ok(delivered)
    }

    /// Handles readiness of the backend descriptor (`IN`, `OUT`, `ERROR`, `HANG_UP`).
    pub fn process_backend(&mut self, ready: EventSet) -> Result<(), virtio_queue::Error> {
        if self.broken {
            return Ok(());
        }
        if ready.intersects(EventSet::ERROR | EventSet::HANG_UP) && !self.backend_gone {
            log::error!("virtio-net: the backend failed ({ready:?}); no longer polling it");
            self.backend_gone = true;
        }
        if ready.contains(EventSet::OUT) {
            self.tx_blocked = false;
            self.process_tx()?;
        }
        if ready.contains(EventSet::IN) {
            self.process_rx()?;
        }
        Ok(())
    }

    fn rx_frame(&mut self, mem: &GuestView) -> Result<RxStep, virtio_queue::Error> {
        let mut head = IoBufs::new(std::mem::take(&mut self.head_iovs));
        let step = self.rx_frame_into(mem, &mut head);
        self.head_iovs = head.into_cache();
        step
    }

    fn rx_frame_into<'m>(
        &mut self,
        mem: &'m GuestView,
        head: &mut IoBufs<'m>,
    ) -> Result<RxStep, virtio_queue::Error> {
        let Some(first) = self.pop_rx_chain(mem, head)? else {
            return Ok(RxStep::NoBuffers);
        };
        if !first.valid || first.cap < VNET_HDR_LEN {
            log::debug!("virtio-net: malformed rx chain");
            self.tally.rx_errors += 1;
            self.complete_rx(mem, first.head, 0)?;
            return Ok(RxStep::Dropped);
        }
        let (len, from) = match self.pending.take() {
            // Waiting whole in the bounce buffer.
            Some(len) => (len, 0),
            None => match self.read_frame(head, first.cap) {
                (Ok(n), from) if (VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&n) => (n, from),
                (Ok(n), _) => {
                    log::debug!("virtio-net: dropping a {n}-byte frame from the backend");
                    self.rx.go_to_previous_position();
                    self.tally.rx_dropped += 1;
                    return Ok(RxStep::Dropped);
                }
                (Err(e), _) => {
                    self.rx.go_to_previous_position();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::error!("virtio-net: cannot read from the backend: {e}");
                        self.tally.rx_errors += 1;
                        self.backend_gone = true;
                    }
                    return Ok(RxStep::Empty);
                }
            },
        };
        self.finish_frame(mem, first, head, len, from)
    }

    /// Reads a frame for the chain whose `cap` bytes of buffers are `head`. Also returns where
    /// the frame starts to be in the bounce buffer (at its own offsets): 0 when read whole
    /// through it (small chains), `cap` when read straight into the chain, the bounce buffer
    /// taking what does not fit.
    fn read_frame(&mut self, head: &IoBufs<'_>, cap: usize) -> (io::Result<usize>, usize) {
        let mut bufs = IoBufs::new(std::mem::take(&mut self.iov_cache));
        // Room for one byte more than the largest frame, to tell an oversized one.
        let from = if cap <= BOUNCE_READ_MAX {
            bufs.push_bytes(&mut self.bounce[..]);
            0
        } else {
            bufs.extend_from(head);
            if let Some(spill) = self.bounce.get_mut(cap..) {
                bufs.push_bytes(spill);
            }
            cap
        };
        let result = self.backend.read_frame(&bufs);
        self.iov_cache = bufs.into_cache();
        (result, from)
    }

    /// Completes a frame of `len` bytes for the chain `first` (buffers `head`) and, with
    /// merged buffers, further chains. The frame's bytes from `from` on are in the bounce
    /// buffer at their own offsets; those before `from` are already in `head`.
    fn finish_frame<'m>(
        &mut self,
        mem: &'m GuestView,
        first: RxChain,
        head: &IoBufs<'m>,
        len: usize,
        from: usize,
    ) -> Result<RxStep, virtio_queue::Error> {
        if len <= first.cap {
            self.deliver_head(head, len, from, 1);
            self.complete_rx(mem, first.head, frame_bytes(len))?;
            self.count_rx(len);
            return Ok(RxStep::Delivered);
        }
        if !self.mrg_rxbuf {
            // Without merged buffers a frame must fit one chain; the chain serves the next one.
            log::debug!(
                "virtio-net: dropping a {len}-byte frame, the rx buffer has {} bytes",
                first.cap
            );
            self.rx.go_to_previous_position();
            self.tally.rx_dropped += 1;
            return Ok(RxStep::Dropped);
        }
        let mut more = std::mem::take(&mut self.more_chains);
        more.clear();
        let mut bufs = IoBufs::new(std::mem::take(&mut self.more_iovs));
        let mut popped_descs = first.descs;
        let mut at = first.cap;
        let mut malformed = None;
        while at < len {
            bufs = IoBufs::new(bufs.into_cache());
            let Some(chain) = self.pop_rx_chain(mem, &mut bufs)? else {
                break;
            };
            popped_descs += chain.descs;
            if !chain.valid {
                malformed = Some(chain.head);
                break;
            }
            let n = chain.cap.min(len - at);
            bufs.write_at(0, &self.bounce[at..at + n]);
            more.push((chain.head, frame_bytes(n)));
            at += n;
        }
        self.more_iovs = bufs.into_cache();
        let step = if let Some(bad) = malformed {
            // Give everything back empty: the frame's buffers must be consecutive.
            log::debug!("virtio-net: malformed rx chain in a merged frame");
            self.tally.rx_errors += 1;
            self.tally.rx_dropped += 1;
            self.complete_rx(mem, first.head, 0)?;
            for &(head, _) in &more {
                self.complete_rx(mem, head, 0)?;
            }
            self.complete_rx(mem, bad, 0)?;
            RxStep::Dropped
        } else if at < len {
            for _ in 0..=more.len() {
                self.rx.go_to_previous_position();
            }
            if popped_descs >= usize::from(self.rx.size()) {
                log::debug!("virtio-net: a {len}-byte frame does not fit the whole rx ring");
                self.tally.rx_dropped += 1;
                RxStep::Dropped
            } else {
                // Gather the whole frame in the bounce buffer to wait there.
                head.read_into(&mut self.bounce[..from]);
                self.pending = Some(len);
                RxStep::NoBuffers
            }
        } else {
            #[allow(
                clippy::cast_possible_truncation,
                reason = "fewer chains than the u16 ring size"
            )]
            let count = (1 + more.len()) as u16;
            self.deliver_head(head, first.cap, from, count);
            self.complete_rx(mem, first.head, frame_bytes(first.cap))?;
            for &(head, used) in &more {
                self.complete_rx(mem, head, used)?;
            }
            self.count_rx(len);
            RxStep::Delivered
        };
        self.more_chains = more;
        Ok(step)
    }

    /// Puts the frame's first `n` bytes into the chain's buffers `head` (those before `from`
    /// are there already), with `num_buffers` set to `count`.
    fn deliver_head(&mut self, head: &IoBufs<'_>, n: usize, from: usize, count: u16) {
        let num_buffers = count.to_le_bytes();
        let field = NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + num_buffers.len();
        if from == 0 {
            // One copy, header included.
            self.bounce[field].copy_from_slice(&num_buffers);
            head.write_at(0, &self.bounce[..n]);
        } else {
            head.write_at(field.start, &num_buffers);
            if n > from {
                head.write_at(from, &self.bounce[from..n]);
            }
        }
    }

    /// Pops the next rx chain, its writable buffers (each checked to be guest memory and
    /// translated, once) into `bufs`, which must be empty; `None` when the ring is empty.
    fn pop_rx_chain<'m>(
        &mut self,
        mem: &'m GuestView,
        bufs: &mut IoBufs<'m>,
    ) -> Result<Option<RxChain>, virtio_queue::Error> {
        let Some(chain) = self.rx.iter(mem)?.next() else {
            self.rx_seen = self.rx.next_avail();
            return Ok(None);
        };
        let mut out = RxChain {
            head: chain.head_index(),
            cap: 0,
            descs: 0,
            valid: true,
        };
        for desc in chain {
            out.descs += 1;
            // Past a bad descriptor the rest are only counted.
            if out.valid && !(desc.is_write_only() && push_guest(bufs, mem, &desc)) {
                out.valid = false;
            }
        }
        out.cap = bufs.len();
        Ok(Some(out))
    }

    fn complete_rx(
        &mut self,
        mem: &GuestView,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        self.rx.add_used(mem, head, len)?;
        self.rx_added += 1;
        Ok(())
    }

    fn count_rx(&mut self, len: usize) {
        self.tally.rx_packets += 1;
        self.tally.rx_bytes += (len - VNET_HDR_LEN) as u64;
    }

    /// Registers the backend descriptor for what the worker waits for now.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let mut wanted = EventSet::empty();
        if !self.backend_gone && !self.broken {
            if !self.rx_stalled {
                wanted |= EventSet::IN;
            }
            if self.tx_blocked {
                wanted |= EventSet::OUT;
            }
        }
        if wanted == self.registered {
            return;
        }
        let fd = self.backend.raw_fd();
        let data = NetEvent::Backend as u32;
        let result = if wanted.is_empty() {
            // Removed rather than disarmed: epoll reports hang-ups even with no events.
            ops.remove(Events::with_data_raw(fd, data, self.registered))
        } else if self.registered.is_empty() {
            ops.add(Events::with_data_raw(fd, data, wanted))
        } else {
            ops.modify(Events::with_data_raw(fd, data, wanted))
        };
        match result {
            Ok(()) => self.registered = wanted,
            Err(e) => log::error!("virtio-net: cannot watch the backend: {e:?}"),
        }
    }

    fn fail(&mut self, e: virtio_queue::Error) {
        crate::limited_log!(
            log::Level::Warn,
            "virtio-net: queue error, device needs reset: {e}"
        );
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

/// Interrupts the driver for the chains added to `queue` (number `index`) since the last call,
/// if it wants.
fn signal<I: ?Sized + VirtioInterrupt>(
    queue: &mut Queue,
    index: u16,
    mem: &GuestView,
    added: &mut usize,
    interrupt: &I,
) -> Result<(), virtio_queue::Error> {
    if *added == 0 {
        return Ok(());
    }
    *added = 0;
    if queue.needs_notification(mem)?
        && let Err(e) = interrupt.trigger(InterruptKind::Queue(index))
    {
        crate::limited_log!(
            log::Level::Warn,
            "virtio-net: cannot interrupt the guest: {e}"
        );
    }
    Ok(())
}

/// A slice of guest memory with its part of the dirty bitmap.
type GuestSlice<'m> = vm_memory::VolatileSlice<'m, vm_memory::bitmap::BS<'m, super::super::Bitmap>>;

/// Appends the guest buffer of `desc` to `bufs`, checked and translated once; false if any of
/// it is not guest memory. A buffer the device may write (rx) is marked dirty now: frames go
/// in through raw iovecs, which vm-memory does not see.
fn push_guest<'m>(bufs: &mut IoBufs<'m>, mem: &'m GuestView, desc: &Descriptor) -> bool {
    let len = desc.len() as usize;
    if len == 0 {
        return true;
    }
    let push = |bufs: &mut IoBufs<'m>, slice: GuestSlice<'m>| {
        if desc.is_write_only() {
            vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, slice.len());
        }
        bufs.push_slice(&slice);
    };
    let access = if desc.is_write_only() {
        Permissions::Write
    } else {
        Permissions::Read
    };
    // One slice inside a region the view keeps inline; across regions, several.
    let Ok(slices) = GuestMemory::get_slices(mem, desc.addr(), len, access) else {
        return false;
    };
    for slice in slices {
        match slice {
            Ok(slice) => push(bufs, slice),
            Err(_) => return false,
        }
    }
    true
}

/// Frames move synchronously, so nothing is in flight when the worker parks. A frame already
/// read from the tap and waiting for guest buffers stays in the handler across a pause (a
/// snapshot does not keep it: the guest sees a dropped frame).
impl<I: ?Sized + VirtioInterrupt + 'static> DeviceHandler for NetHandler<I>
where
    Self: Send,
{
    fn queue_states(&self) -> Vec<QueueState> {
        vec![self.rx.state(), self.tx.state()]
    }
}

impl<I: ?Sized + VirtioInterrupt> MutEventSubscriber for NetHandler<I> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let result = match events.data() {
            d if d == NetEvent::RxQueue as u32 => {
                let _ = self.rx_notify.read();
                if self.broken {
                    return;
                }
                self.process_rx().map(drop)
            }
            d if d == NetEvent::TxQueue as u32 => {
                let _ = self.tx_notify.read();
                if self.broken {
                    return;
                }
                self.process_tx().map(drop)
            }
            d if d == NetEvent::Backend as u32 => self.process_backend(events.event_set()),
            _ => return,
        };
        if let Err(e) = result {
            self.fail(e);
        }
        self.update_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, event) in [
            (&self.rx_notify, NetEvent::RxQueue),
            (&self.tx_notify, NetEvent::TxQueue),
        ] {
            if let Err(e) = ops.add(Events::with_data(fd, event as u32, EventSet::IN)) {
                log::error!("virtio-net: cannot watch a queue: {e:?}");
            }
        }
        // Frames and buffers posted before activation are handled now.
        let result = self.process_tx().and_then(|_| self.process_rx());
        if let Err(e) = result {
            self.fail(e);
        }
        self.update_interest(ops);
    }
}

/// A length within one frame as the used ring's `u32` (a frame is read into a buffer of at
/// most [`MAX_BUFFER_LEN`] bytes, and a chain takes no more of it than the frame's length).
#[allow(
    clippy::cast_possible_truncation,
    reason = "at most MAX_BUFFER_LEN bytes"
)]
fn frame_bytes(n: usize) -> u32 {
    n as u32
}
