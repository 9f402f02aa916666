//! KVM tests of the embedder's devices added through `VmBuilder`, driven by the tiny guests'
//! freestanding virtio drivers (guest-images/tiny).

mod common;

use std::time::{Duration, Instant};

use common::{Captured, kvm_available, tiny_guest};
use rvmm_core::{BootSource, CustomDevice, CustomVirtioDevice, StopReason, Transport, VmBuilder};
use rvmm_devices::BusDevice;
use rvmm_devices::virtio::block::{Block, BlockConfig};
use rvmm_devices::virtio::rng::Rng;

#[test]
fn kvm_pci_guest_drives_an_embedder_virtio_device_on_pci() {
    if !kvm_available("embedder virtio-pci device") {
        return;
    }
    let serial = Captured::default();
    let vm = VmBuilder::new(BootSource::kernel(tiny_guest("pci")))
        .memory_mib(64)
        .cmdline("console=ttyS0")
        .transport(Transport::Pci)
        .acpi(true)
        .virtio_device(CustomVirtioDevice::new("embedder-rng", || Ok(Rng::new())))
        .build(Box::new(serial.clone()))
        .unwrap()
        .start()
        .unwrap();
    assert_eq!(vm.wait(), StopReason::Reset);
    let text = serial.text();
    assert!(
        text.contains("pci: 00:01.0 1af4:1044 class ff0000\n"),
        "{text}"
    );
    assert!(
        text.contains("pci: entropy through intx, isr 0x1\n"),
        "{text}"
    );
    assert!(text.ends_with("pci: done\n"), "{text}");
}

#[test]
fn kvm_mmio_guest_drives_an_embedder_virtio_device_after_rvmms_own() {
    if !kvm_available("embedder virtio-mmio device") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("rvmm-embedder-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("embedder.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let serial = Captured::default();
    let config = BlockConfig {
        path: path.clone(),
        ..Default::default()
    };
    // rvmm's entropy device takes the first slot, the embedder's disk the second.
    let builder = VmBuilder::new(BootSource::kernel(tiny_guest("virtio-blk")))
        .memory_mib(64)
        .cmdline("console=ttyS0")
        .rng(true)
        .virtio_device(CustomVirtioDevice::new("embedder-disk", move || {
            Ok(Block::new(config.clone())?)
        }));
    // Built twice, as a reboot would: the factory makes a fresh device each time.
    for _ in 0..2 {
        let vm = builder
            .build(Box::new(serial.clone()))
            .unwrap()
            .start()
            .unwrap();
        assert_eq!(vm.wait(), StopReason::Reset);
    }
    let text = serial.text();
    assert_eq!(
        text.matches("virtio-blk: device at 0xd0001000 irq 6\n")
            .count(),
        2,
        "{text}"
    );
    assert_eq!(text.matches("virtio-blk: done\n").count(), 2, "{text}");
    assert_eq!(
        &std::fs::read(&path).unwrap()[512..528],
        b"rvmm-tiny-write!"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

struct Silent;

impl BusDevice for Silent {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[test]
fn kvm_a_vm_with_embedder_devices_refuses_a_snapshot_naming_the_device() {
    if !kvm_available("embedder device snapshot") {
        return;
    }
    let serial = Captured::default();
    let vm = VmBuilder::new(BootSource::kernel(tiny_guest("ticker")))
        .memory_mib(64)
        .device(CustomDevice::mmio("silent", 0xd100_0000, 0x1000, |_| Ok(Silent)).with_interrupt())
        .build(Box::new(serial.clone()))
        .unwrap()
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while serial.text().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vm.pause());
    let dir = std::env::temp_dir().join(format!("rvmm-embedder-snap-{}", std::process::id()));
    let err = vm.snapshot(&dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Device silent is the embedder's: a snapshot cannot hold its state"
    );
    assert!(!dir.join("state.bin").exists());
    vm.stop();
    assert_eq!(vm.wait(), StopReason::Requested);
    let _ = std::fs::remove_dir_all(&dir);
}
