//! virtio-net receive: frames pushed into the socket-pair backend by the network's end, guest
//! rx buffers of various sizes and shapes, with and without VIRTIO_NET_F_MRG_RXBUF, in any
//! interleaving; rare corruption (read-only descriptors, bad addresses, indirect tables,
//! backend errors).
//!
//! Oracle (nothing corrupted): the frames the guest finds in its used buffers (merged ones
//! reassembled by `num_buffers`) are the frames sent, in order, some possibly dropped, with
//! `num_buffers` right; no used length exceeds its chain; the counters agree.

#![no_main]

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::virtio::net::{MAX_BUFFER_LEN, VNET_HDR_LEN};
use fuzz_common::*;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::epoll::EventSet;

const RX_BASE: u64 = 0;
const TX_BASE: u64 = 0x1_0000;

#[derive(Debug)]
enum Op {
    Buffers(Vec<(Vec<(u32, u16, AddrSel)>, bool)>),
    Send(usize, u8),
    Process,
    BackendIn,
    BackendError,
}

fn buffer_len(u: &mut Unstructured<'_>) -> Result<u32> {
    Ok(match u8::arbitrary(u)? % 8 {
        0 => 1526,
        1 => 4096,
        2 => 4097,
        3 => MAX_BUFFER_LEN as u32,
        4 => u32::from(u8::arbitrary(u)?),
        5 => u32::from(u16::arbitrary(u)?) % 9000,
        6 => VNET_HDR_LEN as u32,
        _ => 2048,
    })
}

fn buffers(u: &mut Unstructured<'_>) -> Result<Op> {
    let mut chains = Vec::new();
    for _ in 0..1 + u8::arbitrary(u)? % 8 {
        let mut parts = Vec::new();
        let n = if rarely(u, 32)? {
            1 + u8::arbitrary(u)? % 8
        } else {
            1 + u8::arbitrary(u)? % 2
        };
        for _ in 0..n {
            let len = buffer_len(u)?;
            let flags = if rarely(u, 8)? { 0 } else { F_WRITE };
            parts.push((len, flags, AddrSel::mostly_valid(u)?));
        }
        chains.push((parts, rarely(u, 16)?));
    }
    Ok(Op::Buffers(chains))
}

fn frame_len(u: &mut Unstructured<'_>) -> Result<usize> {
    Ok(if rarely(u, 24)? {
        match u8::arbitrary(u)? % 3 {
            0 => usize::from(u8::arbitrary(u)? % 13),
            1 => MAX_BUFFER_LEN - 1 + usize::from(u8::arbitrary(u)? % 3),
            _ => usize::from(u16::arbitrary(u)?),
        }
    } else {
        VNET_HDR_LEN + usize::from(u16::arbitrary(u)?) % 1515
    })
}

/// The used entries, reassembled into frames: (frame bytes, num_buffers, chains).
fn delivered(
    mem: &rvmm_devices::virtio::GuestMemoryMmap,
    used: &[(u32, u32)],
    chains: &HashMap<u16, (Vec<(u64, u32)>, u64)>,
) -> Vec<(Vec<u8>, u16, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < used.len() {
        let (id, len) = used[i];
        i += 1;
        if len == 0 {
            continue;
        }
        let (bufs, cap) = chains
            .get(&u16::try_from(id).expect("used id fits a u16"))
            .expect("used id is a posted head");
        assert!(
            u64::from(len) <= *cap,
            "used length {len} over chain capacity {cap}"
        );
        let mut bytes = gather(mem, bufs, len as usize);
        assert!(bytes.len() >= VNET_HDR_LEN, "frame shorter than its header");
        let num_buffers = u16::from_le_bytes([bytes[10], bytes[11]]);
        assert!(num_buffers >= 1, "num_buffers 0");
        for _ in 1..num_buffers {
            let &(id, len) = used.get(i).expect("num_buffers beyond the used entries");
            i += 1;
            let (bufs, cap) = &chains[&(id as u16)];
            assert!(u64::from(len) <= *cap);
            bytes.extend(gather(mem, bufs, len as usize));
        }
        out.push((bytes, num_buffers, num_buffers as usize));
    }
    out
}

fn gather(mem: &rvmm_devices::virtio::GuestMemoryMmap, bufs: &[(u64, u32)], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for &(addr, blen) in bufs {
        if out.len() == len {
            break;
        }
        let n = (blen as usize).min(len - out.len());
        out.extend(read_guest(mem, addr, n));
    }
    out
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mrg_rxbuf = bool::arbitrary(u)?;
    let event_idx = bool::arbitrary(u)?;
    let qsize = queue_size(u, 256)?;
    let mut ops = Vec::new();
    for _ in 0..1 + u8::arbitrary(u)? % 32 {
        ops.push(match u8::arbitrary(u)? % 16 {
            0..=4 => buffers(u)?,
            5..=10 => Op::Send(frame_len(u)?, u8::arbitrary(u)?),
            11 | 12 => Op::Process,
            13 | 14 => Op::BackendIn,
            _ => {
                if rarely(u, 32)? {
                    Op::BackendError
                } else {
                    Op::Process
                }
            }
        });
    }

    let mem = memory();
    let mut rx = Driver::new(&mem, RX_BASE, qsize);
    let tx = Driver::new(&mem, TX_BASE, 16);
    let (mut handler, peer, counters) = net_handler(&mem, &rx, &tx, mrg_rxbuf, event_idx);
    let mut alloc = BufAlloc::default();
    let mut clean = true;
    let mut errored = false;
    let mut sent: Vec<Vec<u8>> = Vec::new();
    // Head -> (device-writable buffers, capacity).
    let mut chains: HashMap<u16, (Vec<(u64, u32)>, u64)> = HashMap::new();

    for op in &ops {
        match op {
            Op::Buffers(list) => {
                for (parts, indirect) in list {
                    let mut descs = Vec::new();
                    for &(len, flags, sel) in parts {
                        let addr = alloc.place(sel, len);
                        clean &= !matches!(sel, AddrSel::Raw(_));
                        descs.push((addr, len, flags));
                    }
                    let head = if *indirect {
                        rx.add_indirect_chain(&descs)
                    } else {
                        rx.add_chain(&descs)
                    };
                    let Some(head) = head else { continue };
                    let bufs: Vec<(u64, u32)> = descs.iter().map(|d| (d.0, d.1)).collect();
                    let cap = descs.iter().map(|d| u64::from(d.1)).sum();
                    chains.insert(head, (bufs, cap));
                    rx.push_avail(head);
                }
                errored |= handler.process_rx().is_err();
            }
            Op::Send(len, seed) => {
                let frame = frame_bytes(*len, *seed);
                if peer.send(&frame).is_ok() {
                    sent.push(frame);
                }
            }
            Op::Process => errored |= handler.process_rx().is_err(),
            Op::BackendIn => errored |= handler.process_backend(EventSet::IN).is_err(),
            Op::BackendError => {
                clean = false;
                errored |= handler.process_backend(EventSet::ERROR).is_err();
            }
        }
    }
    errored |= handler.process_rx().is_err();

    if clean && !alloc.overlapped {
        assert!(!errored, "queue error on a clean rx ring");
        let used = rx.take_used();
        let frames = delivered(&mem, &used, &chains);
        let mut next = 0;
        for (i, (bytes, num_buffers, _)) in frames.iter().enumerate() {
            if !mrg_rxbuf {
                assert_eq!(*num_buffers, 1, "num_buffers without MRG_RXBUF");
            }
            let matches = |s: &Vec<u8>| {
                s.len() == bytes.len() && s[..10] == bytes[..10] && s[12..] == bytes[12..]
            };
            let Some(pos) = sent[next..].iter().position(matches) else {
                panic!(
                    "delivered frame {i} ({} bytes, {num_buffers} buffers) is not a sent frame in order",
                    bytes.len()
                );
            };
            next += pos + 1;
        }
        assert_eq!(
            counters.rx_packets.load(Ordering::Relaxed),
            frames.len() as u64,
            "rx_packets vs frames found in the used ring"
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
