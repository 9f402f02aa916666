//! The backend's answers that need no KVM: VMIs refused before a VM is built, commands without
//! a VM, and the domain it reports. The VM's life under virt-handler's commands is
//! `launcher/tests/kubevirt.rs` (KVM).

use std::path::Path;
use std::sync::mpsc::{Receiver, channel};

use serde_json::json;

use super::*;
use crate::kubevirt::grpc::error_chain;
use crate::kubevirt::grpc::tests::TempDir;

/// A kernel-boot VMI for `uid` whose kernel is in the container-disk directory `dirs` names.
fn vmi(uid: &str, edit: impl FnOnce(&mut Value)) -> Vmi {
    let mut v = json!({
        "metadata": {"name": "testvm", "namespace": "default", "uid": uid},
        "spec": {
            "domain": {
                "devices": {"autoattachSerialConsole": false},
                "firmware": {"kernelBoot": {"container": {
                    "image": "example/kernel", "kernelPath": "/boot/vmlinux"}}},
                "memory": {"guest": "64Mi"}
            }
        }
    });
    edit(&mut v);
    Vmi::from_json(v.to_string().as_bytes()).unwrap()
}

/// A backend for `--uid u-1` over a VMM that never touches KVM in these tests, with a pod
/// directory holding the kernel; the receiver gets the changes it queues.
fn backend(dir: &Path) -> (KubevirtBackend, Receiver<Change>) {
    let dirs = LauncherDirs::under(dir);
    let kernel_dir = dirs.container_disks.join("kernel-boot");
    std::fs::create_dir_all(&kernel_dir).unwrap();
    std::fs::write(kernel_dir.join("vmlinux"), b"not run").unwrap();
    let vmm = Vmm::without_kvm();
    let (changes, received) = channel();
    let backend = KubevirtBackend::new(
        vmm,
        dirs,
        "u-1".into(),
        Arc::new(DomainRecord::default()),
        changes,
    );
    (backend, received)
}

fn message(result: Result<(), BackendError>) -> String {
    error_chain(&result.unwrap_err())
}

#[test]
fn sync_of_an_unrunnable_vmi_names_the_field_and_defines_nothing() {
    let dir = TempDir::new("backend-sata");
    let (backend, _) = backend(&dir.0);
    let sata = vmi("u-1", |v| {
        v["spec"]["domain"]["devices"]["disks"] =
            json!([{"name": "root", "disk": {"bus": "sata"}}]);
        v["spec"]["volumes"] = json!([{"name": "root", "emptyDisk": {"capacity": "1Gi"}}]);
    });
    let result = backend.sync(&sata, &Default::default());
    assert!(matches!(result, Err(BackendError::Vmi(_))), "{result:?}");
    assert_eq!(
        message(result),
        "The VMI cannot run on rvmm: spec.domain.devices.disks[0].disk.bus: sata is not \
         supported (virtio only)"
    );
    assert!(!backend.has_synced());
    assert_eq!(backend.domain(), None);
}

#[test]
fn sync_of_another_vmi_than_the_launchers_is_refused() {
    let dir = TempDir::new("backend-uid");
    let (backend, _) = backend(&dir.0);
    assert_eq!(
        message(backend.sync(&vmi("u-2", |_| {}), &Default::default())),
        "The VM controller failed: VMI u-2 is not this launcher's VMI u-1"
    );
    assert!(!backend.has_synced());
}

#[test]
fn vm_that_cannot_start_is_forgotten_so_the_next_sync_tries_again() {
    let dir = TempDir::new("backend-start");
    let (backend, _) = backend(&dir.0);
    // The VMI plans, but the "kernel" is no kernel: boot fails after the VM was created.
    let err = message(backend.sync(&vmi("u-1", |_| {}), &Default::default()));
    assert!(
        err.starts_with("The VM controller failed: Cannot start the VM: "),
        "{err}"
    );
    assert!(!backend.has_synced());
    assert_eq!(backend.vmm.state(), None, "the failed VM is deleted");
    let again = message(backend.sync(&vmi("u-1", |_| {}), &Default::default()));
    assert_eq!(again, err);
}

#[test]
fn commands_before_a_sync_find_no_vm_or_nothing_to_do() {
    let dir = TempDir::new("backend-empty");
    let (backend, changes) = backend(&dir.0);
    let v = vmi("u-1", |_| {});
    for (what, result) in [
        ("pause", backend.pause(&v)),
        ("unpause", backend.unpause(&v)),
        ("reset", backend.reset(&v)),
    ] {
        assert!(
            matches!(result, Err(BackendError::NoVm)),
            "{what}: {result:?}"
        );
    }
    // As KubeVirt answers for a missing domain: nothing to stop.
    backend.shutdown(&v).unwrap();
    backend.kill(&v).unwrap();
    backend.delete(&v).unwrap();
    assert_eq!(backend.domain(), None);
    assert_eq!(backend.domain_stats().unwrap(), None);
    assert!(!backend.mark_for_graceful_shutdown(), "no VM to shut down");
    assert!(changes.try_recv().is_err(), "no domain events without a VM");
}

#[test]
fn soft_reboot_is_unsupported_with_the_reason() {
    let dir = TempDir::new("backend-soft-reboot");
    let (backend, _) = backend(&dir.0);
    let err = message(backend.soft_reboot(&vmi("u-1", |_| {})));
    assert!(
        err.starts_with("A soft reboot (it needs a guest agent")
            && err.ends_with("is not supported by rvmm"),
        "{err}"
    );
}

#[test]
fn record_builds_the_domain_with_its_graceful_shutdown_metadata() {
    let dir = TempDir::new("backend-record");
    let (backend, _) = backend(&dir.0);
    let v = vmi("u-1", |_| {});
    let plan = crate::kubevirt::vmi::plan(&v, &backend.dirs).unwrap();
    let record = DomainRecord::synced(v, plan);
    assert_eq!(record.state(), None);
    record.set_state(DomainState::RUNNING);
    let started = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    if let Some(d) = lock(&record.defined).as_mut() {
        d.marked_for_shutdown = true;
        d.shutdown_started = Some(started);
    }
    let domain = record.domain_in(record.state().unwrap()).unwrap();
    assert_eq!(domain["Status"]["Status"], "Running");
    assert_eq!(domain["Spec"]["Name"], "default_testvm");
    assert_eq!(
        domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"],
        json!({
            "DeletionGracePeriodSeconds": 30,
            "MarkedForGracefulShutdown": true,
            "DeletionTimestamp": "2023-11-14T22:13:20Z",
        })
    );
    // A deleted domain still describes itself to queued events.
    if let Some(d) = lock(&record.defined).as_mut() {
        d.deleted = true;
    }
    assert!(record.domain_in(DomainState::RUNNING).is_some());
}
