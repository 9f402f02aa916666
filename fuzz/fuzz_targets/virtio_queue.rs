//! Split-queue handling through the virtio-rng worker: well-formed request chains, then
//! damage to the available ring and descriptor table (avail idx jumps, out-of-range heads,
//! NEXT loops, indirect tables of bad length, nested indirect, zero-length and out-of-memory
//! buffers, odd queue sizes), processed repeatedly.
//!
//! Oracles: the worker never panics; used ids are below the queue size; no used length is over
//! the 64 KiB per-request cap; with nothing corrupted every chain comes back exactly once with
//! its writable length (capped).

#![no_main]

use std::sync::Arc;

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::virtio::rng::RngHandler;
use fuzz_common::*;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use virtio_queue::desc::split::Descriptor;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Arbitrary, Debug)]
enum Damage {
    AvailIdx(u16),
    AvailIdxAdd(u16),
    AvailEntry {
        slot: u16,
        head: u16,
    },
    Desc {
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    },
    /// Descriptor `index` links to itself.
    SelfLoop(u16),
    /// An indirect descriptor at `index` whose table holds `table` (may itself be indirect).
    Indirect {
        index: u16,
        len: u32,
        table: Vec<(u64, u32, u16, u16)>,
    },
    UsedEvent(u16),
    /// Process the queue now.
    Process,
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let qsize = queue_size(u, 256)?;
    let event_idx = bool::arbitrary(u)?;
    let mut chains: Vec<Vec<(u32, u16, AddrSel)>> = Vec::new();
    for _ in 0..u8::arbitrary(u)? % 16 {
        let mut parts = Vec::new();
        for _ in 0..1 + u8::arbitrary(u)? % 3 {
            let len = if rarely(u, 16)? {
                u32::arbitrary(u)?
            } else {
                u32::from(u16::arbitrary(u)?) % 4096
            };
            let flags = if rarely(u, 32)? { 0 } else { F_WRITE };
            parts.push((len, flags, AddrSel::mostly_valid(u)?));
        }
        chains.push(parts);
    }
    let mut damage = Vec::new();
    if rarely(u, 128)? {
        for _ in 0..1 + u8::arbitrary(u)? % 8 {
            damage.push(Damage::arbitrary(u)?);
        }
    }

    let mem = memory();
    let mut driver = Driver::new(&mem, QUEUE_AREA, qsize);
    let mut alloc = BufAlloc::default();
    let mut queue = driver.queue();
    queue.set_event_idx(event_idx);
    let interrupt = Arc::new(CountingInterrupt::default());
    let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    // Expected used length per head (clean inputs).
    let mut expected: Vec<(u16, u32)> = Vec::new();
    let mut clean = damage.is_empty();
    // Device writes (random bytes) stay out of the rings unless the input aims them there.
    let mut rings_safe = !damage
        .iter()
        .any(|d| matches!(d, Damage::Desc { .. } | Damage::Indirect { .. }));
    for parts in &chains {
        let mut descs = Vec::new();
        let mut writable = 0u64;
        let mut fine = true;
        let mut chain_len = 0u64;
        for &(len, flags, sel) in parts {
            // virtio-queue ends a chain at the descriptor that takes it past 4 GiB.
            chain_len += u64::from(len);
            if chain_len > u64::from(u32::MAX) {
                fine = false;
            }
            let addr = alloc.place(sel, len);
            clean &= !matches!(sel, AddrSel::Raw(_));
            rings_safe &= !matches!(sel, AddrSel::Raw(_));
            // The device writes at most what is left of the 64 KiB cap.
            let capped = u64::from(len).min(MAX_REQUEST_BYTES - writable.min(MAX_REQUEST_BYTES));
            let in_mem = addr.checked_add(capped).is_some_and(|e| e <= MEM_END);
            // Whether an empty buffer outside memory is an error is vm-memory's business.
            clean &= in_mem || len != 0;
            if flags & F_WRITE != 0 && fine {
                if in_mem {
                    writable +=
                        u64::from(len).min(MAX_REQUEST_BYTES - writable.min(MAX_REQUEST_BYTES));
                } else if writable < MAX_REQUEST_BYTES {
                    fine = false;
                }
            }
            descs.push((addr, len, flags));
        }
        let Some(head) = driver.add_chain(&descs) else {
            break;
        };
        driver.push_avail(head);
        expected.push((head, writable.min(MAX_REQUEST_BYTES) as u32));
    }
    if alloc.overlapped {
        clean = false;
    }

    let mut h = RngHandler::new(mem.clone(), queue, notify, interrupt);
    let table = driver.desc_table;
    let mut errors = 0;
    for d in &damage {
        match d {
            Damage::AvailIdx(i) => driver.publish_avail_idx(*i),
            Damage::AvailIdxAdd(n) => driver.publish_avail_idx(driver.avail_idx.wrapping_add(*n)),
            Damage::AvailEntry { slot, head } => driver.set_avail_entry(*slot, *head),
            Damage::Desc {
                index,
                addr,
                len,
                flags,
                next,
            } => driver.write_desc_at(
                table,
                index % qsize,
                Descriptor::new(*addr, *len, *flags, *next),
            ),
            Damage::SelfLoop(index) => {
                let i = index % qsize;
                driver.write_desc_at(table, i, Descriptor::new(BUF_AREA, 64, F_WRITE | F_NEXT, i));
            }
            Damage::Indirect {
                index,
                len,
                table: entries,
            } => {
                let at = INDIRECT_AREA + 0x1000;
                for (i, &(addr, dlen, flags, next)) in entries.iter().take(64).enumerate() {
                    driver.write_desc_at(at, i as u16, Descriptor::new(addr, dlen, flags, next));
                }
                driver.write_desc_at(
                    table,
                    index % qsize,
                    Descriptor::new(at, *len, F_INDIRECT, 0),
                );
            }
            Damage::UsedEvent(_) | Damage::Process => {}
        }
        match d {
            Damage::UsedEvent(v) => driver.set_used_event(*v),
            Damage::Process => errors += usize::from(h.process_queue().is_err()),
            _ => {}
        }
    }
    let result = h.process_queue();
    if std::env::var_os("RVMM_FUZZ_DEBUG").is_some() {
        eprintln!("qsize {qsize} chains {chains:x?}\nexpected {expected:x?}\nresult {result:?}");
        let mut d2 = Driver::new(&mem, QUEUE_AREA, qsize);
        eprintln!(
            "addrs {:x?} {:x?} {:x?} used_idx {} avail_idx {}",
            d2.desc_table,
            d2.avail,
            d2.used,
            d2.used_idx(),
            driver.avail_idx
        );
        eprintln!("used {:x?}", d2.take_used());
    }
    if clean {
        assert_eq!(result.ok(), Some(expected.len()), "requests served");
        let used = driver.take_used();
        assert_eq!(used.len(), expected.len());
        for ((id, len), (head, want)) in used.iter().zip(&expected) {
            assert_eq!(*id, u32::from(*head), "used order");
            assert_eq!(*len, *want, "used length of head {head}");
        }
    } else if rings_safe && !alloc.overlapped {
        let _ = errors;
        for (id, len) in driver.take_used() {
            assert!(id < u32::from(qsize), "used id {id} out of range");
            assert!(
                u64::from(len) <= MAX_REQUEST_BYTES,
                "used length {len} over the cap"
            );
        }
    }
    // Processing again must be harmless.
    let _ = h.process_queue();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
