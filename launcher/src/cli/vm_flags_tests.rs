use std::path::PathBuf;

use clap::Parser;

use rvmm_core::{BootSource, CpuProfile, Transport};
use rvmm_devices::image::ImageFormat;
use rvmm_devices::virtio::block::Engine;

use crate::cli::{Cli, Command, RunArgs};
use crate::config::{SerialMode, VmSpec};

fn run_args(argv: &[&str]) -> RunArgs {
    let argv = [&["rvmm", "run"], argv].concat();
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Run(a) => a,
        other => panic!("not rvmm run: {other:?}"),
    }
}

/// The VM of `argv` (no kernel unless given), or its error as `rvmm run` prints it.
fn spec_of(argv: &[&str]) -> Result<VmSpec, String> {
    let a = run_args(argv);
    a.spec(&a.host_settings(false).unwrap())
        .map_err(|e| e.to_string())
}

/// `extra` with a kernel.
fn spec(extra: &[&str]) -> Result<VmSpec, String> {
    spec_of(&[&["--kernel", "/proc/self/exe"], extra].concat())
}

fn error(extra: &[&str]) -> String {
    spec(extra).unwrap_err()
}

#[test]
fn valid_flags_become_a_vm_spec() {
    let spec = spec(&["--memory", "64M", "--vcpus", "2", "--rng"]).unwrap();
    assert_eq!(spec.config.memory_bytes, 64 << 20);
    assert_eq!(spec.config.vcpus, 2);
    assert!(spec.config.rng);
    assert_eq!(spec.config.cpu_profile, CpuProfile::Host);
    assert_eq!(spec.config.cmdline, "console=ttyS0 reboot=k panic=-1");
    assert_eq!(spec.serial, SerialMode::Stdio);
}

#[test]
fn transport_and_acpi_flags_choose_the_platform() {
    let platform = |extra: &[&str]| spec(extra).map(|s| (s.config.transport, s.config.acpi));
    assert_eq!(platform(&[]).unwrap(), (Transport::Mmio, true));
    assert_eq!(
        platform(&["--transport", "pci"]).unwrap(),
        (Transport::Pci, true)
    );
    assert_eq!(
        platform(&["--acpi=false"]).unwrap(),
        (Transport::Mmio, false)
    );
    assert_eq!(
        error(&["--transport", "pci", "--acpi=false"]),
        "--acpi: the pci transport needs ACPI"
    );
    assert_eq!(
        error(&["--transport", "virtio"]),
        "--transport: 'virtio' is not mmio or pci"
    );
}

#[test]
fn bad_values_name_their_flag() {
    let cases: [(&[&str], &str); 7] = [
        (&["--vcpus", "0"], "--vcpus: 0 is out of range 1 to 32"),
        (&["--vcpus", "33"], "--vcpus: 33 is out of range 1 to 32"),
        (
            &["--memory", "1M"],
            "--memory: Guest memory of 1048576 bytes is below",
        ),
        (
            &["--memory", "lots"],
            "--memory: 'lots' is not a size like 512M",
        ),
        (
            &["--initrd", "/nonexistent/initrd"],
            "--initrd: /nonexistent/initrd: No such file",
        ),
        (&["--cpu-profile", "x"], "--cpu-profile: 'x' is not auto"),
        (&["--serial", "tty"], "--serial: 'tty' is not stdio"),
    ];
    for (extra, expected) in cases {
        let a = run_args(&[&["--kernel", "/proc/self/exe"], extra].concat());
        let err = match a.host_settings(false) {
            Err(e) => e.to_string(),
            Ok(host) => a.spec(&host).unwrap_err().to_string(),
        };
        assert!(err.starts_with(expected), "{extra:?}: {err}");
    }
}

#[test]
fn serial_modes_parse_and_bad_ones_name_the_flag() {
    for (flag, expected) in [
        ("stdio", SerialMode::Stdio),
        ("off", SerialMode::Off),
        ("file=/tmp/x", SerialMode::File("/tmp/x".into())),
        ("socket=/run/s", SerialMode::Socket("/run/s".into())),
    ] {
        assert_eq!(spec(&["--serial", flag]).unwrap().serial, expected);
        // The same check without a VM (the console of a restored one).
        let a = run_args(&["--serial", flag]);
        assert_eq!(a.serial_mode().unwrap(), Some(expected));
    }
    assert_eq!(
        error(&["--serial", "file="]),
        "--serial file: must not be empty"
    );
    for bad in ["tty", "socket", "pipe=/x"] {
        let err = error(&["--serial", bad]);
        assert!(err.starts_with("--serial: "), "{err}");
    }
}

#[test]
fn disk_entries_become_block_configs() {
    let spec = spec_of(&[
        "--disk",
        "path=/proc/self/exe,readonly=on,id=root,engine=io_uring,format=qcow2,boot=on",
        "--disk",
        "path=/proc/self/exe",
    ])
    .unwrap();
    let disk = &spec.config.disks[0];
    assert_eq!(disk.path, PathBuf::from("/proc/self/exe"));
    assert!(disk.readonly);
    assert_eq!(disk.id.as_deref(), Some("root"));
    assert_eq!(disk.engine, Engine::IoUring);
    assert_eq!(disk.format, Some(ImageFormat::Qcow2));
    assert_eq!(spec.config.boot, BootSource::Disk { index: 0 });
    let plain = &spec.config.disks[1];
    assert!(!plain.readonly);
    assert_eq!((plain.engine, plain.format), (Engine::Sync, None));
}

#[test]
fn bad_disk_entries_name_the_entry_and_its_key() {
    let cases = [
        ("readonly=on", "--disk[0]: 'path' is required"),
        (
            "path=/nonexistent/disk.img",
            "--disk[0] path: /nonexistent/disk.img: No such file",
        ),
        ("path=/tmp", "--disk[0] path: /tmp is a directory"),
        (
            "path=/proc/self/exe,engine=aio",
            "--disk[0] engine: 'aio': expected sync or io_uring",
        ),
        (
            "path=/proc/self/exe,format=vmdk",
            "--disk[0] format: 'vmdk': expected raw or qcow2",
        ),
        (
            "path=/proc/self/exe,readonly=maybe",
            "--disk[0]: readonly=maybe: expected on or off",
        ),
        (
            "path=/proc/self/exe,size=1G",
            "--disk[0]: unknown key 'size'",
        ),
        (
            "path=/proc/self/exe,id=aaaaaaaaaaaaaaaaaaaaa",
            "--disk[0] id: must be 1 to 20 bytes",
        ),
    ];
    for (entry, expected) in cases {
        let err = error(&["--disk", entry]);
        assert!(err.starts_with(expected), "{entry}: {err}");
    }
    let twice = ["--disk", "path=/proc/self/exe,id=a"];
    assert_eq!(
        error(&[twice, twice].concat()),
        "--disk[1] id: 'a' is used twice"
    );
}

#[test]
fn boot_disks_and_the_kernel_exclude_each_other() {
    assert_eq!(
        error(&["--disk", "path=/proc/self/exe,boot=on"]),
        "--disk[0] boot: conflicts with --kernel: boot from one or the other"
    );
    let two = ["--disk", "path=/proc/self/exe,boot=on"];
    assert_eq!(
        spec_of(&[two, two].concat()).unwrap_err(),
        "--disk[1] boot: only one disk can be the boot disk"
    );
    assert_eq!(
        spec_of(&[
            "--disk",
            "path=/proc/self/exe",
            "--initrd",
            "/proc/self/exe"
        ])
        .unwrap_err(),
        "--initrd: needs --kernel (a disk boot takes its initrd from the disk)"
    );
    assert_eq!(
        spec_of(&["--vcpus", "2"]).unwrap_err(),
        "--kernel: required (or a --disk to boot from, --config FILE, or --api-socket PATH)"
    );
}

#[test]
fn net_entries_become_net_configs() {
    let spec = spec(&[
        "--net",
        "tap=tap0,mac=02:00:00:aa:bb:cc,mtu=1400,id=eth0",
        "--net",
        "tap=tap1",
    ])
    .unwrap();
    let net = &spec.config.nets[0];
    assert_eq!(net.tap, "tap0");
    assert_eq!(net.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
    assert_eq!(net.mtu, Some(1400));
    assert_eq!(net.id.as_deref(), Some("eth0"));
    assert_eq!(spec.config.nets[1].mac, None);
    assert_eq!(spec.dhcp, vec![None, None]);
}

#[test]
fn bad_net_entries_name_the_entry_and_its_key() {
    let cases = [
        ("mac=02:00:00:00:00:01", "--net[0]: 'tap' is required"),
        (
            "tap=tap0,mac=02:00:00:00:00",
            "--net[0] mac: '02:00:00:00:00' is not like 52:54:00:12:34:56",
        ),
        (
            "tap=tap0,mac=01:00:5e:00:00:01",
            "--net[0] mac: '01:00:5e:00:00:01' is a multicast address",
        ),
        ("tap=tap0,mtu=20", "--net[0] mtu: 20 is below 68"),
        (
            "tap=tap0,mtu=jumbo",
            "--net[0] mtu: 'jumbo' is not a number from 0 to 65535",
        ),
        ("tap=tap0,queues=2", "--net[0]: unknown key 'queues'"),
    ];
    for (entry, expected) in cases {
        let err = error(&["--net", entry]);
        assert!(err.starts_with(expected), "{entry}: {err}");
    }
    assert_eq!(
        error(&["--net", "tap=tap0", "--net", "tap=tap0,id=b"]),
        "--net[1] tap: 'tap0' is used twice"
    );
}

#[test]
fn net_dhcp_keys_give_the_spec_its_server_and_the_nic_a_mac() {
    let spec = spec(&["--net", "tap=tap0,dhcp=10.0.2.2/24,dns=10.0.2.1"]).unwrap();
    assert!(
        spec.config.nets[0].mac.is_some(),
        "a MAC for the DHCP client"
    );
    let dhcp = spec.dhcp[0].as_ref().expect("the spec carries the server");
    assert_eq!(
        (dhcp.address.as_deref(), dhcp.dns.len()),
        (Some("10.0.2.2/24"), 1)
    );
    for (entry, expected) in [
        (
            "tap=tap0,dhcp=10.0.2.2/24,gateway=x",
            "--net[0] gateway: 'x' is not an IPv4 address",
        ),
        (
            "tap=tap0,gateway=10.0.2.1",
            "--net[0] gateway: needs dhcp=ADDR/PREFIX",
        ),
        // The validator's findings, named as the entry's keys.
        (
            "tap=tap0,dhcp=10.0.2.0/24",
            "--net[0] dhcp: 10.0.2.0 is the network's or its broadcast address",
        ),
        (
            "tap=tap0,dhcp=10.0.2.2/24,search=ok.example:Not.OK",
            "--net[0] search[1]: 'Not.OK' is not a valid search domain",
        ),
        (
            "tap=tap0,dhcp=10.0.2.2/24,dhcp-server=224.0.0.1",
            "--net[0] dhcp-server: 224.0.0.1 is not a unicast",
        ),
    ] {
        let err = error(&["--net", entry]);
        assert!(err.starts_with(expected), "{entry}: {err}");
    }
}

#[test]
fn missing_or_non_file_kernel_is_rejected() {
    let err = spec_of(&["--kernel", "/nonexistent/vmlinux"]).unwrap_err();
    assert!(err.starts_with("--kernel: /nonexistent/vmlinux"), "{err}");
    let err = spec_of(&["--kernel", "/tmp"]).unwrap_err();
    assert_eq!(err, "--kernel: /tmp is not a regular file");
}

#[test]
fn config_replaces_the_vm_flags() {
    let err = spec_of(&["--config", "/nonexistent/vm.json", "--vcpus", "2"]).unwrap_err();
    assert_eq!(err, "--config: the file describes the VM: drop --vcpus");
}
