//! The command line: `rvmm run ...`, its VM flags translated into the configuration model
//! (`cli::vm_flags`) and checked by its one validator into a [`VmSpec`], and the choice of the
//! virt-launcher mode (`rvmm virt-launcher ...` or the binary invoked as `virt-launcher`).

mod vm_flags;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use rvmm_core::CpuProfile;

use crate::config::{ConfigError, HostSettings, SerialMode, Terms, VmConfigFile, VmSpec};
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

/// A host-side flag's value is invalid, or flags that exclude each other are given.
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

/// Why `rvmm run`'s flags give no VM.
#[derive(Debug, thiserror::Error)]
pub enum RunArgsError {
    /// A host-side flag, or flags that exclude each other.
    #[error(transparent)]
    Flag(#[from] InvalidFlag),
    /// A VM flag's value, as the one validator found it, named as the flag
    /// (`--disk[1] path: ...`).
    #[error("{}", .0.render(Terms::Flags))]
    Vm(ConfigError),
    /// The `--config` file.
    #[error("--config {}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, in the file's terms.
        #[source]
        source: ConfigError,
    },
}

impl RunArgsError {
    /// The configuration error, if the VM's description is what is wrong.
    pub fn config_error(&self) -> Option<&ConfigError> {
        match self {
            Self::Vm(e) | Self::ConfigFile { source: e, .. } => Some(e),
            Self::Flag(_) => None,
        }
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

impl RunArgs {
    /// The host-side settings the flags give every VM (`--kvm-device`, `--cpu-profile`,
    /// `--seccomp`).
    pub fn host_settings(&self, kvm_pvm_loaded: bool) -> Result<HostSettings, InvalidFlag> {
        Ok(HostSettings {
            kvm_path: self.kvm_device.clone(),
            cpu_profile: parse_cpu_profile(&self.cpu_profile, kvm_pvm_loaded)?,
            seccomp: self.seccomp.filters(),
        })
    }

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

    /// `--serial` alone, checked by the one validator: the console of a VM that comes from a
    /// snapshot or a migration.
    pub fn serial_mode(&self) -> Result<Option<SerialMode>, RunArgsError> {
        let Some(text) = &self.serial else {
            return Ok(None);
        };
        let config = vm_flags::serial_config(text).map_err(RunArgsError::Vm)?;
        config.to_mode().map(Some).map_err(RunArgsError::Vm)
    }

    /// `--restore`, checked against the flags that describe a VM (the snapshot does).
    pub fn restore_spec(&self) -> Result<Option<RestoreSpec>, RunArgsError> {
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
            )
            .into());
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
            serial: self.serial_mode()?,
        }))
    }

    /// The VM on the command line, checked with `host`'s settings; `None` when only
    /// `--api-socket` is given (the VM comes through `vm.create`) or `--restore` brings it.
    pub fn vm_spec(&self, host: &HostSettings) -> Result<Option<VmSpec>, RunArgsError> {
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
        self.spec(host).map(Some)
    }

    /// The VM from `--config` (read once) or from the flags, through the one validator.
    pub fn spec(&self, host: &HostSettings) -> Result<VmSpec, RunArgsError> {
        let Some(path) = &self.config else {
            let file = self.to_file().map_err(RunArgsError::Vm)?;
            return file.validate(host).map_err(RunArgsError::Vm);
        };
        let given = self.vm_flags_given();
        if !given.is_empty() {
            return Err(invalid(
                "config",
                format!("the file describes the VM: drop {}", given.join(", ")),
            )
            .into());
        }
        let in_file = |source| RunArgsError::ConfigFile {
            path: path.clone(),
            source,
        };
        VmConfigFile::load(path)
            .and_then(|file| file.validate(host))
            .map_err(in_file)
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
    fn seccomp_is_on_unless_the_flag_says_false() {
        for (flag, on) in [
            ("--seccomp=false", false),
            ("--seccomp=true", true),
            ("--seccomp=log", true),
        ] {
            let a = args(&[flag]);
            let spec = a.spec(&a.host_settings(false).unwrap()).unwrap();
            assert_eq!(spec.config.seccomp, on, "{flag}");
        }
        assert_eq!(args(&["--seccomp=log"]).seccomp, SeccompMode::Log);
        let argv = ["rvmm", "run", "--kernel", "/proc/self/exe", "--seccomp=off"];
        assert!(Cli::try_parse_from(argv).is_err());
    }
}
