//! End to end: a launcher pod's network after virt-handler's masquerade setup, rvmm in
//! virt-launcher mode driven through KubeVirt's gRPC protocol, and the Linux test guest's stock
//! DHCP client (busybox udhcpc) configuring eth0 from rvmm's server: address, router, the pod's
//! DNS server and search domains (with the VMI's subdomain), the VMI name as host name, the pod
//! MTU; then it pings its gateway, and virt-handler sees the lease in the domain's
//! Status.Interfaces. One Linux boot for all of it.
//!
//! The pod: a network namespace (see [`common::bridged`]) and, in the launcher's own mount
//! namespace (`ip netns exec` makes one), the pod's volumes: a directory bind-mounted on /run
//! (so /var/run/kubevirt-private, the private volume, is the test's) and a pod-style
//! resolv.conf on /etc/resolv.conf.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::bridged::BridgedNetwork;
use common::bridged::{UDHCPC_SCRIPT, udhcpc};
use common::kubevirt::{Handler, Launcher, Pod, fake_virt_handler, next_event};
use common::linux::{image_dir, manifest};
use common::netns::network_or_skip;
use common::{kvm_available, tiny_guest};
use rvmm_launcher::kubevirt::grpc::GrpcRuntime;
use rvmm_launcher::kubevirt::proto::cmd::v1 as cmd;
use serde_json::{Value, json};

/// Emulated Linux guests are slow here: about a minute to init, more on a busy machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A Kubernetes pod's resolv.conf (namespace `default`).
const POD_RESOLV_CONF: &str = "search default.svc.cluster.local svc.cluster.local \
                               cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n";

/// Mounts the pod's volumes in the launcher's mount namespace, then runs the launcher:
/// `sh -c SCRIPT sh RUN_DIR RESOLV_CONF PROGRAM ARGS...`.
const MOUNT_POD_VOLUMES: &str =
    r#"mount --bind "$1" /run && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@""#;

/// The VMI: kernel boot of the test guest with its DHCP check, a masquerade interface on the
/// pod network, subdomain `mysub`, the serial console on.
fn vmi(kernel_args: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "testvm", "namespace": "default", "uid": "uid-1"},
        "spec": {
            "subdomain": "mysub",
            "domain": {
                "devices": {
                    "interfaces": [{"name": "default", "masquerade": {}}],
                    "rng": {}
                },
                "firmware": {"kernelBoot": {
                    "kernelArgs": kernel_args,
                    "container": {
                        "image": "example.com/rvmm-test-guest",
                        "kernelPath": "/boot/vmlinux",
                        "initrdPath": "/boot/initramfs.cpio"
                    }
                }},
                "memory": {"guest": "256Mi"}
            },
            "networks": [{"name": "default", "pod": {}}],
            "terminationGracePeriodSeconds": 30
        }
    })
}

/// Reads the console socket's lines on a thread, each with the time since `start`.
fn console_lines(socket: &Path, start: Instant) -> mpsc::Receiver<(f64, String)> {
    let stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            if tx.send((start.elapsed().as_secs_f64(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

/// The pod's volumes: /run (with /var/run/kubevirt-private in it) and resolv.conf.
struct PodVolumes {
    run: PathBuf,
    private: PathBuf,
    resolv_conf: PathBuf,
}

impl PodVolumes {
    fn new(pod: &Pod) -> Self {
        let run = pod.path("run");
        let private = run.join("kubevirt-private");
        std::fs::create_dir_all(&private).unwrap();
        let resolv_conf = pod.path("resolv.conf");
        std::fs::write(&resolv_conf, POD_RESOLV_CONF).unwrap();
        Self {
            run,
            private,
            resolv_conf,
        }
    }
}

/// `rvmm virt-launcher` for VMI `testvm` (`uid-1`) in `net`'s pod namespace with `volumes`
/// mounted, ready for commands.
fn start_launcher(net: &BridgedNetwork, pod: &Pod, volumes: &PodVolumes) -> Launcher {
    let mut command = net.command("sh");
    command
        .args(["-c", MOUNT_POD_VOLUMES, "sh"])
        .arg(&volumes.run)
        .arg(&volumes.resolv_conf)
        .arg(env!("CARGO_BIN_EXE_rvmm"))
        .args([
            "virt-launcher",
            "--name",
            "testvm",
            "--namespace",
            "default",
        ])
        .args(["--uid", "uid-1"])
        .args(pod.flags());
    let launcher = Launcher::spawn(command, pod);
    launcher.wait_for(&pod.ready_socket(), Duration::from_secs(20));
    launcher
}

/// virt-handler's sync options: bridge and masquerade interfaces are attached as taps.
fn tap_attached() -> Option<cmd::VirtualMachineOptions> {
    Some(cmd::VirtualMachineOptions {
        interface_domain_attachment: HashMap::from([("default".into(), "tap".into())]),
        ..Default::default()
    })
}

#[test]
fn kvm_masquerade_pod_guest_gets_address_router_dns_search_hostname_and_mtu_by_dhcp() {
    let test = "KubeVirt masquerade DHCP";
    let Some(image) = image_dir(test) else { return };
    if !kvm_available(test) {
        return;
    }
    let Some(net) = network_or_skip(test, BridgedNetwork::masquerade_pod("kvdhcp")) else {
        return;
    };
    let m = manifest(&image);
    let pod = Pod::new("dhcp");
    for (from, to) in [("vmlinux", "vmlinux"), ("initramfs", "initramfs.cpio")] {
        std::fs::copy(&m[from], pod.path(&format!("cd/kernel-boot/{to}"))).unwrap();
    }
    let volumes = PodVolumes::new(&pod);
    let private = volumes.private.clone();
    let runtime = GrpcRuntime::start().unwrap();
    let (events, _k8s_events) = fake_virt_handler(&runtime, &pod);
    let mut launcher = start_launcher(&net, &pod, &volumes);
    let handler = Handler::connect(&runtime, &pod.ready_socket());

    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let cmdline = if pvm { &m["cmdline"] } else { &m["cmdline_hw"] };
    let vmi = vmi(&format!("{cmdline} rvmm.dhcp=1 rvmm.hold"));
    let start = Instant::now();
    let sync = handler.vmi_command_with("Sync", &vmi, tap_attached());
    assert_eq!(sync, (true, String::new()), "log:\n{}", launcher.log());
    let marker = private.join("dhcp_started-eth0");
    assert!(marker.exists(), "KubeVirt's marker: {}", marker.display());

    let (kind, state, _, domain) = next_event(&events);
    assert_eq!((kind.as_str(), state.as_str()), ("ADDED", "Running"));
    let iface = &domain["Spec"]["Devices"]["Interfaces"][0];
    let mac = iface["MAC"]["MAC"].as_str().unwrap().to_string();
    assert_eq!(iface["MTU"], json!({"Size": "1450"}), "the pod's MTU");

    let socket = private.join("uid-1/virt-serial0");
    launcher.wait_for(&socket, Duration::from_secs(20));
    let lines = console_lines(&socket, start);
    let mut console = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(1)) {
            Ok((at, line)) => {
                eprintln!("[{at:7.2}] {line}");
                let held = line == "RVMM-HOLD";
                console.push(line);
                if held {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the console closed early; log:\n{}", launcher.log())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => assert!(
                start.elapsed() < BOOT_TIMEOUT,
                "the guest did not finish its checks within {BOOT_TIMEOUT:?}"
            ),
        }
    }
    let failed: Vec<&String> = console.iter().filter(|l| l.contains(" FAIL")).collect();
    assert!(failed.is_empty(), "failed checks: {failed:?}");
    assert!(
        console.contains(&"RVMM-CHECK dhcp ok".to_string()),
        "the dhcp check ran and pinged"
    );
    let lease: Vec<&str> = console
        .iter()
        .filter_map(|l| l.strip_prefix("RVMM-DHCP "))
        .collect();
    for expected in [
        "ip=10.0.2.2",
        "mask=24",
        "router=10.0.2.1",
        "dns=10.96.0.10",
        "search=mysub.default.svc.cluster.local default.svc.cluster.local svc.cluster.local \
         cluster.local",
        "domain=mysub.default.svc.cluster.local",
        "hostname=testvm",
        "mtu=1450",
        "lease=86313600",
        "serverid=10.0.2.1",
        "link_mtu=1450",
        "uname_n=testvm",
    ] {
        assert!(lease.contains(&expected), "{expected} not in {lease:?}");
    }

    // virt-handler reads the guest's address from the domain's Status.Interfaces.
    let leased = json!([{"Mac": mac, "Ip": "10.0.2.2", "IPs": ["10.0.2.2"], "InterfaceName": ""}]);
    let domain = handler.domain().expect("a domain");
    assert_eq!(domain["Status"]["Interfaces"], leased);
    let mut modified = None;
    while let Ok(request) = events.try_recv() {
        let domain: Value = serde_json::from_slice(&request.domain_json).unwrap();
        if domain["Status"]["Interfaces"] == leased {
            modified = Some(request.event_type);
        }
    }
    assert_eq!(
        modified.as_deref(),
        Some("MODIFIED"),
        "a domain event carried the lease"
    );

    // The guest shuts down (Ctrl-Alt-Del): the VM and its DHCP server stop; the domain stays,
    // Shutoff and without the lease, until virt-handler deletes it.
    assert!(handler.vmi_command("Shutdown", &json!(vmi)).0);
    let start = Instant::now();
    let shutoff = loop {
        if let Ok(request) = events.recv_timeout(Duration::from_secs(1)) {
            let domain: Value = serde_json::from_slice(&request.domain_json).unwrap();
            if domain["Status"]["Status"] == "Shutoff" {
                break domain;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no Shutoff; log:\n{}",
            launcher.log()
        );
    };
    assert_eq!(
        shutoff["Status"]["Interfaces"],
        Value::Null,
        "no lease in a stopped VM"
    );
    assert!(!marker.exists(), "the marker goes with the server");
    assert_eq!(handler.vmi_command("Delete", &vmi), (true, String::new()));
    let exit = launcher.wait(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(0), "log:\n{}", launcher.log());
}

/// The bridge binding's pod MAC, base64 in virt-handler's cache (Go's `net.HardwareAddr`).
const POD_MAC: &str = "0a:58:0a:f4:01:05";
const POD_MAC_BASE64: &str = "ClgK9AEF";

#[test]
fn kvm_bridge_pod_hands_the_cached_pod_address_and_routes_to_a_client_with_the_pod_mac() {
    let test = "KubeVirt bridge DHCP";
    if !kvm_available(test) {
        return;
    }
    let Some(net) = network_or_skip(test, BridgedNetwork::bridge_pod("kvbr", POD_MAC)) else {
        return;
    };
    let pod = Pod::new("bridge");
    std::fs::copy(tiny_guest("ticker"), pod.path("cd/kernel-boot/ticker.elf")).unwrap();
    let volumes = PodVolumes::new(&pod);
    // What virt-handler caches for the launcher when it moves the pod's address to the VM.
    let cache = json!({
        "Name": "",
        "IP": {"IP": "10.244.1.5", "Mask": "////AA==", "Label": "", "Flags": 0},
        "MAC": POD_MAC_BASE64,
        "AdvertisingIPAddr": "",
        "Routes": [
            {"Dst": null, "Gw": "10.244.1.1", "Src": ""},
            {"Dst": {"IP": "10.96.0.0", "Mask": "//8AAA=="}, "Gw": "10.244.1.254", "Src": ""}
        ],
        "Mtu": 0,
        "IPAMDisabled": false,
        "Gateway": "10.244.1.1",
        "Subdomain": ""
    });
    std::fs::write(
        volumes.private.join("vif-cache-eth0.json"),
        cache.to_string(),
    )
    .unwrap();
    let script = pod.path("udhcpc.script");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let runtime = GrpcRuntime::start().unwrap();
    let (events, _k8s_events) = fake_virt_handler(&runtime, &pod);
    let mut launcher = start_launcher(&net, &pod, &volumes);
    let handler = Handler::connect(&runtime, &pod.ready_socket());
    let vmi = json!({
        "metadata": {"name": "testvm", "namespace": "default", "uid": "uid-1"},
        "spec": {
            "domain": {
                "devices": {
                    "autoattachSerialConsole": false,
                    "interfaces": [{"name": "default", "bridge": {}}]
                },
                "firmware": {"kernelBoot": {"container": {
                    "image": "example.com/ticker", "kernelPath": "/boot/ticker.elf"
                }}},
                "memory": {"guest": "64Mi"}
            },
            "networks": [{"name": "default", "pod": {}}]
        }
    });
    let sync = handler.vmi_command_with("Sync", &vmi, tap_attached());
    assert_eq!(sync, (true, String::new()), "log:\n{}", launcher.log());
    let (_, _, _, domain) = next_event(&events);
    let iface = &domain["Spec"]["Devices"]["Interfaces"][0];
    assert_eq!(
        iface["MAC"]["MAC"], POD_MAC,
        "the guest takes over the pod's MAC"
    );
    assert_eq!(iface["MTU"], json!({"Size": "1400"}));

    let lease_log = pod.path("events.log");
    let mut client = udhcpc(
        &net,
        &script,
        &["-n", "-q", "-t", "10", "-T", "1", "-O", "staticroutes"],
    )
    .spawn()
    .expect("spawn busybox udhcpc");
    let status = client.wait().unwrap();
    let leased = std::fs::read_to_string(&lease_log).unwrap_or_default();
    assert!(
        status.success(),
        "no lease:\n{leased}\nlauncher:\n{}",
        launcher.log()
    );
    let bound = leased
        .lines()
        .find(|l| l.starts_with("bound "))
        .unwrap_or_default();
    assert_eq!(
        bound,
        "bound ip=10.244.1.5 mask=24 router=10.244.1.1 dns=10.96.0.10 \
         search=default.svc.cluster.local svc.cluster.local cluster.local \
         domain=default.svc.cluster.local hostname=testvm mtu=1400 lease=86313600 \
         serverid=169.254.75.10 staticroutes=10.96.0.0/16 10.244.1.254 0.0.0.0/0 10.244.1.1"
    );
    let start = Instant::now();
    let leased = json!([{"Mac": POD_MAC, "Ip": "10.244.1.5", "IPs": ["10.244.1.5"],
                         "InterfaceName": ""}]);
    while handler.domain().expect("a domain")["Status"]["Interfaces"] != leased {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no lease in GetDomain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(handler.vmi_command("Delete", &vmi), (true, String::new()));
    let exit = launcher.wait(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "log:\n{}", launcher.log());
    assert!(!volumes.private.join("dhcp_started-eth0").exists());
}
