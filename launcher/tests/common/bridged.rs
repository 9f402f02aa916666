//! A launcher pod's network as virt-handler leaves it for a bridged NIC: in a namespace of the
//! test's own, a bridge with `tap0` (for rvmm's NIC) and one end of a veth pair whose other end
//! is in a second namespace. Both namespaces are removed on drop.
//!
//! - [`BridgedNetwork::masquerade_pod`]: the masquerade layout. The pod NIC `eth0` (the veth,
//!   10.244.1.5/24, MTU 1450, default route via the "node" end 10.244.1.1) and the bridge
//!   `k6t-eth0` (10.0.2.1/24, MTU 1450) with `tap0`.
//! - [`BridgedNetwork::bridge_pod`]: the bridge binding's layout. The pod's NIC, renamed
//!   `eth0-nic` (MTU 1400), is a port of `k6t-eth0` (169.254.75.10/32) with `tap0` (the dummy
//!   `eth0` virt-handler leaves with the pod's address is left out: nothing reads it). The
//!   veth's other end (`eth0`, with the pod's MAC) stands in for the guest: a DHCP client runs
//!   there.
//! - [`BridgedNetwork::with_client`]: a bridge `br0` (10.0.2.1/24) with `tap0` and the veth, whose
//!   other end `eth0` (with a MAC the test picks) stands in for the guest: a DHCP client runs
//!   there.

use std::path::Path;
use std::process::{Command, Stdio};

use super::netns::{ip, netns_command};

/// The two namespaces.
pub struct BridgedNetwork {
    /// Holds the bridge and `tap0`: rvmm runs here.
    pub pod: String,
    /// The veth's other end.
    pub peer: String,
}

/// Runs `ip` in namespace `ns`.
fn ip_in(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

impl BridgedNetwork {
    fn namespaces(tag: &str) -> Result<Self, String> {
        let id = std::process::id();
        let net = Self {
            pod: format!("rvmm-{tag}-{id}"),
            peer: format!("rvmm-{tag}p-{id}"),
        };
        ip(&["netns", "add", &net.pod])?;
        ip(&["netns", "add", &net.peer])?;
        for ns in [&net.pod, &net.peer] {
            ip_in(ns, &["link", "set", "lo", "up"])?;
            // Link-local addresses usable at once (DHCPv6 is sent from them), without
            // duplicate address detection's second of waiting.
            let dad = netns_command(ns, "sh")
                .args(["-c", "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad"])
                .status()
                .map_err(|e| format!("sh: {e}"))?;
            if !dad.success() {
                return Err(format!("{ns}: cannot turn off duplicate address detection"));
            }
        }
        Ok(net)
    }

    /// `bridge` with `address`, MTU `mtu`, and `tap0` in it.
    fn bridge_with_tap(&self, bridge: &str, address: &str, mtu: &str) -> Result<(), String> {
        let ns = self.pod.as_str();
        ip_in(ns, &["link", "add", bridge, "type", "bridge"])?;
        ip_in(ns, &["link", "set", bridge, "mtu", mtu])?;
        ip_in(ns, &["addr", "add", address, "dev", bridge])?;
        ip_in(
            ns,
            &["tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"],
        )?;
        ip_in(
            ns,
            &["link", "set", "tap0", "mtu", mtu, "master", bridge, "up"],
        )?;
        ip_in(ns, &["link", "set", bridge, "up"])
    }

    /// The masquerade layout (see the module).
    pub fn masquerade_pod(tag: &str) -> Result<Self, String> {
        let net = Self::namespaces(tag)?;
        let (pod, node) = (net.pod.as_str(), net.peer.as_str());
        ip_in(
            pod,
            &[
                "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "node0",
                "netns", node,
            ],
        )?;
        ip_in(pod, &["addr", "add", "10.244.1.5/24", "dev", "eth0"])?;
        ip_in(pod, &["link", "set", "eth0", "up"])?;
        ip_in(pod, &["route", "add", "default", "via", "10.244.1.1"])?;
        ip_in(node, &["link", "set", "node0", "mtu", "1450", "up"])?;
        ip_in(node, &["addr", "add", "10.244.1.1/24", "dev", "node0"])?;
        net.bridge_with_tap("k6t-eth0", "10.0.2.1/24", "1450")?;
        Ok(net)
    }

    /// The bridge binding's layout (see the module): the client's `eth0` has `mac`.
    pub fn bridge_pod(tag: &str, mac: &str) -> Result<Self, String> {
        let net = Self::namespaces(tag)?;
        net.bridge_with_tap("k6t-eth0", "169.254.75.10/32", "1400")?;
        let (pod, client) = (net.pod.as_str(), net.peer.as_str());
        ip_in(
            pod,
            &[
                "link", "add", "eth0-nic", "mtu", "1400", "type", "veth", "peer", "name", "eth0",
                "netns", client,
            ],
        )?;
        ip_in(
            pod,
            &["link", "set", "eth0-nic", "master", "k6t-eth0", "up"],
        )?;
        ip_in(
            client,
            &["link", "set", "eth0", "address", mac, "mtu", "1400", "up"],
        )?;
        Ok(net)
    }

    /// The client layout (see the module): the client's `eth0` has `mac`.
    pub fn with_client(tag: &str, mac: &str) -> Result<Self, String> {
        let net = Self::namespaces(tag)?;
        net.bridge_with_tap("br0", "10.0.2.1/24", "1500")?;
        let (pod, client) = (net.pod.as_str(), net.peer.as_str());
        ip_in(
            pod,
            &[
                "link", "add", "cli0", "type", "veth", "peer", "name", "eth0", "netns", client,
            ],
        )?;
        ip_in(pod, &["link", "set", "cli0", "master", "br0", "up"])?;
        ip_in(client, &["link", "set", "eth0", "address", mac, "up"])?;
        Ok(net)
    }

    /// `program` run in the pod namespace.
    pub fn command(&self, program: &str) -> Command {
        netns_command(&self.pod, program)
    }

    /// `program` run in the other namespace.
    pub fn peer_command(&self, program: &str) -> Command {
        netns_command(&self.peer, program)
    }
}

impl Drop for BridgedNetwork {
    fn drop(&mut self) {
        // Deleting a namespace removes its devices; the veth pair goes with either end.
        let _ = ip(&["netns", "del", &self.pod]);
        let _ = ip(&["netns", "del", &self.peer]);
    }
}

/// udhcpc's script: one line per event with the fields the server sent; on `bound` and
/// `renew` it also configures the address, as a distribution's script would.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
echo "$1 ip=$ip mask=$mask router=$router dns=$dns search=$search domain=$domain hostname=$hostname mtu=$mtu lease=$lease serverid=$serverid${staticroutes:+ staticroutes=$staticroutes}" >> "$(dirname "$0")/events.log"
case $1 in
bound|renew) ip addr replace "$ip/$mask" dev "$interface" ;;
deconfig) ip addr flush dev "$interface" ;;
esac
"#;

/// busybox udhcpc on the client's `eth0` with `script`, asking for the search domains and MTU.
pub fn udhcpc(net: &BridgedNetwork, script: &Path, extra: &[&str]) -> Command {
    let mut cmd = net.peer_command("busybox");
    cmd.args(["udhcpc", "-f", "-i", "eth0", "-s", script.to_str().unwrap()])
        .args(["-O", "search", "-O", "mtu"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}
