//! Protocol tests: parsing, malformed chains, configuration, interrupts. Shared helpers for
//! the I/O tests in `tests_io.rs` live here too.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;

pub(super) const HDR: u64 = 0x10_0000;
pub(super) const DATA: u64 = 0x20_0000;
pub(super) const STATUS: u64 = 0x1F_0000;
pub(super) const R: u32 = 0;
pub(super) const W: u32 = VRING_DESC_F_WRITE;
pub(super) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(super) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(super) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Written to the status byte before a request, to see whether the device wrote it.
pub(super) const UNTOUCHED: u8 = 0xAA;

pub(super) use crate::virtio::test_utils::CountingInterrupt;

/// A disk file in the temp directory, removed on drop.
pub(super) struct TempDisk {
    pub path: PathBuf,
}

impl TempDisk {
    pub fn new(name: &str, content: &[u8]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("rvmm-blk-{}-{n}-{name}.img", std::process::id()));
        std::fs::write(&path, content).unwrap();
        Self { path }
    }

    /// A disk whose byte `i` is `pattern(i)`.
    pub fn patterned(name: &str, len: usize) -> Self {
        let content: Vec<u8> = (0..len).map(pattern).collect();
        Self::new(name, &content)
    }

    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(super) fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

pub(super) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

pub(super) fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Descriptors of one chain starting at table index `first`: NEXT flags and indices are
/// filled in. Each part is (address, length, R or W).
pub(super) fn chain(first: u16, parts: &[(u64, u32, u32)]) -> Vec<RawDescriptor> {
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i + 1 == parts.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            raw(addr, len, flags, first + i as u16 + 1)
        })
        .collect()
}

pub(super) fn write_header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    mem.write_obj(request_type.to_le(), GuestAddress(addr))
        .unwrap();
    mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(addr + 8))
        .unwrap();
}

/// A standard request: header at `HDR + 0x100*slot`, the given data, status at
/// `STATUS + slot`; added to the queue at descriptor index `first`.
pub(super) fn add_request(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    first: u16,
    slot: u64,
    request_type: u32,
    sector: u64,
    data: &[(u64, u32, u32)],
) {
    let hdr = HDR + 0x100 * slot;
    write_header(mem, hdr, request_type, sector);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS + slot))
        .unwrap();
    let mut parts = vec![(hdr, 16, R)];
    parts.extend_from_slice(data);
    parts.push((STATUS + slot, 1, W));
    vq.add_desc_chains(&chain(first, &parts), first).unwrap();
}

pub(super) fn status(mem: &GuestMemoryMmap, slot: u64) -> u8 {
    mem.read_obj(GuestAddress(STATUS + slot)).unwrap()
}

pub(super) fn used_len(vq: &MockSplitQueue<'_, GuestMemoryMmap>, index: usize) -> u32 {
    vq.used().ring().ref_at(index).unwrap().load().len()
}

pub(super) fn used_count(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    vq.used().idx().load()
}

pub(super) fn block(disk: &TempDisk, readonly: bool, engine: Engine) -> Block {
    Block::new(BlockConfig {
        path: disk.path.clone(),
        readonly,
        id: None,
        engine,
        format: None,
    })
    .unwrap()
}

/// The engines to test; io_uring is skipped (with the reason printed) where it cannot be set up.
pub(super) fn engines() -> Vec<Engine> {
    let probe = TempDisk::new("probe", &[0u8; 512]);
    let file = std::fs::File::open(&probe.path).unwrap();
    match IoUringEngine::new(file) {
        Ok(_) => vec![Engine::Sync, Engine::IoUring],
        Err(e) => {
            println!("SKIPPED io_uring variant: {e}");
            vec![Engine::Sync]
        }
    }
}

/// A writable 64 KiB patterned disk named `name`, its device on `engine`, guest memory.
pub(super) struct Setup {
    pub(super) disk: TempDisk,
    pub(super) dev: Block,
    pub(super) mem: GuestMemoryMmap,
}

pub(super) fn setup(name: &str, engine: Engine) -> Setup {
    let disk = TempDisk::patterned(name, 64 * 1024);
    let dev = block(&disk, false, engine);
    assert_eq!(dev.engine(), engine);
    Setup {
        disk,
        dev,
        mem: memory(),
    }
}

/// Waits up to 10 s for a worker to complete a request on `vq`.
pub(super) fn wait_for_used(vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
    let start = std::time::Instant::now();
    while used_count(vq) == 0 {
        assert!(start.elapsed().as_secs() < 10, "request not served");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

pub(super) fn handler(
    dev: &Block,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
) -> (BlockHandler<CountingInterrupt>, Arc<CountingInterrupt>) {
    let interrupt = Arc::new(CountingInterrupt::default());
    let queue = ActiveQueue {
        queue: vq.create_queue().unwrap(),
        notify: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let h = dev.handler(mem.clone(), queue, interrupt.clone()).unwrap();
    (h, interrupt)
}

/// Processes the queue, then completions until nothing is in flight (io_uring).
pub(super) fn run<I: ?Sized + VirtioInterrupt>(h: &mut BlockHandler<I>) -> usize {
    let mut completed = h.process_queue().unwrap();
    let start = std::time::Instant::now();
    while h.in_flight() > 0 {
        assert!(start.elapsed().as_secs() < 10, "I/O did not complete");
        if let Some(fd) = h.completion_fd() {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one valid pollfd for at most 100 ms.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
        completed += h.process_completions().unwrap();
    }
    completed
}

/// One request on a fresh 64 KiB patterned disk; returns (status, used len, disk).
fn one_request(
    request_type: u32,
    sector: u64,
    data: &[(u64, u32, u32)],
) -> (u8, u32, TempDisk, GuestMemoryMmap) {
    let disk = TempDisk::patterned("one", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    add_request(&mem, &vq, 0, 0, request_type, sector, data);
    let (mut h, _) = handler(&dev, &mem, &vq);
    assert_eq!(run(&mut h), 1);
    assert_eq!(used_count(&vq), 1);
    (status(&mem, 0), used_len(&vq, 0), disk, mem)
}

fn assert_disk_untouched(disk: &TempDisk) {
    let expected: Vec<u8> = (0..64 * 1024).map(pattern).collect();
    assert!(disk.read() == expected, "disk content changed");
}

#[test]
fn get_id_returns_the_file_name_nul_padded() {
    let (st, len, disk, mem) = one_request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    assert_eq!(st, S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    let name = disk.path.file_name().unwrap().as_encoded_bytes();
    let n = name.len().min(20);
    assert_eq!(&id[..n], &name[..n]);
    assert!(id[n..].iter().all(|b| *b == 0));
    assert_eq!(len, 21);
}

#[test]
fn get_id_writes_at_most_20_bytes() {
    let (st, len, _disk, mem) = one_request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 64, W)]);
    assert_eq!(st, S_OK);
    assert_eq!(len, 21);
    let mut tail = [0xFFu8; 44];
    mem.read_slice(&mut tail, GuestAddress(DATA + 20)).unwrap();
    assert!(
        tail.iter().all(|b| *b == 0),
        "bytes past the id were written"
    );
}

#[test]
fn header_only_chain_is_returned_with_zero_length_and_nothing_written() {
    let disk = TempDisk::patterned("hdronly", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    vq.add_desc_chains(&chain(0, &[(HDR, 16, R)]), 0).unwrap();
    let (mut h, _) = handler(&dev, &mem, &vq);
    assert_eq!(run(&mut h), 1);
    assert_eq!(used_len(&vq, 0), 0);
    assert_eq!(BlockCounters::get(&dev.counters().errors), 1);
}

#[test]
fn read_only_status_descriptor_gets_nothing_written_and_zero_length() {
    let disk = TempDisk::patterned("rostatus", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    let parts = [(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)];
    vq.add_desc_chains(&chain(0, &parts), 0).unwrap();
    let (mut h, _) = handler(&dev, &mem, &vq);
    run(&mut h);
    assert_eq!(used_len(&vq, 0), 0);
    assert_eq!(status(&mem, 0), UNTOUCHED);
    assert_disk_untouched(&disk);
}

#[test]
fn status_outside_guest_memory_or_empty_is_not_usable() {
    for (addr, len) in [(0x4000_0000u64, 1u32), (STATUS, 0)] {
        let disk = TempDisk::patterned("badstatus", 64 * 1024);
        let dev = block(&disk, false, Engine::Sync);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let parts = [(HDR, 16, R), (DATA, 512, W), (addr, len, W)];
        vq.add_desc_chains(&chain(0, &parts), 0).unwrap();
        let (mut h, _) = handler(&dev, &mem, &vq);
        run(&mut h);
        assert_eq!(used_len(&vq, 0), 0, "status {addr:#x}+{len}");
    }
}

#[test]
fn header_in_a_device_writable_descriptor_is_ioerr() {
    let disk = TempDisk::patterned("whdr", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let parts = [(HDR, 16, W), (DATA, 512, R), (STATUS, 1, W)];
    vq.add_desc_chains(&chain(0, &parts), 0).unwrap();
    let (mut h, _) = handler(&dev, &mem, &vq);
    run(&mut h);
    assert_eq!(status(&mem, 0), S_IOERR);
    assert_eq!(used_len(&vq, 0), 1);
    assert_disk_untouched(&disk);
}

#[test]
fn short_header_is_ioerr() {
    let disk = TempDisk::patterned("shorthdr", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    write_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let parts = [(HDR, 8, R), (STATUS, 1, W)];
    vq.add_desc_chains(&chain(0, &parts), 0).unwrap();
    let (mut h, _) = handler(&dev, &mem, &vq);
    run(&mut h);
    assert_eq!(status(&mem, 0), S_IOERR);
}

#[test]
fn data_with_the_wrong_direction_is_ioerr() {
    let cases = [
        (VIRTIO_BLK_T_IN, R),
        (VIRTIO_BLK_T_OUT, W),
        (VIRTIO_BLK_T_GET_ID, R),
        (VIRTIO_BLK_T_DISCARD, W),
        (VIRTIO_BLK_T_WRITE_ZEROES, W),
    ];
    for (t, dir) in cases {
        let (st, len, disk, _) = one_request(t, 0, &[(DATA, 512, dir)]);
        assert_eq!(st, S_IOERR, "type {t}");
        assert_eq!(len, 1);
        assert_disk_untouched(&disk);
    }
}

#[test]
fn status_byte_sharing_a_longer_descriptor_is_ioerr_in_its_last_byte() {
    let disk = TempDisk::patterned("longstatus", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    write_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    vq.add_desc_chains(&chain(0, &[(HDR, 16, R), (STATUS, 4, W)]), 0)
        .unwrap();
    let (mut h, _) = handler(&dev, &mem, &vq);
    run(&mut h);
    assert_eq!(status(&mem, 3), S_IOERR);
}

#[test]
fn data_outside_guest_memory_is_ioerr_and_the_disk_is_untouched() {
    let (st, _, disk, _) = one_request(VIRTIO_BLK_T_OUT, 0, &[(0x100_0000 - 256, 512, R)]);
    assert_eq!(st, S_IOERR);
    assert_disk_untouched(&disk);
    let (st, _, _, _) = one_request(VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 100, 512, W)]);
    assert_eq!(st, S_IOERR);
}

#[test]
fn data_length_not_a_multiple_of_512_is_ioerr() {
    let (st, _, disk, _) = one_request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 500, R)]);
    assert_eq!(st, S_IOERR);
    assert_disk_untouched(&disk);
    let (st, _, _, _) = one_request(VIRTIO_BLK_T_IN, 0, &[(DATA, 256, W), (DATA + 4096, 200, W)]);
    assert_eq!(st, S_IOERR);
}

#[test]
fn sectors_past_the_capacity_are_ioerr() {
    // 64 KiB = 128 sectors.
    for sector in [128, 127, u64::MAX, u64::MAX / 512] {
        let (st, _, disk, _) = one_request(VIRTIO_BLK_T_OUT, sector, &[(DATA, 1024, R)]);
        assert_eq!(st, S_IOERR, "sector {sector}");
        assert_disk_untouched(&disk);
    }
    let (st, _, _, _) = one_request(VIRTIO_BLK_T_IN, 126, &[(DATA, 1024, W)]);
    assert_eq!(st, S_OK, "the last two sectors are readable");
}

#[test]
fn flush_with_data_is_ioerr() {
    let (st, _, _, _) = one_request(VIRTIO_BLK_T_FLUSH, 0, &[(DATA, 512, R)]);
    assert_eq!(st, S_IOERR);
}

#[test]
fn unknown_request_type_is_unsupp() {
    let (st, len, disk, _) = one_request(VIRTIO_BLK_T_SCSI_CMD, 0, &[(DATA, 512, R)]);
    assert_eq!(st, S_UNSUPP);
    assert_eq!(len, 1);
    let (st, _, _, _) = one_request(0xdead, 0, &[]);
    assert_eq!(st, S_UNSUPP);
    assert_disk_untouched(&disk);
}

#[test]
fn descriptor_loops_end_and_the_chain_is_completed() {
    let disk = TempDisk::patterned("loop", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> ...: bounded by the queue size.
    let descs = [
        raw(HDR, 16, R | VRING_DESC_F_NEXT, 1),
        raw(DATA, 512, W | VRING_DESC_F_NEXT, 2),
        raw(STATUS, 1, W | VRING_DESC_F_NEXT, 1),
    ];
    for (i, d) in descs.iter().enumerate() {
        vq.desc_table().store(i as u16, *d).unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    let (mut h, interrupt) = handler(&dev, &mem, &vq);
    assert_eq!(run(&mut h), 1);
    assert_eq!(used_count(&vq), 1);
    assert_eq!(interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn indirect_descriptor_loops_end_and_the_chain_is_completed() {
    let disk = TempDisk::patterned("iloop", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let table = 0x30_0000u64;
    let indirect = [
        raw(HDR, 16, R | VRING_DESC_F_NEXT, 1),
        raw(DATA, 512, W | VRING_DESC_F_NEXT, 2),
        raw(STATUS, 1, W | VRING_DESC_F_NEXT, 0),
    ];
    for (i, d) in indirect.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    vq.desc_table()
        .store(0, raw(table, 48, VRING_DESC_F_INDIRECT, 0))
        .unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    let (mut h, _) = handler(&dev, &mem, &vq);
    assert_eq!(run(&mut h), 1);
    assert_eq!(used_count(&vq), 1);
}

#[test]
fn indirect_chains_from_the_mock_are_completed() {
    let disk = TempDisk::patterned("indirect", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    // The mock puts indirect tables at 768 MiB (anonymous memory is reserved lazily).
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x3100_0000)]).unwrap();
    let mut vq = MockSplitQueue::new(&mem, 16);
    // The mock builds a read-only chain of 3: no usable status.
    vq.add_indirect_chain(3).unwrap();
    let (mut h, interrupt) = handler(&dev, &mem, &vq);
    assert_eq!(run(&mut h), 1);
    assert_eq!(used_len(&vq, 0), 0);
    assert_eq!(interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn one_interrupt_per_batch_without_event_idx() {
    let disk = TempDisk::patterned("batch", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    for slot in 0..4u16 {
        let data = [(DATA + 0x1000 * u64::from(slot), 512, W)];
        add_request(
            &mem,
            &vq,
            slot * 3,
            u64::from(slot),
            VIRTIO_BLK_T_IN,
            0,
            &data,
        );
    }
    let (mut h, interrupt) = handler(&dev, &mem, &vq);
    assert_eq!(run(&mut h), 4);
    assert_eq!(interrupt.queue.load(Ordering::SeqCst), 1);
    assert_eq!(run(&mut h), 0);
    assert_eq!(
        interrupt.queue.load(Ordering::SeqCst),
        1,
        "no work, no interrupt"
    );
}

#[test]
fn event_idx_interrupts_only_when_used_event_is_crossed() {
    let disk = TempDisk::patterned("eventidx", 64 * 1024);
    let dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    // used_event sits right after the avail ring.
    let used_event = GuestAddress(vq.avail_addr().0 + 4 + 2 * 16);
    let interrupt = Arc::new(CountingInterrupt::default());
    let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
    queue.set_event_idx(true);
    // The mock packs its used ring over the avail ring's used_event field: move it away.
    queue.set_used_ring_address(Some(0x8000), Some(0));
    let active = ActiveQueue {
        queue,
        notify: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let mut h = dev.handler(mem.clone(), active, interrupt.clone()).unwrap();

    // The driver wants an interrupt after the 5th used entry: two requests do not reach it.
    mem.write_obj(4u16, used_event).unwrap();
    for slot in 0..2u16 {
        add_request(
            &mem,
            &vq,
            slot * 3,
            u64::from(slot),
            VIRTIO_BLK_T_FLUSH,
            0,
            &[],
        );
    }
    assert_eq!(run(&mut h), 2);
    assert_eq!(interrupt.queue.load(Ordering::SeqCst), 0);
    // Three more cross it: one interrupt.
    for slot in 2..5u16 {
        add_request(
            &mem,
            &vq,
            slot * 3,
            u64::from(slot),
            VIRTIO_BLK_T_FLUSH,
            0,
            &[],
        );
    }
    assert_eq!(run(&mut h), 3);
    assert_eq!(interrupt.queue.load(Ordering::SeqCst), 1);
}

#[test]
fn queue_outside_guest_memory_signals_needs_reset_through_the_worker() {
    let disk = TempDisk::patterned("reset", 64 * 1024);
    let mut dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
    queue.set_avail_ring_address(Some(0xF000_0000), Some(0));
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = notify.try_clone().unwrap();
    let interrupt = Arc::new(CountingInterrupt::default());
    dev.activate(mem, interrupt.clone(), vec![ActiveQueue { queue, notify }])
        .unwrap();
    kick.write(1).unwrap();
    let start = std::time::Instant::now();
    while interrupt.needs_reset.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed().as_secs() < 10, "needs-reset not signalled");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    dev.reset();
}

#[test]
fn activated_device_serves_kicks_and_reset_stops_it() {
    let disk = TempDisk::patterned("activate", 64 * 1024);
    let mut dev = block(&disk, false, Engine::Sync);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = notify.try_clone().unwrap();
    let interrupt = Arc::new(CountingInterrupt::default());
    let queue = vq.create_queue().unwrap();
    dev.activate(
        mem.clone(),
        interrupt.clone(),
        vec![ActiveQueue { queue, notify }],
    )
    .unwrap();
    add_request(&mem, &vq, 0, 0, VIRTIO_BLK_T_IN, 1, &[(DATA, 512, W)]);
    kick.write(1).unwrap();
    wait_for_used(&vq);
    assert_eq!(status(&mem, 0), S_OK);
    let mut buf = [0u8; 512];
    mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().enumerate().all(|(i, b)| *b == pattern(512 + i)));
    dev.reset();
    let queue = vq.create_queue().unwrap();
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(
        dev.activate(mem, interrupt, vec![ActiveQueue { queue, notify }])
            .is_ok()
    );
    dev.reset();
}

#[test]
fn config_space_describes_the_disk_little_endian() {
    // 1 MiB + 100 bytes: the tail is not a whole sector and is not exposed.
    let disk = TempDisk::new("config", &vec![0u8; (1 << 20) + 100]);
    let dev = block(&disk, false, Engine::Sync);
    assert_eq!(dev.capacity(), 2048);
    let u32_at = |offset: u64| {
        let mut b = [0u8; 4];
        dev.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    };
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    assert_eq!(u32_at(8), SIZE_MAX);
    assert_eq!(u32_at(12), SEG_MAX);
    assert_eq!(u32_at(16), 0, "no geometry");
    assert_eq!(u32_at(20), 512);
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 1);
    assert_eq!(u32_at(36), MAX_RANGE_SECTORS);
    assert_eq!(u32_at(40), MAX_RANGES);
    assert_eq!(u32_at(48), MAX_RANGE_SECTORS);
    assert_eq!(u32_at(52), MAX_RANGES);
    let mut unmap = [0u8; 1];
    dev.read_config(56, &mut unmap);
    assert_eq!(unmap[0], 1);
    let mut past = [0xFFu8; 8];
    dev.read_config(58, &mut past);
    assert_eq!(past, [0; 8], "bytes past the config space read 0");
}

#[test]
fn features_offer_ro_instead_of_discard_when_read_only() {
    let disk = TempDisk::new("features", &[0u8; 4096]);
    let rw = block(&disk, false, Engine::Sync).features();
    let ro = block(&disk, true, Engine::Sync).features();
    let bit = |b: u32| 1u64 << b;
    for f in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
    ] {
        assert_ne!(rw & bit(f), 0);
        assert_ne!(ro & bit(f), 0);
    }
    assert_ne!(rw & VIRTIO_F_VERSION_1, 0);
    assert_ne!(rw & bit(VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(rw & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
    assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro & bit(VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn open_errors_name_the_path_and_long_ids_are_refused() {
    let err = Block::new(BlockConfig {
        path: "/nonexistent/rvmm/disk.img".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/rvmm/disk.img"),
        "{err}"
    );
    let disk = TempDisk::new("id", &[0u8; 512]);
    let err = Block::new(BlockConfig {
        path: disk.path.clone(),
        id: Some("x".repeat(21)),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, BlockError::IdTooLong(_)));
    let dev = Block::new(BlockConfig {
        path: disk.path.clone(),
        id: Some("serial-1".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(&dev.id()[..9], b"serial-1\0");
}
