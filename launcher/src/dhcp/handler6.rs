//! DHCPv6 for one client, as KubeVirt's serverv6 (pkg/network/dhcp/serverv6): stateful, one
//! address (IA_NA) and the DNS servers, as a pure function of the client's packets.
//!
//! | request | answer (from this server's DUID, echoing the client's) |
//! | --- | --- |
//! | SOLICIT | ADVERTISE of the address; with Rapid Commit, a REPLY that binds it |
//! | REQUEST, RENEW (naming this server), REBIND | REPLY with the address: bound |
//! | CONFIRM | REPLY, status Success (the client is on this link) |
//! | RELEASE, DECLINE (naming this server) | REPLY, status Success; the lease ends |
//! | INFORMATION-REQUEST | REPLY with the DNS servers |
//!
//! Every answer goes back to the client's link-local source address, port 546; relayed
//! messages, messages naming another server and messages without a client identifier where
//! RFC 8415 requires one get none. The client is whoever sends on the served link (a
//! masquerade bridge holds only the guest's tap): DHCPv6 names clients by DUID, not MAC, and
//! KubeVirt's server does not filter either. Only the message type, transaction id and
//! options 1, 2, 3 and 14 of a request are read, each checked for its length.

use std::net::{IpAddr, Ipv6Addr};

use dhcproto::Encodable;
use dhcproto::v6::{
    DhcpOption, DhcpOptions, IAAddr, IANA, Message, MessageType, Status, StatusCode,
};

use super::config::Lease6Config;
use super::handler::LeaseChange;

/// The client port.
pub const CLIENT_PORT: u16 = 546;
/// The server port.
pub const SERVER_PORT: u16 = 547;
/// All_DHCP_Relay_Agents_and_Servers (ff02::1:2): where clients send.
pub const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

/// What [`Dhcpv6Handler::handle`] made of a packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Handled6 {
    /// The answer, to the client's address.
    pub reply: Option<Vec<u8>>,
    /// The lease's change, if any.
    pub change: Option<LeaseChange>,
}

/// The fields of a client message an answer depends on.
#[derive(Clone, Debug, Default)]
struct Request6 {
    kind: u8,
    xid: [u8; 3],
    client_id: Option<Vec<u8>>,
    server_id: Option<Vec<u8>>,
    /// The first IA_NA's IAID.
    iaid: Option<u32>,
    rapid_commit: bool,
}

/// Reads a client message, or None for anything else.
fn parse(packet: &[u8]) -> Option<Request6> {
    let (&kind, rest) = packet.split_first()?;
    let xid: [u8; 3] = rest.get(..3)?.try_into().ok()?;
    let mut request = Request6 {
        kind,
        xid,
        ..Request6::default()
    };
    let mut options = &rest[3..];
    while !options.is_empty() {
        let header: [u8; 4] = options.get(..4)?.try_into().ok()?;
        let code = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let data = options.get(4..4 + len)?;
        options = &options[4 + len..];
        match code {
            1 if request.client_id.is_none() && !data.is_empty() => {
                request.client_id = Some(data.to_vec());
            }
            2 if request.server_id.is_none() => request.server_id = Some(data.to_vec()),
            3 if request.iaid.is_none() && data.len() >= 12 => {
                request.iaid = Some(u32::from_be_bytes(data[..4].try_into().ok()?));
            }
            14 => request.rapid_commit = true,
            _ => {}
        }
    }
    Some(request)
}

/// The DHCPv6 server's state for its client.
#[derive(Clone, Debug)]
pub struct Dhcpv6Handler {
    lease: Lease6Config,
    bound: Option<Ipv6Addr>,
}

impl Dhcpv6Handler {
    /// A handler handing out `lease`.
    pub fn new(lease: Lease6Config) -> Self {
        Self { lease, bound: None }
    }

    /// What it hands out.
    pub fn lease(&self) -> &Lease6Config {
        &self.lease
    }

    /// The address the client holds, if it was bound and not released.
    pub fn bound(&self) -> Option<Ipv6Addr> {
        self.bound
    }

    /// Answers one UDP payload that came from `source` on the served interface.
    pub fn handle(&mut self, packet: &[u8], source: Ipv6Addr) -> Handled6 {
        if !source.is_unicast_link_local() {
            log::debug!("DHCPv6: ignored a packet from {source} (not link-local)");
            return Handled6::default();
        }
        match parse(packet) {
            Some(request) => self.answer(&request),
            None => {
                log::debug!("DHCPv6: ignored a malformed packet");
                Handled6::default()
            }
        }
    }

    fn answer(&mut self, request: &Request6) -> Handled6 {
        const SOLICIT: u8 = 1;
        const REQUEST: u8 = 3;
        const CONFIRM: u8 = 4;
        const RENEW: u8 = 5;
        const REBIND: u8 = 6;
        const RELEASE: u8 = 8;
        const DECLINE: u8 = 9;
        const INFORMATION_REQUEST: u8 = 11;
        let ours = request.server_id.as_deref() == Some(self.lease.server_duid.as_slice());
        let named_other = request.server_id.is_some() && !ours;
        let address = self.lease.address.addr();
        let mut handled = Handled6::default();
        match request.kind {
            _ if request.client_id.is_none() && request.kind != INFORMATION_REQUEST => {}
            SOLICIT if request.server_id.is_none() => {
                if request.rapid_commit {
                    handled.reply = Some(self.reply(request, MessageType::Reply, Part::Address));
                    handled.change = self.bind(address);
                } else {
                    handled.reply =
                        Some(self.reply(request, MessageType::Advertise, Part::Address));
                }
            }
            REQUEST | RENEW if ours => {
                handled.reply = Some(self.reply(request, MessageType::Reply, Part::Address));
                handled.change = self.bind(address);
            }
            REBIND if request.server_id.is_none() => {
                handled.reply = Some(self.reply(request, MessageType::Reply, Part::Address));
                handled.change = self.bind(address);
            }
            CONFIRM if request.server_id.is_none() => {
                handled.reply = Some(self.reply(request, MessageType::Reply, Part::Success));
            }
            RELEASE | DECLINE if ours => {
                if request.kind == DECLINE {
                    log::warn!("DHCPv6: the guest declined {address}: another host uses it");
                }
                handled.reply = Some(self.reply(request, MessageType::Reply, Part::Success));
                handled.change = self.bound.take().map(|ip| LeaseChange::Released(ip.into()));
            }
            INFORMATION_REQUEST if !named_other => {
                handled.reply = Some(self.reply(request, MessageType::Reply, Part::Nothing));
            }
            _ => {}
        }
        handled
    }

    fn bind(&mut self, address: Ipv6Addr) -> Option<LeaseChange> {
        self.bound
            .replace(address)
            .is_none()
            .then_some(LeaseChange::Bound(IpAddr::V6(address)))
    }

    fn reply(&self, request: &Request6, kind: MessageType, part: Part) -> Vec<u8> {
        let mut message = Message::new_with_id(kind, request.xid);
        let opts = message.opts_mut();
        opts.insert(DhcpOption::ServerId(self.lease.server_duid.clone()));
        if let Some(client) = &request.client_id {
            opts.insert(DhcpOption::ClientId(client.clone()));
        }
        match part {
            Part::Address => {
                let mut ia = DhcpOptions::new();
                ia.insert(DhcpOption::IAAddr(IAAddr {
                    addr: self.lease.address.addr(),
                    preferred_life: self.lease.lifetime_seconds,
                    valid_life: self.lease.lifetime_seconds,
                    opts: DhcpOptions::new(),
                }));
                opts.insert(DhcpOption::IANA(IANA {
                    id: request.iaid.unwrap_or_default(),
                    t1: 0,
                    t2: 0,
                    opts: ia,
                }));
                if request.rapid_commit && kind == MessageType::Reply {
                    opts.insert(DhcpOption::RapidCommit);
                }
            }
            Part::Success => opts.insert(DhcpOption::StatusCode(StatusCode {
                status: Status::Success,
                msg: String::new(),
            })),
            Part::Nothing => {}
        }
        if !self.lease.dns.is_empty() && part != Part::Success {
            opts.insert(DhcpOption::DomainNameServers(self.lease.dns.clone()));
        }
        message
            .to_vec()
            .expect("a reply built from a checked lease encodes")
    }
}

/// What a reply carries besides the identifiers and DNS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// The IA_NA with the address.
    Address,
    /// Status Success (CONFIRM, RELEASE, DECLINE).
    Success,
    /// Nothing more (INFORMATION-REQUEST).
    Nothing,
}

#[cfg(test)]
#[path = "handler6_tests.rs"]
mod tests;
