//! virtio-net transmit: chains of header + frame gathered from guest memory and sent to a
//! socket-pair backend, with the peer sometimes not reading (backpressure) and rare
//! corruption (device-writable descriptors, bad addresses, short or oversized frames,
//! indirect tables).
//!
//! Oracle (nothing corrupted): the peer receives exactly the well-formed chains' bytes, in
//! order, each once, and the counters agree.

#![no_main]

use std::sync::atomic::Ordering;

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::virtio::net::{MAX_BUFFER_LEN, VNET_HDR_LEN};
use fuzz_common::*;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::epoll::EventSet;

const TX_BASE: u64 = 0x1_0000;
const RX_BASE: u64 = 0;

#[derive(Debug)]
enum Op {
    Frame {
        parts: Vec<(u32, u16, AddrSel)>,
        seed: u8,
        indirect: bool,
    },
    Process,
    DrainPeer,
    Writable,
}

fn frame(u: &mut Unstructured<'_>) -> Result<Op> {
    let payload = if rarely(u, 16)? {
        match u8::arbitrary(u)? % 3 {
            0 => u32::from(u16::arbitrary(u)?) % 70_000,
            1 => (MAX_BUFFER_LEN - VNET_HDR_LEN) as u32 + u32::from(u8::arbitrary(u)? % 3),
            _ => 0,
        }
    } else {
        u32::from(u16::arbitrary(u)?) % 1515
    };
    let header_len = if rarely(u, 16)? {
        u32::from(u8::arbitrary(u)? % 13)
    } else {
        VNET_HDR_LEN as u32
    };
    let total = header_len + payload;
    // Split into 1-4 pieces; the first is usually exactly the header.
    let pieces = 1 + usize::from(u8::arbitrary(u)? % 4);
    let mut lens = Vec::new();
    let mut rest = total;
    if pieces > 1 && bool::arbitrary(u)? {
        lens.push(header_len.min(rest));
        rest -= header_len.min(rest);
    }
    while lens.len() + 1 < pieces && rest > 0 {
        let n = u32::from(u16::arbitrary(u)?) % (rest + 1);
        lens.push(n);
        rest -= n;
    }
    lens.push(rest);
    let mut parts = Vec::new();
    for len in lens {
        let flags = if rarely(u, 8)? { F_WRITE } else { 0 };
        let addr = AddrSel::mostly_valid(u)?;
        let len = if rarely(u, 4)? {
            u32::arbitrary(u)?
        } else {
            len
        };
        parts.push((len, flags, addr));
    }
    Ok(Op::Frame {
        parts,
        seed: u8::arbitrary(u)?,
        indirect: rarely(u, 16)?,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let qsize = queue_size(u, 256)?;
    let event_idx = bool::arbitrary(u)?;
    let mut ops = Vec::new();
    for _ in 0..1 + u8::arbitrary(u)? % 32 {
        ops.push(match u8::arbitrary(u)? % 8 {
            0..=4 => frame(u)?,
            5 => Op::Process,
            6 => Op::DrainPeer,
            _ => Op::Writable,
        });
    }
    let corrupt_avail = if rarely(u, 16)? {
        Some(u16::arbitrary(u)?)
    } else {
        None
    };

    let mem = memory();
    let rx = Driver::new(&mem, RX_BASE, 16);
    let mut tx = Driver::new(&mem, TX_BASE, qsize);
    let (mut handler, peer, counters) = net_handler(&mem, &rx, &tx, false, event_idx);
    let mut alloc = BufAlloc::default();
    let mut clean = corrupt_avail.is_none();
    let mut expected: Vec<Vec<u8>> = Vec::new();
    let mut received: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; MAX_BUFFER_LEN + 64];
    let mut drain = |received: &mut Vec<Vec<u8>>| {
        while let Ok(n) = peer.recv(&mut buf) {
            received.push(buf[..n].to_vec());
        }
    };
    let mut errored = false;
    let mut made = 0usize;

    for op in &ops {
        match op {
            Op::Frame {
                parts,
                seed,
                indirect,
            } => {
                let total: u64 = parts.iter().map(|p| u64::from(p.0)).sum();
                let bytes = frame_bytes(total.min(MAX_BUFFER_LEN as u64 + 64) as usize, *seed);
                let mut descs = Vec::new();
                let mut at = 0usize;
                let mut well_formed = true;
                for &(len, flags, sel) in parts {
                    let addr = alloc.place(sel, len);
                    let end = (at + len as usize).min(bytes.len());
                    let _ = vm_memory::Bytes::write_slice(
                        &mem,
                        &bytes[at.min(end)..end],
                        vm_memory::GuestAddress(addr),
                    );
                    at = end;
                    well_formed &= flags & F_WRITE == 0
                        && addr
                            .checked_add(u64::from(len))
                            .is_some_and(|e| e <= MEM_END);
                    clean &= sel.is_alloc();
                    descs.push((addr, len, flags));
                }
                let head = if *indirect {
                    tx.add_indirect_chain(&descs)
                } else {
                    tx.add_chain(&descs)
                };
                let Some(head) = head else { continue };
                tx.push_avail(head);
                made += 1;
                if well_formed && (VNET_HDR_LEN as u64..=MAX_BUFFER_LEN as u64).contains(&total) {
                    expected.push(bytes);
                }
            }
            Op::Process => errored |= handler.process_tx().is_err(),
            Op::DrainPeer => drain(&mut received),
            Op::Writable => errored |= handler.process_backend(EventSet::OUT).is_err(),
        }
    }
    if let Some(idx) = corrupt_avail {
        tx.publish_avail_idx(idx);
    }
    errored |= handler.process_tx().is_err();
    // Flush everything: the peer reads, the backend becomes writable again.
    for _ in 0..64 {
        drain(&mut received);
        if !handler.tx_blocked() {
            break;
        }
        errored |= handler.process_backend(EventSet::OUT).is_err();
    }
    drain(&mut received);

    if clean && !alloc.overlapped {
        assert!(!errored, "queue error on a clean tx ring");
        assert!(
            !handler.tx_blocked(),
            "tx still blocked with the peer drained"
        );
        assert_eq!(received.len(), expected.len(), "frames sent vs expected");
        for (i, (got, want)) in received.iter().zip(&expected).enumerate() {
            assert!(
                got == want,
                "frame {i} differs ({} vs {} bytes)",
                got.len(),
                want.len()
            );
        }
        assert_eq!(
            counters.tx_packets.load(Ordering::Relaxed),
            expected.len() as u64
        );
        let used = tx.take_used();
        assert_eq!(used.len(), made, "every tx chain comes back once");
        for (_, len) in used {
            assert_eq!(len, 0, "tx used length must be 0");
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
