//! The command line: `rvmm run ...`, validated into a [`VmConfig`], and the choice of the
//! virt-launcher mode (`rvmm virt-launcher ...` or the binary invoked as `virt-launcher`).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use rvmm_core::{BootSource, CpuProfile, Transport, VmConfig};
use rvmm_devices::image::ImageFormat;
use rvmm_devices::virtio::block::{BlockConfig, Engine};
use rvmm_devices::virtio::net::NetConfig;

use crate::config::{VmConfigFile, dhcp_mac};
use crate::dhcp::DhcpConfig;
use crate::dhcp::flags::DHCP_KEYS;
use crate::keyvalue::KeyValues;
use crate::kubevirt::launcher_flags::LauncherFlags;
use crate::vmm::OnReboot;

/// rvmm: a small KVM virtual machine monitor.
#[derive(Debug, Parser)]
#[command(name = "rvmm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel and run it until it powers off or resets.
    Run(RunArgs),
    /// Act as KubeVirt's virt-launcher (also what rvmm does when invoked as `virt-launcher`
    /// or `virt-launcher-monitor`).
    VirtLauncher(LauncherFlags),
}

/// The program names under which rvmm acts as KubeVirt's virt-launcher.
pub const VIRT_LAUNCHER_NAMES: &[&str] = &["virt-launcher", "virt-launcher-monitor"];

/// Parses the process's command line (program name first): `rvmm run ...`,
/// `rvmm virt-launcher ...`, or, when the program is invoked under one of
/// [`VIRT_LAUNCHER_NAMES`] (a virt-launcher image's `/usr/bin/virt-launcher-monitor`),
/// virt-launcher's flags alone.
pub fn parse_command_line<I, T>(argv: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    let invoked_as = argv
        .first()
        .and_then(|program| Path::new(program).file_name())
        .and_then(|name| name.to_str());
    if invoked_as.is_some_and(|name| VIRT_LAUNCHER_NAMES.contains(&name)) {
        return Ok(Cli {
            command: Command::VirtLauncher(LauncherFlags::parse_from(argv)?),
        });
    }
    Cli::try_parse_from(argv)
}

/// `rvmm run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM as a JSON file with Cloud Hypervisor's VmConfig field names (cpus.boot_vcpus,
    /// memory.size, payload.kernel|initramfs|cmdline, disks[], net[], rng, serial); replaces
    /// the VM flags below.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Guest kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage. Without it, rvmm boots
    /// the kernel, initrd and command line that the boot disk's configuration (GRUB, BLS,
    /// extlinux) names: the disk with boot=on, else the first.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs / initrd image.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=k panic=-1]; with a boot disk,
    /// appended to the boot entry's.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest RAM, with a K, M, G or T suffix (bytes without one) [default: 512M].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Number of vCPUs, 1 to 32 [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u8>,
    /// Serial console: stdio, file=PATH, socket=PATH or off [default: stdio].
    #[arg(long, value_name = "MODE")]
    pub serial: Option<String>,
    /// Also append everything the guest prints on its console to this file.
    #[arg(long, value_name = "PATH")]
    pub serial_log: Option<PathBuf>,
    /// CPU features shown to the guest: auto (pvm-safe when /sys/module/kvm_pvm exists,
    /// host otherwise), host or pvm-safe.
    #[arg(long, value_name = "PROFILE", default_value = "auto")]
    pub cpu_profile: String,
    /// KVM device.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Give the guest a virtio-rng entropy device backed by the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// On SIGTERM/SIGINT the guest gets Ctrl-Alt-Del; after this many seconds it is stopped.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub grace_period_seconds: u64,
    /// What a reset by the guest does: exit (the VM ends, exit 0, as a microVM's) or restart
    /// (the guest boots again in the same process, as a PC reboots).
    #[arg(long, value_name = "exit|restart", default_value = "exit")]
    pub on_reboot: OnReboot,
    /// A virtio-blk disk over a file or block device (repeatable; /dev/vda, /dev/vdb, ...):
    /// path=PATH[,readonly=on][,id=NAME][,engine=sync|io_uring][,format=raw|qcow2][,boot=on].
    #[arg(long, value_name = "OPTIONS")]
    pub disk: Vec<String>,
    /// A virtio-net interface on an existing tap device (repeatable; eth0, eth1, ...):
    /// tap=NAME[,mac=MAC][,mtu=N][,id=NAME][,dhcp=ADDR/PREFIX[,gateway=IP][,dns=IP:IP...]
    /// [,search=DOMAIN:DOMAIN...][,hostname=NAME][,dhcp-interface=NAME][,dhcp-server=IP]]
    /// (with dhcp, rvmm answers the guest's DHCP on the tap or dhcp-interface).
    #[arg(long, value_name = "OPTIONS")]
    pub net: Vec<String>,
    /// Serve the control API (Cloud Hypervisor's /api/v1/ paths) and /metrics on this unix
    /// socket; without a VM on the command line, wait for vm.create and vm.boot.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Write one JSON line per VM event: path=FILE or fd=N.
    #[arg(long, value_name = "path=FILE|fd=N")]
    pub event_monitor: Option<String>,
    /// Also serve the Prometheus scrape (GET /metrics) on this TCP address.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Filter the system calls of every thread (seccomp): true (a call outside a thread's list
    /// kills rvmm with SIGSYS), log (rvmm logs each such call, which fails with ENOSYS) or
    /// false (no filters). log and false are for debugging only.
    #[arg(long, value_name = "true|false|log", default_value = "true", value_parser = parse_seccomp)]
    pub seccomp: SeccompMode,
    /// Restore the VM of a snapshot (Cloud Hypervisor's `--restore`), paused until
    /// `vm.resume`: source_url=file:///DIR[,prefault=on]. `--serial` may redirect its console;
    /// the other VM flags come from the snapshot.
    #[arg(long, value_name = "source_url=URL")]
    pub restore: Option<String>,
    /// How the virtio devices reach the guest: mmio (a microVM's virtio-mmio) or pci
    /// (virtio-pci with MSI-X, as distro kernels expect) [default: mmio].
    #[arg(long, value_name = "mmio|pci")]
    pub transport: Option<String>,
    /// ACPI tables and power management: the power button then shuts the guest down through
    /// ACPI. `--acpi=false` is a microVM without firmware tables, its virtio-mmio devices on the
    /// kernel command line [default: true].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub acpi: Option<bool>,
}

/// `--restore`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreSpec {
    /// The snapshot's URL (`file:///DIR`).
    pub source_url: String,
    /// Read the memory in at once.
    pub prefault: bool,
    /// `--serial`, if given: replaces the snapshot's console setting.
    pub serial: Option<SerialMode>,
}

/// `--seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// Filters kill the process on a call outside their list.
    On,
    /// Filters log a call outside their list and fail it with ENOSYS.
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    /// Whether threads are filtered at all.
    pub fn filters(self) -> bool {
        self != Self::Off
    }
}

fn parse_seccomp(text: &str) -> Result<SeccompMode, String> {
    match text {
        "true" => Ok(SeccompMode::On),
        "log" => Ok(SeccompMode::Log),
        "false" => Ok(SeccompMode::Off),
        other => Err(format!("'{other}' is not true, false or log")),
    }
}

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

/// A flag's value is invalid.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {reason}")]
pub struct InvalidFlag {
    flag: &'static str,
    reason: String,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> InvalidFlag {
    InvalidFlag {
        flag,
        reason: reason.into(),
    }
}

/// Parses a size such as `512M`, `1G`, `2GiB` or `1048576`.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number: u64 = number.parse().ok()?;
    let shift = match suffix.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

/// Parses `--serial`.
pub fn parse_serial(text: &str) -> Result<SerialMode, InvalidFlag> {
    let nonempty = |path: &str| {
        if path.is_empty() {
            Err(invalid("serial", format!("'{text}' needs a path")))
        } else {
            Ok(PathBuf::from(path))
        }
    };
    match text.split_once('=') {
        None if text == "stdio" => Ok(SerialMode::Stdio),
        None if text == "off" => Ok(SerialMode::Off),
        Some(("file", path)) => nonempty(path).map(SerialMode::File),
        Some(("socket", path)) => nonempty(path).map(SerialMode::Socket),
        _ => Err(invalid(
            "serial",
            format!("'{text}' is not stdio, file=PATH, socket=PATH or off"),
        )),
    }
}

/// Parses `--transport`.
pub fn parse_transport(text: &str) -> Result<Transport, InvalidFlag> {
    match text {
        "mmio" => Ok(Transport::Mmio),
        "pci" => Ok(Transport::Pci),
        other => Err(invalid(
            "transport",
            format!("'{other}' is not mmio or pci"),
        )),
    }
}

/// Parses `--cpu-profile`; `auto` asks the host.
pub fn parse_cpu_profile(text: &str, kvm_pvm_loaded: bool) -> Result<CpuProfile, InvalidFlag> {
    match text {
        "auto" => Ok(CpuProfile::for_host(kvm_pvm_loaded)),
        other => other.parse().map_err(|_| {
            invalid(
                "cpu-profile",
                format!("'{other}' is not auto, host or pvm-safe"),
            )
        }),
    }
}

const DISK_KEYS: &[&str] = &["path", "readonly", "id", "engine", "format", "boot"];
/// GET_ID answers with at most 20 bytes.
pub(crate) const DISK_ID_MAX: usize = 20;

/// A `--disk` entry: the device, and whether it is the boot disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFlag {
    /// The virtio-blk device.
    pub block: BlockConfig,
    /// `boot=on`.
    pub boot: bool,
}

/// Parses one `--disk` entry.
pub fn parse_disk(entry: &str) -> Result<DiskFlag, InvalidFlag> {
    let bad = |reason: String| invalid("disk", format!("{entry}: {reason}"));
    let kv = KeyValues::parse(entry, DISK_KEYS).map_err(|e| bad(e.to_string()))?;
    let path = PathBuf::from(kv.required("path").map_err(|e| bad(e.to_string()))?);
    let readonly = kv
        .switch("readonly", false)
        .map_err(|e| bad(e.to_string()))?;
    let engine = match kv.get("engine") {
        None | Some("sync") => Engine::Sync,
        Some("io_uring") => Engine::IoUring,
        Some(other) => return Err(bad(format!("engine={other}: expected sync or io_uring"))),
    };
    let format = match kv.get("format") {
        None => None,
        Some(name) => Some(
            ImageFormat::from_name(name)
                .ok_or_else(|| bad(format!("format={name}: expected raw or qcow2")))?,
        ),
    };
    let boot = kv.switch("boot", false).map_err(|e| bad(e.to_string()))?;
    let id = kv.get("id").map(str::to_string);
    if let Some(id) = &id
        && (id.is_empty() || id.len() > DISK_ID_MAX)
    {
        return Err(bad(format!("id must be 1 to {DISK_ID_MAX} bytes")));
    }
    // A block device is fine too; a directory or a missing path is not.
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => return Err(bad(format!("{} is a directory", path.display()))),
        Ok(_) => {}
        Err(e) => return Err(bad(format!("{}: {e}", path.display()))),
    }
    Ok(DiskFlag {
        block: BlockConfig {
            path,
            readonly,
            id,
            engine,
            format,
        },
        boot,
    })
}

fn parse_disks(entries: &[String]) -> Result<Vec<DiskFlag>, InvalidFlag> {
    let disks: Vec<DiskFlag> = entries
        .iter()
        .map(|e| parse_disk(e))
        .collect::<Result<_, _>>()?;
    for (i, disk) in disks.iter().enumerate() {
        if let Some(id) = &disk.block.id
            && disks[..i].iter().any(|d| d.block.id.as_ref() == Some(id))
        {
            return Err(invalid(
                "disk",
                format!("{}: id '{id}' is used twice", entries[i]),
            ));
        }
    }
    Ok(disks)
}

/// The NIC's `--net` keys; its DHCP server's are [`crate::dhcp::flags::DHCP_KEYS`].
const NIC_KEYS: &[&str] = &["tap", "mac", "mtu", "id"];

/// One `--net` entry's keys and values.
fn net_keys(entry: &str) -> Result<KeyValues<'_>, crate::keyvalue::KeyValueError> {
    KeyValues::parse(entry, &[NIC_KEYS, DHCP_KEYS].concat())
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

/// Parses one `--net` entry.
pub fn parse_net(entry: &str) -> Result<NetConfig, InvalidFlag> {
    let bad = |reason: String| invalid("net", format!("{entry}: {reason}"));
    let kv = net_keys(entry).map_err(|e| bad(e.to_string()))?;
    let tap = kv
        .required("tap")
        .map_err(|e| bad(e.to_string()))?
        .to_string();
    let mac = match kv.get("mac") {
        None => None,
        Some(text) => {
            let mac = parse_mac(text).ok_or_else(|| {
                bad(format!(
                    "mac={text}: expected six hex bytes like 52:54:00:12:34:56"
                ))
            })?;
            if mac[0] & 1 != 0 {
                return Err(bad(format!(
                    "mac={text}: a multicast address cannot be a NIC's"
                )));
            }
            Some(mac)
        }
    };
    let mtu = match kv.get("mtu") {
        None => None,
        Some(text) => Some(
            text.parse::<u16>()
                .ok()
                .filter(|m| (68..=65535).contains(m))
                .ok_or_else(|| bad(format!("mtu={text}: expected 68 to 65535")))?,
        ),
    };
    let mac = match kv.get("dhcp") {
        Some(_) => Some(dhcp_mac(mac).map_err(|e| bad(format!("mac: {e}")))?),
        None => mac,
    };
    Ok(NetConfig {
        tap,
        mac,
        mtu,
        id: kv.get("id").map(str::to_string),
    })
}

/// The DHCP server of one `--net` entry, if it has one ([`crate::dhcp::flags`]).
pub fn parse_net_dhcp(entry: &str) -> Result<Option<DhcpConfig>, InvalidFlag> {
    let bad = |reason: String| invalid("net", format!("{entry}: {reason}"));
    let kv = net_keys(entry).map_err(|e| bad(e.to_string()))?;
    crate::dhcp::flags::dhcp_from_net_keys(&kv).map_err(bad)
}

fn parse_nets(entries: &[String]) -> Result<Vec<NetConfig>, InvalidFlag> {
    let nets: Vec<NetConfig> = entries
        .iter()
        .map(|e| parse_net(e))
        .collect::<Result<_, _>>()?;
    for (i, net) in nets.iter().enumerate() {
        if nets[..i].iter().any(|n| n.tap == net.tap) {
            return Err(invalid(
                "net",
                format!("{}: tap '{}' is used twice", entries[i], net.tap),
            ));
        }
    }
    Ok(nets)
}

/// `path` if it is a regular file, else why not.
pub(crate) fn existing_file(path: &Path) -> Result<PathBuf, String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(path.to_owned()),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// A VM given on the command line: its file form (for `vm.info`), configuration and console.
pub type VmSpec = (VmConfigFile, VmConfig, SerialMode);

impl RunArgs {
    /// The flags given that describe a VM (which `--config` and `--restore` replace).
    fn vm_flags_given(&self) -> Vec<&'static str> {
        [
            ("--kernel", self.kernel.is_some()),
            ("--initrd", self.initrd.is_some()),
            ("--cmdline", self.cmdline.is_some()),
            ("--memory", self.memory.is_some()),
            ("--vcpus", self.vcpus.is_some()),
            ("--serial", self.serial.is_some()),
            ("--rng", self.rng),
            ("--disk", !self.disk.is_empty()),
            ("--net", !self.net.is_empty()),
            ("--transport", self.transport.is_some()),
            ("--acpi", self.acpi.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect()
    }

    /// `--restore`, checked against the flags that describe a VM (the snapshot does).
    pub fn restore_spec(&self) -> Result<Option<RestoreSpec>, InvalidFlag> {
        let Some(text) = &self.restore else {
            return Ok(None);
        };
        let mut given = self.vm_flags_given();
        given.retain(|flag| *flag != "--serial");
        if self.config.is_some() {
            given.insert(0, "--config");
        }
        if !given.is_empty() {
            return Err(invalid(
                "restore",
                format!("the snapshot describes the VM: drop {}", given.join(", ")),
            ));
        }
        let kv = KeyValues::parse(text, &["source_url", "prefault"])
            .map_err(|e| invalid("restore", e.to_string()))?;
        Ok(Some(RestoreSpec {
            source_url: kv
                .required("source_url")
                .map_err(|e| invalid("restore", e.to_string()))?
                .to_string(),
            prefault: kv
                .switch("prefault", false)
                .map_err(|e| invalid("restore", e.to_string()))?,
            serial: self.serial.as_deref().map(parse_serial).transpose()?,
        }))
    }

    /// The VM on the command line, or `None` when only `--api-socket` is given (the VM comes
    /// through `vm.create`) or `--restore` brings it.
    pub fn vm_spec(&self, kvm_pvm_loaded: bool) -> anyhow::Result<Option<VmSpec>> {
        if self.restore.is_some() {
            return Ok(None);
        }
        if self.api_socket.is_some()
            && self.config.is_none()
            && self.kernel.is_none()
            && self.disk.is_empty()
        {
            return Ok(None);
        }
        self.spec(kvm_pvm_loaded).map(Some)
    }

    /// The VM configuration and console mode, from `--config` or from the flags.
    pub fn to_config(&self, kvm_pvm_loaded: bool) -> anyhow::Result<(VmConfig, SerialMode)> {
        let (_, config, serial) = self.spec(kvm_pvm_loaded)?;
        Ok((config, serial))
    }

    /// The VM from `--config` (read once) or from the flags.
    fn spec(&self, kvm_pvm_loaded: bool) -> anyhow::Result<VmSpec> {
        let cpu_profile = parse_cpu_profile(&self.cpu_profile, kvm_pvm_loaded)?;
        let Some(file) = &self.config else {
            let (config, serial) = self.flags_to_config(cpu_profile)?;
            let mut file = VmConfigFile::from_validated(&config, &serial);
            // The DHCP servers are the launcher's, not the VM's: only the file keeps them.
            for (net, entry) in file.net.iter_mut().zip(&self.net) {
                net.dhcp = parse_net_dhcp(entry)?;
            }
            return Ok((file, config, serial));
        };
        let given = self.vm_flags_given();
        if !given.is_empty() {
            return Err(invalid(
                "config",
                format!("the file describes the VM: drop {}", given.join(", ")),
            )
            .into());
        }
        let context = || format!("--config {}", file.display());
        let parsed =
            VmConfigFile::load(file).map_err(|e| anyhow::Error::new(e).context(context()))?;
        let (mut config, serial) = parsed
            .validate(&self.kvm_device, cpu_profile)
            .map_err(|e| anyhow::Error::new(e).context(context()))?;
        config.seccomp = self.seccomp.filters();
        Ok((parsed, config, serial))
    }

    fn flags_to_config(
        &self,
        cpu_profile: CpuProfile,
    ) -> Result<(VmConfig, SerialMode), InvalidFlag> {
        let memory = self.memory.as_deref().unwrap_or("512M");
        let memory_bytes = parse_size(memory)
            .ok_or_else(|| invalid("memory", format!("'{memory}' is not a size like 512M")))?;
        let vcpus = self.vcpus.unwrap_or(1);
        let max = rvmm_core::mptable::MAX_VCPUS;
        if vcpus == 0 || vcpus > max {
            return Err(invalid(
                "vcpus",
                format!("{vcpus} is out of range 1 to {max}"),
            ));
        }
        rvmm_core::memory::MemoryLayout::new(memory_bytes)
            .map_err(|e| invalid("memory", e.to_string()))?;
        let disks = parse_disks(&self.disk)?;
        let boot_disks: Vec<usize> = (0..disks.len()).filter(|&i| disks[i].boot).collect();
        let boot = match self.kernel.as_deref() {
            Some(kernel) => {
                if !boot_disks.is_empty() {
                    return Err(invalid(
                        "disk",
                        "boot=on and --kernel: boot from one or the other",
                    ));
                }
                BootSource::Kernel {
                    kernel: existing_file(kernel).map_err(|r| invalid("kernel", r))?,
                    initrd: self
                        .initrd
                        .as_deref()
                        .map(|p| existing_file(p).map_err(|r| invalid("initrd", r)))
                        .transpose()?,
                }
            }
            None => {
                if disks.is_empty() {
                    return Err(invalid(
                        "kernel",
                        "required (or a --disk to boot from, --config FILE, or --api-socket PATH)",
                    ));
                }
                if self.initrd.is_some() {
                    return Err(invalid(
                        "initrd",
                        "needs --kernel (a disk boot takes its initrd from the disk)",
                    ));
                }
                if boot_disks.len() > 1 {
                    return Err(invalid("disk", "boot=on is given for more than one disk"));
                }
                BootSource::Disk {
                    index: boot_disks.first().copied().unwrap_or(0),
                }
            }
        };
        let transport = self.transport.as_deref().map(parse_transport).transpose()?;
        let (transport, acpi) = crate::config::platform(transport, self.acpi)
            .map_err(|reason| invalid("transport", reason))?;
        let config = VmConfig {
            vcpus,
            memory_bytes,
            cmdline: self.cmdline.clone().unwrap_or_else(|| match boot {
                BootSource::Kernel { .. } => DEFAULT_CMDLINE.into(),
                BootSource::Disk { .. } => String::new(),
            }),
            boot,
            cpu_profile,
            kvm_path: self.kvm_device.clone(),
            rng: self.rng,
            disks: disks.into_iter().map(|d| d.block).collect(),
            nets: parse_nets(&self.net)?,
            seccomp: self.seccomp.filters(),
            transport,
            acpi,
        };
        Ok((
            config,
            parse_serial(self.serial.as_deref().unwrap_or("stdio"))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["rvmm", "run", "--kernel", "/proc/self/exe"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => a,
            other => panic!("not rvmm run: {other:?}"),
        }
    }

    fn launcher_flags(argv: &[&str]) -> LauncherFlags {
        match parse_command_line(argv).unwrap().command {
            Command::VirtLauncher(flags) => flags,
            other => panic!("not virt-launcher mode: {other:?}"),
        }
    }

    #[test]
    fn virt_launcher_program_names_select_the_launcher_mode() {
        for program in [
            "/usr/bin/virt-launcher-monitor",
            "virt-launcher",
            "/opt/bin/virt-launcher",
        ] {
            let flags = launcher_flags(&[program, "--name", "vm", "--uid", "u-1"]);
            assert_eq!(
                (flags.args.name.as_str(), flags.args.uid.as_str()),
                ("vm", "u-1")
            );
        }
        // Any other name is rvmm's own command line.
        assert!(parse_command_line(["/usr/bin/virt-launcherx", "--name", "vm"]).is_err());
    }

    #[test]
    fn virt_launcher_subcommand_takes_go_style_and_unknown_flags() {
        let flags = launcher_flags(&[
            "rvmm",
            "virt-launcher",
            "--qemu-timeout",
            "5m0s",
            "--keep-after-failure",
            "--future-flag",
            "x",
            "--name=vm",
        ]);
        assert_eq!(flags.args.name, "vm");
        assert_eq!(flags.args.qemu_timeout, std::time::Duration::from_secs(300));
        assert!(flags.args.keep_after_failure);
        assert_eq!(flags.unknown, vec!["--future-flag"]);
        let err = parse_command_line(["rvmm", "virt-launcher", "--grace-period-seconds", "x"])
            .unwrap_err();
        assert!(err.to_string().contains("grace-period-seconds"), "{err}");
    }

    #[test]
    fn sizes_accept_binary_suffixes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("64MB"), Some(64 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn serial_modes_parse_and_bad_ones_name_the_flag() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialMode::Stdio);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialMode::File("/tmp/x".into())
        );
        assert_eq!(
            parse_serial("socket=/run/s").unwrap(),
            SerialMode::Socket("/run/s".into())
        );
        for bad in ["file=", "tty", "socket", "pipe=/x"] {
            let err = parse_serial(bad).unwrap_err().to_string();
            assert!(err.starts_with("--serial: "), "{err}");
        }
    }

    #[test]
    fn cpu_profile_auto_follows_the_host() {
        assert_eq!(
            parse_cpu_profile("auto", true).unwrap(),
            CpuProfile::PvmSafe
        );
        assert_eq!(parse_cpu_profile("auto", false).unwrap(), CpuProfile::Host);
        assert_eq!(parse_cpu_profile("host", true).unwrap(), CpuProfile::Host);
        assert!(
            parse_cpu_profile("turbo", true)
                .unwrap_err()
                .to_string()
                .starts_with("--cpu-profile")
        );
    }

    #[test]
    fn valid_flags_become_a_vm_config() {
        let (config, serial) = args(&["--memory", "64M", "--vcpus", "2"])
            .to_config(false)
            .unwrap();
        assert_eq!(config.memory_bytes, 64 << 20);
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.cpu_profile, CpuProfile::Host);
        assert_eq!(serial, SerialMode::Stdio);
    }

    #[test]
    fn on_reboot_defaults_to_exit_and_takes_restart() {
        assert_eq!(args(&[]).on_reboot, OnReboot::Exit);
        assert_eq!(
            args(&["--on-reboot", "restart"]).on_reboot,
            OnReboot::Restart
        );
        let argv = ["rvmm", "run", "--kernel", "/x", "--on-reboot", "reboot"];
        let err = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(
            err.contains("--on-reboot") && err.contains("'reboot' is not restart or exit"),
            "{err}"
        );
    }

    #[test]
    fn transport_and_acpi_flags_choose_the_platform() {
        let (config, _) = args(&[]).to_config(false).unwrap();
        assert_eq!((config.transport, config.acpi), (Transport::Mmio, true));
        let (config, _) = args(&["--transport", "pci"]).to_config(false).unwrap();
        assert_eq!((config.transport, config.acpi), (Transport::Pci, true));
        let (config, _) = args(&["--acpi=false"]).to_config(false).unwrap();
        assert_eq!((config.transport, config.acpi), (Transport::Mmio, false));
        let err = args(&["--transport", "pci", "--acpi=false"])
            .to_config(false)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--transport: the pci transport needs ACPI");
        let err = args(&["--transport", "virtio"])
            .to_config(false)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--transport: 'virtio' is not mmio or pci");
    }

    #[test]
    fn seccomp_is_on_unless_the_flag_says_false() {
        assert!(args(&[]).to_config(false).unwrap().0.seccomp);
        for (flag, on) in [
            ("--seccomp=false", false),
            ("--seccomp=true", true),
            ("--seccomp=log", true),
        ] {
            let (config, _) = args(&[flag]).to_config(false).unwrap();
            assert_eq!(config.seccomp, on, "{flag}");
        }
        assert_eq!(args(&["--seccomp=log"]).seccomp, SeccompMode::Log);
        let argv = ["rvmm", "run", "--kernel", "/proc/self/exe", "--seccomp=off"];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: [(&[&str], &str); 6] = [
            (&["--vcpus", "0"], "--vcpus"),
            (&["--vcpus", "33"], "--vcpus"),
            (&["--memory", "1M"], "--memory"),
            (&["--memory", "lots"], "--memory"),
            (&["--initrd", "/nonexistent/initrd"], "--initrd"),
            (&["--cpu-profile", "x"], "--cpu-profile"),
        ];
        for (extra, flag) in cases {
            let err = args(extra).to_config(false).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{extra:?}: {err}");
        }
    }

    #[test]
    fn disk_entries_become_block_configs() {
        let flag = parse_disk(
            "path=/proc/self/exe,readonly=on,id=root,engine=io_uring,format=qcow2,boot=on",
        )
        .unwrap();
        let disk = &flag.block;
        assert_eq!(disk.path, PathBuf::from("/proc/self/exe"));
        assert!(disk.readonly);
        assert_eq!(disk.id.as_deref(), Some("root"));
        assert_eq!(disk.engine, Engine::IoUring);
        assert_eq!(disk.format, Some(ImageFormat::Qcow2));
        assert!(flag.boot);
        let flag = parse_disk("path=/proc/self/exe").unwrap();
        assert!(!flag.block.readonly);
        assert_eq!(flag.block.engine, Engine::Sync);
        assert_eq!(flag.block.format, None);
        assert!(!flag.boot);
    }

    #[test]
    fn bad_disk_entries_name_the_entry_and_the_problem() {
        let cases = [
            ("readonly=on", "'path' is required"),
            (
                "path=/nonexistent/disk.img",
                "/nonexistent/disk.img: No such file",
            ),
            ("path=/tmp", "is a directory"),
            (
                "path=/proc/self/exe,engine=aio",
                "engine=aio: expected sync or io_uring",
            ),
            (
                "path=/proc/self/exe,readonly=maybe",
                "readonly=maybe: expected on or off",
            ),
            ("path=/proc/self/exe,size=1G", "unknown key 'size'"),
            (
                "path=/proc/self/exe,id=aaaaaaaaaaaaaaaaaaaaa",
                "id must be 1 to 20 bytes",
            ),
        ];
        for (entry, reason) in cases {
            let err = parse_disk(entry).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--disk: {entry}: ")), "{err}");
            assert!(err.contains(reason), "{entry}: {err}");
        }
        let twice = vec![
            "path=/proc/self/exe,id=a".to_string(),
            "path=/proc/self/exe,id=a".into(),
        ];
        assert!(
            parse_disks(&twice)
                .unwrap_err()
                .to_string()
                .contains("id 'a' is used twice")
        );
    }

    #[test]
    fn net_entries_become_net_configs() {
        let net = parse_net("tap=tap0,mac=02:00:00:aa:bb:cc,mtu=1400,id=eth0").unwrap();
        assert_eq!(net.tap, "tap0");
        assert_eq!(net.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(net.mtu, Some(1400));
        assert_eq!(net.id.as_deref(), Some("eth0"));
        assert_eq!(parse_net("tap=tap1").unwrap().mac, None);
    }

    #[test]
    fn bad_net_entries_name_the_entry_and_the_problem() {
        let cases = [
            ("mac=02:00:00:00:00:01", "'tap' is required"),
            ("tap=tap0,mac=02:00:00:00:00", "expected six hex bytes"),
            ("tap=tap0,mac=02:00:00:00:00:0g", "expected six hex bytes"),
            ("tap=tap0,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=tap0,mtu=20", "mtu=20: expected 68 to 65535"),
            ("tap=tap0,queues=2", "unknown key 'queues'"),
        ];
        for (entry, reason) in cases {
            let err = parse_net(entry).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--net: {entry}: ")), "{err}");
            assert!(err.contains(reason), "{entry}: {err}");
        }
        let twice = vec!["tap=tap0".to_string(), "tap=tap0,id=b".into()];
        assert!(
            parse_nets(&twice)
                .unwrap_err()
                .to_string()
                .contains("tap 'tap0' is used twice")
        );
    }

    #[test]
    fn net_dhcp_keys_give_the_nic_a_mac_and_the_file_its_server() {
        let entry = "tap=tap0,dhcp=10.0.2.2/24,dns=10.0.2.1";
        let a = args(&["--net", entry]);
        let (file, config, _) = a.vm_spec(false).unwrap().unwrap();
        assert!(config.nets[0].mac.is_some(), "a MAC for the DHCP client");
        let dhcp = file.net[0]
            .dhcp
            .as_ref()
            .expect("the file carries the server");
        assert_eq!(
            (dhcp.address.as_deref(), dhcp.dns.len()),
            (Some("10.0.2.2/24"), 1)
        );
        assert_eq!(parse_net("tap=tap1").unwrap().mac, None);
        let err = parse_net_dhcp("tap=tap0,dhcp=10.0.2.2/24,gateway=x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--net: tap=tap0,dhcp=10.0.2.2/24,gateway=x: gateway=x: not an IPv4 address"
        );
    }

    #[test]
    fn missing_or_non_file_kernel_is_rejected() {
        let mut a = args(&[]);
        a.kernel = Some("/nonexistent/vmlinux".into());
        let err = a.to_config(false).unwrap_err().to_string();
        assert!(err.starts_with("--kernel: /nonexistent/vmlinux"), "{err}");
        a.kernel = Some("/tmp".into());
        assert!(
            a.to_config(false)
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
    }
}
