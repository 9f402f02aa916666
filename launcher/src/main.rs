//! `rvmm`: boots a guest on KVM and runs it until it stops; `rvmm virt-launcher` (or the binary
//! installed as `virt-launcher`/`virt-launcher-monitor`) is KubeVirt's launcher instead
//! ([`launcher_mode`]).
//!
//! Exit codes: 0 the guest powered off or reset (or the VMM was asked to stop), 1 VMM error,
//! 2 bad configuration, 3 guest crash.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rvmm_core::cpuid::KVM_PVM_MODULE;
use rvmm_core::seccomp::{DeniedAction, set_denied_action, single_malloc_arena};
use rvmm_launcher::api::{ApiServer, ApiServerError, start_metrics_server};
use rvmm_launcher::cli::{Command, RunArgs, SeccompMode, parse_command_line};
use rvmm_launcher::events::EventMonitor;
use rvmm_launcher::kubevirt::launcher_mode;
use rvmm_launcher::panic::abort_on_panic;
use rvmm_launcher::seccomp::{filter_main_thread, signal_rules, thread_filter_for};
use rvmm_launcher::shutdown::ShutdownSignals;
use rvmm_launcher::vmm::{EXIT_BAD_CONFIG, EXIT_VMM_ERROR, Vmm, VmmSettings};

fn main() -> ExitCode {
    // Before any thread starts: every thread is seccomp-filtered (see single_malloc_arena);
    // a panic aborts, in debug builds as in release ones.
    single_malloc_arena();
    abort_on_panic();
    // `rvmm run`, `rvmm virt-launcher`, or virt-launcher's flags when invoked under its name.
    let cli = parse_command_line(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let default_level = match &cli.command {
        Command::Run(_) => log::LevelFilter::Warn,
        // virt-launcher logs at info unless `--v` asks for more.
        Command::VirtLauncher(flags) => flags.args.log_level(),
    };
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(default_level.as_str()),
    )
    .format_timestamp_millis()
    .init();
    match cli.command {
        Command::Run(args) => run(&args),
        Command::VirtLauncher(flags) => ExitCode::from(launcher_mode::run(&flags)),
    }
}

fn fail(code: u8, err: &anyhow::Error) -> ExitCode {
    // The whole cause chain, once, on one line.
    eprintln!("rvmm: {err:#}");
    ExitCode::from(code)
}

fn run(args: &RunArgs) -> ExitCode {
    // The user's input first, with the default signal actions: a configuration that cannot be
    // read leaves rvmm killable by SIGTERM/SIGINT (it starts no thread before this).
    let kvm_pvm_loaded = Path::new(KVM_PVM_MODULE).exists();
    let vmm = match setup(args, kvm_pvm_loaded) {
        Ok(vmm) => vmm,
        Err(e) => return fail(EXIT_BAD_CONFIG, &e),
    };
    let vm = match args.vm_spec(&vmm.settings().host()) {
        Ok(vm) => vm,
        Err(e) => return fail(EXIT_BAD_CONFIG, &e.into()),
    };
    let restore = match args.restore_spec() {
        Ok(restore) => restore,
        Err(e) => return fail(EXIT_BAD_CONFIG, &e.into()),
    };
    if args.seccomp == SeccompMode::Log
        && let Err(e) = set_denied_action(DeniedAction::Log)
    {
        return fail(
            EXIT_VMM_ERROR,
            &anyhow::Error::new(e).context("--seccomp=log: cannot handle SIGSYS"),
        );
    }
    // Before any thread starts, so that every thread inherits the blocked signals.
    let signals = match ShutdownSignals::block() {
        Ok(signals) => signals,
        Err(e) => {
            return fail(
                EXIT_VMM_ERROR,
                &anyhow::Error::new(e).context("Cannot block signals"),
            );
        }
    };
    // Servers first, so a client can watch the boot.
    let server_failed = |e: ApiServerError| {
        let code = if e.is_bad_config() {
            EXIT_BAD_CONFIG
        } else {
            EXIT_VMM_ERROR
        };
        fail(code, &e.into())
    };
    let _api = match &args.api_socket {
        Some(path) => match ApiServer::start(path, vmm.clone(), args.seccomp.filters()) {
            Ok(server) => Some(server),
            Err(e) => return server_failed(e),
        },
        None => None,
    };
    if let Some(addr) = args.metrics_addr {
        match start_metrics_server(addr, vmm.clone(), args.seccomp.filters()) {
            Ok(bound) => log::info!("Metrics on http://{bound}/metrics"),
            Err(e) => return server_failed(e),
        }
    }
    let grace = Duration::from_secs(args.grace_period_seconds);
    if vm.is_none() {
        // Without a VM on the command line, --serial is the console of one restored or
        // migrated in through the API.
        match args.serial_mode() {
            Ok(serial) => vmm.set_serial_override(serial),
            Err(e) => return fail(EXIT_BAD_CONFIG, &e.into()),
        }
    }
    let started = match (vm, restore) {
        (Some(spec), _) => vmm.create_spec(spec).and_then(|()| vmm.boot()),
        (None, Some(spec)) => vmm.restore(&spec.source_url, spec.prefault, spec.serial),
        (None, None) => Ok(()),
    };
    if let Err(e) = started {
        let code = if e.is_bad_config() {
            EXIT_BAD_CONFIG
        } else {
            EXIT_VMM_ERROR
        };
        vmm.request_exit(code);
        vmm.teardown();
        return fail(code, &e.into());
    }
    // The signal thread after the boot (it is not on the way to the guest's first
    // instruction): a signal that came meanwhile waits, blocked, and is taken now.
    let signal_filter = match thread_filter_for(args.seccomp.filters(), signal_rules()) {
        Ok(filter) => filter,
        Err(e) => {
            vmm.request_exit(EXIT_VMM_ERROR);
            vmm.teardown();
            return fail(EXIT_VMM_ERROR, &e.into());
        }
    };
    if let Err(e) = signals.handle(vmm.clone(), grace, signal_filter) {
        vmm.request_exit(EXIT_VMM_ERROR);
        vmm.teardown();
        return fail(
            EXIT_VMM_ERROR,
            &anyhow::Error::new(e).context("Cannot handle the shutdown signals"),
        );
    }
    // From here on this thread only waits for the end, tears the VM down and returns: it
    // filters itself. Every thread it starts already runs (signals, API and vmm-control, the
    // booted VM's waiter and vCPUs; a VM booted later is vmm-control's) and it starts no
    // more, so none inherits its filter.
    if args.seccomp.filters()
        && let Err(e) = filter_main_thread()
    {
        vmm.request_exit(EXIT_VMM_ERROR);
        vmm.teardown();
        return fail(
            EXIT_VMM_ERROR,
            &anyhow::Error::new(e).context("Cannot filter the main thread's system calls"),
        );
    }
    let code = vmm.wait_for_exit();
    vmm.teardown();
    ExitCode::from(code)
}

/// The VMM with its host-side settings and event monitor.
fn setup(args: &RunArgs, kvm_pvm_loaded: bool) -> anyhow::Result<Arc<Vmm>> {
    let host = args.host_settings(kvm_pvm_loaded)?;
    let events = match &args.event_monitor {
        Some(spec) => EventMonitor::open(spec)?,
        None => EventMonitor::disabled(),
    };
    let settings = VmmSettings {
        kvm_path: host.kvm_path,
        cpu_profile: host.cpu_profile,
        serial_log: args.serial_log.clone(),
        seccomp: host.seccomp,
        on_reboot: args.on_reboot,
        exit_when_guest_ends: true,
    };
    Ok(Vmm::new(settings, events))
}
