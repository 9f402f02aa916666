//! The DNS settings KubeVirt's launcher gives a guest by DHCP: the pod's `/etc/resolv.conf`
//! read as pkg/network/dns does, the VMI's `subdomain` added, and the host name the pod has.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::vmi::Vmi;

/// KubeVirt's nameserver when the pod's resolv.conf has none.
const DEFAULT_DNS: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
/// KubeVirt's search domain when the pod's resolv.conf has none.
const DEFAULT_SEARCH: &str = "cluster.local";
/// Kubernetes' limit on a DNS-1123 label, which the pod's host name is.
const LABEL_MAX: usize = 63;

/// What the guest's resolver gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodDns {
    /// IPv4 name servers (option 6).
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 name servers (DHCPv6 option 23).
    pub ipv6: Vec<Ipv6Addr>,
    /// Search domains (option 119), the subdomain's first.
    pub search: Vec<String>,
    /// The domain name (option 15): the longest search domain.
    pub domain_name: Option<String>,
}

/// Parses resolv.conf as KubeVirt does: `nameserver` lines with exactly one address, `search`
/// lines' domains in lower case; 8.8.8.8 without any name server, `cluster.local` without
/// any search domain. Then, with a `subdomain`, `<subdomain>.<the longest service domain>`
/// goes first (pod resolv.conf files lack it, see kubernetes/kubernetes#48019).
pub fn parse_resolv_conf(text: &str, subdomain: Option<&str>) -> PodDns {
    let mut dns = PodDns::default();
    for line in text.lines() {
        if line.starts_with("nameserver") {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() != 2 {
                log::warn!(
                    "Invalid resolv.conf format: nameserver line should have only one value per \
                     line '{line}'"
                );
                continue;
            }
            match fields[1].parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => dns.ipv4.push(ip),
                Ok(IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                    Some(v4) => dns.ipv4.push(v4),
                    None => dns.ipv6.push(ip),
                },
                Err(_) => {}
            }
        } else if let Some(rest) = line.strip_prefix("search") {
            dns.search
                .extend(rest.split_whitespace().map(str::to_ascii_lowercase));
        }
    }
    if dns.ipv4.is_empty() && dns.ipv6.is_empty() {
        dns.ipv4.push(DEFAULT_DNS);
    }
    if dns.search.is_empty() {
        dns.search.push(DEFAULT_SEARCH.into());
    }
    if let Some(domain) = subdomain_domain(&dns.search, subdomain.unwrap_or_default()) {
        dns.search.insert(0, domain);
    }
    dns.domain_name = longest(&dns.search).map(str::to_owned);
    dns
}

/// The longest of `domains` (the first of equals), as KubeVirt's `GetDomainName`.
fn longest(domains: &[String]) -> Option<&str> {
    domains
        .iter()
        .filter(|d| !d.is_empty())
        .fold(None, |best: Option<&String>, d| match best {
            Some(b) if b.len() >= d.len() => Some(b),
            _ => Some(d),
        })
        .map(String::as_str)
}

/// `<subdomain>.<longest service domain>` unless the subdomain is empty, no search domain is
/// a service's (`.svc.`), or the longest already starts with the subdomain.
fn subdomain_domain(search: &[String], subdomain: &str) -> Option<String> {
    if subdomain.is_empty() {
        return None;
    }
    let services: Vec<String> = search
        .iter()
        .filter(|d| d.contains(".svc."))
        .cloned()
        .collect();
    let domain = longest(&services)?;
    (!domain.starts_with(&format!("{subdomain}."))).then(|| format!("{subdomain}.{domain}"))
}

/// The pod's host name, which virt-controller sets and KubeVirt's DHCP server sends:
/// `spec.hostname`, else the VMI name up to its first dot, at most 63 characters.
pub fn hostname(vmi: &Vmi) -> String {
    if let Some(name) = vmi.spec.hostname.as_deref().filter(|h| !h.is_empty()) {
        return name.to_owned();
    }
    let name = vmi.metadata.name.split('.').next().unwrap_or_default();
    name.chars().take(LABEL_MAX).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD_RESOLV_CONF: &str = "search default.svc.cluster.local svc.cluster.local \
        cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n";

    #[test]
    fn a_pod_resolv_conf_gives_servers_search_domains_and_the_longest_as_domain() {
        let dns = parse_resolv_conf(POD_RESOLV_CONF, None);
        assert_eq!(dns.ipv4, [Ipv4Addr::new(10, 96, 0, 10)]);
        assert!(dns.ipv6.is_empty());
        assert_eq!(
            dns.search,
            [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(
            dns.domain_name.as_deref(),
            Some("default.svc.cluster.local")
        );
    }

    #[test]
    fn the_subdomain_goes_first_under_the_longest_service_domain() {
        let dns = parse_resolv_conf(POD_RESOLV_CONF, Some("mysub"));
        assert_eq!(
            dns.search,
            [
                "mysub.default.svc.cluster.local",
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(
            dns.domain_name.as_deref(),
            Some("mysub.default.svc.cluster.local")
        );
        // Already there, no service domain, or no subdomain: nothing added.
        let text = "search mysub.default.svc.cluster.local default.svc.cluster.local\n";
        assert_eq!(parse_resolv_conf(text, Some("mysub")).search.len(), 2);
        let text = "search example.com\n";
        assert_eq!(
            parse_resolv_conf(text, Some("mysub")).search,
            ["example.com"]
        );
        assert_eq!(parse_resolv_conf(POD_RESOLV_CONF, Some("")).search.len(), 3);
    }

    #[test]
    fn lines_are_read_as_kubevirt_reads_them() {
        let text = "nameserver 10.0.0.1\n\
                    nameserver fd00::10\n\
                    nameserver ::ffff:10.0.0.2\n\
                    nameserver 10.0.0.3 10.0.0.4\n\
                    nameserver not-an-ip\n\
                    \x20nameserver 10.0.0.5\n\
                    # nameserver 10.0.0.6\n\
                    search Example.COM\n\
                    search second.example\n";
        let dns = parse_resolv_conf(text, None);
        assert_eq!(
            dns.ipv4,
            [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
        assert_eq!(dns.ipv6, ["fd00::10".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(dns.search, ["example.com", "second.example"]);
        assert_eq!(dns.domain_name.as_deref(), Some("second.example"));
    }

    #[test]
    fn an_empty_resolv_conf_gets_kubevirts_defaults() {
        let dns = parse_resolv_conf("", None);
        assert_eq!(dns.ipv4, [Ipv4Addr::new(8, 8, 8, 8)]);
        assert_eq!(dns.search, ["cluster.local"]);
        assert_eq!(dns.domain_name.as_deref(), Some("cluster.local"));
        // An IPv6 server alone is a server: no IPv4 default then.
        let dns = parse_resolv_conf("nameserver fd00::10\n", None);
        assert!(dns.ipv4.is_empty());
    }

    #[test]
    fn hostname_is_spec_hostname_or_the_name_before_its_first_dot() {
        let mut vmi = Vmi::default();
        vmi.metadata.name = "web.prod".into();
        assert_eq!(hostname(&vmi), "web");
        vmi.metadata.name = "x".repeat(70);
        assert_eq!(hostname(&vmi), "x".repeat(63));
        vmi.spec.hostname = Some("myhost".into());
        assert_eq!(hostname(&vmi), "myhost");
    }
}
