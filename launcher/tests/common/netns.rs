//! A private network namespace with a tap device for rvmm to use, removed on drop. The tap's
//! host side has an address, so the host kernel answers the guest's ARP and ping.

use std::process::Command;

/// The guest's address in the test network.
pub const GUEST_IP: &str = "10.200.0.2";
/// The tap's (host side's) address.
pub const HOST_IP: &str = "10.200.0.1";

/// A namespace holding `tap0`, up, with `HOST_IP/24`.
pub struct TestNetwork {
    pub name: String,
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TestNetwork {
    /// Creates the namespace and tap, or says why it cannot (not root, no iproute2, no tun).
    pub fn create(tag: &str) -> Result<Self, String> {
        let net = Self {
            name: format!("rvmm-{tag}-{}", std::process::id()),
        };
        ip(&["netns", "add", &net.name])?;
        let ns = net.name.as_str();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            "tap0",
        ])?;
        ip(&["-n", ns, "link", "set", "tap0", "up"])?;
        Ok(net)
    }

    /// `command` run inside the namespace (through `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        netns_command(&self.name, program)
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        // Deleting the namespace removes the tap with it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// `program` run in namespace `ns` (through `ip netns exec`).
pub fn netns_command(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

/// The test network, or None with a printed reason (a failure under CI=true).
pub fn test_network(test: &str) -> Option<TestNetwork> {
    network_or_skip(test, TestNetwork::create(test))
}

/// A test network that was created, or None with a printed reason why not (a failure under
/// CI=true).
pub fn network_or_skip<T>(test: &str, created: Result<T, String>) -> Option<T> {
    match created {
        Ok(net) => Some(net),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: cannot create the test network: {e}; CI=true requires it")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: cannot create the test network: {e}");
            None
        }
    }
}
