//! Boot configuration text from untrusted disks: GRUB's grub.cfg (with grubenv through
//! `load_env`), BLS entry files and extlinux.conf, as `disk_boot` parses them.
//!
//! The first byte picks the parser; the rest is the file (for BLS, several entry files
//! separated by NUL bytes, the first line of each its file name).
//!
//! Oracles: nothing panics or hangs; GRUB's chosen entry is one of the menu's; BLS choice is
//! one of the entries and sorting is a total order (sorting twice changes nothing).

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use rvmm_core::disk_boot::{bls, grub};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match kind % 3 {
        0 => {
            let env = text.clone();
            let menu = grub::parse(&text, &mut |_| grub::parse_grubenv(&env));
            if let Some((_, Some(entry))) = grub::default_boot(&menu) {
                assert!(!entry.kernel.is_empty(), "an entry without a kernel path");
            }
        }
        1 => {
            let mut entries: Vec<bls::BlsEntry> = text
                .split('\0')
                .map(|file| {
                    let (name, body) = file.split_once('\n').unwrap_or((file, ""));
                    bls::parse_entry(name, body)
                })
                .collect();
            bls::sort(&mut entries);
            let once: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
            bls::sort(&mut entries);
            let twice: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
            assert_eq!(once, twice, "sorting BLS entries is not stable");
            let default = entries.last().map(|e| {
                let half: String = e.id.chars().take(e.id.chars().count() / 2).collect();
                format!("{half}*")
            });
            if let Some(chosen) = bls::choose(&entries, default.as_deref()) {
                assert!(entries.iter().any(|e| e.id == chosen.id));
                let _ = bls::to_boot(chosen, &HashMap::new());
            }
        }
        _ => {
            let _ = bls::extlinux(&text);
        }
    }
});
