//! DHCPv4 for one client, as a pure function of the packets it sends: [`Dhcpv4Handler::handle`]
//! takes a UDP payload and says what to answer, where, and how the lease changed. No I/O: the
//! server thread ([`super::server`]) moves the bytes, the fuzz target drives it directly.
//!
//! What it answers (RFC 2131), only to the configured MAC on an Ethernet BOOTREQUEST that is
//! not relayed (`giaddr` 0: the client is on the server's link):
//!
//! | request | answer |
//! | --- | --- |
//! | DISCOVER | OFFER of the configured address |
//! | REQUEST naming this server, or none (INIT-REBOOT, RENEWING, REBINDING) | ACK when the address asked for (`requested IP`, else `ciaddr`) is the configured one or none is given; NAK otherwise |
//! | REQUEST naming another server | nothing (the client took another offer) |
//! | INFORM | ACK with the options, no address and no lease time |
//! | RELEASE, DECLINE | nothing; the lease ends |
//!
//! Every OFFER and ACK carries KubeVirt's options (those configured, whatever the client's
//! parameter request list) and its lease time. Replies go to `ciaddr` when the client has an
//! address in the leased network, else to the broadcast address (NAKs always).

use std::net::{IpAddr, Ipv4Addr};

use dhcproto::v4::{
    DhcpOption, DhcpOptions, Flags, HType, Message, MessageType, Opcode, OptionCode, UnknownOption,
    borrowed,
};
use dhcproto::{Encodable, Name};

use super::config::LeaseConfig;

/// The BOOTP header and the magic cookie: nothing shorter is a DHCP message.
const MIN_MESSAGE: usize = 240;
/// The magic cookie that starts the options (RFC 2131 3).
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];

/// Where a reply goes (always to the client port, 68).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255 on the served interface.
    Broadcast,
    /// The client's address.
    Unicast(Ipv4Addr),
}

/// A reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The DHCP message.
    pub bytes: Vec<u8>,
    /// Its destination.
    pub to: Destination,
    /// OFFER, ACK or NAK.
    pub kind: MessageType,
}

/// How a packet changed the client's lease (DHCPv4 or DHCPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    /// The client was acknowledged the address (first time, or again after a release).
    Bound(IpAddr),
    /// The client released or declined the address.
    Released(IpAddr),
}

/// What [`Dhcpv4Handler::handle`] made of a packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Handled {
    /// The answer, if any.
    pub reply: Option<Reply>,
    /// The lease's change, if any.
    pub change: Option<LeaseChange>,
}

/// Why a packet got no answer (logged at debug level: a guest may send anything).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Too short, no magic cookie, or no (or a malformed) message type.
    Malformed,
    /// Not a BOOTREQUEST.
    NotARequest,
    /// Not Ethernet, or not this client's MAC.
    OtherClient,
    /// Relayed (`giaddr` set): the client is not on this link.
    Relayed,
    /// A REQUEST for another server.
    OtherServer,
    /// A message type a server does not answer.
    Unanswered,
}

/// What an answer depends on in a client's message.
#[derive(Clone, Copy, Debug)]
struct Request {
    /// Option 53.
    kind: MessageType,
    xid: u32,
    flags: Flags,
    ciaddr: Ipv4Addr,
    /// Option 50, if it holds an address.
    requested: Option<Ipv4Addr>,
    /// Option 54, if it holds an address.
    server: Option<Ipv4Addr>,
}

/// The DHCPv4 server's state for one client.
#[derive(Clone, Debug)]
pub struct Dhcpv4Handler {
    lease: LeaseConfig,
    /// Every option an OFFER or ACK carries besides the message type and server identifier.
    options: Vec<DhcpOption>,
    /// The address the client holds, once acknowledged.
    bound: Option<Ipv4Addr>,
}

impl Dhcpv4Handler {
    /// A handler handing out `lease`.
    pub fn new(lease: LeaseConfig) -> Self {
        let options = lease_options(&lease);
        Self {
            lease,
            options,
            bound: None,
        }
    }

    /// What it hands out.
    pub fn lease(&self) -> &LeaseConfig {
        &self.lease
    }

    /// The address the client holds, if it was acknowledged and did not release it.
    pub fn bound(&self) -> Option<Ipv4Addr> {
        self.bound
    }

    /// Answers one UDP payload received on the served interface.
    pub fn handle(&mut self, packet: &[u8]) -> Handled {
        match self.answer(packet) {
            Ok(handled) => handled,
            Err(why) => {
                log::debug!("DHCP: ignored a packet ({why:?})");
                Handled::default()
            }
        }
    }

    fn answer(&mut self, packet: &[u8]) -> Result<Handled, Ignored> {
        let request = self.parse(packet)?;
        let address = self.lease.address.addr();
        let mut handled = Handled::default();
        match request.kind {
            MessageType::Discover => {
                handled.reply = Some(self.reply(&request, MessageType::Offer));
            }
            MessageType::Request => {
                if request.server.is_some_and(|id| id != self.lease.server) {
                    return Err(Ignored::OtherServer);
                }
                let asked = request
                    .requested
                    .or(Some(request.ciaddr).filter(|ip| !ip.is_unspecified()));
                if asked.is_some_and(|ip| ip != address) {
                    handled.reply = Some(self.nak(&request));
                } else {
                    handled.reply = Some(self.reply(&request, MessageType::Ack));
                    if self.bound.replace(address).is_none() {
                        handled.change = Some(LeaseChange::Bound(address.into()));
                    }
                }
            }
            MessageType::Inform => {
                handled.reply = Some(self.reply(&request, MessageType::Ack));
            }
            MessageType::Release | MessageType::Decline => {
                if request.kind == MessageType::Decline {
                    log::warn!(
                        "DHCP: the guest declined {address}: another host on its link uses it"
                    );
                }
                if let Some(held) = self.bound.take() {
                    handled.change = Some(LeaseChange::Released(held.into()));
                }
            }
            _ => return Err(Ignored::Unanswered),
        }
        Ok(handled)
    }

    /// The fields of a BOOTREQUEST from this client that the answer depends on. The header is
    /// read in place and only options 53, 50 and 54 are looked at, each checked for its
    /// length: nothing else the guest put in the packet is decoded.
    fn parse(&self, packet: &[u8]) -> Result<Request, Ignored> {
        if packet.len() < MIN_MESSAGE || packet[236..240] != MAGIC_COOKIE {
            return Err(Ignored::Malformed);
        }
        let message = borrowed::Message::new(packet).map_err(|_| Ignored::Malformed)?;
        if message.opcode() != Opcode::BootRequest {
            return Err(Ignored::NotARequest);
        }
        // hlen first: chaddr() is sliced by it.
        if message.htype() != HType::Eth
            || message.hlen() != 6
            || message.chaddr() != self.lease.mac
        {
            return Err(Ignored::OtherClient);
        }
        if !message.giaddr().is_unspecified() {
            return Err(Ignored::Relayed);
        }
        let mut kind = None;
        let mut requested = None;
        let mut server = None;
        let address = |data: &[u8]| <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from);
        for option in message.opts() {
            let data = option.data();
            match u8::from(option.code()) {
                53 if kind.is_none() => match data {
                    [t] => kind = Some(MessageType::from(*t)),
                    _ => return Err(Ignored::Malformed),
                },
                50 if requested.is_none() => requested = address(data),
                54 if server.is_none() => server = address(data),
                _ => {}
            }
        }
        Ok(Request {
            kind: kind.ok_or(Ignored::Malformed)?,
            xid: message.xid(),
            flags: message.flags(),
            ciaddr: message.ciaddr(),
            requested,
            server,
        })
    }

    /// An OFFER or ACK; for an INFORM, an ACK without address or lease time.
    fn reply(&self, request: &Request, kind: MessageType) -> Reply {
        let inform = request.kind == MessageType::Inform;
        let mut message = self.base(request);
        if inform {
            message.set_ciaddr(request.ciaddr);
        } else {
            message.set_yiaddr(self.lease.address.addr());
            if kind == MessageType::Ack {
                message.set_ciaddr(request.ciaddr);
            }
        }
        let opts = message.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(self.lease.server));
        if !inform {
            opts.insert(DhcpOption::AddressLeaseTime(self.lease.lease_seconds));
        }
        for option in &self.options {
            opts.insert(option.clone());
        }
        Reply {
            bytes: encode(&message),
            to: self.destination(request),
            kind,
        }
    }

    fn nak(&self, request: &Request) -> Reply {
        let mut message = self.base(request);
        let opts = message.opts_mut();
        opts.insert(DhcpOption::MessageType(MessageType::Nak));
        opts.insert(DhcpOption::ServerIdentifier(self.lease.server));
        opts.insert(DhcpOption::Message(format!(
            "the address for this client is {}",
            self.lease.address.addr()
        )));
        Reply {
            bytes: encode(&message),
            to: Destination::Broadcast,
            kind: MessageType::Nak,
        }
    }

    /// A BOOTREPLY to `request`: its transaction, flags and client hardware address.
    fn base(&self, request: &Request) -> Message {
        let mut message = Message::new_with_id(
            request.xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.lease.mac,
        );
        message
            .set_opcode(Opcode::BootReply)
            .set_htype(HType::Eth)
            .set_flags(request.flags)
            .set_opts(DhcpOptions::new());
        message
    }

    /// `ciaddr` when the client already has an address in the leased network, else the
    /// broadcast address: the server cannot reach an unconfigured client by unicast without
    /// writing the host's ARP table, which RFC 2131 4.1 lets it skip.
    fn destination(&self, request: &Request) -> Destination {
        let ciaddr = request.ciaddr;
        if !ciaddr.is_unspecified()
            && self.lease.address.contains(&ciaddr)
            && ciaddr != self.lease.address.broadcast()
        {
            Destination::Unicast(ciaddr)
        } else {
            Destination::Broadcast
        }
    }
}

fn encode(message: &Message) -> Vec<u8> {
    // A reply holds only values checked when the lease was configured.
    message
        .to_vec()
        .expect("a reply built from a checked lease encodes")
}

/// The options of every OFFER and ACK, as KubeVirt's server sends them.
fn lease_options(lease: &LeaseConfig) -> Vec<DhcpOption> {
    let mut options = vec![DhcpOption::SubnetMask(lease.address.netmask())];
    if let Some(router) = lease.router {
        options.push(DhcpOption::Router(vec![router]));
    }
    if !lease.dns.is_empty() {
        options.push(DhcpOption::DomainNameServer(lease.dns.clone()));
    }
    if let Some(mtu) = lease.mtu {
        options.push(DhcpOption::InterfaceMtu(mtu));
    }
    if !lease.search.is_empty() {
        let names = lease
            .search
            .iter()
            .map(|d| {
                let mut name = Name::from_ascii(d).expect("search domains are checked");
                // Each domain ends with the root label on the wire.
                name.set_fqdn(true);
                name
            })
            .collect();
        options.push(DhcpOption::DomainSearch(names));
    }
    if let Some(name) = &lease.hostname {
        options.push(DhcpOption::Hostname(name.clone()));
    }
    if let Some(name) = &lease.domain_name {
        options.push(DhcpOption::DomainName(name.clone()));
    }
    if !lease.routes.is_empty() {
        options.push(DhcpOption::ClasslessStaticRoute(
            lease
                .routes
                .iter()
                .map(|r| (r.destination, r.gateway))
                .collect(),
        ));
    }
    if !lease.ntp_servers.is_empty() {
        options.push(DhcpOption::NtpServers(lease.ntp_servers.clone()));
    }
    if let Some(name) = &lease.tftp_server_name {
        options.push(DhcpOption::TFTPServerName(name.as_bytes().to_vec()));
    }
    if let Some(name) = &lease.boot_file_name {
        options.push(DhcpOption::BootfileName(name.as_bytes().to_vec()));
    }
    for (code, value) in &lease.private_options {
        options.push(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::from(*code),
            value.clone(),
        )));
    }
    options
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
