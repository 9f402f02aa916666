//! Shared by vmm-core's KVM tests: KVM detection, the tiny test guests, the examples.
#![allow(dead_code)] // each test binary uses a different part

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

#[path = "../../../launcher/tests/common/fixtures.rs"]
mod fixtures;
#[path = "../../../launcher/tests/common/guests.rs"]
mod guests;

#[allow(unused_imports)] // each test binary uses a different part
pub use fixtures::SharedConsole;

#[allow(unused_imports)] // each test binary uses a different part
pub use guests::{kvm_available, tiny_guest};

/// The example `name`; the first call builds them all, in this test's profile.
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test binary>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        // The whole workspace, as `cargo test --workspace` resolves its features: after that
        // this build has nothing to do.
        cargo
            .args(["build", "--quiet", "--workspace", "--examples"])
            .arg("--target-dir")
            .arg(profile_dir.parent().unwrap());
        if profile_dir.ends_with("release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build --examples");
        assert!(status.success(), "building the examples failed");
        profile_dir.join("examples")
    });
    dir.join(name)
}
