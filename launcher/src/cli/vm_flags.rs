//! `rvmm run`'s VM flags translated into the configuration model ([`VmConfigFile`]), field
//! for field and unchecked: the one validator ([`VmConfigFile::validate`]) judges the values,
//! as it does a `--config` file's. Only text that is no value of its field's type (a size, a
//! number, an `on|off` switch, an IP address, an unknown key) is refused here, naming the
//! field as the validator does.

use std::path::PathBuf;

use super::RunArgs;
use crate::config::{
    ConfigError, CpusConfig, DiskConfig, FieldPath, MemoryConfig, NetConfig, PayloadConfig,
    RngConfig, SerialConfig, SerialModeName, TransportName, VmConfigFile, unparsable,
};
use crate::dhcp::flags::{DHCP_KEYS, dhcp_from_net_keys};
use crate::keyvalue::KeyValues;

/// `--disk`'s keys, named as the file's `disks[]` fields.
const DISK_KEYS: &[&str] = &["path", "readonly", "id", "engine", "format", "boot"];
/// The NIC's `--net` keys, named as the file's `net[]` fields; its DHCP server's are
/// [`DHCP_KEYS`].
const NIC_KEYS: &[&str] = &["tap", "mac", "mtu", "id"];

impl RunArgs {
    /// The VM the flags describe, in the configuration model; defaults are the model's.
    pub fn to_file(&self) -> Result<VmConfigFile, ConfigError> {
        let memory = match &self.memory {
            None => MemoryConfig::default(),
            Some(text) => MemoryConfig {
                size: crate::cli::parse_size(text).ok_or_else(|| {
                    unparsable(
                        FieldPath::parse("memory.size"),
                        format!("'{text}' is not a size like 512M"),
                    )
                })?,
            },
        };
        Ok(VmConfigFile {
            cpus: match self.vcpus {
                None => CpusConfig::default(),
                Some(boot_vcpus) => CpusConfig {
                    boot_vcpus,
                    max_vcpus: None,
                },
            },
            memory,
            payload: PayloadConfig {
                kernel: self.kernel.clone(),
                initramfs: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
            },
            disks: (self.disk.iter().enumerate())
                .map(|(i, entry)| disk_entry(i, entry))
                .collect::<Result<_, _>>()?,
            net: (self.net.iter().enumerate())
                .map(|(i, entry)| net_entry(i, entry))
                .collect::<Result<_, _>>()?,
            rng: self.rng.then(|| RngConfig {
                src: "/dev/urandom".into(),
            }),
            serial: self.serial.as_deref().map(serial_config).transpose()?,
            transport: self.transport.as_deref().map(transport_name).transpose()?,
            acpi: self.acpi,
        })
    }
}

/// One `--disk` entry, the `index`th.
fn disk_entry(index: usize, entry: &str) -> Result<DiskConfig, ConfigError> {
    let at = FieldPath::parse("disks").index(index);
    let bad = |e: crate::keyvalue::KeyValueError| unparsable(at.clone(), e.to_string());
    let kv = KeyValues::parse(entry, DISK_KEYS).map_err(bad)?;
    Ok(DiskConfig {
        path: PathBuf::from(kv.required("path").map_err(bad)?),
        readonly: kv.switch("readonly", false).map_err(bad)?,
        id: kv.get("id").map(str::to_string),
        engine: kv.get("engine").map(str::to_string),
        format: kv.get("format").map(str::to_string),
        boot: kv.switch("boot", false).map_err(bad)?,
    })
}

/// One `--net` entry, the `index`th, with its DHCP server.
fn net_entry(index: usize, entry: &str) -> Result<NetConfig, ConfigError> {
    let at = FieldPath::parse("net").index(index);
    let kv = KeyValues::parse(entry, &[NIC_KEYS, DHCP_KEYS].concat())
        .map_err(|e| unparsable(at.clone(), e.to_string()))?;
    let mtu = match kv.get("mtu") {
        None => None,
        Some(text) => Some(text.parse::<u16>().map_err(|_| {
            unparsable(
                at.clone().key("mtu"),
                format!("'{text}' is not a number from 0 to 65535"),
            )
        })?),
    };
    let dhcp = dhcp_from_net_keys(&kv)
        .map_err(|e| unparsable(at.clone().key("dhcp").join(&e.field), e.reason))?;
    Ok(NetConfig {
        tap: kv
            .required("tap")
            .map_err(|e| unparsable(at.clone(), e.to_string()))?
            .to_string(),
        mac: kv.get("mac").map(str::to_string),
        mtu,
        id: kv.get("id").map(str::to_string),
        dhcp,
    })
}

/// `--serial`: stdio, file=PATH, socket=PATH or off.
pub(super) fn serial_config(text: &str) -> Result<SerialConfig, ConfigError> {
    let (mode, file, socket) = match text.split_once('=') {
        None if text == "stdio" => (SerialModeName::Tty, None, None),
        None if text == "off" => (SerialModeName::Off, None, None),
        Some(("file", path)) => (SerialModeName::File, Some(path.into()), None),
        Some(("socket", path)) => (SerialModeName::Socket, None, Some(path.into())),
        _ => {
            return Err(unparsable(
                FieldPath::parse("serial.mode"),
                format!("'{text}' is not stdio, file=PATH, socket=PATH or off"),
            ));
        }
    };
    Ok(SerialConfig { mode, file, socket })
}

/// `--transport`: mmio or pci.
fn transport_name(text: &str) -> Result<TransportName, ConfigError> {
    match text {
        "mmio" => Ok(TransportName::Mmio),
        "pci" => Ok(TransportName::Pci),
        other => Err(unparsable(
            FieldPath::parse("transport"),
            format!("'{other}' is not mmio or pci"),
        )),
    }
}

#[cfg(test)]
#[path = "vm_flags_tests.rs"]
mod tests;
