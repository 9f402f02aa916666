//! `rvmm run` with bad input: one clear line naming the flag or path, the right exit code,
//! never a panic. None of these reach KVM, so they run everywhere.

mod common;

use std::time::Duration;

use common::{run_rvmm, tiny_guest};

fn rejected(args: &[&str]) -> (i32, String) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let out = run_rvmm(&full, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{args:?}: {stderr}");
    (out.status.code().unwrap(), stderr)
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("rvmm-cfg-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn missing_kernel_names_the_flag_and_path() {
    let (code, stderr) = rejected(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--kernel: /nonexistent/vmlinux"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn a_kernel_file_that_is_not_a_kernel_names_the_path() {
    let junk = temp_file("junk", &[0x42; 8192]);
    let (code, stderr) = rejected(&["--kernel", junk.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains(junk.to_str().unwrap()), "{stderr}");
    assert!(
        stderr.contains("neither an x86_64 ELF vmlinux nor a bzImage"),
        "{stderr}"
    );
    std::fs::remove_file(junk).unwrap();
}

#[test]
fn too_little_memory_zero_vcpus_and_bad_sizes_name_their_flags() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--memory", "8M"],
            "--memory: Guest memory of 8388608 bytes is below the minimum",
        ),
        (&["--memory", "lots"], "--memory: 'lots' is not a size"),
        (&["--vcpus", "0"], "--vcpus: 0 is out of range"),
        (&["--serial", "tty"], "--serial: 'tty'"),
    ];
    for (extra, message) in cases {
        let mut args = vec!["--kernel", "/proc/self/exe"];
        args.extend_from_slice(extra);
        let (code, stderr) = rejected(&args);
        assert_eq!(code, 2, "{extra:?}");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
    }
}

#[test]
fn unparsable_vcpu_count_is_a_usage_error() {
    let (code, stderr) = rejected(&["--kernel", "/proc/self/exe", "--vcpus", "many"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--vcpus"), "{stderr}");
}

#[test]
fn unopenable_kvm_device_is_a_vmm_error_naming_the_device() {
    // A valid kernel, so the failure is the device's.
    let kernel = tiny_guest("hello");
    let (code, stderr) = rejected(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("Cannot open /nonexistent/kvm"), "{stderr}");
}

#[test]
fn missing_disk_path_names_the_disk_entry() {
    let kernel = tiny_guest("hello");
    let (code, stderr) = rejected(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        "path=/nonexistent/pvc/disk.img,id=pvc",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--disk[0] path: /nonexistent/pvc/disk.img: No such file"),
        "{stderr}"
    );
}

#[test]
fn missing_tap_and_bad_mac_name_the_net_entry() {
    let kernel = tiny_guest("hello");
    let k = kernel.to_str().unwrap();
    let (code, stderr) = rejected(&["--kernel", k, "--net", "tap=rvmmnotap0"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("Cannot attach network interface 0: Tap rvmmnotap0 does not exist"),
        "{stderr}"
    );
    let (code, stderr) = rejected(&["--kernel", k, "--net", "tap=tap0,mac=02:00:00:00:00"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--net[0] mac: '02:00:00:00:00' is not like 52:54:00:12:34:56"),
        "{stderr}"
    );
}

#[test]
fn config_on_a_fifo_or_a_device_fails_at_once_naming_the_path() {
    let fifo = std::env::temp_dir().join(format!("rvmm-cfg-{}-fifo", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    for path in [fifo.to_str().unwrap(), "/dev/zero"] {
        let started = std::time::Instant::now();
        let (code, stderr) = rejected(&["--config", path]);
        assert!(started.elapsed() < Duration::from_secs(1), "{path}");
        assert_eq!(code, 2, "{path}: {stderr}");
        assert_eq!(
            stderr.trim_end(),
            format!("rvmm: --config {path}: {path} is not a regular file")
        );
    }
    std::fs::remove_file(fifo).unwrap();
}

#[test]
fn a_kvm_device_that_is_not_kvm_says_so() {
    let kernel = tiny_guest("hello");
    let (code, stderr) = rejected(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--kvm-device",
        "/dev/null",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("/dev/null is not a KVM device"), "{stderr}");
    assert!(!stderr.contains("KVM_CAP"), "{stderr}");
}

#[test]
fn one_bad_value_names_the_flag_on_the_command_line_and_the_field_in_a_config_file() {
    let (code, flags) = rejected(&[
        "--kernel",
        "/proc/self/exe",
        "--disk",
        "path=/proc/self/exe",
        "--disk",
        "path=/nonexistent/b.img",
    ]);
    assert_eq!(code, 2);
    let config = temp_file(
        "disks.json",
        br#"{"payload": {"kernel": "/proc/self/exe"},
            "disks": [{"path": "/proc/self/exe"}, {"path": "/nonexistent/b.img"}]}"#,
    );
    let (code, file) = rejected(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    let reason = "/nonexistent/b.img: No such file or directory";
    assert_eq!(
        flags.trim_end(),
        format!("rvmm: --disk[1] path: {reason} (os error 2)")
    );
    assert_eq!(
        file.trim_end(),
        format!(
            "rvmm: --config {}: disks[1].path: {reason} (os error 2)",
            config.display()
        )
    );
    std::fs::remove_file(config).unwrap();
}
