//! KVM tests: `rvmm` boots the tiny freestanding guests of guest-images/tiny.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{kvm_available, lines, run_rvmm, tiny_guest};

const TIMEOUT: Duration = Duration::from_secs(120);

fn boot(guest: &str, extra: &[&str]) -> std::process::Output {
    let kernel = tiny_guest(guest);
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
    ];
    args.extend_from_slice(extra);
    run_rvmm(&args, TIMEOUT)
}

#[test]
fn kvm_hello_guest_prints_on_serial_and_its_i8042_reset_exits_zero() {
    if !kvm_available("hello") {
        return;
    }
    let out = boot("hello", &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(lines(&out), vec!["rvmm-tiny hello: guest is alive"]);
}

fn expected_e820(memory_mib: u64) -> Vec<String> {
    let mib = 1u64 << 20;
    let low_end = (memory_mib * mib).min(3 << 30);
    let mut map = vec![
        (0, 0x9fc00, 1),
        (0x9fc00, 0x60400, 2),
        (mib, low_end - mib, 1),
    ];
    if memory_mib * mib > low_end {
        map.push((4 << 30, memory_mib * mib - low_end, 1));
    }
    map.into_iter()
        .map(|(a, s, t)| format!("e820: addr={a:#018x} size={s:#018x} type={t}"))
        .collect()
}

#[test]
fn kvm_bootinfo_guest_sees_the_configured_command_line_and_e820_map() {
    if !kvm_available("bootinfo") {
        return;
    }
    for memory_mib in [64u64, 3584] {
        let kernel = tiny_guest("bootinfo");
        let memory = format!("{memory_mib}M");
        let cmdline = "console=ttyS0 rvmm.test=bootinfo quiet";
        let out = run_rvmm(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                &memory,
                "--cmdline",
                cmdline,
            ],
            TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let mut expected = vec![format!("cmdline: {cmdline}")];
        expected.extend(expected_e820(memory_mib));
        expected.push("bootinfo: done".into());
        assert_eq!(lines(&out), expected, "{memory_mib} MiB");
    }
}

#[test]
fn kvm_smp_guest_every_vcpu_reports_its_own_apic_id() {
    if !kvm_available("smp") {
        return;
    }
    let out = boot("smp", &["--vcpus", "4"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = lines(&out);
    assert!(lines.contains(&"mptable: cpus=4".to_string()), "{lines:?}");
    assert!(lines.contains(&"mptable: bsp=0".to_string()), "{lines:?}");
    assert!(
        lines.contains(&"cpu: apic_id=0 bsp".to_string()),
        "{lines:?}"
    );
    let aps: BTreeSet<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("cpu: apic_id="))
        .filter(|id| !id.ends_with("bsp"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        aps,
        BTreeSet::from(["1".into(), "2".into(), "3".into()]),
        "{lines:?}"
    );
    assert_eq!(lines.last().unwrap(), "smp: 4 of 4 cpus up");
}

#[test]
fn kvm_triple_faulting_guest_exits_nonzero_naming_the_fault_and_registers() {
    if !kvm_available("triple") {
        return;
    }
    let out = boot("triple", &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(lines(&out), vec!["triple: about to triple-fault"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("triple fault on vCPU 0"), "{stderr}");
    for reg in ["rip=0x", "cr0=0x", "cr3=0x", "cr4=0x", "efer=0x"] {
        assert!(stderr.contains(reg), "{reg} missing: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn kvm_unclaimed_ports_and_mmio_do_not_stop_the_guest() {
    if !kvm_available("bad-port") {
        return;
    }
    let out = boot("bad-port", &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = lines(&out);
    // Unclaimed reads float high: all ones at every width.
    assert!(
        lines.contains(
            &"bad-port: inb(0x5678)=0xff inw=0x000000000000ffff inl=0x00000000ffffffff".into()
        ),
        "{lines:?}"
    );
    assert_eq!(lines.last().unwrap(), "bad-port: survived");
}

#[test]
fn kvm_serial_file_mode_writes_the_console_to_the_file() {
    if !kvm_available("serial file") {
        return;
    }
    let path = std::env::temp_dir().join(format!("rvmm-serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let serial = format!("file={}", path.display());
    let out = boot("hello", &["--serial", &serial]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty());
    let logged = std::fs::read_to_string(&path).unwrap();
    assert_eq!(logged, "rvmm-tiny hello: guest is alive\n");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn kvm_forced_pvm_safe_and_host_profiles_both_boot_the_tiny_guest() {
    if !kvm_available("cpu profiles") {
        return;
    }
    for profile in ["pvm-safe", "host"] {
        let out = boot("hello", &["--cpu-profile", profile]);
        assert_eq!(out.status.code(), Some(0), "{profile}: {out:?}");
    }
}

#[test]
fn kvm_instruction_kvm_cannot_emulate_stops_with_internal_error_and_registers() {
    if !kvm_available("popcnt") {
        return;
    }
    let out = boot("popcnt", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // Guest code runs in KVM's emulator here, which has no popcnt.
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert_eq!(lines(&out), vec!["popcnt: executing"]);
        assert!(
            stderr.contains("KVM_EXIT_INTERNAL_ERROR (emulation failure"),
            "{stderr}"
        );
        assert!(stderr.contains("instruction bytes f3 48 0f b8"), "{stderr}");
        assert!(
            stderr.contains("rip=0x") && stderr.contains("efer=0x"),
            "{stderr}"
        );
    } else {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(lines(&out), vec!["popcnt: executing", "popcnt: result 8"]);
    }
}

/// The `cpuid:` line for `leaf` as (eax, ebx, ecx, edx).
fn cpuid_line(lines: &[String], leaf: &str) -> [u64; 4] {
    let line = lines
        .iter()
        .find(|l| l.starts_with(&format!("cpuid: {leaf} ")))
        .unwrap_or_else(|| panic!("no {leaf} line in {lines:?}"));
    let mut regs = [0u64; 4];
    for (reg, field) in regs.iter_mut().zip(line.split_whitespace().skip(2)) {
        let hex = field.split_once("=0x").unwrap().1;
        *reg = u64::from_str_radix(hex, 16).unwrap();
    }
    regs
}

#[test]
fn kvm_pvm_safe_profile_hides_cx16_and_shows_the_vcpu_topology_to_the_guest() {
    if !kvm_available("cpuid") {
        return;
    }
    let out = boot("cpuid", &["--cpu-profile", "pvm-safe"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = lines(&out);
    let [_, ebx, ecx, _] = cpuid_line(&lines, "leaf1");
    // cmpxchg16b is what the emulator fails on first; its bit must be gone.
    assert_eq!(ecx & (1 << 13), 0, "cx16 visible: {ecx:#x}");
    assert_eq!(ebx >> 24, 0, "initial APIC ID of vCPU 0");
    assert_eq!((ebx >> 16) & 0xff, 1, "one logical processor");
    let [_, ebx, _, _] = cpuid_line(&lines, "leaf80000008");
    assert_ne!(ebx & (1 << 2), 0, "XSAVEERPTR hidden: {ebx:#x}");
}
