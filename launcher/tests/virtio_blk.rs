//! KVM tests of virtio-blk through the tiny guest's minimal virtio-mmio driver: it reads sector
//! 0, writes sector 1, flushes, reads it back, asks for the id and writes past the end.

mod common;

use std::time::Duration;

use common::fixtures::TempDisk;
use common::{kvm_available, lines, run_rvmm, tiny_guest};

const PATTERN: &[u8; 16] = b"rvmm-tiny-write!";

/// A 1 MiB disk whose first sector counts 0, 1, 2, ...
fn counting_disk(name: &str) -> TempDisk {
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(512).collect();
    bytes.resize(1 << 20, 0);
    TempDisk::new(&format!("blk-{name}"), &bytes)
}

fn boot_with_disk(disk_options: &str) -> (Option<i32>, Vec<String>) {
    let kernel = tiny_guest("virtio-blk");
    let out = run_rvmm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
            // The tiny guest has no ACPI: it finds the device on the command line.
            "--acpi=false",
            "--disk",
            disk_options,
        ],
        Duration::from_secs(120),
    );
    (out.status.code(), lines(&out))
}

fn has(lines: &[String], line: &str) -> bool {
    lines.iter().any(|l| l == line)
}

#[test]
fn kvm_guest_driver_reads_writes_flushes_and_the_data_is_on_the_host_file() {
    if !kvm_available("virtio-blk") {
        return;
    }
    for engine in ["sync", "io_uring"] {
        let disk = counting_disk(engine);
        let options = format!(
            "path={},id=tiny-{engine},engine={engine}",
            disk.path().display()
        );
        let (code, lines) = boot_with_disk(&options);
        assert_eq!(code, Some(0), "{engine}: {lines:?}");
        for expected in [
            "virtio-blk: capacity 2048 sectors",
            "virtio-blk: features ok",
            "virtio-blk: sector0 000102030405060708090a0b0c0d0e0f",
            "virtio-blk: read status 0",
            "virtio-blk: write status 0",
            "virtio-blk: flush status 0",
            "virtio-blk: readback ok",
            &format!("virtio-blk: id tiny-{engine}"),
            "virtio-blk: out-of-range write status 1",
            "virtio-blk: done",
        ] {
            assert!(
                has(&lines, expected),
                "{engine}: missing '{expected}' in {lines:?}"
            );
        }
        // What the guest wrote and flushed is in the file after rvmm exits.
        assert_eq!(disk.sector(1), PATTERN.repeat(32), "{engine}");
    }
}

#[test]
fn kvm_read_only_disk_refuses_guest_writes_and_keeps_the_file() {
    if !kvm_available("virtio-blk read-only") {
        return;
    }
    let disk = counting_disk("ro");
    let before = disk.sector(1);
    let (code, lines) = boot_with_disk(&format!("path={},readonly=on", disk.path().display()));
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(has(&lines, "virtio-blk: read status 0"), "{lines:?}");
    assert!(has(&lines, "virtio-blk: write status 1"), "{lines:?}");
    assert!(has(&lines, "virtio-blk: readback FAIL"), "{lines:?}");
    assert_eq!(disk.sector(1), before);
}
