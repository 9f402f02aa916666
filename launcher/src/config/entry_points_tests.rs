//! One VM, three entry points: `rvmm run`'s flags, a `--config` file and a `vm.create` body
//! reach the one validator and give equal specs, and the same bad value gives the same
//! error, its field named in each entry point's terms.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use serde_json::{Value, json};

use super::{HostSettings, Terms, VmConfigFile, VmSpec};
use crate::api::routes::handle;
use crate::cli::{Cli, Command, RunArgs, RunArgsError};
use crate::vmm::Vmm;

/// The host side of [`Vmm::without_kvm`], as flags.
const HOST_FLAGS: &[&str] = &[
    "--kvm-device",
    "/nonexistent/kvm",
    "--cpu-profile",
    "host",
    "--seccomp=false",
];

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("rvmm-entry-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn run_args(argv: &[&str]) -> RunArgs {
    let argv = [&["rvmm", "run"], HOST_FLAGS, argv].concat();
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Run(args) => args,
        other => panic!("not rvmm run: {other:?}"),
    }
}

fn host() -> HostSettings {
    Vmm::without_kvm().settings().host()
}

/// The VM of `rvmm run ARGV`.
fn from_flags(argv: &[&str]) -> Result<VmSpec, RunArgsError> {
    let args = run_args(argv);
    assert_eq!(args.host_settings(false).unwrap(), host());
    args.spec(&host())
}

/// The VM of `rvmm run --config FILE` with `config` in the file.
fn from_config_file(name: &str, config: &Value) -> Result<VmSpec, RunArgsError> {
    let path = temp_file(name, config.to_string().as_bytes());
    let spec = run_args(&["--config", path.to_str().unwrap()]).spec(&host());
    std::fs::remove_file(path).unwrap();
    spec
}

/// The VM `vm.create` keeps for the body `config`, or its error text.
fn from_vm_create(config: &Value) -> Result<VmSpec, String> {
    let vmm: Arc<Vmm> = Vmm::without_kvm();
    let body = config.to_string();
    let reply = handle(&vmm, "PUT", "/api/v1/vm.create", Some(body.as_bytes()));
    if reply.status == 204 {
        return Ok(vmm.created_spec().expect("vm.create keeps the VM"));
    }
    let (body, _) = reply.body.expect("an error body");
    let body: Value = serde_json::from_str(&body).unwrap();
    Err(body["error"].as_str().unwrap().to_string())
}

#[test]
fn flags_a_config_file_and_vm_create_give_equal_specs() {
    let kernel = temp_file("kernel", b"kernel");
    let initrd = temp_file("initrd", b"initrd");
    let root = temp_file("root.img", &[0; 512]);
    let data = temp_file("data.img", &[0; 512]);
    let (k, i, r, d) = (
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
        root.to_str().unwrap(),
        data.to_str().unwrap(),
    );
    let root_entry = format!("path={r},readonly=on,id=root,engine=io_uring,format=raw");
    let data_entry = format!("path={d}");
    let flags = from_flags(&[
        "--kernel",
        k,
        "--initrd",
        i,
        "--cmdline",
        "console=ttyS0 quiet",
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--rng",
        "--serial",
        "file=/tmp/rvmm-console.log",
        "--transport",
        "pci",
        "--acpi=true",
        "--disk",
        &root_entry,
        "--disk",
        &data_entry,
        "--net",
        "tap=tap0,mac=02:00:00:00:00:07,mtu=1400,id=eth0,dhcp=10.0.2.2/24,gateway=10.0.2.1,\
         dns=10.0.2.1:10.0.2.3,search=example.com,hostname=vm1",
        "--net",
        "tap=tap1",
    ])
    .unwrap();
    let config = json!({
        "cpus": {"boot_vcpus": 2},
        "memory": {"size": 64 << 20},
        "payload": {"kernel": k, "initramfs": i, "cmdline": "console=ttyS0 quiet"},
        "disks": [
            {"path": r, "readonly": true, "id": "root", "engine": "io_uring", "format": "raw"},
            {"path": d},
        ],
        "net": [
            {
                "tap": "tap0", "mac": "02:00:00:00:00:07", "mtu": 1400, "id": "eth0",
                "dhcp": {
                    "address": "10.0.2.2/24", "gateway": "10.0.2.1",
                    "dns": ["10.0.2.1", "10.0.2.3"], "search": ["example.com"],
                    "hostname": "vm1",
                },
            },
            {"tap": "tap1"},
        ],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "File", "file": "/tmp/rvmm-console.log"},
        "transport": "pci",
        "acpi": true,
    });
    let file = from_config_file("vm.json", &config).unwrap();
    let created = from_vm_create(&config).unwrap();
    assert_eq!(flags, file);
    assert_eq!(flags, created);
    assert!(flags.dhcp[0].is_some() && flags.dhcp[1].is_none());
    assert!(!flags.config.seccomp, "the host's --seccomp=false");
    // What vm.info shows, a snapshot or a migration carries, is the same VM again.
    assert_eq!(flags.to_file().validate(&host()).unwrap(), flags);
    for path in [kernel, initrd, root, data] {
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn a_dhcp_nics_random_mac_survives_the_file_form() {
    let spec = from_flags(&[
        "--kernel",
        "/proc/self/exe",
        "--net",
        "tap=tap0,dhcp=10.0.2.2/24",
    ])
    .unwrap();
    let mac = spec.config.nets[0].mac.expect("a MAC for the DHCP client");
    let again = spec.to_file().validate(&host()).unwrap();
    assert_eq!(again.config.nets[0].mac, Some(mac));
    assert_eq!(again, spec);
}

#[test]
fn the_same_bad_value_is_the_same_error_named_in_each_entry_points_terms() {
    let kernel = json!({"kernel": "/proc/self/exe"});
    let cases: [(&[&str], Value, &str, &str); 7] = [
        (
            &["--vcpus", "0"],
            json!({"payload": kernel, "cpus": {"boot_vcpus": 0}}),
            "cpus.boot_vcpus: 0 is out of range 1 to 32",
            "--vcpus: 0 is out of range 1 to 32",
        ),
        (
            &["--memory", "1M"],
            json!({"payload": kernel, "memory": {"size": 1 << 20}}),
            "memory.size: Guest memory of 1048576 bytes",
            "--memory: Guest memory of 1048576 bytes",
        ),
        (
            &[
                "--disk",
                "path=/proc/self/exe",
                "--disk",
                "path=/nonexistent/b.img",
            ],
            json!({"payload": kernel, "disks": [
                {"path": "/proc/self/exe"}, {"path": "/nonexistent/b.img"}]}),
            "disks[1].path: /nonexistent/b.img: No such file",
            "--disk[1] path: /nonexistent/b.img: No such file",
        ),
        (
            &["--disk", "path=/proc/self/exe,boot=on"],
            json!({"payload": kernel, "disks": [{"path": "/proc/self/exe", "boot": true}]}),
            "disks[0].boot: conflicts with payload.kernel: boot from one or the other",
            "--disk[0] boot: conflicts with --kernel: boot from one or the other",
        ),
        (
            &["--net", "tap=tap0,mtu=20"],
            json!({"payload": kernel, "net": [{"tap": "tap0", "mtu": 20}]}),
            "net[0].mtu: 20 is below 68",
            "--net[0] mtu: 20 is below 68",
        ),
        (
            &["--net", "tap=tap0,dhcp=10.0.2.2/24,search=Not.OK"],
            json!({"payload": kernel, "net": [
                {"tap": "tap0", "dhcp": {"address": "10.0.2.2/24", "search": ["Not.OK"]}}]}),
            "net[0].dhcp.search[0]: 'Not.OK' is not a valid search domain",
            "--net[0] search[0]: 'Not.OK' is not a valid search domain",
        ),
        (
            &["--transport", "pci", "--acpi=false"],
            json!({"payload": kernel, "transport": "pci", "acpi": false}),
            "acpi: the pci transport needs ACPI",
            "--acpi: the pci transport needs ACPI",
        ),
    ];
    for (flags, config, json_text, flag_text) in cases {
        let argv = [&["--kernel", "/proc/self/exe"], flags].concat();
        let flag_error = from_flags(&argv).unwrap_err();
        assert!(
            flag_error.to_string().starts_with(flag_text),
            "{flag_error}"
        );
        let flag_error = flag_error.config_error().expect("the validator's");
        let file_error = from_config_file("bad.json", &config).unwrap_err();
        assert!(
            file_error.to_string().starts_with("--config "),
            "{file_error}"
        );
        let file_error = file_error.config_error().expect("the validator's");
        assert!(
            file_error.to_string().starts_with(json_text),
            "{file_error}"
        );
        // One error: the same field and reason, only named differently.
        assert_eq!(flag_error.field(), file_error.field(), "{json_text}");
        assert_eq!(flag_error.render(Terms::Json), file_error.to_string());
        assert_eq!(
            file_error.render(Terms::Flags),
            flag_error.render(Terms::Flags)
        );
        let api_error = from_vm_create(&config).unwrap_err();
        assert_eq!(
            api_error,
            format!("Invalid VM configuration: {file_error}"),
            "{json_text}"
        );
    }
}

#[test]
fn a_vm_create_body_parses_as_a_config_file_does() {
    let body = json!({"payload": {"kernel": "/proc/self/exe"}, "disks": [{"path": 1}]});
    let file_error = VmConfigFile::from_json(&body.to_string()).unwrap_err();
    assert!(
        file_error
            .to_string()
            .starts_with("disks[0].path: invalid type"),
        "{file_error}"
    );
    let api_error = from_vm_create(&body).unwrap_err();
    assert_eq!(api_error, file_error.to_string());
}
