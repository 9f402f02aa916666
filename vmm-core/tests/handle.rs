//! KVM test of the running VM's handle through the public API: pause, snapshot, stop, then a
//! restore from the same builder that the guest goes on from.

mod common;

use std::time::{Duration, Instant};

use common::{SharedConsole, kvm_available, tiny_guest};
use rvmm_core::{BootSource, RunState, ShutdownReason, StopReason, VmBuilder, VmEvent};

/// The numbers of the `tick: <n>` lines the ticker guest printed.
fn ticks(console: &SharedConsole) -> Vec<u64> {
    let text = console.text();
    text.lines()
        .filter_map(|l| l.strip_prefix("tick: "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn wait_for_ticks(console: &SharedConsole, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ticks(console).len() < count {
        assert!(Instant::now() < deadline, "no progress: {}", console.text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kvm_a_builders_vm_pauses_snapshots_and_a_restore_goes_on_from_there_with_its_events() {
    if !kvm_available("VmBuilder snapshot and restore") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("rvmm-builder-restore-{}", std::process::id()));
    let builder = VmBuilder::new(BootSource::kernel(tiny_guest("ticker")))
        .vcpus(2)
        .memory_mib(64)
        .cmdline("");
    let first = SharedConsole::default();
    let vm = builder
        .build(Box::new(first.clone()))
        .unwrap()
        .start()
        .unwrap();
    wait_for_ticks(&first, 2);
    let handle = vm.handle();
    let events = handle.events();
    assert!(handle.pause());
    assert_eq!(events.try_recv(), Ok(VmEvent::Paused));
    assert_eq!(vm.state(), RunState::Paused);
    let info = handle.snapshot(&dir).unwrap();
    assert_eq!(info.memory_size, 64 << 20);
    assert_eq!(vm.metrics().memory_bytes, 64 << 20);
    let last = *ticks(&first).last().unwrap();
    handle.stop();
    assert_eq!(vm.wait(), StopReason::Requested);
    // The end comes once every vCPU has left, which wait() waited for.
    assert_eq!(
        events.try_recv(),
        Ok(VmEvent::Shutdown(ShutdownReason::Requested))
    );

    let second = SharedConsole::default();
    let restored = builder
        .restore(&dir, false, Box::new(second.clone()))
        .unwrap()
        .start()
        .unwrap();
    assert_eq!(restored.state(), RunState::Paused);
    let events = restored.handle().events();
    assert!(restored.resume());
    assert_eq!(events.try_recv(), Ok(VmEvent::Resumed));
    wait_for_ticks(&second, 1);
    let next = ticks(&second)[0];
    assert!(
        next > last,
        "the restored guest printed tick {next} after {last}"
    );
    restored.stop();
    assert_eq!(restored.wait(), StopReason::Requested);
    assert_eq!(
        events.try_recv(),
        Ok(VmEvent::Shutdown(ShutdownReason::Requested))
    );
    assert!(events.recv().is_err(), "the channel closes after the end");
    std::fs::remove_dir_all(&dir).unwrap();
}
