//! The one validator: [`VmConfigFile::validate`] checks every field and makes the [`VmSpec`],
//! whatever the entry point (`rvmm run`'s flags, `--config`, `vm.create`, a KubeVirt VMI, a
//! snapshot or a migration's configuration); [`VmSpec::to_file`] is the way back.

use std::path::{Path, PathBuf};

use rvmm_core::{BootSource, CpuProfile, Transport, VmConfig};
use rvmm_devices::image::ImageFormat;
use rvmm_devices::virtio::block::{BlockConfig, Engine};
use rvmm_devices::virtio::net::NetConfig as NicConfig;

use super::{
    ConfigError, CpusConfig, DiskConfig, FieldPath, MemoryConfig, NetConfig, PayloadConfig, Reason,
    RngConfig, SerialConfig, SerialModeName, VmConfigFile, invalid,
};
use crate::dhcp::DhcpConfig;

/// A kernel's command line unless the configuration gives one: the library's default.
pub(super) use rvmm_core::builder::DEFAULT_CMDLINE;
/// GET_ID answers with at most 20 bytes.
pub const DISK_ID_MAX: usize = 20;
/// The smallest MTU an IPv4 host must accept (RFC 791).
const MIN_MTU: u16 = 68;

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// The launcher's stdin/stdout.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A unix socket a console client connects to.
    Socket(PathBuf),
    /// Output discarded, no input.
    Off,
}

/// What a VM takes from the host it runs on rather than from its description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSettings {
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// CPU features shown to the guest.
    pub cpu_profile: CpuProfile,
    /// Filter the VM's threads' system calls (`rvmm run --seccomp`).
    pub seccomp: bool,
}

impl HostSettings {
    /// `/dev/kvm` (never opened by validation), the host's CPU profile, filtered.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self {
            kvm_path: PathBuf::from("/dev/kvm"),
            cpu_profile: CpuProfile::Host,
            seccomp: true,
        }
    }
}

/// A validated VM: what the VMM builds and runs, the same whether it came as flags, a file,
/// an API body or a VMI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM the core builds.
    pub config: VmConfig,
    /// Where its console goes.
    pub serial: SerialMode,
    /// The DHCP server of each NIC (`config.nets[i]`), if it has one; such a NIC has a MAC.
    pub dhcp: Vec<Option<DhcpConfig>>,
}

impl VmConfigFile {
    /// The one validator: checks every field and produces the VM, its console and its NICs'
    /// DHCP servers. Errors name the field; [`ConfigError::render`] names it as the entry point
    /// does.
    pub fn validate(&self, host: &HostSettings) -> Result<VmSpec, ConfigError> {
        let field = FieldPath::parse;
        let max = rvmm_core::mptable::MAX_VCPUS;
        let vcpus = self.cpus.boot_vcpus;
        if vcpus == 0 || vcpus > max {
            return Err(invalid(
                field("cpus.boot_vcpus"),
                format!("{vcpus} is out of range 1 to {max}"),
            ));
        }
        if let Some(m) = self.cpus.max_vcpus
            && m != vcpus
        {
            return Err(invalid(
                field("cpus.max_vcpus"),
                "must equal boot_vcpus (no vCPU hotplug)",
            ));
        }
        rvmm_core::memory::MemoryLayout::new(self.memory.size)
            .map_err(|e| invalid(field("memory.size"), e.to_string()))?;
        let disks: Vec<BlockConfig> = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| disk(i, d, &self.disks[..i]))
            .collect::<Result<_, _>>()?;
        let boot = self.boot_source()?;
        let mut nets = Vec::with_capacity(self.net.len());
        let mut dhcp = Vec::with_capacity(self.net.len());
        for (i, n) in self.net.iter().enumerate() {
            nets.push(nic(i, n, &self.net[..i])?);
            dhcp.push(n.dhcp.clone());
        }
        if let Some(rng) = &self.rng
            && !matches!(rng.src.to_str(), Some("/dev/urandom" | "/dev/random"))
        {
            return Err(invalid(
                field("rng.src"),
                format!(
                    "{}: rvmm's entropy comes from getrandom (/dev/urandom)",
                    rng.src.display()
                ),
            ));
        }
        let serial = match &self.serial {
            None => SerialMode::Stdio,
            Some(s) => s.to_mode()?,
        };
        let transport = self.transport.map(Transport::from).unwrap_or_default();
        let acpi = self.acpi.unwrap_or(true);
        if transport == Transport::Pci && !acpi {
            // PCI's host bridge, windows and interrupt routing are in the DSDT.
            return Err(invalid(field("acpi"), "the pci transport needs ACPI"));
        }
        let config = VmConfig {
            vcpus,
            memory_bytes: self.memory.size,
            cmdline: self.payload.cmdline.clone().unwrap_or_else(|| match boot {
                BootSource::Kernel { .. } => DEFAULT_CMDLINE.into(),
                BootSource::Disk { .. } => String::new(),
            }),
            boot,
            cpu_profile: host.cpu_profile,
            kvm_path: host.kvm_path.clone(),
            rng: self.rng.is_some(),
            disks,
            nets,
            seccomp: host.seccomp,
            transport,
            acpi,
        };
        Ok(VmSpec {
            config,
            serial,
            dhcp,
        })
    }

    /// What the guest boots: `payload.kernel`, else the disk with `boot`, else the first.
    fn boot_source(&self) -> Result<BootSource, ConfigError> {
        let field = FieldPath::parse;
        let boot_disks: Vec<usize> = (0..self.disks.len())
            .filter(|&i| self.disks[i].boot)
            .collect();
        let Some(kernel) = &self.payload.kernel else {
            if self.payload.initramfs.is_some() {
                return Err(invalid(
                    field("payload.initramfs"),
                    Reason::Needs {
                        other: field("payload.kernel"),
                        hint: "a disk boot takes its initrd from the disk",
                    },
                ));
            }
            if let Some(&second) = boot_disks.get(1) {
                return Err(invalid(
                    FieldPath::parse("disks").index(second).key("boot"),
                    "only one disk can be the boot disk",
                ));
            }
            if self.disks.is_empty() {
                return Err(invalid(field("payload.kernel"), Reason::NoBootSource));
            }
            return Ok(BootSource::Disk {
                index: boot_disks.first().copied().unwrap_or(0),
            });
        };
        if let Some(&i) = boot_disks.first() {
            return Err(invalid(
                FieldPath::parse("disks").index(i).key("boot"),
                Reason::Excludes {
                    other: field("payload.kernel"),
                    hint: "boot from one or the other",
                },
            ));
        }
        let kernel = existing_file(kernel).map_err(|r| invalid(field("payload.kernel"), r))?;
        let initrd = match &self.payload.initramfs {
            Some(p) => Some(existing_file(p).map_err(|r| invalid(field("payload.initramfs"), r))?),
            None => None,
        };
        Ok(BootSource::Kernel { kernel, initrd })
    }
}

impl VmSpec {
    /// The file that describes this VM, which validates to it again: `vm.info`'s
    /// configuration, and what a snapshot or a migration carries. Defaults are spelled out, and
    /// a DHCP NIC's MAC (random when none was given) is fixed in it.
    pub fn to_file(&self) -> VmConfigFile {
        let config = &self.config;
        let mac = |m: &[u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let (mode, file, socket) = match &self.serial {
            SerialMode::Stdio => (SerialModeName::Tty, None, None),
            SerialMode::Off => (SerialModeName::Off, None, None),
            SerialMode::File(p) => (SerialModeName::File, Some(p.clone()), None),
            SerialMode::Socket(p) => (SerialModeName::Socket, None, Some(p.clone())),
        };
        VmConfigFile {
            // As Cloud Hypervisor's vm.info: both counts.
            cpus: CpusConfig {
                boot_vcpus: config.vcpus,
                max_vcpus: Some(config.vcpus),
            },
            memory: MemoryConfig {
                size: config.memory_bytes,
            },
            payload: match &config.boot {
                BootSource::Kernel { kernel, initrd } => PayloadConfig {
                    kernel: Some(kernel.clone()),
                    initramfs: initrd.clone(),
                    cmdline: Some(config.cmdline.clone()),
                },
                BootSource::Disk { .. } => PayloadConfig {
                    kernel: None,
                    initramfs: None,
                    cmdline: Some(config.cmdline.clone()).filter(|c| !c.is_empty()),
                },
            },
            disks: config
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskConfig {
                    path: d.path.clone(),
                    readonly: d.readonly,
                    id: d.id.clone(),
                    format: d.format.map(|f| f.name().to_string()),
                    boot: config.boot == BootSource::Disk { index: i },
                    engine: Some(
                        match d.engine {
                            Engine::Sync => "sync",
                            Engine::IoUring => "io_uring",
                        }
                        .into(),
                    ),
                })
                .collect(),
            net: config
                .nets
                .iter()
                .zip(&self.dhcp)
                .map(|(n, dhcp)| NetConfig {
                    tap: n.tap.clone(),
                    mac: n.mac.as_ref().map(mac),
                    mtu: n.mtu,
                    id: n.id.clone(),
                    dhcp: dhcp.clone(),
                })
                .collect(),
            rng: config.rng.then(|| RngConfig {
                src: "/dev/urandom".into(),
            }),
            serial: Some(SerialConfig { mode, file, socket }),
            transport: Some(config.transport.into()),
            acpi: Some(config.acpi),
        }
    }
}

/// `path` if it is a regular file, else why not.
fn existing_file(path: &Path) -> Result<PathBuf, String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(path.to_owned()),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Parses a MAC address such as `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn disk(index: usize, d: &DiskConfig, before: &[DiskConfig]) -> Result<BlockConfig, ConfigError> {
    let field = |name: &str| FieldPath::parse("disks").index(index).key(name);
    // A block device is fine too; a directory or a missing path is not.
    match std::fs::metadata(&d.path) {
        Ok(meta) if meta.is_dir() => {
            return Err(invalid(
                field("path"),
                format!("{} is a directory", d.path.display()),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(invalid(field("path"), format!("{}: {e}", d.path.display()))),
    }
    if let Some(id) = &d.id {
        if id.is_empty() || id.len() > DISK_ID_MAX {
            return Err(invalid(
                field("id"),
                format!("must be 1 to {DISK_ID_MAX} bytes"),
            ));
        }
        if before.iter().any(|b| b.id.as_ref() == Some(id)) {
            return Err(invalid(field("id"), format!("'{id}' is used twice")));
        }
    }
    let engine = match d.engine.as_deref() {
        None | Some("sync") => Engine::Sync,
        Some("io_uring") => Engine::IoUring,
        Some(other) => {
            return Err(invalid(
                field("engine"),
                format!("'{other}': expected sync or io_uring"),
            ));
        }
    };
    let format =
        match d.format.as_deref() {
            None => None,
            Some(name) => Some(ImageFormat::from_name(name).ok_or_else(|| {
                invalid(field("format"), format!("'{name}': expected raw or qcow2"))
            })?),
        };
    Ok(BlockConfig {
        path: d.path.clone(),
        readonly: d.readonly,
        id: d.id.clone(),
        engine,
        format,
    })
}

fn nic(index: usize, n: &NetConfig, before: &[NetConfig]) -> Result<NicConfig, ConfigError> {
    let field = |name: &str| FieldPath::parse("net").index(index).join(name);
    if n.tap.is_empty() {
        return Err(invalid(field("tap"), "must name a tap device"));
    }
    if before.iter().any(|b| b.tap == n.tap) {
        return Err(invalid(field("tap"), format!("'{}' is used twice", n.tap)));
    }
    let mut mac = match &n.mac {
        None => None,
        Some(text) => {
            let mac = parse_mac(text).ok_or_else(|| {
                invalid(
                    field("mac"),
                    format!("'{text}' is not like 52:54:00:12:34:56"),
                )
            })?;
            if mac[0] & 1 != 0 {
                return Err(invalid(
                    field("mac"),
                    format!("'{text}' is a multicast address"),
                ));
            }
            Some(mac)
        }
    };
    if let Some(mtu) = n.mtu
        && mtu < MIN_MTU
    {
        return Err(invalid(field("mtu"), format!("{mtu} is below {MIN_MTU}")));
    }
    if let Some(dhcp) = &n.dhcp {
        dhcp.validate()
            .map_err(|e| invalid(field("dhcp").join(&e.field), e.reason))?;
        // The server answers only this MAC: the one given, else a random one fixed now.
        if mac.is_none() {
            let random = rvmm_devices::virtio::net::random_mac()
                .map_err(|e| invalid(field("mac"), e.to_string()))?;
            mac = Some(random);
        }
    }
    Ok(NicConfig {
        tap: n.tap.clone(),
        mac,
        mtu: n.mtu,
        id: n.id.clone(),
    })
}

impl SerialConfig {
    /// The console this describes (part of [`VmConfigFile::validate`]; alone for `rvmm run
    /// --serial` with a VM from a snapshot).
    pub fn to_mode(&self) -> Result<SerialMode, ConfigError> {
        let path = |p: &Option<PathBuf>, name: &str| {
            let field = FieldPath::parse("serial").key(name);
            match p {
                None => Err(invalid(
                    field,
                    format!("required with mode {:?}", self.mode),
                )),
                Some(p) if p.as_os_str().is_empty() => Err(invalid(field, "must not be empty")),
                Some(p) => Ok(p.clone()),
            }
        };
        Ok(match self.mode {
            SerialModeName::Off | SerialModeName::Null => SerialMode::Off,
            SerialModeName::Tty => SerialMode::Stdio,
            SerialModeName::File => SerialMode::File(path(&self.file, "file")?),
            SerialModeName::Socket => SerialMode::Socket(path(&self.socket, "socket")?),
        })
    }
}
