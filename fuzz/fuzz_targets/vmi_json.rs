//! KubeVirt mode: a `VirtualMachineInstance` as virt-handler sends it, arbitrary bytes through
//! `kubevirt::vmi::Vmi::from_json` and every VMI that parses through `plan` (the rvmm VM and
//! the files to prepare) against a fake launcher pod in a temp directory: kernel-boot
//! artifacts, a raw and a qcow2 container disk, a PVC image, a block-mode PVC, a cloud-init
//! Secret. Nothing is written (`prepare` is not called); the NoCloud ISO is built in memory.
//!
//! Oracles: nothing panics; every error's Display names a VMI field path (`spec.` or
//! `metadata.`; for JSON that does not fit the model, the path serde reached) and says what is
//! wrong. A plan's VM configuration matches it (disks in guest order `vda`, `vdb`, ... with the
//! planned paths, one `tap0` NIC per interface, the serial socket), survives a serde_json round
//! trip, and `validate` does not panic on it (its errors name a config field); each NoCloud
//! ISO is whole sectors, has the ISO 9660 signatures and the `cidata` label, and its root
//! directory leads to exactly the planned files. For a VMI the Kubernetes API server would
//! admit (names are DNS labels, hostDisk paths have no `..`), every planned path stays inside
//! the pod's directories.

#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::LazyLock;

use fuzz_common::fixture_dir;
use rvmm_launcher::config::{ConfigError, HostSettings, SerialModeName, Terms, VmConfigFile};
use rvmm_launcher::kubevirt::nocloud::NoCloudData;
use rvmm_launcher::kubevirt::vmi::{LaunchPlan, LauncherDirs, PrepareStep, Vmi, VmiError, plan};
use libfuzzer_sys::fuzz_target;
use rvmm_core::CpuProfile;

/// The fake pod's root.
static POD: LazyLock<PathBuf> = LazyLock::new(|| {
    let root = fixture_dir("vmi");
    let file = |relative: &str, contents: &[u8]| {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("fixture directory");
        std::fs::write(path, contents).expect("fixture file");
    };
    for name in ["vmlinuz", "initramfs.img", "vmlinuz-virt", "initramfs-virt"] {
        file(
            &format!("var/run/kubevirt/container-disks/kernel-boot/{name}"),
            b"kernel",
        );
    }
    file("var/run/kubevirt/container-disks/disk_0.img", &[0; 4096]);
    file(
        "var/run/kubevirt/container-disks/disk_1.img",
        b"QFI\xfb\0\0\0\x03",
    );
    file(
        "var/run/kubevirt-private/vmi-disks/rootdisk/disk.img",
        &[0; 512],
    );
    file("dev/datadisk", &[0; 512]);
    file(
        "var/run/kubevirt-private/secret/cloudinit/userData",
        b"#cloud-config\n",
    );
    root
});

/// Messages of serde errors about the model's fields (not JSON syntax).
const DATA_ERRORS: &[&str] = &[
    "invalid type",
    "invalid value",
    "invalid length",
    "duplicate field",
];

fn check_vmi_error(err: &VmiError) {
    let text = err.to_string();
    let (field, what) = match err {
        VmiError::Parse { path, message } => {
            assert!(!message.is_empty(), "parse error without a message: {text}");
            assert!(text.starts_with("Not a VirtualMachineInstance: "), "{text}");
            // A type error is inside a field of the model; a syntax error can be anywhere.
            if DATA_ERRORS.iter().any(|e| message.starts_with(e)) {
                assert!(
                    path.starts_with("metadata")
                        || path.starts_with("spec")
                        || path.starts_with(['?', '['])
                        || path == ".",
                    "type error outside the VMI's fields: {text}"
                );
            }
            return;
        }
        VmiError::Unsupported { field, reason } | VmiError::Invalid { field, reason } => {
            (field, reason.clone())
        }
        VmiError::Quantity { field, .. } => (field, "invalid quantity".to_string()),
        VmiError::Read { field, path, .. } => (field, format!("cannot read {}", path.display())),
        VmiError::Image { field, source } => {
            // The image error (its cause) names the image.
            assert!(field.starts_with("spec.volumes["), "image error on no volume: {text}");
            assert_eq!(text, *field);
            assert!(source.to_string().contains('/'), "image error names no image: {source}");
            return;
        }
    };
    assert!(
        field.starts_with("spec.") || field.starts_with("metadata."),
        "error names no VMI field: {text}"
    );
    assert!(!what.is_empty(), "error says nothing: {text}");
    assert!(text.starts_with(&format!("{field}: ")), "{text}");
}

/// Kubernetes object and volume names as the API server admits them (DNS-1123 labels).
fn admitted_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether the API server would admit the names and paths that end up in file paths.
fn admitted(vmi: &Vmi) -> bool {
    let meta = &vmi.metadata;
    admitted_name(&meta.name)
        && admitted_name(&meta.namespace)
        && meta.uid.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-')
        && vmi.spec.volumes.iter().all(|v| {
            admitted_name(&v.name)
                && v.host_disk.as_ref().is_none_or(|h| {
                    Path::new(&h.path)
                        .components()
                        .all(|c| c != Component::ParentDir)
                })
        })
}

fn check_contained(plan: &LaunchPlan) {
    let inside = |p: &Path| {
        assert!(
            p.starts_with(&*POD) && p.components().all(|c| c != Component::ParentDir),
            "{} is outside the pod's directories",
            p.display()
        );
    };
    let payload = &plan.config.payload;
    let optional = [
        payload.initramfs.as_ref(),
        plan.serial_socket.as_ref(),
        plan.serial_log.as_ref(),
    ];
    for path in payload.kernel.iter().chain(optional.into_iter().flatten()) {
        inside(path);
    }
    for disk in &plan.disks {
        inside(&disk.path);
    }
    for step in &plan.prepare {
        match step {
            PrepareStep::CreateSparse { path, .. }
            | PrepareStep::WriteNoCloud { path, .. }
            | PrepareStep::CreateDir { path } => inside(path),
            PrepareStep::CreateOverlay { path, backing, .. } => {
                inside(path);
                inside(backing);
            }
        }
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn check_iso(data: &NoCloudData) {
    const SECTOR: usize = 2048;
    let iso = data.to_iso();
    assert_eq!(iso.len() % SECTOR, 0, "ISO of partial sectors");
    let pvd = &iso[16 * SECTOR..17 * SECTOR];
    assert_eq!(&pvd[..7], b"\x01CD001\x01", "primary volume descriptor");
    assert_eq!(&pvd[40..46], b"cidata", "volume label");
    assert_eq!(le32(&pvd[80..]) as usize * SECTOR, iso.len(), "volume size");
    assert_eq!(
        &iso[17 * SECTOR..17 * SECTOR + 7],
        b"\xffCD001\x01",
        "terminator"
    );
    let root = le32(&pvd[158..]) as usize * SECTOR;
    let mut expected: Vec<(&str, &[u8])> = vec![
        ("META-DATA.;1", data.meta_data.as_bytes()),
        ("USER-DATA.;1", data.user_data.as_bytes()),
    ];
    if let Some(net) = &data.network_config {
        expected.push(("NETWORK-CONFIG.;1", net.as_bytes()));
    }
    let mut found = Vec::new();
    let mut at = root;
    while at < root + SECTOR && iso[at] != 0 {
        let record = &iso[at..at + usize::from(iso[at])];
        let (extent, size) = (le32(&record[2..]) as usize, le32(&record[10..]) as usize);
        let be = u32::from_be_bytes(record[6..10].try_into().expect("4 bytes"));
        assert_eq!(extent, be as usize, "extent not both-endian");
        let name = &record[33..33 + usize::from(record[32])];
        if record[25] & 2 == 0 {
            let name = std::str::from_utf8(name).expect("ASCII file name");
            found.push((
                name.to_string(),
                iso[extent * SECTOR..extent * SECTOR + size].to_vec(),
            ));
        }
        at += record.len();
    }
    let mut expected: Vec<(String, Vec<u8>)> = expected
        .into_iter()
        .map(|(n, d)| (n.to_string(), d.to_vec()))
        .collect();
    expected.sort();
    found.sort();
    assert_eq!(found, expected, "the ISO's root directory");
}

fn check_config_error(err: &ConfigError) {
    const FIELDS: &[&str] = &["cpus", "memory", "payload", "disks", "net", "rng", "serial"];
    let text = err.to_string();
    match err {
        ConfigError::Invalid { field, reason } => {
            let top = field.top_level().unwrap_or_default();
            assert!(
                FIELDS.contains(&top),
                "config error on no config field: {text}"
            );
            assert!(!reason.render(Terms::Json).is_empty(), "{text}");
        }
        _ => panic!("validate failed without naming a field: {text}"),
    }
}

fn check_plan(vmi: &Vmi, plan: &LaunchPlan) {
    let meta = &vmi.metadata;
    assert_eq!(
        plan.domain_name,
        format!("{}_{}", meta.namespace, meta.name)
    );
    let config = &plan.config;
    assert_eq!(config.disks.len(), plan.disks.len());
    for (i, (disk, planned)) in config.disks.iter().zip(&plan.disks).enumerate() {
        assert_eq!(disk.path, planned.path);
        assert_eq!(disk.readonly, planned.readonly);
        if i < 26 {
            assert_eq!(planned.target, format!("vd{}", char::from(b'a' + i as u8)));
        }
    }
    let mut targets: Vec<&str> = plan.disks.iter().map(|d| d.target.as_str()).collect();
    targets.sort_unstable();
    targets.dedup();
    assert_eq!(
        targets.len(),
        plan.disks.len(),
        "two disks with one guest name"
    );
    assert_eq!(config.net.len(), plan.interfaces.len());
    assert!(
        config.net.iter().all(|n| n.tap == "tap0"),
        "a NIC on another tap"
    );
    let serial = config.serial.as_ref().expect("the plan sets the console");
    match &plan.serial_socket {
        Some(socket) => {
            assert_eq!(serial.mode, SerialModeName::Socket);
            assert_eq!(serial.socket.as_ref(), Some(socket));
        }
        None => assert_eq!(serial.mode, SerialModeName::Off),
    }
    let json = serde_json::to_string(config).expect("the planned config serialises");
    let again = VmConfigFile::from_json(&json)
        .unwrap_or_else(|e| panic!("the planned config does not parse back: {e}\n{json}"));
    assert_eq!(&again, config, "round trip changed the planned config");
    let host = HostSettings {
        kvm_path: "/nonexistent/kvm".into(),
        cpu_profile: CpuProfile::Host,
        seccomp: true,
    };
    if let Err(e) = config.validate(&host) {
        check_config_error(&e);
    }
    for step in &plan.prepare {
        if let PrepareStep::WriteNoCloud { data, .. } = step {
            check_iso(data);
        }
    }
    if admitted(vmi) {
        check_contained(plan);
    }
}

fuzz_target!(|data: &[u8]| {
    let vmi = match Vmi::from_json(data) {
        Ok(vmi) => vmi,
        Err(e) => return check_vmi_error(&e),
    };
    let planned = plan(&vmi, &LauncherDirs::under(&POD));
    if std::env::var_os("RVMM_FUZZ_DEBUG").is_some() {
        eprintln!("{planned:#?}");
    }
    match planned {
        Ok(plan) => check_plan(&vmi, &plan),
        Err(e) => check_vmi_error(&e),
    }
});
