//! The `dhcp` thread: one UDP socket on port 67 of every interface, answering each served NIC
//! on its host interface only, until the server is dropped.
//!
//! As KubeVirt's server (pkg/network/dhcp/server/socket_listener.go), the socket is bound to
//! 0.0.0.0:67 with `SO_REUSEADDR` and learns each packet's interface from `IP_PKTINFO`:
//! packets from other interfaces are dropped unread, and every reply leaves through the
//! interface the request came in on, from the server address. This needs no privilege beyond
//! binding port 67 (`CAP_NET_BIND_SERVICE`, which a launcher pod has), unlike a raw socket.
//!
//! Everything that opens or configures descriptors happens in [`DhcpServer::start`], on the
//! calling thread; the thread itself, under its own seccomp filter
//! ([`crate::seccomp::dhcp_rules`]), only waits, receives, answers and reports leases.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::thread::JoinHandle;

use ipnet::IpNet;
use vmm_core::seccomp::{SeccompError, SpawnError, spawn_filtered};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::{DhcpConfig, DhcpConfigError};
use super::handler::{Destination, Dhcpv4Handler, LeaseChange};
use super::netif::{self, NetifError};
use crate::seccomp::dhcp_filter;

/// The server port.
pub const SERVER_PORT: u16 = 67;
/// The client port.
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

/// A lease changed.
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
    /// The socket or the stop event cannot be set up.
    #[error("Cannot open the DHCP server's socket (UDP port {SERVER_PORT})")]
    Socket(#[source] io::Error),
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
    interface: String,
    ifindex: u32,
    handler: Dhcpv4Handler,
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
        let socket = open_socket().map_err(DhcpError::Socket)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DhcpError::Socket)?;
        let stop_clone = stop.try_clone().map_err(DhcpError::Socket)?;
        for s in &served {
            let lease = s.handler.lease();
            log::info!(
                "DHCP for NIC {} ({}) on {}: {} from {}",
                s.nic,
                format_mac(&lease.mac),
                s.interface,
                lease.address,
                lease.server
            );
        }
        let thread = spawn_filtered("dhcp", filter, move || {
            serve(&socket, &stop_clone, served, &listener)
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

/// Resolves a NIC's interface, server address and lease.
fn served(nic: &ServedNic) -> Result<Served, DhcpError> {
    let interface_error = |source| DhcpError::Interface {
        nic: nic.nic.clone(),
        interface: nic.interface.clone(),
        source,
    };
    let ifindex = netif::index(&nic.interface).map_err(interface_error)?;
    let server = match nic.config.server {
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
        .map_err(|source| DhcpError::Config {
            nic: nic.nic.clone(),
            source,
        })?;
    Ok(Served {
        nic: nic.nic.clone(),
        interface: nic.interface.clone(),
        ifindex,
        handler: Dhcpv4Handler::new(lease),
    })
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn set_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid c_int for the option's whole length.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A non-blocking UDP socket on 0.0.0.0:67 that may broadcast and reports each packet's
/// interface.
fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: creates a socket from constant arguments; no memory is passed.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` was just created and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Other servers in the pod (KubeVirt runs one per interface) may share the port.
    set_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    set_option(fd, libc::SOL_SOCKET, libc::SO_BROADCAST)?;
    set_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: SERVER_PORT.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in of the given length.
    check(unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(socket)
}

/// Room for one `in_pktinfo` control message.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

/// Receives one datagram into `buffer`: its length and the index of the interface it came in
/// on; `None` when nothing is waiting. A datagram cut short or without its interface is
/// dropped (length 0).
fn receive(socket: RawFd, buffer: &mut [u8]) -> io::Result<Option<(usize, u32)>> {
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: msghdr is plain data; all zeroes is an empty header, filled in below.
    let mut header: libc::msghdr = unsafe { zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = control.0.len();
    // SAFETY: the header points to `buffer` and `control`, both valid for their lengths and
    // alive for the call.
    let n = unsafe { libc::recvmsg(socket, &mut header, 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    if header.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Ok(Some((0, 0)));
    }
    let mut ifindex = None;
    // SAFETY: the CMSG_* helpers walk the control messages the kernel wrote into `control`,
    // within msg_controllen; an IP_PKTINFO message carries an in_pktinfo, read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info = libc::CMSG_DATA(cmsg)
                    .cast::<libc::in_pktinfo>()
                    .read_unaligned();
                ifindex = u32::try_from(info.ipi_ifindex).ok();
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    Ok(Some(match ifindex {
        Some(index) => (n as usize, index),
        None => (0, 0),
    }))
}

/// Sends `bytes` to `to`:68 out of interface `ifindex`, from `source`.
fn send(
    socket: RawFd,
    bytes: &[u8],
    to: Ipv4Addr,
    ifindex: u32,
    source: Ipv4Addr,
) -> io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: CLIENT_PORT.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut control = ControlBuffer([0; 64]);
    let info = libc::in_pktinfo {
        ipi_ifindex: ifindex as libc::c_int,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(source).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    // SAFETY: msghdr is plain data; all zeroes is an empty header, filled in below.
    let mut header: libc::msghdr = unsafe { zeroed() };
    header.msg_name = (&addr as *const libc::sockaddr_in).cast_mut().cast();
    header.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    header.msg_controllen =
        unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } as usize;
    // SAFETY: `control` (64 bytes, 8-aligned) holds one in_pktinfo message (CMSG_SPACE of
    // 12 bytes is 32); the header points to `addr`, `iov` (read only by sendmsg) and
    // `control`, all alive for the call.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
        libc::CMSG_DATA(cmsg)
            .cast::<libc::in_pktinfo>()
            .write_unaligned(info);
        libc::sendmsg(socket, &header, 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The thread's loop: waits for packets or the stop event.
fn serve(socket: &OwnedFd, stop: &EventFd, mut served: Vec<Served>, listener: &LeaseListener) {
    let mut buffer = vec![0u8; RECEIVE_BUFFER];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("DHCP server stopped: cannot wait for packets: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            match receive(socket.as_raw_fd(), &mut buffer) {
                Ok(None) => break,
                Ok(Some((0, _))) => {}
                Ok(Some((len, ifindex))) => {
                    answer(
                        socket.as_raw_fd(),
                        &buffer[..len],
                        ifindex,
                        &mut served,
                        listener,
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("DHCP server: receive failed: {e}");
                    break;
                }
            }
        }
    }
}

/// Hands a packet from `ifindex` to the NICs served there.
fn answer(
    socket: RawFd,
    packet: &[u8],
    ifindex: u32,
    served: &mut [Served],
    listener: &LeaseListener,
) {
    for s in served.iter_mut().filter(|s| s.ifindex == ifindex) {
        let handled = s.handler.handle(packet);
        let lease = s.handler.lease();
        if let Some(reply) = &handled.reply {
            let to = match reply.to {
                Destination::Broadcast => Ipv4Addr::BROADCAST,
                Destination::Unicast(ip) => ip,
            };
            log::debug!(
                "DHCP on {}: {:?} to {} ({})",
                s.interface,
                reply.kind,
                format_mac(&lease.mac),
                to
            );
            if let Err(e) = send(socket, &reply.bytes, to, ifindex, lease.server) {
                log::warn!(
                    "DHCP on {}: cannot send a {:?} to {to}: {e}",
                    s.interface,
                    reply.kind
                );
            }
        }
        if let Some(change) = handled.change {
            match change {
                LeaseChange::Bound(ip) => log::info!(
                    "DHCP: NIC {} ({}) holds {ip}/{}",
                    s.nic,
                    format_mac(&lease.mac),
                    lease.address.prefix_len()
                ),
                LeaseChange::Released(ip) => log::info!(
                    "DHCP: NIC {} ({}) released {ip}",
                    s.nic,
                    format_mac(&lease.mac)
                ),
            }
            listener(&LeaseEvent {
                nic: s.nic.clone(),
                mac: lease.mac,
                prefix_len: lease.address.prefix_len(),
                change,
            });
        }
        if handled.reply.is_some() || handled.change.is_some() {
            return;
        }
    }
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
