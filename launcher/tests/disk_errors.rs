//! Host disk faults the guest cannot see the cause of: a disk image on a full file system.
//! The guest gets IOERR; the host's operator gets a warning (rate limited) and a counter.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{call, parse_exposition, sample, wait_for_socket};
use common::{kvm_available, tiny_guest};

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
        "WARN  devices::virtio::block::handler] virtio-blk: host I/O error on {} (write): No \
         space left on device (os error 28)",
        disk.display()
    );
    assert!(stderr.contains(&warning), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
