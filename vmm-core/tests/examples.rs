//! KVM tests running the examples (vmm-core/examples) against tiny freestanding guests.

mod common;

#[path = "../../launcher/tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::process::{Command, Output};

use common::{example, kvm_available, tiny_guest};
use netns::{GUEST_IP, HOST_IP, test_network};

fn run(command: &mut Command) -> (Output, String) {
    let out = command.output().expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    (out, stdout)
}

#[test]
fn kvm_boot_example_prints_the_guests_serial_output_and_exits_with_it() {
    if !kvm_available("boot example") {
        return;
    }
    let boot = example("boot");
    let (out, stdout) = run(Command::new(&boot).arg(tiny_guest("hello")));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout, "rvmm-tiny hello: guest is alive\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "Guest reset\n");
    // The command line argument reaches the guest.
    let (out, stdout) = run(Command::new(&boot)
        .arg(tiny_guest("bootinfo"))
        .arg("console=ttyS0 from-the-boot-example"));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout
            .lines()
            .any(|l| l == "cmdline: console=ttyS0 from-the-boot-example"),
        "{stdout}"
    );
    // A guest that crashes makes the example fail.
    let (out, _) = run(Command::new(&boot).arg(tiny_guest("triple")));
    assert_eq!(out.status.code(), Some(1));
    // No kernel: the usage, and a failure.
    assert_eq!(run(&mut Command::new(&boot)).0.status.code(), Some(1));
}

#[test]
fn kvm_custom_device_example_guest_reaches_both_embedder_devices() {
    if !kvm_available("custom_device example") {
        return;
    }
    let (out, stdout) = run(&mut Command::new(example("custom_device")));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout,
        "host: the oracle's interrupt is GSI 23\n\
         guest read the magic register (0x4d4d5652)\n\
         guest asked the oracle about 0x4d4d5652\n\
         guest confirmed the answer 0x4d4d5653\n\
         VM ended: Guest reset\n"
    );
}

#[test]
fn kvm_disk_and_net_example_serves_the_disk_and_the_tap() {
    if !kvm_available("disk_and_net example") {
        return;
    }
    let Some(net) = test_network("example") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("rvmm-example-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_and_net = example("disk_and_net");
    let run_guest = |guest: &str, cmdline: &str| {
        run(net
            .command(disk_and_net.to_str().unwrap())
            .arg(tiny_guest(guest))
            .arg(&disk)
            .args(["tap0", cmdline]))
    };
    // The disk is the first virtio-mmio device, the interface the second.
    let (out, stdout) = run_guest("virtio-blk", "console=ttyS0");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("virtio-blk: device at 0xd0000000 irq 5\n"),
        "{stdout}"
    );
    assert!(stdout.contains("virtio-blk: readback ok\n"), "{stdout}");
    assert!(stdout.ends_with("virtio-blk: done\n"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("disk0: reads"), "{stderr}");
    let written = std::fs::read(&disk).unwrap();
    assert_eq!(&written[512..528], b"rvmm-tiny-write!");
    let cmdline = format!("console=ttyS0 rvmm.ip={GUEST_IP} rvmm.peer={HOST_IP}");
    let (out, stdout) = run_guest("virtio-net", &cmdline);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("virtio-net: device at 0xd0001000 irq 6\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("virtio-net: ping reply from {HOST_IP} seq 1 ok\n")),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
