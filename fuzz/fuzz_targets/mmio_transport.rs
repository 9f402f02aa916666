//! The virtio-mmio transport: sequences of register reads and writes of any offset and width
//! against an MmioTransport wrapping virtio-rng or virtio-blk, mixed with driver-like steps
//! (a full handshake, queue setup mid-operation, DRIVER_OK with garbage queue addresses,
//! requests and kicks, resets). The sequence ends with a reset, so no worker thread outlives
//! an input.
//!
//! Oracles: the identification registers never change, and a reset always brings the status
//! and interrupt status back to 0.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::BusDevice;
use rvmm_devices::virtio::block::{Block, BlockConfig, Engine};
use rvmm_devices::virtio::mmio::MmioTransport;
use rvmm_devices::virtio::rng::Rng;
use rvmm_devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice};
use fuzz_common::*;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Registers a driver touches (offsets in the MMIO window).
const REGISTERS: [u64; 28] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
    0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xac, 0xb0, 0xfc, 0x100, 0x108, 0x13c,
];

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Reg {
    Known(u8),
    Config(u8),
    Raw(u64),
}

impl Reg {
    fn offset(self) -> u64 {
        match self {
            Reg::Known(i) => REGISTERS[usize::from(i) % REGISTERS.len()],
            Reg::Config(o) => 0x100 + u64::from(o),
            Reg::Raw(o) => o,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        reg: Reg,
        width: u8,
    },
    Write {
        reg: Reg,
        width: u8,
        value: u64,
    },
    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, DRIVER_OK.
    Handshake {
        event_idx: bool,
        garbage_queue: bool,
        skip_driver_ok: bool,
    },
    /// Select a queue and program its registers.
    SetupQueue {
        index: u8,
        size: u16,
        garbage: bool,
        ready: bool,
    },
    /// Write one status value.
    Status(u8),
    /// Add a request to queue 0 (if the driver set it up) and notify.
    Request {
        len: u16,
    },
    Kick(u8),
    Reset,
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8][usize::from(w % 4)]
}

struct Harness<'m> {
    t: MmioTransport,
    mem: &'m rvmm_devices::virtio::GuestMemoryMmap,
    drivers: Vec<Option<Driver<'m>>>,
    alloc: BufAlloc,
    block: bool,
}

impl Harness<'_> {
    fn write32(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn setup_queue(&mut self, index: u32, size: u16, garbage: bool, ready: bool) {
        self.write32(0x30, index);
        self.write32(0x38, u32::from(size));
        let base = QUEUE_AREA + 0x8000 * u64::from(index % 4);
        let (desc, avail, used) = if garbage {
            // Outside memory, unaligned, or overlapping.
            (MEM_END + 0x1000, base + 1, u64::MAX - 3)
        } else if size.is_power_of_two() && size <= 256 && index < 4 {
            let d = Driver::new(self.mem, base, size);
            let addrs = (d.desc_table, d.avail, d.used);
            if let Some(slot) = self.drivers.get_mut(index as usize) {
                *slot = Some(d);
            }
            addrs
        } else {
            (base, base + 0x1000, base + 0x2000)
        };
        for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            self.write32(reg, addr as u32);
            self.write32(reg + 4, (addr >> 32) as u32);
        }
        self.write32(0x44, u32::from(ready));
    }

    fn handshake(&mut self, event_idx: bool, garbage: bool, skip_driver_ok: bool) {
        self.write32(0x70, 0);
        self.write32(0x70, ACKNOWLEDGE);
        self.write32(0x70, ACKNOWLEDGE | DRIVER);
        self.write32(0x14, 0);
        let lo = self.read32(0x10);
        self.write32(0x14, 1);
        let hi = self.read32(0x10);
        let offered = u64::from(hi) << 32 | u64::from(lo);
        let mut wanted = offered & (VIRTIO_F_VERSION_1 | 0xffff_ffff);
        if !event_idx {
            wanted &= !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
        }
        self.write32(0x24, 0);
        self.write32(0x20, wanted as u32);
        self.write32(0x24, 1);
        self.write32(0x20, (wanted >> 32) as u32);
        self.write32(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let queues = self.drivers.len() as u32;
        for q in 0..queues {
            self.setup_queue(q, 16, garbage, true);
        }
        if !skip_driver_ok {
            self.write32(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        }
    }

    fn request(&mut self, len: u16) {
        let block = self.block;
        let Some(Some(d)) = self.drivers.get_mut(0) else {
            return;
        };
        push_request(d, &mut self.alloc, self.mem, block, len);
        self.write32(0x50, 0);
    }

    fn reset_and_check(&mut self) {
        self.write32(0x70, 0);
        assert_eq!(self.read32(0x70), 0, "status after reset");
        assert_eq!(self.read32(0x60), 0, "interrupt status after reset");
        for d in &mut self.drivers {
            *d = None;
        }
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let block = bool::arbitrary(u)?;
    let mut ops = Vec::new();
    for _ in 0..u8::arbitrary(u)? % 48 {
        ops.push(Op::arbitrary(u)?);
    }
    let mem = memory();
    let device: Box<dyn VirtioDevice> = if block {
        match Block::new(BlockConfig {
            path: disk_path().into(),
            readonly: false,
            id: None,
            engine: Engine::Sync,
            format: Some(rvmm_devices::image::ImageFormat::Raw),
        }) {
            Ok(b) => Box::new(b),
            Err(_) => return Ok(()),
        }
    } else {
        Box::new(Rng::new())
    };
    let line = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let t = MmioTransport::new(device, mem.clone(), line).expect("transport");
    let queues = t.queue_events().len();
    let mut h = Harness {
        t,
        mem: &mem,
        drivers: (0..queues).map(|_| None).collect(),
        alloc: BufAlloc::default(),
        block,
    };
    for op in ops {
        match op {
            Op::Read { reg, width: w } => {
                let mut data = [0u8; 8];
                h.t.read(reg.offset(), &mut data[..width(w)]);
            }
            Op::Write {
                reg,
                width: w,
                value,
            } => {
                let offset = reg.offset();
                h.t.write(offset, &value.to_le_bytes()[..width(w)]);
                if offset == 0x70 && value == 0 && width(w) == 4 {
                    for d in &mut h.drivers {
                        *d = None;
                    }
                }
            }
            Op::Handshake {
                event_idx,
                garbage_queue,
                skip_driver_ok,
            } => h.handshake(event_idx, garbage_queue, skip_driver_ok),
            Op::SetupQueue {
                index,
                size,
                garbage,
                ready,
            } => h.setup_queue(u32::from(index % 3), size, garbage, ready),
            Op::Status(s) => h.write32(0x70, u32::from(s)),
            Op::Request { len } => h.request(len),
            Op::Kick(q) => h.write32(0x50, u32::from(q % 3)),
            Op::Reset => h.reset_and_check(),
        }
        assert_eq!(h.read32(0x00), 0x7472_6976, "magic value");
        assert_eq!(h.read32(0x04), 2, "version");
    }
    // Stops any worker before the memory and the transport go away.
    h.reset_and_check();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
