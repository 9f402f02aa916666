//! The DHCP server's UDP sockets: bound to the server port of every interface, each datagram
//! received with the interface it came in on (`IP_PKTINFO` / `IPV6_PKTINFO`) and each reply
//! sent out of a given interface. Only `start` (unfiltered) opens and configures them; the
//! `dhcp` thread only receives and sends.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Room for one packet-info control message, aligned for cmsghdr.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

/// A datagram: its length in the buffer, the interface it came in on, and (IPv6) its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The interface's index.
    pub ifindex: u32,
    /// The sender (IPv6 only; IPv4 replies go by the packet's fields).
    pub source: Option<Ipv6Addr>,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn set_option<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is valid for reads of its whole size, which is the length passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn udp_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: creates a socket from constant arguments; no memory is passed.
    let fd = check(unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` was just created and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Other servers in the pod (KubeVirt runs one per interface) may share the port.
    set_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1 as &libc::c_int)?;
    Ok(socket)
}

fn bind<T>(fd: RawFd, addr: &T) -> io::Result<()> {
    // SAFETY: `addr` is a valid socket address of the given length.
    check(unsafe {
        libc::bind(
            fd,
            (addr as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A non-blocking UDP socket on 0.0.0.0:`port` that may broadcast and reports each packet's
/// interface.
pub fn open_v4(port: u16) -> io::Result<OwnedFd> {
    let socket = udp_socket(libc::AF_INET)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    set_option(fd, libc::SOL_SOCKET, libc::SO_BROADCAST, &1 as &libc::c_int)?;
    set_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, &1 as &libc::c_int)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    bind(fd, &addr)?;
    Ok(socket)
}

/// A non-blocking UDP socket on `[::]:port`, IPv6 only, in multicast group `group` on each of
/// `ifindexes`, reporting each packet's interface.
pub fn open_v6(port: u16, group: Ipv6Addr, ifindexes: &[u32]) -> io::Result<OwnedFd> {
    let socket = udp_socket(libc::AF_INET6)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    set_option(
        fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_V6ONLY,
        &1 as &libc::c_int,
    )?;
    set_option(
        fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVPKTINFO,
        &1 as &libc::c_int,
    )?;
    // SAFETY: sockaddr_in6 is plain data; all zeroes is the unspecified address, port 0.
    let mut addr: libc::sockaddr_in6 = unsafe { zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    bind(fd, &addr)?;
    for &ifindex in ifindexes {
        let membership = libc::ipv6_mreq {
            ipv6mr_multiaddr: libc::in6_addr {
                s6_addr: group.octets(),
            },
            ipv6mr_interface: ifindex,
        };
        set_option(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_ADD_MEMBERSHIP,
            &membership,
        )?;
    }
    Ok(socket)
}

/// Receives one datagram into `buffer`; `None` when nothing is waiting. A datagram cut short
/// or without its interface comes back with length 0 (to be dropped).
pub fn receive(socket: RawFd, buffer: &mut [u8]) -> io::Result<Option<Received>> {
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: sockaddr_in6 is plain data; the kernel fills it in (it also holds an IPv4
    // sender, which is not read).
    let mut source: libc::sockaddr_in6 = unsafe { zeroed() };
    // SAFETY: msghdr is plain data; all zeroes is an empty header, filled in below.
    let mut header: libc::msghdr = unsafe { zeroed() };
    header.msg_name = (&mut source as *mut libc::sockaddr_in6).cast();
    header.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = control.0.len();
    // SAFETY: the header points to `source`, `buffer` and `control`, all valid for their
    // lengths and alive for the call.
    let n = unsafe { libc::recvmsg(socket, &mut header, 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    let dropped = Received {
        len: 0,
        ifindex: 0,
        source: None,
    };
    if header.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Ok(Some(dropped));
    }
    let mut ifindex = None;
    // SAFETY: the CMSG_* helpers walk the control messages the kernel wrote into `control`,
    // within msg_controllen; IP_PKTINFO carries an in_pktinfo, IPV6_PKTINFO an in6_pktinfo,
    // each read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                let info = libc::CMSG_DATA(cmsg)
                    .cast::<libc::in_pktinfo>()
                    .read_unaligned();
                ifindex = u32::try_from(info.ipi_ifindex).ok();
            } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                let info = libc::CMSG_DATA(cmsg)
                    .cast::<libc::in6_pktinfo>()
                    .read_unaligned();
                ifindex = Some(info.ipi6_ifindex);
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    let source = (i32::from(source.sin6_family) == libc::AF_INET6)
        .then(|| Ipv6Addr::from(source.sin6_addr.s6_addr));
    Ok(Some(match ifindex {
        Some(ifindex) => Received {
            len: n as usize,
            ifindex,
            source,
        },
        None => dropped,
    }))
}

/// Sends `bytes` to `addr` (a sockaddr) with one packet-info control message `info` of type
/// `(level, kind)`.
fn send_with_info<A, I>(
    socket: RawFd,
    bytes: &[u8],
    addr: &A,
    (level, kind): (libc::c_int, libc::c_int),
    info: I,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: msghdr is plain data; all zeroes is an empty header, filled in below.
    let mut header: libc::msghdr = unsafe { zeroed() };
    header.msg_name = (addr as *const A).cast_mut().cast();
    header.msg_namelen = size_of::<A>() as libc::socklen_t;
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    header.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<I>() as u32) } as usize;
    assert!(header.msg_controllen <= control.0.len(), "packet info fits");
    // SAFETY: `control` (64 bytes, 8-aligned) holds the one message (checked above); the
    // header points to `addr`, `iov` (read only by sendmsg) and `control`, all alive for the
    // call.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<I>() as u32) as usize;
        libc::CMSG_DATA(cmsg).cast::<I>().write_unaligned(info);
        libc::sendmsg(socket, &header, 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `bytes` to `to`:`port` out of interface `ifindex`, from `source`.
pub fn send_v4(
    socket: RawFd,
    bytes: &[u8],
    (to, port): (Ipv4Addr, u16),
    ifindex: u32,
    source: Ipv4Addr,
) -> io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    let info = libc::in_pktinfo {
        ipi_ifindex: ifindex as libc::c_int,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(source).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    send_with_info(
        socket,
        bytes,
        &addr,
        (libc::IPPROTO_IP, libc::IP_PKTINFO),
        info,
    )
}

/// Sends `bytes` to the link-local `to`:`port` on interface `ifindex`.
pub fn send_v6(
    socket: RawFd,
    bytes: &[u8],
    (to, port): (Ipv6Addr, u16),
    ifindex: u32,
) -> io::Result<()> {
    // SAFETY: sockaddr_in6 is plain data; all zeroes, then filled in.
    let mut addr: libc::sockaddr_in6 = unsafe { zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    addr.sin6_addr = libc::in6_addr {
        s6_addr: to.octets(),
    };
    addr.sin6_scope_id = ifindex;
    let info = libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr { s6_addr: [0; 16] },
        ipi6_ifindex: ifindex,
    };
    send_with_info(
        socket,
        bytes,
        &addr,
        (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO),
        info,
    )
}
