//! The virtio-net worker: moves frames between the rx/tx queues and the [`NetBackend`].
//!
//! TX: each chain (header + frame, device-readable only) is gathered straight from guest
//! memory into one `writev`. When the backend cannot take a frame (`EAGAIN`) the chain goes
//! back to the available ring and the worker waits for the backend to become writable: no frame
//! is lost.
//!
//! RX: a frame is read only once a guest chain is at hand, straight into that chain's buffers,
//! with a host bounce buffer behind them for what does not fit. With `VIRTIO_NET_F_MRG_RXBUF`
//! the overflow is copied into further chains (`num_buffers` says how many); without it a frame
//! larger than its chain is dropped and counted. When the guest has no buffer left the backend
//! is no longer polled for reads (frames wait in the tap's own queue) until the driver kicks the
//! rx queue. A frame already read that needs more buffers than are posted waits in the bounce
//! buffer (one pending frame) and goes first once the driver adds buffers; it is dropped and
//! counted only if the whole ring could not hold it.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::super::{ActiveQueue, GuestMemoryMmap, InterruptKind, VirtioInterrupt};
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
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

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

/// The worker's side of a virtio-net device: owns both queues and the backend.
#[allow(missing_debug_implementations)]
pub struct NetHandler<I: ?Sized + VirtioInterrupt = dyn VirtioInterrupt> {
    mem: GuestMemoryMmap,
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
    /// Writable buffers of the chain taking a frame's header.
    head_descs: Vec<(GuestAddress, usize)>,
    /// Writable buffers of a further chain of a merged frame.
    more_descs: Vec<(GuestAddress, usize)>,
    /// Further chains of a merged frame and their used lengths.
    more_chains: Vec<(u16, u32)>,
    iov_cache: IovecCache,
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
            mem,
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
            head_descs: Vec::new(),
            more_descs: Vec::new(),
            more_chains: Vec::new(),
            iov_cache: IovecCache::default(),
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
        let mut sent = 0;
        'drain: loop {
            self.tx.disable_notification(&self.mem)?;
            while let Some(chain) = self.tx.iter(&self.mem)?.next() {
                let head = chain.head_index();
                let mut bufs = IoBufs::new(std::mem::take(&mut self.iov_cache));
                let mut valid = true;
                'gather: for desc in chain {
                    if desc.is_write_only() {
                        valid = false;
                        break;
                    }
                    for slice in self.mem.get_slices(desc.addr(), desc.len() as usize) {
                        match slice {
                            Ok(slice) => bufs.push_slice(&slice),
                            Err(_) => {
                                valid = false;
                                break 'gather;
                            }
                        }
                    }
                }
                let len = bufs.len();
                let result = if valid && (VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&len) {
                    Some(self.backend.write_frame(&bufs))
                } else {
                    None
                };
                self.iov_cache = bufs.into_cache();
                let counters = &self.counters;
                match result {
                    None => {
                        log::debug!("virtio-net: malformed tx chain ({len} bytes)");
                        counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {
                        counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                        let bytes = (len - VNET_HDR_LEN) as u64;
                        counters.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
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
                        counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.tx.add_used(&self.mem, head, 0)?;
                self.tx_added += 1;
            }
            if !self.tx.enable_notification(&self.mem)? {
                break;
            }
        }
        signal(
            &mut self.tx,
            &self.mem,
            &mut self.tx_added,
            &*self.interrupt,
        )?;
        Ok(sent)
    }

    /// Receives frames from the backend while the guest has buffers (at most a budget's
    /// worth); returns how many were delivered.
    pub fn process_rx(&mut self) -> Result<usize, virtio_queue::Error> {
        let mut delivered = 0;
        self.rx_stalled = false;
        // The driver need not kick while buffers remain: re-enabled when they run out.
        self.rx.disable_notification(&self.mem)?;
        let mut budget = RX_BUDGET;
        while budget > 0 && !self.backend_gone {
            match self.rx_frame()? {
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
                    let more = self.rx.enable_notification(&self.mem);
                    self.rx.set_next_avail(next);
                    if more? {
                        continue;
                    }
                    self.rx_stalled = true;
                    break;
                }
            }
        }
        signal(
            &mut self.rx,
            &self.mem,
            &mut self.rx_added,
            &*self.interrupt,
        )?;
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

    fn rx_frame(&mut self) -> Result<RxStep, virtio_queue::Error> {
        let mut descs = std::mem::take(&mut self.head_descs);
        let step = self.rx_frame_into(&mut descs);
        self.head_descs = descs;
        step
    }

    fn rx_frame_into(
        &mut self,
        descs: &mut Vec<(GuestAddress, usize)>,
    ) -> Result<RxStep, virtio_queue::Error> {
        let Some(first) = self.pop_rx_chain(descs)? else {
            return Ok(RxStep::NoBuffers);
        };
        if !first.valid || first.cap < VNET_HDR_LEN {
            log::debug!("virtio-net: malformed rx chain");
            self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
            self.complete_rx(first.head, 0)?;
            return Ok(RxStep::Dropped);
        }
        let (len, rest) = match self.pending.take() {
            Some(len) => {
                // The waiting frame's start goes to this chain.
                let n = len.min(first.cap);
                copy_to_guest(&self.mem, descs, &self.bounce[..n]);
                (len, n..len)
            }
            None => match self.read_frame(descs, first.cap) {
                Ok(n) if (VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&n) => {
                    (n, 0..n.saturating_sub(first.cap))
                }
                Ok(n) => {
                    log::debug!("virtio-net: dropping a {n}-byte frame from the backend");
                    self.rx.go_to_previous_position();
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    return Ok(RxStep::Dropped);
                }
                Err(e) => {
                    self.rx.go_to_previous_position();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::error!("virtio-net: cannot read from the backend: {e}");
                        self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                        self.backend_gone = true;
                    }
                    return Ok(RxStep::Empty);
                }
            },
        };
        self.finish_frame(first, descs, len, rest)
    }

    /// Reads a frame into the chain's buffers, then the bounce buffer.
    fn read_frame(&mut self, descs: &[(GuestAddress, usize)], cap: usize) -> io::Result<usize> {
        let mut bufs = IoBufs::new(std::mem::take(&mut self.iov_cache));
        for &(addr, len) in descs {
            // Checked by pop_rx_chain.
            for slice in self.mem.get_slices(addr, len).flatten() {
                bufs.push_slice(&slice);
            }
        }
        // One byte more than the largest frame, to tell an oversized one.
        let spill = (MAX_BUFFER_LEN + 1).saturating_sub(cap);
        bufs.push_bytes(&mut self.bounce[..spill]);
        let result = self.backend.read_frame(&bufs);
        self.iov_cache = bufs.into_cache();
        result
    }

    /// Completes a frame of `len` bytes whose start is in the chain `first` and whose
    /// `rest` is in the bounce buffer.
    fn finish_frame(
        &mut self,
        first: RxChain,
        descs: &[(GuestAddress, usize)],
        len: usize,
        rest: Range<usize>,
    ) -> Result<RxStep, virtio_queue::Error> {
        if rest.is_empty() {
            write_at(&self.mem, descs, NUM_BUFFERS_OFFSET, &1u16.to_le_bytes());
            self.complete_rx(first.head, len as u32)?;
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
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(RxStep::Dropped);
        }
        let mut more = std::mem::take(&mut self.more_chains);
        let mut more_descs = std::mem::take(&mut self.more_descs);
        more.clear();
        let mut popped_descs = first.descs;
        let mut at = rest.start;
        let mut malformed = None;
        while at < rest.end {
            let Some(chain) = self.pop_rx_chain(&mut more_descs)? else {
                break;
            };
            popped_descs += chain.descs;
            if !chain.valid {
                malformed = Some(chain.head);
                break;
            }
            let n = chain.cap.min(rest.end - at);
            copy_to_guest(&self.mem, &more_descs, &self.bounce[at..at + n]);
            more.push((chain.head, n as u32));
            at += n;
        }
        let step = if let Some(bad) = malformed {
            // Give everything back empty: the frame's buffers must be consecutive.
            log::debug!("virtio-net: malformed rx chain in a merged frame");
            self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            self.complete_rx(first.head, 0)?;
            for &(head, _) in &more {
                self.complete_rx(head, 0)?;
            }
            self.complete_rx(bad, 0)?;
            RxStep::Dropped
        } else if at < rest.end {
            for _ in 0..=more.len() {
                self.rx.go_to_previous_position();
            }
            if popped_descs >= usize::from(self.rx.size()) {
                log::debug!("virtio-net: a {len}-byte frame does not fit the whole rx ring");
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                RxStep::Dropped
            } else {
                if rest.start == 0 {
                    // Freshly read: gather the whole frame in the bounce buffer to wait there.
                    self.bounce.copy_within(rest.clone(), first.cap);
                    copy_from_guest(&self.mem, descs, &mut self.bounce[..first.cap]);
                }
                self.pending = Some(len);
                RxStep::NoBuffers
            }
        } else {
            let count = (1 + more.len()) as u16;
            write_at(&self.mem, descs, NUM_BUFFERS_OFFSET, &count.to_le_bytes());
            self.complete_rx(first.head, len.min(first.cap) as u32)?;
            for &(head, used) in &more {
                self.complete_rx(head, used)?;
            }
            self.count_rx(len);
            RxStep::Delivered
        };
        self.more_chains = more;
        self.more_descs = more_descs;
        Ok(step)
    }

    /// Pops the next rx chain, its writable buffers into `descs`; `None` when the ring is
    /// empty.
    fn pop_rx_chain(
        &mut self,
        descs: &mut Vec<(GuestAddress, usize)>,
    ) -> Result<Option<RxChain>, virtio_queue::Error> {
        let Some(chain) = self.rx.iter(&self.mem)?.next() else {
            self.rx_seen = self.rx.next_avail();
            return Ok(None);
        };
        let mut out = RxChain {
            head: chain.head_index(),
            cap: 0,
            descs: 0,
            valid: true,
        };
        descs.clear();
        for desc in chain {
            out.descs += 1;
            let len = desc.len() as usize;
            let in_memory = self.mem.get_slices(desc.addr(), len).all(|s| s.is_ok());
            if !desc.is_write_only() || !in_memory {
                out.valid = false;
                continue;
            }
            descs.push((desc.addr(), len));
            out.cap += len;
        }
        Ok(Some(out))
    }

    fn complete_rx(&mut self, head: u16, len: u32) -> Result<(), virtio_queue::Error> {
        self.rx.add_used(&self.mem, head, len)?;
        self.rx_added += 1;
        Ok(())
    }

    fn count_rx(&self, len: usize) {
        self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
        let bytes = (len - VNET_HDR_LEN) as u64;
        self.counters.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
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
        log::warn!("virtio-net: queue error, device needs reset: {e}");
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

/// Interrupts the driver for the chains added to `queue` since the last call, if it wants.
fn signal<I: ?Sized + VirtioInterrupt>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    added: &mut usize,
    interrupt: &I,
) -> Result<(), virtio_queue::Error> {
    if *added == 0 {
        return Ok(());
    }
    *added = 0;
    if queue.needs_notification(mem)?
        && let Err(e) = interrupt.trigger(InterruptKind::Queue)
    {
        log::warn!("virtio-net: cannot interrupt the guest: {e}");
    }
    Ok(())
}

/// Writes `bytes` at `offset` into the buffers `descs` (checked to be guest memory).
fn write_at(mem: &GuestMemoryMmap, descs: &[(GuestAddress, usize)], offset: usize, bytes: &[u8]) {
    let mut skip = offset;
    let mut src = bytes;
    for &(addr, len) in descs {
        if src.is_empty() {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(src.len());
        if let Err(e) = mem.write_slice(&src[..n], addr.unchecked_add(skip as u64)) {
            log::debug!("virtio-net: cannot write an rx buffer: {e}");
        }
        src = &src[n..];
        skip = 0;
    }
}

/// Copies `bytes` into the buffers `descs`, in order, as far as they go.
fn copy_to_guest(mem: &GuestMemoryMmap, descs: &[(GuestAddress, usize)], bytes: &[u8]) {
    write_at(mem, descs, 0, bytes);
}

/// Fills `out` from the buffers `descs`, in order.
fn copy_from_guest(mem: &GuestMemoryMmap, descs: &[(GuestAddress, usize)], out: &mut [u8]) {
    let mut at = 0;
    for &(addr, len) in descs {
        if at == out.len() {
            break;
        }
        let n = len.min(out.len() - at);
        if let Err(e) = mem.read_slice(&mut out[at..at + n], addr) {
            log::debug!("virtio-net: cannot read an rx buffer: {e}");
        }
        at += n;
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
