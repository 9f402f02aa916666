//! End to end: the Linux guest with a disk, a NIC (a tap in a private network namespace) and
//! virtio-rng is snapshotted while its /init beats (`rvmm.beat`: every 2 s it reads the disk
//! past the page cache and pings the host through the NIC), killed, restored with `rvmm run
//! --restore` and resumed: the beat count goes on from where it was, without a reboot, and the
//! disk and the NIC still work. The restored VM then moves by live migration to an rvmm in
//! another network namespace (its own tap, the host side with the same addresses, as a
//! KubeVirt target pod has), over the same disk file: the count goes on there too, disk and
//! NIC working. One boot; needs KVM and the built image (as linux_guest.rs).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::http::wait_for_socket;
use common::kvm_available;
use common::linux::{base_cmdline, image_dir, manifest};
use common::memtest::{migrate, put, state};
use common::netns::{GUEST_IP, HOST_IP, TestNetwork, ip, test_network};
use common::process::{Rvmm, TestDir};

/// Emulated guests are slow here (about a minute to init on an idle machine; a loaded one
/// takes several times that).
const BOOT_TIMEOUT: Duration = Duration::from_secs(1200);

/// The `RVMM-BEAT` lines of the console file: (count, disk and net ok).
fn beats(log: &Path) -> (Vec<(u64, bool)>, String) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let beats = text
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("RVMM-BEAT "))
        .map(|rest| {
            let mut words = rest.split(' ');
            let n = words.next().unwrap().parse().unwrap();
            (n, words.all(|w| w.ends_with("=ok")))
        })
        .collect();
    (beats, text)
}

/// Waits until the console file shows a beat numbered at least `n`.
fn wait_for_beat(log: &Path, n: u64) -> Vec<(u64, bool)> {
    let start = Instant::now();
    loop {
        let (beats, text) = beats(log);
        if beats.last().is_some_and(|b| b.0 >= n) {
            return beats;
        }
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "no beat {n} in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// rvmm in the network namespace, killed if the test fails half way.
fn spawn_in(net: &TestNetwork, args: &[&str]) -> Rvmm {
    let child = net
        .command(env!("CARGO_BIN_EXE_rvmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn rvmm");
    Rvmm(child)
}

/// The host side of `net`'s tap gets the MAC address every test namespace's tap has here, so
/// that the guest's neighbour entry for the host stays right after it moves to another
/// namespace (in KubeVirt both pods' bridges answer for the gateway alike).
fn same_host_mac(net: &TestNetwork) {
    ip(&[
        "-n",
        &net.name,
        "link",
        "set",
        "tap0",
        "address",
        "02:72:76:6d:00:01",
    ])
    .expect("set the tap's MAC address");
}

/// On virtio-mmio. Ignored for CI's time budget (two minutes of emulated Linux): the PCI
/// run below covers the vCPU, clock and memory restore and the migration, the tiny-guest
/// tests cover the virtio-mmio transport's. Passed here (2026-12-05, `--ignored`, 110 s,
/// with the live migration step).
#[test]
#[ignore = "CI time: the PCI run covers the same restore; run with --ignored"]
fn kvm_linux_guest_with_disk_and_nic_goes_on_after_snapshot_restore_and_live_migration() {
    snapshot_kill_restore("linux snapshot/restore", "mmio");
}

/// The same on a PCI machine (KubeVirt's platform): Linux's virtio-pci driver with MSI-X, the
/// BARs where the kernel put them, ACPI.
#[test]
fn kvm_linux_guest_on_pci_with_disk_and_nic_goes_on_after_snapshot_restore_and_live_migration() {
    snapshot_kill_restore("linux snapshot/restore on PCI", "pci");
}

fn snapshot_kill_restore(test: &str, transport: &str) {
    let Some(images) = image_dir(test) else {
        return;
    };
    if !kvm_available(test) {
        return;
    }
    // Apart from the other transport's run: its own namespace and directory.
    let Some(net) = test_network(&format!("lsnap{}", &transport[..1])) else {
        return;
    };
    // Where the VM moves last, by live migration.
    let Some(target_net) = test_network(&format!("lmig{}", &transport[..1])) else {
        return;
    };
    same_host_mac(&net);
    same_host_mac(&target_net);
    let dir = TestDir::new(&format!("linux-snapshot-{transport}"));
    let m = manifest(&images);
    let disk = dir.path("rootfs.ext4");
    std::fs::copy(&m["rootfs"], &disk).unwrap();
    let cmdline = format!(
        "{} rvmm.ip={GUEST_IP} rvmm.peer={HOST_IP} rvmm.beat",
        base_cmdline(&m)
    );
    let (log1, api1) = (dir.path("console1.log"), dir.path("api1.sock"));
    let mut source = spawn_in(
        &net,
        &[
            "run",
            "--kernel",
            &m["vmlinux"],
            "--initrd",
            &m["initramfs"],
            "--cmdline",
            &cmdline,
            "--memory",
            "256M",
            "--transport",
            transport,
            "--rng",
            "--disk",
            &format!("path={},id=rootfs", disk.display()),
            "--net",
            "tap=tap0,id=eth0",
            "--serial",
            &format!("file={}", log1.display()),
            "--api-socket",
            api1.to_str().unwrap(),
        ],
    );
    let before = wait_for_beat(&log1, 2);
    let text = std::fs::read_to_string(&log1).unwrap();
    for check in ["blk", "net", "rng"] {
        assert!(text.contains(&format!("RVMM-CHECK {check} ok")), "{text}");
    }
    assert!(before.iter().all(|b| b.1), "{text}");

    put(&api1, "vm.pause", None);
    let last = beats(&log1).0.last().unwrap().0;
    let snap = dir.path("snap");
    let body = format!(r#"{{"destination_url": "file://{}"}}"#, snap.display());
    put(&api1, "vm.snapshot", Some(&body));
    source.0.kill().unwrap();
    source.0.wait().unwrap();

    let (log2, api2) = (dir.path("console2.log"), dir.path("api2.sock"));
    let mut restored = spawn_in(
        &net,
        &[
            "run",
            "--restore",
            &format!("source_url=file://{}", snap.display()),
            "--serial",
            &format!("file={}", log2.display()),
            "--api-socket",
            api2.to_str().unwrap(),
        ],
    );
    wait_for_socket(&api2, Duration::from_secs(60));
    assert_eq!(state(&api2), "Paused");
    put(&api2, "vm.resume", None);
    let after = wait_for_beat(&log2, last + 2);
    let text = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(after[0].0, last + 1, "the count did not go on: {text}");
    assert!(
        after.iter().all(|b| b.1),
        "disk or NIC broken after restore: {text}"
    );
    assert!(!text.contains("RVMM-INIT"), "rebooted: {text}");

    // Live migration of the restored VM to the other namespace, disk and all.
    let (log3, api3) = (dir.path("console3.log"), dir.path("api3.sock"));
    let mut target = spawn_in(
        &target_net,
        &[
            "run",
            "--serial",
            &format!("file={}", log3.display()),
            "--api-socket",
            api3.to_str().unwrap(),
        ],
    );
    wait_for_socket(&api3, Duration::from_secs(60));
    let url = format!("unix:{}", dir.path("migration.sock").display());
    migrate(&api2, &api3, &url);
    assert_eq!(
        restored.wait(Duration::from_secs(60)),
        Some(0),
        "source exit"
    );
    let last = beats(&log2).0.last().unwrap().0;
    assert_eq!(state(&api3), "Running");
    let after = wait_for_beat(&log3, last + 2);
    let text = std::fs::read_to_string(&log3).unwrap();
    assert!(
        after[0].0 <= last + 1,
        "beats lost in the migration: {last} then {text}"
    );
    assert!(
        after.iter().all(|b| b.1),
        "disk or NIC broken after the migration: {text}"
    );
    assert!(!text.contains("RVMM-INIT"), "rebooted: {text}");
    put(&api3, "vmm.shutdown", None);
    assert_eq!(target.wait(Duration::from_secs(60)), Some(0));
}
