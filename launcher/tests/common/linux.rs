//! The Linux test guest built by guest-images/build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The image directory (`RVMM_GUEST_IMAGE_DIR`), or None with a printed reason (a failure
/// under CI=true).
pub fn image_dir(test: &str) -> Option<PathBuf> {
    match std::env::var_os("RVMM_GUEST_IMAGE_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: RVMM_GUEST_IMAGE_DIR is not set; CI=true requires the Linux guest")
        }
        None => {
            eprintln!("SKIPPED {test}: RVMM_GUEST_IMAGE_DIR is not set (run guest-images/build)");
            None
        }
    }
}

/// `key=value` lines of the image's manifest.
pub fn manifest(dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join("manifest")).expect("read the image manifest");
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The guest's command line for this host (the PVM one where KVM emulates guest code).
pub fn base_cmdline(m: &BTreeMap<String, String>) -> String {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if pvm {
        m["cmdline"].clone()
    } else {
        m["cmdline_hw"].clone()
    }
}
