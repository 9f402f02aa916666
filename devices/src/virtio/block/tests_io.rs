//! I/O tests: every request type against a real file with both engines, host errors, flush
//! ordering, counters.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::fs::OpenOptions;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::*;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::tests::*;
use super::*;

#[test]
fn reads_fill_scattered_guest_buffers_from_the_file() {
    for engine in engines() {
        let s = setup("read", engine);
        let vq = MockSplitQueue::new(&s.mem, 16);
        // Sectors 3..6 into two buffers of 512 and 1024 bytes.
        let data = [(DATA, 512, W), (DATA + 0x10_000, 1024, W)];
        add_request(&s.mem, &vq, 0, 0, VIRTIO_BLK_T_IN, 3, &data);
        let (mut h, interrupt) = handler(&s.dev, &s.mem, &vq);
        assert_eq!(run(&mut h), 1, "{engine:?}");
        assert_eq!(status(&s.mem, 0), S_OK);
        assert_eq!(used_len(&vq, 0), 1536 + 1);
        let mut a = [0u8; 512];
        let mut b = [0u8; 1024];
        s.mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
        s.mem
            .read_slice(&mut b, GuestAddress(DATA + 0x10_000))
            .unwrap();
        let base = 3 * 512;
        assert!(a.iter().enumerate().all(|(i, v)| *v == pattern(base + i)));
        assert!(
            b.iter()
                .enumerate()
                .all(|(i, v)| *v == pattern(base + 512 + i))
        );
        assert_eq!(interrupt.queue.load(Ordering::SeqCst), 1);
        let c = s.dev.counters();
        assert_eq!(BlockCounters::get(&c.reads), 1);
        assert_eq!(BlockCounters::get(&c.bytes_read), 1536);
    }
}

#[test]
fn writes_land_in_the_file_and_nothing_else_changes() {
    for engine in engines() {
        let s = setup("write", engine);
        let vq = MockSplitQueue::new(&s.mem, 16);
        s.mem
            .write_slice(&[0x5A; 1024], GuestAddress(DATA))
            .unwrap();
        add_request(&s.mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 10, &[(DATA, 1024, R)]);
        let (mut h, _) = handler(&s.dev, &s.mem, &vq);
        run(&mut h);
        assert_eq!(status(&s.mem, 0), S_OK, "{engine:?}");
        assert_eq!(used_len(&vq, 0), 1);
        let content = s.disk.read();
        assert_eq!(content.len(), 64 * 1024);
        for (i, v) in content.iter().enumerate() {
            let expected = if (5120..6144).contains(&i) {
                0x5A
            } else {
                pattern(i)
            };
            assert_eq!(*v, expected, "{engine:?} byte {i}");
        }
        let c = s.dev.counters();
        assert_eq!(BlockCounters::get(&c.writes), 1);
        assert_eq!(BlockCounters::get(&c.bytes_written), 1024);
    }
}

fn range_request(s: &Setup, vq: &MockSplitQueue<'_, GuestMemoryMmap>, t: u32, flags: u32) {
    // Sectors 8..16 and 40..42.
    for (i, (sector, num)) in [(8u64, 8u32), (40, 2)].into_iter().enumerate() {
        let at = DATA + 16 * i as u64;
        s.mem.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
        s.mem.write_obj(num.to_le(), GuestAddress(at + 8)).unwrap();
        s.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
    }
    add_request(&s.mem, vq, 0, 0, t, 0, &[(DATA, 32, R)]);
}

fn zeroed(i: usize) -> bool {
    (4096..8192).contains(&i) || (40 * 512..42 * 512).contains(&i)
}

#[test]
fn write_zeroes_zeroes_every_range_with_and_without_unmap() {
    for engine in engines() {
        for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
            let s = setup("wz", engine);
            let vq = MockSplitQueue::new(&s.mem, 16);
            range_request(&s, &vq, VIRTIO_BLK_T_WRITE_ZEROES, flags);
            let (mut h, _) = handler(&s.dev, &s.mem, &vq);
            run(&mut h);
            assert_eq!(status(&s.mem, 0), S_OK, "{engine:?} flags {flags}");
            let content = s.disk.read();
            assert_eq!(content.len(), 64 * 1024, "file size kept");
            for (i, v) in content.iter().enumerate() {
                let expected = if zeroed(i) { 0 } else { pattern(i) };
                assert_eq!(*v, expected, "{engine:?} flags {flags} byte {i}");
            }
        }
    }
}

#[test]
fn discard_succeeds_and_keeps_the_file_size() {
    for engine in engines() {
        let s = setup("discard", engine);
        let vq = MockSplitQueue::new(&s.mem, 16);
        range_request(&s, &vq, VIRTIO_BLK_T_DISCARD, 0);
        let (mut h, _) = handler(&s.dev, &s.mem, &vq);
        run(&mut h);
        assert_eq!(status(&s.mem, 0), S_OK, "{engine:?}");
        let content = s.disk.read();
        assert_eq!(content.len(), 64 * 1024);
        // Outside the ranges nothing changes (inside, the host may or may not deallocate).
        for (i, v) in content.iter().enumerate() {
            if !zeroed(i) {
                assert_eq!(*v, pattern(i), "{engine:?} byte {i}");
            }
        }
    }
}

#[test]
fn flush_completes_ok_and_is_counted() {
    for engine in engines() {
        let s = setup("flush", engine);
        let vq = MockSplitQueue::new(&s.mem, 16);
        add_request(&s.mem, &vq, 0, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
        let (mut h, _) = handler(&s.dev, &s.mem, &vq);
        run(&mut h);
        assert_eq!(status(&s.mem, 0), S_OK, "{engine:?}");
        assert_eq!(used_len(&vq, 0), 1);
        assert_eq!(BlockCounters::get(&s.dev.counters().flushes), 1);
    }
}

#[test]
fn writes_submitted_before_a_flush_are_in_the_file_when_the_flush_completes() {
    for engine in engines() {
        let s = setup("order", engine);
        let vq = MockSplitQueue::new(&s.mem, 16);
        // Four writes then a flush, all in one batch (one io_uring submission).
        for slot in 0..4u16 {
            let buf = DATA + 0x1_0000 * u64::from(slot);
            s.mem
                .write_slice(&[0xC0 + slot as u8; 4096], GuestAddress(buf))
                .unwrap();
            let sector = 8 * u64::from(slot);
            add_request(
                &s.mem,
                &vq,
                slot * 3,
                slot.into(),
                VIRTIO_BLK_T_OUT,
                sector,
                &[(buf, 4096, R)],
            );
        }
        add_request(&s.mem, &vq, 12, 4, VIRTIO_BLK_T_FLUSH, 0, &[]);
        let (mut h, _) = handler(&s.dev, &s.mem, &vq);
        h.process_queue().unwrap();
        let start = std::time::Instant::now();
        while status(&s.mem, 4) == UNTOUCHED {
            assert!(start.elapsed().as_secs() < 10, "flush did not complete");
            h.process_completions().unwrap();
        }
        assert_eq!(status(&s.mem, 4), S_OK, "{engine:?}");
        let content = s.disk.read();
        for slot in 0..4usize {
            let range = slot * 4096..(slot + 1) * 4096;
            assert!(
                content[range].iter().all(|v| *v == 0xC0 + slot as u8),
                "{engine:?}: write {slot} not on the file when the flush completed"
            );
        }
        run(&mut h);
    }
}

#[test]
fn read_only_disk_refuses_writes_discard_and_write_zeroes_without_touching_the_file() {
    for engine in engines() {
        let disk = TempDisk::patterned("ro", 64 * 1024);
        let dev = block(&disk, true, engine);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
        mem.write_obj(0u64, GuestAddress(DATA + 0x1000)).unwrap();
        mem.write_obj(1u32.to_le(), GuestAddress(DATA + 0x1008))
            .unwrap();
        mem.write_obj(0u32, GuestAddress(DATA + 0x100C)).unwrap();
        let range = [(DATA + 0x1000, 16, R)];
        add_request(&mem, &vq, 3, 1, VIRTIO_BLK_T_DISCARD, 0, &range);
        add_request(&mem, &vq, 6, 2, VIRTIO_BLK_T_WRITE_ZEROES, 0, &range);
        add_request(
            &mem,
            &vq,
            9,
            3,
            VIRTIO_BLK_T_IN,
            0,
            &[(DATA + 0x2000, 512, W)],
        );
        let (mut h, _) = handler(&dev, &mem, &vq);
        assert_eq!(run(&mut h), 4);
        for slot in 0..3 {
            assert_eq!(status(&mem, slot), S_IOERR, "{engine:?} request {slot}");
        }
        assert_eq!(status(&mem, 3), S_OK, "reads still work");
        let expected: Vec<u8> = (0..64 * 1024).map(pattern).collect();
        assert!(disk.read() == expected);
        assert_eq!(BlockCounters::get(&dev.counters().errors), 3);
    }
}

#[test]
fn reads_past_the_end_of_a_shrunk_file_are_ioerr_and_the_next_request_works() {
    for engine in engines() {
        let s = setup("shrunk", engine);
        // Capacity was read at open; the file loses its second half behind the device's back.
        OpenOptions::new()
            .write(true)
            .open(&s.disk.path)
            .unwrap()
            .set_len(32 * 1024)
            .unwrap();
        let vq = MockSplitQueue::new(&s.mem, 16);
        add_request(&s.mem, &vq, 0, 0, VIRTIO_BLK_T_IN, 60, &[(DATA, 8192, W)]);
        add_request(
            &s.mem,
            &vq,
            3,
            1,
            VIRTIO_BLK_T_IN,
            0,
            &[(DATA + 0x1_0000, 512, W)],
        );
        let (mut h, _) = handler(&s.dev, &s.mem, &vq);
        assert_eq!(run(&mut h), 2);
        assert_eq!(status(&s.mem, 0), S_IOERR, "{engine:?}");
        assert_eq!(used_len(&vq, 0), 1);
        assert_eq!(status(&s.mem, 1), S_OK);
    }
}

/// A backend failing the next operations with the queued errors, then succeeding.
struct FailingBackend {
    errors: Mutex<Vec<i32>>,
}

impl DiskBackend for FailingBackend {
    fn start(&mut self, _: &GuestMemoryMmap, _: DiskOp<'_>, _: u64) -> Option<io::Result<()>> {
        let next = self.errors.lock().unwrap().pop();
        Some(match next {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        })
    }

    fn engine(&self) -> Engine {
        Engine::Sync
    }
}

fn context(dev: &Block, read_only: bool) -> DiskContext {
    DiskContext {
        limits: dev.limits(),
        read_only,
        id: *dev.id(),
        counters: dev.counters(),
        path: dev.path().to_path_buf(),
        handed_over: Default::default(),
    }
}

#[test]
fn host_eio_and_enospc_give_ioerr_and_the_worker_goes_on() {
    let disk = TempDisk::patterned("eio", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
    add_request(&mem, &vq, 3, 1, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
    add_request(&mem, &vq, 6, 2, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
    let backend = FailingBackend {
        // Popped from the end: EIO first, then ENOSPC.
        errors: Mutex::new(vec![libc::ENOSPC, libc::EIO]),
    };
    let interrupt = Arc::new(CountingInterrupt::default());
    let mut h = BlockHandler::new(
        mem.clone(),
        vq.create_queue().unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        interrupt.clone(),
        Box::new(backend),
        context(&dev, false),
    );
    assert_eq!(run(&mut h), 3);
    assert_eq!(status(&mem, 0), S_IOERR);
    assert_eq!(status(&mem, 1), S_IOERR);
    assert_eq!(status(&mem, 2), S_OK);
    assert_eq!(used_len(&vq, 0), 1, "a failed read returns only the status");
    let c = dev.counters();
    assert_eq!(BlockCounters::get(&c.errors), 2);
    assert_eq!(BlockCounters::get(&c.writes), 1);
    assert_eq!(interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn writes_through_a_read_only_descriptor_fail_with_ebadf_as_ioerr_and_the_next_request_works() {
    for engine in engines() {
        let disk = TempDisk::patterned("ebadf", 64 * 1024);
        let dev = block(&disk, false, engine);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
        add_request(
            &mem,
            &vq,
            3,
            1,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[(DATA + 0x1000, 16, R)],
        );
        mem.write_obj(1u32.to_le(), GuestAddress(DATA + 0x1008))
            .unwrap();
        add_request(
            &mem,
            &vq,
            6,
            2,
            VIRTIO_BLK_T_IN,
            2,
            &[(DATA + 0x2000, 512, W)],
        );
        // The device believes it may write, but the file descriptor is read-only.
        let file = std::fs::File::open(&disk.path).unwrap();
        let interrupt = Arc::new(CountingInterrupt::default());
        let mut h = BlockHandler::new(
            mem.clone(),
            vq.create_queue().unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            interrupt,
            open_backend(engine, file),
            context(&dev, false),
        );
        assert_eq!(run(&mut h), 3);
        assert_eq!(status(&mem, 0), S_IOERR, "{engine:?} write");
        assert_eq!(status(&mem, 1), S_IOERR, "{engine:?} write-zeroes");
        assert_eq!(status(&mem, 2), S_OK, "{engine:?} read after the failures");
        let expected: Vec<u8> = (0..64 * 1024).map(pattern).collect();
        assert!(disk.read() == expected);
    }
}

#[test]
fn a_full_queue_of_mixed_requests_completes_with_one_interrupt_per_batch() {
    for engine in engines() {
        let s = setup("mixed", engine);
        let vq = MockSplitQueue::new(&s.mem, 64);
        for slot in 0..20u16 {
            let buf = DATA + 0x1000 * u64::from(slot);
            let (t, dir) = if slot % 2 == 0 {
                (VIRTIO_BLK_T_IN, W)
            } else {
                (VIRTIO_BLK_T_OUT, R)
            };
            add_request(
                &s.mem,
                &vq,
                slot * 3,
                slot.into(),
                t,
                8 * u64::from(slot % 16),
                &[(buf, 4096, dir)],
            );
        }
        let (mut h, interrupt) = handler(&s.dev, &s.mem, &vq);
        let completed = run(&mut h);
        assert_eq!(completed, 20, "{engine:?}");
        assert_eq!(used_count(&vq), 20);
        for slot in 0..20 {
            assert_eq!(status(&s.mem, slot), S_OK, "{engine:?} request {slot}");
        }
        let interrupts = interrupt.queue.load(Ordering::SeqCst);
        if engine == Engine::Sync {
            assert_eq!(interrupts, 1);
        } else {
            // Completions may arrive in more than one batch, never more than one per request.
            assert!((1..=20).contains(&interrupts), "{interrupts} interrupts");
        }
        let c = s.dev.counters();
        assert_eq!(BlockCounters::get(&c.reads), 10);
        assert_eq!(BlockCounters::get(&c.writes), 10);
        assert_eq!(BlockCounters::get(&c.bytes_written), 10 * 4096);
    }
}

/// Requests of one batch are parsed first and started afterwards: a FLUSH in the middle still
/// runs after the write before it, and a read after the FLUSH sees that write. Malformed and
/// GET_ID chains answered at parse time in the same batch do not disturb it.
#[test]
fn a_flush_in_the_middle_of_a_batch_orders_the_write_before_it_and_the_read_after_it() {
    for engine in engines() {
        let s = setup("staged", engine);
        let vq = MockSplitQueue::new(&s.mem, 64);
        let (write_buf, read_buf, id_buf) = (DATA, DATA + 0x1_0000, DATA + 0x2_0000);
        s.mem
            .write_slice(&[0xAB; 4096], GuestAddress(write_buf))
            .unwrap();
        s.mem
            .write_slice(&[0x55; 4096], GuestAddress(read_buf))
            .unwrap();
        // 0: header only (no status): returned with nothing written.
        s.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        vq.add_desc_chains(&chain(0, &[(HDR, 16, R)]), 0).unwrap();
        add_request(
            &s.mem,
            &vq,
            1,
            1,
            VIRTIO_BLK_T_OUT,
            8,
            &[(write_buf, 4096, R)],
        );
        add_request(
            &s.mem,
            &vq,
            4,
            2,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(id_buf, 20, W)],
        );
        add_request(&s.mem, &vq, 7, 3, VIRTIO_BLK_T_FLUSH, 0, &[]);
        add_request(&s.mem, &vq, 9, 4, 99, 0, &[]);
        add_request(
            &s.mem,
            &vq,
            11,
            5,
            VIRTIO_BLK_T_IN,
            8,
            &[(read_buf, 4096, W)],
        );
        let (mut h, _) = handler(&s.dev, &s.mem, &vq);
        assert_eq!(run(&mut h), 6, "{engine:?}");
        assert_eq!(used_count(&vq), 6);
        assert_eq!(status(&s.mem, 0), UNTOUCHED, "{engine:?}");
        assert_eq!(status(&s.mem, 1), S_OK, "{engine:?}");
        assert_eq!(status(&s.mem, 2), S_OK, "{engine:?}");
        assert_eq!(status(&s.mem, 3), S_OK, "{engine:?}");
        assert_eq!(status(&s.mem, 4), S_UNSUPP, "{engine:?}");
        assert_eq!(status(&s.mem, 5), S_OK, "{engine:?}");
        let mut read = [0u8; 4096];
        s.mem.read_slice(&mut read, GuestAddress(read_buf)).unwrap();
        assert!(
            read.iter().all(|v| *v == 0xAB),
            "{engine:?}: read before write"
        );
        let content = s.disk.read();
        assert!(content[4096..8192].iter().all(|v| *v == 0xAB), "{engine:?}");
        let c = s.dev.counters();
        assert_eq!(BlockCounters::get(&c.flushes), 1);
        assert_eq!(BlockCounters::get(&c.errors), 2);
    }
}

/// A kick with more chains than one batch: writes, a FLUSH and reads of the same sectors,
/// spread over three batches, complete in order and all of them are returned.
#[test]
fn writes_flush_and_reads_across_several_batches_keep_their_order() {
    const WRITES: u16 = 33;
    for engine in engines() {
        let s = setup("batches", engine);
        let vq = MockSplitQueue::new(&s.mem, 256);
        let mut slot = 0u16;
        for sector in 0..WRITES {
            let buf = DATA + 0x1000 * u64::from(slot);
            s.mem
                .write_slice(&[0x80 + sector as u8; 512], GuestAddress(buf))
                .unwrap();
            let (first, sector) = (slot * 3, u64::from(sector));
            add_request(
                &s.mem,
                &vq,
                first,
                slot.into(),
                VIRTIO_BLK_T_OUT,
                sector,
                &[(buf, 512, R)],
            );
            slot += 1;
        }
        add_request(
            &s.mem,
            &vq,
            slot * 3,
            slot.into(),
            VIRTIO_BLK_T_FLUSH,
            0,
            &[],
        );
        let flush_slot = slot;
        slot += 1;
        for sector in 0..WRITES {
            let buf = DATA + 0x1000 * u64::from(slot);
            let (first, sector) = (slot * 3, u64::from(sector));
            add_request(
                &s.mem,
                &vq,
                first,
                slot.into(),
                VIRTIO_BLK_T_IN,
                sector,
                &[(buf, 512, W)],
            );
            slot += 1;
        }
        let (mut h, _) = handler(&s.dev, &s.mem, &vq);
        assert_eq!(run(&mut h), usize::from(slot), "{engine:?}");
        assert_eq!(used_count(&vq), slot);
        for i in 0..slot {
            assert_eq!(status(&s.mem, i.into()), S_OK, "{engine:?} request {i}");
        }
        for sector in 0..WRITES {
            let reader = flush_slot + 1 + sector;
            let mut read = [0u8; 512];
            let buf = DATA + 0x1000 * u64::from(reader);
            s.mem.read_slice(&mut read, GuestAddress(buf)).unwrap();
            assert!(
                read.iter().all(|v| *v == 0x80 + sector as u8),
                "{engine:?}: read of sector {sector} did not see its write"
            );
        }
        let c = s.dev.counters();
        assert_eq!(BlockCounters::get(&c.writes), u64::from(WRITES));
        assert_eq!(BlockCounters::get(&c.reads), u64::from(WRITES));
        assert_eq!(BlockCounters::get(&c.flushes), 1);
    }
}
