//! KVM tests of the VM's metrics and teardown through the vmm-core library, on the tiny
//! virtio-blk guest: exits and disk requests are counted and readable from another thread, and
//! a VM dropped while the guest holds an unflushed write tears down cleanly with the write in
//! the file and every disk flushed.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kvm_available, tiny_guest};
use devices::virtio::block::{BlockConfig, Engine};
use vmm_core::{CpuProfile, Outcome, VmConfig, VmMetrics, build_vm};

const PATTERN: &[u8; 16] = b"rvmm-tiny-write!";

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
    fn wait_for(&self, line: &str) {
        let start = Instant::now();
        while !String::from_utf8_lossy(&self.0.lock().unwrap()).contains(line) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "guest never printed {line:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

struct Disk(PathBuf);

impl Disk {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("rvmm-metrics-{}-{name}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        Self(path)
    }

    fn sector(&self, n: usize) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()[n * 512..(n + 1) * 512].to_vec()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config(disk: &Disk, engine: Engine, cmdline: &str) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_bytes: 64 << 20,
        kernel: tiny_guest("virtio-blk"),
        initrd: None,
        cmdline: cmdline.into(),
        cpu_profile: CpuProfile::detect(),
        kvm_path: "/dev/kvm".into(),
        rng: false,
        disks: vec![BlockConfig {
            path: disk.0.clone(),
            readonly: false,
            id: Some("tiny".into()),
            engine,
        }],
        nets: Vec::new(),
        seccomp: true,
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
        let disk = Disk::new(&format!("{engine:?}"));
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
        let disk = Disk::new(&format!("hold-{engine:?}"));
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
