//! The 16550 serial console: register writes and reads of any offset and width, interleaved
//! with host input queued for the guest.
//!
//! Oracles: `queue_input` never claims more bytes than it was given; bytes the guest reads
//! from the receive buffer are the queued input, in order (loopback off); output only grows
//! through THR writes.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use rvmm_devices::BusDevice;
use rvmm_devices::legacy::SerialConsole;
use fuzz_common::CountingTrigger;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Write { reg: u8, value: u8 },
    Read { reg: u8 },
    WideWrite { offset: u64, data: Vec<u8> },
    WideRead { offset: u64, width: u8 },
    Input(Vec<u8>),
}

const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MCR_LOOP: u8 = 0x10;
const LCR_DLAB: u8 = 0x80;

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut serial = SerialConsole::new(CountingTrigger::default(), Vec::new());
    let mut queued: std::collections::VecDeque<u8> = Default::default();
    let mut lcr = 0u8;
    let mut mcr = 0u8;
    let mut model_ok = true;
    for _ in 0..u8::arbitrary(u)? {
        match Op::arbitrary(u)? {
            Op::Write { reg, value } => {
                let reg = u64::from(reg % 8);
                serial.write(reg, &[value]);
                match reg {
                    LCR => lcr = value,
                    MCR => mcr = value,
                    _ => {}
                }
                if reg == 0 && lcr & LCR_DLAB == 0 && mcr & MCR_LOOP != 0 {
                    // Loopback feeds THR into the receive buffer: not modelled.
                    model_ok = false;
                }
            }
            Op::Read { reg } => {
                let reg = u64::from(reg % 8);
                let mut b = [0u8];
                serial.read(reg, &mut b);
                if reg == 0 && lcr & LCR_DLAB == 0 && model_ok {
                    if let Some(want) = queued.pop_front() {
                        assert_eq!(b[0], want, "received byte out of order");
                    }
                }
                if reg == LSR && model_ok {
                    assert_eq!(b[0] & 1 != 0, !queued.is_empty(), "LSR data-ready bit");
                }
            }
            Op::WideWrite { offset, data } => {
                let n = data.len().min(8);
                serial.write(offset, &data[..n]);
                if n == 1 && offset < 8 {
                    match offset {
                        LCR => lcr = data[0],
                        MCR => mcr = data[0],
                        0 if lcr & LCR_DLAB == 0 && mcr & MCR_LOOP != 0 => model_ok = false,
                        _ => {}
                    }
                }
            }
            Op::WideRead { offset, width } => {
                let mut data = [0u8; 8];
                let w = [1, 2, 4, 8][usize::from(width % 4)];
                serial.read(offset, &mut data[..w]);
                if w == 1 && offset < 8 {
                    // Reading RBR consumes a byte; the model cannot follow other side effects.
                    if offset == 0 && lcr & LCR_DLAB == 0 {
                        queued.pop_front();
                    }
                } else {
                    assert!(
                        data[..w].iter().all(|b| *b == 0xff),
                        "wide or out-of-range read"
                    );
                }
            }
            Op::Input(bytes) => {
                let n = serial.queue_input(&bytes);
                assert!(n <= bytes.len(), "queued more than given");
                if mcr & MCR_LOOP != 0 {
                    model_ok = false;
                }
                queued.extend(&bytes[..n]);
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
