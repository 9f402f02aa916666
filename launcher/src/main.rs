//! `rvmm`: boots a guest on KVM and runs it until it stops.
//!
//! Exit codes: 0 the guest powered off or reset, 1 VMM error, 2 bad configuration,
//! 3 guest crash.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vmm_core::boot::BootError;
use vmm_core::cpuid::KVM_PVM_MODULE;
use vmm_core::{BuildError, Outcome, VmConfig};

use launcher::cli::{Cli, Command, RunArgs};
use launcher::console::Console;
use launcher::shutdown::ShutdownSignals;

const EXIT_VMM_ERROR: u8 = 1;
const EXIT_BAD_CONFIG: u8 = 2;
const EXIT_GUEST_CRASH: u8 = 3;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(&args),
    }
}

fn fail(code: u8, err: &anyhow::Error) -> ExitCode {
    // The whole cause chain, once, on one line.
    eprintln!("rvmm: {err:#}");
    ExitCode::from(code)
}

/// Configuration mistakes (exit 2) versus failures of the VMM or host (exit 1).
fn build_error_code(err: &BuildError) -> u8 {
    match err {
        BuildError::VcpuCount(_)
        | BuildError::Memory(_)
        | BuildError::Disk { .. }
        | BuildError::Net { .. } => EXIT_BAD_CONFIG,
        BuildError::Boot(
            BootError::ReadKernel { .. }
            | BootError::NotAKernel { .. }
            | BootError::LoadKernel { .. }
            | BootError::ReadInitrd { .. }
            | BootError::InitrdTooLarge { .. }
            | BootError::Cmdline(_),
        ) => EXIT_BAD_CONFIG,
        _ => EXIT_VMM_ERROR,
    }
}

fn run(args: &RunArgs) -> ExitCode {
    let signals = match ShutdownSignals::block() {
        Ok(signals) => signals,
        Err(e) => {
            return fail(
                EXIT_VMM_ERROR,
                &anyhow::Error::new(e).context("Cannot block signals"),
            );
        }
    };
    let (config, serial_mode) = match args.to_config(Path::new(KVM_PVM_MODULE).exists()) {
        Ok(parsed) => parsed,
        Err(e) => return fail(EXIT_BAD_CONFIG, &e),
    };
    let mut console = match Console::open(&serial_mode, args.serial_log.as_deref()) {
        Ok(console) => console,
        Err(e) => return fail(EXIT_BAD_CONFIG, &e),
    };
    let grace = Duration::from_secs(args.grace_period_seconds);
    let code = boot(&config, &mut console, signals, grace);
    console.close();
    code
}

fn boot(
    config: &VmConfig,
    console: &mut Console,
    signals: ShutdownSignals,
    grace: Duration,
) -> ExitCode {
    log::info!(
        "Booting {} with {} vCPU(s), {} MiB, CPU profile {}",
        config.kernel.display(),
        config.vcpus,
        config.memory_bytes >> 20,
        config.cpu_profile.name()
    );
    let output = std::mem::replace(&mut console.output, Box::new(std::io::sink()));
    let vm = match vmm_core::build_vm(config, output) {
        Ok(vm) => vm,
        Err(e) => {
            let code = build_error_code(&e);
            return fail(code, &anyhow::Error::new(e));
        }
    };
    console.start_input(vm.serial());
    let running = match vm.start() {
        Ok(running) => running,
        Err(e) => return fail(EXIT_VMM_ERROR, &anyhow::Error::new(e)),
    };
    if let Err(e) = signals.handle(running.handle(), grace) {
        log::error!("Shutdown signals will not be handled: {e}");
    }
    let reason = running.wait();
    match reason.outcome() {
        Outcome::Clean => {
            log::info!("{reason}");
            ExitCode::SUCCESS
        }
        Outcome::GuestCrash => {
            eprintln!("rvmm: {reason}");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        Outcome::VmmError => {
            eprintln!("rvmm: {reason}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}
