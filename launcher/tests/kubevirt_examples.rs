//! Every VMI and VM example of KubeVirt (copies in `tests/fixtures/kubevirt/examples/`) and a
//! VMI with every field of KubeVirt's v1 schema: each parses into rvmm's VMI model, and then
//! either plans into an rvmm VM in a launcher pod that holds its volumes, or is refused with an
//! error naming a field of that VMI (or a required one it lacks). No KVM needed.

use std::path::{Path, PathBuf};

use rvmm_launcher::kubevirt::vmi::{LauncherDirs, Vmi, VmiError, plan};
use serde_json::{Value, json};

const EXAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/kubevirt/examples"
);
const EVERY_FIELD: &str = include_str!("fixtures/kubevirt/vmi-every-field.json");

/// The VMI an example describes, as virt-handler would send it: a VMI as is; the VMI template
/// of a VirtualMachine, replica set or pool, named after it; a UID and namespace as the API
/// server sets them.
fn vmi_of(example: &Value, uid: &str) -> Value {
    let template = match example["kind"].as_str().unwrap() {
        "VirtualMachineInstance" => example.clone(),
        "VirtualMachine" | "VirtualMachineInstanceReplicaSet" => {
            example["spec"]["template"].clone()
        }
        "VirtualMachinePool" => {
            example["spec"]["virtualMachineTemplate"]["spec"]["template"].clone()
        }
        other => panic!("not a VMI source: {other}"),
    };
    let mut vmi = json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": template["metadata"].clone(),
        "spec": template["spec"].clone(),
    });
    let name = example["metadata"]["name"].clone();
    let metadata = vmi["metadata"]
        .as_object_mut()
        .map(|m| m.clone())
        .unwrap_or_default();
    vmi["metadata"] = Value::Object(metadata);
    vmi["metadata"]["name"] = name;
    vmi["metadata"]["namespace"] = json!("default");
    vmi["metadata"]["uid"] = json!(uid);
    vmi
}

/// A launcher pod in a temporary directory holding what `vmi`'s volumes need: raw container
/// disks, filesystem PVCs, the kernel-boot artifacts, host disks.
struct Pod {
    root: PathBuf,
    dirs: LauncherDirs,
}

impl Pod {
    fn for_vmi(tag: &str, vmi: &Value) -> Self {
        let root = std::env::temp_dir().join(format!("rvmm-examples-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dirs = LauncherDirs::under(&root);
        let file = |path: &Path| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, vec![0u8; 4096]).unwrap();
        };
        let volumes = vmi["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (index, volume) in volumes.iter().enumerate() {
            let name = volume["name"].as_str().unwrap_or_default();
            if volume.get("containerDisk").is_some() {
                file(&dirs.container_disks.join(format!("disk_{index}.img")));
            }
            if volume.get("persistentVolumeClaim").is_some() || volume.get("dataVolume").is_some() {
                file(&dirs.private.join("vmi-disks").join(name).join("disk.img"));
            }
            if let Some(path) = volume["hostDisk"]["path"].as_str() {
                file(&root.join(path.trim_start_matches('/')));
            }
        }
        let container = &vmi["spec"]["domain"]["firmware"]["kernelBoot"]["container"];
        for artifact in ["kernelPath", "initrdPath"] {
            if let Some(path) = container[artifact].as_str() {
                let name = Path::new(path).file_name().unwrap();
                file(&dirs.container_disks.join("kernel-boot").join(name));
            }
        }
        std::fs::create_dir_all(&root).unwrap();
        Self { root, dirs }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Whether the dotted field path (`spec.volumes[1].containerDisk.image`) is in `doc`.
fn has_field(doc: &Value, path: &str) -> bool {
    let mut at = doc;
    for part in path.split('.') {
        let (key, index) = match part.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        at = &at[key];
        if let Some(i) = index {
            at = &at[i];
        }
        if at.is_null() {
            return false;
        }
    }
    true
}

/// What planning `vmi` gives: `Ok` or the refused field and reason.
fn outcome(tag: &str, vmi_json: &Value) -> Result<(), (String, String)> {
    let vmi = Vmi::from_json(vmi_json.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{tag}: does not parse: {e}"));
    let pod = Pod::for_vmi(tag, vmi_json);
    match plan(&vmi, &pod.dirs) {
        Ok(_) => Ok(()),
        Err(VmiError::Unsupported { field, reason } | VmiError::Invalid { field, reason }) => {
            Err((field, reason))
        }
        Err(VmiError::Quantity { field, source }) => Err((field, source.to_string())),
        Err(VmiError::Read { field, source, .. }) => Err((field, source.to_string())),
        Err(VmiError::Image { field, source }) => Err((field, source.to_string())),
        Err(e @ VmiError::Parse { .. }) => panic!("{tag}: {e}"),
    }
}

fn assert_names_a_field(tag: &str, vmi: &Value, field: &str, reason: &str) {
    assert!(
        field.starts_with("spec.") || field.starts_with("metadata."),
        "{tag}: refused without a VMI field: {field}: {reason}"
    );
    assert!(
        has_field(vmi, field) || reason.starts_with("required"),
        "{tag}: names {field}, which the VMI does not have: {reason}"
    );
}

#[test]
fn every_kubevirt_example_parses_and_plans_or_is_refused_naming_its_field() {
    let mut files: Vec<_> = std::fs::read_dir(EXAMPLES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        36,
        "the VMI, VM, replica set and pool examples"
    );
    let mut planned = Vec::new();
    for (n, file) in files.iter().enumerate() {
        let tag = file.file_name().unwrap().to_str().unwrap();
        let example: Value = serde_norway::from_str(&std::fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        let mut vmi = vmi_of(&example, &format!("example-uid-{n}"));
        let mut result = outcome(tag, &vmi);
        if matches!(&result, Err((field, _)) if field == "spec.domain.firmware.kernelBoot") {
            // rvmm's boot source: with a kernel, the rest of the VMI is checked too.
            vmi["spec"]["domain"]["firmware"]["kernelBoot"] =
                json!({"container": {"image": "kernel", "kernelPath": "/boot/vmlinuz"}});
            result = outcome(tag, &vmi);
        }
        match result {
            Ok(()) => planned.push(tag),
            Err((field, reason)) => {
                println!("{tag}: refused: {field}: {reason}");
                assert_names_a_field(tag, &vmi, &field, &reason);
            }
        }
    }
    println!("planned: {planned:?}");
    for plans in [
        "vmi-kernel-boot.yaml",
        "vmi-fedora.yaml",
        "vmi-pvc.yaml",
        "vm-cirros.yaml",
    ] {
        assert!(planned.contains(&plans), "{plans}: {planned:?}");
    }
}

#[test]
fn a_vmi_with_every_field_of_the_v1_schema_parses() {
    let every: Value = serde_json::from_str(EVERY_FIELD).unwrap();
    // Typed fields that were once mistaken: resources' boolean beside requests and limits.
    assert_eq!(
        every["spec"]["domain"]["resources"]["overcommitGuestOverhead"],
        true
    );
    let vmi = Vmi::from_json(EVERY_FIELD.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert!(vmi.spec.domain.resources.overcommit_guest_overhead);
    // It asks for much rvmm has not: refused, naming a field it sets.
    let mut named = every.clone();
    named["metadata"]["uid"] = json!("every-field-uid");
    named["metadata"]["name"] = json!("every");
    if let Err((field, reason)) = outcome("every-field", &named) {
        assert_names_a_field("every-field", &named, &field, &reason);
    }
}

#[test]
fn nulls_and_fields_of_a_newer_kubevirt_are_ignored() {
    let vmi = json!({
        "metadata": {"name": "vm", "namespace": "default", "uid": "u-1",
                     "creationTimestamp": null, "annotations": null},
        "spec": {
            "domain": {
                "devices": {"disks": null, "interfaces": null, "futureDevice": {"x": 1}},
                "resources": {"requests": {"memory": "64Mi"}, "overcommitGuestOverhead": false},
                "cpu": null,
                "futureSetting": [1, 2, 3],
            },
            "volumes": null,
            "futureSpecField": "x",
        },
        "status": {"phase": "Running", "futureStatus": {}},
    });
    let parsed = Vmi::from_json(vmi.to_string().as_bytes()).unwrap();
    assert!(parsed.spec.domain.devices.disks.is_empty());
    assert_eq!(parsed.spec.domain.cpu, None);
    assert!(!parsed.spec.domain.resources.overcommit_guest_overhead);
}
