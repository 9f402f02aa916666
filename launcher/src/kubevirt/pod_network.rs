//! The guest side of the pod network, as KubeVirt's launcher sets it up once virt-handler has
//! built the pod side (pkg/network/setup/launcher, pkg/network/dhcp): which interfaces get a
//! DHCP server, on which link, handing out what.
//!
//! An interface gets one when virt-handler attaches it as a tap (`interfaceDomainAttachment`
//! in SyncVirtualMachine's options: every `bridge` and `masquerade` interface) and no
//! `dhcp_started-<pod interface>` marker is in `/var/run/kubevirt-private` (a server already
//! runs for it). Its pod interface is the one virt-handler reported in `status.interfaces`,
//! else `eth0`; the server listens on the bridge `k6t-<pod interface>`.
//!
//! - `masquerade`: DHCPv4 when the pod interface has a global IPv4 address: the guest gets
//!   the second address of the network's `vmNetworkCIDR` (10.0.2.0/24: 10.0.2.2), the first
//!   as router and server, and the pod interface's MTU; DHCPv6 when it has a global IPv6
//!   address: the second address of `vmIPv6NetworkCIDR` (fd10:0:2::/120: fd10:0:2::2) and the
//!   pod's IPv6 DNS servers.
//! - `bridge`: the pod's own address, MAC, gateway and routes, as virt-handler cached them in
//!   `vif-cache-<pod interface>.json`; the server is `169.254.75.1<interface index>` (the
//!   bridge's address) and the MTU that of `<pod interface>-nic`. Without the cache the sync
//!   fails; a cache with `IPAMDisabled` means no server.
//!
//! Both hand out the pod's DNS servers and search domains ([`super::pod_dns`]), the pod's host
//! name, and the interface's `dhcpOptions`. The NIC itself gets the MTU too (as KubeVirt's
//! domain does) and, for `bridge`, the cached MAC.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

use super::nocloud::decode_base64;
use super::pod_dns::{self, PodDns};
use super::vmi::{Binding, LaunchPlan, LauncherDirs, Vmi};
use super::vmi_model::Interface;
use crate::dhcp::config::{Dhcp6Config, DhcpConfig, DhcpConfigError, PrivateOption, RouteConfig};
use crate::dhcp::netif::{self, NetifError, is_global_unicast};
use crate::dhcp::server::format_mac;

/// The domain attachment virt-handler gives bridge and masquerade interfaces.
pub const TAP_ATTACHMENT: &str = "tap";
/// The pod network's interface when virt-handler names none.
pub const PRIMARY_POD_INTERFACE: &str = "eth0";
/// KubeVirt's default masquerade network.
pub const DEFAULT_VM_CIDR: &str = "10.0.2.0/24";
/// KubeVirt's default masquerade IPv6 network.
pub const DEFAULT_VM_IPV6_CIDR: &str = "fd10:0:2::/120";

/// The guest network cannot be set up as KubeVirt would.
#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    /// A pod interface cannot be read.
    #[error("Interface {iface}: cannot read the pod's network")]
    PodInterface {
        /// The VMI interface.
        iface: String,
        /// Cause.
        #[source]
        source: NetifError,
    },
    /// The pod's resolv.conf cannot be read.
    #[error("Cannot read the pod's DNS settings from {}", path.display())]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The bridge binding's cache is missing or unreadable.
    #[error(
        "Interface {iface}: cannot read {} (virt-handler caches the pod's address there for a \
         bridge interface)",
        path.display()
    )]
    BridgeCache {
        /// The VMI interface.
        iface: String,
        /// The cache file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The bridge binding's cache does not parse.
    #[error("Interface {iface}: {} is not virt-handler's DHCP cache: {message}", path.display())]
    BadBridgeCache {
        /// The VMI interface.
        iface: String,
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A VMI field cannot be used.
    #[error("{field}: {reason}")]
    Vmi {
        /// The VMI field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// What would be handed out is not valid DHCP.
    #[error("Interface {iface}: cannot serve the pod's settings by DHCP")]
    Settings {
        /// The VMI interface.
        iface: String,
        /// Cause.
        #[source]
        source: DhcpConfigError,
    },
}

/// virt-handler's `cache.DHCPConfig` for a bridge interface (`vif-cache-<iface>.json`, Go's
/// default JSON: `net.IP` as text, masks and MACs as base64, `netlink.Addr`'s address fields
/// inline). Fields rvmm does not use are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CachedDhcpConfig {
    #[serde(rename = "IP")]
    ip: CachedAddr,
    #[serde(rename = "MAC")]
    mac: Option<String>,
    #[serde(rename = "Routes")]
    routes: Option<Vec<CachedRoute>>,
    #[serde(rename = "IPAMDisabled")]
    ipam_disabled: bool,
    #[serde(rename = "Gateway")]
    gateway: Option<String>,
}

/// A `netlink.Addr` or `net.IPNet`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CachedAddr {
    #[serde(rename = "IP")]
    ip: Option<String>,
    #[serde(rename = "Mask")]
    mask: Option<String>,
}

/// A `netlink.Route`: a destination (none: the default route) and a next hop.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CachedRoute {
    #[serde(rename = "Dst")]
    dst: Option<CachedAddr>,
    #[serde(rename = "Gw")]
    gw: Option<String>,
}

/// What the setup reads of the pod's links.
pub trait PodLinks {
    /// The link's MTU.
    fn mtu(&self, name: &str) -> Result<u32, NetifError>;
    /// The link's addresses.
    fn addresses(&self, name: &str) -> Result<Vec<IpNet>, NetifError>;
}

/// The links of the launcher's network namespace.
#[derive(Debug)]
pub struct HostLinks;

impl PodLinks for HostLinks {
    fn mtu(&self, name: &str) -> Result<u32, NetifError> {
        netif::mtu(name)
    }

    fn addresses(&self, name: &str) -> Result<Vec<IpNet>, NetifError> {
        netif::addresses(name)
    }
}

/// The launcher pod's files and links the setup reads.
struct Pod<'a> {
    dirs: &'a LauncherDirs,
    links: &'a dyn PodLinks,
    dns: Option<PodDns>,
}

/// Gives each interface of `plan` that KubeVirt serves by DHCP its server (`dhcp` in its
/// `net` entry) and the MTU (and, for bridge, the MAC) the pod network gives it.
/// `attachments` is SyncVirtualMachine's `interfaceDomainAttachment`; `links` reads the pod's
/// links ([`HostLinks`]).
pub fn set_up(
    vmi: &Vmi,
    plan: &mut LaunchPlan,
    dirs: &LauncherDirs,
    links: &dyn PodLinks,
    attachments: &HashMap<String, String>,
) -> Result<(), PodNetworkError> {
    let mut pod = Pod {
        dirs,
        links,
        dns: None,
    };
    let specs = &vmi.spec.domain.devices.interfaces;
    for (i, planned) in plan.interfaces.iter_mut().enumerate() {
        let Some(binding) = planned.binding else {
            continue;
        };
        if attachments.get(&planned.name).map(String::as_str) != Some(TAP_ATTACHMENT) {
            log::info!(
                "Interface {}: not attached as a tap by virt-handler: no DHCP server",
                planned.name
            );
            continue;
        }
        let (index, spec) = specs
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == planned.name)
            .expect("planned interfaces come from the spec");
        let pod_iface = pod_interface_name(vmi, &planned.name);
        let marker = dirs.private.join(format!("dhcp_started-{pod_iface}"));
        if marker.exists() {
            log::info!(
                "Interface {}: {} exists: a DHCP server already runs for {pod_iface}",
                planned.name,
                marker.display()
            );
            continue;
        }
        let served = match binding {
            Binding::Masquerade => masquerade(vmi, spec, &pod_iface, &mut pod)?,
            Binding::Bridge => bridge(vmi, spec, index, &pod_iface, &mut pod)?,
        };
        let Some((mut dhcp, mtu, mac)) = served else {
            continue;
        };
        dhcp.interface = Some(bridge_name(&pod_iface));
        dhcp.started_marker = Some(marker);
        dhcp.validate()
            .map_err(|source| PodNetworkError::Settings {
                iface: planned.name.clone(),
                source,
            })?;
        let net = &mut plan.config.net[i];
        if let Some(mac) = mac {
            planned.mac = mac.clone();
            net.mac = Some(mac);
        }
        planned.mtu = Some(mtu);
        net.mtu = Some(mtu);
        net.dhcp = Some(dhcp);
    }
    Ok(())
}

/// The pod interface of the VMI interface `name`: virt-handler's report, else `eth0`.
fn pod_interface_name(vmi: &Vmi, name: &str) -> String {
    vmi.status
        .interfaces
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| s.pod_interface_name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| PRIMARY_POD_INTERFACE.to_owned())
}

/// KubeVirt's names for a pod interface's links: `pod<hash>` loses its prefix.
fn trimmed(pod_iface: &str) -> &str {
    pod_iface.strip_prefix("pod").unwrap_or(pod_iface)
}

/// The bridge virt-handler puts the tap in: `k6t-<pod interface>`.
pub fn bridge_name(pod_iface: &str) -> String {
    format!("k6t-{}", trimmed(pod_iface))
}

impl Pod<'_> {
    /// The pod's DNS settings, read once.
    fn dns(&mut self, vmi: &Vmi) -> Result<&PodDns, PodNetworkError> {
        if self.dns.is_none() {
            let path = self.dirs.root.join("etc/resolv.conf");
            let text = std::fs::read_to_string(&path)
                .map_err(|source| PodNetworkError::ResolvConf { path, source })?;
            let dns = pod_dns::parse_resolv_conf(&text, vmi.spec.subdomain.as_deref());
            log::info!(
                "Pod DNS: servers {:?} {:?}, search {:?}",
                dns.ipv4,
                dns.ipv6,
                dns.search
            );
            self.dns = Some(dns);
        }
        Ok(self.dns.as_ref().expect("read above"))
    }
}

/// The settings every served interface shares: DNS, host name, and the VMI's `dhcpOptions`.
fn common_settings(
    vmi: &Vmi,
    spec: &Interface,
    pod: &mut Pod<'_>,
) -> Result<DhcpConfig, PodNetworkError> {
    let dns = pod.dns(vmi)?.clone();
    let mut dhcp = DhcpConfig {
        dns: dns.ipv4,
        search: dns.search,
        domain_name: dns.domain_name,
        hostname: Some(pod_dns::hostname(vmi)),
        ..DhcpConfig::default()
    };
    let Some(options) = &spec.dhcp_options else {
        return Ok(dhcp);
    };
    let index = vmi
        .spec
        .domain
        .devices
        .interfaces
        .iter()
        .position(|s| s.name == spec.name)
        .unwrap_or_default();
    let field = format!("spec.domain.devices.interfaces[{index}].dhcpOptions");
    dhcp.boot_file_name = options.boot_file_name.clone().filter(|s| !s.is_empty());
    dhcp.tftp_server_name = options.tftp_server_name.clone().filter(|s| !s.is_empty());
    for (n, server) in options.ntp_servers.iter().enumerate() {
        let ip = server
            .parse::<Ipv4Addr>()
            .map_err(|_| PodNetworkError::Vmi {
                field: format!("{field}.ntpServers[{n}]"),
                reason: format!("could not parse NTP server as IPv4 address: {server}"),
            })?;
        dhcp.ntp_servers.push(ip);
    }
    for private in &options.private_options {
        // KubeVirt sends 224 to 254 only, the last of a code given twice.
        let Ok(option) = u8::try_from(private.option) else {
            continue;
        };
        if !(224..=254).contains(&option) {
            continue;
        }
        dhcp.private_options.retain(|p| p.option != option);
        dhcp.private_options.push(PrivateOption {
            option,
            value: private.value.clone(),
        });
    }
    Ok(dhcp)
}

/// Masquerade: `(settings, MTU, no MAC change)`: DHCPv4 when the pod interface has a global
/// IPv4 address, DHCPv6 when it has a global IPv6 one; nothing without either.
fn masquerade(
    vmi: &Vmi,
    spec: &Interface,
    pod_iface: &str,
    pod: &mut Pod<'_>,
) -> Result<Option<(DhcpConfig, u16, Option<String>)>, PodNetworkError> {
    let pod_error = |source| PodNetworkError::PodInterface {
        iface: spec.name.clone(),
        source,
    };
    let mtu = clamp_mtu(pod.links.mtu(pod_iface).map_err(pod_error)?);
    let addresses = pod.links.addresses(pod_iface).map_err(pod_error)?;
    let global = |v6: bool| {
        addresses
            .iter()
            .any(|a| matches!(a, IpNet::V6(_)) == v6 && is_global_unicast(a.addr()))
    };
    let (ipv4, ipv6) = (global(false), global(true));
    if !ipv4 && !ipv6 {
        log::info!(
            "Interface {}: {pod_iface} has no global address: no DHCP server",
            spec.name
        );
        return Ok(None);
    }
    let mut dhcp = common_settings(vmi, spec, pod)?;
    if ipv4 {
        let (IpAddr::V4(gateway), guest) = masquerade_network(vmi, spec, false)? else {
            unreachable!("an IPv4 network has IPv4 addresses");
        };
        dhcp.address = Some(guest.to_string());
        dhcp.gateway = Some(gateway);
        dhcp.server = Some(gateway);
        dhcp.mtu = Some(mtu);
    }
    if ipv6 {
        let (_, guest) = masquerade_network(vmi, spec, true)?;
        dhcp.ipv6 = Some(Dhcp6Config {
            address: guest.to_string(),
            dns: pod.dns(vmi)?.ipv6.clone(),
        });
    }
    Ok(Some((dhcp, mtu, None)))
}

/// The masquerade network's (`vmNetworkCIDR`, or `vmIPv6NetworkCIDR` for `v6`) first address
/// (the router and server) and second (the guest's), as KubeVirt picks them.
fn masquerade_network(
    vmi: &Vmi,
    spec: &Interface,
    v6: bool,
) -> Result<(IpAddr, IpNet), PodNetworkError> {
    let (n, network) = vmi
        .spec
        .networks
        .iter()
        .enumerate()
        .find(|(_, n)| n.name == spec.name)
        .expect("planned interfaces have a network");
    let pod = network.pod.as_ref();
    let (field, given, default, example) = if v6 {
        let given = pod.and_then(|p| p.vm_ipv6_network_cidr.clone());
        (
            "vmIPv6NetworkCIDR",
            given,
            DEFAULT_VM_IPV6_CIDR,
            "fd10:0:2::/120",
        )
    } else {
        let given = pod.and_then(|p| p.vm_network_cidr.clone());
        ("vmNetworkCIDR", given, DEFAULT_VM_CIDR, "10.0.2.0/24")
    };
    let cidr = given
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| default.to_owned());
    let invalid = |reason: String| PodNetworkError::Vmi {
        field: format!("spec.networks[{n}].pod.{field}"),
        reason,
    };
    let family = if v6 { "IPv6" } else { "IPv4" };
    let net = cidr
        .parse::<IpNet>()
        .ok()
        .filter(|net| matches!(net, IpNet::V6(_)) == v6)
        .ok_or_else(|| {
            invalid(format!(
                "'{cidr}' is not an {family} network like {example}"
            ))
        })?;
    if net.max_prefix_len() - net.prefix_len() < 2 {
        return Err(invalid(format!("{cidr} has less than 4 addresses")));
    }
    let nth = |n: u8| -> IpAddr {
        match net.network() {
            IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + u32::from(n)).into(),
            IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) + u128::from(n)).into(),
        }
    };
    let guest = IpNet::new(nth(2), net.prefix_len()).expect("the network's prefix");
    Ok((nth(1), guest))
}

/// Bridge: `(settings, MTU, the cached MAC)`, or nothing when virt-handler disabled IPAM.
fn bridge(
    vmi: &Vmi,
    spec: &Interface,
    index: usize,
    pod_iface: &str,
    pod: &mut Pod<'_>,
) -> Result<Option<(DhcpConfig, u16, Option<String>)>, PodNetworkError> {
    let path = pod.dirs.private.join(format!("vif-cache-{pod_iface}.json"));
    let cache = read_bridge_cache(&spec.name, &path)?;
    if cache.ipam_disabled {
        log::info!(
            "Interface {}: the pod has no IPv4 address to hand over: no DHCP server",
            spec.name
        );
        return Ok(None);
    }
    let bad = |message: String| PodNetworkError::BadBridgeCache {
        iface: spec.name.clone(),
        path: path.clone(),
        message,
    };
    let address = cached_net(&cache.ip).map_err(|m| bad(format!("IP: {m}")))?;
    let mac = match cache.mac.as_deref() {
        Some(encoded) => {
            let bytes = decode_base64(encoded).ok_or_else(|| bad("MAC: not base64".into()))?;
            let mac: [u8; 6] = bytes
                .try_into()
                .map_err(|_| bad("MAC: not six bytes".into()))?;
            Some(format_mac(&mac))
        }
        None => None,
    };
    let gateway =
        optional_ip(cache.gateway.as_deref()).map_err(|m| bad(format!("Gateway: {m}")))?;
    let mut routes = Vec::new();
    for (n, route) in cache.routes.unwrap_or_default().iter().enumerate() {
        let destination = match &route.dst {
            Some(dst) => cached_net(dst).map_err(|m| bad(format!("Routes[{n}].Dst: {m}")))?,
            None => Ipv4Net::default(),
        };
        let gw = optional_ip(route.gw.as_deref())
            .map_err(|m| bad(format!("Routes[{n}].Gw: {m}")))?
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        routes.push(RouteConfig {
            destination: destination.trunc().to_string(),
            gateway: gw,
        });
    }
    // The default route last: its gateway must be reachable by the routes before it.
    routes.sort_by_key(|r| r.destination == "0.0.0.0/0");
    let nic = format!("{}-nic", trimmed(pod_iface));
    let mtu = clamp_mtu(
        pod.links
            .mtu(&nic)
            .map_err(|source| PodNetworkError::PodInterface {
                iface: spec.name.clone(),
                source,
            })?,
    );
    let mut dhcp = common_settings(vmi, spec, pod)?;
    dhcp.address = Some(address.to_string());
    dhcp.gateway = gateway;
    dhcp.routes = routes;
    // KubeVirt's fake bridge address, "169.254.75.1" and the interface's index.
    let server = format!("169.254.75.1{index}");
    dhcp.server = Some(server.parse().map_err(|_| PodNetworkError::Vmi {
        field: format!("spec.domain.devices.interfaces[{index}]"),
        reason: format!("a bridge interface this far down has no address ({server})"),
    })?);
    dhcp.mtu = Some(mtu);
    Ok(Some((dhcp, mtu, mac)))
}

fn read_bridge_cache(iface: &str, path: &Path) -> Result<CachedDhcpConfig, PodNetworkError> {
    let text = std::fs::read(path).map_err(|source| PodNetworkError::BridgeCache {
        iface: iface.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| PodNetworkError::BadBridgeCache {
        iface: iface.to_owned(),
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// `"10.1.2.3"`, `""` or absent (none).
fn optional_ip(text: Option<&str>) -> Result<Option<Ipv4Addr>, String> {
    match text.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => t
            .parse()
            .map(Some)
            .map_err(|_| format!("'{t}' is not an IPv4 address")),
    }
}

/// An address with its base64 mask (4 bytes, or 16 for an IPv4-mapped one).
fn cached_net(addr: &CachedAddr) -> Result<Ipv4Net, String> {
    let ip = optional_ip(addr.ip.as_deref())?.ok_or("no address")?;
    let mask = addr
        .mask
        .as_deref()
        .and_then(decode_base64)
        .ok_or("no base64 mask")?;
    let ones: u32 = mask.iter().map(|b| b.count_ones()).sum();
    let prefix = match mask.len() {
        4 => ones,
        16 => ones.saturating_sub(96),
        n => return Err(format!("a {n}-byte mask")),
    };
    Ipv4Net::new(ip, prefix as u8).map_err(|e| e.to_string())
}

/// DHCP carries a 16-bit MTU (KubeVirt truncates; a pod MTU never needs it).
fn clamp_mtu(mtu: u32) -> u16 {
    u16::try_from(mtu).unwrap_or(u16::MAX)
}

#[cfg(test)]
#[path = "pod_network_tests.rs"]
mod tests;
