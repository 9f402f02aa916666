//! KVM test of the PCI root complex and virtio-pci with the tiny `pci` guest (a freestanding
//! driver, so every access is one the test knows of): configuration through 0xCF8/0xCFC and
//! ECAM, BAR sizing, capabilities, a virtio-rng request through the notify BAR's ioeventfd with
//! INTx, then with MSI-X through KVM's GSI routes and irqfds (the vector must reach the local
//! APIC), masking and pending bits, a reset and re-init, and malformed accesses that rvmm must
//! count, ignore and survive (the counts read back through `vm.counters`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::http::{call, wait_for_socket};
use common::{kvm_available, rvmm, tiny_guest};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(180);

fn wait_for_line(serial: &Path, line: &str, rvmm: &mut std::process::Child) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return text;
        }
        if let Some(status) = rvmm.try_wait().unwrap() {
            panic!("rvmm exited ({status}) before '{line}':\n{text}");
        }
        assert!(start.elapsed() < TIMEOUT, "no '{line}' in time:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kvm_pci_guest_drives_virtio_pci_with_intx_and_msix_and_malformed_accesses_are_counted() {
    if !kvm_available("pci guest") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("rvmm-pci-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (socket, serial) = (dir.join("api.sock"), dir.join("serial.log"));
    let kernel = tiny_guest("pci");
    let mut child = rvmm()
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
            "--transport",
            "pci",
            "--rng",
            "--cmdline",
            "pci.hold=1",
            "--serial",
            &format!("file={}", serial.display()),
            "--api-socket",
            socket.to_str().unwrap(),
        ])
        .spawn()
        .expect("spawn rvmm");
    wait_for_socket(&socket, Duration::from_secs(30));
    let text = wait_for_line(&serial, "pci: done", &mut child);
    let counters = call(&socket, "GET", "/api/v1/vm.counters", None);
    let shutdown = call(&socket, "PUT", "/api/v1/vmm.shutdown", None);
    let status = child.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("pci: ")).collect();
    assert_eq!(
        lines,
        [
            "pci: host bridge 1b36:0008 class 060000",
            "pci: 00:01.0 1af4:1044 class ff0000",
            "pci: ecam matches cf8",
            "pci: bar0 size 0x8000 64-bit",
            "pci: msix table size 2 at bar offset 0x4000",
            "pci: virtio capabilities common notify isr device pci-cfg",
            "pci: entropy through intx, isr 0x1",
            "pci: msix vector 0x41 pending in the local APIC",
            "pci: masked vector pending, delivered on unmask",
            "pci: reset and brought up again",
            "pci: survived malformed accesses",
            "pci: done",
        ],
        "{text}"
    );
    assert_eq!(counters.status, 200, "{counters:?}");
    // The guest's malformed accesses, one by one (guest-images/tiny/pci.c, `malformed`).
    assert_eq!(
        counters.json()["pci_malformed_accesses"],
        json!({"config": 3, "bar": 5, "msix": 2})
    );
    assert_eq!(shutdown.status, 204);
    assert_eq!(status.code(), Some(0));
}
