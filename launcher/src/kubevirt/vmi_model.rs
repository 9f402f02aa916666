//! The part of KubeVirt's `VirtualMachineInstance` (kubevirt.io/v1) that rvmm reads or must
//! refuse. Unknown fields are ignored: VMIs carry much that does not concern the VMM, and a
//! newer KubeVirt adds more. Fields rvmm only checks for presence are kept as raw JSON. Every
//! typed field has KubeVirt's type (`launcher/tests/fixtures/kubevirt/vmi-every-field.json`
//! sets every field of the v1 schema), and a `null` is an unset field.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::quantity::Quantity;

/// A `VirtualMachineInstance`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Vmi {
    /// Name, namespace, UID.
    pub metadata: ObjectMeta,
    /// The desired VM.
    pub spec: VmiSpec,
    /// What virt-controller and virt-handler recorded (the migration and the interfaces'
    /// pod interface names are read).
    pub status: VmiStatus,
}

/// `status`: the parts a migration and the pod network's DHCP need.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct VmiStatus {
    /// `migrationState`.
    pub migration_state: Option<MigrationState>,
    /// `migrationTransport`: "Unix" or (legacy) TCP.
    pub migration_transport: String,
    /// One entry per interface.
    pub interfaces: Vec<InterfaceStatus>,
}

/// `status.interfaces[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// The VMI interface (and network) name.
    pub name: String,
    /// The pod interface backing it (`eth0` for the pod network unless virt-handler says).
    pub pod_interface_name: Option<String>,
}

/// `status.migrationState`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct MigrationState {
    /// `migrationUid`.
    pub migration_uid: String,
    /// `targetPod`: the pod receiving the VM.
    pub target_pod: String,
    /// `sourceState` (decentralized migrations).
    pub source_state: Option<MigrationEndState>,
}

/// `status.migrationState.sourceState`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct MigrationEndState {
    /// `migrationUID`.
    #[serde(rename = "migrationUID")]
    pub migration_uid: String,
    /// `virtualMachineInstanceUID`.
    #[serde(rename = "virtualMachineInstanceUID")]
    pub vmi_uid: Option<String>,
}

/// `metadata`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// VMI name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// VMI UID.
    pub uid: String,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

/// `spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct VmiSpec {
    /// The VM's hardware.
    pub domain: DomainSpec,
    /// Disk sources, referenced by name from `domain.devices.disks`.
    pub volumes: Vec<Volume>,
    /// Networks, referenced by name from `domain.devices.interfaces`.
    pub networks: Vec<Network>,
    /// Seconds between the shutdown request and the kill.
    pub termination_grace_period_seconds: Option<i64>,
    /// Guest architecture (`amd64`).
    pub architecture: Option<String>,
    /// Guest hostname (default: the VMI name).
    pub hostname: Option<String>,
    /// The guest's DNS subdomain (`<hostname>.<subdomain>.<namespace>.svc...`).
    pub subdomain: Option<String>,
    /// SSH keys or passwords to inject.
    pub access_credentials: Option<Vec<Value>>,
}

/// `spec.domain`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct DomainSpec {
    /// CPU and memory requests and limits.
    pub resources: Resources,
    /// CPU topology.
    pub cpu: Option<Cpu>,
    /// Guest memory.
    pub memory: Option<Memory>,
    /// Firmware and direct kernel boot.
    pub firmware: Option<Firmware>,
    /// Devices.
    pub devices: Devices,
    /// SEV / TDX.
    pub launch_security: Option<Value>,
}

/// `spec.domain.resources`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Resources {
    /// Requests, by resource name (`memory`, `cpu`).
    pub requests: BTreeMap<String, Quantity>,
    /// Limits, by resource name.
    pub limits: BTreeMap<String, Quantity>,
    /// Leave the VMM's overhead out of the pod's request (a scheduling matter).
    pub overcommit_guest_overhead: bool,
}

impl Resources {
    /// `requests` or `limits` by that name.
    pub fn get(&self, kind: &str) -> Option<&BTreeMap<String, Quantity>> {
        match kind {
            "requests" => Some(&self.requests),
            "limits" => Some(&self.limits),
            _ => None,
        }
    }
}

/// `spec.domain.cpu`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Cpu {
    /// Cores per socket (0: 1).
    pub cores: u32,
    /// Sockets (0: 1).
    pub sockets: u32,
    /// Threads per core (0: 1).
    pub threads: u32,
    /// Maximum sockets for hotplug.
    pub max_sockets: Option<u32>,
    /// CPU model (`host-model`, ...).
    pub model: Option<String>,
    /// Pin vCPUs to host CPUs.
    pub dedicated_cpu_placement: bool,
    /// Guest NUMA topology.
    pub numa: Option<Value>,
}

/// `spec.domain.memory`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Memory {
    /// Guest RAM.
    pub guest: Option<Quantity>,
    /// Ceiling for memory hotplug.
    pub max_guest: Option<Quantity>,
    /// Hugepage backing.
    pub hugepages: Option<Value>,
}

/// `spec.domain.firmware`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Firmware {
    /// SMBIOS system UUID (the domain UUID).
    pub uuid: Option<String>,
    /// SMBIOS serial.
    pub serial: Option<String>,
    /// BIOS or EFI.
    pub bootloader: Option<Bootloader>,
    /// Direct kernel boot.
    pub kernel_boot: Option<KernelBoot>,
}

/// `spec.domain.firmware.bootloader`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Bootloader {
    /// Legacy BIOS.
    pub bios: Option<Value>,
    /// UEFI.
    pub efi: Option<Efi>,
}

/// `spec.domain.firmware.bootloader.efi`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Efi {
    /// Secure Boot; KubeVirt's default (absent) is on.
    pub secure_boot: Option<bool>,
    /// Keep the NVRAM.
    pub persistent: Option<bool>,
}

/// `spec.domain.firmware.kernelBoot`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct KernelBoot {
    /// Kernel command line.
    pub kernel_args: Option<String>,
    /// The container image holding kernel and initrd.
    pub container: Option<KernelBootContainer>,
}

/// `spec.domain.firmware.kernelBoot.container`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct KernelBootContainer {
    /// Image reference.
    pub image: String,
    /// Kernel path inside the image.
    pub kernel_path: Option<String>,
    /// Initrd path inside the image.
    pub initrd_path: Option<String>,
}

/// `spec.domain.devices`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Devices {
    /// Disks, each naming a volume.
    pub disks: Vec<Disk>,
    /// NICs, each naming a network.
    pub interfaces: Vec<Interface>,
    /// Serial console (default true).
    pub autoattach_serial_console: Option<bool>,
    /// Copy the serial console to a log for the `guest-console-log` container (default: the
    /// cluster's setting, on unless disabled).
    pub log_serial_console: Option<bool>,
    /// VNC display (default true).
    pub autoattach_graphics_device: Option<bool>,
    /// virtio-vsock.
    #[serde(rename = "autoattachVSOCK")]
    pub autoattach_vsock: Option<bool>,
    /// virtio-rng.
    pub rng: Option<Value>,
    /// GPUs.
    pub gpus: Vec<Value>,
    /// Host devices.
    pub host_devices: Vec<Value>,
    /// virtiofs shares.
    pub filesystems: Vec<Value>,
    /// Tablets, keyboards.
    pub inputs: Vec<Value>,
    /// Watchdog.
    pub watchdog: Option<Value>,
    /// TPM.
    pub tpm: Option<Value>,
    /// Sound card.
    pub sound: Option<Value>,
    /// USB redirection.
    pub client_passthrough: Option<Value>,
    /// Host metrics device.
    pub downward_metrics: Option<Value>,
}

/// `spec.domain.devices.disks[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Disk {
    /// Disk and volume name.
    pub name: String,
    /// A plain disk.
    pub disk: Option<DiskTarget>,
    /// A CD-ROM drive.
    pub cdrom: Option<Value>,
    /// A SCSI LUN.
    pub lun: Option<Value>,
    /// Serial (virtio-blk GET_ID).
    pub serial: Option<String>,
    /// Boot order: without kernelBoot, rvmm boots from the disk with the lowest.
    pub boot_order: Option<u32>,
}

/// `spec.domain.devices.disks[].disk`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct DiskTarget {
    /// `virtio`, `sata`, `scsi`, `usb`.
    pub bus: Option<String>,
    /// Guest writes fail.
    pub readonly: bool,
}

/// `spec.volumes[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Volume {
    /// Volume name.
    pub name: String,
    /// A disk image shipped in a container image.
    pub container_disk: Option<ContainerDisk>,
    /// A PVC.
    pub persistent_volume_claim: Option<PvcSource>,
    /// A CDI DataVolume (a PVC).
    pub data_volume: Option<DataVolumeSource>,
    /// An image on the node.
    pub host_disk: Option<HostDisk>,
    /// A blank scratch disk.
    pub empty_disk: Option<EmptyDisk>,
    /// cloud-init NoCloud data.
    pub cloud_init_no_cloud: Option<CloudInitNoCloud>,
    /// A PVC used through a throw-away overlay.
    pub ephemeral: Option<EphemeralSource>,
    /// Sources rvmm refuses, by their VMI field name.
    #[serde(flatten)]
    pub others: BTreeMap<String, Value>,
}

/// Volume sources rvmm has no support for (checked in this order).
const UNSUPPORTED_VOLUME_SOURCES: &[&str] = &[
    "cloudInitConfigDrive",
    "configMap",
    "secret",
    "serviceAccount",
    "downwardAPI",
    "downwardMetrics",
    "sysprep",
    "memoryDump",
];

impl Volume {
    /// The VMI field name of an unsupported source this volume uses.
    pub fn other_source(&self) -> Option<&'static str> {
        UNSUPPORTED_VOLUME_SOURCES
            .iter()
            .copied()
            .find(|k| self.others.contains_key(*k))
            .or_else(|| self.others.keys().next().map(|_| "source"))
    }
}

/// `containerDisk`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerDisk {
    /// Image reference.
    pub image: String,
    /// Path of the disk inside the image.
    pub path: Option<String>,
}

/// `persistentVolumeClaim`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct PvcSource {
    /// Claim name.
    pub claim_name: String,
    /// Read-only.
    pub read_only: bool,
    /// Hotplugged after start.
    pub hotpluggable: bool,
}

/// `ephemeral`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct EphemeralSource {
    /// The PVC the overlay is based on.
    pub persistent_volume_claim: Option<PvcSource>,
}

/// `dataVolume`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct DataVolumeSource {
    /// DataVolume name.
    pub name: String,
    /// Hotplugged after start.
    pub hotpluggable: bool,
}

/// `hostDisk`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct HostDisk {
    /// Image path.
    pub path: String,
    /// `Disk` (must exist) or `DiskOrCreate`.
    pub r#type: String,
    /// Size when created.
    pub capacity: Option<Quantity>,
}

/// `emptyDisk`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct EmptyDisk {
    /// Size.
    pub capacity: Quantity,
}

/// `cloudInitNoCloud`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CloudInitNoCloud {
    /// user-data, inline.
    pub user_data: Option<String>,
    /// user-data, base64.
    pub user_data_base64: Option<String>,
    /// user-data from a Secret (mounted by virt-controller).
    pub user_data_secret_ref: Option<Value>,
    /// network-config, inline.
    pub network_data: Option<String>,
    /// network-config, base64.
    pub network_data_base64: Option<String>,
    /// network-config from a Secret.
    pub network_data_secret_ref: Option<Value>,
}

/// `spec.domain.devices.interfaces[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Interface {
    /// Interface and network name.
    pub name: String,
    /// NIC model (`virtio`, `e1000`, ...).
    pub model: Option<String>,
    /// MAC address.
    pub mac_address: Option<String>,
    /// `absent` for an unplugged interface.
    pub state: Option<String>,
    /// Bridge binding.
    pub bridge: Option<Value>,
    /// Masquerade (NAT) binding.
    pub masquerade: Option<Value>,
    /// Other bindings, refused.
    pub sriov: Option<Value>,
    /// Deprecated user-mode networking.
    pub slirp: Option<Value>,
    /// passt binding.
    pub passt: Option<Value>,
    /// macvtap binding.
    pub macvtap: Option<Value>,
    /// A network binding plugin.
    pub binding: Option<Value>,
    /// Extra DHCP options for the guest.
    pub dhcp_options: Option<DhcpOptions>,
}

/// `spec.domain.devices.interfaces[].dhcpOptions`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct DhcpOptions {
    /// Option 67.
    pub boot_file_name: Option<String>,
    /// Option 66.
    pub tftp_server_name: Option<String>,
    /// Option 42, as text.
    pub ntp_servers: Vec<String>,
    /// Options 224 to 254.
    pub private_options: Vec<DhcpPrivateOption>,
}

/// `dhcpOptions.privateOptions[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct DhcpPrivateOption {
    /// The option code.
    pub option: i64,
    /// Its value.
    pub value: String,
}

impl Interface {
    /// The name of the binding rvmm cannot provide, if the interface asks for one.
    pub fn unsupported_binding(&self) -> Option<&'static str> {
        [
            ("sriov", &self.sriov),
            ("slirp", &self.slirp),
            ("passt", &self.passt),
            ("macvtap", &self.macvtap),
            ("binding", &self.binding),
        ]
        .into_iter()
        .find_map(|(name, v)| v.is_some().then_some(name))
    }
}

/// `spec.networks[].pod`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct PodNetwork {
    /// The masquerade network (default 10.0.2.0/24).
    #[serde(rename = "vmNetworkCIDR")]
    pub vm_network_cidr: Option<String>,
    /// The masquerade IPv6 network (default fd10:0:2::/120).
    #[serde(rename = "vmIPv6NetworkCIDR")]
    pub vm_ipv6_network_cidr: Option<String>,
}

/// `spec.networks[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Network {
    /// Network name.
    pub name: String,
    /// The pod network.
    pub pod: Option<PodNetwork>,
    /// A Multus network.
    pub multus: Option<Value>,
}
