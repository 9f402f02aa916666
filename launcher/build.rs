//! Generates the KubeVirt handler-launcher gRPC code (tonic + prost) from `proto/`.
//!
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine needs nothing
//! beyond cargo.

use std::env;
use std::error::Error;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/cmd/info/info.proto",
    "proto/cmd/v1/cmd.proto",
    "proto/notify/info/info.proto",
    "proto/notify/v1/notify.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Services answer UNIMPLEMENTED for every RPC rvmm does not override.
        .generate_default_stubs(true)
        .compile_with_config(config, PROTOS, &["proto"])?;
    startup_code_first()
}

/// Places the functions `rvmm run` executes up to the guest's first serial line, listed by
/// scripts/startup-symbols, first in `.text`: packed together, the kernel's 64 KiB fault-around
/// maps ~0.4 MiB of rvmm's code at start-up instead of ~1.6 MiB (benches/boot-time, RSS at the
/// first line). rust-lld is the default linker of this target only. Names that no longer exist
/// (a stale list) are skipped, which costs RSS, not correctness.
fn startup_code_first() -> Result<(), Box<dyn Error>> {
    if env::var("TARGET")? != "x86_64-unknown-linux-gnu" {
        return Ok(());
    }
    let list =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../scripts/startup-symbols.txt");
    println!("cargo::rerun-if-changed={}", list.display());
    if !list.exists() {
        return Ok(());
    }
    println!(
        "cargo::rustc-link-arg-bin=rvmm=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo::rustc-link-arg-bin=rvmm=-Wl,--no-warn-symbol-ordering");
    // Relative relocations packed (DT_RELR, glibc 2.36+): ~100 KiB of RELA entries that the
    // dynamic loader reads, page by page, before main shrink to a few KiB.
    println!("cargo::rustc-link-arg-bin=rvmm=-Wl,-z,pack-relative-relocs");
    Ok(())
}
