//! The DHCP server's packet handling: what a hostile guest may send the launcher's `dhcp`
//! thread, through `rvmm_launcher::dhcp::handler::Dhcpv4Handler::handle` for one of a few leases
//! (KubeVirt's masquerade one with every option, a bare /30, a bridge /32 with routes), or
//! through `rvmm_launcher::dhcp::handler6::Dhcpv6Handler::handle` (KubeVirt's masquerade IPv6
//! lease): client messages of every type with or without the client's and a server's DUID, an
//! IA_NA (whole or short), Rapid Commit, extra option bytes and truncation, from a link-local
//! or another source.
//!
//! Each input is a sequence of packets: mostly-valid BOOTREQUESTs (any message type, the
//! client's MAC or another, `ciaddr`, requested address, server identifier, flags, extra
//! option bytes), with rare corruption (wrong op, htype, hlen, a relay, no end option, a
//! flipped byte, padding up to a 64 KiB datagram), and raw bytes.
//!
//! Oracles: nothing panics; a packet is answered only when it is a BOOTREQUEST from the
//! lease's MAC (Ethernet, hlen 6, the magic cookie, not relayed); every answer decodes as an
//! OFFER, ACK or NAK to that MAC with the request's transaction id, offers or acknowledges
//! only the leased address (or none), and goes to the broadcast address or to the request's
//! `ciaddr` inside the leased network; the lease binds and releases only the leased address,
//! and `bound()` follows the changes. DHCPv6: answers only to link-local senders, each an
//! ADVERTISE or REPLY with the request's transaction id, this server's DUID and the client's,
//! any address in it the leased one; binding and releasing as for DHCPv4.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Result, Unstructured};
use dhcproto::v4::{Message, MessageType, Opcode};
use dhcproto::v6;
use dhcproto::{Decodable, Decoder};
use fuzz_common::rarely;
use rvmm_launcher::dhcp::config::{
    Dhcp6Config, DhcpConfig, Lease6Config, LeaseConfig, PrivateOption, RouteConfig,
};
use rvmm_launcher::dhcp::handler::{Destination, Dhcpv4Handler, LeaseChange};
use rvmm_launcher::dhcp::handler6::Dhcpv6Handler;
use libfuzzer_sys::fuzz_target;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const COOKIE: [u8; 4] = [99, 130, 83, 99];

static LEASES: LazyLock<Vec<LeaseConfig>> = LazyLock::new(|| {
    let kubevirt = DhcpConfig {
        address: Some("10.0.2.2/24".into()),
        gateway: Some(Ipv4Addr::new(10, 0, 2, 1)),
        dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
        search: vec![
            "mysub.default.svc.cluster.local".into(),
            "default.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
        domain_name: Some("mysub.default.svc.cluster.local".into()),
        hostname: Some("testvm".into()),
        mtu: Some(1450),
        ntp_servers: vec![Ipv4Addr::new(10, 0, 0, 123)],
        tftp_server_name: Some("tftp.example.com".into()),
        boot_file_name: Some("pxelinux.0".into()),
        private_options: vec![PrivateOption {
            option: 240,
            value: "x".repeat(255),
        }],
        ..DhcpConfig::default()
    };
    let small = DhcpConfig {
        address: Some("192.168.7.9/30".into()),
        ..DhcpConfig::default()
    };
    let bridge = DhcpConfig {
        address: Some("10.244.1.5/32".into()),
        gateway: Some(Ipv4Addr::new(169, 254, 1, 1)),
        routes: vec![
            RouteConfig {
                destination: "169.254.1.1/32".into(),
                gateway: Ipv4Addr::UNSPECIFIED,
            },
            RouteConfig {
                destination: "0.0.0.0/0".into(),
                gateway: Ipv4Addr::new(169, 254, 1, 1),
            },
        ],
        ..DhcpConfig::default()
    };
    [
        (kubevirt, Ipv4Addr::new(10, 0, 2, 1)),
        (small, Ipv4Addr::new(192, 168, 7, 10)),
        (bridge, Ipv4Addr::new(169, 254, 75, 10)),
    ]
    .into_iter()
    .map(|(config, server)| config.lease(MAC, server, None).expect("a valid lease"))
    .collect()
});

/// An address the packet names: none, the lease's, its server's, a neighbour, or any.
fn address(u: &mut Unstructured<'_>, lease: &LeaseConfig) -> Result<[u8; 4]> {
    let leased = lease.address.addr();
    Ok(match byte(u)? % 6 {
        0 => [0; 4],
        1 | 2 => leased.octets(),
        3 => lease.server.octets(),
        4 => {
            let mut o = leased.octets();
            o[3] = o[3].wrapping_add(1);
            o
        }
        _ => [byte(u)?, byte(u)?, byte(u)?, byte(u)?],
    })
}

/// One byte (0 once the input is used up), as every field here reads them: seeds stay easy
/// to write.
fn byte(u: &mut Unstructured<'_>) -> Result<u8> {
    u8::arbitrary(u)
}

/// Two bytes, big-endian.
fn word(u: &mut Unstructured<'_>) -> Result<u16> {
    Ok(u16::from_be_bytes([byte(u)?, byte(u)?]))
}

/// A mostly-valid client message.
fn shaped(u: &mut Unstructured<'_>, lease: &LeaseConfig) -> Result<Vec<u8>> {
    let kind = match byte(u)? % 12 {
        k @ 1..=8 => k,
        0 => 3,
        _ => byte(u)?,
    };
    let mut mac = MAC;
    match byte(u)? % 8 {
        6 => mac[5] ^= 1 << (byte(u)? % 8),
        7 => {
            for b in &mut mac {
                *b = byte(u)?;
            }
        }
        _ => {}
    }
    let mut p = vec![0u8; 240];
    p[0] = if rarely(u, 16)? { byte(u)? } else { 1 };
    p[1] = if rarely(u, 16)? { byte(u)? } else { 1 };
    p[2] = if rarely(u, 16)? { byte(u)? } else { 6 };
    p[4..8].copy_from_slice(&[byte(u)?, byte(u)?, 0x12, 0x34]);
    p[10..12].copy_from_slice(&word(u)?.to_be_bytes());
    p[12..16].copy_from_slice(&address(u, lease)?);
    if rarely(u, 16)? {
        p[24..28].copy_from_slice(&address(u, lease)?);
    }
    p[28..34].copy_from_slice(&mac);
    p[236..240].copy_from_slice(&COOKIE);
    p.extend([53, 1, kind]);
    if byte(u)? % 2 == 1 {
        p.extend([50, 4]);
        p.extend(address(u, lease)?);
    }
    if byte(u)? % 2 == 1 {
        p.extend([54, 4]);
        p.extend(address(u, lease)?);
    }
    if rarely(u, 8)? {
        let len = usize::from(byte(u)?) * 2;
        p.extend(u.bytes(len.min(u.len()))?);
    }
    if !rarely(u, 16)? {
        p.push(255);
    }
    if rarely(u, 16)? {
        let at = usize::from(word(u)?) % p.len();
        p[at] ^= byte(u)?.max(1);
    }
    if rarely(u, 32)? {
        let len = usize::from(word(u)?).min(65507);
        p.resize(p.len().max(len), 0);
    }
    Ok(p)
}

/// What a packet must be for the server to answer it.
fn answerable(p: &[u8], lease: &LeaseConfig) -> bool {
    p.len() >= 240
        && p[0] == 1
        && p[1] == 1
        && p[2] == 6
        && p[28..34] == lease.mac
        && p[24..28] == [0; 4]
        && p[236..240] == COOKIE
}

fn check(packet: &[u8], handler: &mut Dhcpv4Handler) {
    let lease = handler.lease().clone();
    let leased = lease.address.addr();
    let before = handler.bound();
    let handled = handler.handle(packet);
    if let Some(reply) = &handled.reply {
        assert!(
            answerable(packet, &lease),
            "answered a packet not from the client"
        );
        let m = Message::decode(&mut Decoder::new(&reply.bytes)).expect("a reply decodes");
        assert_eq!(m.opcode(), Opcode::BootReply);
        assert_eq!((m.hlen(), m.chaddr()), (6, lease.mac.as_slice()));
        assert_eq!(m.xid().to_be_bytes(), packet[4..8]);
        let kind = m.opts().msg_type().expect("a message type");
        assert_eq!(kind, reply.kind);
        assert!(matches!(
            kind,
            MessageType::Offer | MessageType::Ack | MessageType::Nak
        ));
        assert!(m.yiaddr().is_unspecified() || m.yiaddr() == leased);
        if kind == MessageType::Nak {
            assert!(m.yiaddr().is_unspecified());
            assert_eq!(reply.to, Destination::Broadcast);
        }
        if let Destination::Unicast(ip) = reply.to {
            assert_eq!(ip.octets(), packet[12..16], "unicast only to ciaddr");
            assert!(lease.address.contains(&ip), "unicast only inside the lease");
        }
    }
    match handled.change {
        Some(LeaseChange::Bound(ip)) => {
            assert_eq!(ip, IpAddr::V4(leased));
            assert_eq!(before, None);
            assert_eq!(handler.bound(), Some(leased));
            assert!(
                handled
                    .reply
                    .as_ref()
                    .is_some_and(|r| r.kind == MessageType::Ack)
            );
        }
        Some(LeaseChange::Released(ip)) => {
            assert_eq!(Some(ip), before.map(IpAddr::V4));
            assert_eq!(handler.bound(), None);
            assert!(handled.reply.is_none());
        }
        None => assert!(
            handler.bound() == before,
            "the lease changed without saying so"
        ),
    }
}

static LEASE6: LazyLock<Lease6Config> = LazyLock::new(|| {
    DhcpConfig {
        ipv6: Some(Dhcp6Config {
            address: "fd10:0:2::2/120".into(),
            dns: vec![Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10)],
        }),
        ..DhcpConfig::default()
    }
    .lease6([2, 0, 0, 0, 0, 1])
    .expect("a valid lease")
    .expect("an IPv6 lease")
});

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);

/// One DHCPv6 option: code, data.
fn option6(code: u16, data: &[u8]) -> Vec<u8> {
    let mut o = code.to_be_bytes().to_vec();
    o.extend((data.len() as u16).to_be_bytes());
    o.extend(data);
    o
}

/// A mostly-valid DHCPv6 client message.
fn shaped6(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let kind = match byte(u)? % 16 {
        k @ 1..=11 => k,
        0 => 3,
        _ => byte(u)?,
    };
    let mut p = vec![kind, byte(u)?, byte(u)?, byte(u)?];
    if !rarely(u, 16)? {
        p.extend(option6(1, &[0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    }
    match byte(u)? % 4 {
        1 => p.extend(option6(2, &LEASE6.server_duid)),
        2 => p.extend(option6(2, &[0, 3, 0, 1, 9, 9, 9, 9, 9, byte(u)?])),
        _ => {}
    }
    match byte(u)? % 4 {
        0 | 1 => p.extend(option6(3, &[0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0])),
        2 => p.extend(option6(3, &[0, 0, 0, 7])),
        _ => {}
    }
    if byte(u)? % 2 == 1 {
        p.extend(option6(14, &[]));
    }
    if rarely(u, 8)? {
        let len = usize::from(byte(u)?) * 2;
        p.extend(u.bytes(len.min(u.len()))?);
    }
    if rarely(u, 16)? {
        let cut = usize::from(word(u)?) % p.len();
        p.truncate(cut);
    }
    Ok(p)
}

fn check6(packet: &[u8], source: Ipv6Addr, handler: &mut Dhcpv6Handler) {
    let lease = handler.lease().clone();
    let leased = lease.address.addr();
    let before = handler.bound();
    let handled = handler.handle(packet, source);
    if let Some(reply) = &handled.reply {
        assert!(source.is_unicast_link_local(), "answered {source}");
        let m = v6::Message::decode(&mut Decoder::new(reply)).expect("a reply decodes");
        assert!(matches!(
            m.msg_type(),
            v6::MessageType::Advertise | v6::MessageType::Reply
        ));
        assert_eq!(m.xid(), packet[1..4]);
        assert_eq!(
            m.opts().get(v6::OptionCode::ServerId),
            Some(&v6::DhcpOption::ServerId(lease.server_duid.clone()))
        );
        if let Some(v6::DhcpOption::IANA(ia)) = m.opts().get(v6::OptionCode::IANA) {
            for o in ia.opts.iter() {
                if let v6::DhcpOption::IAAddr(a) = o {
                    assert_eq!(a.addr, leased);
                }
            }
        }
    }
    match handled.change {
        Some(LeaseChange::Bound(ip)) => {
            assert_eq!((ip, before), (IpAddr::V6(leased), None));
            assert_eq!(handler.bound(), Some(leased));
            assert!(handled.reply.is_some());
        }
        Some(LeaseChange::Released(ip)) => {
            assert_eq!(Some(ip), before.map(IpAddr::V6));
            assert_eq!(handler.bound(), None);
        }
        None => assert!(
            handler.bound() == before,
            "the lease changed without saying so"
        ),
    }
}

/// DHCPv6 packets for the IPv6 lease.
fn run6(u: &mut Unstructured<'_>) {
    let mut handler = Dhcpv6Handler::new(LEASE6.clone());
    for _ in 0..32 {
        if u.is_empty() {
            break;
        }
        let Ok(mode) = byte(u) else { break };
        let source = if mode & 0x80 != 0 {
            Ipv6Addr::new(0xfd10, 0, 2, 0, 0, 0, 0, 2)
        } else {
            CLIENT6
        };
        let packet = if mode % 8 == 0 {
            let Ok(len) = word(u) else { break };
            let Ok(bytes) = u.bytes(usize::from(len).min(u.len())) else {
                break;
            };
            bytes.to_vec()
        } else {
            match shaped6(u) {
                Ok(p) => p,
                Err(_) => break,
            }
        };
        check6(&packet, source, &mut handler);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(choice) = byte(&mut u) else { return };
    if usize::from(choice) % (LEASES.len() + 1) == LEASES.len() {
        run6(&mut u);
        return;
    }
    let lease = &LEASES[usize::from(choice) % (LEASES.len() + 1)];
    let mut handler = Dhcpv4Handler::new(lease.clone());
    for _ in 0..32 {
        if u.is_empty() {
            break;
        }
        let packet = match byte(&mut u).map(|b| b % 8) {
            Ok(0) => {
                let Ok(len) = word(&mut u) else { break };
                let Ok(bytes) = u.bytes(usize::from(len).min(u.len())) else {
                    break;
                };
                bytes.to_vec()
            }
            Ok(_) => match shaped(&mut u, lease) {
                Ok(p) => p,
                Err(_) => break,
            },
            Err(_) => break,
        };
        check(&packet, &mut handler);
    }
});
