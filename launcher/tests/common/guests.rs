//! KVM detection and the tiny test guests; included by vmm-core's tests too (`#[path]`), which
//! have no crate of test helpers to share with the launcher's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Whether tests that need /dev/kvm can run. Without it they skip with a printed reason, except
/// under CI=true, where a skipped VMM test would make a green run meaningless.
pub fn kvm_available(test: &str) -> bool {
    let reason = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => return true,
        Err(e) => format!("/dev/kvm cannot be opened: {e}"),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {reason}; CI=true requires KVM");
    }
    eprintln!("SKIPPED {test}: {reason}");
    false
}

/// Builds the tiny guests once per test binary and returns the path of `<name>.elf`.
pub fn tiny_guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let out = workspace().join("target").join("tiny-guests");
        let status = Command::new("bash")
            .arg(workspace().join("guest-images/tiny/build"))
            .arg(&out)
            .status()
            .expect("run guest-images/tiny/build");
        assert!(status.success(), "building the tiny guests failed");
        out
    });
    dir.join(format!("{name}.elf"))
}
