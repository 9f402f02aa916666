//! Tests with a real tap, each in a private network namespace. They need root and
//! `/dev/net/tun` (and `ip`): without them they are skipped with a note, except under CI=true
//! where that is a failure.
//!
//! The namespace is made with `unshare(CLONE_NEWNET)` on a thread of its own: the thread, the
//! `ip` commands it runs and the sockets it opens live there, the rest of the test process does
//! not, and the kernel frees the namespace with its taps once the thread ends and their
//! descriptors close, even if the test fails or the process is killed. Nothing is left behind.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV4;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::tests::*;
use super::*;

/// An Ethernet type for local experiments (IEEE 802): nothing in the kernel answers it.
const ETHERTYPE_TEST: u16 = 0x88B5;

#[test]
fn opening_a_tap_that_does_not_exist_names_it() {
    let err = Net::new(NetConfig {
        tap: "rvmm-nosuch0".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        matches!(&err, NetError::Tap(TapError::NotFound(name)) if name == "rvmm-nosuch0"),
        "{err:?}"
    );
    assert!(err.to_string().contains("rvmm-nosuch0"), "{err}");
}

#[test]
fn tap_names_that_cannot_be_interfaces_are_refused() {
    for name in ["", "a-name-longer-than-15", "with/slash"] {
        let err = Tap::open(name).unwrap_err();
        assert!(matches!(err, TapError::InvalidName(_)), "{name:?}: {err}");
    }
}

/// Why the real-tap tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("no `ip` command".into()),
    }
}

/// Runs `body` on a thread in a new network namespace, or skips (see the module doc).
fn in_private_netns(test: &str, body: impl FnOnce() + Send + 'static) {
    if let Some(reason) = skip_reason() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test} cannot run under CI: {reason}"
        );
        println!("skipping {test}: {reason}");
        return;
    }
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
        body();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip args` (in the calling thread's namespace).
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw `AF_PACKET` socket on one interface: sees every frame through it, sends out of it.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn bind(ifname: &str) -> Self {
        let cname = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a descriptor just opened and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr_ll(ifindex, proto);
        // SAFETY: `addr` is a valid sockaddr_ll of the given size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(ret, 0);
        Self { fd, ifindex }
    }

    fn send(&self, frame: &[u8]) {
        let addr = sockaddr_ll(self.ifindex, 0);
        // SAFETY: `frame` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Frames seen until one satisfies `want` (or 5 s pass).
    fn wait_for(&self, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let start = Instant::now();
        let mut buf = vec![0u8; 70_000];
        while start.elapsed() < Duration::from_secs(5) {
            // SAFETY: `buf` is valid writable memory of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && want(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

fn sockaddr_ll(ifindex: i32, proto_be: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data for which all-zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto_be;
    addr.sll_ifindex = ifindex;
    addr
}

/// An Ethernet frame: `dst`, `src`, type, payload.
fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

#[test]
fn existing_tap_is_opened_by_name_and_carries_frames_both_ways() {
    in_private_netns("existing_tap_is_opened_by_name", || {
        // Like KubeVirt: the tap exists before the VMM starts.
        ip(&["tuntap", "add", "dev", "rvmmt0", "mode", "tap"]);
        ip(&["link", "set", "rvmmt0", "up"]);
        let net = Net::new(NetConfig {
            tap: "rvmmt0".into(),
            ..test_config()
        })
        .unwrap();
        let guest_mac = net.mac();
        let packets = PacketSocket::bind("rvmmt0");

        let mem = memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 64);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
        let mut net = net;
        net.ack_features(linux_features());
        let interrupt = Arc::new(CountingInterrupt::default());
        let mut handler = net
            .handler(mem.clone(), active(&rxq), active(&txq), interrupt)
            .unwrap();

        // Guest → host.
        let out = ether([0xff; 6], guest_mac, ETHERTYPE_TEST, b"rvmm tx test");
        put_frame(&mem, TX_BUF, &Hdr::default(), &out);
        txq.add_desc_chains(&chain(0, &[(TX_BUF, (12 + out.len()) as u32, R)]), 0)
            .unwrap();
        assert_eq!(handler.process_tx().unwrap(), 1);
        let seen = packets.wait_for(|f| f.len() >= 14 && ethertype(f) == ETHERTYPE_TEST);
        assert_eq!(
            seen.as_deref(),
            Some(&out[..]),
            "frame on the tap interface"
        );

        // Host → guest. The kernel may send its own frames (IPv6 router solicitations) first.
        let payload = b"rvmm rx test";
        let sent = ether(
            guest_mac,
            [0x02, 0, 0, 0, 0, 1],
            ETHERTYPE_TEST + 1,
            payload,
        );
        packets.send(&sent);
        let start = Instant::now();
        let mut next = 0u16;
        let found = loop {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no frame reached the guest"
            );
            let addr = RX_BUF + u64::from(next) * 0x1000;
            rxq.add_desc_chains(&chain(next, &[(addr, 4096, W)]), next)
                .unwrap();
            next += 1;
            handler.process_rx().unwrap();
            let got: Option<Vec<u8>> = (0..usize::from(used_count(&rxq))).find_map(|i| {
                let (id, len) = used(&rxq, i);
                let data = read_guest(&mem, RX_BUF + u64::from(id) * 0x1000, len as usize);
                (data.len() >= 26 && ethertype(&data[12..]) == ETHERTYPE_TEST + 1).then_some(data)
            });
            if let Some(got) = got {
                break got;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(Hdr::parse(&found).num_buffers, 1);
        assert_eq!(&found[12..], &sent[..]);
        let counters = net.counters();
        assert_eq!(NetCounters::get(&counters.tx_packets), 1);
        assert!(NetCounters::get(&counters.rx_packets) >= 1);
    });
}

#[test]
fn tap_takes_offloads_and_tso_frames_and_refuses_a_second_opener() {
    in_private_netns("tap_takes_offloads_and_tso_frames", || {
        let mut tap = Tap::create("rvmmt1").unwrap();
        assert_eq!(tap.name(), "rvmmt1");
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        ip(&["link", "set", "rvmmt1", "up"]);
        // A single-queue tap has one user at a time.
        let err = Tap::open("rvmmt1").unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err:?}");
        assert!(err.to_string().contains("rvmmt1"), "{err}");

        // A 64 KiB TCP segment for the kernel to cut: it checks the header's GSO fields.
        let mem = memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
        let mut net = Net::with_backend(test_config(), Box::new(tap)).unwrap();
        net.ack_features(linux_features());
        let interrupt = Arc::new(CountingInterrupt::default());
        let mut handler = net
            .handler(mem.clone(), active(&rxq), active(&txq), interrupt)
            .unwrap();
        let segment = tcp4_frame(net.mac(), 60_000);
        let hdr = Hdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            ..Hdr::tso4()
        };
        put_frame(&mem, TX_BUF, &hdr, &segment);
        let len = (12 + segment.len()) as u32;
        txq.add_desc_chains(&chain(0, &[(TX_BUF, len, R)]), 0)
            .unwrap();
        assert_eq!(handler.process_tx().unwrap(), 1);
        let counters = net.counters();
        assert_eq!(NetCounters::get(&counters.tx_packets), 1);
        assert_eq!(
            NetCounters::get(&counters.tx_dropped),
            0,
            "the tap took the TSO frame"
        );
    });
}

/// Ethernet + IPv4 + TCP headers (checksum left to the offload) and `payload` bytes.
pub(super) fn tcp4_frame(src: [u8; 6], payload: usize) -> Vec<u8> {
    let ip_len = (20 + 20 + payload) as u16;
    let mut f = Vec::with_capacity(54 + payload);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: version/IHL, TOS, length, id, DF, TTL 64, TCP, checksum, 192.0.2.1 → 192.0.2.2
    // (TEST-NET-1: documentation addresses, never routed).
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2]);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = !((sum & 0xFFFF) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    // TCP: ports 40000 → 9, seq 1, ack 0, data offset 5, ACK|PSH, window, checksum 0, urg 0.
    f.extend_from_slice(&[
        0x9c, 0x40, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
    ]);
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend((0..payload).map(|i| i as u8));
    f
}
