//! Device and tx tests over a socket-pair backend. Shared helpers for the rx tests in
//! `tests_rx.rs` and the tap tests in `tests_tap.rs` live here too.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;

pub(super) const RX_RING: u64 = 0;
pub(super) const TX_RING: u64 = 0x1_0000;
pub(super) const RX_BUF: u64 = 0x10_0000;
pub(super) const TX_BUF: u64 = 0x40_0000;
pub(super) const R: u32 = 0;
pub(super) const W: u32 = VRING_DESC_F_WRITE;
pub(super) const MEM_SIZE: usize = 0x100_0000;

pub(super) fn bit(b: u32) -> u64 {
    1 << b
}

/// Features a Linux guest accepts.
pub(super) fn linux_features() -> u64 {
    VIRTIO_F_VERSION_1
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
}

pub(super) use crate::virtio::test_utils::CountingInterrupt;

impl CountingInterrupt {
    pub fn count(&self) -> usize {
        self.queue.load(Ordering::SeqCst)
    }
}

pub(super) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Descriptors of one chain starting at table index `first`. Each part is (address, length,
/// R or W).
pub(super) fn chain(first: u16, parts: &[(u64, u32, u32)]) -> Vec<RawDescriptor> {
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let flags = if i + 1 == parts.len() {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let next = first + i as u16 + 1;
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
        })
        .collect()
}

/// A `virtio_net_hdr_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Hdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl Hdr {
    /// A TSO frame needing its TCP checksum, as a Linux guest sends it.
    pub fn tso4() -> Self {
        Self {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    pub fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }
}

/// A frame of `len` bytes whose content depends on `seed`.
pub(super) fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A device on a socket pair with both queues in `mem`, the worker driven by hand.
pub(super) struct TestNet {
    pub net: Net,
    pub handler: NetHandler<CountingInterrupt>,
    pub interrupt: Arc<CountingInterrupt>,
    /// The network's end of the socket pair.
    pub peer: UnixDatagram,
    /// The device's end (to read the offloads set on it).
    pub backend: SocketBackend,
}

impl TestNet {
    pub fn new(
        mem: &GuestMemoryMmap,
        rxq: &MockSplitQueue<'_, GuestMemoryMmap>,
        txq: &MockSplitQueue<'_, GuestMemoryMmap>,
        features: u64,
    ) -> Self {
        let (backend, peer) = SocketBackend::pair().unwrap();
        Self::with_backend(mem, rxq, txq, features, backend, peer)
    }

    pub fn with_backend(
        mem: &GuestMemoryMmap,
        rxq: &MockSplitQueue<'_, GuestMemoryMmap>,
        txq: &MockSplitQueue<'_, GuestMemoryMmap>,
        features: u64,
        backend: SocketBackend,
        peer: UnixDatagram,
    ) -> Self {
        let watch = backend.duplicate().unwrap();
        let mut net = Net::with_backend(test_config(), Box::new(backend)).unwrap();
        net.ack_features(features);
        let interrupt = Arc::new(CountingInterrupt::default());
        let handler = net
            .handler(mem.clone(), active(rxq), active(txq), interrupt.clone())
            .unwrap();
        Self {
            net,
            handler,
            interrupt,
            peer,
            backend: watch,
        }
    }

    pub fn counter(&self, pick: impl Fn(&NetCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
        NetCounters::get(pick(&self.net.counters()))
    }

    /// Sends header + frame from the network side.
    pub fn send(&self, hdr: &Hdr, frame: &[u8]) {
        let mut datagram = hdr.bytes().to_vec();
        datagram.extend_from_slice(frame);
        self.peer.send(&datagram).unwrap();
    }

    /// The next datagram the device sent, if any.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 100];
        match self.peer.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("peer recv: {e}"),
        }
    }
}

pub(super) fn test_config() -> NetConfig {
    NetConfig {
        tap: "test0".into(),
        mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        ..Default::default()
    }
}

pub(super) fn active(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> ActiveQueue {
    ActiveQueue {
        queue: vq.create_queue().unwrap(),
        notify: EventFd::new(EFD_NONBLOCK).unwrap(),
    }
}

/// Used ring entry `i`: (head, len).
pub(super) fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

pub(super) fn used_count(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    vq.used().idx().load()
}

/// Puts `hdr` + `frame` at `addr` in guest memory.
pub(super) fn put_frame(mem: &GuestMemoryMmap, addr: u64, hdr: &Hdr, frame: &[u8]) {
    mem.write_slice(&hdr.bytes(), GuestAddress(addr)).unwrap();
    mem.write_slice(frame, GuestAddress(addr + VNET_HDR_LEN as u64))
        .unwrap();
}

pub(super) fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
    out
}

/// Waits up to 10 s for `cond`.
pub(super) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn device_offers_two_queues_and_the_net_features() {
    let (backend, _peer) = SocketBackend::pair().unwrap();
    let net = Net::with_backend(test_config(), Box::new(backend)).unwrap();
    assert_eq!(net.device_type(), TYPE_NET);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let f = net.features();
    assert_eq!(f & linux_features(), linux_features());
    assert_ne!(f & bit(VIRTIO_RING_F_EVENT_IDX), 0);
    assert_eq!(f & bit(VIRTIO_NET_F_MTU), 0, "MTU only when configured");
    assert_eq!(f & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(f & bit(VIRTIO_NET_F_MQ), 0);

    let (backend, _peer) = SocketBackend::pair().unwrap();
    let config = NetConfig {
        mtu: Some(1400),
        ..test_config()
    };
    let net = Net::with_backend(config, Box::new(backend)).unwrap();
    assert_ne!(net.features() & bit(VIRTIO_NET_F_MTU), 0);
}

#[test]
fn config_space_holds_mac_link_up_one_queue_pair_and_mtu() {
    let (backend, _peer) = SocketBackend::pair().unwrap();
    let config = NetConfig {
        mtu: Some(9000),
        ..test_config()
    };
    let net = Net::with_backend(config, Box::new(backend)).unwrap();
    let mut c = [0xFFu8; 16];
    net.read_config(0, &mut c);
    assert_eq!(&c[0..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(
        u16::from_le_bytes([c[6], c[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    assert_eq!(&c[12..], &[0; 4], "beyond the config space reads 0");
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(status, [1, 0]);
}

#[test]
fn missing_mac_becomes_a_random_locally_administered_unicast_one() {
    let mut macs = Vec::new();
    for _ in 0..8 {
        let (backend, _peer) = SocketBackend::pair().unwrap();
        let config = NetConfig {
            mac: None,
            ..test_config()
        };
        let mac = Net::with_backend(config, Box::new(backend)).unwrap().mac();
        assert_eq!(mac[0] & 0x01, 0, "unicast: {mac:02x?}");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered: {mac:02x?}");
        macs.push(mac);
    }
    macs.dedup();
    assert!(macs.len() > 1, "MACs are random");
}

#[test]
fn multicast_mac_and_tiny_mtu_are_rejected() {
    let (backend, _peer) = SocketBackend::pair().unwrap();
    let config = NetConfig {
        mac: Some([0x01, 0, 0x5e, 0, 0, 1]),
        ..test_config()
    };
    let err = Net::with_backend(config, Box::new(backend)).unwrap_err();
    assert!(matches!(err, NetError::MulticastMac(_)), "{err}");
    assert!(err.to_string().contains("01:00:5e:00:00:01"), "{err}");
    let (backend, _peer) = SocketBackend::pair().unwrap();
    let config = NetConfig {
        mtu: Some(60),
        ..test_config()
    };
    let err = Net::with_backend(config, Box::new(backend)).unwrap_err();
    assert!(matches!(err, NetError::MtuTooSmall(60)), "{err}");
}

#[test]
fn tap_offloads_follow_the_acked_guest_features() {
    assert_eq!(tap_offloads(0), 0);
    assert_eq!(
        tap_offloads(linux_features()),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), libc::TUN_F_CSUM);
    // TSO without checksum offload is not turned on.
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6)),
        0
    );
    // Host-side features do not change what the tap sends.
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)),
        0
    );
}

#[test]
fn activation_sets_the_backend_offloads_to_the_acked_features() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let t = TestNet::new(&mem, &rxq, &txq, linux_features());
    assert_eq!(
        t.backend.offload(),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    let t = TestNet::new(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    assert_eq!(t.backend.offload(), 0);
}

#[test]
fn tx_frame_reaches_the_backend_with_its_offload_header() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    let data = frame(4000, 1);
    put_frame(&mem, TX_BUF, &Hdr::tso4(), &data);
    let total = (VNET_HDR_LEN + data.len()) as u32;
    txq.add_desc_chains(&chain(0, &[(TX_BUF, total, R)]), 0)
        .unwrap();

    assert_eq!(t.handler.process_tx().unwrap(), 1);
    let got = t.recv().expect("frame sent");
    assert_eq!(Hdr::parse(&got[..VNET_HDR_LEN]), Hdr::tso4());
    assert_eq!(&got[VNET_HDR_LEN..], &data[..]);
    assert_eq!(used_count(&txq), 1);
    assert_eq!(used(&txq, 0), (0, 0), "tx chains are used with length 0");
    assert_eq!(t.interrupt.count(), 1);
    assert_eq!(t.counter(|c| &c.tx_packets), 1);
    assert_eq!(t.counter(|c| &c.tx_bytes), 4000);
}

#[test]
fn tx_frame_spanning_several_descriptors_is_sent_whole() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    let hdr = Hdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        csum_start: 34,
        csum_offset: 6,
        ..Default::default()
    };
    let data = frame(3000, 2);
    // Header split 4 + 8 bytes, frame over three buffers in scattered places.
    let h = hdr.bytes();
    mem.write_slice(&h[..4], GuestAddress(TX_BUF)).unwrap();
    mem.write_slice(&h[4..], GuestAddress(TX_BUF + 0x1000))
        .unwrap();
    mem.write_slice(&data[..100], GuestAddress(TX_BUF + 0x2000))
        .unwrap();
    mem.write_slice(&data[100..2000], GuestAddress(TX_BUF + 0x8000))
        .unwrap();
    mem.write_slice(&data[2000..], GuestAddress(TX_BUF + 0x3000))
        .unwrap();
    let parts = [
        (TX_BUF, 4, R),
        (TX_BUF + 0x1000, 8, R),
        (TX_BUF + 0x2000, 100, R),
        (TX_BUF + 0x8000, 1900, R),
        (TX_BUF + 0x3000, 1000, R),
    ];
    txq.add_desc_chains(&chain(0, &parts), 0).unwrap();

    t.handler.process_tx().unwrap();
    let got = t.recv().expect("frame sent");
    assert_eq!(Hdr::parse(&got[..VNET_HDR_LEN]), hdr);
    assert_eq!(&got[VNET_HDR_LEN..], &data[..]);
    assert!(t.recv().is_none(), "one chain is one frame");
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted_and_the_next_frame_goes_through() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    let data = frame(60, 3);
    put_frame(&mem, TX_BUF + 0x10_0000, &Hdr::default(), &data);
    let too_big = (MAX_BUFFER_LEN + 1) as u32;
    let mut descs = Vec::new();
    // Shorter than the header.
    descs.extend(chain(0, &[(TX_BUF, 8, R)]));
    // A device-writable descriptor.
    descs.extend(chain(1, &[(TX_BUF, 12, R), (TX_BUF + 0x1000, 60, W)]));
    // Outside guest memory.
    descs.extend(chain(
        3,
        &[(TX_BUF, 12, R), (MEM_SIZE as u64 + 0x1000, 60, R)],
    ));
    // Larger than any frame.
    descs.extend(chain(5, &[(TX_BUF, too_big, R)]));
    // A good one.
    descs.extend(chain(6, &[(TX_BUF + 0x10_0000, 72, R)]));
    txq.add_desc_chains(&descs, 0).unwrap();

    assert_eq!(t.handler.process_tx().unwrap(), 1);
    let got = t.recv().expect("the good frame is sent");
    assert_eq!(&got[VNET_HDR_LEN..], &data[..]);
    assert!(t.recv().is_none(), "malformed chains send nothing");
    assert_eq!(used_count(&txq), 5, "every chain is returned");
    assert_eq!(t.counter(|c| &c.tx_errors), 4);
    assert_eq!(t.counter(|c| &c.tx_packets), 1);
    assert_eq!(t.interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn tx_frames_the_backend_cannot_take_wait_until_it_is_writable() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    // virtio-queue's mock lays the used ring over the second half of the available ring:
    // tests post fewer chains than half a queue.
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 128);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    // More frames than a Unix datagram socket queues (net.unix.max_dgram_qlen, 10 by default
    // in this kind of namespace, up to 512 elsewhere): large ones fill its byte budget too.
    const FRAMES: u16 = 48;
    let len = 60_000;
    let mut descs = Vec::new();
    for i in 0..FRAMES {
        let addr = TX_BUF + u64::from(i) * 0x1_0000;
        put_frame(
            &mem,
            addr,
            &Hdr::default(),
            &frame(len - VNET_HDR_LEN, i as u8),
        );
        descs.extend(chain(i, &[(addr, len as u32, R)]));
    }
    txq.add_desc_chains(&descs, 0).unwrap();

    let sent = t.handler.process_tx().unwrap();
    assert!(
        t.handler.tx_blocked(),
        "the socket filled up after {sent} frames"
    );
    assert!(sent < usize::from(FRAMES));
    assert_eq!(
        usize::from(used_count(&txq)),
        sent,
        "waiting frames stay in the ring"
    );

    let mut seen = Vec::new();
    while seen.len() < usize::from(FRAMES) {
        while let Some(got) = t.recv() {
            seen.push(got[VNET_HDR_LEN..].to_vec());
        }
        // What the worker does when epoll reports the backend writable.
        t.handler.process_backend(EventSet::OUT).unwrap();
        assert!(seen.len() < 10 * usize::from(FRAMES), "no progress");
    }
    let seeds: Vec<u8> = seen.iter().map(|f| f[0]).collect();
    let expected: Vec<u8> = (0..FRAMES).map(|i| i as u8).collect();
    assert_eq!(seeds, expected, "every frame once, in order");
    for (i, got) in seen.iter().enumerate() {
        assert!(
            *got == frame(len - VNET_HDR_LEN, i as u8),
            "frame {i} intact"
        );
    }
    assert_eq!(used_count(&txq), FRAMES);
    assert_eq!(t.counter(|c| &c.tx_packets), u64::from(FRAMES));
    assert_eq!(t.counter(|c| &c.tx_dropped), 0);
}

#[test]
fn one_interrupt_covers_a_batch_of_tx_frames() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    let mut descs = Vec::new();
    for i in 0..4u16 {
        let addr = TX_BUF + u64::from(i) * 0x1000;
        put_frame(&mem, addr, &Hdr::default(), &frame(64, i as u8));
        descs.extend(chain(i, &[(addr, 76, R)]));
    }
    txq.add_desc_chains(&descs, 0).unwrap();
    assert_eq!(t.handler.process_tx().unwrap(), 4);
    assert_eq!(t.interrupt.count(), 1);
    // Nothing new: no interrupt.
    assert_eq!(t.handler.process_tx().unwrap(), 0);
    assert_eq!(t.interrupt.count(), 1);
}

#[test]
fn activation_needs_both_queues() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let (backend, _peer) = SocketBackend::pair().unwrap();
    let mut net = Net::with_backend(test_config(), Box::new(backend)).unwrap();
    let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(CountingInterrupt::default());
    let err = net
        .activate(mem.clone(), interrupt, vec![active(&rxq)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 1
            }
        ),
        "{err}"
    );
}

/// A backend that counts reads, to see whether the worker polls it.
#[derive(Debug)]
pub(super) struct CountingBackend {
    pub inner: SocketBackend,
    pub reads: Arc<AtomicUsize>,
}

impl NetBackend for CountingBackend {
    fn read_frame(&mut self, bufs: &IoBufs<'_>) -> std::io::Result<usize> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_frame(bufs)
    }
    fn write_frame(&mut self, bufs: &IoBufs<'_>) -> std::io::Result<usize> {
        self.inner.write_frame(bufs)
    }
    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.raw_fd()
    }
    fn set_offload(&mut self, flags: u32) -> std::io::Result<()> {
        self.inner.set_offload(flags)
    }
    fn try_clone(&self) -> std::io::Result<Box<dyn NetBackend>> {
        Ok(Box::new(Self {
            inner: self.inner.duplicate()?,
            reads: self.reads.clone(),
        }))
    }
}

#[test]
fn worker_thread_moves_frames_both_ways_and_idles_without_rx_buffers() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let (inner, peer) = SocketBackend::pair().unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let backend = CountingBackend {
        inner,
        reads: reads.clone(),
    };
    let mut net = Net::with_backend(test_config(), Box::new(backend)).unwrap();
    net.ack_features(linux_features());
    let (rx, tx) = (active(&rxq), active(&txq));
    let (rx_kick, tx_kick) = (
        rx.notify.try_clone().unwrap(),
        tx.notify.try_clone().unwrap(),
    );
    let interrupt = Arc::new(CountingInterrupt::default());
    net.activate(mem.clone(), interrupt.clone(), vec![rx, tx])
        .unwrap();

    // A frame arrives while the guest has no rx buffer: the worker reads nothing and stops
    // polling the backend instead of spinning on it.
    let data = frame(100, 9);
    let mut datagram = Hdr::default().bytes().to_vec();
    datagram.extend_from_slice(&data);
    peer.send(&datagram).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(reads.load(Ordering::SeqCst), 0, "no buffer, no read");
    assert_eq!(used_count(&rxq), 0);

    // The guest posts a buffer and kicks: the frame is delivered.
    rxq.add_desc_chains(&chain(0, &[(RX_BUF, 2048, W)]), 0)
        .unwrap();
    rx_kick.write(1).unwrap();
    wait_for("rx frame", || used_count(&rxq) == 1);
    assert_eq!(used(&rxq, 0), (0, (VNET_HDR_LEN + data.len()) as u32));
    assert_eq!(read_guest(&mem, RX_BUF + 12, data.len()), data);
    wait_for("rx interrupt", || interrupt.count() >= 1);

    // Out of buffers again: a second frame waits in the socket.
    peer.send(&datagram).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let reads_idle = reads.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(reads.load(Ordering::SeqCst), reads_idle, "no busy loop");

    // TX through the kick eventfd.
    let out = frame(64, 4);
    put_frame(&mem, TX_BUF, &Hdr::default(), &out);
    txq.add_desc_chains(&chain(0, &[(TX_BUF, 76, R)]), 0)
        .unwrap();
    tx_kick.write(1).unwrap();
    peer.set_nonblocking(false).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[VNET_HDR_LEN..n], &out[..]);

    // Then the second rx frame, once a buffer comes.
    rxq.add_desc_chains(&chain(1, &[(RX_BUF + 0x1000, 2048, W)]), 0)
        .unwrap();
    rx_kick.write(1).unwrap();
    wait_for("second rx frame", || used_count(&rxq) == 2);
    net.reset();
    let counters = net.counters();
    assert_eq!(NetCounters::get(&counters.rx_packets), 2);
    assert_eq!(NetCounters::get(&counters.tx_packets), 1);
    assert_eq!(interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn paused_device_neither_receives_nor_sends_until_resumed() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let (inner, peer) = SocketBackend::pair().unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let backend = CountingBackend {
        inner,
        reads: reads.clone(),
    };
    let mut net = Net::with_backend(test_config(), Box::new(backend)).unwrap();
    net.ack_features(linux_features());
    let (rx, tx) = (active(&rxq), active(&txq));
    let tx_kick = tx.notify.try_clone().unwrap();
    let interrupt = Arc::new(CountingInterrupt::default());
    rxq.add_desc_chains(&chain(0, &[(RX_BUF, 2048, W)]), 0)
        .unwrap();
    net.pause().unwrap();
    net.activate(mem.clone(), interrupt.clone(), vec![rx, tx])
        .unwrap();
    let data = frame(100, 9);
    let mut datagram = Hdr::default().bytes().to_vec();
    datagram.extend_from_slice(&data);
    peer.send(&datagram).unwrap();
    let out = frame(64, 4);
    put_frame(&mem, TX_BUF, &Hdr::default(), &out);
    txq.add_desc_chains(&chain(0, &[(TX_BUF, 76, R)]), 0)
        .unwrap();
    tx_kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(reads.load(Ordering::SeqCst), 0, "tap read while paused");
    assert_eq!((used_count(&rxq), used_count(&txq)), (0, 0));
    assert_eq!(interrupt.count(), 0);
    let queues = net.active_queue_states().unwrap();
    assert_eq!((queues[0].next_avail, queues[1].next_avail), (0, 0));

    net.resume();
    wait_for("rx frame after resume", || used_count(&rxq) == 1);
    assert_eq!(read_guest(&mem, RX_BUF + 12, data.len()), data);
    peer.set_nonblocking(false).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[VNET_HDR_LEN..n], &out[..]);
    net.reset();
}
