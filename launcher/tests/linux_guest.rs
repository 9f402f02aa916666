//! End to end: the Linux guest from guest-images/build boots on rvmm, its /init runs every
//! in-guest check and resets the VM. Needs KVM and the built image (scripts/test builds it and
//! sets RVMM_GUEST_IMAGE_DIR); skips with a reason without them, except under CI=true.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::linux::{base_cmdline, image_dir, manifest};
use common::netns::{GUEST_IP, HOST_IP, TestNetwork, test_network};
use common::{kvm_available, rvmm};

/// Emulated guests are slow here: about a minute to init.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

struct Boot {
    console: Vec<String>,
    init_marker_secs: Option<f64>,
    /// When `sigterm_at` was seen and SIGTERM sent, and how long rvmm took to exit after it.
    sigterm_to_exit_secs: Option<f64>,
    code: Option<i32>,
    stderr: String,
}

/// Boots the image with `extra` rvmm flags and `extra_cmdline` for the guest, echoing the
/// console and timing the init marker. When the console shows `sigterm_at`, rvmm gets SIGTERM.
fn boot_linux(
    dir: &Path,
    extra: &[&str],
    extra_cmdline: &str,
    sigterm_at: Option<&str>,
    net: Option<&TestNetwork>,
) -> Boot {
    let m = manifest(dir);
    let cmdline = format!("{} {extra_cmdline}", base_cmdline(&m));
    let mut args: Vec<&str> = vec![
        "run",
        "--kernel",
        &m["vmlinux"],
        "--initrd",
        &m["initramfs"],
        "--cmdline",
        &cmdline,
        "--memory",
        "256M",
    ];
    args.extend_from_slice(extra);
    run_rvmm(&args, sigterm_at, net)
}

/// Runs `rvmm` with `args`, echoing the console and timing the init marker. When the console
/// shows `sigterm_at`, rvmm gets SIGTERM.
fn run_rvmm(args: &[&str], sigterm_at: Option<&str>, net: Option<&TestNetwork>) -> Boot {
    let start = Instant::now();
    let mut command = match net {
        Some(net) => {
            let mut c = net.command(env!("CARGO_BIN_EXE_rvmm"));
            c.stdin(Stdio::null()).stdout(Stdio::piped());
            c
        }
        None => rvmm(),
    };
    let mut child = command
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rvmm");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let mut init_marker_secs = None;
    let mut sigterm_sent: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((at, line)) => {
                let line = line.trim_end_matches('\r').to_string();
                eprintln!("[{:7.2}] {line}", at.as_secs_f64());
                if line.starts_with("RVMM-INIT ") && init_marker_secs.is_none() {
                    init_marker_secs = Some(at.as_secs_f64());
                }
                if sigterm_at == Some(line.as_str()) && sigterm_sent.is_none() {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    sigterm_sent = Some(Instant::now());
                }
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if start.elapsed() > BOOT_TIMEOUT {
                    let _ = child.kill();
                    panic!("guest did not finish within {BOOT_TIMEOUT:?}");
                }
            }
        }
    }
    let output = child.wait_with_output().unwrap();
    Boot {
        console,
        init_marker_secs,
        sigterm_to_exit_secs: sigterm_sent.map(|t| t.elapsed().as_secs_f64()),
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

const NC_PORT: u16 = 7777;

/// Accepts one TCP connection on argv[1]:argv[2], saves up to 64 KiB it receives to argv[3].
const TCP_SINK: &str = r#"
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(900)
conn, _ = srv.accept()
conn.settimeout(120)
data = b""
while len(data) < 65536:
    chunk = conn.recv(65536 - len(data))
    if not chunk:
        break
    data += chunk
open(sys.argv[3], "wb").write(data)
conn.close()
"#;

/// Reads `path` out of an ext4 image with debugfs (e2fsprogs), as the host sees the file.
fn read_from_ext4(image: &Path, path: &str) -> Vec<u8> {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), image.to_str().unwrap()])
        .output()
        .expect("run debugfs (e2fsprogs)");
    out.stdout
}

#[test]
fn kvm_linux_guest_boots_to_init_passes_its_checks_and_resets() {
    let test = "linux guest";
    let Some(dir) = image_dir(test) else { return };
    if !kvm_available(test) {
        return;
    }
    // The guest writes to its disk: a copy keeps the built image pristine.
    let disk = std::env::temp_dir().join(format!("rvmm-e2e-{}.ext4", std::process::id()));
    std::fs::copy(&manifest(&dir)["rootfs"], &disk).unwrap();
    let disk_option = format!("path={},id=rootfs,engine=io_uring", disk.display());
    let Some(net) = test_network("e2e") else {
        return;
    };
    let received = std::env::temp_dir().join(format!("rvmm-e2e-{}.nc", std::process::id()));
    let mut listener = net
        .command("python3")
        .args([
            "-c",
            TCP_SINK,
            HOST_IP,
            &NC_PORT.to_string(),
            received.to_str().unwrap(),
        ])
        .spawn()
        .expect("start the TCP listener");
    let cmdline = format!("rvmm.ip={GUEST_IP} rvmm.peer={HOST_IP} rvmm.nc_port={NC_PORT}");
    let flags = ["--rng", "--disk", &disk_option, "--net", "tap=tap0,id=eth0"];
    let boot = boot_linux(&dir, &flags, &cmdline, None, Some(&net));
    let written = read_from_ext4(&disk, "/guest-wrote.txt");
    let random = read_from_ext4(&disk, "/random.bin");
    std::fs::remove_file(&disk).unwrap();
    let _ = listener.kill();
    let _ = listener.wait();
    let sent = std::fs::read(&received).unwrap_or_default();
    let _ = std::fs::remove_file(&received);

    assert_eq!(boot.code, Some(0), "rvmm failed: {}", boot.stderr);
    let secs = boot
        .init_marker_secs
        .expect("no RVMM-INIT marker on the console");
    eprintln!("rvmm start to init marker: {secs:.1} s");
    let checks: Vec<&String> = boot
        .console
        .iter()
        .filter(|l| l.starts_with("RVMM-CHECK "))
        .collect();
    assert!(!checks.is_empty(), "no checks ran");
    let failed: Vec<&&String> = checks.iter().filter(|l| l.contains(" FAIL")).collect();
    assert!(failed.is_empty(), "failed checks: {failed:?}");
    for required in ["proc", "cmdline", "memory", "rng", "blk", "net"] {
        let ok = format!("RVMM-CHECK {required} ok");
        assert!(boot.console.contains(&ok), "missing '{ok}'");
    }
    assert!(boot.console.contains(&"RVMM-DONE".to_string()));
    // Synced by the guest before its reset, so on the host file after rvmm exits.
    assert_eq!(
        String::from_utf8_lossy(&written),
        "written by the rvmm guest\n"
    );
    // What the guest sent over TCP through virtio-net and the tap, byte for byte.
    assert_eq!(sent.len(), 65536, "bytes received over TCP");
    assert_eq!(random.len(), 1 << 20, "random.bin read back from the image");
    assert!(
        sent == random[..65536],
        "TCP payload differs from random.bin"
    );
}

#[test]
fn kvm_sigterm_shuts_the_linux_guest_down_through_ctrl_alt_del() {
    let test = "linux graceful shutdown";
    let Some(dir) = image_dir(test) else { return };
    if !kvm_available(test) {
        return;
    }
    // A grace period far longer than the guest needs: an exit well before it is the guest's
    // own reboot, not the timer.
    let flags = ["--grace-period-seconds", "240"];
    let boot = boot_linux(&dir, &flags, "rvmm.hold", Some("RVMM-HOLD"), None);
    assert_eq!(boot.code, Some(0), "rvmm failed: {}", boot.stderr);
    let after = boot
        .sigterm_to_exit_secs
        .expect("the guest never reached RVMM-HOLD");
    eprintln!("SIGTERM to rvmm exit: {after:.1} s");
    assert!(
        after < 120.0,
        "took {after:.1} s: the grace timer, not the guest, ended the VM"
    );
    assert!(
        boot.console
            .iter()
            .any(|l| l.contains("reboot: Restarting system")),
        "the guest did not reboot on Ctrl-Alt-Del"
    );
    assert!(boot.stderr.contains("Ctrl-Alt-Del"), "{}", boot.stderr);
}

/// The checks every boot of the test guest must pass.
fn assert_checks(boot: &Boot, required: &[&str]) {
    assert_eq!(boot.code, Some(0), "rvmm failed: {}", boot.stderr);
    let failed: Vec<&String> = boot
        .console
        .iter()
        .filter(|l| l.starts_with("RVMM-CHECK ") && l.contains(" FAIL"))
        .collect();
    assert!(failed.is_empty(), "failed checks: {failed:?}");
    for required in required {
        let ok = format!("RVMM-CHECK {required} ok");
        assert!(boot.console.contains(&ok), "missing '{ok}'");
    }
    assert!(boot.console.contains(&"RVMM-DONE".to_string()));
}

/// `qemu-img check`'s exit status and report.
fn qemu_img_check(image: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", image.to_str().unwrap()])
        .output()
        .expect("run qemu-img (qemu-utils)");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The bytes of partition 2 (the ext4 root, from 2 MiB) of `image` as QEMU reads it.
fn root_partition(image: &Path, offset_mib: u64) -> PathBuf {
    let raw = image.with_extension("raw");
    let status = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&raw).unwrap();
    let part = image.with_extension("part");
    std::fs::write(&part, &bytes[(offset_mib << 20) as usize..]).unwrap();
    std::fs::remove_file(raw).unwrap();
    part
}

#[test]
fn kvm_linux_boots_from_a_qcow2_overlay_of_its_cloud_image_without_a_kernel() {
    let test = "linux disk boot";
    let Some(dir) = image_dir(test) else { return };
    if !kvm_available(test) {
        return;
    }
    let m = manifest(&dir);
    let base = PathBuf::from(&m["disk_grub"]);
    let before = std::fs::read(&base).unwrap();
    let work = std::env::temp_dir().join(format!("rvmm-diskboot-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let overlay = work.join("overlay.qcow2");
    // The overlay QEMU's own tool makes over the cloud image (as virt-launcher does).
    let status = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
        ])
        .arg(&overlay)
        .status()
        .expect("run qemu-img (qemu-utils)");
    assert!(status.success());
    let disk = format!("path={},id=root", overlay.display());
    // No --kernel and no --cmdline: GRUB's default entry, as grub-mkconfig wrote it.
    let boot = run_rvmm(
        &["run", "--disk", &disk, "--rng", "--memory", "256M"],
        None,
        None,
    );
    eprintln!(
        "rvmm start to init marker: {:.1} s",
        boot.init_marker_secs.unwrap_or(f64::NAN)
    );
    // cmdline: console=ttyS0 was added by rvmm (the entry has none); blk: the root
    // partition /dev/vda2 mounted, checked and written.
    assert_checks(&boot, &["proc", "cmdline", "memory", "rng", "blk"]);
    assert!(
        !boot
            .console
            .iter()
            .any(|l| l.contains("rvmm.entry=recovery")),
        "booted the submenu's entry"
    );
    let (code, report) = qemu_img_check(&overlay);
    assert_eq!(code, Some(0), "qemu-img check: {report}");
    let part = root_partition(&overlay, 2);
    let written = read_from_ext4(&part, "/guest-wrote.txt");
    assert_eq!(
        String::from_utf8_lossy(&written),
        "written by the rvmm guest\n"
    );
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the backing image changed"
    );
    std::fs::remove_dir_all(&work).unwrap();
}
