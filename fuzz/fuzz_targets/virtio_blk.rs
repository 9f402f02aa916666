//! virtio-blk requests through a MockSplitQueue-laid-out queue, against small disk files
//! (sync engine). Inputs are mostly well-formed requests (header, data segments, status) with
//! rare corruption: wrong directions and flags, huge lengths, addresses outside memory,
//! indirect tables, loops, avail ring damage.
//!
//! Oracles (when nothing was corrupted): the queue never errors, every chain comes back once,
//! no used length exceeds the chain's writable bytes, and a status byte is always a valid
//! status when the chain had a proper header and status descriptor.

#![no_main]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::virtio::ActiveQueue;
use rvmm_devices::virtio::block::{Block, BlockConfig, Engine};
use fuzz_common::*;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_blk::*;
use virtio_queue::QueueT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Disk sizes to choose from (the last is not a multiple of the sector size).
const DISK_SIZES: [usize; 5] = [0, 512, 4096, 64 * 1024, 64 * 1024 + 100];

thread_local! {
    static DISKS: RefCell<HashMap<(usize, bool), Block>> = RefCell::new(HashMap::new());
}

/// A device over a disk of `size` bytes. The file is unlinked once open: nothing is left in
/// the temp directory when the fuzzer exits.
fn with_device<R>(size: usize, readonly: bool, f: impl FnOnce(&Block) -> R) -> R {
    DISKS.with(|disks| {
        let mut disks = disks.borrow_mut();
        let dev = disks.entry((size, readonly)).or_insert_with(|| {
            let path = std::env::temp_dir().join(format!(
                "rvmm-fuzz-blk-{}-{size}-{readonly}.img",
                std::process::id()
            ));
            let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, content).expect("temp disk");
            let dev = Block::new(BlockConfig {
                path: path.clone(),
                readonly,
                id: Some("fuzz-disk".into()),
                engine: Engine::Sync,
                format: Some(rvmm_devices::image::ImageFormat::Raw),
            })
            .expect("block device");
            let _ = std::fs::remove_file(&path);
            dev
        });
        f(dev)
    })
}

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Raw(u32),
}

impl Kind {
    fn raw(self) -> u32 {
        match self {
            Kind::In => VIRTIO_BLK_T_IN,
            Kind::Out => VIRTIO_BLK_T_OUT,
            Kind::Flush => VIRTIO_BLK_T_FLUSH,
            Kind::GetId => VIRTIO_BLK_T_GET_ID,
            Kind::Discard => VIRTIO_BLK_T_DISCARD,
            Kind::WriteZeroes => VIRTIO_BLK_T_WRITE_ZEROES,
            Kind::Raw(t) => t,
        }
    }

    /// Whether the device writes the data buffers.
    fn device_writes(self) -> bool {
        matches!(self, Kind::In | Kind::GetId)
    }
}

#[derive(Debug)]
struct Part {
    len: u32,
    flags: u16,
    addr: AddrSel,
    /// Bytes the driver puts in the buffer first.
    content: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Request {
    parts: Vec<Part>,
    indirect: bool,
    /// Process the queue once this request is available.
    kick_after: bool,
    /// Header and status are well-formed (status byte must then be a valid status).
    well_formed: bool,
}

#[derive(Arbitrary, Debug)]
enum Corruption {
    Flags {
        desc: u8,
        flags: u16,
    },
    Len {
        desc: u8,
        len: u32,
    },
    Addr {
        desc: u8,
        addr: u64,
    },
    Next {
        desc: u8,
        next: u16,
    },
    /// The last descriptor links back to the first.
    Loop {
        desc: u8,
    },
    AvailIdx(u16),
    AvailEntry {
        slot: u16,
        head: u16,
    },
}

fn header(kind: Kind, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&kind.raw().to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn request(u: &mut Unstructured<'_>, capacity: u64) -> Result<Request> {
    let kind = Kind::arbitrary(u)?;
    let sector = if rarely(u, 16)? {
        u64::arbitrary(u)?
    } else {
        u64::from(u8::arbitrary(u)?) % (capacity + 2)
    };
    let mut parts = Vec::new();
    let mut well_formed = true;

    // Header.
    let (hlen, hflags, haddr) = if rarely(u, 16)? {
        well_formed = false;
        let len = match u8::arbitrary(u)? % 4 {
            0 => 0,
            1 => 15,
            2 => 17,
            _ => u32::arbitrary(u)?,
        };
        (len, u16::arbitrary(u)? & !F_NEXT, AddrSel::arbitrary(u)?)
    } else {
        (16, 0, AddrSel::mostly_valid(u)?)
    };
    parts.push(Part {
        len: hlen,
        flags: hflags,
        addr: haddr,
        content: Some(header(kind, sector)),
    });

    // Data.
    let data_flags = if kind.device_writes() { F_WRITE } else { 0 };
    let segments = if rarely(u, 8)? {
        usize::from(u16::arbitrary(u)? % 300)
    } else {
        usize::from(u8::arbitrary(u)? % 5)
    };
    let ranges: Vec<u8> = if matches!(kind, Kind::Discard | Kind::WriteZeroes) {
        let n = 1 + u8::arbitrary(u)? % 3;
        let mut bytes = Vec::new();
        for _ in 0..n {
            let sector = if rarely(u, 16)? {
                u64::arbitrary(u)?
            } else {
                u64::from(u8::arbitrary(u)?) % (capacity + 2)
            };
            let num = if rarely(u, 16)? {
                u32::arbitrary(u)?
            } else {
                u32::from(u8::arbitrary(u)? % 17)
            };
            let flags = if rarely(u, 32)? {
                u32::arbitrary(u)?
            } else if kind == Kind::WriteZeroes && bool::arbitrary(u)? {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(&num.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        bytes
    } else {
        Vec::new()
    };
    if !ranges.is_empty() {
        // The ranges, split over 1-3 segments (a range may straddle two).
        let pieces = 1 + usize::from(u8::arbitrary(u)? % 3);
        let mut at = 0;
        for i in 0..pieces {
            let end = if i + 1 == pieces {
                ranges.len()
            } else {
                (at + usize::from(u8::arbitrary(u)?) % 33).min(ranges.len())
            };
            if end > at {
                parts.push(Part {
                    len: (end - at) as u32,
                    flags: data_flags,
                    addr: AddrSel::mostly_valid(u)?,
                    content: Some(ranges[at..end].to_vec()),
                });
            }
            at = end;
        }
    } else {
        for _ in 0..segments {
            let len = if rarely(u, 16)? {
                match u8::arbitrary(u)? % 4 {
                    0 => 0,
                    1 => (1 << 20) + 512,
                    2 => u32::MAX,
                    _ => u32::arbitrary(u)?,
                }
            } else {
                match kind {
                    Kind::GetId => 1 + u32::from(u8::arbitrary(u)? % 40),
                    _ => 512 * (1 + u32::from(u8::arbitrary(u)? % 8)),
                }
            };
            let flags = if rarely(u, 16)? {
                data_flags ^ F_WRITE
            } else {
                data_flags
            };
            parts.push(Part {
                len,
                flags,
                addr: AddrSel::mostly_valid(u)?,
                content: None,
            });
        }
    }

    // Status.
    if rarely(u, 16)? {
        well_formed = false;
        match u8::arbitrary(u)? % 4 {
            0 => {} // no status descriptor: the chain ends with data
            1 => parts.push(Part {
                len: 1,
                flags: 0,
                addr: AddrSel::Alloc,
                content: None,
            }),
            2 => parts.push(Part {
                len: u32::from(u8::arbitrary(u)?),
                flags: F_WRITE,
                addr: AddrSel::Alloc,
                content: None,
            }),
            _ => parts.push(Part {
                len: 1,
                flags: F_WRITE,
                addr: AddrSel::arbitrary(u)?,
                content: None,
            }),
        }
    } else {
        parts.push(Part {
            len: 1,
            flags: F_WRITE,
            addr: AddrSel::Alloc,
            content: None,
        });
    }
    if parts.iter().any(|p| !p.addr.is_alloc()) {
        well_formed = false;
    }
    Ok(Request {
        parts,
        indirect: rarely(u, 16)?,
        kick_after: rarely(u, 64)?,
        well_formed,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let size = DISK_SIZES[usize::from(u8::arbitrary(u)?) % DISK_SIZES.len()];
    let readonly = rarely(u, 48)?;
    let qsize = queue_size(u, 256)?;
    let event_idx = bool::arbitrary(u)?;
    let capacity = size as u64 / 512;
    let mut requests = Vec::new();
    let n = 1 + usize::from(u8::arbitrary(u)? % 16);
    for _ in 0..n {
        requests.push(request(u, capacity)?);
    }
    let mut corruptions = Vec::new();
    if rarely(u, 24)? {
        for _ in 0..1 + u8::arbitrary(u)? % 4 {
            corruptions.push(Corruption::arbitrary(u)?);
        }
    }

    let mem = memory();
    let mut driver = Driver::new(&mem, QUEUE_AREA, qsize);
    let mut alloc = BufAlloc::default();
    // Head, writable bytes, status address (well-formed requests only).
    let mut heads: Vec<(u16, u64, Option<u64>)> = Vec::new();
    let mut all_valid = corruptions.is_empty();
    let mut layouts: Vec<(Vec<(u64, u32, u16)>, bool, bool, bool)> = Vec::new();
    for req in &requests {
        let mut descs = Vec::new();
        for part in &req.parts {
            let addr = alloc.place(part.addr, part.len);
            if let Some(content) = &part.content {
                let n = content.len().min(part.len as usize);
                let _ = mem.write_slice(&content[..n], GuestAddress(addr));
            } else if part.flags & F_WRITE != 0 && part.len == 1 {
                let _ = mem.write_obj(0xAAu8, GuestAddress(addr));
            }
            descs.push((addr, part.len, part.flags));
        }
        layouts.push((descs, req.indirect, req.kick_after, req.well_formed));
        all_valid &= req.well_formed;
    }
    if alloc.overlapped {
        all_valid = false;
    }

    let dev_result = with_device(size, readonly, |dev| {
        let interrupt = Arc::new(CountingInterrupt::default());
        let mut queue = driver.queue();
        queue.set_event_idx(event_idx);
        let active = ActiveQueue {
            queue,
            notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        };
        dev.handler(mem.clone(), active, interrupt)
    });
    let Ok(mut handler) = dev_result else {
        return Ok(());
    };

    let mut chains_made = 0usize;
    let mut errored = false;
    for (descs, indirect, kick_after, well_formed) in &layouts {
        let head = if *indirect {
            driver.add_indirect_chain(descs)
        } else {
            driver.add_chain(descs)
        };
        let Some(head) = head else {
            break;
        };
        let writable: u64 = descs
            .iter()
            .filter(|d| d.2 & F_WRITE != 0)
            .map(|d| u64::from(d.1))
            .sum();
        let status = well_formed.then(|| descs.last().map(|d| d.0)).flatten();
        heads.push((head, writable, status));
        driver.push_avail(head);
        chains_made += 1;
        if *kick_after && handler.process_queue().is_err() {
            errored = true;
        }
    }
    // Corruption goes in after the chains are written.
    let table = driver.desc_table;
    for c in &corruptions {
        let index = |d: u8| u16::from(d) % qsize;
        let read = |i: u16| -> Descriptor {
            let raw: virtio_queue::desc::RawDescriptor = mem
                .read_obj(GuestAddress(table + 16 * u64::from(i)))
                .unwrap_or_default();
            Descriptor::from(raw)
        };
        match *c {
            Corruption::Flags { desc, flags } => {
                let d = read(index(desc));
                driver.write_desc_at(
                    table,
                    index(desc),
                    Descriptor::new(d.addr().0, d.len(), flags, d.next()),
                );
            }
            Corruption::Len { desc, len } => {
                let d = read(index(desc));
                driver.write_desc_at(
                    table,
                    index(desc),
                    Descriptor::new(d.addr().0, len, d.flags(), d.next()),
                );
            }
            Corruption::Addr { desc, addr } => {
                let d = read(index(desc));
                driver.write_desc_at(
                    table,
                    index(desc),
                    Descriptor::new(addr, d.len(), d.flags(), d.next()),
                );
            }
            Corruption::Next { desc, next } => {
                let d = read(index(desc));
                driver.write_desc_at(
                    table,
                    index(desc),
                    Descriptor::new(d.addr().0, d.len(), d.flags() | F_NEXT, next),
                );
            }
            Corruption::Loop { desc } => {
                let i = index(desc);
                let d = read(i);
                driver.write_desc_at(
                    table,
                    i,
                    Descriptor::new(d.addr().0, d.len(), d.flags() | F_NEXT, 0),
                );
            }
            Corruption::AvailIdx(idx) => driver.publish_avail_idx(idx),
            Corruption::AvailEntry { slot, head } => driver.set_avail_entry(slot, head),
        }
    }
    if handler.process_queue().is_err() {
        errored = true;
    }
    // A second kick with nothing new must be harmless.
    if handler.process_queue().is_err() {
        errored = true;
    }

    if all_valid {
        assert!(!errored, "queue error on well-formed requests");
        assert_eq!(
            handler.in_flight(),
            0,
            "sync engine left requests in flight"
        );
        let used = driver.take_used();
        if std::env::var_os("RVMM_FUZZ_DEBUG").is_some() {
            eprintln!("size {size} ro {readonly} qsize {qsize} event_idx {event_idx}");
            eprintln!("layouts {layouts:#x?}");
            eprintln!("heads {heads:x?}\nused {used:x?}");
        }
        assert_eq!(used.len(), chains_made, "not every chain came back once");
        let mut seen = vec![false; usize::from(qsize)];
        for (id, len) in used {
            let head = u16::try_from(id).expect("used id fits a u16");
            let &(_, writable, status) = heads
                .iter()
                .find(|h| h.0 == head)
                .expect("used id is a head the driver made available");
            assert!(!seen[usize::from(head)], "head {head} returned twice");
            seen[usize::from(head)] = true;
            assert!(
                u64::from(len) <= writable,
                "used length {len} over the {writable} writable bytes of head {head}"
            );
            if let Some(addr) = status {
                let st: u8 = mem.read_obj(GuestAddress(addr)).unwrap_or(0xAA);
                assert!(st <= 2, "status byte {st:#x} of head {head}");
                assert!(len >= 1, "status written but used length 0 (head {head})");
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
