//! The command line virt-controller puts in the launcher pod
//! (`virt-launcher-monitor --qemu-timeout 321s --name vm --uid ... --keep-after-failure`),
//! which virt-launcher-monitor passes on to virt-launcher.
//!
//! Every flag either program knows is accepted with Go's syntax (`--flag value`,
//! `--flag=value`, bools as `--flag` or `--flag=false`, durations as `5m0s`); flags from a
//! newer KubeVirt are dropped with a warning rather than failing the pod.
//! [`LauncherFlags::usage`] says which flags rvmm honours and which it only accepts.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use super::vmi::LauncherDirs;

/// virt-launcher's flags.
#[derive(Clone, Debug, Parser, PartialEq, Eq)]
#[command(name = "virt-launcher", about = "rvmm as KubeVirt's virt-launcher")]
pub struct VirtLauncherArgs {
    /// VMI name.
    #[arg(long, default_value = "")]
    pub name: String,
    /// VMI UID.
    #[arg(long, default_value = "")]
    pub uid: String,
    /// VMI namespace.
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// Directory shared with virt-handler (sockets, notify pipe).
    #[arg(long, default_value = "/var/run/kubevirt")]
    pub kubevirt_share_dir: PathBuf,
    /// Scratch space for ephemeral disks.
    #[arg(long, default_value = "/var/run/kubevirt-ephemeral-disks")]
    pub ephemeral_disk_dir: PathBuf,
    /// Where container disks and kernel-boot artifacts appear.
    #[arg(long, default_value = "/var/run/kubevirt/container-disks")]
    pub container_disk_dir: PathBuf,
    /// Where hotplugged disks appear.
    #[arg(long, default_value = "/var/run/kubevirt/hotplug-disks")]
    pub hotplug_disk_dir: PathBuf,
    /// How long the VM may take to start.
    #[arg(long, default_value = "3m", value_parser = parse_go_duration)]
    pub qemu_timeout: Duration,
    /// Seconds between the graceful shutdown request and the kill.
    #[arg(long, default_value_t = 30)]
    pub grace_period_seconds: i64,
    /// Hook sidecars to wait for.
    #[arg(long, default_value_t = 0)]
    pub hook_sidecars: u32,
    /// EFI firmware directory.
    #[arg(long, default_value = "/usr/share/OVMF")]
    pub ovmf_path: PathBuf,
    /// Memory limit for disk image inspection (bytes).
    #[arg(long)]
    pub disk_memory_limit: Option<i64>,
    /// Hypervisor name (`kvm`).
    #[arg(long)]
    pub hypervisor: Option<String>,
    /// libvirt log filters.
    #[arg(long)]
    pub libvirt_log_filters: Option<String>,
    /// Guest agent polling: system info.
    #[arg(long, default_value = "120s", value_parser = parse_go_duration)]
    pub qemu_agent_sys_interval: Duration,
    /// Guest agent polling: filesystems.
    #[arg(long, default_value = "300s", value_parser = parse_go_duration)]
    pub qemu_agent_file_interval: Duration,
    /// Guest agent polling: users.
    #[arg(long, default_value = "10s", value_parser = parse_go_duration)]
    pub qemu_agent_user_interval: Duration,
    /// Guest agent polling: version.
    #[arg(long, default_value = "300s", value_parser = parse_go_duration)]
    pub qemu_agent_version_interval: Duration,
    /// Guest agent polling: fsfreeze status.
    #[arg(long, default_value = "5s", value_parser = parse_go_duration)]
    pub qemu_fsfreeze_status_interval: Duration,
    /// Fall back to software emulation without KVM.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub allow_emulation: bool,
    /// Emulate other architectures.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub allow_cross_arch_emulation: bool,
    /// Run the hypervisor as the non-root `qemu` user.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub run_as_nonroot: bool,
    /// Keep the pod after the launcher fails (debugging).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub keep_after_failure: bool,
    /// Crash at start (KubeVirt functional tests).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub simulate_crash: bool,
    /// Container disks as image volumes.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub image_volume: bool,
    /// libvirt hook server and client.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub libvirt_hook_server_and_client: bool,
    /// Ordinal pod interface names upgrade.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub upgrade_ordinal_ifaces: bool,
    /// vGPU live migration hook.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub vgpu_dedicated_hook: bool,
    /// In-launcher VM stats collector.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub vm_stats_collector: bool,
    /// Firmware auto-selection.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub firmware_auto_selection: bool,
    /// Legacy: run without the monitor process.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub no_fork: bool,
    /// Legacy spelling of `--allow-emulation`.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = parse_go_bool)]
    pub use_emulation: bool,
    /// Legacy: PVC size tolerance (percent).
    #[arg(long)]
    pub less_pvc_space_toleration: Option<i64>,
    /// Legacy: readiness file.
    #[arg(long)]
    pub readiness_file: Option<PathBuf>,
    /// Legacy: watchdog file update interval.
    #[arg(long, value_parser = parse_go_duration)]
    pub watchdog_update_interval: Option<Duration>,
    /// Legacy: guest agent polling interval.
    #[arg(long, value_parser = parse_go_duration)]
    pub qemu_agent_poller_interval: Option<Duration>,
    /// glog verbosity.
    #[arg(long = "v")]
    pub verbosity: Option<u32>,
}

/// Whether rvmm acts on a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagUse {
    /// rvmm acts on it.
    Honoured,
    /// Accepted so the pod starts; the reason it changes nothing.
    Ignored(&'static str),
}

/// Every flag and what rvmm does with it. Honoured flags are for the virt-launcher mode to act
/// on: the directories ([`VirtLauncherArgs::dirs`], [`VirtLauncherArgs::sockets_dir`]), the
/// VMI identity (checked against the synced VMI), `qemu-timeout` (the wait for the first
/// sync), `grace-period-seconds` (shutdown before kill), `keep-after-failure` (stay alive
/// after a failed VM), `simulate-crash` (fail at start) and `v`
/// ([`VirtLauncherArgs::log_level`]).
pub const FLAG_USES: &[(&str, FlagUse)] = &[
    ("name", FlagUse::Honoured),
    ("uid", FlagUse::Honoured),
    ("namespace", FlagUse::Honoured),
    ("kubevirt-share-dir", FlagUse::Honoured),
    ("ephemeral-disk-dir", FlagUse::Honoured),
    ("container-disk-dir", FlagUse::Honoured),
    ("qemu-timeout", FlagUse::Honoured),
    ("grace-period-seconds", FlagUse::Honoured),
    ("keep-after-failure", FlagUse::Honoured),
    ("simulate-crash", FlagUse::Honoured),
    ("v", FlagUse::Honoured),
    ("hotplug-disk-dir", FlagUse::Ignored("no volume hotplug")),
    (
        "hook-sidecars",
        FlagUse::Ignored("hook sidecars are not run"),
    ),
    (
        "ovmf-path",
        FlagUse::Ignored("no UEFI; rvmm boots kernels directly"),
    ),
    (
        "disk-memory-limit",
        FlagUse::Ignored("rvmm does not inspect images with qemu-img"),
    ),
    (
        "hypervisor",
        FlagUse::Ignored("rvmm is the hypervisor (KVM)"),
    ),
    ("libvirt-log-filters", FlagUse::Ignored("no libvirt")),
    (
        "qemu-agent-sys-interval",
        FlagUse::Ignored("no guest agent"),
    ),
    (
        "qemu-agent-file-interval",
        FlagUse::Ignored("no guest agent"),
    ),
    (
        "qemu-agent-user-interval",
        FlagUse::Ignored("no guest agent"),
    ),
    (
        "qemu-agent-version-interval",
        FlagUse::Ignored("no guest agent"),
    ),
    (
        "qemu-fsfreeze-status-interval",
        FlagUse::Ignored("no guest agent"),
    ),
    ("allow-emulation", FlagUse::Ignored("rvmm always needs KVM")),
    (
        "allow-cross-arch-emulation",
        FlagUse::Ignored("rvmm runs x86_64 guests on KVM only"),
    ),
    (
        "run-as-nonroot",
        FlagUse::Ignored("rvmm runs as the pod's user"),
    ),
    (
        "image-volume",
        FlagUse::Ignored("container disks are read from --container-disk-dir"),
    ),
    (
        "libvirt-hook-server-and-client",
        FlagUse::Ignored("no libvirt"),
    ),
    (
        "upgrade-ordinal-ifaces",
        FlagUse::Ignored("only the pod network's tap0 is used"),
    ),
    ("vgpu-dedicated-hook", FlagUse::Ignored("no vGPU")),
    (
        "vm-stats-collector",
        FlagUse::Ignored("stats come from GetDomainStats"),
    ),
    ("firmware-auto-selection", FlagUse::Ignored("no firmware")),
    ("no-fork", FlagUse::Ignored("rvmm never forks a monitor")),
    ("use-emulation", FlagUse::Ignored("rvmm always needs KVM")),
    (
        "less-pvc-space-toleration",
        FlagUse::Ignored("PVC sizes are not checked"),
    ),
    (
        "readiness-file",
        FlagUse::Ignored("readiness is the launcher-sock rename"),
    ),
    (
        "watchdog-update-interval",
        FlagUse::Ignored("no watchdog file"),
    ),
    (
        "qemu-agent-poller-interval",
        FlagUse::Ignored("no guest agent"),
    ),
];

/// The parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LauncherFlags {
    /// The values.
    pub args: VirtLauncherArgs,
    /// Flags given on the command line (long names).
    pub given: Vec<String>,
    /// Unknown flags, dropped (with any value that followed them).
    pub unknown: Vec<String>,
}

impl LauncherFlags {
    /// Parses `argv` (program name first). Unknown `--flags` are dropped with their value;
    /// a known flag with a bad value is an error.
    pub fn parse_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let command = VirtLauncherArgs::command();
        let known: Vec<String> = command
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        let mut kept = Vec::new();
        let mut unknown = Vec::new();
        let mut argv = argv.into_iter().map(Into::into).peekable();
        kept.extend(argv.next());
        while let Some(arg) = argv.next() {
            let text = arg.to_string_lossy().into_owned();
            let name = text.trim_start_matches('-').split('=').next().unwrap_or("");
            let is_flag = text.starts_with('-') && text.len() > 1;
            if is_flag && !known.iter().any(|k| k == name) && name != "help" {
                // Drop the value too when it is a separate word.
                if !text.contains('=')
                    && argv
                        .peek()
                        .is_some_and(|next| !next.to_string_lossy().starts_with('-'))
                {
                    argv.next();
                }
                unknown.push(text);
                continue;
            }
            kept.push(arg);
        }
        let matches = command.try_get_matches_from(kept)?;
        let args = VirtLauncherArgs::from_arg_matches(&matches)?;
        let given = VirtLauncherArgs::command()
            .get_arguments()
            .filter(|a| matches.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        Ok(Self {
            args,
            given,
            unknown,
        })
    }

    /// One line per given flag rvmm does not act on, and per unknown flag, for the log.
    pub fn usage(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .given
            .iter()
            .filter_map(|flag| {
                FLAG_USES
                    .iter()
                    .find(|(f, _)| f == flag)
                    .and_then(|(_, u)| match u {
                        FlagUse::Honoured => None,
                        FlagUse::Ignored(why) => {
                            Some(format!("--{flag}: accepted, ignored ({why})"))
                        }
                    })
            })
            .collect();
        lines.extend(
            self.unknown
                .iter()
                .map(|f| format!("{f}: unknown flag, ignored")),
        );
        lines
    }

    /// Logs [`Self::usage`] as warnings.
    pub fn log_usage(&self) {
        for line in self.usage() {
            log::warn!("{line}");
        }
    }
}

/// The argument that collects `rvmm virt-launcher ...`'s words for [`LauncherFlags::parse_from`].
const RAW_ARGS: &str = "virt_launcher_args";

/// `rvmm virt-launcher FLAGS...` as a clap subcommand: clap hands every word over unparsed
/// (virt-launcher's Go-style flags, unknown ones included) and [`LauncherFlags::parse_from`]
/// reads them; `--help` prints virt-launcher's flags.
impl clap::Args for LauncherFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.disable_help_flag(true).arg(
            clap::Arg::new(RAW_ARGS)
                .value_name("VIRT_LAUNCHER_FLAGS")
                .help("virt-launcher's flags (rvmm virt-launcher --help lists them)")
                .num_args(0..)
                .trailing_var_arg(true)
                .allow_hyphen_values(true)
                .value_parser(clap::value_parser!(OsString)),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for LauncherFlags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let words = matches
            .get_many::<OsString>(RAW_ARGS)
            .into_iter()
            .flatten()
            .cloned();
        Self::parse_from(std::iter::once(OsString::from("virt-launcher")).chain(words))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl VirtLauncherArgs {
    /// The volume directories these flags name (the private and device directories are
    /// fixed by KubeVirt).
    pub fn dirs(&self) -> LauncherDirs {
        LauncherDirs {
            container_disks: self.container_disk_dir.clone(),
            ephemeral_disks: self.ephemeral_disk_dir.clone(),
            ..LauncherDirs::default()
        }
    }

    /// `<share-dir>/sockets`, where the command socket lives.
    pub fn sockets_dir(&self) -> PathBuf {
        self.kubevirt_share_dir.join("sockets")
    }

    /// The log level `--v` asks for (glog: 0-1 info, 2-4 debug, 5+ trace).
    pub fn log_level(&self) -> log::LevelFilter {
        match self.verbosity {
            None | Some(0..=1) => log::LevelFilter::Info,
            Some(2..=4) => log::LevelFilter::Debug,
            Some(_) => log::LevelFilter::Trace,
        }
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("'{text}' is not a boolean")),
    }
}

/// Go's `time.ParseDuration`: `300ms`, `1.5h`, `5m0s`, `0`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("'{text}' is not a duration like 5m0s");
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    if unsigned.starts_with('-') {
        return Err(format!("'{text}' is negative"));
    }
    if unsigned == "0" {
        return Ok(Duration::ZERO);
    }
    if unsigned.is_empty() {
        return Err(bad());
    }
    let mut rest = unsigned;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        total += value * nanos_per_unit;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What virt-controller's template renders (with every optional flag).
    const POD_COMMAND: &[&str] = &[
        "/usr/bin/virt-launcher-monitor",
        "--qemu-timeout",
        "325s",
        "--name",
        "testvm",
        "--uid",
        "8f1c-uid",
        "--namespace",
        "default",
        "--kubevirt-share-dir",
        "/var/run/kubevirt",
        "--ephemeral-disk-dir",
        "/var/run/kubevirt-ephemeral-disks",
        "--container-disk-dir",
        "/var/run/kubevirt/container-disks",
        "--grace-period-seconds",
        "45",
        "--hook-sidecars",
        "0",
        "--ovmf-path",
        "/usr/share/OVMF",
        "--disk-memory-limit",
        "2097152000",
        "--hypervisor",
        "kvm",
        "--run-as-nonroot",
        "--image-volume",
        "--libvirt-log-filters",
        "3:remote 4:event",
        "--allow-emulation",
        "--keep-after-failure",
    ];

    #[test]
    fn virt_controller_pod_command_parses() {
        let flags = LauncherFlags::parse_from(POD_COMMAND).unwrap();
        let a = &flags.args;
        assert_eq!(a.name, "testvm");
        assert_eq!(a.uid, "8f1c-uid");
        assert_eq!(a.namespace, "default");
        assert_eq!(a.qemu_timeout, Duration::from_secs(325));
        assert_eq!(a.grace_period_seconds, 45);
        assert_eq!(a.disk_memory_limit, Some(2_097_152_000));
        assert_eq!(a.hypervisor.as_deref(), Some("kvm"));
        assert_eq!(a.libvirt_log_filters.as_deref(), Some("3:remote 4:event"));
        assert!(a.run_as_nonroot && a.image_volume && a.allow_emulation && a.keep_after_failure);
        assert!(!a.simulate_crash);
        assert!(flags.unknown.is_empty());
        assert_eq!(a.sockets_dir(), PathBuf::from("/var/run/kubevirt/sockets"));
    }

    #[test]
    fn defaults_match_virt_launcher() {
        let a = LauncherFlags::parse_from(["virt-launcher"]).unwrap().args;
        assert_eq!(a.qemu_timeout, Duration::from_secs(180));
        assert_eq!(a.grace_period_seconds, 30);
        assert_eq!(a.kubevirt_share_dir, PathBuf::from("/var/run/kubevirt"));
        assert_eq!(a.qemu_agent_user_interval, Duration::from_secs(10));
        assert!(!a.allow_emulation);
        assert_eq!(a.dirs(), LauncherDirs::default());
    }

    #[test]
    fn go_bool_flags_take_equals_values_only() {
        let f = LauncherFlags::parse_from(["x", "--allow-emulation=false", "--no-fork=T"]).unwrap();
        assert!(!f.args.allow_emulation);
        assert!(f.args.no_fork);
        assert!(LauncherFlags::parse_from(["x", "--run-as-nonroot=maybe"]).is_err());
    }

    #[test]
    fn unknown_flags_are_dropped_with_their_values() {
        let f = LauncherFlags::parse_from([
            "x",
            "--future-flag",
            "value",
            "--name",
            "vm",
            "--future-bool",
            "--other=1",
            "--uid",
            "u",
        ])
        .unwrap();
        assert_eq!(f.args.name, "vm");
        assert_eq!(f.args.uid, "u");
        assert_eq!(
            f.unknown,
            vec!["--future-flag", "--future-bool", "--other=1"]
        );
    }

    #[test]
    fn usage_lists_given_flags_rvmm_ignores() {
        let flags = LauncherFlags::parse_from(POD_COMMAND).unwrap();
        let usage = flags.usage();
        assert!(usage.contains(
            &"--hook-sidecars: accepted, ignored (hook sidecars are not run)".to_owned()
        ));
        assert!(
            usage
                .iter()
                .any(|l| l.starts_with("--run-as-nonroot: accepted, ignored"))
        );
        assert!(!usage.iter().any(|l| l.starts_with("--name")));
        assert!(!usage.iter().any(|l| l.starts_with("--keep-after-failure")));
    }

    #[test]
    fn every_flag_has_a_declared_use() {
        for arg in VirtLauncherArgs::command().get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    FLAG_USES.iter().any(|(f, _)| *f == long),
                    "--{long} has no entry in FLAG_USES"
                );
            }
        }
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("5m0s"), Ok(Duration::from_secs(300)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Ok(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_go_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert!(parse_go_duration("5").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("1d").is_err());
    }

    #[test]
    fn glog_verbosity_maps_to_log_levels() {
        let f = LauncherFlags::parse_from(["x", "--v", "4"]).unwrap();
        assert_eq!(f.args.log_level(), log::LevelFilter::Debug);
        assert_eq!(f.given, vec!["v"]);
    }
}
