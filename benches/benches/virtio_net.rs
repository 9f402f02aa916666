//! virtio-net data path, in process: frames go through `NetHandler::process_tx` (guest chains
//! → tap) and `NetHandler::process_rx` (tap → guest chains) with virtio-queue's mock split
//! queues and the interrupt of the virtio-mmio or virtio-pci transport, next to a raw loop of
//! `writev`/`readv` on the same tap (the limit).
//!
//! As root with `/dev/net/tun`, the benchmark moves itself into a private network namespace
//! (`unshare(CLONE_NEWNET)`: freed by the kernel when it exits) and creates a tap there; rx
//! frames are injected from the host side with an `AF_PACKET` socket before each timed drain.
//! Otherwise it falls back to a Unix socket pair (and says so).
//!
//! Run: `cargo bench -p rvmm-benches --bench virtio_net`. Criterion reports each variant; the
//! last lines print device/raw ratios from interleaved timing rounds.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use rvmm_benches::{Transport, interrupt};
use rvmm_devices::virtio::net::{
    MAX_BUFFER_LEN, Net, NetBackend, NetConfig, NetHandler, SocketBackend, Tap, VNET_HDR_LEN,
};
use rvmm_devices::virtio::{
    ActiveQueue, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::QueueT;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const TAP: &str = "rvmmbench0";
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
const TX_BUF: u64 = 0x10_0000;
const RX_BUF: u64 = 0x100_0000;
const MEM_SIZE: usize = 0x300_0000;
/// Queue size; the mock queue overlaps its rings past half of it, so batches stay below.
const QUEUE: u16 = 256;
const WRITE: u16 = 2;
/// Guest memory between successive frames' buffers.
const STRIDE: u64 = 0x1_1000;

/// Features a Linux guest accepts (with merged rx buffers and TSO both ways).
const FEATURES: u64 = VIRTIO_F_VERSION_1
    | 1 << 0
    | 1 << 1
    | 1 << 7
    | 1 << 8
    | 1 << 11
    | 1 << 12
    | 1 << 15
    | 1 << 5
    | 1 << 16;

/// Frame shape of a variant.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// 64-byte frames, no offload.
    Small,
    /// 64 KiB TCP segments with a TSO header.
    Tso,
}

impl Shape {
    fn frame_len(self) -> usize {
        match self {
            Self::Small => 64,
            Self::Tso => 65_000,
        }
    }
    fn batch(self) -> usize {
        match self {
            Self::Small => 64,
            Self::Tso => 16,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Small => "64B",
            Self::Tso => "64KiB-tso",
        }
    }
    /// `virtio_net_hdr_v1` for the frame.
    fn header(self) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        if self == Self::Tso {
            h[0] = 1; // NEEDS_CSUM
            h[1] = 1; // GSO_TCPV4
            h[2..4].copy_from_slice(&54u16.to_le_bytes());
            h[4..6].copy_from_slice(&1448u16.to_le_bytes());
            h[6..8].copy_from_slice(&34u16.to_le_bytes());
            h[8..10].copy_from_slice(&16u16.to_le_bytes());
        }
        h
    }
    /// Ethernet + IPv4 + TCP to documentation addresses (never routed), then payload.
    fn frame(self) -> Vec<u8> {
        let len = self.frame_len();
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let ip_len = (len - 14) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&ip_len.to_be_bytes());
        ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2]);
        let sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        let sum = !((sum & 0xFFFF) + (sum >> 16)) as u16;
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[
            0x9c, 0x40, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
        ]);
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.resize(len, 0xA5);
        f
    }
}

/// The host side of the link.
enum Link {
    /// A tap in a private namespace, with a packet socket injecting frames into it.
    Tap {
        tap: Tap,
        inject: OwnedFd,
        gso_inject: OwnedFd,
        ifindex: i32,
    },
    /// The fallback: a socket pair.
    Pair {
        ours: SocketBackend,
        peer: UnixDatagram,
    },
}

impl Link {
    fn new() -> Self {
        match Self::tap() {
            Ok(link) => link,
            Err(why) => {
                println!("note: no tap ({why}); measuring against a Unix socket pair instead");
                let (ours, peer) = SocketBackend::pair().unwrap();
                Self::Pair { ours, peer }
            }
        }
    }

    fn tap() -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            return Err("needs root and /dev/net/tun".into());
        }
        // SAFETY: called before any thread starts; only changes this process's namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare: {}", std::io::Error::last_os_error()));
        }
        // No IPv6 chatter from the kernel on the new interface.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        let tap = Tap::create(TAP).map_err(|e| e.to_string())?;
        let up = std::process::Command::new("ip")
            .args(["link", "set", TAP, "up"])
            .status()
            .map_err(|e| e.to_string())?;
        if !up.success() {
            return Err("ip link set up failed".into());
        }
        let cname = std::ffi::CString::new(TAP).unwrap();
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        Ok(Self::Tap {
            tap,
            inject: packet_socket(false)?,
            gso_inject: packet_socket(true)?,
            ifindex,
        })
    }

    fn backend(&self) -> Box<dyn NetBackend> {
        match self {
            Self::Tap { tap, .. } => tap.try_clone().unwrap(),
            Self::Pair { ours, .. } => Box::new(ours.duplicate().unwrap()),
        }
    }

    fn is_tap(&self) -> bool {
        matches!(self, Self::Tap { .. })
    }

    /// Puts `n` frames on their way to the guest (untimed).
    fn inject(&self, shape: Shape, frame: &[u8], n: usize) {
        match self {
            Self::Tap {
                inject,
                gso_inject,
                ifindex,
                ..
            } => {
                // AF_PACKET's header is the 10-byte virtio_net_hdr (no num_buffers).
                let mut with_hdr = shape.header()[..10].to_vec();
                with_hdr.extend_from_slice(frame);
                let (fd, data) = match shape {
                    Shape::Small => (inject, frame),
                    Shape::Tso => (gso_inject, &with_hdr[..]),
                };
                for _ in 0..n {
                    packet_send(fd.as_raw_fd(), *ifindex, data);
                }
            }
            Self::Pair { peer, .. } => {
                let mut d = shape.header().to_vec();
                d.extend_from_slice(frame);
                for _ in 0..n {
                    peer.send(&d).unwrap();
                }
            }
        }
    }

    /// Takes what the device sent off a socket pair (a tap needs nothing).
    fn drain(&self) {
        if let Self::Pair { peer, .. } = self {
            let mut buf = vec![0u8; MAX_BUFFER_LEN + 1];
            while peer.recv(&mut buf).is_ok() {}
        }
    }
}

fn packet_socket(vnet_hdr: bool) -> Result<OwnedFd, String> {
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        return Err(format!(
            "packet socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `raw` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let on: libc::c_int = 1;
    let big: libc::c_int = 16 << 20;
    for (level, opt, val) in [
        (libc::SOL_PACKET, libc::PACKET_VNET_HDR, &on),
        (libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &big),
    ] {
        if opt == libc::PACKET_VNET_HDR && !vnet_hdr {
            continue;
        }
        // SAFETY: the option value is a c_int that lives through the call.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                (val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if ret != 0 {
            return Err(format!("setsockopt: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(fd)
}

fn packet_send(fd: RawFd, ifindex: i32, data: &[u8]) {
    // SAFETY: sockaddr_ll is plain old data for which all-zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex;
    addr.sll_protocol = 0x0800u16.to_be();
    // SAFETY: `data` and `addr` are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        n,
        data.len() as isize,
        "inject: {}",
        std::io::Error::last_os_error()
    );
}

fn descriptor(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// The device with both queues laid out once; each batch rewinds them.
struct DeviceBench {
    handler: NetHandler<dyn VirtioInterrupt>,
    shape: Shape,
    _net: Net,
    _mem: GuestMemoryMmap,
}

impl DeviceBench {
    fn new(link: &Link, shape: Shape, transport: Transport) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), QUEUE);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), QUEUE);
        let batch = shape.batch();
        let frame = shape.frame();
        let len = (VNET_HDR_LEN + frame.len()) as u32;
        let mut tx = Vec::new();
        let mut rx = Vec::new();
        for i in 0..batch as u64 {
            let addr = TX_BUF + i * STRIDE;
            mem.write_slice(&shape.header(), GuestAddress(addr))
                .unwrap();
            mem.write_slice(&frame, GuestAddress(addr + VNET_HDR_LEN as u64))
                .unwrap();
            tx.push(descriptor(addr, len, 0));
            // Rx buffers as a Linux guest posts them: 1.5 KiB merged buffers for small frames,
            // one buffer for a whole TSO frame otherwise.
            let rx_len = match shape {
                Shape::Small => 1536,
                Shape::Tso => MAX_BUFFER_LEN as u32,
            };
            rx.push(descriptor(RX_BUF + i * STRIDE, rx_len, WRITE));
        }
        txq.add_desc_chains(&tx, 0).unwrap();
        rxq.add_desc_chains(&rx, 0).unwrap();
        let mut net = Net::with_backend(
            NetConfig {
                tap: TAP.into(),
                ..Default::default()
            },
            link.backend(),
        )
        .unwrap();
        net.ack_features(FEATURES & net.features());
        let active = |vq: &MockSplitQueue<'_, GuestMemoryMmap>| ActiveQueue {
            queue: vq.create_queue().unwrap(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let handler = net
            .handler(
                mem.clone(),
                active(&rxq),
                active(&txq),
                interrupt(transport, 2),
            )
            .unwrap();
        Self {
            handler,
            shape,
            _net: net,
            _mem: mem,
        }
    }

    /// Sends one batch of frames.
    fn tx(&mut self) {
        let q = self.handler.tx_queue_mut();
        q.set_next_avail(0);
        q.set_next_used(0);
        let sent = self.handler.process_tx().unwrap();
        assert_eq!(sent, self.shape.batch(), "the backend refused frames");
    }

    /// Receives one batch of frames (already injected).
    fn rx(&mut self) {
        let q = self.handler.rx_queue_mut();
        q.set_next_avail(0);
        q.set_next_used(0);
        let mut got = 0;
        let mut idle = 0;
        while got < self.shape.batch() && idle < 1000 {
            let n = self.handler.process_rx().unwrap();
            idle = if n == 0 { idle + 1 } else { 0 };
            got += n;
        }
        assert_eq!(got, self.shape.batch(), "frames lost on the way in");
    }
}

/// The limit: `writev`/`read` of the same frames on the same backend, from and into buffers
/// of the same kind and layout as the device's (an anonymous guest-memory mapping), so only
/// the virtio path differs.
struct RawBench {
    backend: Box<dyn NetBackend>,
    shape: Shape,
    _mem: GuestMemoryMmap,
    /// Header + frame of each tx buffer.
    frames: Vec<(*mut u8, usize)>,
    /// Each rx buffer.
    bufs: Vec<(*mut u8, usize)>,
}

impl RawBench {
    fn new(link: &Link, shape: Shape) -> Self {
        let mut backend = link.backend();
        // What the device sets for FEATURES.
        backend
            .set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let frame = shape.frame();
        let len = VNET_HDR_LEN + frame.len();
        let (mut frames, mut bufs) = (Vec::new(), Vec::new());
        for i in 0..shape.batch() as u64 {
            let tx = GuestAddress(TX_BUF + i * STRIDE);
            mem.write_slice(&shape.header(), tx).unwrap();
            mem.write_slice(&frame, tx.unchecked_add(VNET_HDR_LEN as u64))
                .unwrap();
            frames.push((mem.get_host_address(tx).unwrap(), len));
            let rx = GuestAddress(RX_BUF + i * STRIDE);
            bufs.push((mem.get_host_address(rx).unwrap(), MAX_BUFFER_LEN + 1));
        }
        Self {
            backend,
            shape,
            _mem: mem,
            frames,
            bufs,
        }
    }

    fn tx(&mut self) {
        for &(ptr, len) in &self.frames {
            // SAFETY: `ptr` points to `len` bytes of `_mem`, which this struct owns; writev
            // only reads them.
            let n = unsafe { libc::write(self.backend.raw_fd(), ptr.cast(), len) };
            assert!(n > 0, "raw write: {}", std::io::Error::last_os_error());
        }
    }

    fn rx(&mut self) {
        let mut got = 0;
        let mut idle = 0;
        while got < self.shape.batch() && idle < 100_000 {
            let (ptr, len) = self.bufs[got % self.shape.batch()];
            // SAFETY: `ptr` points to `len` bytes of `_mem`, which this struct owns.
            let n = unsafe { libc::read(self.backend.raw_fd(), ptr.cast(), len) };
            if n > 0 {
                got += 1;
                idle = 0;
            } else {
                idle += 1;
            }
        }
        assert_eq!(got, self.shape.batch(), "frames lost on the way in (raw)");
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Tx,
    Rx,
}

/// Seconds spent in `iters` batches; rx injects each batch first, untimed.
fn timed(link: &Link, shape: Shape, dir: Dir, iters: u64, mut batch: impl FnMut()) -> Duration {
    let frame = shape.frame();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if dir == Dir::Rx {
            link.inject(shape, &frame, shape.batch());
        }
        let start = Instant::now();
        batch();
        total += start.elapsed();
        if dir == Dir::Tx {
            link.drain();
        }
    }
    total
}

fn criterion_groups(c: &mut Criterion, link: &Link) {
    for shape in [Shape::Small, Shape::Tso] {
        for dir in [Dir::Tx, Dir::Rx] {
            let d = if dir == Dir::Tx { "tx" } else { "rx" };
            let mut group = c.benchmark_group(format!("virtio_net/{d}-{}", shape.name()));
            group.throughput(match shape {
                Shape::Small => Throughput::Elements(shape.batch() as u64),
                Shape::Tso => Throughput::Bytes((shape.batch() * shape.frame_len()) as u64),
            });
            let mut raw = RawBench::new(link, shape);
            group.bench_function("raw", |b| {
                b.iter_custom(|iters| {
                    timed(link, shape, dir, iters, || match dir {
                        Dir::Tx => raw.tx(),
                        Dir::Rx => raw.rx(),
                    })
                })
            });
            drop(raw);
            for transport in Transport::ALL {
                let mut dev = DeviceBench::new(link, shape, transport);
                group.bench_function(format!("device-{}", transport.name()), |b| {
                    b.iter_custom(|iters| {
                        timed(link, shape, dir, iters, || match dir {
                            Dir::Tx => dev.tx(),
                            Dir::Rx => dev.rx(),
                        })
                    })
                });
            }
            group.finish();
        }
    }
}

/// Frames per second over a short round.
fn rate(link: &Link, shape: Shape, dir: Dir, round: Duration, mut batch: impl FnMut()) -> f64 {
    let mut batches = 0u64;
    let mut busy = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < round {
        busy += timed(link, shape, dir, 1, &mut batch);
        batches += 1;
    }
    (batches * shape.batch() as u64) as f64 / busy.as_secs_f64()
}

/// Device/raw ratios from interleaved rounds (so host noise hits both alike).
fn print_ratios(link: &Link) {
    const ROUNDS: usize = 5;
    let round = Duration::from_millis(300);
    let mut lines = Vec::new();
    for shape in [Shape::Small, Shape::Tso] {
        for dir in [Dir::Tx, Dir::Rx] {
            let mut raw = RawBench::new(link, shape);
            let mut devices: Vec<(Transport, DeviceBench, f64)> = Transport::ALL
                .iter()
                .map(|&t| (t, DeviceBench::new(link, shape, t), 0.0))
                .collect();
            let mut best_raw = 0f64;
            for _ in 0..ROUNDS {
                best_raw = best_raw.max(rate(link, shape, dir, round, || match dir {
                    Dir::Tx => raw.tx(),
                    Dir::Rx => raw.rx(),
                }));
                for (_, dev, best) in &mut devices {
                    *best = best.max(rate(link, shape, dir, round, || match dir {
                        Dir::Tx => dev.tx(),
                        Dir::Rx => dev.rx(),
                    }));
                }
            }
            let d = if dir == Dir::Tx { "tx" } else { "rx" };
            let unit = |r: f64| match shape {
                Shape::Small => format!("{:.2} Mpps", r / 1e6),
                Shape::Tso => format!("{:.2} GB/s", r * shape.frame_len() as f64 / 1e9),
            };
            let rates: Vec<String> = devices
                .iter()
                .map(|(t, _, best)| format!("device {} {}", t.name(), unit(*best)))
                .collect();
            lines.push(format!(
                "{d} {}: raw {}, {}",
                shape.name(),
                unit(best_raw),
                rates.join(", ")
            ));
            for (transport, _, best) in &devices {
                lines.push(format!(
                    "ratio {d} {} {}: {:.2}x raw",
                    shape.name(),
                    transport.name(),
                    best / best_raw
                ));
            }
        }
    }
    println!();
    println!(
        "backend: {}",
        if link.is_tap() {
            "tap in a private netns"
        } else {
            "Unix socket pair (no tap)"
        }
    );
    for line in lines {
        println!("{line}");
    }
}

fn main() {
    let link = Link::new();
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .configure_from_args();
    criterion_groups(&mut c, &link);
    c.final_summary();
    print_ratios(&link);
}
