//! The i8042 controller: command and data port sequences, status and data reads, accesses of
//! any offset and width, and host Ctrl-Alt-Del, in any order.
//!
//! Oracles: the output buffer always drains within its capacity (32 reads); a CPU reset
//! command pulses the reset line; Ctrl-Alt-Del reaches the guest whole (all make and break
//! codes, in the scancode set the controller translates to) or not at all, even when the
//! guest has left the output buffer nearly full.

#![no_main]

use std::sync::atomic::Ordering;

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::BusDevice;
use rvmm_devices::legacy::I8042;
use fuzz_common::CountingTrigger;
use libfuzzer_sys::fuzz_target;

const DATA: u64 = 0;
const COMMAND: u64 = 4;
const SR_OUTPUT_FULL: u8 = 0x01;
const CAPACITY: usize = 32;
const CTR_XLATE: u8 = 0x40;
const SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

#[derive(Arbitrary, Debug)]
enum Op {
    Command(u8),
    Data(u8),
    ReadData,
    ReadStatus,
    Access {
        offset: u64,
        width: u8,
        value: u64,
        write: bool,
    },
    CtrlAltDel,
    /// Fill the output buffer with `fill` bytes the guest left unread, then Ctrl-Alt-Del.
    CtrlAltDelOnFullBuffer {
        fill: u8,
    },
}

type Dev = I8042<CountingTrigger, CountingTrigger>;

fn read(dev: &mut Dev, port: u64) -> u8 {
    let mut b = [0u8];
    dev.read(port, &mut b);
    b[0]
}

/// Reads everything queued; panics if the buffer does not drain within its capacity.
fn drain(dev: &mut Dev) -> Vec<u8> {
    let mut out = Vec::new();
    while read(dev, COMMAND) & SR_OUTPUT_FULL != 0 {
        assert!(
            out.len() <= CAPACITY,
            "output buffer holds more than {CAPACITY} bytes"
        );
        out.push(read(dev, DATA));
    }
    out
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let reset = CountingTrigger::default();
    let mut dev = I8042::new(reset.clone(), CountingTrigger::default());
    for _ in 0..u8::arbitrary(u)? {
        match Op::arbitrary(u)? {
            Op::Command(c) => {
                let before = reset.0.load(Ordering::Relaxed);
                dev.write(COMMAND, &[c]);
                if c == 0xfe {
                    assert_eq!(
                        reset.0.load(Ordering::Relaxed),
                        before + 1,
                        "CPU reset pulse"
                    );
                }
            }
            Op::Data(d) => dev.write(DATA, &[d]),
            Op::ReadData => {
                read(&mut dev, DATA);
            }
            Op::ReadStatus => {
                read(&mut dev, COMMAND);
            }
            Op::Access {
                offset,
                width,
                value,
                write,
            } => {
                let w = [1, 2, 4, 8][usize::from(width % 4)];
                let mut data = value.to_le_bytes();
                if write {
                    dev.write(offset, &data[..w]);
                } else {
                    dev.read(offset, &mut data[..w]);
                }
            }
            Op::CtrlAltDel => dev.trigger_ctrl_alt_del(),
            Op::CtrlAltDelOnFullBuffer { fill } => {
                drain(&mut dev);
                // Learn the controller configuration (which scancode set the guest gets).
                dev.write(COMMAND, &[0x20]);
                let ctr = drain(&mut dev);
                assert_eq!(ctr.len(), 1, "READ_CTR answers one byte");
                let seq: &[u8] = if ctr[0] & CTR_XLATE != 0 {
                    &SET1
                } else {
                    &SET2
                };
                let fill = usize::from(fill) % (CAPACITY + 1);
                for _ in 0..fill {
                    // WRITE_KBD_BUFFER: the next data byte is queued as if from the keyboard.
                    dev.write(COMMAND, &[0xd2]);
                    dev.write(DATA, &[0x00]);
                }
                dev.trigger_ctrl_alt_del();
                let got = drain(&mut dev);
                assert!(got.len() >= fill && got[..fill].iter().all(|b| *b == 0));
                let keys = &got[fill..];
                assert!(
                    keys.is_empty() || keys == seq,
                    "Ctrl-Alt-Del arrived partially after {fill} unread bytes: {keys:02x?}"
                );
            }
        }
    }
    drain(&mut dev);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
