//! Boots a kernel with its serial console on stdout and exits with the guest.
//!
//! ```text
//! cargo run --release --example boot -- KERNEL [CMDLINE]
//! ```

use std::process::ExitCode;

use rvmm_core::{BootSource, Outcome, VmBuilder};

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let kernel = args.next().ok_or("usage: boot KERNEL [CMDLINE]")?;
    let mut builder = VmBuilder::new(BootSource::kernel(kernel)).memory_mib(256);
    if let Some(cmdline) = args.next() {
        builder = builder.cmdline(cmdline);
    }
    let vm = builder.build(Box::new(std::io::stdout()))?.start()?;
    let reason = vm.wait();
    eprintln!("{reason}");
    Ok(match reason.outcome() {
        Outcome::Clean => ExitCode::SUCCESS,
        Outcome::GuestCrash | Outcome::VmmError => ExitCode::FAILURE,
    })
}
