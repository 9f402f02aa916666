//! A KubeVirt `VirtualMachineInstance` (the JSON virt-handler sends with SyncVirtualMachine) to
//! an rvmm VM: a [`VmConfigFile`] plus what the launcher must prepare (empty disks, the
//! cloud-init disk, copies of container disks) and where the serial console listens.
//!
//! The VMI model keeps only the fields rvmm reads or must refuse; every other field is ignored.
//! Anything rvmm cannot honour is an error naming the VMI field
//! (`spec.domain.devices.disks[1].disk.bus: sata is not supported (virtio only)`); settings
//! that change nothing the guest relies on are dropped with a warning in
//! [`LaunchPlan::warnings`] (and the log).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rvmm_devices::image::{ImageError, ImageFormat};

use crate::config::{
    CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, RngConfig, SerialConfig,
    SerialModeName, TransportName, VmConfigFile,
};

use super::nocloud::NoCloudData;
use super::quantity::{Quantity, QuantityError};
pub use super::vmi_model::*;

#[path = "vmi_devices.rs"]
mod devices;
#[path = "vmi_live_update.rs"]
mod live_update;
#[cfg(test)]
use devices::guest_disk_name;
use devices::{disks, interfaces};
pub use live_update::{LiveUpdate, live_update};

/// The tap device KubeVirt's network setup creates for the pod network's interface.
pub const POD_TAP: &str = "tap0";

/// A VMI that rvmm cannot run, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum VmiError {
    /// Not JSON, or a field of the wrong type.
    #[error("Not a VirtualMachineInstance: {path}: {message}")]
    Parse {
        /// The field path (`spec.domain.cpu.cores`).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A feature rvmm does not have.
    #[error("{field}: {reason}")]
    Unsupported {
        /// The VMI field path.
        field: String,
        /// What rvmm lacks.
        reason: String,
    },
    /// A value that is wrong whatever the VMM.
    #[error("{field}: {reason}")]
    Invalid {
        /// The VMI field path.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A resource quantity that does not parse.
    #[error("{field}: invalid quantity")]
    Quantity {
        /// The VMI field path.
        field: String,
        /// Cause.
        #[source]
        source: QuantityError,
    },
    /// A disk image the VMI refers to cannot be used (the cause names the image).
    #[error("{field}")]
    Image {
        /// The VMI field path.
        field: String,
        /// Cause.
        #[source]
        source: ImageError,
    },
    /// A file the VMI refers to cannot be read.
    #[error("{field}: cannot read {}", path.display())]
    Read {
        /// The VMI field path.
        field: String,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn unsupported(field: impl Into<String>, reason: impl Into<String>) -> VmiError {
    VmiError::Unsupported {
        field: field.into(),
        reason: reason.into(),
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> VmiError {
    VmiError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Vmi {
    /// Parses the VMI JSON, naming the field of any type error. `null` is an unset field, as
    /// in Kubernetes' own decoding.
    pub fn from_json(bytes: &[u8]) -> Result<Self, VmiError> {
        let mut value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| VmiError::Parse {
                path: ".".into(),
                message: e.to_string(),
            })?;
        strip_nulls(&mut value);
        serde_path_to_error::deserialize(value).map_err(|e| VmiError::Parse {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    /// The libvirt-style domain name virt-handler expects: `<namespace>_<name>`.
    pub fn domain_name(&self) -> String {
        format!("{}_{}", self.metadata.namespace, self.metadata.name)
    }
}

/// Removes every `null` member of every object in `value`.
fn strip_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Where the launcher pod's volumes are, as the launcher sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LauncherDirs {
    /// Prefix for paths the VMI spells out (hostDisk paths); `/` in a pod.
    pub root: PathBuf,
    /// `--container-disk-dir`: container disks as `disk_<volume index>.img`, kernel-boot
    /// artifacts under `kernel-boot/`.
    pub container_disks: PathBuf,
    /// `--ephemeral-disk-dir`: scratch space for empty disks, cloud-init and disk copies.
    pub ephemeral_disks: PathBuf,
    /// `/var/run/kubevirt-private`: PVC mounts (`vmi-disks/<volume>/disk.img`), secrets, the
    /// serial console socket.
    pub private: PathBuf,
    /// `/dev`: block-mode PVCs appear as `/dev/<volume>`.
    pub dev: PathBuf,
}

impl LauncherDirs {
    /// KubeVirt's defaults, rooted at `root` (`/` in a pod; a temporary directory in tests).
    pub fn under(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            container_disks: root.join("var/run/kubevirt/container-disks"),
            ephemeral_disks: root.join("var/run/kubevirt-ephemeral-disks"),
            private: root.join("var/run/kubevirt-private"),
            dev: root.join("dev"),
        }
    }

    /// A path the VMI gives (absolute in the pod), under [`Self::root`].
    fn spec_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

impl Default for LauncherDirs {
    fn default() -> Self {
        Self::under(Path::new("/"))
    }
}

/// The rvmm VM for a VMI, plus what must exist before it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// `<namespace>_<name>`.
    pub domain_name: String,
    /// The VM, in `rvmm run --config` form (checked further by [`VmConfigFile::validate`]).
    pub config: VmConfigFile,
    /// The serial console's unix socket (virt-handler's console proxy connects here), if the
    /// VMI keeps the serial console.
    pub serial_socket: Option<PathBuf>,
    /// The console output's copy (`virt-serial0-log`) that KubeVirt's `guest-console-log`
    /// container follows: with the serial console unless the VMI (`logSerialConsole`) or the
    /// cluster turns it off.
    pub serial_log: Option<PathBuf>,
    /// The disks, in guest order (`vda`, `vdb`, ...).
    pub disks: Vec<PlannedDisk>,
    /// The network interfaces, in guest order.
    pub interfaces: Vec<PlannedInterface>,
    /// Files to create before the VM starts, in order (see [`prepare`]).
    pub prepare: Vec<PrepareStep>,
    /// VMI settings accepted without effect, one sentence each naming the field.
    pub warnings: Vec<String>,
}

/// One disk of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDisk {
    /// The VMI disk (and volume) name.
    pub name: String,
    /// The image or block device rvmm opens.
    pub path: PathBuf,
    /// Guest writes fail.
    pub readonly: bool,
    /// `path` is a block device (block-mode PVC).
    pub block_device: bool,
    /// The guest device name (`vda`).
    pub target: String,
    /// The serial the VMI asks for.
    pub serial: Option<String>,
    /// The format rvmm opens `path` in.
    pub format: ImageFormat,
    /// The image below `path` when it is an overlay rvmm created (containerDisk, ephemeral).
    pub backing: Option<(PathBuf, ImageFormat)>,
    /// The VMI's `bootOrder`.
    pub boot_order: Option<u32>,
    /// The VM boots from this disk (no kernelBoot).
    pub boot: bool,
}

/// One network interface of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedInterface {
    /// The VMI interface (and network) name.
    pub name: String,
    /// The host tap device.
    pub tap: String,
    /// The guest MAC (`52:54:00:..`): the VMI's, or derived from the VMI UID and name
    /// (bridge binding: the pod interface's, see [`super::pod_network`]).
    pub mac: String,
    /// How the pod side connects it, if the VMI says.
    pub binding: Option<Binding>,
    /// The MTU the pod network gives it ([`super::pod_network`]).
    pub mtu: Option<u16>,
}

/// An interface's binding to the pod network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// `bridge`: the guest takes over the pod's address.
    Bridge,
    /// `masquerade`: NAT from the pod address to the guest's private one.
    Masquerade,
}

/// A file the launcher creates before the VM starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrepareStep {
    /// A sparse raw image (emptyDisk; hostDisk of type DiskOrCreate). Kept if it exists.
    CreateSparse {
        /// The image.
        path: PathBuf,
        /// Bytes.
        size: u64,
    },
    /// A qcow2 overlay over a read-only image (containerDisk, ephemeral PVC), as
    /// virt-launcher makes with `qemu-img create -b`: guest writes go to the overlay only.
    /// Kept if it exists.
    CreateOverlay {
        /// The overlay rvmm opens.
        path: PathBuf,
        /// The image below it.
        backing: PathBuf,
        /// Its format.
        backing_format: ImageFormat,
        /// Virtual size in bytes (the backing image's).
        size: u64,
    },
    /// The cloud-init NoCloud disk (ISO 9660, label `cidata`).
    WriteNoCloud {
        /// The image.
        path: PathBuf,
        /// Its files.
        data: NoCloudData,
    },
    /// A directory (the serial socket's).
    CreateDir {
        /// The directory.
        path: PathBuf,
    },
}

/// A preparation step failed.
#[derive(Debug, thiserror::Error)]
#[error("Cannot prepare {}", path.display())]
pub struct PrepareError {
    /// The file.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// Creates every file of `plan.prepare`, in order.
pub fn prepare(plan: &LaunchPlan) -> Result<(), PrepareError> {
    for step in &plan.prepare {
        let (path, result) = match step {
            PrepareStep::CreateSparse { path, size } => (path, create_sparse(path, *size)),
            PrepareStep::CreateOverlay {
                path,
                backing,
                backing_format,
                size,
            } => (
                path,
                with_parent(path, || {
                    if path.exists() {
                        return Ok(());
                    }
                    rvmm_devices::image::qcow2::create_overlay(
                        path,
                        backing,
                        backing_format.name(),
                        *size,
                    )
                }),
            ),
            PrepareStep::WriteNoCloud { path, data } => (
                path,
                with_parent(path, || std::fs::write(path, data.to_iso())),
            ),
            PrepareStep::CreateDir { path } => (path, std::fs::create_dir_all(path)),
        };
        result.map_err(|source| PrepareError {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn with_parent(path: &Path, f: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    f()
}

fn create_sparse(path: &Path, size: u64) -> std::io::Result<()> {
    with_parent(path, || {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        Ok(())
    })
}

/// Maps `vmi` onto an rvmm VM, or names the first field rvmm cannot honour.
pub fn plan(vmi: &Vmi, dirs: &LauncherDirs) -> Result<LaunchPlan, VmiError> {
    plan_with_formats(vmi, dirs, &BTreeMap::new())
}

/// [`plan`], with the image format of volumes as virt-handler measured them (SyncVirtualMachine's
/// `DisksInfo`: volume name to `raw`/`qcow2`).
pub fn plan_with_formats(
    vmi: &Vmi,
    dirs: &LauncherDirs,
    formats: &BTreeMap<String, String>,
) -> Result<LaunchPlan, VmiError> {
    let mut warnings = Vec::new();
    let spec = &vmi.spec;
    if vmi.metadata.uid.is_empty() {
        return Err(invalid("metadata.uid", "required"));
    }
    // The UID names the serial console's directory: a UUID, never a path.
    if !vmi
        .metadata
        .uid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(invalid(
            "metadata.uid",
            format!("'{}' is not a UID (letters, digits, '-')", vmi.metadata.uid),
        ));
    }
    for (i, volume) in spec.volumes.iter().enumerate() {
        devices::check_dns_label(&format!("spec.volumes[{i}].name"), &volume.name)?;
    }
    if let Some(arch) = spec.architecture.as_deref()
        && !matches!(arch, "" | "amd64" | "x86_64")
    {
        return Err(unsupported(
            "spec.architecture",
            format!("{arch} is not supported (amd64 only)"),
        ));
    }
    refuse_unsupported_domain_features(vmi, &mut warnings)?;
    let cpus = vcpus(vmi, &mut warnings)?;
    let memory = memory_bytes(vmi, &mut warnings)?;
    let mut payload = payload(vmi, dirs)?;
    let mut prepare = Vec::new();
    let mut disks = disks(vmi, dirs, formats, &mut prepare, &mut warnings)?;
    if payload.kernel.is_none() {
        // No kernelBoot: the disk with the lowest bootOrder, else the first.
        let boot = disks
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.boot_order.map(|o| (o, i)))
            .min()
            .map_or(0, |(_, i)| i);
        match disks.get_mut(boot) {
            Some(disk) => disk.boot = true,
            None => {
                return Err(unsupported(
                    "spec.domain.firmware.kernelBoot",
                    "required without disks (rvmm boots a kernel directly or from a disk)",
                ));
            }
        }
        payload.cmdline = None;
    } else if let Some(d) = disks.iter().find(|d| d.boot_order.is_some()) {
        warnings.push(format!(
            "spec.domain.devices.disks[{}].bootOrder: ignored (the VM boots kernelBoot)",
            disks.iter().position(|x| x.name == d.name).unwrap_or(0)
        ));
    }
    let interfaces = interfaces(vmi)?;
    let devices = &spec.domain.devices;
    let serial_socket = (devices.autoattach_serial_console != Some(false))
        .then(|| dirs.private.join(&vmi.metadata.uid).join("virt-serial0"));
    let serial_log = serial_socket
        .as_ref()
        .filter(|_| devices.log_serial_console != Some(false))
        .map(|socket| socket.with_file_name("virt-serial0-log"));
    if let Some(dir) = serial_socket.as_ref().and_then(|s| s.parent()) {
        prepare.push(PrepareStep::CreateDir {
            path: dir.to_owned(),
        });
    }
    let config = VmConfigFile {
        cpus: CpusConfig {
            boot_vcpus: cpus,
            max_vcpus: None,
        },
        memory: MemoryConfig { size: memory },
        payload,
        disks: disks
            .iter()
            .map(|d| DiskConfig {
                path: d.path.clone(),
                readonly: d.readonly,
                id: d.serial.clone(),
                engine: None,
                format: Some(d.format.name().to_string()),
                boot: d.boot,
            })
            .collect(),
        net: interfaces
            .iter()
            .map(|i| NetConfig {
                tap: i.tap.clone(),
                mac: Some(i.mac.clone()),
                mtu: None,
                id: Some(i.name.clone()),
                dhcp: None,
            })
            .collect(),
        rng: devices.rng.as_ref().map(|_| RngConfig {
            src: "/dev/urandom".into(),
        }),
        serial: Some(match &serial_socket {
            Some(socket) => SerialConfig {
                mode: SerialModeName::Socket,
                file: None,
                socket: Some(socket.clone()),
            },
            None => SerialConfig {
                mode: SerialModeName::Off,
                file: None,
                socket: None,
            },
        }),
        // As KubeVirt's launcher gives QEMU: virtio-pci devices and ACPI (the guests are
        // distro kernels, whose virtio_pci is built in and which shut down on the power button).
        transport: Some(TransportName::Pci),
        acpi: Some(true),
    };
    for w in &warnings {
        log::warn!("VMI {}: {w}", vmi.domain_name());
    }
    Ok(LaunchPlan {
        domain_name: vmi.domain_name(),
        config,
        serial_socket,
        serial_log,
        disks,
        interfaces,
        prepare,
        warnings,
    })
}

/// Domain-level features rvmm refuses (errors) or drops (warnings).
fn refuse_unsupported_domain_features(
    vmi: &Vmi,
    warnings: &mut Vec<String>,
) -> Result<(), VmiError> {
    let spec = &vmi.spec;
    let domain = &spec.domain;
    let devices = &domain.devices;
    let refuse = |present: bool, field: &str, what: &str| {
        if present {
            Err(unsupported(field, format!("{what} is not supported")))
        } else {
            Ok(())
        }
    };
    refuse(
        !devices.gpus.is_empty(),
        "spec.domain.devices.gpus",
        "GPU passthrough",
    )?;
    refuse(
        !devices.host_devices.is_empty(),
        "spec.domain.devices.hostDevices",
        "host device passthrough",
    )?;
    refuse(
        !devices.filesystems.is_empty(),
        "spec.domain.devices.filesystems",
        "virtiofs",
    )?;
    refuse(
        devices.watchdog.is_some(),
        "spec.domain.devices.watchdog",
        "a watchdog",
    )?;
    refuse(devices.tpm.is_some(), "spec.domain.devices.tpm", "a TPM")?;
    refuse(
        devices.sound.is_some(),
        "spec.domain.devices.sound",
        "sound",
    )?;
    refuse(
        devices.client_passthrough.is_some(),
        "spec.domain.devices.clientPassthrough",
        "USB redirection",
    )?;
    refuse(
        devices.downward_metrics.is_some(),
        "spec.domain.devices.downwardMetrics",
        "the downward metrics device",
    )?;
    refuse(
        devices.autoattach_vsock == Some(true),
        "spec.domain.devices.autoattachVSOCK",
        "virtio-vsock",
    )?;
    refuse(
        domain.launch_security.is_some(),
        "spec.domain.launchSecurity",
        "confidential computing (SEV, TDX)",
    )?;
    refuse(
        domain
            .memory
            .as_ref()
            .is_some_and(|m| m.hugepages.is_some()),
        "spec.domain.memory.hugepages",
        "hugepage-backed memory",
    )?;
    refuse(
        spec.access_credentials
            .as_ref()
            .is_some_and(|a| !a.is_empty()),
        "spec.accessCredentials",
        "credential injection",
    )?;
    if devices.autoattach_graphics_device == Some(true) {
        warnings.push(
            "spec.domain.devices.autoattachGraphicsDevice: ignored (rvmm has no display; \
             use the serial console)"
                .into(),
        );
    }
    if !devices.inputs.is_empty() {
        warnings.push("spec.domain.devices.inputs: ignored (rvmm has no display)".into());
    }
    Ok(())
}

fn vcpus(vmi: &Vmi, warnings: &mut Vec<String>) -> Result<u8, VmiError> {
    let domain = &vmi.spec.domain;
    let count: u64 = match &domain.cpu {
        Some(cpu) => {
            let one = |n: u32| u64::from(n.max(1));
            if cpu.dedicated_cpu_placement {
                // virt-handler pins and tunes a dedicated-CPU VMI's QEMU threads (it looks for
                // a qemu-kvm process and its `CPU n/KVM` threads): it would fail on rvmm.
                return Err(unsupported(
                    "spec.domain.cpu.dedicatedCpuPlacement",
                    "dedicated CPUs are not supported (virt-handler pins QEMU's vCPU threads)",
                ));
            }
            if cpu.numa.is_some() {
                warnings.push("spec.domain.cpu.numa: ignored (one NUMA node)".into());
            }
            if cpu.max_sockets.is_some() {
                warnings.push("spec.domain.cpu.maxSockets: ignored (no vCPU hotplug)".into());
            }
            one(cpu.cores) * one(cpu.sockets) * one(cpu.threads)
        }
        // No topology: KubeVirt sizes the VM from the CPU limit, else the request.
        None => match ["limits", "requests"].into_iter().find_map(|k| {
            domain
                .resources
                .get(k)
                .and_then(|r| r.get("cpu"))
                .map(|q| (k, q))
        }) {
            Some((kind, q)) => q
                .milli_value()
                .map_err(|source| VmiError::Quantity {
                    field: format!("spec.domain.resources.{kind}.cpu"),
                    source,
                })?
                .div_ceil(1000)
                .max(1),
            None => 1,
        },
    };
    let max = rvmm_core::mptable::MAX_VCPUS;
    u8::try_from(count)
        .ok()
        .filter(|&n| n <= max)
        .ok_or_else(|| {
            unsupported(
                "spec.domain.cpu",
                format!("{count} vCPUs (cores x sockets x threads) is more than rvmm's {max}"),
            )
        })
}

fn memory_bytes(vmi: &Vmi, warnings: &mut Vec<String>) -> Result<u64, VmiError> {
    memory_field_and_bytes(vmi, warnings).map(|(_, bytes)| bytes)
}

/// The VMI field that sizes the guest's memory, and the size.
fn memory_field_and_bytes(
    vmi: &Vmi,
    warnings: &mut Vec<String>,
) -> Result<(String, u64), VmiError> {
    let domain = &vmi.spec.domain;
    let memory = domain.memory.as_ref();
    if memory.and_then(|m| m.max_guest.as_ref()).is_some() {
        warnings.push("spec.domain.memory.maxGuest: ignored (no memory hotplug)".into());
    }
    let request = |kind: &str| {
        domain
            .resources
            .get(kind)
            .and_then(|r| r.get("memory"))
            .map(|q| (format!("spec.domain.resources.{kind}.memory"), q))
    };
    let (field, quantity): (String, &Quantity) = memory
        .and_then(|m| m.guest.as_ref())
        .map(|q| ("spec.domain.memory.guest".to_owned(), q))
        .or_else(|| request("requests"))
        .or_else(|| request("limits"))
        .ok_or_else(|| {
            invalid(
                "spec.domain.memory.guest",
                "required (or spec.domain.resources.requests.memory)",
            )
        })?;
    let bytes = quantity.value().map_err(|source| VmiError::Quantity {
        field: field.clone(),
        source,
    })?;
    if bytes == 0 {
        return Err(invalid(field, format!("{quantity} is no memory")));
    }
    // The same checks `memory.size` gets later, reported on the VMI's own field.
    rvmm_core::memory::MemoryLayout::new(bytes)
        .map_err(|e| invalid(field.clone(), format!("{quantity}: {e}")))?;
    Ok((field, bytes))
}

fn payload(vmi: &Vmi, dirs: &LauncherDirs) -> Result<PayloadConfig, VmiError> {
    const FIELD: &str = "spec.domain.firmware.kernelBoot";
    let firmware = vmi.spec.domain.firmware.as_ref();
    if let Some(loader) = firmware.and_then(|f| f.bootloader.as_ref()) {
        // rvmm's direct boot serves both: the kernel runs as it would after either firmware.
        if let Some(efi) = &loader.efi
            && efi.secure_boot != Some(false)
        {
            return Err(unsupported(
                "spec.domain.firmware.bootloader.efi.secureBoot",
                "Secure Boot is not supported (KubeVirt's default is on: set secureBoot: false)",
            ));
        }
    }
    let Some(boot) = firmware.and_then(|f| f.kernel_boot.as_ref()) else {
        // Boot from a disk (the plan picks it).
        return Ok(PayloadConfig::default());
    };
    let container = boot
        .container
        .as_ref()
        .ok_or_else(|| invalid(format!("{FIELD}.container"), "required"))?;
    let artifact = |field: &str, path: &str| -> Result<PathBuf, VmiError> {
        let name = Path::new(path)
            .file_name()
            .ok_or_else(|| invalid(format!("{FIELD}.container.{field}"), "names no file"))?;
        let path = dirs.container_disks.join("kernel-boot").join(name);
        if !path.is_file() {
            return Err(invalid(
                format!("{FIELD}.container.{field}"),
                format!("{} does not exist", path.display()),
            ));
        }
        Ok(path)
    };
    let kernel = match container.kernel_path.as_deref() {
        Some(p) if !p.is_empty() => artifact("kernelPath", p)?,
        _ => {
            return Err(unsupported(
                format!("{FIELD}.container.kernelPath"),
                "required (rvmm boots a kernel directly)",
            ));
        }
    };
    let initramfs = match container.initrd_path.as_deref() {
        Some(p) if !p.is_empty() => Some(artifact("initrdPath", p)?),
        _ => None,
    };
    Ok(PayloadConfig {
        kernel: Some(kernel),
        initramfs,
        cmdline: boot.kernel_args.clone().filter(|a| !a.is_empty()),
    })
}

#[cfg(test)]
#[path = "vmi_tests.rs"]
mod tests;
