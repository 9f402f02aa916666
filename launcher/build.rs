//! Generates the KubeVirt handler-launcher gRPC code (tonic + prost) from `proto/`.
//!
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine needs nothing
//! beyond cargo.

use std::error::Error;

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
    Ok(())
}
