//! A Sync of the VMI the VM already runs: what changed, and whether rvmm can apply it live
//! (KubeVirt's launcher applies the grace period; hotplug is refused naming the field).

use super::{Vmi, VmiError, memory_field_and_bytes, unsupported, vcpus};

/// What a Sync of the running VMI changes that rvmm applies live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveUpdate {
    /// `terminationGracePeriodSeconds` changed (KubeVirt's launcher follows it).
    pub grace_period_changed: bool,
}

/// Compares `synced`, a VMI virt-handler syncs again, with `running`, the one the VM was built
/// from. Hotplug (CPUs, memory, disks and volumes, interfaces) and any other change of the VM
/// cannot be applied to a running rvmm VM: the first such field is the error, so virt-handler
/// reports it on the VMI rather than believing it applied. Metadata and status are not the
/// VM's and may change.
pub fn live_update(running: &Vmi, synced: &Vmi) -> Result<LiveUpdate, VmiError> {
    let mut ignored = Vec::new();
    let cpus = (vcpus(running, &mut ignored)?, vcpus(synced, &mut ignored)?);
    if cpus.0 != cpus.1 {
        let field = match synced.spec.domain.cpu {
            Some(_) => "spec.domain.cpu",
            None => "spec.domain.resources",
        };
        return Err(not_live(
            field,
            format!("{} to {} vCPUs: CPU hotplug", cpus.0, cpus.1),
        ));
    }
    let (field, new_memory) = memory_field_and_bytes(synced, &mut ignored)?;
    let (_, memory) = memory_field_and_bytes(running, &mut ignored)?;
    if memory != new_memory {
        return Err(not_live(
            &field,
            format!(
                "{} MiB to {} MiB: memory hotplug",
                memory >> 20,
                new_memory >> 20
            ),
        ));
    }
    let (old, new) = (&running.spec, &synced.spec);
    changed_list(
        "spec.domain.devices.disks",
        &old.domain.devices.disks,
        &new.domain.devices.disks,
        "disk hotplug",
    )?;
    changed_list("spec.volumes", &old.volumes, &new.volumes, "volume hotplug")?;
    changed_list(
        "spec.domain.devices.interfaces",
        &old.domain.devices.interfaces,
        &new.domain.devices.interfaces,
        "interface hotplug",
    )?;
    changed_list(
        "spec.networks",
        &old.networks,
        &new.networks,
        "network hotplug",
    )?;
    let unchanged = [
        (
            "spec.domain.firmware",
            old.domain.firmware == new.domain.firmware,
        ),
        (
            "spec.domain.devices",
            old.domain.devices == new.domain.devices,
        ),
        ("spec.domain.memory", old.domain.memory == new.domain.memory),
        (
            "spec.domain.launchSecurity",
            old.domain.launch_security == new.domain.launch_security,
        ),
        ("spec.architecture", old.architecture == new.architecture),
        (
            "spec.accessCredentials",
            old.access_credentials == new.access_credentials,
        ),
    ];
    if let Some((field, _)) = unchanged.iter().find(|(_, same)| !same) {
        return Err(not_live(field, "changed".into()));
    }
    Ok(LiveUpdate {
        grace_period_changed: old.termination_grace_period_seconds
            != new.termination_grace_period_seconds,
    })
}

fn not_live(field: &str, what: String) -> VmiError {
    unsupported(
        field,
        format!("{what} is not supported on a running rvmm VM (restart the VMI to apply it)"),
    )
}

/// Names the first entry of `field` that differs between the running and the synced VMI.
fn changed_list<T: PartialEq>(
    field: &str,
    running: &[T],
    synced: &[T],
    what: &str,
) -> Result<(), VmiError> {
    if running.len() != synced.len() {
        return Err(not_live(
            field,
            format!("{} to {} entries: {what}", running.len(), synced.len()),
        ));
    }
    match running.iter().zip(synced).position(|(a, b)| a != b) {
        Some(i) => Err(not_live(
            &format!("{field}[{i}]"),
            format!("changed: {what}"),
        )),
        None => Ok(()),
    }
}
