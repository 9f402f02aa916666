use std::collections::HashMap;
use std::net::Ipv6Addr;

use serde_json::{Value, json};

use super::*;
use crate::kubevirt::grpc::tests::TempDir;
use crate::kubevirt::vmi::plan;

/// Links the tests make up: name to (MTU, addresses).
#[derive(Default)]
struct FakeLinks(HashMap<&'static str, (u32, Vec<&'static str>)>);

impl PodLinks for FakeLinks {
    fn mtu(&self, name: &str) -> Result<u32, NetifError> {
        self.0
            .get(name)
            .map(|(mtu, _)| *mtu)
            .ok_or_else(|| NetifError::Missing(name.to_owned()))
    }

    fn addresses(&self, name: &str) -> Result<Vec<IpNet>, NetifError> {
        self.0
            .get(name)
            .map(|(_, a)| a.iter().map(|a| a.parse().unwrap()).collect())
            .ok_or_else(|| NetifError::Missing(name.to_owned()))
    }
}

/// The masquerade pod after virt-handler's setup: eth0 with a global IPv4 address.
fn masquerade_links() -> FakeLinks {
    FakeLinks(HashMap::from([(
        "eth0",
        (1450, vec!["10.244.1.5/24", "fe80::1/64"]),
    )]))
}

/// The bridge pod: the pod's NIC renamed eth0-nic (in the bridge), a dummy eth0.
fn bridge_links() -> FakeLinks {
    FakeLinks(HashMap::from([
        ("eth0-nic", (1400, vec![])),
        ("eth0", (1400, vec!["10.244.1.5/24"])),
    ]))
}

const RESOLV_CONF: &str = "search default.svc.cluster.local svc.cluster.local cluster.local\n\
                           nameserver 10.96.0.10\noptions ndots:5\n";

/// A launcher pod's directories with a kernel and the pod's resolv.conf.
struct PodDir {
    dir: TempDir,
    dirs: LauncherDirs,
}

impl PodDir {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(&format!("podnet-{tag}"));
        let dirs = LauncherDirs::under(&dir.0);
        let kernel = dirs.container_disks.join("kernel-boot/vmlinux");
        std::fs::create_dir_all(kernel.parent().unwrap()).unwrap();
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::create_dir_all(&dirs.private).unwrap();
        std::fs::create_dir_all(dir.0.join("etc")).unwrap();
        std::fs::write(dir.0.join("etc/resolv.conf"), RESOLV_CONF).unwrap();
        Self { dir, dirs }
    }

    fn write_private(&self, name: &str, text: &str) {
        std::fs::write(self.dirs.private.join(name), text).unwrap();
    }
}

/// A VMI named `testvm` with one `binding` interface `default` on the pod network.
fn vmi(binding: &str, extra_iface: Value) -> Vmi {
    let mut iface = json!({"name": "default", binding: {}});
    if let (Some(obj), Some(extra)) = (iface.as_object_mut(), extra_iface.as_object()) {
        obj.extend(extra.clone());
    }
    Vmi::from_json(
        json!({
            "metadata": {"name": "testvm", "namespace": "default", "uid": "u-1"},
            "spec": {
                "subdomain": "mysub",
                "domain": {
                    "devices": {"autoattachSerialConsole": false, "interfaces": [iface]},
                    "firmware": {"kernelBoot": {"container": {"kernelPath": "/vmlinux"}}},
                    "memory": {"guest": "64Mi"}
                },
                "networks": [{"name": "default", "pod": {}}]
            }
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

fn tap_attachment() -> HashMap<String, String> {
    HashMap::from([("default".to_string(), "tap".to_string())])
}

/// Sets up `vmi`'s pod network in `pod`; the planned NIC's config entry.
fn set_up_net(
    vmi: &Vmi,
    pod: &PodDir,
    links: &FakeLinks,
    attachments: &HashMap<String, String>,
) -> Result<(LaunchPlan, crate::config::NetConfig), PodNetworkError> {
    let mut plan = plan(vmi, &pod.dirs).unwrap();
    set_up(vmi, &mut plan, &pod.dirs, links, attachments)?;
    let net = plan.config.net[0].clone();
    Ok((plan, net))
}

const SEARCH: [&str; 4] = [
    "mysub.default.svc.cluster.local",
    "default.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
];

/// What every served interface of [`vmi`] gets from the pod: DNS, search domains with the
/// subdomain, host name, the bridge, the marker.
fn pod_settings(pod: &PodDir) -> DhcpConfig {
    DhcpConfig {
        dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
        search: SEARCH.map(String::from).to_vec(),
        domain_name: Some("mysub.default.svc.cluster.local".into()),
        hostname: Some("testvm".into()),
        interface: Some("k6t-eth0".into()),
        started_marker: Some(pod.dirs.private.join("dhcp_started-eth0")),
        ..DhcpConfig::default()
    }
}

#[test]
fn masquerade_serves_the_second_address_of_the_vm_network_on_the_bridge() {
    let pod = PodDir::new("masq");
    let (plan, net) = set_up_net(
        &vmi("masquerade", json!({})),
        &pod,
        &masquerade_links(),
        &tap_attachment(),
    )
    .unwrap();
    let dhcp = net.dhcp.expect("a DHCP server");
    assert_eq!(
        dhcp,
        DhcpConfig {
            address: Some("10.0.2.2/24".into()),
            gateway: Some(Ipv4Addr::new(10, 0, 2, 1)),
            mtu: Some(1450),
            server: Some(Ipv4Addr::new(10, 0, 2, 1)),
            ..pod_settings(&pod)
        }
    );
    assert_eq!(net.mtu, Some(1450), "the NIC gets the pod's MTU too");
    assert_eq!(plan.interfaces[0].mtu, Some(1450));
    assert_eq!(net.mac.as_deref(), Some(plan.interfaces[0].mac.as_str()));
}

#[test]
fn masquerade_uses_the_networks_vm_cidr() {
    let pod = PodDir::new("cidr");
    let mut v = vmi("masquerade", json!({}));
    v.spec.networks[0].pod.as_mut().unwrap().vm_network_cidr = Some("10.11.12.16/28".into());
    let (_, net) = set_up_net(&v, &pod, &masquerade_links(), &tap_attachment()).unwrap();
    let dhcp = net.dhcp.unwrap();
    assert_eq!(
        (dhcp.address.as_deref(), dhcp.gateway, dhcp.server),
        (
            Some("10.11.12.18/28"),
            Some(Ipv4Addr::new(10, 11, 12, 17)),
            Some(Ipv4Addr::new(10, 11, 12, 17))
        )
    );
    for (cidr, reason) in [
        ("10.11.12.0/31", "10.11.12.0/31 has less than 4 addresses"),
        (
            "fd10::/64",
            "'fd10::/64' is not an IPv4 network like 10.0.2.0/24",
        ),
        (
            "10.0.2.0",
            "'10.0.2.0' is not an IPv4 network like 10.0.2.0/24",
        ),
    ] {
        v.spec.networks[0].pod.as_mut().unwrap().vm_network_cidr = Some(cidr.into());
        let err = set_up_net(&v, &pod, &masquerade_links(), &tap_attachment()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("spec.networks[0].pod.vmNetworkCIDR: {reason}")
        );
    }
}

#[test]
fn no_server_without_a_global_pod_address_a_tap_attachment_a_binding_or_with_a_marker() {
    let pod = PodDir::new("none");
    let masq = vmi("masquerade", json!({}));
    let link_local = FakeLinks(HashMap::from([(
        "eth0",
        (1450, vec!["169.254.1.5/16", "fe80::5/64"]),
    )]));
    let (_, net) = set_up_net(&masq, &pod, &link_local, &tap_attachment()).unwrap();
    assert_eq!((net.dhcp, net.mtu), (None, None), "no global address");
    let (_, net) = set_up_net(&masq, &pod, &masquerade_links(), &HashMap::new()).unwrap();
    assert!(net.dhcp.is_none(), "no interfaceDomainAttachment");
    let other = HashMap::from([("default".to_string(), "managedTap".to_string())]);
    let (_, net) = set_up_net(&masq, &pod, &masquerade_links(), &other).unwrap();
    assert!(net.dhcp.is_none(), "not a tap");
    let mut unbound = masq.clone();
    unbound.spec.domain.devices.interfaces[0].masquerade = None;
    let (_, net) = set_up_net(&unbound, &pod, &masquerade_links(), &tap_attachment()).unwrap();
    assert!(net.dhcp.is_none(), "no binding");
    pod.write_private("dhcp_started-eth0", "");
    let (_, net) = set_up_net(&masq, &pod, &masquerade_links(), &tap_attachment()).unwrap();
    assert!(net.dhcp.is_none(), "a server already runs");
}

#[test]
fn the_pod_interface_virt_handler_reported_names_the_bridge_and_the_marker() {
    let pod = PodDir::new("hashed");
    let mut v = vmi("masquerade", json!({}));
    v.status.interfaces = vec![crate::kubevirt::vmi::InterfaceStatus {
        name: "default".into(),
        pod_interface_name: Some("pod1a2b3c4d5e6".into()),
    }];
    let links = FakeLinks(HashMap::from([(
        "pod1a2b3c4d5e6",
        (9000, vec!["10.1.0.4/16"]),
    )]));
    let (_, net) = set_up_net(&v, &pod, &links, &tap_attachment()).unwrap();
    let dhcp = net.dhcp.unwrap();
    assert_eq!(dhcp.interface.as_deref(), Some("k6t-1a2b3c4d5e6"));
    assert_eq!(
        dhcp.started_marker,
        Some(pod.dirs.private.join("dhcp_started-pod1a2b3c4d5e6"))
    );
    assert_eq!(dhcp.mtu, Some(9000));
}

#[test]
fn a_missing_pod_interface_or_resolv_conf_fails_the_sync() {
    let pod = PodDir::new("missing");
    let err = set_up_net(
        &vmi("masquerade", json!({})),
        &pod,
        &FakeLinks::default(),
        &tap_attachment(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Interface default: cannot read the pod's network"
    );
    std::fs::remove_file(pod.dir.0.join("etc/resolv.conf")).unwrap();
    let err = set_up_net(
        &vmi("masquerade", json!({})),
        &pod,
        &masquerade_links(),
        &tap_attachment(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Cannot read the pod's DNS settings from "),
        "{err}"
    );
}

#[test]
fn dhcp_options_are_handed_out_as_kubevirt_does() {
    let pod = PodDir::new("options");
    let options = json!({"dhcpOptions": {
        "bootFileName": "pxelinux.0",
        "tftpServerName": "tftp.example.com",
        "ntpServers": ["10.0.0.123", "10.0.0.124"],
        "privateOptions": [
            {"option": 240, "value": "first"},
            {"option": 200, "value": "not private: dropped"},
            {"option": 240, "value": "second"},
            {"option": 254, "value": "last"}
        ]
    }});
    let (_, net) = set_up_net(
        &vmi("masquerade", options),
        &pod,
        &masquerade_links(),
        &tap_attachment(),
    )
    .unwrap();
    let dhcp = net.dhcp.unwrap();
    assert_eq!(dhcp.boot_file_name.as_deref(), Some("pxelinux.0"));
    assert_eq!(dhcp.tftp_server_name.as_deref(), Some("tftp.example.com"));
    assert_eq!(
        dhcp.ntp_servers,
        [Ipv4Addr::new(10, 0, 0, 123), Ipv4Addr::new(10, 0, 0, 124)]
    );
    let private: Vec<(u8, &str)> = dhcp
        .private_options
        .iter()
        .map(|p| (p.option, p.value.as_str()))
        .collect();
    assert_eq!(private, [(240, "second"), (254, "last")]);
    let bad = json!({"dhcpOptions": {"ntpServers": ["ntp.example.com"]}});
    let err = set_up_net(
        &vmi("masquerade", bad),
        &pod,
        &masquerade_links(),
        &tap_attachment(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.domain.devices.interfaces[0].dhcpOptions.ntpServers[0]: could not parse NTP \
         server as IPv4 address: ntp.example.com"
    );
}

#[test]
fn spec_hostname_is_handed_out_and_invalid_search_domains_fail_the_sync() {
    let pod = PodDir::new("names");
    let mut v = vmi("masquerade", json!({}));
    v.spec.hostname = Some("myhost".into());
    let (_, net) = set_up_net(&v, &pod, &masquerade_links(), &tap_attachment()).unwrap();
    assert_eq!(net.dhcp.unwrap().hostname.as_deref(), Some("myhost"));
    std::fs::write(pod.dir.0.join("etc/resolv.conf"), "search bad_domain_\n").unwrap();
    let err = set_up_net(&v, &pod, &masquerade_links(), &tap_attachment()).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert_eq!(
        chain,
        "Interface default: cannot serve the pod's settings by DHCP: search[0]: 'bad_domain_' \
         is not a valid search domain"
    );
}

/// virt-handler's cache for a bridge interface, as Go's encoding/json writes it.
fn bridge_cache(routes: Value) -> String {
    json!({
        "Name": "",
        "IP": {"IP": "10.244.1.5", "Mask": "////AA==", "Label": "", "Flags": 0, "Scope": 0,
               "Peer": null, "Broadcast": "", "PreferedLft": 0, "ValidLft": 0, "LinkIndex": 0},
        "IPv6": {"Label": "", "Flags": 0, "Scope": 0, "Peer": null, "Broadcast": "",
                 "PreferedLft": 0, "ValidLft": 0, "LinkIndex": 0},
        "MAC": "ClgK9AEF",
        "AdvertisingIPAddr": "",
        "AdvertisingIPv6Addr": "",
        "Routes": routes,
        "Mtu": 0,
        "IPAMDisabled": false,
        "Gateway": "10.244.1.1",
        "Subdomain": ""
    })
    .to_string()
}

fn go_route(dst: Value, gw: &str) -> Value {
    json!({"LinkIndex": 0, "ILinkIndex": 0, "Scope": 0, "Dst": dst, "Src": "", "Gw": gw,
           "MultiPath": null, "Protocol": 0, "Priority": 0, "Family": 0, "Table": 0,
           "Type": 0, "Tos": 0, "Flags": 0, "MPLSDst": null, "NewDst": null, "Encap": null,
           "Via": null, "Realm": 0, "MTU": 0, "Window": 0, "Rtt": 0})
}

#[test]
fn bridge_hands_over_the_cached_pod_address_mac_gateway_and_routes() {
    let pod = PodDir::new("bridge");
    let routes = json!([
        go_route(Value::Null, "10.244.1.1"),
        go_route(
            json!({"IP": "10.96.0.0", "Mask": "//8AAA=="}),
            "10.244.1.254"
        ),
    ]);
    pod.write_private("vif-cache-eth0.json", &bridge_cache(routes));
    let (plan, net) = set_up_net(
        &vmi("bridge", json!({})),
        &pod,
        &bridge_links(),
        &tap_attachment(),
    )
    .unwrap();
    let dhcp = net.dhcp.unwrap();
    assert_eq!(
        dhcp,
        DhcpConfig {
            address: Some("10.244.1.5/24".into()),
            gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
            mtu: Some(1400),
            routes: vec![
                RouteConfig {
                    destination: "10.96.0.0/16".into(),
                    gateway: Ipv4Addr::new(10, 244, 1, 254)
                },
                RouteConfig {
                    destination: "0.0.0.0/0".into(),
                    gateway: Ipv4Addr::new(10, 244, 1, 1)
                },
            ],
            server: Some(Ipv4Addr::new(169, 254, 75, 10)),
            ..pod_settings(&pod)
        }
    );
    // The guest takes over the pod's MAC, in the VM and in the domain.
    assert_eq!(net.mac.as_deref(), Some("0a:58:0a:f4:01:05"));
    assert_eq!(plan.interfaces[0].mac, "0a:58:0a:f4:01:05");
    assert_eq!(net.mtu, Some(1400));
    // No routes cached: the router only.
    pod.write_private("vif-cache-eth0.json", &bridge_cache(Value::Null));
    let (_, net) = set_up_net(
        &vmi("bridge", json!({})),
        &pod,
        &bridge_links(),
        &tap_attachment(),
    )
    .unwrap();
    assert!(net.dhcp.unwrap().routes.is_empty());
}

#[test]
fn bridge_without_its_cache_fails_the_sync_and_without_ipam_serves_nothing() {
    let pod = PodDir::new("nocache");
    let err = set_up_net(
        &vmi("bridge", json!({})),
        &pod,
        &bridge_links(),
        &tap_attachment(),
    )
    .unwrap_err();
    let path = pod.dirs.private.join("vif-cache-eth0.json");
    assert_eq!(
        err.to_string(),
        format!(
            "Interface default: cannot read {} (virt-handler caches the pod's address there for \
             a bridge interface)",
            path.display()
        )
    );
    pod.write_private("vif-cache-eth0.json", r#"{"IPAMDisabled": true, "IP": {}}"#);
    let (_, net) = set_up_net(
        &vmi("bridge", json!({})),
        &pod,
        &bridge_links(),
        &tap_attachment(),
    )
    .unwrap();
    assert_eq!((net.dhcp, net.mtu), (None, None));
    for (text, message) in [
        ("not json", "expected ident"),
        (r#"{"IP": {"IP": "10.1.1.1"}}"#, "IP: no base64 mask"),
        (
            r#"{"IP": {"IP": "x", "Mask": "////AA=="}}"#,
            "IP: 'x' is not an IPv4 address",
        ),
        (
            r#"{"IP": {"IP": "10.1.1.1", "Mask": "////AA=="}, "MAC": "AAAA"}"#,
            "MAC: not six bytes",
        ),
    ] {
        pod.write_private("vif-cache-eth0.json", text);
        let err = set_up_net(
            &vmi("bridge", json!({})),
            &pod,
            &bridge_links(),
            &tap_attachment(),
        )
        .unwrap_err();
        assert!(err.to_string().contains(message), "{text}: {err}");
    }
}

#[test]
fn go_masks_of_sixteen_bytes_count_from_the_ipv4_part() {
    let addr = CachedAddr {
        ip: Some("10.1.2.3".into()),
        mask: Some("////////////////////AA==".into()),
    };
    assert_eq!(cached_net(&addr).unwrap(), "10.1.2.3/24".parse().unwrap());
}

#[test]
fn masquerade_with_pod_ipv6_adds_dhcpv6_of_the_vm_ipv6_network() {
    let pod = PodDir::new("ipv6");
    std::fs::write(
        pod.dir.0.join("etc/resolv.conf"),
        format!("{RESOLV_CONF}nameserver fd00:10:96::a\n"),
    )
    .unwrap();
    let dual = FakeLinks(HashMap::from([(
        "eth0",
        (1450, vec!["10.244.1.5/24", "fd00:10:244:1::5/64"]),
    )]));
    let v = vmi("masquerade", json!({}));
    let (_, net) = set_up_net(&v, &pod, &dual, &tap_attachment()).unwrap();
    let dhcp = net.dhcp.unwrap();
    assert_eq!(dhcp.address.as_deref(), Some("10.0.2.2/24"));
    let v6 = dhcp.ipv6.expect("DHCPv6");
    assert_eq!(v6.address, "fd10:0:2::2/120");
    assert_eq!(v6.dns, ["fd00:10:96::a".parse::<Ipv6Addr>().unwrap()]);
    // An IPv6-only pod: DHCPv6 alone, as KubeVirt.
    let v6_only = FakeLinks(HashMap::from([(
        "eth0",
        (1450, vec!["fd00:10:244:1::5/64"]),
    )]));
    let mut custom = v.clone();
    custom.spec.networks[0]
        .pod
        .as_mut()
        .unwrap()
        .vm_ipv6_network_cidr = Some("fd20:1::/64".into());
    let (_, net) = set_up_net(&custom, &pod, &v6_only, &tap_attachment()).unwrap();
    let dhcp = net.dhcp.unwrap();
    assert_eq!((dhcp.address, dhcp.gateway), (None, None));
    assert_eq!(dhcp.ipv6.unwrap().address, "fd20:1::2/64");
    custom.spec.networks[0]
        .pod
        .as_mut()
        .unwrap()
        .vm_ipv6_network_cidr = Some("10.0.0.0/8".into());
    let err = set_up_net(&custom, &pod, &v6_only, &tap_attachment()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.networks[0].pod.vmIPv6NetworkCIDR: '10.0.0.0/8' is not an IPv6 network like \
         fd10:0:2::/120"
    );
}
