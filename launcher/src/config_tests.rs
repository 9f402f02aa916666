use super::spec::DEFAULT_CMDLINE;
use super::*;
use rvmm_core::{CpuProfile, Transport, VmConfig};

fn write_temp(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("rvmm-config-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn validate(text: &str) -> Result<(VmConfig, SerialMode), ConfigError> {
    let spec = VmConfigFile::from_json(text)?.validate(&HostSettings::for_tests())?;
    Ok((spec.config, spec.serial))
}

fn error(text: &str) -> String {
    validate(text).unwrap_err().to_string()
}

#[test]
fn cloud_hypervisor_field_names_become_a_vm_config() {
    let disk = write_temp("disk.img", "");
    let json = format!(
        r#"{{
            "cpus": {{"boot_vcpus": 2, "max_vcpus": 2}},
            "memory": {{"size": 268435456}},
            "payload": {{"kernel": "/proc/self/exe", "cmdline": "console=ttyS0 quiet"}},
            "disks": [{{"path": "{}", "readonly": true, "id": "root"}}],
            "net": [{{"tap": "tap0", "mac": "02:00:00:00:00:01", "mtu": 1400, "id": "eth0"}}],
            "rng": {{"src": "/dev/urandom"}},
            "serial": {{"mode": "File", "file": "/tmp/console.log"}}
        }}"#,
        disk.display()
    );
    let (config, serial) = validate(&json).unwrap();
    assert_eq!(config.vcpus, 2);
    assert_eq!(config.memory_bytes, 256 << 20);
    assert_eq!(config.cmdline, "console=ttyS0 quiet");
    assert!(config.rng);
    assert_eq!(config.disks.len(), 1);
    assert!(config.disks[0].readonly);
    assert_eq!(config.disks[0].id.as_deref(), Some("root"));
    assert_eq!(config.nets[0].mac, Some([2, 0, 0, 0, 0, 1]));
    assert_eq!(config.nets[0].mtu, Some(1400));
    assert_eq!(serial, SerialMode::File("/tmp/console.log".into()));
    std::fs::remove_file(disk).unwrap();
}

#[test]
fn defaults_fill_what_the_file_leaves_out() {
    let (config, serial) = validate(r#"{"payload": {"kernel": "/proc/self/exe"}}"#).unwrap();
    assert_eq!(config.vcpus, 1);
    assert_eq!(config.memory_bytes, 512 << 20);
    assert_eq!(config.cmdline, DEFAULT_CMDLINE);
    assert!(!config.rng && config.disks.is_empty() && config.nets.is_empty());
    assert_eq!(serial, SerialMode::Stdio);
    assert_eq!((config.transport, config.acpi), (Transport::Mmio, true));
}

#[test]
fn transport_and_acpi_are_one_checked_platform_choice() {
    let platform = |extra: &str| {
        validate(&format!(
            r#"{{"payload": {{"kernel": "/proc/self/exe"}}{extra}}}"#
        ))
        .map(|(c, _)| (c.transport, c.acpi))
    };
    assert_eq!(
        platform(r#", "transport": "pci""#).unwrap(),
        (Transport::Pci, true)
    );
    assert_eq!(
        platform(r#", "transport": "mmio", "acpi": false"#).unwrap(),
        (Transport::Mmio, false)
    );
    let err = platform(r#", "transport": "pci", "acpi": false"#)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "acpi: the pci transport needs ACPI");
    let err = error(r#"{"payload": {"kernel": "/proc/self/exe"}, "transport": "isa"}"#);
    assert!(
        err.starts_with("transport: unknown variant `isa`, expected `mmio` or `pci`"),
        "{err}"
    );
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    let err = error(r#"{"payload": {"kernel": "/proc/self/exe"}, "balloon": {"size": 1}}"#);
    assert!(err.contains("unknown field `balloon`"), "{err}");
    let err = error(
        r#"{"payload": {"kernel": "/proc/self/exe"},
            "disks": [{"path": "/tmp"}, {"path": "/tmp", "direct": true}]}"#,
    );
    assert!(err.starts_with("disks[1]"), "{err}");
    assert!(err.contains("unknown field `direct`"), "{err}");
}

#[test]
fn wrong_types_and_missing_fields_name_the_field() {
    let err = error(r#"{"payload": {"kernel": "/proc/self/exe"}, "memory": {"size": "lots"}}"#);
    assert!(err.starts_with("memory.size: "), "{err}");
    // Without a kernel and without disks there is nothing to boot.
    let err = error(r#"{"cpus": {"boot_vcpus": 1}}"#);
    assert_eq!(err, "payload.kernel: required (or a disk to boot from)");
    let err = error("{not json");
    assert!(!err.is_empty());
}

#[test]
fn invalid_values_name_the_field() {
    let cases = [
        (
            r#""cpus": {"boot_vcpus": 0}"#,
            "cpus.boot_vcpus: 0 is out of range",
        ),
        (
            r#""cpus": {"boot_vcpus": 2, "max_vcpus": 4}"#,
            "cpus.max_vcpus: must equal boot_vcpus",
        ),
        (
            r#""memory": {"size": 4096}"#,
            "memory.size: Guest memory of 4096 bytes is below",
        ),
        (
            r#""disks": [{"path": "/nonexistent/a.img"}]"#,
            "disks[0].path: /nonexistent/a.img: No such file",
        ),
        (
            r#""disks": [{"path": "/proc/self/exe", "engine": "aio"}]"#,
            "disks[0].engine: 'aio'",
        ),
        (
            r#""disks": [{"path": "/proc/self/exe", "id": "a"}, {"path": "/proc/self/exe", "id": "a"}]"#,
            "disks[1].id: 'a' is used twice",
        ),
        (
            r#""net": [{"tap": "tap0", "mac": "zz"}]"#,
            "net[0].mac: 'zz' is not like",
        ),
        (
            r#""net": [{"tap": "tap0", "mac": "01:00:5e:00:00:01"}]"#,
            "net[0].mac: '01:00:5e:00:00:01' is a multicast",
        ),
        (
            r#""net": [{"tap": "tap0", "mtu": 10}]"#,
            "net[0].mtu: 10 is below 68",
        ),
        (
            r#""net": [{"tap": "tap0"}, {"tap": "tap0"}]"#,
            "net[1].tap: 'tap0' is used twice",
        ),
        (r#""rng": {"src": "/dev/hwrng"}"#, "rng.src: /dev/hwrng"),
        (
            r#""serial": {"mode": "Socket"}"#,
            "serial.socket: required with mode Socket",
        ),
    ];
    for (fragment, expected) in cases {
        let json = format!(r#"{{"payload": {{"kernel": "/proc/self/exe"}}, {fragment}}}"#);
        let err = error(&json);
        assert!(err.starts_with(expected), "{fragment}: {err}");
    }
    let err = error(r#"{"payload": {"kernel": "/nonexistent/vmlinux"}}"#);
    assert!(
        err.starts_with("payload.kernel: /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn serial_modes_follow_cloud_hypervisor_names() {
    for (mode, expected) in [
        (r#"{"mode": "Tty"}"#, SerialMode::Stdio),
        (r#"{"mode": "Off"}"#, SerialMode::Off),
        (r#"{"mode": "Null"}"#, SerialMode::Off),
        (
            r#"{"mode": "Socket", "socket": "/run/s"}"#,
            SerialMode::Socket("/run/s".into()),
        ),
    ] {
        let json = format!(r#"{{"payload": {{"kernel": "/proc/self/exe"}}, "serial": {mode}}}"#);
        assert_eq!(validate(&json).unwrap().1, expected, "{mode}");
    }
    let err = error(r#"{"payload": {"kernel": "/proc/self/exe"}, "serial": {"mode": "Pty"}}"#);
    assert!(err.starts_with("serial.mode"), "{err}");
}

#[test]
fn a_parsed_file_serialises_back_to_the_same_fields() {
    let text = r#"{"cpus":{"boot_vcpus":2},"memory":{"size":268435456},"payload":{"kernel":"/k"},"rng":{"src":"/dev/urandom"}}"#;
    let parsed = VmConfigFile::from_json(text).unwrap();
    let again = VmConfigFile::from_json(&serde_json::to_string(&parsed).unwrap()).unwrap();
    assert_eq!(parsed, again);
}

#[test]
fn an_unreadable_file_names_its_path() {
    let err = VmConfigFile::load(Path::new("/nonexistent/vm.json")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/vm.json"));
}

#[test]
fn a_nics_dhcp_server_is_checked_and_fixes_its_mac() {
    let with_dhcp = |dhcp: &str, mac: &str| {
        format!(
            r#"{{"payload": {{"kernel": "/proc/self/exe"}},
                "net": [{{"tap": "tap0", {mac} "dhcp": {dhcp}}}]}}"#
        )
    };
    let good = r#"{"address": "10.0.2.2/24", "gateway": "10.0.2.1", "dns": ["10.0.2.1"]}"#;
    let (config, _) = validate(&with_dhcp(good, r#""mac": "02:00:00:00:00:07","#)).unwrap();
    assert_eq!(config.nets[0].mac, Some([2, 0, 0, 0, 0, 7]));
    // Without a MAC the NIC gets a random one now: the server must know whom to answer.
    let (config, _) = validate(&with_dhcp(good, "")).unwrap();
    let mac = config.nets[0].mac.expect("a MAC for the DHCP client");
    assert_eq!(mac[0] & 0b11, 0b10, "locally administered unicast");
    let file = VmConfigFile::from_json(&with_dhcp(good, "")).unwrap();
    let dhcp = file.net[0].dhcp.as_ref().unwrap();
    assert_eq!(dhcp.gateway, Some("10.0.2.1".parse().unwrap()));
    let bad = r#"{"address": "10.0.2.2/24", "search": ["ok.example", "Not OK"]}"#;
    assert_eq!(
        error(&with_dhcp(bad, "")),
        "net[0].dhcp.search[1]: 'Not OK' is not a valid search domain"
    );
    let err = error(&with_dhcp(
        r#"{"address": "10.0.2.2/24", "gateway": "x"}"#,
        "",
    ));
    assert!(
        err.starts_with("net[0].dhcp.gateway: invalid IPv4 address"),
        "{err}"
    );
    let err = error(&with_dhcp(r#"{"gateway": "10.0.2.1"}"#, ""));
    assert_eq!(err, "net[0].dhcp.address: required (or ipv6)");
    let v6_only = r#"{"ipv6": {"address": "fd10:0:2::2/120", "dns": ["fd00::10"]}}"#;
    validate(&with_dhcp(v6_only, "")).unwrap();
    let bad_v6 = r#"{"ipv6": {"address": "fe80::2/64"}}"#;
    assert_eq!(
        error(&with_dhcp(bad_v6, "")),
        "net[0].dhcp.ipv6.address: fe80::2 is not a global or unique local address"
    );
}

#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let path = std::env::temp_dir().join(format!("rvmm-config-{}-fifo", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: creates a FIFO at a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let started = std::time::Instant::now();
    let err = VmConfigFile::load(&path).unwrap_err().to_string();
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(err, format!("{} is not a regular file", path.display()));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_device_is_refused_before_anything_is_read() {
    let err = VmConfigFile::load(Path::new("/dev/zero")).unwrap_err();
    assert_eq!(err.to_string(), "/dev/zero is not a regular file");
}

#[test]
fn a_file_over_the_limit_names_the_limit() {
    let big = format!(
        r#"{{"payload": {{"kernel": "{}"}}}}"#,
        "x".repeat(MAX_CONFIG_BYTES)
    );
    let path = write_temp("big.json", &big);
    let err = VmConfigFile::load(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{} is larger than 65536 bytes", path.display())
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_root_that_is_not_an_object_says_so() {
    for (text, found) in [
        ("[]", "an array"),
        (" \"vm\"", "a string"),
        ("42", "a number"),
        ("true", "a boolean"),
        ("null", "null"),
    ] {
        assert_eq!(
            error(text),
            format!(".: the configuration must be a JSON object ({{...}}), not {found}"),
            "{text}"
        );
    }
    // Text that is not JSON keeps the parser's position.
    assert!(error("vm").contains("line 1 column 1"), "{}", error("vm"));
}

#[test]
fn a_kernel_and_boot_disks_name_each_other() {
    let disk = |boot: bool| json_disk("/proc/self/exe", boot);
    assert_eq!(
        error(&format!(
            r#"{{"payload": {{"kernel": "/proc/self/exe"}}, "disks": [{}]}}"#,
            disk(true)
        )),
        "disks[0].boot: conflicts with payload.kernel: boot from one or the other"
    );
    assert_eq!(
        error(&format!(
            r#"{{"disks": [{}, {}, {}]}}"#,
            disk(false),
            disk(true),
            disk(true)
        )),
        "disks[2].boot: only one disk can be the boot disk"
    );
    assert_eq!(
        error(&format!(
            r#"{{"payload": {{"initramfs": "/proc/self/exe"}}, "disks": [{}]}}"#,
            disk(false)
        )),
        "payload.initramfs: needs payload.kernel (a disk boot takes its initrd from the disk)"
    );
    let (config, _) = validate(&format!(
        r#"{{"disks": [{}, {}]}}"#,
        disk(false),
        disk(true)
    ))
    .unwrap();
    assert_eq!(config.boot, rvmm_core::BootSource::Disk { index: 1 });
}

#[test]
fn an_empty_console_path_is_refused() {
    let err = error(
        r#"{"payload": {"kernel": "/proc/self/exe"}, "serial": {"mode": "File", "file": ""}}"#,
    );
    assert_eq!(err, "serial.file: must not be empty");
}

#[test]
fn the_host_gives_the_kvm_device_cpu_profile_and_seccomp() {
    let host = HostSettings {
        kvm_path: "/dev/kvm-other".into(),
        cpu_profile: CpuProfile::PvmSafe,
        seccomp: false,
    };
    let spec = VmConfigFile::from_json(r#"{"payload": {"kernel": "/proc/self/exe"}}"#)
        .unwrap()
        .validate(&host)
        .unwrap();
    assert_eq!(spec.config.kvm_path, Path::new("/dev/kvm-other"));
    assert_eq!(spec.config.cpu_profile, CpuProfile::PvmSafe);
    assert!(!spec.config.seccomp);
}

fn json_disk(path: &str, boot: bool) -> String {
    format!(r#"{{"path": "{path}", "boot": {boot}}}"#)
}
