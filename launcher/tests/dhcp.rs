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
use serde_json::{Value, json};

const MAC: &str = "52:54:00:12:34:56";

/// dhclient's script: one line per event with the DHCPv6 fields.
const DHCLIENT_SCRIPT: &str = r#"#!/bin/sh
echo "$reason ip6=$new_ip6_address/$new_ip6_prefixlen dns=$new_dhcp6_name_servers old=$old_ip6_address" >> "$(dirname "$0")/events.log"
"#;

/// Kills the child when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `rvmm run` serving a NIC in the bridged network, with its files in a scratch directory
/// (removed on drop): `rvmm.log`, `vm-events.json` (the event monitor), the client's script
/// and its `events.log`.
struct Session {
    // Declared first: rvmm is killed before its directory goes.
    _rvmm: Killed,
    dir: PathBuf,
}

impl Session {
    /// Runs `rvmm run ARGS --event-monitor ...` in `net`'s pod namespace, with `script` as
    /// `client.script`, and waits for the VM to boot.
    fn start(net: &BridgedNetwork, tag: &str, script: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("rvmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let client_script = dir.join("client.script");
        std::fs::write(&client_script, script).unwrap();
        std::fs::set_permissions(
            &client_script,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let events = format!("path={}", dir.join("vm-events.json").display());
        let rvmm = net
            .command(env!("CARGO_BIN_EXE_rvmm"))
            .args(args)
            .args(["--event-monitor", &events])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("rvmm.log")).unwrap())
            .spawn()
            .expect("spawn rvmm");
        let session = Self {
            _rvmm: Killed(rvmm),
            dir,
        };
        session.wait_until("the VM boots", Duration::from_secs(60), || {
            session.read("vm-events.json").contains("vm.booted")
        });
        session
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Everything logged so far, for a failure message.
    fn log(&self) -> String {
        ["events.log", "client.log", "rvmm.log", "vm-events.json"]
            .map(|f| format!("--- {f}:\n{}", self.read(f)))
            .join("\n")
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < timeout,
                "{what} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first line of the client's events that starts with `event`.
    fn client_event(&self, event: &str) -> String {
        self.wait_until(event, Duration::from_secs(60), || {
            self.read("events.log")
                .lines()
                .any(|l| l.starts_with(event))
        });
        let log = self.read("events.log");
        log.lines()
            .find(|l| l.starts_with(event))
            .unwrap()
            .to_string()
    }

    /// The properties of the first VM event `event`.
    fn vm_event(&self, event: &str) -> Value {
        let name = format!("\"event\":\"{event}\"");
        self.wait_until(event, Duration::from_secs(30), || {
            self.read("vm-events.json").contains(&name)
        });
        let events = self.read("vm-events.json");
        let line = events.lines().find(|l| l.contains(&name)).unwrap();
        serde_json::from_str::<Value>(line).unwrap()["properties"].take()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    let kernel = tiny_guest("ticker");
    let nic = format!(
        "tap=tap0,mac={MAC},dhcp=10.0.2.2/24,gateway=10.0.2.1,dns=10.0.2.1:10.0.2.53,\
         search=example.com:corp.example.com,hostname=vm1,dhcp-interface=br0"
    );
    let kernel = kernel.to_str().unwrap();
    let args = [
        "run", "--kernel", kernel, "--memory", "64M", "--serial", "off", "--net", &nic,
    ];
    let s = Session::start(&net, "dhcp", UDHCPC_SCRIPT, &args);
    let script = s.path("client.script");

    let asked = Instant::now();
    let client = Killed(
        udhcpc(&net, &script, &[])
            .spawn()
            .expect("spawn busybox udhcpc"),
    );
    let bound = s.client_event("bound ");
    eprintln!(
        "udhcpc start to bound: {:.0} ms",
        asked.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(
        bound,
        "bound ip=10.0.2.2 mask=24 router=10.0.2.1 dns=10.0.2.1 10.0.2.53 \
         search=example.com corp.example.com domain= hostname=vm1 mtu= lease=86313600 \
         serverid=10.0.2.1"
    );
    assert_eq!(
        s.vm_event("net.dhcp-lease"),
        json!({"id": "tap0", "mac": MAC, "address": "10.0.2.2", "prefix_len": 24})
    );
    // A renewal is a REQUEST from the bound address, unicast to the server: acknowledged.
    signal(&client.0, libc::SIGUSR1);
    s.client_event("renew ");
    // A release ends the lease on the server.
    signal(&client.0, libc::SIGUSR2);
    assert_eq!(s.vm_event("net.dhcp-release")["address"], "10.0.2.2");
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
    assert!(!status.success(), "a foreign MAC got a lease:\n{}", s.log());
    assert_eq!(
        s.read("events.log").matches("bound ").count(),
        1,
        "{}",
        s.log()
    );
}

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
    // IPv6 is the VM file's: a --config run.
    let config = json!({
        "payload": {"kernel": tiny_guest("ticker")},
        "memory": {"size": 64 << 20},
        "serial": {"mode": "Off"},
        "net": [{"tap": "tap0", "mac": MAC, "dhcp": {
            "interface": "br0",
            "ipv6": {"address": "fd10:0:2::2/120", "dns": ["fd00::10", "fd00::11"]}
        }}]
    });
    let file = std::env::temp_dir().join(format!("rvmm-dhcp6-{}.json", std::process::id()));
    std::fs::write(&file, config.to_string()).unwrap();
    let s = Session::start(
        &net,
        "dhcp6",
        DHCLIENT_SCRIPT,
        &["run", "--config", file.to_str().unwrap()],
    );
    std::fs::remove_file(&file).unwrap();
    let dhclient = |extra: &[&str]| {
        let mut cmd = net.peer_command("dhclient");
        cmd.args(["-6", "-v", "-sf", s.path("client.script").to_str().unwrap()])
            .args(["-lf", s.path("dhclient.leases").to_str().unwrap()])
            .args(["-pf", s.path("dhclient.pid").to_str().unwrap()])
            .args(extra)
            .arg("eth0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(s.path("client.log")).unwrap());
        cmd
    };
    let asked = Instant::now();
    let client = Killed(dhclient(&["-d"]).spawn().expect("spawn dhclient"));
    let bound = s.client_event("BOUND6 ");
    eprintln!(
        "dhclient -6 start to bound: {:.0} ms",
        asked.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(
        bound,
        "BOUND6 ip6=fd10:0:2::2/128 dns=fd00::10 fd00::11 old="
    );
    assert_eq!(
        s.vm_event("net.dhcp-lease"),
        json!({"id": "tap0", "mac": MAC, "address": "fd10:0:2::2", "prefix_len": 120})
    );
    drop(client);
    // `dhclient -r` releases the lease it recorded: the server ends it.
    let released = dhclient(&["-r"]).status().unwrap();
    assert!(released.success(), "dhclient -r:\n{}", s.log());
    assert_eq!(s.vm_event("net.dhcp-release")["address"], "fd10:0:2::2");
}
