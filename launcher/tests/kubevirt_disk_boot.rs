//! Boot from a disk in virt-launcher mode: a VMI without kernelBoot whose containerDisk is the
//! Linux test guest's qcow2 cloud-style disk, driven through KubeVirt's gRPC flow. Needs KVM
//! and the image from guest-images/build (RVMM_GUEST_IMAGE_DIR); skips with a reason without
//! them, except under CI=true.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::kubevirt::{Handler, Launcher, Pod, fake_virt_handler, next_event_within};
use common::kvm_available;
use common::linux::{image_dir, manifest};
use rvmm_launcher::kubevirt::grpc::GrpcRuntime;
use serde_json::json;

/// The Linux test guest's cloud-style disk `key` of the manifest (guest-images/build), or
/// `None` (with the reason) when it is not built; CI=true requires it.
fn linux_disk(test: &str, key: &str) -> Option<PathBuf> {
    let dir = image_dir(test)?;
    manifest(&dir).get(key).map(PathBuf::from)
}

/// Reads the serial console socket until a line equals `until` (10 minutes at most: the
/// guest runs under emulation here), echoing and returning every line.
fn console_until(socket: &Path, until: &str) -> Vec<String> {
    use std::io::BufRead;
    let start = Instant::now();
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "console {}: {e}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(stream).lines() {
        let line = line.expect("console output within 10 minutes");
        let line = line.trim_end_matches('\r').to_string();
        eprintln!("[{:7.2}] {line}", start.elapsed().as_secs_f64());
        let done = line == until;
        lines.push(line);
        if done {
            return lines;
        }
    }
    panic!("console closed before '{until}'");
}

#[test]
fn kvm_linux_vmi_boots_its_qcow2_container_disk_sees_nocloud_and_shuts_down_gracefully() {
    let test = "virt-launcher disk boot";
    let Some(image) = linux_disk(test, "disk_bls") else {
        return;
    };
    if !kvm_available(test) {
        return;
    }
    let pod = Pod::new("disk");
    // The containerDisk as the container-disk container exposes it: disk_0.img, qcow2.
    let container_disk = pod.path("cd/disk_0.img");
    std::fs::copy(&image, &container_disk).unwrap();
    let before = std::fs::read(&container_disk).unwrap();
    // The serial socket lives in KubeVirt's fixed private directory, under the VMI's UID.
    let uid = format!("uid-disk-{}", std::process::id());
    let private = Path::new("/var/run/kubevirt-private").join(&uid);
    let runtime = GrpcRuntime::start().unwrap();
    let (events, _k8s_events) = fake_virt_handler(&runtime, &pod);
    let mut args: Vec<String> = [
        "virt-launcher",
        "--name",
        "testvm",
        "--namespace",
        "default",
        "--uid",
        &uid,
    ]
    .map(String::from)
    .into();
    args.extend(pod.flags());
    let mut launcher = Launcher::start(Path::new(env!("CARGO_BIN_EXE_rvmm")), &args, &pod);
    launcher.wait_for(&pod.ready_socket(), Duration::from_secs(10));
    let handler = Handler::connect(&runtime, &pod.ready_socket());
    // No kernelBoot: rvmm boots what the disk's BLS entries name; the guest holds (the
    // user-data says so) until virt-handler shuts it down.
    let vmi = json!({
        "metadata": {"name": "testvm", "namespace": "default", "uid": uid},
        "spec": {
            "domain": {
                "firmware": {"bootloader": {"efi": {"secureBoot": false}}},
                "devices": {
                    "disks": [
                        {"name": "containerdisk", "disk": {"bus": "virtio"}, "bootOrder": 1},
                        {"name": "cloudinitdisk", "disk": {"bus": "virtio"}}
                    ],
                    "rng": {}
                },
                "memory": {"guest": "256Mi"}
            },
            "volumes": [
                {"name": "containerdisk", "containerDisk": {"image": "example.com/rvmm-test:bls"}},
                {"name": "cloudinitNoCloud", "cloudInitNoCloud": {}}
            ],
            "terminationGracePeriodSeconds": 240
        }
    });
    let mut vmi = vmi;
    vmi["spec"]["volumes"][1] = json!({"name": "cloudinitdisk", "cloudInitNoCloud": {
        "userData": "#cloud-config\n# rvmm-nocloud: seen-by-guest\n# rvmm.hold\n"
    }});
    let sync = handler.vmi_command("Sync", &vmi);
    assert_eq!(sync, (true, String::new()), "log:\n{}", launcher.log());
    let domain = handler.domain().unwrap();
    let disk = &domain["Spec"]["Devices"]["Disks"][0];
    assert_eq!(disk["Driver"]["Type"], "qcow2");
    assert_eq!(disk["BackingStore"]["Format"]["Type"], "qcow2");
    assert_eq!(
        disk["BackingStore"]["Source"]["File"],
        json!(container_disk)
    );
    assert_eq!(disk["BootOrder"], json!({"Order": 1}));
    assert_eq!(domain["Spec"]["OS"]["Kernel"], "");

    let console = console_until(&private.join("virt-serial0"), "RVMM-HOLD");
    let checks: Vec<&String> = console
        .iter()
        .filter(|l| l.starts_with("RVMM-CHECK "))
        .collect();
    assert!(
        !checks.iter().any(|l| l.contains(" FAIL")),
        "failed checks: {checks:?}"
    );
    for required in ["cmdline", "rng", "blk", "nocloud"] {
        let ok = format!("RVMM-CHECK {required} ok");
        assert!(console.contains(&ok), "missing '{ok}' in {checks:?}");
    }
    assert!(
        console
            .iter()
            .any(|l| l.starts_with("RVMM-NOCLOUD /dev/vdb rvmm-nocloud: seen-by-guest"))
    );
    assert!(
        !console.iter().any(|l| l.contains("rvmm.entry=old")),
        "booted the older BLS entry"
    );

    // Graceful shutdown: the ACPI power button, the guest powers off, the VM ends.
    assert!(handler.vmi_command("Shutdown", &vmi).0);
    let start = Instant::now();
    loop {
        let (_, state, reason, _) = next_event_within(&events, Duration::from_secs(300));
        if state == "Shutoff" {
            assert_eq!(reason, "Shutdown");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no Shutoff");
    }
    assert!(handler.vmi_command("Delete", &vmi).0);
    launcher.sigterm();
    assert_eq!(
        launcher.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        launcher.log()
    );
    let _ = std::fs::remove_dir_all(&private);

    // The container disk is untouched; the guest's writes are in the overlay.
    assert!(
        std::fs::read(&container_disk).unwrap() == before,
        "the containerDisk changed"
    );
    let overlay = pod.path("ephemeral/disk-data/containerdisk/disk.qcow2");
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&overlay)
        .output()
        .expect("qemu-img");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = pod.path("overlay.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&overlay)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&raw).unwrap();
    // The root filesystem is partition 2, 42 MiB in.
    let part = pod.path("root.ext4");
    std::fs::write(&part, &bytes[42 << 20..]).unwrap();
    let out = Command::new("debugfs")
        .args(["-R", "cat /guest-wrote.txt"])
        .arg(&part)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "written by the rvmm guest\n"
    );
}
