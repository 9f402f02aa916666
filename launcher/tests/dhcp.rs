//! rvmm's DHCP server against real clients, busybox's `udhcpc` (DHCPv4) and ISC `dhclient -6`
//! (DHCPv6), in network namespaces of the test's own: `rvmm run` (seccomp on) serves a NIC
//! whose tap is in a bridge; the client runs behind a veth in the same bridge with the NIC's
//! MAC, as the guest would. No Linux boot: the tiny `ticker` guest keeps the VM running while
//! the client binds, renews and releases.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::bridged::{BridgedNetwork, UDHCPC_SCRIPT, udhcpc};
use common::netns::network_or_skip;
use common::{kvm_available, tiny_guest};

const MAC: &str = "52:54:00:12:34:56";

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rvmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills the child when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "{what} within {timeout:?}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first line of `text` that contains `needle`.
fn first_line(text: &str, needle: &str) -> String {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in:\n{text}"))
        .to_string()
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[test]
fn kvm_run_serves_udhcpc_its_lease_renewal_and_release_and_no_other_mac() {
    let test = "rvmm run DHCP";
    if !kvm_available(test) {
        return;
    }
    let Some(net) = network_or_skip(test, BridgedNetwork::with_client("dhcp", MAC)) else {
        return;
    };
    let scratch = Scratch::new("dhcp");
    let script = scratch.path("udhcpc.script");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let events = scratch.path("vm-events.json");
    let kernel = tiny_guest("ticker");
    let nic = format!(
        "tap=tap0,mac={MAC},dhcp=10.0.2.2/24,gateway=10.0.2.1,dns=10.0.2.1:10.0.2.53,\
         search=example.com:corp.example.com,hostname=vm1,dhcp-interface=br0"
    );
    let rvmm = Killed(
        net.command(env!("CARGO_BIN_EXE_rvmm"))
            .args([
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "64M",
            ])
            .args(["--serial", "off", "--net", &nic])
            .args(["--event-monitor", &format!("path={}", events.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path("rvmm.log")).unwrap())
            .spawn()
            .expect("spawn rvmm"),
    );
    let rvmm_log = || {
        format!(
            "{}\n{}",
            scratch.read("rvmm.log"),
            scratch.read("vm-events.json")
        )
    };
    wait_until(
        "the VM boots",
        Duration::from_secs(60),
        || scratch.read("vm-events.json").contains("vm.booted"),
        rvmm_log,
    );

    let client = Killed(
        udhcpc(&net, &script, &[])
            .spawn()
            .expect("spawn busybox udhcpc"),
    );
    let log = || {
        format!(
            "client:\n{}\nrvmm:\n{}",
            scratch.read("events.log"),
            rvmm_log()
        )
    };
    wait_until(
        "a lease",
        Duration::from_secs(60),
        || scratch.read("events.log").contains("bound "),
        log,
    );
    let bound = first_line(&scratch.read("events.log"), "bound ");
    assert_eq!(
        bound,
        "bound ip=10.0.2.2 mask=24 router=10.0.2.1 dns=10.0.2.1 10.0.2.53 \
         search=example.com corp.example.com domain= hostname=vm1 mtu= lease=86313600 \
         serverid=10.0.2.1"
    );
    wait_until(
        "the lease event",
        Duration::from_secs(10),
        || scratch.read("vm-events.json").contains("net.dhcp-lease"),
        log,
    );
    let lease_event: serde_json::Value = serde_json::from_str(&first_line(
        &scratch.read("vm-events.json"),
        "net.dhcp-lease",
    ))
    .unwrap();
    assert_eq!(
        lease_event["properties"],
        serde_json::json!({"id": "tap0", "mac": MAC, "address": "10.0.2.2", "prefix_len": 24})
    );

    // A renewal is a REQUEST from the bound address, unicast to the server: acknowledged.
    signal(&client.0, libc::SIGUSR1);
    wait_until(
        "a renewal",
        Duration::from_secs(30),
        || scratch.read("events.log").contains("renew "),
        log,
    );
    // A release ends the lease on the server.
    signal(&client.0, libc::SIGUSR2);
    wait_until(
        "the release event",
        Duration::from_secs(30),
        || scratch.read("vm-events.json").contains("net.dhcp-release"),
        log,
    );
    drop(client);

    // Another MAC gets nothing: udhcpc gives up (-n) after its discovers.
    let foreign = net
        .peer_command("ip")
        .args(["link", "set", "eth0", "address", "52:54:00:99:99:99"])
        .status()
        .unwrap();
    assert!(foreign.success());
    let status = udhcpc(&net, &script, &["-n", "-q", "-t", "3", "-T", "1"])
        .status()
        .unwrap();
    assert!(!status.success(), "a foreign MAC got a lease:\n{}", log());
    assert_eq!(
        scratch.read("events.log").matches("bound ").count(),
        1,
        "{}",
        log()
    );
    drop(rvmm);
}

/// dhclient's script: one line per event with the DHCPv6 fields.
const DHCLIENT_SCRIPT: &str = r#"#!/bin/sh
echo "$reason ip6=$new_ip6_address/$new_ip6_prefixlen dns=$new_dhcp6_name_servers old=$old_ip6_address" >> "$(dirname "$0")/events.log"
"#;

#[test]
fn kvm_run_serves_dhclient_its_dhcpv6_lease_and_release() {
    let test = "rvmm run DHCPv6";
    if !kvm_available(test) {
        return;
    }
    if Command::new("dhclient").arg("--version").output().is_err() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{test}: dhclient (isc-dhcp-client) is missing; CI=true requires it"
        );
        eprintln!("SKIPPED {test}: dhclient (isc-dhcp-client) is not installed");
        return;
    }
    let Some(net) = network_or_skip(test, BridgedNetwork::with_client("dhcp6", MAC)) else {
        return;
    };
    let scratch = Scratch::new("dhcp6");
    let script = scratch.path("dhclient.script");
    std::fs::write(&script, DHCLIENT_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = serde_json::json!({
        "payload": {"kernel": tiny_guest("ticker")},
        "memory": {"size": 64 << 20},
        "serial": {"mode": "Off"},
        "net": [{"tap": "tap0", "mac": MAC, "dhcp": {
            "interface": "br0",
            "ipv6": {"address": "fd10:0:2::2/120", "dns": ["fd00::10", "fd00::11"]}
        }}]
    });
    std::fs::write(scratch.path("vm.json"), config.to_string()).unwrap();
    let events = scratch.path("vm-events.json");
    let rvmm = Killed(
        net.command(env!("CARGO_BIN_EXE_rvmm"))
            .args(["run", "--config", scratch.path("vm.json").to_str().unwrap()])
            .args(["--event-monitor", &format!("path={}", events.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path("rvmm.log")).unwrap())
            .spawn()
            .expect("spawn rvmm"),
    );
    let log = || {
        format!(
            "client:\n{}\nrvmm:\n{}\n{}",
            scratch.read("events.log"),
            scratch.read("rvmm.log"),
            scratch.read("vm-events.json")
        )
    };
    wait_until(
        "the VM boots",
        Duration::from_secs(60),
        || scratch.read("vm-events.json").contains("vm.booted"),
        log,
    );
    let dhclient = |extra: &[&str]| {
        let mut cmd = net.peer_command("dhclient");
        cmd.args(["-6", "-v", "-sf", script.to_str().unwrap()])
            .args(["-lf", scratch.path("dhclient.leases").to_str().unwrap()])
            .args(["-pf", scratch.path("dhclient.pid").to_str().unwrap()])
            .args(extra)
            .arg("eth0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path("dhclient.log")).unwrap());
        cmd
    };
    let client = Killed(dhclient(&["-d"]).spawn().expect("spawn dhclient"));
    wait_until(
        "a DHCPv6 lease",
        Duration::from_secs(60),
        || scratch.read("events.log").contains("BOUND6 "),
        || format!("{}\n{}", log(), scratch.read("dhclient.log")),
    );
    assert_eq!(
        first_line(&scratch.read("events.log"), "BOUND6 "),
        "BOUND6 ip6=fd10:0:2::2/128 dns=fd00::10 fd00::11 old="
    );
    wait_until(
        "the lease event",
        Duration::from_secs(10),
        || scratch.read("vm-events.json").contains("net.dhcp-lease"),
        log,
    );
    let lease_event: serde_json::Value = serde_json::from_str(&first_line(
        &scratch.read("vm-events.json"),
        "net.dhcp-lease",
    ))
    .unwrap();
    assert_eq!(
        lease_event["properties"],
        serde_json::json!({"id": "tap0", "mac": MAC, "address": "fd10:0:2::2", "prefix_len": 120})
    );
    drop(client);
    // `dhclient -r` releases the lease it recorded: the server ends it.
    let released = dhclient(&["-r"]).status().unwrap();
    assert!(
        released.success(),
        "dhclient -r: {}",
        scratch.read("dhclient.log")
    );
    wait_until(
        "the release event",
        Duration::from_secs(30),
        || scratch.read("vm-events.json").contains("net.dhcp-release"),
        log,
    );
    drop(rvmm);
}
