//! KVM tests of snapshots and live migration of a PCI machine (`--transport pci`, ACPI): the
//! tiny `pci` guest in its beat mode (`pci.beat=1`) moves its virtio-rng function's BAR away
//! from where firmware put it, enables MSI-X and ACPI's power button event, and beats: each beat
//! is an entropy request notified at the moved BAR whose MSI-X interrupt must reach the local
//! APIC on a vector of its own, programmed before the previous beat's pause. After a restore
//! (or at a migration's destination) the beats must go on from the next number, which needs the
//! virtio queue positions, the BAR mapping at the guest's address, the MSI-X table with its
//! KVM route and irqfd, and the device running again; then `vm.power-button` must reach the
//! guest through ACPI, which needs the guest's PM1 enable bit from the snapshot.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::http::wait_for_socket;
use common::memtest::{API_TIMEOUT, migrate, put, restore_paused, state};
use common::process::{Rvmm, TestDir, wait_for_text};
use common::{kvm_available, tiny_guest};

/// `rvmm run` of the beating `pci` guest with the API on `dir`'s `api.sock`, console to
/// `serial.log`; returns once the API listens.
fn start_beating(dir: &TestDir) -> Rvmm {
    let kernel = tiny_guest("pci");
    let socket = dir.path("api.sock");
    let vmm = Rvmm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--transport",
        "pci",
        "--rng",
        "--cmdline",
        "pci.beat=1",
        "--serial",
        &format!("file={}", dir.path("serial.log").display()),
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    wait_for_socket(&socket, API_TIMEOUT);
    vmm
}

/// The beat numbers in `text`, in order; fails on a guest failure or a second start.
fn beats(text: &str) -> Vec<u64> {
    assert!(!text.contains("FAIL"), "the guest failed: {text}");
    assert!(
        text.matches("pci: beating").count() <= 1,
        "rebooted: {text}"
    );
    text.lines()
        .filter_map(|l| l.strip_prefix("pci: beat "))
        .map(|n| n.parse().unwrap())
        .collect()
}

/// Waits until `log` has `count` beats, failing at once when the guest reports a failure.
fn wait_for_beats(log: &Path, count: usize) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if beats(&text).len() >= count {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{count} beats not in {}: {text:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for two beats in `log` after those of `before` (the source's), checks they follow
/// on, then presses the power button, which the guest must see through ACPI (it then resets,
/// which after the power button is its power-off).
fn check_goes_on_and_takes_the_power_button(log: &Path, socket: &Path, before: &[u64]) {
    let text = wait_for_beats(log, 2);
    let after = beats(&text);
    let last = before.last().unwrap();
    assert_eq!(
        after[..2],
        [last + 1, last + 2],
        "the guest did not go on where it was: {text}"
    );
    assert!(
        !text.contains("pci: beating"),
        "the guest started again: {text}"
    );
    put(socket, "vm.power-button", None);
    wait_for_text(log, "pci: power button\n", 1);
}

#[test]
fn kvm_pci_machine_snapshot_restore_keeps_bar_msix_queues_and_acpi_power_button() {
    if !kvm_available("PCI snapshot/restore") {
        return;
    }
    let dir = TestDir::new("pci-snapshot");
    let socket = dir.path("api.sock");
    let mut source = start_beating(&dir);
    wait_for_beats(&dir.path("serial.log"), 2);
    put(&socket, "vm.pause", None);
    let before = beats(&std::fs::read_to_string(dir.path("serial.log")).unwrap());
    let snap = dir.path("snap");
    put(
        &socket,
        "vm.snapshot",
        Some(&format!(
            r#"{{"destination_url": "file://{}"}}"#,
            snap.display()
        )),
    );
    source.signal(libc::SIGKILL);
    source.wait(API_TIMEOUT);

    let restored_socket = dir.path("restored.sock");
    let restored_log = dir.path("restored.log");
    let serial = format!("file={}", restored_log.display());
    let mut restored = restore_paused(&snap, &serial, &restored_socket);
    put(&restored_socket, "vm.resume", None);
    check_goes_on_and_takes_the_power_button(&restored_log, &restored_socket, &before);
    // The guest resets after the power button: its power-off, which ends rvmm.
    assert_eq!(restored.wait(API_TIMEOUT), Some(0), "rvmm exit");
}

#[test]
fn kvm_pci_machine_live_migrates_and_its_device_goes_on_at_the_destination() {
    if !kvm_available("PCI live migration") {
        return;
    }
    let dir = TestDir::new("pci-migration");
    let (src_socket, dst_socket) = (dir.path("api.sock"), dir.path("dst.sock"));
    let mut source = start_beating(&dir);
    let mut destination = Rvmm::start(&[
        "run",
        "--api-socket",
        dst_socket.to_str().unwrap(),
        "--serial",
        &format!("file={}", dir.path("dst.log").display()),
    ]);
    wait_for_socket(&dst_socket, API_TIMEOUT);
    wait_for_beats(&dir.path("serial.log"), 2);
    let url = format!("unix:{}", dir.path("migration.sock").display());
    migrate(&src_socket, &dst_socket, &url);
    assert_eq!(source.wait(API_TIMEOUT), Some(0), "source exit");
    let before = beats(&std::fs::read_to_string(dir.path("serial.log")).unwrap());
    assert_eq!(state(&dst_socket), "Running");
    check_goes_on_and_takes_the_power_button(&dir.path("dst.log"), &dst_socket, &before);
    assert_eq!(destination.wait(API_TIMEOUT), Some(0), "rvmm exit");
}
