//! Host disk faults the guest cannot see the cause of: a disk image on a full file system.
//! The guest gets IOERR; the host's operator gets a warning (rate limited) and a counter.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{call, parse_exposition, sample, wait_for_socket};
use common::{kvm_available, tiny_guest};
use rvmm_devices::image_lock::{ImageAccess, lock_image};

/// A private mount namespace (`unshare`) with a 1 MiB tmpfs holding a sparse 1 MiB disk and a
/// file that uses up the rest of the space, and rvmm started in it: nothing stays mounted on
/// the host, whatever happens to the test.
fn rvmm_on_a_full_file_system(mount: &str, rvmm_args: &[String]) -> std::process::Child {
    let script = r#"set -e
mount -t tmpfs -o size=1m rvmm-enospc "$0"
truncate -s 1M "$0/disk.img"
head -c 2M /dev/zero > "$0/fill" 2>/dev/null || true
exec "$@""#;
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            mount,
        ])
        .arg(env!("CARGO_BIN_EXE_rvmm"))
        .args(rvmm_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unshare(1) from util-linux")
}

fn wait_for_text(file: &std::path::Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{needle:?} not in {text:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kvm_a_full_file_system_is_a_warning_and_a_host_error_count_not_a_silent_ioerr() {
    if !kvm_available("disk on a full file system") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true runs as root: it needs a tmpfs mount"
        );
        eprintln!("SKIPPED disk on a full file system: mounting a tmpfs needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("rvmm-enospc-{}", std::process::id()));
    let mount: PathBuf = dir.join("fs");
    std::fs::create_dir_all(&mount).unwrap();
    let socket = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let disk = mount.join("disk.img");
    let args: Vec<String> = [
        "run",
        "--kernel",
        tiny_guest("virtio-blk").to_str().unwrap(),
        // The tiny guest finds its device on the command line, not in ACPI tables.
        "--acpi=false",
        "--memory",
        "64M",
        "--cmdline",
        "rvmm.hold=1",
        "--disk",
        &format!("path={},id=full", disk.display()),
        "--serial",
        &format!("file={}", serial.display()),
        "--api-socket",
        socket.to_str().unwrap(),
        "--grace-period-seconds",
        "1",
    ]
    .map(String::from)
    .into();
    let mut child = rvmm_on_a_full_file_system(mount.to_str().unwrap(), &args);
    wait_for_socket(&socket, Duration::from_secs(30));
    let text = wait_for_text(&serial, "virtio-blk: tick 1\n");
    assert!(text.contains("virtio-blk: write status 1"), "{text}");

    let scrape = call(&socket, "GET", "/metrics", None);
    let samples = parse_exposition(&scrape.body);
    let host_errors = sample(&samples, "rvmm_disk_host_errors_total", ("disk", "full"));
    assert!(host_errors >= Some(1.0), "{}", scrape.body);
    let counters = call(&socket, "GET", "/api/v1/vm.counters", None).json();
    assert!(
        counters["full"]["host_errors"].as_u64() >= Some(1),
        "{counters}"
    );

    // SAFETY: kill(2) on our own child (unshare exec'd sh, which exec'd rvmm).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let warning = format!(
        "WARN  rvmm_devices::virtio::block::handler] virtio-blk: host I/O error on {} (write): No \
         space left on device (os error 28)",
        disk.display()
    );
    assert!(stderr.contains(&warning), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn rvmm_run(args: &[&str]) -> (Option<i32>, String) {
    let out = common::run_rvmm(args, Duration::from_secs(60));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_disk_that_cannot_be_opened_for_writing_hints_at_readonly() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED read-only file system: mounting a tmpfs needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("rvmm-rofs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A read-only file system (EROFS even for root), in a private mount namespace.
    let script = r#"set -e
mount -t tmpfs rvmm-rofs "$0"
truncate -s 1M "$0/disk.img"
mount -o remount,ro "$0"
exec "$@""#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&dir)
        .arg(env!("CARGO_BIN_EXE_rvmm"))
        .args(["run", "--kernel", "/proc/self/exe", "--disk"])
        .arg(format!("path={}/disk.img", dir.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "Cannot open disk {}/disk.img for writing (readonly=on gives the guest a \
             read-only disk): Read-only file system",
            dir.display()
        )),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_same_disk_twice_is_refused_as_qemu_would() {
    let disk = common::fixtures::TempDisk::new("twice", &[0u8; 1 << 20]);
    let path = format!("path={}", disk.path().display());
    let (code, stderr) = rvmm_run(&[
        "run",
        "--kernel",
        "/proc/self/exe",
        "--disk",
        &path,
        "--disk",
        &path,
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "Cannot attach disk 1: Cannot lock the disk image: {} is in use by another VM or \
             another disk of this VM",
            disk.path().display()
        )),
        "{stderr}"
    );
}

/// QEMU with `drive` (`-drive` options), stopped before it runs anything (`-S`): a VM that
/// holds its image as QEMU does.
fn qemu_with_drive(drive: &str) -> std::process::Child {
    Command::new("qemu-system-x86_64")
        .args(["-S", "-nodefaults", "-display", "none", "-drive", drive])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (Debian's qemu-system-x86)")
}

/// Waits until someone else holds `path` so that taking it for `access` fails (QEMU took its
/// locks), probing with rvmm's own lock (released at once).
fn wait_until_held(path: &std::path::Path, access: ImageAccess) {
    let start = Instant::now();
    loop {
        let file = std::fs::File::open(path).unwrap();
        if lock_image(&file, path, access).is_err() {
            return;
        }
        drop(file);
        // QEMU starts slowly on a loaded machine (it emulates; no KVM here).
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{} never locked",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// rvmm with `disk` (`--disk` options) and a kernel that is not one: its stderr (the disk's
/// lock is taken before the kernel is read).
fn rvmm_with_disk(disk: &str) -> String {
    let junk = common::fixtures::TempDisk::new("junk-kernel", &[0x42; 8192]);
    let kernel = junk.path().to_str().unwrap();
    let (code, stderr) = rvmm_run(&["run", "--kernel", kernel, "--disk", disk]);
    assert_eq!(code, Some(2), "{stderr}");
    stderr
}

#[test]
fn a_disk_a_qemu_vm_writes_is_refused_and_read_only_users_share() {
    let disk = common::fixtures::TempDisk::new("qemu-lock", &[0u8; 1 << 20]);
    let image = disk.path().to_str().unwrap();
    let writer = format!("path={image}");
    let reader = format!("path={image},readonly=on");
    let mut qemu = qemu_with_drive(&format!("file={image},format=raw,if=virtio"));
    wait_until_held(disk.path(), ImageAccess::Read);
    // Refused as a writer and as a reader while QEMU writes it.
    for disk in [&writer, &reader] {
        let stderr = rvmm_with_disk(disk);
        assert!(stderr.contains("is in use by another VM"), "{stderr}");
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    // Read-only QEMU and read-only rvmm share it (rvmm gets as far as the kernel); a writer
    // is still refused.
    let mut qemu = qemu_with_drive(&format!("file={image},format=raw,if=virtio,readonly=on"));
    wait_until_held(disk.path(), ImageAccess::Write);
    let stderr = rvmm_with_disk(&reader);
    assert!(stderr.contains("neither an x86_64 ELF vmlinux"), "{stderr}");
    let stderr = rvmm_with_disk(&writer);
    assert!(stderr.contains("is in use by another VM"), "{stderr}");
    let _ = qemu.kill();
    let _ = qemu.wait();
}

#[test]
fn kvm_qemu_refuses_a_disk_rvmm_writes() {
    if !kvm_available("disk lock seen by QEMU") {
        return;
    }
    let disk = common::fixtures::TempDisk::new("locked-by-rvmm", &[0u8; 1 << 20]);
    let mut child = common::rvmm()
        .args(["run", "--kernel"])
        .arg(tiny_guest("ticker"))
        .args(["--memory", "64M", "--serial", "off", "--disk"])
        .arg(format!("path={}", disk.path().display()))
        .spawn()
        .unwrap();
    // Once rvmm holds the image, QEMU is started and must refuse it.
    wait_until_held(disk.path(), ImageAccess::Read);
    let mut qemu = qemu_with_drive(&format!(
        "file={},format=raw,if=virtio",
        disk.path().display()
    ));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = qemu.kill();
            panic!("QEMU runs with an image rvmm writes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut refused = String::new();
    qemu.stderr
        .take()
        .unwrap()
        .read_to_string(&mut refused)
        .unwrap();
    assert!(!status.success(), "{refused}");
    assert!(
        refused.contains("Failed to get \"write\" lock"),
        "{refused}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
