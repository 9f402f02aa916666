//! KVM tests of virtio-net on a real tap: the tiny guest's minimal driver ARPs for the host and
//! pings it through rvmm's device, in a network namespace of the test's own.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::netns::{GUEST_IP, HOST_IP, test_network};
use common::{kvm_available, tiny_guest};

#[test]
fn kvm_tiny_guest_arps_and_pings_the_host_through_the_tap() {
    let test = "virtio-net";
    if !kvm_available(test) {
        return;
    }
    let Some(net) = test_network("net") else {
        return;
    };
    let kernel = tiny_guest("virtio-net");
    let cmdline = format!("console=ttyS0 rvmm.ip={GUEST_IP} rvmm.peer={HOST_IP}");
    let mut child = net
        .command(env!("CARGO_BIN_EXE_rvmm"))
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
            // The tiny guest has no ACPI: it finds the device on the command line.
            "--acpi=false",
        ])
        .args([
            "--cmdline",
            &cmdline,
            "--net",
            "tap=tap0,mac=02:00:00:00:00:02",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "virtio-net: mac 02:00:00:00:00:02",
        &format!("virtio-net: ping reply from {HOST_IP} seq 1 ok"),
        "virtio-net: done",
    ] {
        assert!(
            console.lines().any(|l| l == expected),
            "missing '{expected}' in:\n{console}"
        );
    }
    assert!(
        console
            .lines()
            .any(|l| l.starts_with(&format!("virtio-net: arp reply from {HOST_IP} is "))),
        "{console}"
    );
}
