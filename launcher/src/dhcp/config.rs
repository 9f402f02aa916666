//! What a DHCP server hands out: [`DhcpConfig`], the form a VM configuration gives (the JSON
//! file's `net[].dhcp`, `rvmm run --net ...,dhcp=...`, the KubeVirt mode's pod network), and
//! [`LeaseConfig`], the same checked and resolved for one client.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// KubeVirt's lease: 999 days (`infiniteLease` in pkg/network/dhcp/server), in seconds.
pub const LEASE_SECONDS: u32 = 999 * 24 * 60 * 60;

/// The longest value a DHCP option carries without being split.
const OPTION_MAX: usize = 255;

/// A NIC's DHCP server, as a VM configuration describes it (`net[].dhcp`): DHCPv4 with
/// `address`, DHCPv6 with `ipv6`, or both.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DhcpConfig {
    /// The guest's IPv4 address and prefix length (`10.0.2.2/24`): DHCPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// DHCPv6 (stateful: one address), as KubeVirt's serverv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Dhcp6Config>,
    /// The default router (option 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<Ipv4Addr>,
    /// DNS search domains (option 119).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// The domain name (option 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_name: Option<String>,
    /// The guest's host name (option 12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The interface MTU (option 26); the NIC's `mtu` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Classless static routes (option 121), in the order sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// NTP servers (option 42).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ntp_servers: Vec<Ipv4Addr>,
    /// TFTP server name (option 66).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tftp_server_name: Option<String>,
    /// Boot file name (option 67).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_file_name: Option<String>,
    /// Site-specific options 224 to 254, their values as text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private_options: Vec<PrivateOption>,
    /// The host interface to serve on; the NIC's tap when absent (a bridge when the tap is
    /// one of its ports: the host sees the guest's packets on the bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The server identifier (option 54) and source address; the interface's first IPv4
    /// address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<Ipv4Addr>,
    /// A file created once the server serves and removed when it stops (KubeVirt's
    /// `dhcp_started-<interface>`); set by the KubeVirt mode, not a file setting.
    #[serde(skip)]
    pub started_marker: Option<PathBuf>,
}

/// `net[].dhcp.ipv6`: what DHCPv6 hands out.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Dhcp6Config {
    /// The guest's IPv6 address and prefix length (`fd10:0:2::2/120`).
    pub address: String,
    /// DNS servers (option 23).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<Ipv6Addr>,
}

/// `net[].dhcp.routes[]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The destination network (`0.0.0.0/0` for the default route).
    pub destination: String,
    /// The next hop (`0.0.0.0`: on the link).
    pub gateway: Ipv4Addr,
}

/// `net[].dhcp.private_options[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrivateOption {
    /// The option code, 224 to 254.
    pub option: u8,
    /// The value, sent as its bytes.
    pub value: String,
}

/// A setting that is not valid, naming it relative to the DHCP settings (`search[1]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct DhcpConfigError {
    /// The setting.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> DhcpConfigError {
    DhcpConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A classless static route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The destination network.
    pub destination: Ipv4Net,
    /// The next hop.
    pub gateway: Ipv4Addr,
}

/// What a DHCPv6 server answers its client with, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease6Config {
    /// The address (IA_NA) and its prefix.
    pub address: Ipv6Net,
    /// Option 23.
    pub dns: Vec<Ipv6Addr>,
    /// The server's DUID (DUID-LL of the serving interface's MAC, as KubeVirt's).
    pub server_duid: Vec<u8>,
    /// Preferred and valid lifetime of the address.
    pub lifetime_seconds: u32,
}

/// Everything one server answers one client with, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The only client answered: its hardware address.
    pub mac: [u8; 6],
    /// Its address and prefix.
    pub address: Ipv4Net,
    /// The server identifier.
    pub server: Ipv4Addr,
    /// Option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 119, in order.
    pub search: Vec<String>,
    /// Option 15.
    pub domain_name: Option<String>,
    /// Option 12.
    pub hostname: Option<String>,
    /// Option 26.
    pub mtu: Option<u16>,
    /// Option 121.
    pub routes: Vec<Route>,
    /// Option 42.
    pub ntp_servers: Vec<Ipv4Addr>,
    /// Option 66.
    pub tftp_server_name: Option<String>,
    /// Option 67.
    pub boot_file_name: Option<String>,
    /// Options 224 to 254.
    pub private_options: Vec<(u8, Vec<u8>)>,
    /// Option 51.
    pub lease_seconds: u32,
}

/// An address a host can be given or pointed at: not 0.0.0.0, loopback, multicast or the
/// limited broadcast.
fn is_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast())
}

fn unicast(field: &str, ip: Ipv4Addr) -> Result<Ipv4Addr, DhcpConfigError> {
    if is_unicast(ip) {
        Ok(ip)
    } else {
        Err(invalid(field, format!("{ip} is not a unicast address")))
    }
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(field: &str, text: &str) -> Result<Ipv4Net, DhcpConfigError> {
    if !text.contains('/') {
        return Err(invalid(
            field,
            format!("'{text}' has no prefix length (like 10.0.2.2/24)"),
        ));
    }
    text.parse()
        .map_err(|_| invalid(field, format!("'{text}' is not like 10.0.2.2/24")))
}

/// The guest's address: a unicast host address of its network (not the network's or the
/// broadcast address where the prefix leaves room for them).
fn guest_address(text: &str) -> Result<Ipv4Net, DhcpConfigError> {
    let net = parse_cidr("address", text)?;
    let ip = unicast("address", net.addr())?;
    if net.prefix_len() <= 30 && (ip == net.network() || ip == net.broadcast()) {
        return Err(invalid(
            "address",
            format!(
                "{ip} is the network's or its broadcast address in {}",
                net.trunc()
            ),
        ));
    }
    Ok(net)
}

/// One DNS label of KubeVirt's search-domain pattern: `first` for labels followed by a dot
/// (`_`, digits allowed first), else the last label (a letter first).
fn is_search_label(label: &str, first: bool) -> bool {
    let bytes = label.as_bytes();
    let (Some(&head), Some(&tail)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    let inner =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (first && b == b'_');
    let head_ok = if first {
        head.is_ascii_lowercase() || head.is_ascii_digit() || head == b'_'
    } else {
        head.is_ascii_lowercase()
    };
    bytes.len() <= 63
        && head_ok
        && (bytes.len() == 1 || tail.is_ascii_lowercase() || tail.is_ascii_digit())
        && bytes.iter().all(|&b| inner(b))
}

/// KubeVirt's check of a search domain (pkg/network/dhcp/server's pattern): lower-case labels
/// of at most 63 characters, at most 253 in all, a trailing dot allowed.
pub fn is_valid_search_domain(domain: &str) -> bool {
    if domain.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let (last, rest) = labels.split_last().expect("split yields one part at least");
    rest.iter().all(|l| is_search_label(l, true))
        && (last.is_empty() || is_search_label(last, false))
}

/// The bytes `domains` take in option 119 without compression (KubeVirt's limit is 255).
pub fn search_option_len(domains: &[String]) -> usize {
    domains
        .iter()
        .map(|d| {
            let labels = d.trim_end_matches('.');
            if labels.is_empty() {
                1
            } else {
                labels.split('.').map(|l| l.len() + 1).sum::<usize>() + 1
            }
        })
        .sum()
}

/// A host or domain name: letters, digits, `-` and `_` in dot-separated labels of 1 to 63,
/// at most 253 in all.
fn check_name(field: &str, name: &str) -> Result<(), DhcpConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("'{name}' is not a DNS name")))
    }
}

fn check_text(field: &str, text: &str) -> Result<(), DhcpConfigError> {
    if text.is_empty() || text.len() > OPTION_MAX {
        return Err(invalid(field, format!("must be 1 to {OPTION_MAX} bytes")));
    }
    Ok(())
}

/// A network interface name as the kernel takes it.
pub fn check_interface_name(field: &str, name: &str) -> Result<(), DhcpConfigError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("'{name}' is not an interface name")))
    }
}

/// The guest's IPv6 address: unicast, not link-local (the guest has its own).
fn guest_address6(text: &str) -> Result<Ipv6Net, DhcpConfigError> {
    const FIELD: &str = "ipv6.address";
    if !text.contains('/') {
        return Err(invalid(
            FIELD,
            format!("'{text}' has no prefix length (like fd10:0:2::2/120)"),
        ));
    }
    let net: Ipv6Net = text
        .parse()
        .map_err(|_| invalid(FIELD, format!("'{text}' is not like fd10:0:2::2/120")))?;
    let ip = net.addr();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_unicast_link_local() {
        return Err(invalid(
            FIELD,
            format!("{ip} is not a global or unique local address"),
        ));
    }
    Ok(net)
}

/// DUID-LL (RFC 8415 11.4) of an Ethernet address.
pub fn duid_ll(mac: [u8; 6]) -> Vec<u8> {
    let mut duid = vec![0, 3, 0, 1];
    duid.extend(mac);
    duid
}

impl DhcpConfig {
    /// Checks every setting; errors name it relative to these settings (`search[1]`).
    pub fn validate(&self) -> Result<(), DhcpConfigError> {
        if self.address.is_none() && self.ipv6.is_none() {
            return Err(invalid("address", "required (or ipv6)"));
        }
        if self.address.is_some() {
            self.lease([2, 0, 0, 0, 0, 1], Ipv4Addr::new(192, 0, 2, 1), None)?;
        }
        self.lease6([2, 0, 0, 0, 0, 2]).map(drop)
    }

    /// The DHCPv6 lease, if there is one, from a server on the interface with `server_mac`.
    pub fn lease6(&self, server_mac: [u8; 6]) -> Result<Option<Lease6Config>, DhcpConfigError> {
        let Some(v6) = &self.ipv6 else {
            return Ok(None);
        };
        let address = guest_address6(&v6.address)?;
        for (i, ip) in v6.dns.iter().enumerate() {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(invalid(
                    format!("ipv6.dns[{i}]"),
                    format!("{ip} is not a unicast address"),
                ));
            }
        }
        if v6.dns.len() * 16 > usize::from(u16::MAX) {
            return Err(invalid("ipv6.dns", "too many servers"));
        }
        Ok(Some(Lease6Config {
            address,
            dns: v6.dns.clone(),
            server_duid: duid_ll(server_mac),
            lifetime_seconds: LEASE_SECONDS,
        }))
    }

    /// The DHCPv4 lease for the client `mac`, from the server `server`; `nic_mtu` is the
    /// NIC's MTU, the default of `mtu`. Without `address` there is no DHCPv4: an error.
    pub fn lease(
        &self,
        mac: [u8; 6],
        server: Ipv4Addr,
        nic_mtu: Option<u16>,
    ) -> Result<LeaseConfig, DhcpConfigError> {
        let text = self
            .address
            .as_deref()
            .ok_or_else(|| invalid("address", "required for DHCPv4"))?;
        let address = guest_address(text)?;
        let router = self.gateway.map(|g| unicast("gateway", g)).transpose()?;
        let server = unicast("server", self.server.unwrap_or(server))?;
        for (i, &ip) in self.dns.iter().enumerate() {
            unicast(&format!("dns[{i}]"), ip)?;
        }
        if self.dns.len() * 4 > OPTION_MAX {
            return Err(invalid("dns", "more servers than one option holds (63)"));
        }
        for (i, domain) in self.search.iter().enumerate() {
            if !is_valid_search_domain(domain) {
                return Err(invalid(
                    format!("search[{i}]"),
                    format!("'{domain}' is not a valid search domain"),
                ));
            }
        }
        let search_len = search_option_len(&self.search);
        if search_len > OPTION_MAX {
            return Err(invalid(
                "search",
                format!("the domains take {search_len} bytes, more than {OPTION_MAX}"),
            ));
        }
        if let Some(name) = &self.domain_name {
            check_name("domain_name", name)?;
        }
        if let Some(name) = &self.hostname {
            check_name("hostname", name)?;
        }
        let mtu = self.mtu.or(nic_mtu);
        if let Some(m) = self.mtu
            && m < 68
        {
            return Err(invalid("mtu", format!("{m} is below 68")));
        }
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let field = format!("routes[{i}].destination");
            let destination = parse_cidr(&field, &r.destination)?;
            if destination != destination.trunc() {
                return Err(invalid(
                    field,
                    format!(
                        "'{}' has host bits set (the network is {})",
                        r.destination,
                        destination.trunc()
                    ),
                ));
            }
            routes.push(Route {
                destination,
                gateway: r.gateway,
            });
        }
        let routes_len: usize = routes
            .iter()
            .map(|r| 1 + usize::from(r.destination.prefix_len()).div_ceil(8) + 4)
            .sum();
        if routes_len > OPTION_MAX {
            return Err(invalid(
                "routes",
                format!("the routes take {routes_len} bytes, more than {OPTION_MAX}"),
            ));
        }
        for (i, &ip) in self.ntp_servers.iter().enumerate() {
            unicast(&format!("ntp_servers[{i}]"), ip)?;
        }
        if let Some(name) = &self.tftp_server_name {
            check_text("tftp_server_name", name)?;
        }
        if let Some(name) = &self.boot_file_name {
            check_text("boot_file_name", name)?;
        }
        let mut private_options = Vec::with_capacity(self.private_options.len());
        for (i, p) in self.private_options.iter().enumerate() {
            if !(224..=254).contains(&p.option) {
                return Err(invalid(
                    format!("private_options[{i}].option"),
                    format!("{} is not a private option (224 to 254)", p.option),
                ));
            }
            if private_options.iter().any(|(code, _)| *code == p.option) {
                return Err(invalid(
                    format!("private_options[{i}].option"),
                    format!("{} is given twice", p.option),
                ));
            }
            check_text(&format!("private_options[{i}].value"), &p.value)?;
            private_options.push((p.option, p.value.as_bytes().to_vec()));
        }
        if let Some(name) = &self.interface {
            check_interface_name("interface", name)?;
        }
        Ok(LeaseConfig {
            mac,
            address,
            server,
            router,
            dns: self.dns.clone(),
            search: self.search.clone(),
            domain_name: self.domain_name.clone(),
            hostname: self.hostname.clone(),
            mtu,
            routes,
            ntp_servers: self.ntp_servers.clone(),
            tftp_server_name: self.tftp_server_name.clone(),
            boot_file_name: self.boot_file_name.clone(),
            private_options,
            lease_seconds: LEASE_SECONDS,
        })
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
