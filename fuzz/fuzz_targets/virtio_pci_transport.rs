//! The virtio-pci transport: configuration space and BAR accesses of any offset and width
//! against a VirtioPciTransport wrapping virtio-rng or virtio-blk, mixed with driver-like steps
//! through the common configuration (handshake, queue setup with good or garbage addresses,
//! MSI-X vectors, requests and notifications, resets), MSI-X table programming, INTx disable,
//! and the `VIRTIO_PCI_CAP_PCI_CFG` window. The sequence ends with a reset, so no worker thread
//! outlives an input.
//!
//! Oracles: the identification registers and `num_queues` never change; a reset brings the
//! status to 0, disables the queues and drops their vectors; a vector reads back as one the
//! MSI-X table has or as NO_VECTOR; the transport raises only vectors it routed
//! ([`CheckingMsiRouter`]).

#![no_main]

use std::sync::Arc;

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::pci::{MalformedPciAccesses, PciDevice};
use rvmm_devices::virtio::block::{Block, BlockConfig, Engine};
use rvmm_devices::virtio::pci::{NO_VECTOR, PciPlacement, VIRTIO_BAR, VirtioPciTransport};
use rvmm_devices::virtio::rng::Rng;
use rvmm_devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice};
use fuzz_common::*;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Common configuration fields (offset, width).
const COMMON: [(u64, usize); 16] = [
    (0x00, 4),
    (0x04, 4),
    (0x08, 4),
    (0x0c, 4),
    (0x10, 2),
    (0x12, 2),
    (0x14, 1),
    (0x15, 1),
    (0x16, 2),
    (0x18, 2),
    (0x1a, 2),
    (0x1c, 2),
    (0x1e, 2),
    (0x20, 8),
    (0x28, 4),
    (0x30, 8),
];
const STATUS: u64 = 0x14;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const BAR_SIZE: u64 = 0x8000;
const MSIX_CONTROL: usize = 0x42;
/// The configuration access capability, after MSI-X's or without it.
const PCI_CFG_CAP: [usize; 2] = [0x84, 0x90];

#[derive(Arbitrary, Debug)]
enum Op {
    /// A common configuration field at its width, or anything at all.
    Common {
        field: u8,
        raw: bool,
        width: u8,
        value: u64,
        write: bool,
    },
    /// Any BAR offset and width.
    Bar {
        offset: u16,
        width: u8,
        value: u64,
        write: bool,
    },
    /// Any configuration offset and width (1, 2, 4).
    Config {
        offset: u16,
        width: u8,
        value: u32,
        write: bool,
    },
    Handshake {
        garbage_queue: bool,
        vectors: bool,
        skip_driver_ok: bool,
    },
    Request {
        len: u16,
    },
    Notify(u8),
    /// Programs MSI-X table entry `vector` and maybe enables MSI-X.
    Msix {
        vector: u8,
        data: u8,
        masked: bool,
        enable: bool,
        function_mask: bool,
    },
    /// The configuration access window at `offset` of `len` bytes, then its data.
    Window {
        offset: u16,
        len: u8,
        value: u32,
        write: bool,
    },
    Reset,
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8][usize::from(w % 4)]
}

struct Harness<'m> {
    t: VirtioPciTransport,
    mem: &'m rvmm_devices::virtio::GuestMemoryMmap,
    drivers: Vec<Option<Driver<'m>>>,
    alloc: BufAlloc,
    block: bool,
    vectors: u16,
    pci_cfg_cap: usize,
}

impl Harness<'_> {
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.t.read_bar(VIRTIO_BAR, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.t
            .write_bar(VIRTIO_BAR, offset, &value.to_le_bytes()[..len]);
    }

    fn handshake(&mut self, garbage: bool, vectors: bool, skip_driver_ok: bool) {
        self.write(STATUS, 1, 0);
        self.write(STATUS, 1, 1);
        self.write(STATUS, 1, 3);
        self.write(0x08, 4, 1);
        self.write(0x0c, 4, VIRTIO_F_VERSION_1 >> 32);
        self.write(STATUS, 1, 11);
        for index in 0..self.drivers.len() as u64 {
            let base = QUEUE_AREA + 0x8000 * index;
            self.write(0x16, 2, index);
            self.write(0x18, 2, 16);
            if vectors {
                self.write(0x1a, 2, index + 1);
            }
            let (desc, avail, used) = if garbage {
                (MEM_END + 0x1000, base + 1, u64::MAX - 3)
            } else {
                let d = Driver::new(self.mem, base, 16);
                let addrs = (d.desc_table, d.avail, d.used);
                self.drivers[index as usize] = Some(d);
                addrs
            };
            self.write(0x20, 8, desc);
            self.write(0x28, 8, avail);
            self.write(0x30, 8, used);
            self.write(0x1c, 2, 1);
        }
        if !skip_driver_ok {
            self.write(STATUS, 1, 15);
        }
    }

    fn request(&mut self, len: u16) {
        let block = self.block;
        let Some(Some(d)) = self.drivers.get_mut(0) else {
            return;
        };
        push_request(d, &mut self.alloc, self.mem, block, len);
        self.write(NOTIFY, 2, 0);
    }

    fn reset_and_check(&mut self) {
        self.write(STATUS, 1, 0);
        assert_eq!(self.read(STATUS, 1), 0, "status after reset");
        assert_eq!(
            self.read(0x10, 2),
            u64::from(NO_VECTOR),
            "config vector after reset"
        );
        for q in 0..self.drivers.len() as u64 {
            self.write(0x16, 2, q);
            assert_eq!(self.read(0x1c, 2), 0, "queue {q} enabled after reset");
            assert_eq!(self.read(0x1a, 2), u64::from(NO_VECTOR), "queue {q} vector");
        }
        for d in &mut self.drivers {
            *d = None;
        }
    }

    fn check_invariants(&mut self) {
        let mut id = [0u8; 4];
        self.t.read_config(0, &mut id);
        let device = if self.block { 0x1042u32 } else { 0x1044 };
        assert_eq!(u32::from_le_bytes(id), device << 16 | 0x1af4, "IDs");
        assert_eq!(self.read(0x12, 2), self.drivers.len() as u64, "num_queues");
        let vector = self.read(0x1a, 2) as u16;
        assert!(
            vector == NO_VECTOR || vector < self.vectors,
            "vector {vector}"
        );
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let block = bool::arbitrary(u)?;
    let with_msix = !rarely(u, 32)?;
    let mut ops = Vec::new();
    for _ in 0..u8::arbitrary(u)? % 48 {
        ops.push(Op::arbitrary(u)?);
    }
    let mem = memory();
    let device: Box<dyn VirtioDevice> = if block {
        let config = BlockConfig {
            path: disk_path().into(),
            readonly: false,
            id: None,
            engine: Engine::Sync,
            format: None,
        };
        match Block::new(config) {
            Ok(b) => Box::new(b),
            Err(_) => return Ok(()),
        }
    } else {
        Box::new(Rng::new())
    };
    let vectors = VirtioPciTransport::msix_vectors_for(&*device);
    let router = Arc::new(CheckingMsiRouter::new(vectors));
    let placement = PciPlacement {
        bar_addr: 0xc000_0000,
        intx: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        intx_gsi: 16,
        msi: with_msix.then(|| router.clone() as Arc<dyn rvmm_devices::pci::msix::MsiRouter>),
        malformed: Arc::new(MalformedPciAccesses::default()),
    };
    let t = VirtioPciTransport::new(device, mem.clone(), placement).expect("transport");
    let queues = t.queue_events().len();
    let mut h = Harness {
        t,
        mem: &mem,
        drivers: (0..queues).map(|_| None).collect(),
        alloc: BufAlloc::default(),
        block,
        vectors: if with_msix { vectors } else { 0 },
        pci_cfg_cap: PCI_CFG_CAP[usize::from(with_msix)],
    };
    for op in ops {
        match op {
            Op::Common {
                field,
                raw,
                width: w,
                value,
                write,
            } => {
                let (offset, len) = COMMON[usize::from(field) % COMMON.len()];
                let len = if raw { width(w) } else { len };
                if write {
                    h.write(offset, len, value);
                    if offset == STATUS && value as u8 == 0 && len == 1 {
                        for d in &mut h.drivers {
                            *d = None;
                        }
                    }
                } else {
                    h.read(offset, len);
                }
            }
            Op::Bar {
                offset,
                width: w,
                value,
                write,
            } => {
                let offset = u64::from(offset) % (BAR_SIZE + 16);
                // Status writes through here would leave the drivers out of step: skip them.
                if write && offset <= STATUS && offset + width(w) as u64 > STATUS {
                    continue;
                }
                match write {
                    true => h.write(offset, width(w), value),
                    false => {
                        h.read(offset, width(w));
                    }
                }
            }
            Op::Config {
                offset,
                width: w,
                value,
                write,
            } => {
                let len = [1, 2, 4][usize::from(w % 3)];
                let offset = usize::from(offset) % 0x1000 / len * len;
                let mut data = value.to_le_bytes();
                match write {
                    true => h.t.write_config(offset, &data[..len]),
                    false => h.t.read_config(offset, &mut data[..len]),
                }
            }
            Op::Handshake {
                garbage_queue,
                vectors,
                skip_driver_ok,
            } => h.handshake(garbage_queue, vectors, skip_driver_ok),
            Op::Request { len } => h.request(len),
            Op::Notify(q) => h.write(NOTIFY + 4 * u64::from(q % 3), 2, 0),
            Op::Msix {
                vector,
                data,
                masked,
                enable,
                function_mask,
            } => {
                let entry = MSIX_TABLE + 16 * u64::from(vector % 4);
                h.write(entry, 8, 0xfee0_0000);
                h.write(entry + 8, 4, u64::from(data));
                h.write(entry + 12, 4, u64::from(masked));
                let control = u16::from(enable) << 15 | u16::from(function_mask) << 14;
                h.t.write_config(MSIX_CONTROL, &control.to_le_bytes());
            }
            Op::Window {
                offset,
                len,
                value,
                write,
            } => {
                let cap = h.pci_cfg_cap;
                h.t.write_config(cap + 4, &[0]);
                h.t.write_config(cap + 8, &u32::from(offset).to_le_bytes());
                h.t.write_config(cap + 12, &u32::from(len % 5).to_le_bytes());
                let bar_offset = u64::from(offset);
                let touches_status =
                    bar_offset <= STATUS && bar_offset + u64::from(len % 5) > STATUS;
                let mut data = value.to_le_bytes();
                match write && !touches_status {
                    true => h.t.write_config(cap + 16, &data),
                    false => h.t.read_config(cap + 16, &mut data),
                }
            }
            Op::Reset => h.reset_and_check(),
        }
        h.check_invariants();
    }
    // Stops any worker before the memory and the transport go away.
    h.reset_and_check();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
