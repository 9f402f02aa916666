//! The `api.Domain` JSON virt-handler reads from GetDomain and from domain events.
//!
//! KubeVirt marshals its Go structs with default field names, so the JSON keys are Go's
//! (`Spec`, `Devices`, `Disks`, `Alias`), except the Kubernetes metadata (`ObjectMeta`,
//! `kind`, `apiVersion`, `name`, ...). A user-named device's alias is
//! `{"Name": "<name>", "UserDefined": true}` (libvirt's `ua-<name>`). rvmm fills the parts
//! virt-handler reads: name, UUID, the KubeVirt metadata (VMI UID, grace period and graceful
//! shutdown), the ACPI feature (so virt-handler shuts down before it kills), vCPUs, memory,
//! kernel boot, disks, interfaces, serial console, and the lifecycle state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::vmi::{LaunchPlan, Vmi};
use crate::config::TransportName;

/// KubeVirt's grace period when the VMI gives none (`v1.DefaultGracePeriodSeconds`).
pub const DEFAULT_GRACE_PERIOD_SECONDS: i64 = 30;

/// `Status.Status`: the domain's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifeCycle {
    /// Not defined (deleted).
    NoState,
    /// Running.
    Running,
    /// Blocked on a resource.
    Blocked,
    /// Paused.
    Paused,
    /// Shutting down.
    ShuttingDown,
    /// Off.
    Shutoff,
    /// Crashed.
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
}

impl LifeCycle {
    /// KubeVirt's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoState => "NoState",
            Self::Running => "Running",
            Self::Blocked => "Blocked",
            Self::Paused => "Paused",
            Self::ShuttingDown => "ShuttingDown",
            Self::Shutoff => "Shutoff",
            Self::Crashed => "Crashed",
            Self::PmSuspended => "PMSuspended",
        }
    }
}

/// `Status.Reason`: why the domain is in its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No particular reason (also "paused for an unknown reason").
    Unknown,
    /// The user asked (pause, shutdown).
    User,
    /// The guest shut down.
    Shutdown,
    /// Killed by the launcher.
    Destroyed,
    /// Migrated away.
    Migrated,
    /// The guest crashed.
    Crashed,
    /// The guest kernel panicked.
    Panicked,
    /// The VMM failed.
    Failed,
    /// The domain no longer exists (with [`LifeCycle::NoState`]).
    NonExistent,
    /// Paused on a disk I/O error.
    IoError,
    /// Paused while starting.
    StartingUp,
}

impl Reason {
    /// KubeVirt's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "Unknown",
            Self::User => "User",
            Self::Shutdown => "Shutdown",
            Self::Destroyed => "Destroyed",
            Self::Migrated => "Migrated",
            Self::Crashed => "Crashed",
            Self::Panicked => "Panicked",
            Self::Failed => "Failed",
            Self::NonExistent => "NonExistent",
            Self::IoError => "IOError",
            Self::StartingUp => "StartingUp",
        }
    }
}

/// The state reported with a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainState {
    /// Lifecycle state.
    pub status: LifeCycle,
    /// Why.
    pub reason: Reason,
    /// When the domain went away, for the final event (`ObjectMeta.deletionTimestamp`).
    pub deleted_at: Option<SystemTime>,
}

impl DomainState {
    /// Running normally.
    pub const RUNNING: Self = Self::new(LifeCycle::Running, Reason::Unknown);
    /// Paused by a PauseVirtualMachine call.
    pub const PAUSED_BY_USER: Self = Self::new(LifeCycle::Paused, Reason::User);

    /// `status` for `reason`, not deleted.
    pub const fn new(status: LifeCycle, reason: Reason) -> Self {
        Self {
            status,
            reason,
            deleted_at: None,
        }
    }

    /// Off for `reason` (`Shutdown`, `Destroyed`, `Crashed`, `Failed`, ...).
    pub const fn shutoff(reason: Reason) -> Self {
        Self::new(LifeCycle::Shutoff, reason)
    }

    /// The final state after the VM is gone: `NoState`/`NonExistent`, deleted at `when`.
    pub const fn gone(when: SystemTime) -> Self {
        Self {
            status: LifeCycle::NoState,
            reason: Reason::NonExistent,
            deleted_at: Some(when),
        }
    }
}

/// The domain for `vmi` run as `plan`, in `state`.
pub fn build(vmi: &Vmi, plan: &LaunchPlan, state: DomainState) -> Value {
    let meta = &vmi.metadata;
    let config = &plan.config;
    let firmware = vmi.spec.domain.firmware.as_ref();
    let uuid = firmware
        .and_then(|f| f.uuid.clone())
        .unwrap_or_else(|| meta.uid.clone());
    let cpu = vmi.spec.domain.cpu.as_ref();
    let topology = match cpu {
        Some(c) => [c.sockets, c.cores, c.threads].map(|n| n.max(1)),
        None => [u32::from(config.cpus.boot_vcpus), 1, 1],
    };
    let mut disks: Vec<Value> = plan
        .disks
        .iter()
        .map(|d| {
            let mut disk = json!({
                "Device": "disk",
                "Type": if d.block_device { "block" } else { "file" },
                "Source": if d.block_device { json!({"Dev": d.path}) } else { json!({"File": d.path}) },
                "Target": {"Bus": "virtio", "Device": d.target},
                "Driver": {"Name": "qemu", "Type": d.format.name()},
                "Alias": user_alias(&d.name),
            });
            if let Some((backing, format)) = &d.backing {
                disk["BackingStore"] = json!({
                    "Type": "file",
                    "Format": {"Type": format.name()},
                    "Source": {"File": backing},
                });
            }
            // The boot device, as libvirt's <boot order=N/>: the VMI's order, or 1 for the
            // disk rvmm boots from when the VMI gives none.
            if let Some(order) = d.boot_order.or(d.boot.then_some(1)) {
                disk["BootOrder"] = json!({"Order": order});
            }
            if d.readonly {
                disk["ReadOnly"] = json!({});
            }
            if let Some(serial) = &d.serial {
                disk["Serial"] = json!(serial);
            }
            disk
        })
        .collect();
    let mut interfaces: Vec<Value> = plan
        .interfaces
        .iter()
        .map(|i| {
            let mut iface = json!({
                "Type": "ethernet",
                "Source": {},
                "Target": {"Device": i.tap, "Managed": "no"},
                "Model": {"Type": "virtio-non-transitional"},
                "MAC": {"MAC": i.mac},
                "Alias": user_alias(&i.name),
            });
            if let Some(mtu) = i.mtu {
                iface["MTU"] = json!({"Size": mtu.to_string()});
            }
            iface
        })
        .collect();
    if config.transport == Some(TransportName::Pci) {
        // Disks, then interfaces, take the slots after the host bridge in order.
        for (index, device) in disks.iter_mut().chain(&mut interfaces).enumerate() {
            if let Some(slot) = rvmm_core::pci::device_slot(index) {
                device["Address"] = pci_address(slot);
            }
        }
    }
    let (serials, consoles) = match &plan.serial_socket {
        Some(socket) => {
            let mut serial = json!({
                "Type": "unix",
                "Target": {"Port": 0},
                "Source": {"Mode": "bind", "Path": socket},
                "Alias": {"Name": "serial0", "UserDefined": false},
            });
            if let Some(log) = &plan.serial_log {
                serial["Log"] = json!({"File": log, "Append": "on"});
            }
            (
                json!([serial]),
                json!([{"Type": "pty", "Target": {"Type": "serial", "Port": 0}}]),
            )
        }
        None => (json!([]), json!([])),
    };
    // virt-handler dereferences GracePeriod unchecked: always present, KubeVirt's default 30 s.
    let grace = vmi
        .spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE_PERIOD_SECONDS);
    let kubevirt = json!({
        "UID": meta.uid,
        "GracePeriod": {"DeletionGracePeriodSeconds": grace},
    });
    let mut object_meta = json!({
        "name": meta.name,
        "namespace": meta.namespace,
        "uid": meta.uid,
        "creationTimestamp": null,
    });
    if let Some(when) = state.deleted_at {
        object_meta["deletionTimestamp"] = json!(rfc3339(when));
    }
    json!({
        "kind": "Domain",
        "apiVersion": "1.2.2",
        "ObjectMeta": object_meta,
        "Spec": {
            "Type": "kvm",
            "Name": plan.domain_name,
            "UUID": uuid,
            "Memory": {"Value": config.memory.size, "Unit": "b"},
            "OS": {
                "Type": {"OS": "hvm", "Arch": "x86_64"},
                "Kernel": config.payload.kernel.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                "Initrd": config.payload.initramfs.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                "KernelArgs": config.payload.cmdline.clone().unwrap_or_default(),
                "BootOrder": if config.payload.kernel.is_none() { json!([{"Dev": "hd"}]) } else { json!(null) },
            },
            "Devices": {
                "Disks": disks,
                "Interfaces": interfaces,
                "Serials": serials,
                "Consoles": consoles,
            },
            "Metadata": {"KubeVirt": kubevirt},
            // virt-handler asks for a graceful shutdown (ShutdownVirtualMachine) only of a
            // domain with ACPI: rvmm presses the ACPI power button (Ctrl-Alt-Del for a guest
            // without ACPI).
            "Features": {"ACPI": {}},
            "CPU": {
                "Topology": {"Sockets": topology[0], "Cores": topology[1], "Threads": topology[2]},
            },
            "VCPU": {"Placement": "static", "CPUs": config.cpus.boot_vcpus},
        },
        "Status": {
            "Status": state.status.as_str(),
            "Reason": state.reason.as_str(),
            "Interfaces": null,
            "OSInfo": {},
            "FSFreezeStatus": {"Status": ""},
        },
    })
}

/// Records a graceful shutdown in `domain`'s grace-period metadata, as KubeVirt's launcher
/// does: `marked` when the launcher got SIGTERM and wants virt-handler to shut the VM down
/// (`MarkedForGracefulShutdown`), `started` when the guest was asked to shut down
/// (`DeletionTimestamp`: virt-handler kills the VM once the grace period from then is over).
pub fn set_graceful_shutdown(domain: &mut Value, marked: bool, started: Option<SystemTime>) {
    let grace = &mut domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"];
    if marked {
        grace["MarkedForGracefulShutdown"] = json!(true);
    }
    if let Some(when) = started {
        grace["DeletionTimestamp"] = json!(rfc3339(when));
    }
}

/// The addresses each guest NIC (by MAC) holds, IPv4 first.
pub type GuestAddresses = BTreeMap<String, BTreeSet<IpAddr>>;

/// Reports the addresses the guest's NICs were leased in `Status.Interfaces`, where KubeVirt's
/// launcher puts what the guest agent reports and virt-handler reads the guest's IPs for the
/// VMI's status (matched by MAC). The guest's own interface name is unknown without an agent:
/// `InterfaceName` stays empty.
pub fn set_guest_addresses(domain: &mut Value, addresses: &GuestAddresses) {
    if addresses.is_empty() {
        return;
    }
    let interfaces: Vec<Value> = addresses
        .iter()
        .map(|(mac, ips)| {
            let ips: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
            json!({
                "Mac": mac,
                "Ip": ips.first().cloned().unwrap_or_default(),
                "IPs": ips,
                "InterfaceName": "",
            })
        })
        .collect();
    domain["Status"]["Interfaces"] = Value::Array(interfaces);
}

/// A device's PCI address as libvirt writes it (segment 0, bus 0, function 0).
fn pci_address(slot: u8) -> Value {
    json!({
        "Type": "pci",
        "Domain": "0x0000",
        "Bus": "0x00",
        "Slot": format!("{slot:#04x}"),
        "Function": "0x0",
    })
}

/// The alias of a device the VMI names (libvirt's `ua-<name>`).
fn user_alias(name: &str) -> Value {
    json!({"Name": name, "UserDefined": true})
}

/// `when` as Kubernetes writes times: RFC 3339, UTC, whole seconds.
pub fn rfc3339(when: SystemTime) -> String {
    let secs = when
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use rvmm_devices::image::ImageFormat;

    use super::*;
    use crate::kubevirt::vmi::{LaunchPlan, PlannedDisk, PlannedInterface};

    /// A VMI with a firmware UUID and a grace period.
    pub(crate) fn vmi() -> Vmi {
        Vmi::from_json(
            br#"{
            "metadata": {"name": "testvm", "namespace": "default", "uid": "1b2c-uid"},
            "spec": {
                "terminationGracePeriodSeconds": 30,
                "domain": {
                    "cpu": {"cores": 2, "sockets": 1, "threads": 1},
                    "firmware": {"uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223"}
                }
            }
        }"#,
        )
        .unwrap()
    }

    /// Its plan: 2 vCPUs, a writable image `rootdisk` (vda), a read-only block device
    /// `data` (vdb), the interface `default` on tap0.
    pub(crate) fn plan() -> LaunchPlan {
        let mut config = crate::config::VmConfigFile::default();
        config.cpus.boot_vcpus = 2;
        config.memory.size = 1 << 30;
        config.payload.kernel = Some(PathBuf::from("/kb/vmlinuz"));
        LaunchPlan {
            domain_name: "default_testvm".into(),
            config,
            serial_socket: Some(PathBuf::from("/run/p/1b2c-uid/virt-serial0")),
            serial_log: Some(PathBuf::from("/run/p/1b2c-uid/virt-serial0-log")),
            disks: vec![
                PlannedDisk {
                    name: "rootdisk".into(),
                    path: PathBuf::from("/disks/root.img"),
                    readonly: false,
                    block_device: false,
                    target: "vda".into(),
                    serial: None,
                    format: ImageFormat::Qcow2,
                    backing: Some((PathBuf::from("/cd/disk_0.img"), ImageFormat::Raw)),
                    boot_order: Some(2),
                    boot: false,
                },
                PlannedDisk {
                    name: "data".into(),
                    path: PathBuf::from("/dev/data"),
                    readonly: true,
                    block_device: true,
                    target: "vdb".into(),
                    serial: Some("D1".into()),
                    format: ImageFormat::Raw,
                    backing: None,
                    boot_order: None,
                    boot: false,
                },
            ],
            interfaces: vec![PlannedInterface {
                name: "default".into(),
                tap: "tap0".into(),
                mac: "02:00:00:00:00:01".into(),
                binding: Some(crate::kubevirt::vmi::Binding::Masquerade),
                mtu: Some(1450),
            }],
            prepare: vec![],
            warnings: vec![],
        }
    }

    #[test]
    fn running_domain_carries_name_uuid_metadata_and_state() {
        let d = build(&vmi(), &plan(), DomainState::RUNNING);
        assert_eq!(d["kind"], "Domain");
        assert_eq!(d["ObjectMeta"]["name"], "testvm");
        assert_eq!(d["ObjectMeta"]["namespace"], "default");
        assert_eq!(d["ObjectMeta"]["uid"], "1b2c-uid");
        assert!(d["ObjectMeta"].get("deletionTimestamp").is_none());
        assert_eq!(d["Spec"]["Name"], "default_testvm");
        assert_eq!(d["Spec"]["UUID"], "5d307ca9-b3ef-428c-8861-06e72d69f223");
        assert_eq!(d["Spec"]["Metadata"]["KubeVirt"]["UID"], "1b2c-uid");
        assert_eq!(
            d["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["DeletionGracePeriodSeconds"],
            30
        );
        assert_eq!(
            d["Spec"]["Memory"],
            json!({"Value": 1u64 << 30, "Unit": "b"})
        );
        assert_eq!(d["Spec"]["VCPU"]["CPUs"], 2);
        assert_eq!(d["Spec"]["CPU"]["Topology"]["Cores"], 2);
        assert_eq!(d["Spec"]["OS"]["Kernel"], "/kb/vmlinuz");
        assert_eq!(d["Status"]["Status"], "Running");
        assert_eq!(d["Status"]["Reason"], "Unknown");
    }

    #[test]
    fn disks_and_interfaces_have_user_aliases() {
        let d = build(&vmi(), &plan(), DomainState::RUNNING);
        let disks = d["Spec"]["Devices"]["Disks"].as_array().unwrap();
        assert_eq!(
            disks[0]["Alias"],
            json!({"Name": "rootdisk", "UserDefined": true})
        );
        assert_eq!(disks[0]["Source"], json!({"File": "/disks/root.img"}));
        assert_eq!(
            disks[0]["Target"],
            json!({"Bus": "virtio", "Device": "vda"})
        );
        assert!(disks[0].get("ReadOnly").is_none());
        assert_eq!(disks[0]["Driver"], json!({"Name": "qemu", "Type": "qcow2"}));
        assert_eq!(
            disks[0]["BackingStore"],
            json!({"Type": "file", "Format": {"Type": "raw"}, "Source": {"File": "/cd/disk_0.img"}})
        );
        assert_eq!(disks[0]["BootOrder"], json!({"Order": 2}));
        assert_eq!(disks[1]["Driver"]["Type"], "raw");
        assert!(disks[1].get("BootOrder").is_none());
        assert_eq!(disks[1]["Type"], "block");
        assert_eq!(disks[1]["Source"], json!({"Dev": "/dev/data"}));
        assert_eq!(disks[1]["ReadOnly"], json!({}));
        assert_eq!(disks[1]["Serial"], "D1");
        let ifaces = d["Spec"]["Devices"]["Interfaces"].as_array().unwrap();
        assert_eq!(ifaces[0]["MAC"], json!({"MAC": "02:00:00:00:00:01"}));
        assert_eq!(
            ifaces[0]["Alias"],
            json!({"Name": "default", "UserDefined": true})
        );
        assert_eq!(ifaces[0]["Target"]["Device"], "tap0");
        let serial = &d["Spec"]["Devices"]["Serials"][0];
        assert_eq!(serial["Source"]["Path"], "/run/p/1b2c-uid/virt-serial0");
        assert_eq!(
            serial["Log"],
            json!({"File": "/run/p/1b2c-uid/virt-serial0-log", "Append": "on"})
        );
    }

    #[test]
    fn interfaces_carry_the_pod_mtu_and_leased_addresses_go_to_status_interfaces() {
        let mut d = build(&vmi(), &plan(), DomainState::RUNNING);
        assert_eq!(
            d["Spec"]["Devices"]["Interfaces"][0]["MTU"],
            json!({"Size": "1450"})
        );
        set_guest_addresses(&mut d, &BTreeMap::new());
        assert_eq!(d["Status"]["Interfaces"], Value::Null, "nothing leased");
        let ips = ["fd10:0:2::2", "10.0.2.2"].map(|ip| ip.parse().unwrap());
        let leased = BTreeMap::from([("02:00:00:00:00:01".to_string(), BTreeSet::from(ips))]);
        set_guest_addresses(&mut d, &leased);
        assert_eq!(
            d["Status"]["Interfaces"],
            json!([{"Mac": "02:00:00:00:00:01", "Ip": "10.0.2.2",
                    "IPs": ["10.0.2.2", "fd10:0:2::2"], "InterfaceName": ""}])
        );
    }

    #[test]
    fn on_pci_disks_then_interfaces_have_the_slots_after_the_host_bridge() {
        let mut plan = plan();
        plan.config.transport = Some(TransportName::Pci);
        let d = build(&vmi(), &plan, DomainState::RUNNING);
        let devices = &d["Spec"]["Devices"];
        let address = |slot: &str| json!({"Type": "pci", "Domain": "0x0000", "Bus": "0x00", "Slot": slot, "Function": "0x0"});
        assert_eq!(devices["Disks"][0]["Address"], address("0x01"));
        assert_eq!(devices["Disks"][1]["Address"], address("0x02"));
        assert_eq!(devices["Interfaces"][0]["Address"], address("0x03"));
        // virtio-mmio devices have no PCI address.
        let d = build(&vmi(), &super::tests::plan(), DomainState::RUNNING);
        assert!(d["Spec"]["Devices"]["Disks"][0].get("Address").is_none());
    }

    #[test]
    fn paused_and_shutoff_states_use_kubevirt_spellings() {
        let d = build(&vmi(), &plan(), DomainState::PAUSED_BY_USER);
        assert_eq!(
            (d["Status"]["Status"].clone(), d["Status"]["Reason"].clone()),
            (json!("Paused"), json!("User"))
        );
        let d = build(&vmi(), &plan(), DomainState::shutoff(Reason::Shutdown));
        assert_eq!(d["Status"]["Status"], "Shutoff");
        assert_eq!(d["Status"]["Reason"], "Shutdown");
        let d = build(
            &vmi(),
            &plan(),
            DomainState::new(LifeCycle::PmSuspended, Reason::IoError),
        );
        assert_eq!(d["Status"]["Status"], "PMSuspended");
        assert_eq!(d["Status"]["Reason"], "IOError");
    }

    #[test]
    fn gone_domain_has_deletion_timestamp() {
        let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let d = build(&vmi(), &plan(), DomainState::gone(when));
        assert_eq!(d["Status"]["Status"], "NoState");
        assert_eq!(d["Status"]["Reason"], "NonExistent");
        assert_eq!(d["ObjectMeta"]["deletionTimestamp"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn uuid_falls_back_to_vmi_uid_and_topology_to_vcpu_count() {
        let mut v = vmi();
        v.spec.domain.firmware = None;
        v.spec.domain.cpu = None;
        let d = build(&v, &plan(), DomainState::RUNNING);
        assert_eq!(d["Spec"]["UUID"], "1b2c-uid");
        assert_eq!(
            d["Spec"]["CPU"]["Topology"],
            json!({"Sockets": 2, "Cores": 1, "Threads": 1})
        );
    }

    #[test]
    fn grace_period_defaults_to_30_s_and_acpi_is_offered() {
        let mut v = vmi();
        v.spec.termination_grace_period_seconds = None;
        let d = build(&v, &plan(), DomainState::RUNNING);
        assert_eq!(
            d["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"],
            json!({"DeletionGracePeriodSeconds": 30})
        );
        assert_eq!(d["Spec"]["Features"]["ACPI"], json!({}));
    }

    #[test]
    fn graceful_shutdown_marks_and_timestamps_the_grace_period() {
        let mut d = build(&vmi(), &plan(), DomainState::RUNNING);
        set_graceful_shutdown(&mut d, false, None);
        assert_eq!(
            d["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"],
            json!({"DeletionGracePeriodSeconds": 30})
        );
        let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        set_graceful_shutdown(&mut d, true, Some(when));
        assert_eq!(
            d["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"],
            json!({
                "DeletionGracePeriodSeconds": 30,
                "MarkedForGracefulShutdown": true,
                "DeletionTimestamp": "2023-11-14T22:13:20Z",
            })
        );
    }

    #[test]
    fn rfc3339_handles_leap_years() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
