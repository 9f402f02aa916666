//! `rvmm run --net tap=NAME,...,dhcp=ADDR/PREFIX[,...]`: a NIC's DHCP server on the command
//! line, translated into the common part of a VM file's `net[].dhcp`.
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

use super::{DhcpConfig, DhcpConfigError};
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

/// The DHCP server a `--net` entry's keys describe, if any, in the configuration model (the
/// one validator checks it, [`DhcpConfig::validate`]); an error names the setting
/// (`gateway`, `dns[1]`) whose text is no value of its type.
pub fn dhcp_from_net_keys(kv: &KeyValues<'_>) -> Result<Option<DhcpConfig>, DhcpConfigError> {
    let Some(address) = kv.get("dhcp") else {
        return match DHCP_KEYS.iter().find(|k| kv.get(k).is_some()) {
            Some(key) => Err(error(setting_of(key), "needs dhcp=ADDR/PREFIX")),
            None => Ok(None),
        };
    };
    let ip = |setting: String, text: &str| {
        text.parse::<Ipv4Addr>()
            .map_err(|_| error(setting, format!("'{text}' is not an IPv4 address")))
    };
    let list = |key: &str| -> Vec<&str> {
        kv.get(key)
            .map(|v| v.split(':').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    };
    Ok(Some(DhcpConfig {
        address: Some(address.to_string()),
        gateway: kv
            .get("gateway")
            .map(|g| ip("gateway".into(), g))
            .transpose()?,
        dns: list("dns")
            .into_iter()
            .enumerate()
            .map(|(i, d)| ip(format!("dns[{i}]"), d))
            .collect::<Result<_, _>>()?,
        search: list("search").into_iter().map(str::to_string).collect(),
        hostname: kv.get("hostname").map(str::to_string),
        interface: kv.get("dhcp-interface").map(str::to_string),
        server: kv
            .get("dhcp-server")
            .map(|s| ip("server".into(), s))
            .transpose()?,
        ..DhcpConfig::default()
    }))
}

/// The [`DhcpConfig`] setting a key gives.
fn setting_of(key: &str) -> String {
    match key {
        "dhcp" => "address",
        "dhcp-interface" => "interface",
        "dhcp-server" => "server",
        other => other,
    }
    .into()
}

fn error(setting: impl Into<String>, reason: impl Into<String>) -> DhcpConfigError {
    DhcpConfigError {
        field: setting.into(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entry: &str) -> Result<Option<DhcpConfig>, DhcpConfigError> {
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

    /// Only the syntax: the values are the validator's (`crate::config`).
    #[test]
    fn text_that_is_no_value_names_its_setting() {
        for (entry, expected) in [
            (
                "tap=tap0,gateway=10.0.2.1",
                "gateway: needs dhcp=ADDR/PREFIX",
            ),
            (
                "tap=tap0,dhcp-server=10.0.2.1",
                "server: needs dhcp=ADDR/PREFIX",
            ),
            (
                "dhcp=10.0.2.2/24,gateway=gw",
                "gateway: 'gw' is not an IPv4 address",
            ),
            (
                "dhcp=10.0.2.2/24,dns=1.1.1.1:x",
                "dns[1]: 'x' is not an IPv4 address",
            ),
            (
                "dhcp=10.0.2.2/24,dhcp-server=x",
                "server: 'x' is not an IPv4 address",
            ),
        ] {
            assert_eq!(parse(entry).unwrap_err().to_string(), expected, "{entry}");
        }
        // Values of the right type pass; the validator judges them.
        assert!(parse("dhcp=10.0.2.0/24,dns=0.0.0.0").unwrap().is_some());
    }
}
