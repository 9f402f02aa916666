//! What the DHCP server and the KubeVirt mode read of a host network interface in the
//! launcher's network namespace: its index, MTU, MAC and addresses. Read through the kernel
//! (ioctls on a datagram socket, getifaddrs), not /sys, which shows the namespace of whoever
//! mounted it.

use std::ffi::{CStr, CString};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why an interface cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    /// No such interface in this network namespace.
    #[error("No interface {0}")]
    Missing(String),
    /// The kernel refused to say.
    #[error("Cannot read interface {name}")]
    Read {
        /// The interface.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn c_name(name: &str) -> Result<CString, NetifError> {
    CString::new(name).map_err(|_| NetifError::Missing(name.to_owned()))
}

fn read_error(name: &str, source: io::Error) -> NetifError {
    if source.raw_os_error() == Some(libc::ENODEV) {
        NetifError::Missing(name.to_owned())
    } else {
        NetifError::Read {
            name: name.to_owned(),
            source,
        }
    }
}

/// The interface's index.
pub fn index(name: &str) -> Result<u32, NetifError> {
    let c = c_name(name)?;
    // SAFETY: `c` is a valid NUL-terminated string; the call only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(read_error(name, io::Error::last_os_error())),
        index => Ok(index),
    }
}

/// An `ifreq` naming `name`, for the `SIOCGIF*` ioctls.
fn ifreq(name: &str) -> Result<libc::ifreq, NetifError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(NetifError::Missing(name.to_owned()));
    }
    // SAFETY: ifreq is plain data (a name and a union of plain data); all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(request)
}

/// Runs the `SIOCGIF*` ioctl `op` for `name` on a throwaway datagram socket.
fn ioctl(name: &str, op: libc::c_ulong) -> Result<libc::ifreq, NetifError> {
    let mut request = ifreq(name)?;
    // SAFETY: creates a socket from constant arguments; no memory is passed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(read_error(name, io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `op` is a SIOCGIF* request, which reads the name from and writes its answer
    // into the ifreq `request` points to, and nothing else.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), op, &mut request) };
    if rc < 0 {
        return Err(read_error(name, io::Error::last_os_error()));
    }
    Ok(request)
}

/// The interface's MTU (loopback's is 65536).
pub fn mtu(name: &str) -> Result<u32, NetifError> {
    let answer = ioctl(name, libc::SIOCGIFMTU)?;
    // SAFETY: SIOCGIFMTU answers in ifru_mtu.
    let mtu = unsafe { answer.ifr_ifru.ifru_mtu };
    Ok(mtu.unsigned_abs())
}

/// The interface's hardware address (Ethernet).
pub fn mac(name: &str) -> Result<[u8; 6], NetifError> {
    let answer = ioctl(name, libc::SIOCGIFHWADDR)?;
    // SAFETY: SIOCGIFHWADDR answers in ifru_hwaddr, whose sa_data starts with the address.
    let data = unsafe { answer.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data) {
        *dst = src as u8;
    }
    Ok(mac)
}

fn prefix_len(mask: &[u8]) -> u8 {
    mask.iter().map(|b| b.count_ones() as u8).sum()
}

/// Every IPv4 and IPv6 address of the interface, with its prefix length, in the kernel's order.
pub fn addresses(name: &str) -> Result<Vec<IpNet>, NetifError> {
    index(name)?;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out pointer; on success it is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(read_error(name, io::Error::last_os_error()));
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let e = unsafe { &*entry };
        entry = e.ifa_next;
        if e.ifa_addr.is_null() || e.ifa_netmask.is_null() || e.ifa_name.is_null() {
            continue;
        }
        // SAFETY: getifaddrs gives NUL-terminated names.
        if unsafe { CStr::from_ptr(e.ifa_name) }.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type; so does
        // ifa_netmask, of the same family.
        let net = unsafe {
            match i32::from((*e.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let addr = &*e.ifa_addr.cast::<libc::sockaddr_in>();
                    let mask = &*e.ifa_netmask.cast::<libc::sockaddr_in>();
                    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
                    let len = prefix_len(&mask.sin_addr.s_addr.to_ne_bytes());
                    Ipv4Net::new(ip, len).ok().map(IpNet::V4)
                }
                libc::AF_INET6 => {
                    let addr = &*e.ifa_addr.cast::<libc::sockaddr_in6>();
                    let mask = &*e.ifa_netmask.cast::<libc::sockaddr_in6>();
                    let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
                    let len = prefix_len(&mask.sin6_addr.s6_addr);
                    Ipv6Net::new(ip, len).ok().map(IpNet::V6)
                }
                _ => None,
            }
        };
        found.extend(net);
    }
    // SAFETY: `list` came from getifaddrs and is freed once; nothing points into it now.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// Go's `net.IP.IsGlobalUnicast`, which KubeVirt asks of a pod interface's addresses: not
/// unspecified, loopback, multicast, link-local or the limited broadcast.
pub fn is_global_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_link_local()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_read_through_the_kernel() {
        assert_eq!(index("lo").unwrap(), 1);
        assert_eq!(mac("lo").unwrap(), [0; 6]);
        assert!(mtu("lo").unwrap() >= 1500);
        let addrs = addresses("lo").unwrap();
        assert!(addrs.contains(&"127.0.0.1/8".parse().unwrap()), "{addrs:?}");
    }

    #[test]
    fn missing_interfaces_are_named() {
        for name in ["rvmm-no-such", "", "a-name-far-too-long"] {
            let err = mtu(name).unwrap_err();
            assert!(matches!(err, NetifError::Missing(_)), "{name}: {err}");
        }
        assert_eq!(
            index("rvmm-no-such").unwrap_err().to_string(),
            "No interface rvmm-no-such"
        );
        assert!(addresses("rvmm-no-such").is_err());
    }

    #[test]
    fn global_unicast_is_gos() {
        for (ip, global) in [
            ("10.244.1.5", true),
            ("192.168.1.1", true),
            ("169.254.75.10", false),
            ("127.0.0.1", false),
            ("0.0.0.0", false),
            ("224.0.0.1", false),
            ("255.255.255.255", false),
            ("fd10:0:2::2", true),
            ("2001:db8::1", true),
            ("fe80::1", false),
            ("::1", false),
            ("ff02::1", false),
        ] {
            assert_eq!(is_global_unicast(ip.parse().unwrap()), global, "{ip}");
        }
    }
}
