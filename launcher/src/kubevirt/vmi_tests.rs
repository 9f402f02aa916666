use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use super::*;

const FEDORA: &str = include_str!("../../tests/fixtures/vmi/fedora-containerdisk.json");
const PVC: &str = include_str!("../../tests/fixtures/vmi/pvc-cloudinit.json");
const KERNEL_BOOT: &str = include_str!("../../tests/fixtures/vmi/kernelboot.json");

/// A launcher pod's filesystem in a temporary directory, removed on drop.
struct PodRoot {
    root: PathBuf,
    dirs: LauncherDirs,
}

impl PodRoot {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "rvmm-vmi-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let pod = Self {
            dirs: LauncherDirs::under(&root),
            root,
        };
        pod.file(
            "var/run/kubevirt/container-disks/kernel-boot/vmlinuz",
            b"kernel",
        );
        pod.file(
            "var/run/kubevirt/container-disks/kernel-boot/initramfs.img",
            b"initrd",
        );
        pod.file(
            "var/run/kubevirt/container-disks/kernel-boot/vmlinuz-virt",
            b"kernel",
        );
        pod.file(
            "var/run/kubevirt/container-disks/kernel-boot/initramfs-virt",
            b"initrd",
        );
        pod
    }

    fn file(&self, relative: &str, contents: &[u8]) -> PathBuf {
        let path = self.root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }
}

impl Drop for PodRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn parse(text: &str) -> Vmi {
    Vmi::from_json(text.as_bytes()).unwrap()
}

/// `fixture` with `edit` applied to its JSON.
fn edited(fixture: &str, edit: impl FnOnce(&mut Value)) -> Vmi {
    let mut value: Value = serde_json::from_str(fixture).unwrap();
    edit(&mut value);
    Vmi::from_json(value.to_string().as_bytes()).unwrap()
}

fn error_text(vmi: &Vmi, dirs: &LauncherDirs) -> String {
    crate::kubevirt::grpc::error_chain(&plan(vmi, dirs).unwrap_err())
}

/// The Fedora fixture's pod: a raw root image as container disk 0.
fn fedora_pod() -> PodRoot {
    let pod = PodRoot::new();
    pod.file("var/run/kubevirt/container-disks/disk_0.img", &[0u8; 4096]);
    pod
}

#[test]
fn fedora_container_disk_vmi_maps_to_config() {
    let pod = fedora_pod();
    let plan = plan(&parse(FEDORA), &pod.dirs).unwrap();
    let c = &plan.config;
    assert_eq!(plan.domain_name, "default_fedora");
    assert_eq!(c.cpus.boot_vcpus, 2);
    assert_eq!(c.memory.size, 2 << 30);
    assert_eq!(
        c.payload,
        PayloadConfig {
            kernel: Some(pod.path("var/run/kubevirt/container-disks/kernel-boot/vmlinuz")),
            initramfs: Some(pod.path("var/run/kubevirt/container-disks/kernel-boot/initramfs.img")),
            cmdline: Some("console=ttyS0 root=/dev/vda1 rw reboot=k panic=-1".into()),
        }
    );
    // The guest writes to a qcow2 overlay over the container disk; cloud-init is read-only.
    let copy = pod.path("var/run/kubevirt-ephemeral-disks/disk-data/containerdisk/disk.qcow2");
    let iso =
        pod.path("var/run/kubevirt-ephemeral-disks/cloud-init-data/default/fedora/noCloud.iso");
    assert_eq!(
        c.disks,
        vec![
            DiskConfig {
                path: copy.clone(),
                readonly: false,
                id: None,
                engine: None,
                format: Some("qcow2".into()),
                boot: false,
            },
            DiskConfig {
                path: iso.clone(),
                readonly: true,
                id: None,
                engine: None,
                format: Some("raw".into()),
                boot: false,
            },
        ]
    );
    assert_eq!(
        c.net,
        vec![NetConfig {
            tap: "tap0".into(),
            mac: Some("02:5a:3b:00:00:07".into()),
            mtu: None,
            id: Some("default".into()),
            dhcp: None,
        }]
    );
    assert!(c.rng.is_some());
    let socket =
        pod.path("var/run/kubevirt-private/3f5d9d4c-7e0a-4b8e-9a63-2b1f4e1d2c11/virt-serial0");
    assert_eq!(c.serial.as_ref().unwrap().socket.as_ref(), Some(&socket));
    assert_eq!(plan.serial_socket.as_ref(), Some(&socket));
    assert_eq!(
        plan.prepare[0],
        PrepareStep::CreateOverlay {
            path: copy,
            backing: pod.path("var/run/kubevirt/container-disks/disk_0.img"),
            backing_format: rvmm_devices::image::ImageFormat::Raw,
            size: 4096,
        }
    );
    assert!(
        matches!(&plan.prepare[1], PrepareStep::WriteNoCloud { path, data }
        if *path == iso && data.user_data.starts_with("#cloud-config\nuser: fedora")
            && data.meta_data.contains("\"instance-id\":\"fedora.default\""))
    );
    assert_eq!(
        plan.warnings,
        vec![
            "spec.domain.cpu.maxSockets: ignored (no vCPU hotplug)",
            "spec.domain.memory.maxGuest: ignored (no memory hotplug)",
        ]
    );
}

#[test]
fn prepared_fedora_plan_passes_config_validation() {
    let pod = fedora_pod();
    let plan = plan(&parse(FEDORA), &pod.dirs).unwrap();
    prepare(&plan).unwrap();
    // An overlay, not a copy: qcow2 with the container disk as its backing file.
    let overlay = &plan.config.disks[0].path;
    let image = rvmm_devices::image::DiskImage::open(overlay, false, None).unwrap();
    assert_eq!(image.format(), rvmm_devices::image::ImageFormat::Qcow2);
    assert_eq!(image.virtual_size(), 4096);
    let iso = std::fs::read(&plan.config.disks[1].path).unwrap();
    assert_eq!(&iso[16 * 2048 + 1..16 * 2048 + 6], b"CD001");
    assert!(plan.serial_socket.unwrap().parent().unwrap().is_dir());
    plan.config
        .validate(&crate::config::HostSettings::for_tests())
        .unwrap();
}

#[test]
fn pvc_vmi_with_cloud_init_maps_file_and_block_volumes() {
    let pod = PodRoot::new();
    let root = pod.file(
        "var/run/kubevirt-private/vmi-disks/rootdisk/disk.img",
        &[0; 512],
    );
    // A block-mode PVC appears as /dev/<volume>.
    let data = pod.file("dev/datadisk", &[0; 512]);
    let plan = plan(&parse(PVC), &pod.dirs).unwrap();
    let c = &plan.config;
    // No topology: 1500m of CPU rounds up to 2 vCPUs; memory from the request.
    assert_eq!(c.cpus.boot_vcpus, 2);
    assert_eq!(c.memory.size, 1 << 30);
    assert_eq!(c.payload.initramfs, None);
    assert_eq!(c.payload.cmdline, None);
    let scratch = pod.path("var/run/kubevirt-ephemeral-disks/empty-disks/scratch.img");
    let paths: Vec<(&Path, bool)> = c
        .disks
        .iter()
        .map(|d| (d.path.as_path(), d.readonly))
        .collect();
    assert_eq!(
        paths[..3],
        [
            (root.as_path(), false),
            (data.as_path(), true),
            (scratch.as_path(), false)
        ]
    );
    assert_eq!(c.disks[0].id.as_deref(), Some("ROOT01"));
    assert!(plan.disks[1].block_device && !plan.disks[0].block_device);
    assert_eq!(
        plan.disks
            .iter()
            .map(|d| d.target.as_str())
            .collect::<Vec<_>>(),
        ["vda", "vdb", "vdc", "vdd"]
    );
    assert_eq!(c.net[0].mac.as_deref(), Some("de:ad:00:00:be:af"));
    assert!(plan.prepare.contains(&PrepareStep::CreateSparse {
        path: scratch,
        size: 2 << 30
    }));
    let cloud_init = plan.prepare.iter().find_map(|s| match s {
        PrepareStep::WriteNoCloud { data, .. } => Some(data),
        _ => None,
    });
    let cloud_init = cloud_init.unwrap();
    assert_eq!(cloud_init.user_data, "#cloud-config\nhostname: db\n");
    assert_eq!(
        cloud_init.network_config.as_deref(),
        Some("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n")
    );
    assert!(cloud_init.meta_data.contains("\"local-hostname\":\"db-0\""));
    assert!(plan.warnings[0].starts_with("spec.domain.devices.autoattachGraphicsDevice: ignored"));
}

#[test]
fn cloud_init_user_data_comes_from_the_mounted_secret() {
    let pod = PodRoot::new();
    pod.file(
        "var/run/kubevirt-private/vmi-disks/rootdisk/disk.img",
        &[0; 512],
    );
    pod.file("dev/datadisk", &[0; 512]);
    pod.file(
        "var/run/kubevirt-private/secret/cloudinit/userData",
        b"#cloud-config\nfrom: secret\n",
    );
    let vmi = edited(PVC, |v| {
        v["spec"]["volumes"][3]["cloudInitNoCloud"] =
            json!({"userDataSecretRef": {"name": "my-cloud-init"}});
    });
    let plan = plan(&vmi, &pod.dirs).unwrap();
    assert!(plan.prepare.iter().any(|s| matches!(s,
        PrepareStep::WriteNoCloud { data, .. } if data.user_data == "#cloud-config\nfrom: secret\n")));
}

#[test]
fn kernel_boot_vmi_needs_no_disks() {
    let pod = PodRoot::new();
    let plan = plan(&parse(KERNEL_BOOT), &pod.dirs).unwrap();
    let c = &plan.config;
    assert_eq!((c.cpus.boot_vcpus, c.memory.size), (1, 128 << 20));
    assert_eq!(
        c.payload.cmdline.as_deref(),
        Some("console=ttyS0 rdinit=/init")
    );
    assert_eq!(
        c.payload.initramfs,
        Some(pod.path("var/run/kubevirt/container-disks/kernel-boot/initramfs-virt"))
    );
    assert!(c.disks.is_empty() && c.net.is_empty() && c.rng.is_none());
    assert_eq!(c.serial.as_ref().unwrap().mode, SerialModeName::Socket);
    assert!(plan.warnings.is_empty());
}

#[test]
fn disk_without_volume_is_an_error() {
    let pod = fedora_pod();
    let vmi = edited(FEDORA, |v| v["spec"]["volumes"][1]["name"] = json!("other"));
    assert_eq!(
        error_text(&vmi, &pod.dirs),
        "spec.domain.devices.disks[1].name: no volume named 'cloudinitdisk' in spec.volumes"
    );
}

#[test]
fn sata_bus_is_unsupported() {
    let pod = fedora_pod();
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["devices"]["disks"][1]["disk"]["bus"] = json!("sata");
    });
    assert_eq!(
        error_text(&vmi, &pod.dirs),
        "spec.domain.devices.disks[1].disk.bus: sata is not supported (virtio only)"
    );
}

#[test]
fn zero_memory_is_an_error() {
    let pod = fedora_pod();
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["memory"]["guest"] = json!("0Mi")
    });
    assert_eq!(
        error_text(&vmi, &pod.dirs),
        "spec.domain.memory.guest: 0Mi is no memory"
    );
}

#[test]
fn missing_memory_is_an_error() {
    let pod = PodRoot::new();
    let vmi = edited(KERNEL_BOOT, |v| v["spec"]["domain"]["memory"] = json!(null));
    assert_eq!(
        error_text(&vmi, &pod.dirs),
        "spec.domain.memory.guest: required (or spec.domain.resources.requests.memory)"
    );
}

#[test]
fn bad_memory_quantity_names_the_field() {
    let pod = PodRoot::new();
    let vmi = edited(KERNEL_BOOT, |v| {
        v["spec"]["domain"]["memory"]["guest"] = json!("2GB")
    });
    assert_eq!(
        error_text(&vmi, &pod.dirs),
        "spec.domain.memory.guest: invalid quantity: '2GB' is not a quantity like 128Mi, 1Gi or 1G"
    );
}

#[test]
fn a_truncated_qcow2_container_disk_is_refused_naming_volume_and_image() {
    let pod = PodRoot::new();
    pod.file(
        "var/run/kubevirt/container-disks/disk_0.img",
        b"QFI\xfb\0\0\0\x03rest",
    );
    let text = error_text(&parse(FEDORA), &pod.dirs);
    assert!(
        text.starts_with("spec.volumes[0].containerDisk: Disk image ")
            && text.contains("container-disks/disk_0.img is not a usable qcow2 image: truncated"),
        "{text}"
    );
}

#[test]
fn a_qcow2_container_disk_gets_a_qcow2_overlay_and_one_with_a_backing_file_is_refused() {
    let pod = PodRoot::new();
    let image = pod.path("var/run/kubevirt/container-disks/disk_0.img");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    rvmm_devices::image::qcow2::create_overlay(&image, Path::new("/nonexistent"), "raw", 1 << 20)
        .unwrap();
    // A qcow2 that is an overlay itself: refused as KubeVirt's launcher refuses it (and its
    // missing backing file named before that).
    assert!(error_text(&parse(FEDORA), &pod.dirs).contains("/nonexistent"));
    let base = pod.file("base.raw", &[0u8; 1 << 20]);
    rvmm_devices::image::qcow2::create_overlay(&image, &base, "raw", 1 << 20).unwrap();
    assert_eq!(
        error_text(&parse(FEDORA), &pod.dirs),
        "spec.volumes[0].containerDisk.image: quay.io/containerdisks/fedora:41 holds a qcow2 image with a backing file"
    );
    std::fs::write(
        &image,
        rvmm_devices::image::qcow2::overlay_test_bytes(1 << 30),
    )
    .unwrap();
    let planned = plan(&parse(FEDORA), &pod.dirs).unwrap();
    assert!(matches!(
        &planned.prepare[0],
        PrepareStep::CreateOverlay { backing_format: rvmm_devices::image::ImageFormat::Qcow2, size, .. } if *size == 1 << 30
    ));
    // DisksInfo's format wins over the magic: raw, as virt-handler measured it.
    let formats =
        std::collections::BTreeMap::from([("containerdisk".to_string(), "raw".to_string())]);
    let planned = plan_with_formats(&parse(FEDORA), &pod.dirs, &formats).unwrap();
    assert!(matches!(
        &planned.prepare[0],
        PrepareStep::CreateOverlay {
            backing_format: rvmm_devices::image::ImageFormat::Raw,
            ..
        }
    ));
    let formats =
        std::collections::BTreeMap::from([("containerdisk".to_string(), "vmdk".to_string())]);
    assert!(
        crate::kubevirt::grpc::error_chain(
            &plan_with_formats(&parse(FEDORA), &pod.dirs, &formats).unwrap_err()
        )
        .contains("'vmdk'")
    );
}

#[test]
fn missing_container_disk_names_the_file() {
    let pod = PodRoot::new();
    let text = error_text(&parse(FEDORA), &pod.dirs);
    assert!(
        text.starts_with("spec.volumes[0].containerDisk: Cannot open disk image "),
        "{text}"
    );
    assert!(text.ends_with("container-disks/disk_0.img: No such file or directory (os error 2)"));
}

#[test]
fn vmi_without_kernel_boot_boots_the_disk_with_the_lowest_boot_order() {
    let pod = fedora_pod();
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["firmware"] = json!({"uuid": "x", "bootloader": {"bios": {}}});
    });
    let first = plan(&vmi, &pod.dirs).unwrap();
    assert_eq!(first.config.payload, PayloadConfig::default());
    assert!(first.config.disks[0].boot && !first.config.disks[1].boot);
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["firmware"] = json!({"bootloader": {"efi": {"secureBoot": false}}});
        v["spec"]["domain"]["devices"]["disks"][0]["bootOrder"] = json!(3);
        v["spec"]["domain"]["devices"]["disks"][1]["bootOrder"] = json!(2);
    });
    let ordered = plan(&vmi, &pod.dirs).unwrap();
    assert!(!ordered.config.disks[0].boot && ordered.config.disks[1].boot);
    assert_eq!(ordered.disks[1].boot_order, Some(2));
    prepare(&ordered).unwrap();
    ordered
        .config
        .validate(&crate::config::HostSettings::for_tests())
        .unwrap();
    // Secure Boot is KubeVirt's default for EFI.
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["firmware"] = json!({"bootloader": {"efi": {}}});
    });
    assert!(
        error_text(&vmi, &pod.dirs).starts_with("spec.domain.firmware.bootloader.efi.secureBoot: ")
    );
}

#[test]
fn unsupported_devices_name_their_field() {
    let pod = fedora_pod();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| {
                v["spec"]["domain"]["devices"]["interfaces"][0] =
                    json!({"name": "default", "sriov": {}})
            }),
            "spec.domain.devices.interfaces[0].sriov: the sriov binding is not supported (bridge or masquerade only)",
        ),
        (
            Box::new(|v| {
                v["spec"]["domain"]["devices"]["gpus"] =
                    json!([{"name": "g", "deviceName": "nvidia.com/GP102"}])
            }),
            "spec.domain.devices.gpus: GPU passthrough is not supported",
        ),
        (
            Box::new(|v| {
                v["spec"]["domain"]["devices"]["hostDevices"] =
                    json!([{"name": "h", "deviceName": "x"}])
            }),
            "spec.domain.devices.hostDevices: host device passthrough is not supported",
        ),
        (
            Box::new(|v| {
                v["spec"]["domain"]["devices"]["disks"][1] =
                    json!({"name": "cloudinitdisk", "cdrom": {"bus": "sata"}})
            }),
            "spec.domain.devices.disks[1].cdrom: CD-ROM drives are not supported (use disk)",
        ),
        (
            Box::new(|v| v["spec"]["domain"]["devices"]["interfaces"][0]["model"] = json!("e1000")),
            "spec.domain.devices.interfaces[0].model: e1000 is not supported (virtio only)",
        ),
        (
            Box::new(|v| {
                v["spec"]["networks"][0] =
                    json!({"name": "default", "multus": {"networkName": "br"}})
            }),
            "spec.networks[0].multus: secondary (Multus) networks are not supported (pod network only)",
        ),
        (
            Box::new(|v| {
                v["spec"]["volumes"][1] =
                    json!({"name": "cloudinitdisk", "configMap": {"name": "cm"}})
            }),
            "spec.volumes[1].configMap: configMap volumes are not supported",
        ),
        (
            Box::new(|v| {
                v["spec"]["domain"]["firmware"]["bootloader"] = json!({"efi": {"secureBoot": true}})
            }),
            "spec.domain.firmware.bootloader.efi.secureBoot: Secure Boot is not supported (KubeVirt's default is on: set secureBoot: false)",
        ),
        (
            Box::new(|v| v["spec"]["domain"]["cpu"]["sockets"] = json!(64)),
            "spec.domain.cpu: 128 vCPUs (cores x sockets x threads) is more than rvmm's 32",
        ),
    ];
    for (edit, expected) in cases {
        let vmi = edited(FEDORA, edit);
        assert_eq!(error_text(&vmi, &pod.dirs), expected);
    }
}

#[test]
fn wrong_field_type_is_a_parse_error_with_its_path() {
    let err = Vmi::from_json(br#"{"spec": {"domain": {"cpu": {"cores": "two"}}}}"#).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("Not a VirtualMachineInstance: spec.domain.cpu.cores: "),
        "{text}"
    );
}

#[test]
fn interface_without_mac_gets_a_stable_one() {
    let pod = fedora_pod();
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["devices"]["interfaces"][0] =
            json!({"name": "default", "masquerade": {}});
    });
    let first = plan(&vmi, &pod.dirs).unwrap().interfaces[0].mac.clone();
    let second = plan(&vmi, &pod.dirs).unwrap().interfaces[0].mac.clone();
    assert_eq!(first, second);
    assert!(first.starts_with("52:54:00:"), "{first}");
    assert!(crate::config::parse_mac(&first).is_some());
}

#[test]
fn guest_disk_names_continue_past_z() {
    assert_eq!(guest_disk_name(0), "vda");
    assert_eq!(guest_disk_name(25), "vdz");
    assert_eq!(guest_disk_name(26), "vdaa");
}

#[test]
fn volume_and_disk_names_that_would_leave_the_pod_directories_are_refused() {
    let pod = fedora_pod();
    let vmi = edited(FEDORA, |v| {
        v["spec"]["volumes"][1]["name"] = json!("../../../../tmp/evil");
        v["spec"]["domain"]["devices"]["disks"][1]["name"] = json!("../../../../tmp/evil");
    });
    assert_eq!(
        error_text(&vmi, &pod.dirs),
        "spec.volumes[1].name: '../../../../tmp/evil' is not a DNS-1123 label (a-z, 0-9, '-', at most 63)"
    );
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["devices"]["disks"][0]["name"] = json!("/etc/passwd");
    });
    assert!(
        error_text(&vmi, &pod.dirs).starts_with("spec.domain.devices.disks[0].name: '/etc/passwd'"),
        "{}",
        error_text(&vmi, &pod.dirs)
    );
    let vmi = edited(FEDORA, |v| v["metadata"]["uid"] = json!("../x"));
    assert!(error_text(&vmi, &pod.dirs).starts_with("metadata.uid: '../x' is not a UID"));
}

#[test]
fn bad_mac_and_unusable_memory_are_reported_on_the_vmi_fields() {
    let pod = fedora_pod();
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["devices"]["interfaces"][0]["macAddress"] = json!("zz");
    });
    assert_eq!(
        error_text(&vmi, &pod.dirs),
        "spec.domain.devices.interfaces[0].macAddress: 'zz' is not like 52:54:00:12:34:56"
    );
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["devices"]["interfaces"][0]["macAddress"] = json!("01:00:5e:00:00:01");
    });
    assert!(error_text(&vmi, &pod.dirs).ends_with("is a multicast address"));
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["memory"]["guest"] = json!("1000k")
    });
    assert!(
        error_text(&vmi, &pod.dirs).starts_with("spec.domain.memory.guest: 1000k: "),
        "{}",
        error_text(&vmi, &pod.dirs)
    );
}

#[test]
fn serial_console_log_follows_the_console_and_log_serial_console() {
    let pod = fedora_pod();
    let p = plan(&parse(FEDORA), &pod.dirs).unwrap();
    let socket = p.serial_socket.clone().unwrap();
    assert_eq!(
        p.serial_log,
        Some(socket.with_file_name("virt-serial0-log"))
    );
    let off = edited(FEDORA, |v| {
        v["spec"]["domain"]["devices"]["logSerialConsole"] = json!(false)
    });
    assert_eq!(plan(&off, &pod.dirs).unwrap().serial_log, None);
    let no_console = edited(FEDORA, |v| {
        v["spec"]["domain"]["devices"]["autoattachSerialConsole"] = json!(false)
    });
    assert_eq!(plan(&no_console, &pod.dirs).unwrap().serial_log, None);
}

#[test]
fn dedicated_cpu_placement_is_refused_naming_the_field() {
    let pod = fedora_pod();
    let vmi = edited(FEDORA, |v| {
        v["spec"]["domain"]["cpu"]["dedicatedCpuPlacement"] = json!(true)
    });
    assert!(
        error_text(&vmi, &pod.dirs)
            .starts_with("spec.domain.cpu.dedicatedCpuPlacement: dedicated CPUs are not supported"),
        "{}",
        error_text(&vmi, &pod.dirs)
    );
}

#[test]
fn live_update_applies_the_grace_period_and_refuses_hotplug_naming_the_field() {
    let running = parse(FEDORA);
    let same = edited(FEDORA, |v| {
        v["metadata"]["annotations"] = json!({"kubevirt.io/latest-observed-api-version": "v1"});
        v["status"] = json!({"phase": "Running"});
    });
    assert_eq!(live_update(&running, &same).unwrap(), LiveUpdate::default());
    let grace = edited(FEDORA, |v| {
        v["spec"]["terminationGracePeriodSeconds"] = json!(5)
    });
    assert!(live_update(&running, &grace).unwrap().grace_period_changed);
    let refused = |edit: fn(&mut Value)| {
        let text = live_update(&running, &edited(FEDORA, edit))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("is not supported on a running rvmm VM"),
            "{text}"
        );
        text
    };
    assert!(
        refused(|v| v["spec"]["domain"]["memory"]["guest"] = json!("4Gi"))
            .starts_with("spec.domain.memory.guest: 2048 MiB to 4096 MiB: memory hotplug")
    );
    assert!(
        refused(|v| v["spec"]["domain"]["cpu"]["sockets"] = json!(2))
            .starts_with("spec.domain.cpu: 2 to 4 vCPUs: CPU hotplug")
    );
    assert!(
        refused(|v| v["spec"]["domain"]["devices"]["disks"][0]["disk"]["readonly"] = json!(true))
            .starts_with("spec.domain.devices.disks[0]: changed: disk hotplug")
    );
    assert!(
        refused(|v| v["spec"]["volumes"][0]["containerDisk"]["image"] = json!("other"))
            .starts_with("spec.volumes[0]: changed: volume hotplug")
    );
    assert!(
        refused(|v| {
            v["spec"]["domain"]["devices"]
                .as_object_mut()
                .unwrap()
                .remove("rng");
        })
        .starts_with("spec.domain.devices: changed")
    );
}

#[test]
fn ephemeral_pvc_volumes_get_a_qcow2_overlay_and_qcow2_pvcs_follow_disks_info() {
    let pod = fedora_pod();
    let base = pod.file(
        "var/run/kubevirt-private/vmi-disks/containerdisk/disk.img",
        &[0u8; 8192],
    );
    let vmi = edited(FEDORA, |v| {
        v["spec"]["volumes"][0] = json!({"name": "containerdisk", "ephemeral": {"persistentVolumeClaim": {"claimName": "golden"}}});
    });
    let planned = plan(&vmi, &pod.dirs).unwrap();
    let overlay = pod.path("var/run/kubevirt-ephemeral-disks/disk-data/containerdisk/disk.qcow2");
    assert_eq!(
        planned.prepare[0],
        PrepareStep::CreateOverlay {
            path: overlay.clone(),
            backing: base.clone(),
            backing_format: rvmm_devices::image::ImageFormat::Raw,
            size: 8192,
        }
    );
    assert_eq!(
        planned.disks[0].backing,
        Some((base.clone(), rvmm_devices::image::ImageFormat::Raw))
    );
    prepare(&planned).unwrap();
    // Kept as it is when the launcher comes back to a pod that has it.
    let first = std::fs::read(&overlay).unwrap();
    prepare(&planned).unwrap();
    assert_eq!(std::fs::read(&overlay).unwrap(), first);
    // A PVC whose DisksInfo says qcow2 is opened as qcow2 (and checked at Sync).
    let vmi = edited(PVC, |_| {});
    let root = pod.path("var/run/kubevirt-private/vmi-disks/rootdisk/disk.img");
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    std::fs::write(
        &root,
        rvmm_devices::image::qcow2::overlay_test_bytes(1 << 20),
    )
    .unwrap();
    pod.file("dev/datadisk", &[0; 512]);
    let formats = BTreeMap::from([("rootdisk".to_string(), "qcow2".to_string())]);
    let planned = plan_with_formats(&vmi, &pod.dirs, &formats).unwrap();
    assert_eq!(planned.config.disks[0].format.as_deref(), Some("qcow2"));
    std::fs::write(&root, b"QFI\xfb truncated").unwrap();
    let text = crate::kubevirt::grpc::error_chain(
        &plan_with_formats(&vmi, &pod.dirs, &formats).unwrap_err(),
    );
    assert!(
        text.starts_with("spec.volumes[0].dataVolume: Disk image "),
        "{text}"
    );
}
