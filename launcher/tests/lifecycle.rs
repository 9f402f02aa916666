//! KVM tests of the VM lifecycle through the vmm-core library: pause takes every vCPU out of
//! the guest, resume lets it go on, stop ends it, on a guest that never stops by itself.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kvm_available, tiny_guest};
use vmm_core::{CpuProfile, RunState, StopReason, VmConfig, build_vm};

#[derive(Clone, Default)]
struct SharedConsole(Arc<Mutex<Vec<u8>>>);

impl Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedConsole {
    fn ticks(&self) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.starts_with("tick: "))
            .count()
    }

    fn wait_for_ticks(&self, at_least: usize) {
        let start = Instant::now();
        while self.ticks() < at_least {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "guest made no progress"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn ticker_config(vcpus: u8) -> VmConfig {
    VmConfig {
        vcpus,
        memory_bytes: 64 << 20,
        kernel: tiny_guest("ticker"),
        initrd: None,
        cmdline: String::new(),
        cpu_profile: CpuProfile::detect(),
        kvm_path: "/dev/kvm".into(),
        rng: false,
        disks: Vec::new(),
        nets: Vec::new(),
        // The vCPUs run under their filter here too: pause, resume and stop must not need
        // anything outside it.
        seccomp: true,
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
    console.wait_for_ticks(2);

    assert!(running.pause());
    assert_eq!(running.state(), RunState::Paused);
    let frozen = console.ticks();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(console.ticks(), frozen, "guest ran while paused");

    assert!(running.resume());
    assert_eq!(running.state(), RunState::Running);
    console.wait_for_ticks(frozen + 2);

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
    console.wait_for_ticks(1);
    assert!(running.pause());
    running.stop();
    assert!(!running.resume(), "a stopping VM cannot resume");
    assert_eq!(running.wait(), StopReason::Requested);
}
