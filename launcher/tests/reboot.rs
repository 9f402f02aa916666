//! `rvmm run --on-reboot restart`: a guest reset boots the guest again in the same process
//! (memory, devices and disks built afresh) until the power button ends it; `exit` (the
//! default) keeps the microVM behaviour of ending on the first reset (`tiny_guests.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::fixtures::TempDisk;
use common::{kvm_available, rvmm, tiny_guest};
use serde_json::Value;

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rvmm-reboot-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills rvmm if the test fails half way.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `file` holds `needle` at least `count` times; returns the text.
fn wait_for(file: &Path, needle: &str, count: usize) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{needle:?} x{count} not in {}: {text:?}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            start.elapsed() < timeout,
            "rvmm still runs after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kvm_on_reboot_restart_boots_the_guest_again_with_fresh_devices_until_the_power_button() {
    if !kvm_available("--on-reboot restart") {
        return;
    }
    let dir = Scratch::new("restart");
    // The virtio-blk guest drives its disk from a fresh device, then resets: every boot must
    // find a device to set up again and the disk reopened.
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(512).collect();
    bytes.resize(1 << 20, 0);
    let disk = TempDisk::new("reboot-blk", &bytes);
    let serial = dir.path("serial.log");
    let events = dir.path("events.jsonl");
    let kernel = tiny_guest("virtio-blk");
    let mut vmm = Running(
        rvmm()
            .args([
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "64M",
                // The tiny guest has no ACPI: it finds the device on the command line.
                "--acpi=false",
                "--disk",
                &format!("path={},id=reboot", disk.path().display()),
                "--on-reboot",
                "restart",
                "--serial",
                &format!("file={}", serial.display()),
                "--event-monitor",
                &format!("path={}", events.display()),
            ])
            .spawn()
            .unwrap(),
    );
    let text = wait_for(&serial, "virtio-blk: done", 3);
    assert!(
        text.matches("virtio-blk: readback ok").count() >= 3,
        "{text}"
    );
    assert!(text.matches("virtio-blk: id reboot").count() >= 3, "{text}");
    assert!(
        vmm.0.try_wait().unwrap().is_none(),
        "a guest reset does not end the VMM"
    );
    let rebooted: Vec<Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == "vm.rebooted")
        .collect();
    assert!(rebooted.len() >= 2, "{rebooted:?}");
    assert_eq!(rebooted[0]["properties"]["cause"], "guest");

    // SIGTERM presses the power button: the guest's next reset is its power-off.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vmm.0.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(wait_exit(&mut vmm.0, Duration::from_secs(60)), Some(0));
    let last: Vec<String> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(last[last.len() - 2..], ["vm.shutdown", "vmm.shutdown"]);
}

#[test]
fn on_reboot_takes_restart_or_exit_and_names_the_flag_otherwise() {
    let out = rvmm()
        .args(["run", "--kernel", "/proc/self/exe", "--on-reboot", "reboot"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--on-reboot"), "{err}");
}
