//! The `dhcp` thread: one UDP socket on port 67 of every interface (and, for DHCPv6, one on
//! port 547 in the servers' multicast group of each served interface), answering each served
//! NIC on its host interface only, until the server is dropped.
//!
//! As KubeVirt's servers (pkg/network/dhcp/server/socket_listener.go, serverv6/conn.go), the
//! sockets are bound to the wildcard address with `SO_REUSEADDR` and learn each packet's
//! interface from `IP_PKTINFO` / `IPV6_PKTINFO`: packets from other interfaces are dropped
//! unread, and every reply leaves through the interface the request came in on. This needs no
//! privilege beyond binding ports below 1024 (`CAP_NET_BIND_SERVICE`, which a launcher pod
//! has), unlike a raw socket.
//!
//! Everything that opens or configures descriptors happens in [`DhcpServer::start`], on the
//! calling thread; the thread itself, under its own seccomp filter
//! ([`crate::seccomp::dhcp_rules`]), only waits, receives, answers and reports leases.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::thread::JoinHandle;

use ipnet::IpNet;
use rvmm_core::seccomp::{SeccompError, SpawnError, spawn_filtered};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::{DhcpConfig, DhcpConfigError};
use super::handler::{Destination, Dhcpv4Handler, LeaseChange};
use super::handler6::{self, Dhcpv6Handler};
use super::netif::{self, NetifError};
use super::socket::{self, Received};
use crate::seccomp::dhcp_filter;

/// The DHCPv4 server port.
pub const SERVER_PORT: u16 = 67;
/// The DHCPv4 client port.
pub const CLIENT_PORT: u16 = 68;
/// Large enough for any UDP payload: nothing a guest sends is cut short and misread.
const RECEIVE_BUFFER: usize = 65536;

/// One NIC the server answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedNic {
    /// The NIC's name in events and logs (its id, or its tap).
    pub nic: String,
    /// The host interface to serve on.
    pub interface: String,
    /// The guest NIC's MAC: the only client answered.
    pub mac: [u8; 6],
    /// The NIC's MTU, if set: the lease's MTU unless the settings give one.
    pub nic_mtu: Option<u16>,
    /// What it hands out.
    pub config: DhcpConfig,
}

/// A lease changed (DHCPv4 or DHCPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseEvent {
    /// [`ServedNic::nic`].
    pub nic: String,
    /// The client's MAC.
    pub mac: [u8; 6],
    /// The leased network's prefix length.
    pub prefix_len: u8,
    /// What changed.
    pub change: LeaseChange,
}

/// Told of every lease change, on the `dhcp` thread: it must only hand the event on.
pub type LeaseListener = Box<dyn Fn(&LeaseEvent) + Send>;

/// The server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The interface to serve on cannot be used.
    #[error("NIC {nic}: cannot serve DHCP on {interface}")]
    Interface {
        /// The NIC.
        nic: String,
        /// The interface.
        interface: String,
        /// Cause.
        #[source]
        source: NetifError,
    },
    /// No server address: none configured and the interface has no IPv4 address.
    #[error(
        "NIC {nic}: {interface} has no IPv4 address to serve DHCP from (set the server address)"
    )]
    NoServerAddress {
        /// The NIC.
        nic: String,
        /// The interface.
        interface: String,
    },
    /// A setting is invalid.
    #[error("NIC {nic}: invalid DHCP setting")]
    Config {
        /// The NIC.
        nic: String,
        /// Cause.
        #[source]
        source: DhcpConfigError,
    },
    /// The DHCPv4 socket cannot be set up.
    #[error("Cannot open the DHCP server's socket (UDP port {SERVER_PORT})")]
    Socket(#[source] io::Error),
    /// The thread's stop event cannot be created.
    #[error("Cannot create the DHCP thread's stop event")]
    StopEvent(#[source] io::Error),
    /// The DHCPv6 socket cannot be set up.
    #[error(
        "Cannot open the DHCPv6 server's socket (UDP port {})",
        handler6::SERVER_PORT
    )]
    Socket6(#[source] io::Error),
    /// The thread's seccomp filter cannot be built.
    #[error("Cannot build the DHCP thread's seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// The thread cannot start.
    #[error("Cannot start the DHCP thread")]
    Thread(#[source] SpawnError),
    /// The started marker cannot be written.
    #[error("Cannot create {}", path.display())]
    Marker {
        /// The marker.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl DhcpError {
    /// True when the configuration, not the host, is at fault.
    pub fn is_bad_config(&self) -> bool {
        matches!(
            self,
            Self::Interface { .. } | Self::NoServerAddress { .. } | Self::Config { .. }
        )
    }
}

/// A NIC being served.
struct Served {
    nic: String,
    mac: [u8; 6],
    interface: String,
    ifindex: u32,
    v4: Option<Dhcpv4Handler>,
    v6: Option<Dhcpv6Handler>,
}

/// The running server; dropping it stops the thread and removes the started markers.
pub struct DhcpServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    markers: Vec<PathBuf>,
}

impl std::fmt::Debug for DhcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhcpServer")
            .field("markers", &self.markers)
            .finish_non_exhaustive()
    }
}

impl DhcpServer {
    /// Serves `nics` on a thread named `dhcp` (under [`dhcp_filter`] when `seccomp` is true)
    /// and tells `listener` of every lease change. Once it serves, each NIC's started marker
    /// is created.
    pub fn start(
        nics: &[ServedNic],
        seccomp: bool,
        listener: LeaseListener,
    ) -> Result<Self, DhcpError> {
        let served = nics.iter().map(served).collect::<Result<Vec<_>, _>>()?;
        let filter = seccomp
            .then(dhcp_filter)
            .transpose()
            .map_err(DhcpError::Seccomp)?;
        let v4 = served
            .iter()
            .any(|s| s.v4.is_some())
            .then(|| socket::open_v4(SERVER_PORT))
            .transpose()
            .map_err(DhcpError::Socket)?;
        let mut v6_interfaces: Vec<u32> = served
            .iter()
            .filter(|s| s.v6.is_some())
            .map(|s| s.ifindex)
            .collect();
        v6_interfaces.sort_unstable();
        v6_interfaces.dedup();
        let v6 = (!v6_interfaces.is_empty())
            .then(|| socket::open_v6(handler6::SERVER_PORT, handler6::ALL_SERVERS, &v6_interfaces))
            .transpose()
            .map_err(DhcpError::Socket6)?;
        let sockets = Sockets { v4, v6 };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DhcpError::StopEvent)?;
        let stop_clone = stop.try_clone().map_err(DhcpError::StopEvent)?;
        for s in &served {
            let mac = format_mac(&s.mac);
            if let Some(lease) = s.v4.as_ref().map(Dhcpv4Handler::lease) {
                log::info!(
                    "DHCP for NIC {} ({mac}) on {}: {} from {}",
                    s.nic,
                    s.interface,
                    lease.address,
                    lease.server
                );
            }
            if let Some(lease) = s.v6.as_ref().map(Dhcpv6Handler::lease) {
                log::info!(
                    "DHCPv6 for NIC {} ({mac}) on {}: {}",
                    s.nic,
                    s.interface,
                    lease.address
                );
            }
        }
        let thread = spawn_filtered("dhcp", filter, move || {
            serve(&sockets, &stop_clone, served, &listener)
        })
        .map_err(DhcpError::Thread)?;
        let mut server = Self {
            stop,
            thread: Some(thread),
            markers: Vec::new(),
        };
        for path in nics.iter().filter_map(|n| n.config.started_marker.clone()) {
            std::fs::File::create(&path).map_err(|source| DhcpError::Marker {
                path: path.clone(),
                source,
            })?;
            server.markers.push(path);
        }
        Ok(server)
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
        for path in &self.markers {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("Cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Resolves a NIC's interface, server addresses and leases.
fn served(nic: &ServedNic) -> Result<Served, DhcpError> {
    let interface_error = |source| DhcpError::Interface {
        nic: nic.nic.clone(),
        interface: nic.interface.clone(),
        source,
    };
    let config_error = |source| DhcpError::Config {
        nic: nic.nic.clone(),
        source,
    };
    let ifindex = netif::index(&nic.interface).map_err(interface_error)?;
    let v4 = match (&nic.config.address, nic.config.server) {
        (None, _) => None,
        (Some(_), server) => {
            let server = match server {
                Some(ip) => ip,
                None => netif::addresses(&nic.interface)
                    .map_err(interface_error)?
                    .into_iter()
                    .find_map(|a| match a {
                        IpNet::V4(v4) => Some(v4.addr()),
                        IpNet::V6(_) => None,
                    })
                    .ok_or_else(|| DhcpError::NoServerAddress {
                        nic: nic.nic.clone(),
                        interface: nic.interface.clone(),
                    })?,
            };
            let lease = nic
                .config
                .lease(nic.mac, server, nic.nic_mtu)
                .map_err(config_error)?;
            Some(Dhcpv4Handler::new(lease))
        }
    };
    let v6 = match &nic.config.ipv6 {
        None => None,
        Some(_) => {
            let server_mac = netif::mac(&nic.interface).map_err(interface_error)?;
            let lease = nic.config.lease6(server_mac).map_err(config_error)?;
            lease.map(Dhcpv6Handler::new)
        }
    };
    Ok(Served {
        nic: nic.nic.clone(),
        mac: nic.mac,
        interface: nic.interface.clone(),
        ifindex,
        v4,
        v6,
    })
}

/// The thread's sockets.
struct Sockets {
    v4: Option<OwnedFd>,
    v6: Option<OwnedFd>,
}

/// The thread's loop: waits for packets or the stop event.
fn serve(sockets: &Sockets, stop: &EventFd, mut served: Vec<Served>, listener: &LeaseListener) {
    let mut buffer = vec![0u8; RECEIVE_BUFFER];
    let stop_fd = stop.as_raw_fd();
    let fds: Vec<RawFd> = [sockets.v4.as_ref(), sockets.v6.as_ref()]
        .into_iter()
        .flatten()
        .map(AsRawFd::as_raw_fd)
        .chain([stop_fd])
        .collect();
    loop {
        let mut polled: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `polled` is a valid array of pollfd for the call.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("DHCP server stopped: cannot wait for packets: {e}");
            return;
        }
        for p in &polled {
            if p.revents == 0 {
                continue;
            }
            if p.fd == stop_fd {
                return;
            }
            let v6 = sockets.v6.as_ref().is_some_and(|s| s.as_raw_fd() == p.fd);
            drain(p.fd, v6, &mut buffer, &mut served, listener);
        }
    }
}

/// Answers every datagram waiting on `socket`.
fn drain(
    socket: RawFd,
    v6: bool,
    buffer: &mut [u8],
    served: &mut [Served],
    listener: &LeaseListener,
) {
    loop {
        match socket::receive(socket, buffer) {
            Ok(None) => return,
            Ok(Some(Received { len: 0, .. })) => {}
            Ok(Some(received)) => {
                let packet = &buffer[..received.len];
                let nics = served.iter_mut().filter(|s| s.ifindex == received.ifindex);
                for s in nics {
                    let answered = if v6 {
                        s.answer_v6(socket, packet, received, listener)
                    } else {
                        s.answer_v4(socket, packet, received.ifindex, listener)
                    };
                    if answered {
                        break;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("DHCP server: receive failed: {e}");
                return;
            }
        }
    }
}

impl Served {
    /// Hands a DHCPv4 packet to this NIC's handler; true when it was the NIC's.
    fn answer_v4(
        &mut self,
        socket: RawFd,
        packet: &[u8],
        ifindex: u32,
        listener: &LeaseListener,
    ) -> bool {
        let Some(handler) = &mut self.v4 else {
            return false;
        };
        let handled = handler.handle(packet);
        let lease = handler.lease();
        if let Some(reply) = &handled.reply {
            let to = match reply.to {
                Destination::Broadcast => Ipv4Addr::BROADCAST,
                Destination::Unicast(ip) => ip,
            };
            log::debug!(
                "DHCP on {}: {:?} to {} ({to})",
                self.interface,
                reply.kind,
                format_mac(&self.mac)
            );
            let sent = socket::send_v4(
                socket,
                &reply.bytes,
                (to, CLIENT_PORT),
                ifindex,
                lease.server,
            );
            if let Err(e) = sent {
                log::warn!(
                    "DHCP on {}: cannot send a {:?} to {to}: {e}",
                    self.interface,
                    reply.kind
                );
            }
        }
        let prefix_len = lease.address.prefix_len();
        self.report(handled.change, prefix_len, listener);
        handled.reply.is_some() || handled.change.is_some()
    }

    /// Hands a DHCPv6 packet to this NIC's handler; true when it answered.
    fn answer_v6(
        &mut self,
        socket: RawFd,
        packet: &[u8],
        received: Received,
        listener: &LeaseListener,
    ) -> bool {
        let (Some(handler), Some(source)) = (&mut self.v6, received.source) else {
            return false;
        };
        let handled = handler.handle(packet, source);
        if let Some(reply) = &handled.reply {
            log::debug!("DHCPv6 on {}: a reply to {source}", self.interface);
            let sent = socket::send_v6(
                socket,
                reply,
                (source, handler6::CLIENT_PORT),
                received.ifindex,
            );
            if let Err(e) = sent {
                log::warn!(
                    "DHCPv6 on {}: cannot reply to {source}: {e}",
                    self.interface
                );
            }
        }
        let prefix_len = handler.lease().address.prefix_len();
        self.report(handled.change, prefix_len, listener);
        handled.reply.is_some()
    }

    fn report(&self, change: Option<LeaseChange>, prefix_len: u8, listener: &LeaseListener) {
        let Some(change) = change else {
            return;
        };
        let mac = format_mac(&self.mac);
        match change {
            LeaseChange::Bound(ip) => {
                log::info!("DHCP: NIC {} ({mac}) holds {ip}/{prefix_len}", self.nic)
            }
            LeaseChange::Released(ip) => log::info!("DHCP: NIC {} ({mac}) released {ip}", self.nic),
        }
        listener(&LeaseEvent {
            nic: self.nic.clone(),
            mac: self.mac,
            prefix_len,
            change,
        });
    }
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
