use super::*;

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);

fn minimal() -> DhcpConfig {
    DhcpConfig {
        address: Some("10.0.2.2/24".into()),
        ..DhcpConfig::default()
    }
}

fn error(config: &DhcpConfig) -> String {
    config.validate().unwrap_err().to_string()
}

#[test]
fn every_setting_reaches_the_lease() {
    let json = r#"{
        "address": "10.0.2.2/24", "gateway": "10.0.2.1", "dns": ["10.96.0.10", "10.96.0.11"],
        "search": ["ns.svc.cluster.local", "cluster.local"], "domain_name": "ns.svc.cluster.local",
        "hostname": "vm1", "mtu": 1450,
        "routes": [{"destination": "10.10.0.0/16", "gateway": "10.0.2.254"},
                   {"destination": "0.0.0.0/0", "gateway": "10.0.2.1"}],
        "ntp_servers": ["10.0.0.123"], "tftp_server_name": "tftp.example.com",
        "boot_file_name": "pxelinux.0", "private_options": [{"option": 250, "value": "x=1"}],
        "interface": "k6t-eth0", "server": "10.0.2.1"
    }"#;
    let config: DhcpConfig = serde_json::from_str(json).unwrap();
    let lease = config
        .lease(MAC, Ipv4Addr::new(192, 0, 2, 9), Some(9000))
        .unwrap();
    assert_eq!(lease.mac, MAC);
    assert_eq!(lease.address, "10.0.2.2/24".parse::<Ipv4Net>().unwrap());
    assert_eq!(
        lease.server, SERVER,
        "the configured server wins over the interface's"
    );
    assert_eq!(lease.router, Some(SERVER));
    assert_eq!(
        lease.dns,
        [Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(10, 96, 0, 11)]
    );
    assert_eq!(lease.search, ["ns.svc.cluster.local", "cluster.local"]);
    assert_eq!(lease.domain_name.as_deref(), Some("ns.svc.cluster.local"));
    assert_eq!(lease.hostname.as_deref(), Some("vm1"));
    assert_eq!(lease.mtu, Some(1450), "the DHCP MTU wins over the NIC's");
    assert_eq!(
        lease.routes,
        [
            Route {
                destination: "10.10.0.0/16".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 0, 2, 254)
            },
            Route {
                destination: "0.0.0.0/0".parse().unwrap(),
                gateway: SERVER
            },
        ]
    );
    assert_eq!(lease.ntp_servers, [Ipv4Addr::new(10, 0, 0, 123)]);
    assert_eq!(lease.tftp_server_name.as_deref(), Some("tftp.example.com"));
    assert_eq!(lease.boot_file_name.as_deref(), Some("pxelinux.0"));
    assert_eq!(lease.private_options, [(250, b"x=1".to_vec())]);
    assert_eq!(lease.lease_seconds, 86_313_600);
    // Serialised back, the file form is unchanged (vm.info shows it).
    let back: DhcpConfig = serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
    assert_eq!(back, config);
}

#[test]
fn defaults_come_from_the_interface_and_the_nic() {
    let lease = minimal().lease(MAC, SERVER, Some(1400)).unwrap();
    assert_eq!((lease.server, lease.mtu), (SERVER, Some(1400)));
    assert_eq!(lease.router, None);
    assert!(lease.dns.is_empty() && lease.search.is_empty() && lease.routes.is_empty());
    assert_eq!(minimal().lease(MAC, SERVER, None).unwrap().mtu, None);
}

#[test]
fn bad_addresses_name_their_setting() {
    let cases: &[(&str, &str)] = &[
        ("10.0.2.2", "address: '10.0.2.2' has no prefix length"),
        (
            "10.0.2.300/24",
            "address: '10.0.2.300/24' is not like 10.0.2.2/24",
        ),
        ("10.0.2.2/33", "address: '10.0.2.2/33' is not like"),
        (
            "10.0.2.0/24",
            "is the network's or its broadcast address in 10.0.2.0/24",
        ),
        ("10.0.2.255/24", "is the network's or its broadcast address"),
        ("224.0.0.5/24", "224.0.0.5 is not a unicast address"),
        ("0.0.0.0/8", "is not a unicast address"),
    ];
    for (address, expected) in cases {
        let config = DhcpConfig {
            address: Some((*address).into()),
            ..DhcpConfig::default()
        };
        let err = error(&config);
        assert!(err.contains(expected), "{address}: {err}");
    }
    // A /32 (Calico's pod addresses) and a /31 have no network or broadcast address to avoid.
    for address in ["10.1.2.3/32", "10.1.2.2/31"] {
        let config = DhcpConfig {
            address: Some(address.into()),
            ..DhcpConfig::default()
        };
        config.validate().unwrap();
    }
}

#[test]
fn bad_servers_gateways_and_lists_name_the_entry() {
    let mut c = minimal();
    c.gateway = Some(Ipv4Addr::BROADCAST);
    assert_eq!(
        error(&c),
        "gateway: 255.255.255.255 is not a unicast address"
    );
    let mut c = minimal();
    c.server = Some(Ipv4Addr::LOCALHOST);
    assert_eq!(error(&c), "server: 127.0.0.1 is not a unicast address");
    let mut c = minimal();
    c.dns = vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::UNSPECIFIED];
    assert_eq!(error(&c), "dns[1]: 0.0.0.0 is not a unicast address");
    let mut c = minimal();
    c.dns = vec![Ipv4Addr::new(10, 0, 0, 1); 64];
    assert!(error(&c).starts_with("dns: more servers"));
    let mut c = minimal();
    c.ntp_servers = vec![Ipv4Addr::new(239, 1, 1, 1)];
    assert_eq!(
        error(&c),
        "ntp_servers[0]: 239.1.1.1 is not a unicast address"
    );
}

#[test]
fn search_domains_follow_kubevirts_pattern_and_limit() {
    for good in [
        "cluster.local",
        "ns.svc.cluster.local",
        "_tcp.example.com",
        "1a.example.com",
        "example.com.",
        "a",
        "",
    ] {
        assert!(is_valid_search_domain(good), "{good}");
    }
    for bad in [
        "Example.com",
        "example..com",
        "-a.example.com",
        "a-.example.com",
        "example.1com",
        "example.com_",
        "exa mple.com",
        "ex\u{e4}mple.com",
        &format!("{}.com", "a".repeat(64)),
        &format!("{}com", "abcdefgh.".repeat(29)),
    ] {
        assert!(!is_valid_search_domain(bad), "{bad}");
    }
    let mut c = minimal();
    c.search = vec!["ok.example".into(), "Bad.Example".into()];
    assert_eq!(
        error(&c),
        "search[1]: 'Bad.Example' is not a valid search domain"
    );
    // KubeVirt counts the uncompressed option: 255 bytes at most.
    let label = "a".repeat(60);
    c.search = (0..3).map(|i| format!("{label}.d{i}")).collect();
    c.search.push("b".repeat(58));
    assert_eq!(search_option_len(&c.search), 3 * (61 + 3 + 1) + 60);
    c.validate().unwrap();
    c.search.push("x".into());
    assert_eq!(
        error(&c),
        "search: the domains take 258 bytes, more than 255"
    );
}

#[test]
fn names_texts_mtu_and_interface_are_checked() {
    let mut c = minimal();
    c.hostname = Some("bad host".into());
    assert_eq!(error(&c), "hostname: 'bad host' is not a DNS name");
    let mut c = minimal();
    c.domain_name = Some("a..b".into());
    assert_eq!(error(&c), "domain_name: 'a..b' is not a DNS name");
    let mut c = minimal();
    c.mtu = Some(67);
    assert_eq!(error(&c), "mtu: 67 is below 68");
    let mut c = minimal();
    c.tftp_server_name = Some(String::new());
    assert_eq!(error(&c), "tftp_server_name: must be 1 to 255 bytes");
    let mut c = minimal();
    c.boot_file_name = Some("x".repeat(256));
    assert_eq!(error(&c), "boot_file_name: must be 1 to 255 bytes");
    for bad in ["", "a/b", "sixteen-chars-xx", "a b", ".."] {
        let mut c = minimal();
        c.interface = Some(bad.into());
        assert!(error(&c).starts_with("interface: "), "{bad:?}");
    }
}

#[test]
fn routes_need_a_network_and_fit_one_option() {
    let mut c = minimal();
    c.routes = vec![RouteConfig {
        destination: "10.1.2.3/16".into(),
        gateway: SERVER,
    }];
    assert_eq!(
        error(&c),
        "routes[0].destination: '10.1.2.3/16' has host bits set (the network is 10.1.0.0/16)"
    );
    c.routes[0].destination = "10.1.0.0".into();
    assert!(error(&c).starts_with("routes[0].destination: '10.1.0.0' has no prefix length"));
    c.routes = vec![
        RouteConfig {
            destination: "10.0.0.0/32".into(),
            gateway: SERVER,
        };
        29
    ];
    assert_eq!(
        error(&c),
        "routes: the routes take 261 bytes, more than 255"
    );
}

#[test]
fn private_options_are_224_to_254_once_each() {
    let option = |option: u8| PrivateOption {
        option,
        value: "v".into(),
    };
    let mut c = minimal();
    c.private_options = vec![option(223)];
    assert_eq!(
        error(&c),
        "private_options[0].option: 223 is not a private option (224 to 254)"
    );
    c.private_options = vec![option(255)];
    assert!(error(&c).contains("255 is not a private option"));
    c.private_options = vec![option(224), option(224)];
    assert_eq!(error(&c), "private_options[1].option: 224 is given twice");
    c.private_options = vec![PrivateOption {
        option: 254,
        value: String::new(),
    }];
    assert_eq!(
        error(&c),
        "private_options[0].value: must be 1 to 255 bytes"
    );
}

#[test]
fn unknown_fields_are_refused() {
    let err = serde_json::from_str::<DhcpConfig>(r#"{"address": "10.0.2.2/24", "lease": 5}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `lease`"), "{err}");
}

#[test]
fn ipv6_settings_make_a_dhcpv6_lease_alone_or_with_ipv4() {
    let v6 = |address: &str| DhcpConfig {
        ipv6: Some(Dhcp6Config {
            address: address.into(),
            dns: vec!["fd00::10".parse().unwrap()],
        }),
        ..DhcpConfig::default()
    };
    let lease = v6("fd10:0:2::2/120")
        .lease6([2, 0, 0, 0, 0, 9])
        .unwrap()
        .unwrap();
    assert_eq!(lease.address, "fd10:0:2::2/120".parse::<Ipv6Net>().unwrap());
    assert_eq!(lease.dns, ["fd00::10".parse::<Ipv6Addr>().unwrap()]);
    assert_eq!(lease.server_duid, [0, 3, 0, 1, 2, 0, 0, 0, 0, 9]);
    assert_eq!(lease.lifetime_seconds, LEASE_SECONDS);
    v6("2001:db8::5/64").validate().unwrap();
    assert!(minimal().lease6([2, 0, 0, 0, 0, 9]).unwrap().is_none());
    let mut both = v6("fd10:0:2::2/120");
    both.address = Some("10.0.2.2/24".into());
    both.validate().unwrap();
    for (address, reason) in [
        ("fd10:0:2::2", "has no prefix length"),
        ("fd10::2/129", "is not like fd10:0:2::2/120"),
        ("10.0.2.2/24", "is not like fd10:0:2::2/120"),
        (
            "fe80::2/64",
            "fe80::2 is not a global or unique local address",
        ),
        ("ff02::1/64", "is not a global or unique local address"),
        ("::/0", "is not a global or unique local address"),
    ] {
        let err = error(&v6(address));
        assert!(
            err.starts_with("ipv6.address: ") && err.contains(reason),
            "{address}: {err}"
        );
    }
    let mut bad_dns = v6("fd10:0:2::2/120");
    bad_dns
        .ipv6
        .as_mut()
        .unwrap()
        .dns
        .push("ff02::1".parse().unwrap());
    assert_eq!(
        error(&bad_dns),
        "ipv6.dns[1]: ff02::1 is not a unicast address"
    );
    let none = DhcpConfig::default();
    assert_eq!(error(&none), "address: required (or ipv6)");
    assert_eq!(
        none.lease(MAC, SERVER, None).unwrap_err().to_string(),
        "address: required for DHCPv4"
    );
}
