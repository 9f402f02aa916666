//! The flush when a worker stops: a disk written since its last FLUSH is flushed after the
//! operations in flight complete, whether the worker is stopped (device reset, VM teardown) or
//! its handler is simply dropped; clean and read-only disks are left alone. And pausing: the
//! requests in flight complete first, then nothing reaches guest memory or the disk.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::io;
use std::sync::Mutex;

use virtio_bindings::virtio_blk::*;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::tests::*;
use super::*;

/// What a backend was asked to do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Start(&'static str, u64),
    Done(u64, bool),
    /// The backend wrote its cached image metadata back (a qcow2 image's tables).
    WriteBack,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn op_name(op: &DiskOp<'_>) -> &'static str {
    match op {
        DiskOp::Read { .. } | DiskOp::ReadBuf { .. } => "read",
        DiskOp::Write { .. } | DiskOp::WriteBuf { .. } => "write",
        DiskOp::Flush => "flush",
        DiskOp::Discard { .. } => "discard",
        DiskOp::WriteZeroes { .. } => "write-zeroes",
    }
}

/// Wraps a real engine and logs its operations and completions.
struct Recording {
    inner: Box<dyn DiskBackend>,
    log: Log,
}

impl Recording {
    fn record_done(&self, done: &[(u64, io::Result<()>)]) {
        let mut log = self.log.lock().unwrap();
        log.extend(done.iter().map(|(t, r)| Seen::Done(*t, r.is_ok())));
    }
}

impl DiskBackend for Recording {
    fn start(&mut self, mem: &GuestMemoryMmap, op: DiskOp<'_>, t: u64) -> Option<io::Result<()>> {
        self.log.lock().unwrap().push(Seen::Start(op_name(&op), t));
        let outcome = self.inner.start(mem, op, t);
        if let Some(r) = &outcome {
            self.log.lock().unwrap().push(Seen::Done(t, r.is_ok()));
        }
        outcome
    }
    fn submit(&mut self) -> io::Result<()> {
        self.inner.submit()
    }
    fn reap(&mut self, done: &mut Completions) {
        let before = done.len();
        self.inner.reap(done);
        self.record_done(&done[before..]);
    }
    fn wait_all(&mut self, done: &mut Completions) -> io::Result<()> {
        let before = done.len();
        let result = self.inner.wait_all(done);
        self.record_done(&done[before..]);
        result
    }
    fn write_back(&mut self) -> io::Result<()> {
        self.log.lock().unwrap().push(Seen::WriteBack);
        self.inner.write_back()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.completion_fd()
    }
    fn engine(&self) -> Engine {
        self.inner.engine()
    }
}

/// Completes nothing until `wait_all`: every operation stays in flight, as on a slow disk.
#[derive(Default)]
struct NeverDone {
    pending: Vec<u64>,
    log: Log,
}

impl DiskBackend for NeverDone {
    fn start(&mut self, _: &GuestMemoryMmap, op: DiskOp<'_>, t: u64) -> Option<io::Result<()>> {
        self.log.lock().unwrap().push(Seen::Start(op_name(&op), t));
        self.pending.push(t);
        None
    }
    fn wait_all(&mut self, done: &mut Completions) -> io::Result<()> {
        let mut log = self.log.lock().unwrap();
        for t in self.pending.drain(..) {
            log.push(Seen::Done(t, true));
            done.push((t, Ok(())));
        }
        Ok(())
    }
    fn engine(&self) -> Engine {
        Engine::IoUring
    }
}

fn stop_flushes(log: &Log) -> usize {
    let log = log.lock().unwrap();
    log.iter()
        .filter(|s| **s == Seen::Start("flush", u64::MAX))
        .count()
}

fn handler_over(
    dev: &Block,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    backend: Box<dyn DiskBackend>,
) -> BlockHandler<CountingInterrupt> {
    handler_signalling(dev, mem, vq, backend, Arc::default())
}

/// [`handler_over`] signalling through `interrupt`.
fn handler_signalling(
    dev: &Block,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    backend: Box<dyn DiskBackend>,
    interrupt: Arc<CountingInterrupt>,
) -> BlockHandler<CountingInterrupt> {
    let disk = DiskContext {
        limits: dev.limits(),
        read_only: dev.readonly(),
        id: *dev.id(),
        counters: dev.counters(),
        path: dev.path().to_path_buf(),
        handed_over: dev.handed_over.clone(),
    };
    BlockHandler::new(
        mem.clone(),
        vq.create_queue().unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        interrupt,
        backend,
        disk,
    )
}

fn recording(dev: &Block, log: &Log) -> Box<dyn DiskBackend> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!dev.readonly())
        .open(dev.path())
        .unwrap();
    Box::new(Recording {
        inner: open_backend(dev.engine(), file),
        log: log.clone(),
    })
}

#[test]
fn stopping_the_worker_flushes_a_written_disk() {
    for engine in engines() {
        let Setup {
            disk: _disk,
            dev,
            mem,
        } = setup("stop", engine);
        let vq = MockSplitQueue::new(&mem, 16);
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 2, &[(DATA, 512, R)]);
        let log = Log::default();
        let h = handler_over(&dev, &mem, &vq, recording(&dev, &log));
        // The worker serves requests posted before it starts, in its init.
        let worker = spawn_worker("test-blk-stop", h).unwrap();
        wait_for_used(&vq);
        assert_eq!(stop_flushes(&log), 0, "{engine:?}: flushed before the stop");
        worker.stop();
        let log = log.lock().unwrap().clone();
        let flush = log
            .iter()
            .position(|s| *s == Seen::Start("flush", u64::MAX))
            .unwrap_or_else(|| panic!("{engine:?}: no flush at stop: {log:?}"));
        assert!(
            log[flush..].contains(&Seen::Done(u64::MAX, true)),
            "{engine:?}: the stop flush did not succeed: {log:?}"
        );
        assert_eq!(status(&mem, 0), S_OK);
    }
}

#[test]
fn a_disk_handed_to_another_vmm_is_not_flushed_when_the_worker_stops() {
    for engine in engines() {
        let Setup {
            disk: _disk,
            dev,
            mem,
        } = setup("handed-over", engine);
        let vq = MockSplitQueue::new(&mem, 16);
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 2, &[(DATA, 512, R)]);
        let log = Log::default();
        let h = handler_over(&dev, &mem, &vq, recording(&dev, &log));
        let worker = spawn_worker("test-blk-handed", h).unwrap();
        wait_for_used(&vq);
        // A live migration's source after its final flush: the receiver has the image now.
        dev.disk_sync().unwrap().unwrap().release_lock();
        worker.stop();
        assert_eq!(
            stop_flushes(&log),
            0,
            "{engine:?}: wrote a handed-over image"
        );
    }
}

#[test]
fn a_worker_whose_queue_broke_still_settles_its_image_when_paused() {
    let Setup {
        disk: _disk,
        dev,
        mem,
    } = setup("broken-pause", Engine::Sync);
    let vq = MockSplitQueue::new(&mem, 16);
    // An available index 100 ahead of a 16-entry queue: the queue is broken at once.
    vq.avail().idx().store(100);
    let log = Log::default();
    let interrupt = Arc::new(CountingInterrupt::default());
    let h = handler_signalling(&dev, &mem, &vq, recording(&dev, &log), interrupt.clone());
    let worker = spawn_worker("test-blk-broken", h).unwrap();
    let start = std::time::Instant::now();
    while interrupt.needs_reset.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed().as_secs() < 10, "the queue never broke");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    worker.pause().unwrap();
    // A snapshot or a migration's receiver opens the image next: its metadata is written.
    let seen = log.lock().unwrap().clone();
    assert!(seen.contains(&Seen::WriteBack), "{seen:?}");
    worker.stop();
}

#[test]
fn device_reset_after_a_write_stops_the_worker_cleanly() {
    // The real device with its own backend: reset must drain and flush without hanging.
    for engine in engines() {
        let Setup { disk, mut dev, mem } = setup("reset", engine);
        let vq = MockSplitQueue::new(&mem, 16);
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, R)]);
        let queue = ActiveQueue {
            queue: vq.create_queue().unwrap(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let interrupt = Arc::new(CountingInterrupt::default());
        dev.activate(mem.clone(), interrupt, vec![queue]).unwrap();
        wait_for_used(&vq);
        dev.reset();
        assert_eq!(&disk.read()[512..1024], &[0x5a; 512]);
    }
}

#[test]
fn in_flight_writes_complete_before_the_stop_flush() {
    let disk = TempDisk::patterned("inflight", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
    add_request(&mem, &vq, 3, 1, VIRTIO_BLK_T_OUT, 4, &[(DATA, 512, R)]);
    let log = Log::default();
    let backend = NeverDone {
        pending: Vec::new(),
        log: log.clone(),
    };
    let mut h = handler_over(&dev, &mem, &vq, Box::new(backend));
    h.process_queue().unwrap();
    assert_eq!(h.in_flight(), 2);
    drop(h);
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            Seen::Start("write", 0),
            Seen::Start("write", 1),
            Seen::Done(0, true),
            Seen::Done(1, true),
            Seen::Start("flush", u64::MAX),
            Seen::Done(u64::MAX, true),
        ]
    );
}

#[test]
fn a_disk_clean_since_the_last_guest_flush_is_not_flushed_again() {
    for engine in engines() {
        let Setup {
            disk: _disk,
            dev,
            mem,
        } = setup("clean", engine);
        let vq = MockSplitQueue::new(&mem, 16);
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
        add_request(&mem, &vq, 3, 1, VIRTIO_BLK_T_FLUSH, 0, &[]);
        add_request(&mem, &vq, 5, 2, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
        let log = Log::default();
        let mut h = handler_over(&dev, &mem, &vq, recording(&dev, &log));
        assert_eq!(run(&mut h), 3, "{engine:?}");
        assert!(!h.has_unflushed_writes(), "{engine:?}");
        drop(h);
        assert_eq!(stop_flushes(&log), 0, "{engine:?}");
    }
}

#[test]
fn writes_after_the_last_guest_flush_are_flushed_at_stop() {
    for engine in engines() {
        let Setup {
            disk: _disk,
            dev,
            mem,
        } = setup("dirty", engine);
        let vq = MockSplitQueue::new(&mem, 16);
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
        add_request(&mem, &vq, 2, 1, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
        let log = Log::default();
        let mut h = handler_over(&dev, &mem, &vq, recording(&dev, &log));
        assert_eq!(run(&mut h), 2, "{engine:?}");
        assert!(h.has_unflushed_writes(), "{engine:?}");
        drop(h);
        assert_eq!(stop_flushes(&log), 1, "{engine:?}");
    }
}

#[test]
fn read_only_and_unwritten_disks_are_not_flushed_at_stop() {
    let disk = TempDisk::patterned("ro", 64 * 1024);
    for readonly in [true, false] {
        let dev = block(&disk, readonly, Engine::Sync);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
        if readonly {
            // Refused: nothing reaches the file.
            add_request(&mem, &vq, 3, 1, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
        }
        let log = Log::default();
        let mut h = handler_over(&dev, &mem, &vq, recording(&dev, &log));
        assert_eq!(run(&mut h), 1 + usize::from(readonly));
        drop(h);
        assert_eq!(stop_flushes(&log), 0, "readonly {readonly}");
    }
}

#[test]
fn disk_sync_is_offered_for_writable_disks_and_names_the_path() {
    let disk = TempDisk::patterned("sync", 4096);
    let dev = block(&disk, false, Engine::Sync);
    let sync = dev.disk_sync().unwrap().expect("writable disk");
    assert_eq!(sync.path(), disk.path.as_path());
    sync.sync().unwrap();
    // The image is locked while the writable device (or its flush handle) lives.
    drop((sync, dev));
    assert!(
        block(&disk, true, Engine::Sync)
            .disk_sync()
            .unwrap()
            .is_none()
    );
    let err = BlockError::Flush {
        path: disk.path.clone(),
        source: io::Error::from_raw_os_error(libc::EIO),
    };
    assert_eq!(
        err.to_string(),
        format!("Cannot flush disk {}", disk.path.display())
    );
}

#[test]
fn pause_completes_the_requests_in_flight_and_returns_them_to_the_guest() {
    let disk = TempDisk::patterned("quiesce", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
    add_request(&mem, &vq, 3, 1, VIRTIO_BLK_T_OUT, 4, &[(DATA, 512, R)]);
    let backend = NeverDone {
        pending: Vec::new(),
        log: Log::default(),
    };
    let mut h = handler_over(&dev, &mem, &vq, Box::new(backend));
    h.process_queue().unwrap();
    assert_eq!((h.in_flight(), used_count(&vq)), (2, 0));
    crate::virtio::DeviceHandler::quiesce(&mut h);
    assert_eq!((h.in_flight(), used_count(&vq)), (0, 2));
    assert_eq!((status(&mem, 0), status(&mem, 1)), (S_OK, S_OK));
    let queues = crate::virtio::DeviceHandler::queue_states(&h);
    assert_eq!((queues[0].next_avail, queues[0].next_used), (2, 2));
}

#[test]
fn paused_device_touches_neither_guest_memory_nor_the_disk_until_resumed() {
    for engine in engines() {
        let Setup { disk, mut dev, mem } = setup("paused", engine);
        let vq = MockSplitQueue::new(&mem, 16);
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = notify.try_clone().unwrap();
        let queue = ActiveQueue {
            queue: vq.create_queue().unwrap(),
            notify,
        };
        let interrupt = Arc::new(CountingInterrupt::default());
        dev.activate(mem.clone(), interrupt.clone(), vec![queue])
            .unwrap();
        dev.pause().unwrap();
        let before = disk.read();
        mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_OUT, 2, &[(DATA, 512, R)]);
        kick.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(used_count(&vq), 0, "{engine:?}: used ring written");
        assert_eq!(status(&mem, 0), UNTOUCHED, "{engine:?}: status written");
        assert!(
            disk.read() == before,
            "{engine:?}: disk written while paused"
        );
        assert_eq!(interrupt.queue.load(Ordering::SeqCst), 0);
        let queues = dev.active_queue_states().unwrap();
        assert_eq!(queues[0].next_avail, 0, "{engine:?}: request taken");
        dev.resume();
        wait_for_used(&vq);
        assert_eq!(status(&mem, 0), S_OK);
        assert_eq!(&disk.read()[1024..1536], &[0x77; 512]);
        dev.reset();
    }
}

/// Whether the page of `addr` is marked in its region's dirty bitmap.
fn dirty(mem: &GuestMemoryMmap, addr: u64) -> bool {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    let offset = addr - region.start_addr().0;
    std::ops::Deref::deref(region)
        .bitmap()
        .is_addr_set(offset as usize)
}

#[test]
fn requests_mark_the_guest_pages_the_device_writes_dirty_and_no_others() {
    for engine in engines() {
        let Setup {
            disk: _disk,
            dev,
            mem,
        } = setup("dirty", engine);
        let vq = MockSplitQueue::new(&mem, 16);
        add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_IN, 1, &[(DATA, 512, W)]);
        add_request(
            &mem,
            &vq,
            3,
            1,
            VIRTIO_BLK_T_OUT,
            4,
            &[(DATA + 0x4000, 512, R)],
        );
        let (mut h, _) = handler(&dev, &mem, &vq);
        for region in vm_memory::GuestMemoryBackend::iter(&mem) {
            std::ops::Deref::deref(region).bitmap().reset();
        }
        assert_eq!(run(&mut h), 2);
        assert!(dirty(&mem, DATA), "{engine:?}: read buffer");
        assert!(dirty(&mem, STATUS), "{engine:?}: status byte");
        assert!(!dirty(&mem, DATA + 0x4000), "{engine:?}: write buffer");
        assert!(!dirty(&mem, HDR), "{engine:?}: header");
    }
}

/// A second writable device on `disk`, as another VMM (a migration's destination) opens it.
fn second_writer(disk: &TempDisk) -> Result<Block, BlockError> {
    Block::new(BlockConfig {
        path: disk.path.clone(),
        readonly: false,
        id: None,
        engine: Engine::Sync,
        format: None,
    })
}

#[test]
fn a_released_disk_lock_lets_another_writer_in_and_is_taken_back_only_once_it_left() {
    let disk = TempDisk::patterned("handover", 4096);
    let dev = block(&disk, false, Engine::Sync);
    let sync = dev.disk_sync().unwrap().expect("writable disk");
    let Err(refused) = second_writer(&disk) else {
        panic!("a second writer got the locked image");
    };
    assert!(matches!(refused, BlockError::Locked(_)), "{refused}");

    sync.release_lock();
    let other = second_writer(&disk).expect("the released image can be taken");
    let err = sync.reacquire_lock().unwrap_err();
    assert!(
        err.to_string().contains("Cannot lock the disk image"),
        "{err}"
    );
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains(&disk.path.display().to_string()),
        "{err}"
    );
    drop(other);
    sync.reacquire_lock().unwrap();
    assert!(matches!(second_writer(&disk), Err(BlockError::Locked(_))));
}
