//! KVM tests of the VM lifecycle through the vmm-core library: pause takes every vCPU out of
//! the guest, resume lets it go on, stop ends it, on a guest that never stops by itself.

mod common;

use std::time::Duration;

use common::fixtures::SharedConsole;
use common::{kvm_available, tiny_guest};
use rvmm_core::{CpuProfile, RunState, StopReason, Transport, VmConfig, build_vm};

fn ticks(console: &SharedConsole) -> usize {
    count_ticks(&console.text())
}

fn count_ticks(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("tick: ")).count()
}

fn wait_for_ticks(console: &SharedConsole, at_least: usize) {
    console.wait_until("made progress", |text| count_ticks(text) >= at_least);
}

fn ticker_config(vcpus: u8) -> VmConfig {
    VmConfig {
        vcpus,
        memory_bytes: 64 << 20,
        boot: rvmm_core::BootSource::kernel(tiny_guest("ticker")),
        cmdline: String::new(),
        cpu_profile: CpuProfile::detect(),
        kvm_path: "/dev/kvm".into(),
        rng: false,
        disks: Vec::new(),
        nets: Vec::new(),
        // The vCPUs run under their filter here too: pause, resume and stop must not need
        // anything outside it.
        seccomp: true,
        transport: Transport::Mmio,
        acpi: true,
    }
}

#[test]
fn kvm_pause_freezes_the_guest_resume_continues_and_stop_ends_it() {
    if !kvm_available("lifecycle") {
        return;
    }
    let console = SharedConsole::default();
    // Two vCPUs: the second idles in wait-for-SIPI, inside KVM_RUN, and must still be kicked.
    let vm = build_vm(&ticker_config(2), Box::new(console.clone())).unwrap();
    let running = vm.start().unwrap();
    wait_for_ticks(&console, 2);

    assert!(running.pause());
    assert_eq!(running.state(), RunState::Paused);
    let frozen = ticks(&console);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(&console), frozen, "guest ran while paused");

    assert!(running.resume());
    assert_eq!(running.state(), RunState::Running);
    wait_for_ticks(&console, frozen + 2);

    running.stop();
    assert_eq!(running.wait(), StopReason::Requested);
}

#[test]
fn kvm_stop_while_paused_ends_the_vm() {
    if !kvm_available("stop while paused") {
        return;
    }
    let console = SharedConsole::default();
    let running = build_vm(&ticker_config(1), Box::new(console.clone()))
        .unwrap()
        .start()
        .unwrap();
    wait_for_ticks(&console, 1);
    assert!(running.pause());
    running.stop();
    assert!(!running.resume(), "a stopping VM cannot resume");
    assert_eq!(running.wait(), StopReason::Requested);
}
