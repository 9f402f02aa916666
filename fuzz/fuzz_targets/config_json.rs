//! `rvmm run --config` files and `vm.create` bodies: arbitrary text through
//! `VmConfigFile::from_json`, and every file that parses through `validate` (KVM path
//! `/nonexistent/kvm`, never opened).
//!
//! Oracles: nothing panics; a parsed file serialised with serde_json parses again to an equal
//! file; every error's Display is `PATH: MESSAGE` with a non-empty message and a path that is
//! `.` (the top level), a field of the file (`cpus.boot_vcpus`, `disks[1].path`, ...) or the
//! unknown key being refused (empty only for the key `""`; `?` for a key that is no string,
//! `[N]` for a struct written as an array); a
//! file that validates becomes a VM configuration with its vCPUs, memory, devices and KVM
//! path, whose file form validates to the same VM again.

#![no_main]

use std::path::Path;

use rvmm_launcher::config::{ConfigError, HostSettings, Terms, VmConfigFile};
use libfuzzer_sys::fuzz_target;
use rvmm_core::{BootSource, CpuProfile};

const KVM: &str = "/nonexistent/kvm";

/// The file's top-level fields: every validation error's path starts with one.
const FIELDS: &[&str] = &[
    "cpus",
    "memory",
    "payload",
    "disks",
    "net",
    "rng",
    "serial",
    "transport",
    "acpi",
];

/// `disks[12].path` -> `disks`.
fn top_level(path: &str) -> &str {
    path.split(['.', '[']).next().unwrap_or_default()
}

fn check_error(err: &ConfigError) {
    let text = err.to_string();
    match err {
        ConfigError::Parse { field, message } => {
            let path = &field.to_string();
            assert!(!message.is_empty(), "parse error without a message: {text}");
            // The path ends with the key being read, so an unknown key `""` at the top level
            // is the one empty path; a path outside the file's fields is an unknown key, `?`
            // (serde_path_to_error's mark for a key that is not even a string) or `[N]` (serde
            // also takes a struct as an array of its fields in order).
            let unknown = message.starts_with("unknown field");
            assert!(
                !path.is_empty() || message.starts_with("unknown field ``"),
                "parse error without a path: {text}"
            );
            assert!(
                path == "."
                    || path.starts_with(['?', '['])
                    || FIELDS.contains(&top_level(path))
                    || unknown,
                "parse error path outside the file's fields: {text}"
            );
            assert_eq!(text, format!("{path}: {message}"));
        }
        ConfigError::Invalid { field, reason } => {
            let json = reason.render(Terms::Json);
            assert!(
                field.top_level().is_some_and(|top| FIELDS.contains(&top)),
                "validation error on no field of the file: {text}"
            );
            assert!(
                !json.is_empty(),
                "validation error without a reason: {text}"
            );
            assert_eq!(text, format!("{field}: {json}"));
            // The flags' rendering names the same field, never an empty one.
            let flags = err.render(Terms::Flags);
            assert!(
                flags.ends_with(&format!(": {}", reason.render(Terms::Flags))),
                "{flags}"
            );
        }
        ConfigError::Read { .. } | ConfigError::NotAFile(_) | ConfigError::TooLarge(_) => {
            panic!("from_json/validate read a file: {text}")
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = match VmConfigFile::from_json(text) {
        Ok(file) => file,
        Err(e) => return check_error(&e),
    };

    let json = serde_json::to_string(&file).expect("a parsed file serialises");
    let again = VmConfigFile::from_json(&json)
        .unwrap_or_else(|e| panic!("re-serialised file does not parse: {e}\n{json}"));
    assert_eq!(file, again, "round trip changed the file:\n{json}");

    let host = HostSettings {
        kvm_path: KVM.into(),
        cpu_profile: CpuProfile::Host,
        seccomp: true,
    };
    match file.validate(&host) {
        Err(e) => check_error(&e),
        Ok(spec) => {
            let config = &spec.config;
            assert_eq!(config.vcpus, file.cpus.boot_vcpus);
            assert_eq!(config.memory_bytes, file.memory.size);
            match &config.boot {
                BootSource::Kernel { kernel, initrd } => {
                    assert_eq!(Some(kernel), file.payload.kernel.as_ref());
                    assert_eq!(initrd, &file.payload.initramfs);
                }
                BootSource::Disk { index } => {
                    assert!(file.payload.kernel.is_none());
                    assert!(*index < file.disks.len(), "boot disk {index} is no disk");
                }
            }
            assert_eq!(config.disks.len(), file.disks.len());
            assert_eq!(config.nets.len(), file.net.len());
            assert_eq!(config.rng, file.rng.is_some());
            assert_eq!(config.kvm_path, Path::new(KVM));
            if let Some(cmdline) = &file.payload.cmdline {
                assert_eq!(&config.cmdline, cmdline);
            }
            assert_eq!(spec.dhcp.len(), file.net.len());
            // The file form (vm.info, snapshots, migration) is the same VM again.
            let again = spec
                .to_file()
                .validate(&host)
                .unwrap_or_else(|e| panic!("the spec's file form does not validate: {e}"));
            assert_eq!(again, spec, "the spec's file form is another VM");
        }
    }
});
