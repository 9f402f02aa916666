//! An embedder's own devices on the VM's buses, exercised by a tiny guest this example carries.
//!
//! ```text
//! cargo run --release --example custom_device
//! ```
//!
//! Two devices: a read-only "magic" register in MMIO at 0xd100_0000, and a port device at
//! 0x700 that answers a question written to port 0x700 (with the question plus one) and takes
//! the guest's confirmation on port 0x704. The guest, a few instructions of 64-bit code, reads
//! the magic register, asks the port device about it, confirms the answer and resets the VM.
//! The devices tell the host what happened over a channel; the example prints it.

use std::process::ExitCode;
use std::sync::mpsc::{Receiver, Sender, channel};

use rvmm_core::{BootSource, CustomDevice, DeviceInterrupt, VmBuilder};
use rvmm_devices::{BusDevice, Trigger};

const MAGIC_BASE: u64 = 0xd100_0000;
const MAGIC: u32 = u32::from_le_bytes(*b"RVMM");
const PORT_BASE: u16 = 0x700;

/// The guest: runs at 1 MiB in 64-bit mode (the Linux boot protocol's entry state).
#[rustfmt::skip]
const GUEST: &[u8] = &[
    0x48, 0xbb, 0x00, 0x00, 0x00, 0xd1, 0, 0, 0, 0, // mov rbx, 0xd1000000
    0x8b, 0x03,                                     // mov eax, [rbx]  (the magic register)
    0x66, 0xba, 0x00, 0x07,                         // mov dx, 0x700
    0xef,                                           // out dx, eax     (the question)
    0xed,                                           // in eax, dx      (the answer)
    0x66, 0x83, 0xc2, 0x04,                         // add dx, 4
    0xef,                                           // out dx, eax     (the confirmation)
    0xb0, 0xfe,                                     // mov al, 0xfe
    0xe6, 0x64,                                     // out 0x64, al    (i8042 reset: the end)
    0xf4,                                           // hlt
];

/// What the devices saw, in order.
#[derive(Debug)]
enum Event {
    MagicRead,
    Question(u32),
    Confirmed(u32),
}

/// A read-only register at offset 0.
struct MagicRegister(Sender<Event>);

impl BusDevice for MagicRegister {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = MAGIC.to_le_bytes();
        let value = usize::try_from(offset)
            .ok()
            .and_then(|o| bytes.get(o..))
            .unwrap_or(&[]);
        data.fill(0);
        let n = data.len().min(value.len());
        data[..n].copy_from_slice(&value[..n]);
        let _ = self.0.send(Event::MagicRead);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Answers the question written at offset 0; takes the confirmation at offset 4 and raises
/// its interrupt (the tiny guest keeps interrupts off: the line stays pending).
struct Oracle {
    events: Sender<Event>,
    question: u32,
    irq: Option<DeviceInterrupt>,
}

fn to_u32(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

impl BusDevice for Oracle {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let answer = match offset {
            0 => self.question.wrapping_add(1),
            _ => 0,
        };
        let n = data.len().min(4);
        data.fill(0);
        data[..n].copy_from_slice(&answer.to_le_bytes()[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                self.question = to_u32(data);
                let _ = self.events.send(Event::Question(self.question));
            }
            4 => {
                let _ = self.events.send(Event::Confirmed(to_u32(data)));
                if let Some(irq) = &self.irq {
                    let _ = irq.trigger.trigger();
                }
            }
            _ => {}
        }
    }
}

/// The guest as an ELF64 executable: one PT_LOAD at 1 MiB, entered at its start.
fn guest_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const HEADERS: u64 = 64 + 56;
    let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    elf.extend(2u16.to_le_bytes()); // e_type: executable
    elf.extend(62u16.to_le_bytes()); // e_machine: x86-64
    elf.extend(1u32.to_le_bytes()); // e_version
    elf.extend(LOAD.to_le_bytes()); // e_entry
    elf.extend(64u64.to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend(half.to_le_bytes()); // e_ehsize, e_phentsize, e_phnum, e_shentsize, ...
    }
    elf.extend(1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend(5u32.to_le_bytes()); // p_flags: read, execute
    let len = u64::try_from(code.len()).expect("a small guest");
    for word in [HEADERS, LOAD, LOAD, len, len, 8] {
        elf.extend(word.to_le_bytes()); // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
    }
    elf.extend(code);
    elf
}

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let kernel =
        std::env::temp_dir().join(format!("rvmm-custom-device-{}.elf", std::process::id()));
    std::fs::write(&kernel, guest_elf(GUEST))?;
    let (events, received): (Sender<Event>, Receiver<Event>) = channel();
    let magic_events = events.clone();
    let builder = VmBuilder::new(BootSource::kernel(&kernel))
        .memory_mib(64)
        .device(CustomDevice::mmio("magic", MAGIC_BASE, 0x1000, move |_| {
            Ok(MagicRegister(magic_events.clone()))
        }))
        .device(
            CustomDevice::pio("oracle", PORT_BASE, 8, move |irq| {
                if let Some(irq) = &irq {
                    println!("host: the oracle's interrupt is GSI {}", irq.gsi);
                }
                Ok(Oracle {
                    events: events.clone(),
                    question: 0,
                    irq,
                })
            })
            .with_interrupt(),
        );
    let vm = builder.build(Box::new(std::io::stdout()));
    let _ = std::fs::remove_file(&kernel);
    let reason = vm?.start()?.wait();
    let mut confirmed = None;
    for event in received.try_iter() {
        match event {
            Event::MagicRead => println!("guest read the magic register ({MAGIC:#x})"),
            Event::Question(q) => println!("guest asked the oracle about {q:#x}"),
            Event::Confirmed(a) => {
                println!("guest confirmed the answer {a:#x}");
                confirmed = Some(a);
            }
        }
    }
    println!("VM ended: {reason}");
    Ok(match confirmed == Some(MAGIC + 1) {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}
