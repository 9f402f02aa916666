//! virtio-blk request path, in process: requests built in guest memory with virtio-queue's
//! mock split queue go through `BlockHandler::process_queue` (parse, I/O straight into guest
//! memory, status, used ring, the interrupt of the virtio-mmio or virtio-pci transport), against
//! raw `pread` of the same sizes and offsets from the host.
//!
//! The same requests also run on a qcow2 image of the same content, every cluster allocated
//! (written through rvmm's qcow2 writer), to compare the qcow2 path with the raw one.
//!
//! Run: `cargo bench -p rvmm-benches --bench virtio_blk`. Criterion reports each variant; the
//! last lines print device/raw ratios from an interleaved timing loop.

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use rvmm_benches::{Transport, interrupt};
use rvmm_devices::image::DiskImage;
use rvmm_devices::virtio::block::{Block, BlockConfig, BlockHandler, Engine};
use rvmm_devices::virtio::{ActiveQueue, GuestMemoryMmap, VirtioInterrupt};
use virtio_queue::QueueT;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const DISK_SIZE: u64 = 64 << 20;
/// Requests per batch (one queue kick), like a guest with that I/O depth.
const DEPTH: usize = 32;
const HEADERS: u64 = 0x10_0000;
const STATUS: u64 = 0x18_0000;
const DATA: u64 = 0x100_0000;
const VIRTIO_BLK_T_IN: u32 = 0;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct Disk {
    path: PathBuf,
}

impl Disk {
    fn content() -> Vec<u8> {
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let mut content = Vec::with_capacity(DISK_SIZE as usize);
        for _ in 0..DISK_SIZE >> 20 {
            content.extend_from_slice(&chunk);
        }
        content
    }

    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("rvmm-bench-blk-{}.img", std::process::id()));
        std::fs::write(&path, Self::content()).unwrap();
        // Read it back so every run is served from the page cache.
        assert_eq!(std::fs::read(&path).unwrap().len() as u64, DISK_SIZE);
        Self { path }
    }

    /// A qcow2 image (64 KiB clusters) holding the same bytes, every cluster allocated.
    fn qcow2() -> Self {
        let path =
            std::env::temp_dir().join(format!("rvmm-bench-blk-{}.qcow2", std::process::id()));
        std::fs::write(
            &path,
            rvmm_devices::image::qcow2::overlay_test_bytes(DISK_SIZE),
        )
        .unwrap();
        let mut image = DiskImage::open(&path, true, None).unwrap();
        image.write_at(&Self::content(), 0).unwrap();
        image.flush().unwrap();
        drop(image);
        let _ = std::fs::read(&path).unwrap();
        Self { path }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where each batch reads: 4 KiB at random 4 KiB-aligned offsets, or 1 MiB sequentially.
#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    Random4k,
    Seq1m,
}

impl Pattern {
    fn len(self) -> u32 {
        match self {
            Self::Random4k => 4096,
            Self::Seq1m => 1 << 20,
        }
    }
}

/// Offsets of successive batches: the same sequence for the device and for raw reads.
struct Offsets {
    pattern: Pattern,
    state: u64,
    next_seq: u64,
}

impl Offsets {
    fn new(pattern: Pattern) -> Self {
        Self {
            pattern,
            state: 0x9E37_79B9_7F4A_7C15,
            next_seq: 0,
        }
    }

    fn next(&mut self) -> u64 {
        let len = u64::from(self.pattern.len());
        match self.pattern {
            Pattern::Random4k => {
                // xorshift64: cheap and deterministic.
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                (self.state % (DISK_SIZE / len)) * len
            }
            Pattern::Seq1m => {
                let off = self.next_seq;
                self.next_seq = (self.next_seq + len) % DISK_SIZE;
                off
            }
        }
    }
}

struct DeviceBench {
    mem: GuestMemoryMmap,
    /// Host addresses of the headers' sector fields: the guest writes its own memory directly,
    /// like `RawBench` fills in its offsets, rather than through vm-memory's checked accessors.
    sectors: Vec<*mut u64>,
    handler: BlockHandler<dyn VirtioInterrupt>,
    offsets: Offsets,
    depth: usize,
    _device: Block,
}

impl DeviceBench {
    fn new(
        disk: &Disk,
        engine: Engine,
        transport: Transport,
        pattern: Pattern,
        depth: usize,
    ) -> Self {
        let len = pattern.len();
        let mem_size = DATA + depth as u64 * u64::from(len);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let device = Block::new(BlockConfig {
            path: disk.path.clone(),
            // Reads only; read-only devices share the image's lock, so several variants can
            // have it open at once (a second writer would be refused, as QEMU refuses one).
            readonly: true,
            engine,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(device.engine(), engine, "io_uring is not available here");
        // Chains are laid out once; each batch only rewrites the header sectors.
        let vq = MockSplitQueue::new(&mem, 256);
        let mut descs = Vec::new();
        for i in 0..depth as u64 {
            let first = (3 * i) as u16;
            let d = |addr: u64, len: u32, flags: u16, next: u16| {
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            };
            mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADERS + 16 * i))
                .unwrap();
            descs.push(d(HEADERS + 16 * i, 16, NEXT, first + 1));
            descs.push(d(DATA + i * u64::from(len), len, NEXT | WRITE, first + 2));
            descs.push(d(STATUS + i, 1, WRITE, 0));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let queue = ActiveQueue {
            queue: vq.create_queue().unwrap(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let handler = device
            .handler(mem.clone(), queue, interrupt(transport, 1))
            .unwrap();
        let sectors = (0..depth as u64)
            .map(|i| {
                let addr = GuestAddress(HEADERS + 16 * i + 8);
                mem.get_host_address(addr).unwrap().cast::<u64>()
            })
            .collect();
        let mut bench = Self {
            mem,
            sectors,
            handler,
            offsets: Offsets::new(pattern),
            depth,
            _device: device,
        };
        bench.mem.write_obj(0xAAu8, GuestAddress(STATUS)).unwrap();
        bench.batch();
        let status: u8 = bench.mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, 0, "request failed");
        bench
    }

    /// One batch: the guest fills in sectors and kicks; the device serves every request.
    fn batch(&mut self) {
        for &ptr in &self.sectors {
            let sector = self.offsets.next() / 512;
            // SAFETY: `ptr` is the 8-byte-aligned sector field of a header inside `self.mem`,
            // which this struct owns; the device only reads it during `process_queue` below.
            unsafe { ptr.write_volatile(sector.to_le()) };
        }
        // Rewind the queue so the same chains are available again.
        let queue = self.handler.queue_mut();
        queue.set_next_avail(0);
        queue.set_next_used(0);
        let mut done = self.handler.process_queue().unwrap();
        while done < self.depth {
            done += self.handler.process_completions().unwrap();
        }
    }
}

/// The baseline: `pread` from the host into buffers of the same kind and layout as the
/// device's (an anonymous guest-memory mapping), so only the request path differs.
struct RawBench {
    file: File,
    _mem: GuestMemoryMmap,
    bufs: Vec<(*mut u8, usize)>,
    offsets: Offsets,
}

impl RawBench {
    fn new(disk: &Disk, pattern: Pattern, depth: usize) -> Self {
        let len = pattern.len() as usize;
        let mem_size = DATA as usize + depth * len;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
        let bufs = (0..depth)
            .map(|i| {
                let addr = GuestAddress(DATA + (i * len) as u64);
                (mem.get_host_address(addr).unwrap(), len)
            })
            .collect();
        Self {
            file: File::open(&disk.path).unwrap(),
            _mem: mem,
            bufs,
            offsets: Offsets::new(pattern),
        }
    }

    fn batch(&mut self) {
        for &(ptr, len) in &self.bufs {
            let off = self.offsets.next();
            // SAFETY: `ptr` points to `len` bytes of `_mem`, a mapping this struct owns and that
            // nothing else accesses.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            let n = self.file.read_at(buf, off).unwrap();
            assert_eq!(n, len);
        }
        black_box(&self.bufs);
    }
}

fn name(pattern: Pattern) -> &'static str {
    match pattern {
        Pattern::Random4k => "4k-random",
        Pattern::Seq1m => "1m-seq",
    }
}

fn criterion_groups(c: &mut Criterion, disk: &Disk, qcow2: &Disk) {
    for pattern in [Pattern::Random4k, Pattern::Seq1m] {
        let mut group = c.benchmark_group(format!("virtio_blk/{}-qd{DEPTH}", name(pattern)));
        group.throughput(Throughput::Bytes(DEPTH as u64 * u64::from(pattern.len())));
        let mut raw = RawBench::new(disk, pattern, DEPTH);
        group.bench_function("raw-pread", |b| b.iter(|| raw.batch()));
        for (label, engine) in [("sync", Engine::Sync), ("io_uring", Engine::IoUring)] {
            for transport in Transport::ALL {
                let mut dev = DeviceBench::new(disk, engine, transport, pattern, DEPTH);
                let label = format!("device-{label}-{}", transport.name());
                group.bench_function(label, |b| b.iter(|| dev.batch()));
            }
            let mut dev = DeviceBench::new(qcow2, engine, Transport::Mmio, pattern, DEPTH);
            let label = format!("device-{label}-{}-qcow2", Transport::Mmio.name());
            group.bench_function(label, |b| b.iter(|| dev.batch()));
        }
        group.finish();
    }
}

/// Bytes per second of `batch`, best of several short rounds.
fn rate(mut batch: impl FnMut(), bytes_per_batch: u64, round: Duration) -> f64 {
    let mut batches = 0u64;
    let start = Instant::now();
    while start.elapsed() < round {
        batch();
        batches += 1;
    }
    (batches * bytes_per_batch) as f64 / start.elapsed().as_secs_f64()
}

/// Device/raw ratios from interleaved rounds (so host noise hits every variant alike).
fn print_ratios(disk: &Disk, qcow2: &Disk) {
    const ROUNDS: usize = 5;
    let round = Duration::from_millis(300);
    let mut lines = Vec::new();
    for depth in [DEPTH, 1] {
        for pattern in [Pattern::Random4k, Pattern::Seq1m] {
            let bytes = depth as u64 * u64::from(pattern.len());
            let mut raw = RawBench::new(disk, pattern, depth);
            // (label, bench, best rate, qcow2 image): every transport on the raw image, the
            // qcow2 image on virtio-mmio (the transport does not touch the image format).
            let mut devices: Vec<(String, DeviceBench, f64, bool)> = Vec::new();
            for (label, engine) in [("sync", Engine::Sync), ("io_uring", Engine::IoUring)] {
                for transport in Transport::ALL {
                    let dev = DeviceBench::new(disk, engine, transport, pattern, depth);
                    devices.push((format!("{label} {}", transport.name()), dev, 0.0, false));
                }
                let dev = DeviceBench::new(qcow2, engine, Transport::Mmio, pattern, depth);
                let name = format!("{label} {} qcow2", Transport::Mmio.name());
                devices.push((name, dev, 0.0, true));
            }
            let mut best_raw = 0f64;
            for _ in 0..ROUNDS {
                best_raw = best_raw.max(rate(|| raw.batch(), bytes, round));
                for (_, dev, best, _) in &mut devices {
                    *best = best.max(rate(|| dev.batch(), bytes, round));
                }
            }
            let unit = |r: f64| match pattern {
                Pattern::Random4k => format!("{:.0} kIOPS", r / 4096.0 / 1000.0),
                Pattern::Seq1m => format!("{:.2} GiB/s", r / f64::from(1u32 << 30)),
            };
            let rates: Vec<String> = devices
                .iter()
                .map(|(label, _, best, _)| format!("{label} {}", unit(*best)))
                .collect();
            lines.push(format!(
                "qd{depth} {}: raw {}, {}",
                name(pattern),
                unit(best_raw),
                rates.join(", ")
            ));
            let label = if depth == DEPTH {
                name(pattern).to_string()
            } else {
                format!("{}-qd{depth}", name(pattern))
            };
            for (device, _, best, _) in &devices {
                lines.push(format!(
                    "ratio {label} {device}: {:.2}x raw",
                    best / best_raw
                ));
            }
            // qcow2 against the raw image on the same engine and transport.
            let raw_device = |engine: &str| {
                let label = format!("{engine} {}", Transport::Mmio.name());
                devices
                    .iter()
                    .find(|d| d.0 == label)
                    .map_or(f64::NAN, |d| d.2)
            };
            for (device, _, best, is_qcow2) in &devices {
                if !is_qcow2 {
                    continue;
                }
                let engine = device.split(' ').next().unwrap_or_default();
                lines.push(format!(
                    "ratio {label} {device}: {:.2}x raw device, {:.2}x raw pread",
                    best / raw_device(engine),
                    best / best_raw
                ));
            }
        }
    }
    println!();
    for line in lines {
        println!("{line}");
    }
}

fn main() {
    let disk = Disk::new();
    let qcow2 = Disk::qcow2();
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .configure_from_args();
    criterion_groups(&mut c, &disk, &qcow2);
    c.final_summary();
    print_ratios(&disk, &qcow2);
}
