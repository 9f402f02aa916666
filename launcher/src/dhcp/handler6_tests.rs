use std::net::Ipv6Addr;

use dhcproto::v6::{DhcpOption, IANA, Message, MessageType, OptionCode, Status};
use dhcproto::{Decodable, Decoder, Encodable};

use super::*;
use crate::dhcp::config::{Dhcp6Config, DhcpConfig};

const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
const GUEST: Ipv6Addr = Ipv6Addr::new(0xfd10, 0, 2, 0, 0, 0, 0, 2);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);
const CLIENT_DUID: [u8; 10] = [0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn handler() -> Dhcpv6Handler {
    let config = DhcpConfig {
        ipv6: Some(Dhcp6Config {
            address: "fd10:0:2::2/120".into(),
            dns: vec!["fd00::10".parse().unwrap()],
        }),
        ..DhcpConfig::default()
    };
    Dhcpv6Handler::new(config.lease6(SERVER_MAC).unwrap().unwrap())
}

fn server_duid() -> Vec<u8> {
    vec![0, 3, 0, 1, 0x02, 0, 0, 0, 0, 0x10]
}

/// A client message of `kind` with the client's DUID and an IA_NA 7.
fn request(kind: MessageType, server: Option<Vec<u8>>) -> Message {
    let mut m = Message::new_with_id(kind, [1, 2, 3]);
    m.opts_mut()
        .insert(DhcpOption::ClientId(CLIENT_DUID.to_vec()));
    m.opts_mut().insert(DhcpOption::IANA(IANA {
        id: 7,
        t1: 0,
        t2: 0,
        opts: dhcproto::v6::DhcpOptions::new(),
    }));
    if let Some(id) = server {
        m.opts_mut().insert(DhcpOption::ServerId(id));
    }
    m
}

fn send(h: &mut Dhcpv6Handler, m: &Message) -> Handled6 {
    h.handle(&m.to_vec().unwrap(), CLIENT)
}

fn decode(bytes: &[u8]) -> Message {
    Message::decode(&mut Decoder::new(bytes)).unwrap()
}

/// The reply's IA_NA: its IAID and address.
fn ia_address(m: &Message) -> Option<(u32, Ipv6Addr, u32)> {
    let Some(DhcpOption::IANA(ia)) = m.opts().get(OptionCode::IANA) else {
        return None;
    };
    let Some(DhcpOption::IAAddr(addr)) = ia.opts.get(OptionCode::IAAddr) else {
        return None;
    };
    Some((ia.id, addr.addr, addr.valid_life))
}

#[test]
fn solicit_is_advertised_the_address_request_binds_it() {
    let mut h = handler();
    let handled = send(&mut h, &request(MessageType::Solicit, None));
    assert_eq!(handled.change, None);
    let advertise = decode(&handled.reply.unwrap());
    assert_eq!(advertise.msg_type(), MessageType::Advertise);
    assert_eq!(advertise.xid(), [1, 2, 3]);
    assert_eq!(ia_address(&advertise), Some((7, GUEST, 86_313_600)));
    assert_eq!(
        advertise.opts().get(OptionCode::ServerId),
        Some(&DhcpOption::ServerId(server_duid()))
    );
    assert_eq!(
        advertise.opts().get(OptionCode::ClientId),
        Some(&DhcpOption::ClientId(CLIENT_DUID.to_vec()))
    );
    assert_eq!(
        advertise.opts().get(OptionCode::DomainNameServers),
        Some(&DhcpOption::DomainNameServers(vec![
            "fd00::10".parse().unwrap()
        ]))
    );
    let handled = send(&mut h, &request(MessageType::Request, Some(server_duid())));
    assert_eq!(handled.change, Some(LeaseChange::Bound(GUEST.into())));
    let reply = decode(&handled.reply.unwrap());
    assert_eq!(reply.msg_type(), MessageType::Reply);
    assert_eq!(ia_address(&reply), Some((7, GUEST, 86_313_600)));
    assert_eq!(h.bound(), Some(GUEST));
    // Renewals and rebinds are answered without binding again.
    for (kind, server) in [
        (MessageType::Renew, Some(server_duid())),
        (MessageType::Rebind, None),
    ] {
        let handled = send(&mut h, &request(kind, server));
        assert_eq!(handled.change, None, "{kind:?}");
        assert_eq!(
            ia_address(&decode(&handled.reply.unwrap())).unwrap().1,
            GUEST
        );
    }
}

#[test]
fn rapid_commit_solicit_binds_at_once() {
    let mut h = handler();
    let mut m = request(MessageType::Solicit, None);
    m.opts_mut().insert(DhcpOption::RapidCommit);
    let handled = send(&mut h, &m);
    assert_eq!(handled.change, Some(LeaseChange::Bound(GUEST.into())));
    let reply = decode(&handled.reply.unwrap());
    assert_eq!(reply.msg_type(), MessageType::Reply);
    assert!(reply.opts().get(OptionCode::RapidCommit).is_some());
}

#[test]
fn release_ends_the_lease_confirm_and_information_request_are_answered() {
    let mut h = handler();
    send(&mut h, &request(MessageType::Request, Some(server_duid())));
    let handled = send(&mut h, &request(MessageType::Release, Some(server_duid())));
    assert_eq!(handled.change, Some(LeaseChange::Released(GUEST.into())));
    let reply = decode(&handled.reply.unwrap());
    let Some(DhcpOption::StatusCode(status)) = reply.opts().get(OptionCode::StatusCode) else {
        panic!("no status in {reply:?}");
    };
    assert_eq!(status.status, Status::Success);
    let confirm = decode(
        &send(&mut h, &request(MessageType::Confirm, None))
            .reply
            .unwrap(),
    );
    assert!(confirm.opts().get(OptionCode::StatusCode).is_some());
    let mut info = Message::new_with_id(MessageType::InformationRequest, [9, 9, 9]);
    info.opts_mut()
        .insert(DhcpOption::ClientId(CLIENT_DUID.to_vec()));
    let reply = decode(&send(&mut h, &info).reply.unwrap());
    assert!(ia_address(&reply).is_none());
    assert!(reply.opts().get(OptionCode::DomainNameServers).is_some());
}

#[test]
fn other_servers_missing_ids_relays_and_non_link_local_senders_get_nothing() {
    let mut h = handler();
    let other = Some(vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9]);
    for m in [
        request(MessageType::Request, other.clone()),
        request(MessageType::Renew, other.clone()),
        request(MessageType::Release, other),
        request(MessageType::Request, None),
        request(MessageType::Solicit, Some(server_duid())),
        request(MessageType::Rebind, Some(server_duid())),
        request(MessageType::Advertise, None),
        request(MessageType::Reply, None),
        Message::new_with_id(MessageType::Solicit, [0, 0, 1]),
    ] {
        assert_eq!(send(&mut h, &m), Handled6::default(), "{m:?}");
    }
    let solicit = request(MessageType::Solicit, None).to_vec().unwrap();
    assert_eq!(
        h.handle(&solicit, GUEST),
        Handled6::default(),
        "a global source"
    );
    let mut relayed = vec![12, 0];
    relayed.extend(CLIENT.octets());
    relayed.extend(CLIENT.octets());
    assert_eq!(h.handle(&relayed, CLIENT), Handled6::default());
}

#[test]
fn malformed_packets_are_ignored() {
    let mut h = handler();
    let good = request(MessageType::Solicit, None).to_vec().unwrap();
    assert!(h.handle(&good, CLIENT).reply.is_some());
    for bad in [
        &good[..3],
        &good[..good.len() - 1],
        &[1, 0, 0, 0, 0, 1, 0xff, 0xff][..],
        &[][..],
    ] {
        assert_eq!(h.handle(bad, CLIENT), Handled6::default(), "{bad:?}");
    }
    // A short IA_NA is no IA_NA: the IAID falls back to 0.
    let mut short_ia = vec![1, 1, 2, 3, 0, 1, 0, 2, 0xab, 0xcd, 0, 3, 0, 4, 0, 0, 0, 9];
    let reply = decode(&h.handle(&short_ia, CLIENT).reply.unwrap());
    assert_eq!(ia_address(&reply).unwrap().0, 0);
    short_ia.extend([0, 14, 0, 0]);
    let reply = decode(&h.handle(&short_ia, CLIENT).reply.unwrap());
    assert_eq!(
        reply.msg_type(),
        MessageType::Reply,
        "rapid commit after the IA"
    );
}
