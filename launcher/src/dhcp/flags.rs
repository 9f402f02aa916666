//! `rvmm run --net tap=NAME,...,dhcp=ADDR/PREFIX[,...]`: a NIC's DHCP server on the command
//! line, the common part of a VM file's `net[].dhcp`.
//!
//! | key | meaning |
//! | --- | --- |
//! | `dhcp=ADDR/PREFIX` | serve the guest this address (required for the keys below) |
//! | `gateway=IP` | its default router |
//! | `dns=IP[:IP...]` | its DNS servers |
//! | `search=DOMAIN[:DOMAIN...]` | its DNS search domains |
//! | `hostname=NAME` | its host name |
//! | `dhcp-interface=NAME` | serve on this host interface (the bridge the tap is in) rather than the tap |
//! | `dhcp-server=IP` | the server's address; default the interface's first IPv4 address |
//!
//! The MTU is the NIC's `mtu=`; the lease lasts KubeVirt's 999 days.

use std::net::Ipv4Addr;

use super::DhcpConfig;
use crate::keyvalue::KeyValues;

/// The keys that describe the DHCP server; all but `dhcp` need `dhcp`.
pub const DHCP_KEYS: &[&str] = &[
    "dhcp",
    "gateway",
    "dns",
    "search",
    "hostname",
    "dhcp-interface",
    "dhcp-server",
];

/// The key a [`DhcpConfig`] setting is given with.
fn key_of(setting: &str) -> &str {
    match setting {
        "address" => "dhcp",
        "interface" => "dhcp-interface",
        "server" => "dhcp-server",
        other => other.split('[').next().unwrap_or(other),
    }
}

/// The DHCP server a `--net` entry's keys describe, if any; the error says what is wrong,
/// naming the key.
pub fn dhcp_from_net_keys(kv: &KeyValues<'_>) -> Result<Option<DhcpConfig>, String> {
    let Some(address) = kv.get("dhcp") else {
        return match DHCP_KEYS.iter().find(|k| kv.get(k).is_some()) {
            Some(key) => Err(format!("{key} needs dhcp=ADDR/PREFIX")),
            None => Ok(None),
        };
    };
    let ip = |key: &str, text: &str| {
        text.parse::<Ipv4Addr>()
            .map_err(|_| format!("{key}={text}: not an IPv4 address"))
    };
    let list = |key: &str| -> Vec<&str> {
        kv.get(key)
            .map(|v| v.split(':').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    };
    let config = DhcpConfig {
        address: Some(address.to_string()),
        gateway: kv.get("gateway").map(|g| ip("gateway", g)).transpose()?,
        dns: list("dns")
            .into_iter()
            .map(|d| ip("dns", d))
            .collect::<Result<_, _>>()?,
        search: list("search").into_iter().map(str::to_string).collect(),
        hostname: kv.get("hostname").map(str::to_string),
        interface: kv.get("dhcp-interface").map(str::to_string),
        server: kv
            .get("dhcp-server")
            .map(|s| ip("dhcp-server", s))
            .transpose()?,
        ..DhcpConfig::default()
    };
    config
        .validate()
        .map_err(|e| format!("{}: {}", key_of(&e.field), e.reason))?;
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entry: &str) -> Result<Option<DhcpConfig>, String> {
        dhcp_from_net_keys(&KeyValues::parse(entry, &[&["tap"], DHCP_KEYS].concat()).unwrap())
    }

    #[test]
    fn every_key_reaches_the_settings() {
        let config = parse(
            "tap=tap0,dhcp=10.0.2.2/24,gateway=10.0.2.1,dns=10.0.2.1:1.1.1.1,\
             search=example.com:corp.example.com,hostname=vm1,dhcp-interface=br0,\
             dhcp-server=10.0.2.1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            config,
            DhcpConfig {
                address: Some("10.0.2.2/24".into()),
                gateway: Some(Ipv4Addr::new(10, 0, 2, 1)),
                dns: vec![Ipv4Addr::new(10, 0, 2, 1), Ipv4Addr::new(1, 1, 1, 1)],
                search: vec!["example.com".into(), "corp.example.com".into()],
                hostname: Some("vm1".into()),
                interface: Some("br0".into()),
                server: Some(Ipv4Addr::new(10, 0, 2, 1)),
                ..DhcpConfig::default()
            }
        );
        assert_eq!(parse("tap=tap0").unwrap(), None);
        let minimal = parse("tap=tap0,dhcp=192.168.5.7/16").unwrap().unwrap();
        assert_eq!(minimal.address.as_deref(), Some("192.168.5.7/16"));
        assert!(minimal.dns.is_empty() && minimal.gateway.is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (entry, expected) in [
            (
                "tap=tap0,gateway=10.0.2.1",
                "gateway needs dhcp=ADDR/PREFIX",
            ),
            ("tap=tap0,dns=1.1.1.1", "dns needs dhcp=ADDR/PREFIX"),
            (
                "dhcp=10.0.2.2",
                "dhcp: '10.0.2.2' has no prefix length (like 10.0.2.2/24)",
            ),
            (
                "dhcp=10.0.2.0/24",
                "dhcp: 10.0.2.0 is the network's or its broadcast address",
            ),
            (
                "dhcp=10.0.2.2/24,gateway=gw",
                "gateway=gw: not an IPv4 address",
            ),
            (
                "dhcp=10.0.2.2/24,dns=1.1.1.1:x",
                "dns=x: not an IPv4 address",
            ),
            (
                "dhcp=10.0.2.2/24,dns=0.0.0.0",
                "dns: 0.0.0.0 is not a unicast address",
            ),
            (
                "dhcp=10.0.2.2/24,search=Ex.com",
                "search: 'Ex.com' is not a valid search domain",
            ),
            (
                "dhcp=10.0.2.2/24,hostname=a b",
                "hostname: 'a b' is not a DNS name",
            ),
            (
                "dhcp=10.0.2.2/24,dhcp-interface=a/b",
                "dhcp-interface: 'a/b' is not an interface name",
            ),
            (
                "dhcp=10.0.2.2/24,dhcp-server=224.0.0.1",
                "dhcp-server: 224.0.0.1 is not a unicast",
            ),
            (
                "dhcp=10.0.2.2/24,dhcp-server=x",
                "dhcp-server=x: not an IPv4 address",
            ),
        ] {
            let err = parse(entry).unwrap_err();
            assert!(err.starts_with(expected), "{entry}: {err}");
        }
    }
}
