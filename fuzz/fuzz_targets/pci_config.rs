//! PCI configuration space through the root complex: accesses of any offset and width to ports
//! 0xCF8-0xCFF, the ECAM window and the BAR window, against vmm-core's PciRoot with its host
//! bridge and two virtio-rng functions, mixed with driver-like steps (BAR sizing with decoding
//! off, moving a BAR anywhere or back home, memory space on and off, MSI-X enable).
//!
//! Oracles: the host bridge's and the functions' IDs never change through either access path;
//! empty slots and other buses read as all ones; ioeventfd registrations stay consistent (no
//! address registered twice, no unregistration of one not registered, and at the end exactly
//! the notification addresses of the BARs that decode); once both BARs are back home with
//! memory space on, each function answers through the window.

#![no_main]

use std::collections::BTreeSet;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::BusDevice;
use rvmm_devices::pci::MalformedPciAccesses;
use rvmm_devices::pci::msix::MsiRouter;
use rvmm_devices::virtio::pci::{PciPlacement, VirtioPciTransport};
use rvmm_devices::virtio::rng::Rng;
use fuzz_common::*;
use libfuzzer_sys::fuzz_target;
use rvmm_core::pci::access::{PciConfigPorts, PciEcam, PciWindow};
use rvmm_core::pci::{IoEventRegistry, PciRoot};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const WINDOW: Range<u64> = 0xc000_0000..0xd000_0000;
const HOME: [u64; 2] = [0xc000_0000, 0xc000_8000];
const NOTIFY: u64 = 0x3000;

/// Oracle: registrations of one address never overlap, unregistrations match.
#[derive(Debug, Default)]
struct Registry(Mutex<BTreeSet<u64>>);

impl IoEventRegistry for Registry {
    fn register(&self, _event: &EventFd, addr: u64) -> io::Result<()> {
        assert!(
            self.0.lock().unwrap().insert(addr),
            "{addr:#x} registered twice"
        );
        Ok(())
    }

    fn unregister(&self, _event: &EventFd, addr: u64) -> io::Result<()> {
        assert!(
            self.0.lock().unwrap().remove(&addr),
            "{addr:#x} was not registered"
        );
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Ports 0xCF8 + offset.
    Port {
        offset: u8,
        width: u8,
        value: u32,
        write: bool,
    },
    /// A configuration dword of (device, register) through 0xCF8/0xCFC.
    Cf8 {
        device: u8,
        register: u8,
        value: u32,
        write: bool,
        bus: bool,
    },
    Ecam {
        offset: u32,
        width: u8,
        value: u32,
        write: bool,
    },
    Window {
        offset: u32,
        width: u8,
        value: u64,
        write: bool,
    },
    /// Linux's BAR sizing of function 1 or 2: decoding off, all ones, read, restore.
    SizeBar(bool),
    /// Function 1 or 2's BAR moved to `to` (rarely anywhere, mostly in the window).
    MoveBar {
        second: bool,
        to: u32,
        anywhere: bool,
    },
    /// Both BARs home.
    Home,
    Memory {
        second: bool,
        on: bool,
    },
    Msix {
        second: bool,
        control: u16,
    },
}

struct Harness {
    ports: PciConfigPorts,
    ecam: PciEcam,
    window: PciWindow,
}

impl Harness {
    fn cf8(&mut self, device: u32, register: u32) {
        let address = 0x8000_0000 | device << 11 | (register & 0xfc);
        self.ports.write(0, &address.to_le_bytes());
    }

    fn read(&mut self, device: u32, register: u32) -> u32 {
        self.cf8(device, register);
        let mut data = [0u8; 4];
        self.ports.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, device: u32, register: u32, value: u32) {
        self.cf8(device, register);
        self.ports.write(4, &value.to_le_bytes());
    }

    fn ecam_read(&mut self, device: u32, register: u32) -> u32 {
        let mut data = [0u8; 4];
        self.ecam
            .read(u64::from(device << 15 | register), &mut data);
        u32::from_le_bytes(data)
    }

    /// Decoding off everywhere first, so neither BAR is in the other's way.
    fn home(&mut self) {
        for device in [1, 2] {
            self.write(device, 0x04, 0);
        }
        for (device, addr) in [(1, HOME[0]), (2, HOME[1])] {
            self.write(device, 0x10, addr as u32);
            self.write(device, 0x14, 0);
        }
        for device in [1, 2] {
            self.write(device, 0x04, 0x6);
        }
    }

    fn check_ids(&mut self) {
        assert_eq!(self.read(0, 0), 0x0008_1b36, "host bridge via 0xcf8");
        assert_eq!(self.ecam_read(0, 0), 0x0008_1b36, "host bridge via ECAM");
        for device in [1, 2] {
            assert_eq!(self.read(device, 0), 0x1044_1af4, "function {device}");
            assert_eq!(
                self.ecam_read(device, 0),
                0x1044_1af4,
                "function {device} ECAM"
            );
        }
        assert_eq!(self.read(9, 0), u32::MAX, "empty slot");
        self.ports.write(0, &0x8001_0000u32.to_le_bytes());
        let mut data = [0u8; 4];
        self.ports.read(4, &mut data);
        assert_eq!(data, [0xff; 4], "bus 1");
    }
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8][usize::from(w % 4)]
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut ops = Vec::new();
    for _ in 0..u8::arbitrary(u)? % 64 {
        ops.push(Op::arbitrary(u)?);
    }
    let mem = memory();
    let registry = Arc::new(Registry::default());
    let malformed = Arc::new(MalformedPciAccesses::default());
    let mut root = PciRoot::new(vec![WINDOW], registry.clone(), malformed.clone());
    for (i, &bar_addr) in HOME.iter().enumerate() {
        let msi: Arc<dyn MsiRouter> = Arc::new(CheckingMsiRouter::new(2));
        let placement = PciPlacement {
            bar_addr,
            intx: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            intx_gsi: 16,
            msi: Some(msi),
            malformed: malformed.clone(),
        };
        let t = VirtioPciTransport::new(Box::new(Rng::new()), mem.clone(), placement)
            .expect("transport");
        root.add(i + 1, Arc::new(Mutex::new(t))).expect("slot");
    }
    let root = Arc::new(root);
    let mut h = Harness {
        ports: PciConfigPorts::new(root.clone()),
        ecam: PciEcam::new(root.clone()),
        window: PciWindow::new(root.clone(), WINDOW.start),
    };
    for op in ops {
        match op {
            Op::Port {
                offset,
                width: w,
                value,
                write,
            } => {
                let mut data = u64::from(value).to_le_bytes();
                let offset = u64::from(offset % 8);
                match write {
                    true => h.ports.write(offset, &data[..width(w)]),
                    false => h.ports.read(offset, &mut data[..width(w)]),
                }
            }
            Op::Cf8 {
                device,
                register,
                value,
                write,
                bus,
            } => {
                let address = 0x8000_0000
                    | u32::from(bus) << 16
                    | u32::from(device % 32) << 11
                    | u32::from(register);
                h.ports.write(0, &address.to_le_bytes());
                let mut data = value.to_le_bytes();
                match write {
                    true => h.ports.write(4, &data),
                    false => h.ports.read(4, &mut data),
                }
            }
            Op::Ecam {
                offset,
                width: w,
                value,
                write,
            } => {
                let mut data = u64::from(value).to_le_bytes();
                let offset = u64::from(offset % (1 << 20));
                match write {
                    true => h.ecam.write(offset, &data[..width(w)]),
                    false => h.ecam.read(offset, &mut data[..width(w)]),
                }
            }
            Op::Window {
                offset,
                width: w,
                value,
                write,
            } => {
                let mut data = value.to_le_bytes();
                let offset = u64::from(offset) % (WINDOW.end - WINDOW.start);
                match write {
                    true => h.window.write(offset, &data[..width(w)]),
                    false => h.window.read(offset, &mut data[..width(w)]),
                }
            }
            Op::SizeBar(second) => {
                let device = 1 + u32::from(second);
                let command = h.read(device, 0x04);
                let (lo, hi) = (h.read(device, 0x10), h.read(device, 0x14));
                h.write(device, 0x04, 0);
                h.write(device, 0x10, u32::MAX);
                h.write(device, 0x14, u32::MAX);
                assert_eq!(h.read(device, 0x10), 0xffff_8004, "BAR size");
                h.write(device, 0x10, lo);
                h.write(device, 0x14, hi);
                h.write(device, 0x04, command);
            }
            Op::MoveBar {
                second,
                to,
                anywhere,
            } => {
                let to = match anywhere {
                    true => u64::from(to),
                    false => WINDOW.start + u64::from(to) % (WINDOW.end - WINDOW.start),
                };
                let device = 1 + u32::from(second);
                h.write(device, 0x10, to as u32);
            }
            Op::Home => h.home(),
            Op::Memory { second, on } => {
                h.write(1 + u32::from(second), 0x04, if on { 0x6 } else { 0 })
            }
            Op::Msix { second, control } => {
                let device = 1 + u32::from(second);
                let dword = h.read(device, 0x40);
                h.write(device, 0x40, dword & 0xffff | u32::from(control) << 16);
            }
        }
        h.check_ids();
    }
    // Home again: both functions answer through the window, and exactly their notification
    // addresses are registered.
    h.home();
    for &addr in &HOME {
        let mut num_queues = [0u8; 2];
        h.window.read(addr - WINDOW.start + 0x12, &mut num_queues);
        assert_eq!(u16::from_le_bytes(num_queues), 1, "num_queues at {addr:#x}");
    }
    let registered: Vec<u64> = registry.0.lock().unwrap().iter().copied().collect();
    assert_eq!(
        registered,
        HOME.map(|a| a + NOTIFY),
        "registered ioeventfds"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
