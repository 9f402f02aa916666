use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

use super::*;
use crate::dhcp::config::{DhcpConfig, PrivateOption, RouteConfig};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OTHER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);

/// KubeVirt's masquerade lease with every option set.
fn config() -> DhcpConfig {
    DhcpConfig {
        address: Some("10.0.2.2/24".into()),
        gateway: Some(SERVER),
        dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
        search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
        domain_name: Some("default.svc.cluster.local".into()),
        hostname: Some("testvm".into()),
        mtu: Some(1450),
        routes: vec![RouteConfig {
            destination: "0.0.0.0/0".into(),
            gateway: SERVER,
        }],
        ntp_servers: vec![Ipv4Addr::new(10, 0, 0, 123)],
        tftp_server_name: Some("tftp.example.com".into()),
        boot_file_name: Some("pxelinux.0".into()),
        private_options: vec![PrivateOption {
            option: 240,
            value: "extra".into(),
        }],
        ..DhcpConfig::default()
    }
}

fn handler() -> Dhcpv4Handler {
    Dhcpv4Handler::new(config().lease(MAC, SERVER, None).unwrap())
}

/// A client message of `kind` from `mac`.
fn request(kind: MessageType, mac: &[u8]) -> Message {
    let mut m = Message::new_with_id(
        0x1234_5678,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        mac,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

fn bytes(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap()
}

fn decode(reply: &Reply) -> Message {
    Message::decode(&mut Decoder::new(&reply.bytes)).unwrap()
}

/// Sends `m`, expects a reply of `kind`, returns it decoded with its destination.
fn answer(h: &mut Dhcpv4Handler, m: &Message, kind: MessageType) -> (Message, Destination) {
    let handled = h.handle(&bytes(m));
    let reply = handled.reply.unwrap_or_else(|| panic!("no reply to {m}"));
    assert_eq!(reply.kind, kind);
    let decoded = decode(&reply);
    assert_eq!(decoded.opts().msg_type(), Some(kind));
    (decoded, reply.to)
}

#[test]
fn discover_gets_an_offer_with_every_option_broadcast() {
    let mut h = handler();
    let (offer, to) = answer(
        &mut h,
        &request(MessageType::Discover, &MAC),
        MessageType::Offer,
    );
    assert_eq!(to, Destination::Broadcast);
    assert_eq!(offer.opcode(), Opcode::BootReply);
    assert_eq!(offer.xid(), 0x1234_5678);
    assert_eq!(offer.chaddr(), MAC);
    assert_eq!(offer.yiaddr(), GUEST);
    let o = offer.opts();
    assert_eq!(
        o.get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(
        o.get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(999 * 24 * 3600))
    );
    assert_eq!(
        o.get(OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        o.get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![SERVER]))
    );
    assert_eq!(
        o.get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 96, 0, 10
        )]))
    );
    assert_eq!(
        o.get(OptionCode::InterfaceMtu),
        Some(&DhcpOption::InterfaceMtu(1450))
    );
    assert_eq!(
        o.get(OptionCode::Hostname),
        Some(&DhcpOption::Hostname("testvm".into()))
    );
    assert_eq!(
        o.get(OptionCode::DomainName),
        Some(&DhcpOption::DomainName("default.svc.cluster.local".into()))
    );
    let Some(DhcpOption::DomainSearch(names)) = o.get(OptionCode::DomainSearch) else {
        panic!("no search domains in {offer}");
    };
    let names: Vec<String> = names.iter().map(|n| n.to_ascii()).collect();
    assert_eq!(names, ["default.svc.cluster.local.", "cluster.local."]);
    let Some(DhcpOption::ClasslessStaticRoute(routes)) = o.get(OptionCode::ClasslessStaticRoute)
    else {
        panic!("no routes in {offer}");
    };
    assert_eq!(routes, &[("0.0.0.0/0".parse().unwrap(), SERVER)]);
    assert_eq!(
        o.get(OptionCode::NtpServers),
        Some(&DhcpOption::NtpServers(vec![Ipv4Addr::new(10, 0, 0, 123)]))
    );
    assert_eq!(
        o.get(OptionCode::TFTPServerName),
        Some(&DhcpOption::TFTPServerName(b"tftp.example.com".to_vec()))
    );
    assert_eq!(
        o.get(OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(b"pxelinux.0".to_vec()))
    );
    let Some(DhcpOption::Unknown(private)) = o.get(OptionCode::from(240)) else {
        panic!("no option 240 in {offer}");
    };
    assert_eq!(private.data(), b"extra");
    assert_eq!(h.bound(), None, "an offer binds nothing");
}

#[test]
fn search_domains_are_encoded_as_dns_names_on_the_wire() {
    let mut h = handler();
    let reply = h
        .handle(&bytes(&request(MessageType::Discover, &MAC)))
        .reply
        .unwrap();
    // RFC 3397: length-prefixed labels, the root label, then a compression pointer for the
    // shared "cluster.local" suffix (offset 12 in the option data).
    let mut expected = vec![119u8, 0];
    expected.extend(b"\x07default\x03svc\x07cluster\x05local\x00\xc0\x0c");
    expected[1] = (expected.len() - 2) as u8;
    assert!(
        reply.bytes.windows(expected.len()).any(|w| w == expected),
        "option 119 not found as {expected:x?}"
    );
}

#[test]
fn request_after_offer_is_acked_and_binds_the_lease() {
    let mut h = handler();
    let mut m = request(MessageType::Request, &MAC);
    m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(GUEST));
    let handled = h.handle(&bytes(&m));
    assert_eq!(handled.change, Some(LeaseChange::Bound(GUEST.into())));
    let reply = handled.reply.unwrap();
    assert_eq!(
        (reply.kind, reply.to),
        (MessageType::Ack, Destination::Broadcast)
    );
    let ack = decode(&reply);
    assert_eq!(ack.yiaddr(), GUEST);
    assert_eq!(
        ack.opts().get(OptionCode::InterfaceMtu),
        Some(&DhcpOption::InterfaceMtu(1450))
    );
    assert_eq!(h.bound(), Some(GUEST));
    // The same request again (a retransmission): acknowledged, no new binding.
    let again = h.handle(&bytes(&m));
    assert_eq!(again.change, None);
    assert_eq!(again.reply.unwrap().kind, MessageType::Ack);
}

#[test]
fn renewal_is_acked_by_unicast_to_the_client() {
    let mut h = handler();
    let mut m = request(MessageType::Request, &MAC);
    m.set_ciaddr(GUEST);
    let (ack, to) = answer(&mut h, &m, MessageType::Ack);
    assert_eq!(to, Destination::Unicast(GUEST));
    assert_eq!((ack.ciaddr(), ack.yiaddr()), (GUEST, GUEST));
}

#[test]
fn wrong_requested_address_gets_a_broadcast_nak() {
    for (requested, ciaddr) in [
        (Some(Ipv4Addr::new(10, 0, 2, 77)), Ipv4Addr::UNSPECIFIED),
        (None, Ipv4Addr::new(10, 0, 2, 9)),
        (Some(Ipv4Addr::new(192, 168, 1, 5)), Ipv4Addr::UNSPECIFIED),
    ] {
        let mut h = handler();
        let mut m = request(MessageType::Request, &MAC);
        m.set_ciaddr(ciaddr);
        if let Some(ip) = requested {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        }
        let handled = h.handle(&bytes(&m));
        assert_eq!(handled.change, None);
        let reply = handled.reply.unwrap();
        assert_eq!(
            (reply.kind, reply.to),
            (MessageType::Nak, Destination::Broadcast)
        );
        let nak = decode(&reply);
        assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(nak.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert_eq!(h.bound(), None);
    }
}

#[test]
fn request_for_another_server_is_not_answered() {
    let mut h = handler();
    let mut m = request(MessageType::Request, &MAC);
    m.opts_mut()
        .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 2, 254)));
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(GUEST));
    assert_eq!(h.handle(&bytes(&m)), Handled::default());
}

#[test]
fn inform_gets_options_without_address_or_lease_time() {
    let mut h = handler();
    let mut m = request(MessageType::Inform, &MAC);
    m.set_ciaddr(Ipv4Addr::new(10, 0, 2, 50));
    let (ack, to) = answer(&mut h, &m, MessageType::Ack);
    assert_eq!(to, Destination::Unicast(Ipv4Addr::new(10, 0, 2, 50)));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(ack.ciaddr(), Ipv4Addr::new(10, 0, 2, 50));
    assert!(ack.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(ack.opts().get(OptionCode::DomainNameServer).is_some());
    assert_eq!(h.bound(), None);
    // An address outside the leased network is not a unicast destination.
    m.set_ciaddr(Ipv4Addr::new(8, 8, 8, 8));
    let (_, to) = answer(&mut h, &m, MessageType::Ack);
    assert_eq!(to, Destination::Broadcast);
}

#[test]
fn release_and_decline_end_the_lease_without_an_answer() {
    for kind in [MessageType::Release, MessageType::Decline] {
        let mut h = handler();
        let mut bind = request(MessageType::Request, &MAC);
        bind.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(GUEST));
        assert_eq!(
            h.handle(&bytes(&bind)).change,
            Some(LeaseChange::Bound(GUEST.into()))
        );
        let mut m = request(kind, &MAC);
        m.set_ciaddr(GUEST);
        let handled = h.handle(&bytes(&m));
        assert_eq!(handled.reply, None, "{kind:?}");
        assert_eq!(
            handled.change,
            Some(LeaseChange::Released(GUEST.into())),
            "{kind:?}"
        );
        assert_eq!(h.bound(), None);
        // Released twice: nothing more changes.
        assert_eq!(h.handle(&bytes(&m)), Handled::default());
        // Bound again after the release.
        assert_eq!(
            h.handle(&bytes(&bind)).change,
            Some(LeaseChange::Bound(GUEST.into()))
        );
    }
}

#[test]
fn other_macs_relays_and_non_requests_get_no_answer() {
    let mut h = handler();
    for kind in [
        MessageType::Discover,
        MessageType::Request,
        MessageType::Inform,
    ] {
        assert_eq!(
            h.handle(&bytes(&request(kind, &OTHER_MAC))),
            Handled::default()
        );
    }
    let mut relayed = request(MessageType::Discover, &MAC);
    relayed.set_giaddr(Ipv4Addr::new(10, 0, 2, 200));
    assert_eq!(h.handle(&bytes(&relayed)), Handled::default());
    let mut reply = request(MessageType::Offer, &MAC);
    assert_eq!(
        h.handle(&bytes(&reply)),
        Handled::default(),
        "an OFFER is not a request"
    );
    reply.set_opcode(Opcode::BootReply);
    reply
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    assert_eq!(h.handle(&bytes(&reply)), Handled::default(), "a BOOTREPLY");
    let mut not_ethernet = request(MessageType::Discover, &MAC);
    not_ethernet.set_htype(HType::from(6u8));
    assert_eq!(h.handle(&bytes(&not_ethernet)), Handled::default());
    // Our MAC as the first six of eight chaddr bytes is another client.
    let long = request(MessageType::Discover, &[MAC.as_slice(), &[0, 0]].concat());
    assert_eq!(h.handle(&bytes(&long)), Handled::default());
}

#[test]
fn malformed_packets_are_ignored() {
    let mut h = handler();
    let good = bytes(&request(MessageType::Discover, &MAC));
    assert!(h.handle(&good).reply.is_some());
    // Too short, no cookie, no message type, truncated options, hlen past chaddr.
    assert_eq!(h.handle(&good[..239]), Handled::default());
    let mut no_cookie = good.clone();
    no_cookie[236] = 0;
    assert_eq!(h.handle(&no_cookie), Handled::default());
    let no_type = bytes(&Message::new_with_id(
        1,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &MAC,
    ));
    assert_eq!(h.handle(&no_type), Handled::default());
    let mut truncated = good[..240].to_vec();
    truncated.extend([53, 1]);
    assert_eq!(h.handle(&truncated), Handled::default());
    let mut hlen = good.clone();
    hlen[2] = 200;
    assert_eq!(h.handle(&hlen), Handled::default());
    assert_eq!(h.handle(&[0u8; 0]), Handled::default());
    // Options the server does not read are not decoded: a bulk-leasequery time of the wrong
    // length (a debug assertion in dhcproto's decoder, found by fuzzing) costs nothing.
    let mut odd_option = good[..good.len() - 1].to_vec();
    odd_option.extend([152, 1, 7, 50, 3, 1, 2, 3, 255]);
    assert!(h.handle(&odd_option).reply.is_some());
    // A malformed message type is malformed; a short requested address is no address.
    let mut bad_type = good[..240].to_vec();
    bad_type.extend([53, 2, 1, 1, 255]);
    assert_eq!(h.handle(&bad_type), Handled::default());
    let mut giant = good.clone();
    giant.resize(65535, 0);
    assert!(
        h.handle(&giant).reply.is_some(),
        "padding after the end option is fine"
    );
}

#[test]
fn broadcast_flag_is_echoed() {
    let mut h = handler();
    let mut m = request(MessageType::Discover, &MAC);
    m.set_flags(Flags::default().set_broadcast());
    let (offer, to) = answer(&mut h, &m, MessageType::Offer);
    assert!(offer.flags().broadcast());
    assert_eq!(to, Destination::Broadcast);
}

#[test]
fn a_minimal_lease_sends_only_the_mask_besides_type_server_and_lease_time() {
    let lease = DhcpConfig {
        address: Some("192.168.7.9/30".into()),
        ..DhcpConfig::default()
    }
    .lease(MAC, Ipv4Addr::new(192, 168, 7, 10), None)
    .unwrap();
    let mut h = Dhcpv4Handler::new(lease);
    let (offer, _) = answer(
        &mut h,
        &request(MessageType::Discover, &MAC),
        MessageType::Offer,
    );
    let codes: Vec<u8> = offer.opts().iter().map(|(c, _)| u8::from(*c)).collect();
    assert_eq!(codes, [1, 51, 53, 54]);
}
