//! RX tests over a socket-pair backend: headers, merged buffers, exhaustion, drops.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::virtio_net::*;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::tests::*;
use super::*;

fn without_mrg() -> u64 {
    linux_features() & !bit(VIRTIO_NET_F_MRG_RXBUF)
}

#[test]
fn rx_frame_lands_with_its_offload_header_and_num_buffers_one() {
    for features in [linux_features(), without_mrg()] {
        let mem = memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
        let mut t = TestNet::new(&mem, &rxq, &txq, features);
        let (start, head) = (0, 0);
        rxq.add_desc_chains(&chain(head, &[(RX_BUF, 0x1_1000, W)]), head)
            .unwrap();
        let data = frame(5000, 5);
        // Whatever num_buffers the backend leaves there, the device writes its own.
        let sent = Hdr {
            num_buffers: 0xBEEF,
            ..Hdr::tso4()
        };
        t.send(&sent, &data);

        assert_eq!(t.handler.process_rx().unwrap(), 1);
        assert_eq!(used_count(&rxq), start + 1);
        let (id, len) = used(&rxq, usize::from(start));
        assert_eq!(
            (id, len),
            (u32::from(head), (VNET_HDR_LEN + data.len()) as u32)
        );
        let got = Hdr::parse(&read_guest(&mem, RX_BUF, VNET_HDR_LEN));
        assert_eq!(
            got,
            Hdr {
                num_buffers: 1,
                ..Hdr::tso4()
            }
        );
        assert_eq!(read_guest(&mem, RX_BUF + 12, data.len()), data);
        assert_eq!(t.counter(|c| &c.rx_packets), 1);
        assert_eq!(t.counter(|c| &c.rx_bytes), 5000);
        assert_eq!(t.interrupt.count(), 1);
    }
}

#[test]
fn rx_frame_fills_several_descriptors_of_one_chain() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, without_mrg());
    // Header split over two buffers, the frame over two more.
    let parts = [
        (RX_BUF, 6, W),
        (RX_BUF + 0x1000, 10, W),
        (RX_BUF + 0x2000, 1000, W),
        (RX_BUF + 0x8000, 2000, W),
    ];
    rxq.add_desc_chains(&chain(0, &parts), 0).unwrap();
    let data = frame(2500, 6);
    t.send(&Hdr::default(), &data);

    assert_eq!(t.handler.process_rx().unwrap(), 1);
    let mut got = read_guest(&mem, RX_BUF, 6);
    got.extend(read_guest(&mem, RX_BUF + 0x1000, 10));
    got.extend(read_guest(&mem, RX_BUF + 0x2000, 1000));
    got.extend(read_guest(&mem, RX_BUF + 0x8000, 2000));
    assert_eq!(Hdr::parse(&got[..12]).num_buffers, 1);
    assert_eq!(&got[12..12 + data.len()], &data[..]);
    assert_eq!(used(&rxq, 0), (0, (12 + data.len()) as u32));
}

/// Posts `n` single-buffer chains of `size` bytes from descriptor `first` on.
fn post_small_buffers(rxq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, n: u16, size: u32) {
    for i in first..first + n {
        let addr = RX_BUF + u64::from(i) * 0x1000;
        rxq.add_desc_chains(&chain(i, &[(addr, size, W)]), i)
            .unwrap();
    }
}

/// Reassembles a merged frame from `count` used entries starting at `from`.
fn merged_frame(
    mem: &GuestMemoryMmap,
    rxq: &MockSplitQueue<'_, GuestMemoryMmap>,
    from: usize,
    count: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    for i in from..from + count {
        let (id, len) = used(rxq, i);
        out.extend(read_guest(
            mem,
            RX_BUF + u64::from(id) * 0x1000,
            len as usize,
        ));
    }
    out
}

#[test]
fn merged_rx_buffers_carry_a_frame_larger_than_one_chain() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    post_small_buffers(&rxq, 0, 8, 1024);
    let big = frame(3000, 7);
    let small = frame(64, 8);
    t.send(&Hdr::tso4(), &big);
    t.send(&Hdr::default(), &small);

    assert_eq!(t.handler.process_rx().unwrap(), 2);
    // 12 + 3000 bytes over three 1024-byte buffers, then the small frame in the fourth.
    assert_eq!(used_count(&rxq), 4);
    assert_eq!(used(&rxq, 0), (0, 1024));
    assert_eq!(used(&rxq, 1), (1, 1024));
    assert_eq!(used(&rxq, 2), (2, 12 + 3000 - 2048));
    let got = merged_frame(&mem, &rxq, 0, 3);
    let hdr = Hdr::parse(&got);
    assert_eq!(hdr.num_buffers, 3);
    assert_eq!(
        Hdr {
            num_buffers: 0,
            ..hdr
        },
        Hdr::tso4()
    );
    assert_eq!(&got[12..], &big[..]);
    let got = merged_frame(&mem, &rxq, 3, 1);
    assert_eq!(Hdr::parse(&got).num_buffers, 1);
    assert_eq!(&got[12..], &small[..]);
    assert_eq!(t.counter(|c| &c.rx_packets), 2);
    assert_eq!(t.interrupt.count(), 1, "one interrupt for the batch");
}

#[test]
fn merged_frame_waits_for_more_buffers_and_goes_first_when_they_come() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    post_small_buffers(&rxq, 0, 2, 1024);
    let big = frame(3000, 9);
    let next = frame(100, 10);
    t.send(&Hdr::default(), &big);
    t.send(&Hdr::default(), &next);

    assert_eq!(t.handler.process_rx().unwrap(), 0);
    assert_eq!(used_count(&rxq), 0, "no partial frame reaches the guest");
    assert!(t.handler.has_pending_frame());
    assert!(!t.handler.polls_backend_for_rx());
    assert_eq!(t.counter(|c| &c.rx_dropped), 0);

    post_small_buffers(&rxq, 2, 4, 1024);
    assert_eq!(t.handler.process_rx().unwrap(), 2);
    assert!(!t.handler.has_pending_frame());
    let got = merged_frame(&mem, &rxq, 0, 3);
    assert_eq!(Hdr::parse(&got).num_buffers, 3);
    assert_eq!(&got[12..], &big[..]);
    let got = merged_frame(&mem, &rxq, 3, 1);
    assert_eq!(&got[12..], &next[..]);
}

#[test]
fn merged_frame_starting_in_a_large_chain_waits_and_is_reassembled() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    // Larger than the bounce-read limit: read straight into, the rest spilling over.
    let parts = [(RX_BUF + 0x2_0000, 3000, W), (RX_BUF + 0x2_2000, 2000, W)];
    const { assert!(5000 > super::handler::BOUNCE_READ_MAX) };
    rxq.add_desc_chains(&chain(0, &parts), 0).unwrap();
    let big = frame(7000, 11);
    t.send(&Hdr::tso4(), &big);

    assert_eq!(t.handler.process_rx().unwrap(), 0);
    assert!(t.handler.has_pending_frame());
    assert_eq!(used_count(&rxq), 0, "no partial frame reaches the guest");

    post_small_buffers(&rxq, 2, 3, 1024);
    assert_eq!(t.handler.process_rx().unwrap(), 1);
    assert!(!t.handler.has_pending_frame());
    assert_eq!(used_count(&rxq), 3);
    let last = 12 + 7000 - 5000 - 1024;
    assert_eq!(used(&rxq, 0), (0, 5000));
    assert_eq!(used(&rxq, 1), (2, 1024));
    assert_eq!(used(&rxq, 2), (3, last as u32));
    let mut got = read_guest(&mem, RX_BUF + 0x2_0000, 3000);
    got.extend(read_guest(&mem, RX_BUF + 0x2_2000, 2000));
    got.extend(read_guest(&mem, RX_BUF + 0x2000, 1024));
    got.extend(read_guest(&mem, RX_BUF + 0x3000, last + 1));
    assert_eq!(got.pop(), Some(0), "nothing written past the frame");
    let hdr = Hdr::parse(&got);
    assert_eq!(hdr.num_buffers, 3);
    assert_eq!(
        Hdr {
            num_buffers: 0,
            ..hdr
        },
        Hdr::tso4()
    );
    assert_eq!(&got[12..], &big[..]);
    assert_eq!(t.counter(|c| &c.rx_packets), 1);
    assert_eq!(t.counter(|c| &c.rx_bytes), 7000);
}

#[test]
fn frame_larger_than_the_whole_rx_ring_is_dropped_and_counted() {
    let mem = memory();
    // The whole ring, so the mock's used ring overlaps the end of the available one (see
    // `tests.rs`): harmless here, every chain is read before the first used entry is written.
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 4);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    post_small_buffers(&rxq, 0, 4, 256);
    t.send(&Hdr::default(), &frame(3000, 11));
    let small = frame(80, 12);
    t.send(&Hdr::default(), &small);

    assert_eq!(t.handler.process_rx().unwrap(), 1);
    assert_eq!(t.counter(|c| &c.rx_dropped), 1);
    assert_eq!(used_count(&rxq), 1);
    assert_eq!(&merged_frame(&mem, &rxq, 0, 1)[12..], &small[..]);
}

#[test]
fn frame_larger_than_its_chain_without_merged_buffers_is_dropped_and_the_chain_reused() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, without_mrg());
    // A guard pattern right after the buffer shows nothing is written past it.
    mem.write_slice(&[0xAA; 64], GuestAddress(RX_BUF + 1024))
        .unwrap();
    rxq.add_desc_chains(&chain(0, &[(RX_BUF, 1024, W)]), 0)
        .unwrap();
    t.send(&Hdr::default(), &frame(3000, 13));
    let small = frame(200, 14);
    t.send(&Hdr::default(), &small);

    assert_eq!(t.handler.process_rx().unwrap(), 1);
    assert_eq!(t.counter(|c| &c.rx_dropped), 1);
    assert_eq!(used_count(&rxq), 1);
    assert_eq!(used(&rxq, 0), (0, 212), "the chain took the next frame");
    assert_eq!(read_guest(&mem, RX_BUF + 12, 200), small);
    assert_eq!(read_guest(&mem, RX_BUF + 1024, 64), vec![0xAA; 64]);
}

#[test]
fn without_rx_buffers_frames_stay_in_the_backend_and_it_is_not_polled() {
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
    let interrupt = Arc::new(CountingInterrupt::default());
    let mut handler = net
        .handler(mem.clone(), active(&rxq), active(&txq), interrupt.clone())
        .unwrap();
    let data = frame(300, 15);
    let mut datagram = Hdr::default().bytes().to_vec();
    datagram.extend_from_slice(&data);
    for _ in 0..3 {
        peer.send(&datagram).unwrap();
    }

    for _ in 0..5 {
        assert_eq!(handler.process_rx().unwrap(), 0);
    }
    assert_eq!(
        reads.load(Ordering::SeqCst),
        0,
        "nothing read without a buffer"
    );
    assert!(!handler.polls_backend_for_rx());
    assert_eq!(interrupt.count(), 0);

    post_small_buffers(&rxq, 0, 2, 2048);
    assert_eq!(handler.process_rx().unwrap(), 2);
    assert!(!handler.polls_backend_for_rx(), "out of buffers again");
    post_small_buffers(&rxq, 2, 2, 2048);
    assert_eq!(handler.process_rx().unwrap(), 1);
    assert!(
        handler.polls_backend_for_rx(),
        "buffers left: polling again"
    );
    for i in 0..3 {
        assert_eq!(read_guest(&mem, RX_BUF + i * 0x1000 + 12, 300), data);
    }
    assert_eq!(NetCounters::get(&net.counters().rx_dropped), 0);
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_counted() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, without_mrg());
    let mut descs = Vec::new();
    // A device-readable buffer.
    descs.extend(chain(0, &[(RX_BUF, 2048, R)]));
    // Outside guest memory.
    descs.extend(chain(1, &[(MEM_SIZE as u64, 2048, W)]));
    // Too short for the header.
    descs.extend(chain(2, &[(RX_BUF + 0x2000, 8, W)]));
    // A good one.
    descs.extend(chain(3, &[(RX_BUF + 0x3000, 2048, W)]));
    rxq.add_desc_chains(&descs, 0).unwrap();
    let data = frame(100, 16);
    t.send(&Hdr::default(), &data);

    assert_eq!(t.handler.process_rx().unwrap(), 1);
    assert_eq!(used_count(&rxq), 4);
    for i in 0..3 {
        assert_eq!(used(&rxq, i), (i as u32, 0));
    }
    assert_eq!(used(&rxq, 3), (3, 112));
    assert_eq!(read_guest(&mem, RX_BUF + 0x3000 + 12, 100), data);
    assert_eq!(t.counter(|c| &c.rx_errors), 3);
    assert_eq!(t.interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn oversized_frame_from_the_backend_is_dropped_and_counted() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    rxq.add_desc_chains(&chain(0, &[(RX_BUF, 0x2_0000, W)]), 0)
        .unwrap();
    t.send(&Hdr::default(), &frame(MAX_FRAME_LEN + 1, 17));
    let ok = frame(MAX_FRAME_LEN, 18);
    t.send(&Hdr::default(), &ok);

    assert_eq!(t.handler.process_rx().unwrap(), 1);
    assert_eq!(t.counter(|c| &c.rx_dropped), 1);
    assert_eq!(used(&rxq, 0), (0, MAX_BUFFER_LEN as u32));
    assert_eq!(read_guest(&mem, RX_BUF + 12, ok.len()), ok);
}

#[test]
fn rx_with_an_empty_backend_returns_the_buffer_and_keeps_polling() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    let mut t = TestNet::new(&mem, &rxq, &txq, linux_features());
    post_small_buffers(&rxq, 0, 1, 2048);
    assert_eq!(t.handler.process_rx().unwrap(), 0);
    assert_eq!(used_count(&rxq), 0);
    assert!(t.handler.polls_backend_for_rx());
    assert_eq!(t.interrupt.count(), 0);
    t.send(&Hdr::default(), &frame(64, 19));
    assert_eq!(t.handler.process_rx().unwrap(), 1);
    assert_eq!(used(&rxq, 0), (0, 76));
}
