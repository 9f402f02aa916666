//! KVM tests of the VM's metrics and teardown through the vmm-core library, on the tiny
//! virtio-blk guest: exits and disk requests are counted and readable from another thread, and
//! a VM dropped while the guest holds an unflushed write tears down cleanly with the write in
//! the file and every disk flushed.

mod common;

use common::fixtures::{SharedConsole, TempDisk};
use common::{kvm_available, tiny_guest};
use rvmm_core::{CpuProfile, Outcome, Transport, VmConfig, VmMetrics, build_vm};
use rvmm_devices::virtio::block::{BlockConfig, Engine};

const PATTERN: &[u8; 16] = b"rvmm-tiny-write!";

/// A 1 MiB disk of zeros.
fn zero_disk(name: &str) -> TempDisk {
    TempDisk::new(&format!("metrics-{name}"), &[0u8; 1 << 20])
}

fn config(disk: &TempDisk, engine: Engine, cmdline: &str) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_bytes: 64 << 20,
        boot: rvmm_core::BootSource::kernel(tiny_guest("virtio-blk")),
        cmdline: cmdline.into(),
        cpu_profile: CpuProfile::detect(),
        kvm_path: "/dev/kvm".into(),
        rng: false,
        disks: vec![BlockConfig {
            path: disk.path().to_owned(),
            readonly: false,
            id: Some("tiny".into()),
            engine,
            format: None,
        }],
        nets: Vec::new(),
        seccomp: true,
        transport: Transport::Mmio,
        // The tiny guest finds its device on the command line.
        acpi: false,
    }
}

fn exits(m: &VmMetrics, reason: &str) -> u64 {
    m.exits.iter().find(|(r, _)| *r == reason).unwrap().1
}

#[test]
fn kvm_metrics_count_the_guests_exits_and_disk_requests() {
    if !kvm_available("vm metrics") {
        return;
    }
    for engine in [Engine::Sync, Engine::IoUring] {
        let disk = zero_disk(&format!("{engine:?}"));
        let console = SharedConsole::default();
        let vm = build_vm(&config(&disk, engine, ""), Box::new(console.clone())).unwrap();
        let metrics = vm.metrics_handle();
        let running = vm.start().unwrap();
        let handle = running.handle();
        let reason = running.wait();
        assert_eq!(reason.outcome(), Outcome::Clean, "{engine:?}: {reason}");
        console.wait_for("virtio-blk: done");

        let m = metrics.snapshot();
        assert_eq!(m, handle.metrics(), "{engine:?}");
        assert_eq!(m.memory_bytes, 64 << 20);
        // Serial output is port I/O; the driver programs virtio-mmio registers.
        assert!(exits(&m, "io_out") > 0, "{engine:?}: {m:?}");
        assert!(exits(&m, "mmio_read") > 0, "{engine:?}: {m:?}");
        assert!(exits(&m, "mmio_write") > 0, "{engine:?}: {m:?}");
        let [d] = m.disks.as_slice() else {
            panic!("{engine:?}: one disk expected: {m:?}");
        };
        assert_eq!(d.id, "tiny");
        // Sector 0, the readback; the pattern; the flush; the out-of-range write.
        assert_eq!((d.reads, d.read_bytes), (2, 1024), "{engine:?}: {d:?}");
        assert_eq!((d.writes, d.write_bytes), (1, 512), "{engine:?}: {d:?}");
        assert_eq!(d.flushes, 1, "{engine:?}: {d:?}");
        assert_eq!(d.errors, 1, "{engine:?}: {d:?}");
        assert!(m.nets.is_empty());
        handle.flush_disks().unwrap();
    }
}

#[test]
fn kvm_dropping_the_vm_during_an_unflushed_write_tears_it_down_with_the_write_in_the_file() {
    if !kvm_available("vm teardown flush") {
        return;
    }
    for engine in [Engine::Sync, Engine::IoUring] {
        let disk = zero_disk(&format!("hold-{engine:?}"));
        let console = SharedConsole::default();
        let vm = build_vm(
            &config(&disk, engine, "rvmm.hold=1"),
            Box::new(console.clone()),
        )
        .unwrap();
        let running = vm.start().unwrap();
        console.wait_for("virtio-blk: holding");
        // Another thread (an API server) reads the metrics while the VM runs.
        let handle = running.handle();
        let reader = handle.clone();
        let d = std::thread::spawn(move || reader.metrics().disks[0].clone())
            .join()
            .unwrap();
        assert_eq!((d.writes, d.flushes), (1, 0), "{engine:?}: {d:?}");
        // No wait(): dropping stops the vCPUs, then the device worker drains and flushes.
        drop(running);
        assert_eq!(disk.sector(1), PATTERN.repeat(32), "{engine:?}");
        handle.flush_disks().unwrap();
        assert_eq!(handle.metrics().disks[0].flushes, 0, "guest flushes only");
    }
}
