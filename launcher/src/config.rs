//! `rvmm run --config vm.json`: a VM described in JSON with Cloud Hypervisor's `VmConfig` field
//! names where rvmm has the feature. Unknown fields are rejected, and every error names the
//! field (`disks[1].path: ...`).

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rvmm_core::{BootSource, CpuProfile, Transport, VmConfig};
use rvmm_devices::image::ImageFormat;
use rvmm_devices::virtio::block::{BlockConfig, Engine};
use rvmm_devices::virtio::net::NetConfig as NicConfig;
use serde::{Deserialize, Serialize};

use crate::cli::{DISK_ID_MAX, SerialMode, existing_file, parse_mac};
use crate::dhcp::DhcpConfig;

const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// Largest configuration accepted, from a file or an API body (a VM is a few hundred bytes).
pub const MAX_CONFIG_BYTES: usize = 64 << 10;
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// The file's top level.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfigFile {
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest RAM.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// What the guest boots; without `payload.kernel`, a disk's boot configuration.
    #[serde(default)]
    pub payload: PayloadConfig,
    /// virtio-blk disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// virtio-rng.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    /// The 16550 console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// How the virtio devices reach the guest: `mmio` (the default) or `pci`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportName>,
    /// ACPI tables and power management (default true); `false` is a microVM without firmware
    /// tables, its virtio-mmio devices on the kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acpi: Option<bool>,
}

/// `transport`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportName {
    /// virtio-mmio.
    Mmio,
    /// virtio-pci.
    Pci,
}

impl From<TransportName> for Transport {
    fn from(name: TransportName) -> Self {
        match name {
            TransportName::Mmio => Transport::Mmio,
            TransportName::Pci => Transport::Pci,
        }
    }
}

impl From<Transport> for TransportName {
    fn from(transport: Transport) -> Self {
        match transport {
            Transport::Mmio => TransportName::Mmio,
            Transport::Pci => TransportName::Pci,
        }
    }
}

/// The transport and ACPI choice, checked together: PCI needs ACPI (its host bridge, windows
/// and interrupt routing are in the DSDT).
pub(crate) fn platform(
    transport: Option<Transport>,
    acpi: Option<bool>,
) -> Result<(Transport, bool), &'static str> {
    let transport = transport.unwrap_or_default();
    let acpi = acpi.unwrap_or(true);
    if transport == Transport::Pci && !acpi {
        return Err("the pci transport needs ACPI");
    }
    Ok((transport, acpi))
}

/// `cpus`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs started at boot.
    pub boot_vcpus: u8,
    /// rvmm has no vCPU hotplug: equal to `boot_vcpus` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u8>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot_vcpus: 1,
            max_vcpus: None,
        }
    }
}

/// `memory`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_MEMORY_BYTES,
        }
    }
}

/// `payload`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// ELF vmlinux or bzImage; absent: boot from the disk with `boot: true`, else the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// `disks[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// File or block device.
    pub path: PathBuf,
    /// Guest writes fail.
    #[serde(default)]
    pub readonly: bool,
    /// Name (and the GET_ID string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// rvmm's I/O engine: `sync` (default) or `io_uring`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Image format, `raw` or `qcow2` (rvmm); default: by the image's magic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Boot from this disk (rvmm): the kernel, initrd and command line its boot
    /// configuration names (`payload.cmdline` is appended).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot: bool,
}

/// `net[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing tap device.
    pub tap: String,
    /// Guest MAC (`52:54:00:12:34:56`); random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU offered to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// rvmm's DHCP server for the guest behind this NIC (not a Cloud Hypervisor field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpConfig>,
}

/// `rng`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Entropy source; rvmm reads the host's `getrandom`, which is `/dev/urandom`'s pool.
    pub src: PathBuf,
}

/// `serial.mode`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum SerialModeName {
    /// No console output.
    Off,
    /// No console output.
    Null,
    /// The launcher's terminal.
    Tty,
    /// Appended to `serial.file`.
    File,
    /// A unix socket at `serial.socket`.
    Socket,
}

/// `serial`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Where output goes.
    pub mode: SerialModeName,
    /// For `File`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// For `Socket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("Cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO would block, a device could be endless).
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// Larger than [`MAX_CONFIG_BYTES`].
    #[error("{} is larger than {MAX_CONFIG_BYTES} bytes", .0.display())]
    TooLarge(PathBuf),
    /// Not JSON, or not the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The field path (`disks[1].readonly`), `.` for the top level.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value is invalid.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field path.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl VmConfigFile {
    /// Parses JSON text, naming the field of any shape error.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        if let Some(found) = non_object_root(text) {
            return Err(ConfigError::Parse {
                path: ".".into(),
                message: format!("the configuration must be a JSON object ({{...}}), not {found}"),
            });
        }
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| ConfigError::Parse {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    /// Reads and parses `path`: a regular file of at most [`MAX_CONFIG_BYTES`]. Opening does
    /// not wait for a FIFO's writer, and reading stops one byte past the limit.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(read_error)?;
        if !file.metadata().map_err(read_error)?.is_file() {
            return Err(ConfigError::NotAFile(path.to_owned()));
        }
        let mut text = String::new();
        let limit = MAX_CONFIG_BYTES as u64 + 1;
        Read::take(&file, limit)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge(path.to_owned()));
        }
        Self::from_json(&text)
    }

    /// Checks every field and produces the VM configuration and console mode.
    pub fn validate(
        &self,
        kvm_path: &Path,
        cpu_profile: CpuProfile,
    ) -> Result<(VmConfig, SerialMode), ConfigError> {
        let max = rvmm_core::mptable::MAX_VCPUS;
        let vcpus = self.cpus.boot_vcpus;
        if vcpus == 0 || vcpus > max {
            return Err(invalid(
                "cpus.boot_vcpus",
                format!("{vcpus} is out of range 1 to {max}"),
            ));
        }
        if let Some(m) = self.cpus.max_vcpus
            && m != vcpus
        {
            return Err(invalid(
                "cpus.max_vcpus",
                "must equal boot_vcpus (no vCPU hotplug)",
            ));
        }
        rvmm_core::memory::MemoryLayout::new(self.memory.size)
            .map_err(|e| invalid("memory.size", e.to_string()))?;
        let disks: Vec<BlockConfig> = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| disk(i, d, &self.disks[..i]))
            .collect::<Result<_, _>>()?;
        let boot_disks: Vec<usize> = (0..self.disks.len())
            .filter(|&i| self.disks[i].boot)
            .collect();
        let boot = match &self.payload.kernel {
            Some(kernel) => {
                if let Some(&i) = boot_disks.first() {
                    return Err(invalid(
                        format!("disks[{i}].boot"),
                        "cannot boot from a disk and payload.kernel at once",
                    ));
                }
                let kernel =
                    existing_file(kernel).map_err(|reason| invalid("payload.kernel", reason))?;
                let initrd = match &self.payload.initramfs {
                    Some(p) => Some(existing_file(p).map_err(|r| invalid("payload.initramfs", r))?),
                    None => None,
                };
                BootSource::Kernel { kernel, initrd }
            }
            None => {
                if self.payload.initramfs.is_some() {
                    return Err(invalid(
                        "payload.initramfs",
                        "needs payload.kernel (a disk boot takes its initrd from the disk)",
                    ));
                }
                if boot_disks.len() > 1 {
                    return Err(invalid(
                        format!("disks[{}].boot", boot_disks[1]),
                        "only one disk can be the boot disk",
                    ));
                }
                let index = boot_disks.first().copied().unwrap_or(0);
                if disks.is_empty() {
                    return Err(invalid(
                        "payload.kernel",
                        "required (or a disk to boot from)",
                    ));
                }
                BootSource::Disk { index }
            }
        };
        let nets = self
            .net
            .iter()
            .enumerate()
            .map(|(i, n)| nic(i, n, &self.net[..i]))
            .collect::<Result<_, _>>()?;
        if let Some(rng) = &self.rng
            && !matches!(rng.src.to_str(), Some("/dev/urandom" | "/dev/random"))
        {
            return Err(invalid(
                "rng.src",
                format!(
                    "{}: rvmm's entropy comes from getrandom (/dev/urandom)",
                    rng.src.display()
                ),
            ));
        }
        let serial = match &self.serial {
            None => SerialMode::Stdio,
            Some(s) => serial(s)?,
        };
        let (transport, acpi) = platform(self.transport.map(Into::into), self.acpi)
            .map_err(|reason| invalid("acpi", reason))?;
        let config = VmConfig {
            vcpus,
            memory_bytes: self.memory.size,
            cmdline: self.payload.cmdline.clone().unwrap_or_else(|| match boot {
                BootSource::Kernel { .. } => DEFAULT_CMDLINE.into(),
                BootSource::Disk { .. } => String::new(),
            }),
            boot,
            cpu_profile,
            kvm_path: kvm_path.to_owned(),
            rng: self.rng.is_some(),
            disks,
            nets,
            // Filtered unless `rvmm run --seccomp=false` (which sets this afterwards).
            seccomp: true,
            transport,
            acpi,
        };
        Ok((config, serial))
    }
}

impl VmConfigFile {
    /// The file that describes an already validated VM (a VM given by flags, for `vm.info`).
    pub fn from_validated(config: &VmConfig, serial: &SerialMode) -> Self {
        let mac = |m: &[u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let (mode, file, socket) = match serial {
            SerialMode::Stdio => (SerialModeName::Tty, None, None),
            SerialMode::Off => (SerialModeName::Off, None, None),
            SerialMode::File(p) => (SerialModeName::File, Some(p.clone()), None),
            SerialMode::Socket(p) => (SerialModeName::Socket, None, Some(p.clone())),
        };
        Self {
            cpus: CpusConfig {
                boot_vcpus: config.vcpus,
                max_vcpus: None,
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
                .map(|n| NetConfig {
                    tap: n.tap.clone(),
                    mac: n.mac.as_ref().map(mac),
                    mtu: n.mtu,
                    id: n.id.clone(),
                    dhcp: None,
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

/// What the JSON text's root is when it is not an object (`None` for an object, or for text
/// that is not JSON at all, which the parser reports with its position).
fn non_object_root(text: &str) -> Option<&'static str> {
    let text = text.trim_start();
    Some(match text.chars().next()? {
        '[' => "an array",
        '"' => "a string",
        '-' | '0'..='9' => "a number",
        _ if text.starts_with("true") || text.starts_with("false") => "a boolean",
        _ if text.starts_with("null") => "null",
        _ => return None,
    })
}

fn disk(index: usize, d: &DiskConfig, before: &[DiskConfig]) -> Result<BlockConfig, ConfigError> {
    let field = |name: &str| format!("disks[{index}].{name}");
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
    let field = |name: &str| format!("net[{index}].{name}");
    if n.tap.is_empty() {
        return Err(invalid(field("tap"), "must name a tap device"));
    }
    if before.iter().any(|b| b.tap == n.tap) {
        return Err(invalid(field("tap"), format!("'{}' is used twice", n.tap)));
    }
    let mac = match &n.mac {
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
        && mtu < 68
    {
        return Err(invalid(field("mtu"), format!("{mtu} is below 68")));
    }
    let mut mac = mac;
    if let Some(dhcp) = &n.dhcp {
        dhcp.validate()
            .map_err(|e| invalid(field(&format!("dhcp.{}", e.field)), e.reason))?;
        mac = Some(dhcp_mac(mac).map_err(|e| invalid(field("mac"), e.to_string()))?);
    }
    Ok(NicConfig {
        tap: n.tap.clone(),
        mac,
        mtu: n.mtu,
        id: n.id.clone(),
    })
}

/// The MAC of a NIC with a DHCP server, which answers only that MAC: the one given, else a
/// random one fixed now.
pub(crate) fn dhcp_mac(given: Option<[u8; 6]>) -> std::io::Result<[u8; 6]> {
    match given {
        Some(mac) => Ok(mac),
        None => rvmm_devices::virtio::net::random_mac(),
    }
}

fn serial(s: &SerialConfig) -> Result<SerialMode, ConfigError> {
    let path = |p: &Option<PathBuf>, name: &str| {
        p.clone().ok_or_else(|| {
            invalid(
                format!("serial.{name}"),
                format!("required with mode {:?}", s.mode),
            )
        })
    };
    Ok(match s.mode {
        SerialModeName::Off | SerialModeName::Null => SerialMode::Off,
        SerialModeName::Tty => SerialMode::Stdio,
        SerialModeName::File => SerialMode::File(path(&s.file, "file")?),
        SerialModeName::Socket => SerialMode::Socket(path(&s.socket, "socket")?),
    })
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
