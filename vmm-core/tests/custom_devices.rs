//! KVM tests of the embedder's devices added through `VmBuilder`, driven by the tiny guests'
//! freestanding virtio drivers (guest-images/tiny).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{SharedConsole, kvm_available, tiny_guest};
use rvmm_core::{BootSource, CustomDevice, CustomVirtioDevice, StopReason, Transport, VmBuilder};
use rvmm_devices::BusDevice;
use rvmm_devices::virtio::block::{Block, BlockConfig};
use rvmm_devices::virtio::rng::Rng;

/// Runs the `pci` tiny guest with `device` as the VM's one virtio-pci function; its serial
/// output once it has reset.
fn run_pci_guest(device: CustomVirtioDevice) -> String {
    let serial = SharedConsole::default();
    let vm = VmBuilder::new(BootSource::kernel(tiny_guest("pci")))
        .memory_mib(64)
        .cmdline("console=ttyS0")
        .transport(Transport::Pci)
        .acpi(true)
        .virtio_device(device)
        .build(Box::new(serial.clone()))
        .unwrap()
        .start()
        .unwrap();
    assert_eq!(vm.wait(), StopReason::Reset);
    let text = serial.text();
    for line in [
        "pci: 00:01.0 1af4:1044 class ff0000\n",
        "pci: entropy through intx, isr 0x1\n",
        "pci: msix vector 0x41 pending in the local APIC\n",
        "pci: reset and brought up again\n",
    ] {
        assert!(text.contains(line), "{text}");
    }
    assert!(text.ends_with("pci: done\n"), "{text}");
    text
}

#[test]
fn kvm_pci_guest_drives_an_embedder_virtio_device_on_pci() {
    if !kvm_available("embedder virtio-pci device") {
        return;
    }
    run_pci_guest(CustomVirtioDevice::new("embedder-rng", || Ok(Rng::new())));
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
    let serial = SharedConsole::default();
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
    let serial = SharedConsole::default();
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

/// An embedder's virtio entropy device written against the public API only: it serves its
/// queue on a thread of its own, started by the factory (on the thread building the VM, which
/// the vCPUs' seccomp filter does not confine), and fills the guest's buffers with a counting
/// pattern.
mod pattern_rng {
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};

    use rvmm_devices::virtio::{
        ActivateError, ActiveQueue, GuestMemoryMmap, InterruptKind, TYPE_RNG, VIRTIO_F_VERSION_1,
        VirtioDevice, VirtioInterrupt,
    };
    use rvmm_devices::virtio_queue::QueueT;
    use rvmm_devices::vm_memory::Bytes;
    use rvmm_devices::vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    /// Largest buffer served, whatever length the guest claims.
    const MAX_BUFFER: u32 = 4096;

    enum Control {
        Activate(GuestMemoryMmap, Arc<dyn VirtioInterrupt>, ActiveQueue),
        Reset,
    }

    pub struct PatternRng {
        control: Sender<Control>,
    }

    impl PatternRng {
        /// Starts the device's thread; `served` counts the requests it completes.
        pub fn start(served: Arc<AtomicUsize>) -> std::io::Result<Self> {
            let (control, requests) = channel();
            std::thread::Builder::new()
                .name("pattern-rng".into())
                .spawn(move || serve(&requests, &served))?;
            Ok(Self { control })
        }
    }

    /// Waits for an activation, then serves the queue whenever the driver notifies it, until
    /// a reset (back to waiting) or the device is dropped (the end).
    fn serve(control: &Receiver<Control>, served: &AtomicUsize) {
        let mut active = None;
        loop {
            let message = match active {
                None => control.recv().ok(),
                Some(_) => match control.try_recv() {
                    Ok(message) => Some(message),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                },
            };
            match message {
                Some(Control::Activate(mem, interrupt, queue)) => {
                    let epoll = Epoll::new().unwrap();
                    let event = EpollEvent::new(EventSet::IN, 0);
                    epoll
                        .ctl(ControlOperation::Add, queue.notify.as_raw_fd(), event)
                        .unwrap();
                    active = Some((mem, interrupt, queue, epoll));
                }
                Some(Control::Reset) => active = None,
                None if active.is_none() => return,
                None => {}
            }
            if let Some((mem, interrupt, queue, epoll)) = &mut active {
                let mut events = [EpollEvent::default()];
                if epoll.wait(20, &mut events).unwrap_or(0) > 0 {
                    let _ = queue.notify.read();
                }
                serve_queue(mem, interrupt.as_ref(), queue, served);
            }
        }
    }

    fn serve_queue(
        mem: &GuestMemoryMmap,
        interrupt: &dyn VirtioInterrupt,
        active: &mut ActiveQueue,
        served: &AtomicUsize,
    ) {
        let mut used = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written = 0;
            for desc in chain.filter(|d| d.is_write_only()) {
                let len = desc.len().min(MAX_BUFFER);
                let pattern: Vec<u8> = (0..=u8::MAX).cycle().take(len as usize).collect();
                if mem.write_slice(&pattern, desc.addr()).is_ok() {
                    written += len;
                }
            }
            if active.queue.add_used(mem, head, written).is_err() {
                interrupt.signal_needs_reset();
                return;
            }
            served.fetch_add(1, Ordering::Relaxed);
            used = true;
        }
        if used {
            let _ = interrupt.trigger(InterruptKind::Queue(0));
        }
    }

    impl VirtioDevice for PatternRng {
        fn device_type(&self) -> u32 {
            TYPE_RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn ack_features(&mut self, _features: u64) {}
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            mem: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            let got = queues.len();
            let [queue]: [ActiveQueue; 1] = queues
                .try_into()
                .map_err(|_| ActivateError::QueueCount { expected: 1, got })?;
            self.control
                .send(Control::Activate(mem, interrupt, queue))
                .map_err(|_| ActivateError::Worker(std::io::ErrorKind::BrokenPipe.into()))
        }
        fn reset(&mut self) {
            let _ = self.control.send(Control::Reset);
        }
    }
}

#[test]
fn kvm_pci_guest_drives_an_embedder_written_virtio_device() {
    if !kvm_available("embedder-written virtio device") {
        return;
    }
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    run_pci_guest(CustomVirtioDevice::new("pattern-rng", move || {
        Ok(pattern_rng::PatternRng::start(counter.clone())?)
    }));
    assert!(served.load(Ordering::Relaxed) >= 2, "{served:?}");
}
