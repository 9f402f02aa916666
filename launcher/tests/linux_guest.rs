//! End to end: the Linux guest from guest-images/build boots on rvmm, its /init runs every
//! in-guest check and the VM ends as the guest decides: a reset, Ctrl-Alt-Del without ACPI, a
//! power-off on the ACPI power button. One boot per platform: virtio-mmio from the DSDT,
//! virtio-mmio from the command line without ACPI, virtio-pci with MSI-X; and one boot from a
//! qcow2 overlay of a cloud-style disk, without a kernel from outside. Needs KVM and the
//! built image (scripts/test builds it and sets RVMM_GUEST_IMAGE_DIR); skips with a reason
//! without them, except under CI=true.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::http::call;
use common::linux::{base_cmdline, image_dir, manifest};
use common::netns::{GUEST_IP, HOST_IP, TestNetwork, test_network};
use common::{kvm_available, rvmm};

/// Emulated guests are slow here: a minute or two to init on an idle machine, several times
/// that when other work shares the cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// One Linux guest at a time: emulated guests booting side by side only slow each other down
/// (and each boot's timeout starts once it has the machine to itself).
static ONE_BOOT_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Boot {
    console: Vec<String>,
    init_marker_secs: Option<f64>,
    /// When the `act_at` line was seen and the action taken, how long rvmm took to exit after.
    action_to_exit_secs: Option<f64>,
    code: Option<i32>,
    stderr: String,
}

/// What the test does to a guest holding in its /init.
enum Action<'a> {
    /// SIGTERM to rvmm.
    Sigterm,
    /// `vm.power-button` on this API socket.
    PowerButton(&'a Path),
}

/// Boots the image with `extra` rvmm flags and `extra_cmdline` for the guest, echoing the
/// console and timing the init marker. When the console shows the line of `act_at`, the test
/// takes its action.
fn boot_linux(
    dir: &Path,
    extra: &[&str],
    extra_cmdline: &str,
    act_at: Option<(&str, Action<'_>)>,
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
    run_rvmm(&args, act_at, net)
}

/// Runs `rvmm` with `args`, echoing the console and timing the init marker; takes the action
/// of `act_at` when the console shows its line.
fn run_rvmm(args: &[&str], act_at: Option<(&str, Action<'_>)>, net: Option<&TestNetwork>) -> Boot {
    let _turn = ONE_BOOT_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let start = Instant::now();
    let mut command = match net {
        Some(net) => {
            let mut c = net.command(env!("CARGO_BIN_EXE_rvmm"));
            c.stdin(Stdio::null()).stdout(Stdio::piped());
            c
        }
        None => rvmm(),
    };
    // Info messages too: what rvmm did to the guest, for the assertions.
    let mut child = command
        .args(args)
        .env("RUST_LOG", "info")
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
    let mut acted: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((at, line)) => {
                let line = line.trim_end_matches('\r').to_string();
                eprintln!("[{:7.2}] {line}", at.as_secs_f64());
                if line.starts_with("RVMM-INIT ") && init_marker_secs.is_none() {
                    init_marker_secs = Some(at.as_secs_f64());
                }
                if let Some((trigger, action)) = &act_at
                    && trigger == &line.as_str()
                    && acted.is_none()
                {
                    match action {
                        // SAFETY: kill(2) on our own child's pid.
                        Action::Sigterm => unsafe {
                            libc::kill(child.id() as i32, libc::SIGTERM);
                        },
                        Action::PowerButton(socket) => {
                            let answer = call(socket, "PUT", "/api/v1/vm.power-button", None);
                            assert_eq!(answer.status, 204, "{answer:?}");
                        }
                    }
                    acted = Some(Instant::now());
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
        action_to_exit_secs: acted.map(|t| t.elapsed().as_secs_f64()),
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

impl Boot {
    /// rvmm exited 0, init ran, no check failed, the `ok` ones did and `skipped` were skipped.
    fn assert_checks(&self, ok: &[&str], skipped: &[&str]) {
        assert_eq!(self.code, Some(0), "rvmm failed: {}", self.stderr);
        let secs = self
            .init_marker_secs
            .expect("no RVMM-INIT marker on the console");
        eprintln!("rvmm start to init marker: {secs:.1} s");
        let failed: Vec<&String> = self
            .console
            .iter()
            .filter(|l| l.starts_with("RVMM-CHECK ") && l.contains(" FAIL"))
            .collect();
        assert!(failed.is_empty(), "failed checks: {failed:?}");
        for name in ok {
            let line = format!("RVMM-CHECK {name} ok");
            assert!(self.console.contains(&line), "missing '{line}'");
        }
        for name in skipped {
            let prefix = format!("RVMM-CHECK {name} skip");
            assert!(
                self.console.iter().any(|l| l.starts_with(&prefix)),
                "missing '{prefix}'"
            );
        }
        assert!(self.console.contains(&"RVMM-DONE".to_string()));
    }

    fn printed(&self, line: &str) -> bool {
        self.console.iter().any(|l| l.contains(line))
    }
}

/// A copy of the image's ext4 disk for one boot (the guest writes to it).
fn disk_copy(dir: &Path, tag: &str) -> PathBuf {
    let disk = std::env::temp_dir().join(format!("rvmm-{tag}-{}.ext4", std::process::id()));
    std::fs::copy(&manifest(dir)["rootfs"], &disk).unwrap();
    disk
}

const NC_PORT: u16 = 7777;

/// Accepts one TCP connection on argv[1]:argv[2], saves up to 64 KiB it receives to argv[3].
const TCP_SINK: &str = r#"
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(3600)
conn, _ = srv.accept()
conn.settimeout(600)
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

/// A TCP listener in `net` that saves what it receives to a file, and the file.
struct TcpSink {
    listener: std::process::Child,
    received: PathBuf,
}

impl TcpSink {
    fn start(net: &TestNetwork, tag: &str) -> Self {
        let received = std::env::temp_dir().join(format!("rvmm-{tag}-{}.nc", std::process::id()));
        let listener = net
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
        Self { listener, received }
    }

    /// Stops the listener; what it received.
    fn finish(mut self) -> Vec<u8> {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        std::fs::read(&self.received).unwrap_or_default()
    }
}

impl Drop for TcpSink {
    /// Also when a test fails half way: no listener or file is left behind.
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        let _ = std::fs::remove_file(&self.received);
    }
}

/// The guest's writes reached the disk image, and what it sent over TCP through virtio-net and
/// the tap is the image's random.bin, byte for byte.
fn assert_disk_and_network_io(disk: &Path, sent: &[u8]) {
    let written = read_from_ext4(disk, "/guest-wrote.txt");
    let random = read_from_ext4(disk, "/random.bin");
    std::fs::remove_file(disk).unwrap();
    // Synced by the guest before it ended, so on the host file after rvmm exits.
    assert_eq!(
        String::from_utf8_lossy(&written),
        "written by the rvmm guest\n"
    );
    assert_eq!(sent.len(), 65536, "bytes received over TCP");
    assert_eq!(random.len(), 1 << 20, "random.bin read back from the image");
    assert!(
        sent == &random[..65536],
        "TCP payload differs from random.bin"
    );
}

fn network_cmdline() -> String {
    format!("rvmm.ip={GUEST_IP} rvmm.peer={HOST_IP} rvmm.nc_port={NC_PORT}")
}

/// What a boot with disk and network I/O needs: the image, a copy of its disk, a network
/// namespace with a tap and a TCP sink on the host side.
struct IoBoot {
    dir: PathBuf,
    disk: PathBuf,
    net: TestNetwork,
    sink: TcpSink,
}

impl IoBoot {
    /// `None` (the test skips) without the image, KVM or a network namespace.
    fn prepare(test: &str, tag: &str) -> Option<Self> {
        let dir = image_dir(test)?;
        if !kvm_available(test) {
            return None;
        }
        let net = test_network(tag)?;
        let sink = TcpSink::start(&net, tag);
        let disk = disk_copy(&dir, tag);
        Some(Self {
            dir,
            disk,
            net,
            sink,
        })
    }

    /// Checks what the guest wrote to the disk and sent over TCP.
    fn finish(self) {
        let sent = self.sink.finish();
        assert_disk_and_network_io(&self.disk, &sent);
    }
}

#[test]
fn kvm_linux_guest_finds_its_mmio_devices_in_the_dsdt_passes_its_checks_and_resets_through_acpi() {
    let Some(io) = IoBoot::prepare("linux guest, virtio-mmio with ACPI", "e2e") else {
        return;
    };
    let disk_option = format!("path={},id=rootfs,engine=io_uring", io.disk.display());
    // reboot=a after the image's reboot=k: the guest's `reboot -f` writes the ACPI reset
    // register.
    let cmdline = format!("{} rvmm.virtio_bus=acpi reboot=a", network_cmdline());
    let flags = ["--rng", "--disk", &disk_option, "--net", "tap=tap0,id=eth0"];
    let boot = boot_linux(&io.dir, &flags, &cmdline, None, Some(&io.net));
    boot.assert_checks(
        &[
            "proc",
            "cmdline",
            "memory",
            "rng",
            "blk",
            "net",
            "virtio_bus",
            "acpi",
        ],
        &["pci_irq"],
    );
    // The guest's `reboot -f`: a reset through ACPI, the end of a microVM.
    assert!(boot.printed("reboot: Restarting system"));
    assert!(
        boot.stderr
            .contains("The guest wrote the ACPI reset register"),
        "{}",
        boot.stderr
    );
    io.finish();
}

#[test]
fn kvm_linux_guest_without_acpi_finds_its_devices_on_the_command_line_and_sigterm_sends_ctrl_alt_del()
 {
    let test = "linux guest without ACPI";
    let Some(dir) = image_dir(test) else { return };
    if !kvm_available(test) {
        return;
    }
    let disk = disk_copy(&dir, "noacpi");
    let disk_option = format!("path={}", disk.display());
    // A grace period far longer than the guest needs: an exit well before it is the guest's
    // own reboot, not the timer.
    let flags = [
        "--acpi=false",
        "--rng",
        "--disk",
        &disk_option,
        "--grace-period-seconds",
        "240",
    ];
    let cmdline = "rvmm.hold rvmm.virtio_bus=cmdline";
    let boot = boot_linux(
        &dir,
        &flags,
        cmdline,
        Some(("RVMM-HOLD", Action::Sigterm)),
        None,
    );
    std::fs::remove_file(&disk).unwrap();
    boot.assert_checks(&["rng", "blk", "virtio_bus"], &["acpi", "pci_irq"]);
    let after = boot
        .action_to_exit_secs
        .expect("the guest never reached RVMM-HOLD");
    eprintln!("SIGTERM to rvmm exit: {after:.1} s");
    assert!(
        after < 120.0,
        "took {after:.1} s: the grace timer, not the guest, ended the VM"
    );
    assert!(
        boot.printed("reboot: Restarting system"),
        "the guest did not reboot on Ctrl-Alt-Del"
    );
    assert!(boot.stderr.contains("Ctrl-Alt-Del"), "{}", boot.stderr);
}

#[test]
fn kvm_pci_linux_guest_uses_virtio_pci_with_msix_and_powers_off_on_the_power_button() {
    let Some(io) = IoBoot::prepare("linux guest on PCI", "pci") else {
        return;
    };
    let disk_option = format!("path={},id=rootfs", io.disk.display());
    let socket = std::env::temp_dir().join(format!("rvmm-pci-{}.sock", std::process::id()));
    let events_path = std::env::temp_dir().join(format!("rvmm-pci-{}.events", std::process::id()));
    let socket_flag = socket.to_str().unwrap();
    let events_flag = format!("path={}", events_path.display());
    let flags = [
        "--transport",
        "pci",
        "--rng",
        "--disk",
        &disk_option,
        "--net",
        "tap=tap0,id=eth0",
        "--api-socket",
        socket_flag,
        "--event-monitor",
        &events_flag,
    ];
    let cmdline = format!("{} rvmm.virtio_bus=pci rvmm.hold", network_cmdline());
    let action = Action::PowerButton(&socket);
    let boot = boot_linux(
        &io.dir,
        &flags,
        &cmdline,
        Some(("RVMM-HOLD", action)),
        Some(&io.net),
    );
    let events = std::fs::read_to_string(&events_path).unwrap_or_default();
    let _ = std::fs::remove_file(&events_path);
    boot.assert_checks(
        &[
            "proc",
            "cmdline",
            "memory",
            "rng",
            "blk",
            "net",
            "virtio_bus",
            "pci_irq",
            "acpi",
        ],
        &[],
    );
    let after = boot
        .action_to_exit_secs
        .expect("the guest never reached RVMM-HOLD");
    eprintln!("vm.power-button to rvmm exit: {after:.1} s");
    assert!(boot.printed("RVMM-POWER-BUTTON"), "no power button event");
    assert!(
        boot.printed("reboot: Power down"),
        "the guest did not power off"
    );
    // rvmm ended on its own, exit 0, the stop reason a power-off.
    let shutdown = events
        .lines()
        .find(|l| l.contains("\"vm.shutdown\""))
        .unwrap_or_else(|| panic!("no vm.shutdown event in {events}"));
    assert!(shutdown.contains("Guest powered off"), "{shutdown}");
    io.finish();
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

/// The bytes of `image` from `offset_mib` on (a partition) as QEMU reads the image.
fn partition_from(image: &Path, offset_mib: u64) -> PathBuf {
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
    // cmdline: console=ttyS0 was added by rvmm (the entry has none); blk: the root
    // partition /dev/vda2 mounted, checked and written.
    boot.assert_checks(&["proc", "cmdline", "memory", "rng", "blk"], &[]);
    assert!(
        !boot.printed("rvmm.entry=recovery"),
        "booted the submenu's entry"
    );
    let (code, report) = qemu_img_check(&overlay);
    assert_eq!(code, Some(0), "qemu-img check: {report}");
    let part = partition_from(&overlay, 2);
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
