//! KVM tests of virtio-blk through the tiny guest's minimal virtio-mmio driver: it reads sector
//! 0, writes sector 1, flushes, reads it back, asks for the id and writes past the end.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{kvm_available, lines, run_rvmm, tiny_guest};

const PATTERN: &[u8; 16] = b"rvmm-tiny-write!";

struct Disk(PathBuf);

impl Disk {
    /// A 1 MiB disk whose first sector counts 0, 1, 2, ...
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("rvmm-blk-{}-{name}.img", std::process::id()));
        let mut bytes: Vec<u8> = (0..=255u8).cycle().take(512).collect();
        bytes.resize(1 << 20, 0);
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }

    fn sector(&self, n: usize) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()[n * 512..(n + 1) * 512].to_vec()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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
        let disk = Disk::new(engine);
        let options = format!("path={},id=tiny-{engine},engine={engine}", disk.0.display());
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
    let disk = Disk::new("ro");
    let before = disk.sector(1);
    let (code, lines) = boot_with_disk(&format!("path={},readonly=on", disk.0.display()));
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(has(&lines, "virtio-blk: read status 0"), "{lines:?}");
    assert!(has(&lines, "virtio-blk: write status 1"), "{lines:?}");
    assert!(has(&lines, "virtio-blk: readback FAIL"), "{lines:?}");
    assert_eq!(disk.sector(1), before);
}
