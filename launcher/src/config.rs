//! The one configuration model of a VM: [`VmConfigFile`], JSON with Cloud Hypervisor's
//! `VmConfig` field names where rvmm has the feature (`rvmm run --config vm.json`, the
//! `vm.create` body), which `rvmm run`'s flags and KubeVirt's VMIs are translated into, and
//! its one validator, [`VmConfigFile::validate`], which makes the [`VmSpec`] the VMM takes.
//! Unknown fields are rejected, and every error names the field ([`FieldPath`]) in the entry
//! point's terms (`disks[1].path: ...`, `--disk[1] path: ...`).

mod field;
mod spec;

pub use field::{FieldPath, Reason, Terms};
pub use spec::{DISK_ID_MAX, HostSettings, SerialMode, VmSpec, parse_mac};

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rvmm_core::Transport;
use serde::{Deserialize, Serialize};

use crate::dhcp::DhcpConfig;

const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// Largest configuration accepted, from a file or an API body (a VM is a few hundred bytes).
pub const MAX_CONFIG_BYTES: usize = 64 << 10;

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
    /// Not JSON, or not the expected shape (a flag's text that is no value of its field).
    #[error("{field}: {message}")]
    Parse {
        /// The field (`disks[1].readonly`), the top level for text that is no JSON object.
        field: FieldPath,
        /// What is wrong.
        message: String,
    },
    /// A value is invalid.
    #[error("{field}: {}", .reason.render(Terms::Json))]
    Invalid {
        /// The field.
        field: FieldPath,
        /// What is wrong.
        reason: Reason,
    },
}

impl ConfigError {
    /// The error with its field named as `terms` name it (`--disk[1] path: ...` for the flags);
    /// the `Display` text is the JSON's.
    pub fn render(&self, terms: Terms) -> String {
        match self {
            Self::Parse { field, message } => format!("{}: {message}", field.render(terms)),
            Self::Invalid { field, reason } => {
                format!("{}: {}", field.render(terms), reason.render(terms))
            }
            other => other.to_string(),
        }
    }

    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<&FieldPath> {
        match self {
            Self::Parse { field, .. } | Self::Invalid { field, .. } => Some(field),
            Self::Read { .. } | Self::NotAFile(_) | Self::TooLarge(_) => None,
        }
    }
}

/// A value of `field` is invalid.
pub(crate) fn invalid(field: FieldPath, reason: impl Into<Reason>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// `text` is no value of `field`'s type.
pub(crate) fn unparsable(field: FieldPath, message: impl Into<String>) -> ConfigError {
    ConfigError::Parse {
        field,
        message: message.into(),
    }
}

impl VmConfigFile {
    /// Parses JSON text, naming the field of any shape error.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        if let Some(found) = non_object_root(text) {
            return Err(unparsable(
                FieldPath::root(),
                format!("the configuration must be a JSON object ({{...}}), not {found}"),
            ));
        }
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| unparsable(FieldPath::from_serde(e.path()), e.inner().to_string()))
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

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

#[cfg(test)]
mod entry_points_tests;
