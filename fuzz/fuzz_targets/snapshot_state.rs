//! The snapshot state decoder (`state.bin`, and the `State` request of a migration) and what
//! a restore does with a decoded state before any KVM call: the serial port, the i8042 and
//! the virtio-mmio transports take their saved state.
//!
//! Inputs: mostly a payload behind a correct header (so that postcard's decoding of the
//! state is explored, not only the checksum), sometimes the bytes as they are (the header's
//! checks: magic, version, length, CRC-32).
//!
//! Oracles: decoding never panics and refuses bad input with an error; a decoded state
//! encodes to a file that decodes again and encodes to the same bytes; restoring the devices
//! of a decoded state either succeeds or names the problem, never panics; a restored transport
//! that claims a running device has its queues inside guest memory.

#![no_main]

use devices::legacy::{I8042, SerialConsole};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::rng::Rng;
use fuzz_common::CountingTrigger;
use libfuzzer_sys::fuzz_target;
use vmm_core::snapshot::format::{FORMAT_VERSION, HEADER_LEN, MAGIC};
use vmm_core::snapshot::{decode_state, encode_state};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// `payload` behind a header this build accepts.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Seeds are whole state files: their payload is framed again unless asked otherwise.
    let bytes = match mode % 8 {
        0 => rest.to_vec(),
        _ if rest.starts_with(MAGIC) && rest.len() >= HEADER_LEN => framed(&rest[HEADER_LEN..]),
        _ => framed(rest),
    };
    let Ok(state) = decode_state(&bytes) else {
        return;
    };
    let encoded = encode_state(&state).expect("a decoded state encodes");
    let again = decode_state(&encoded).expect("an encoded state decodes");
    assert_eq!(
        encode_state(&again).unwrap(),
        encoded,
        "encoding is not stable"
    );

    let _ = SerialConsole::from_snapshot(&state.serial, CountingTrigger::default(), Vec::new());
    let _ = I8042::from_snapshot(
        &state.i8042,
        CountingTrigger::default(),
        CountingTrigger::default(),
    );
    let mem = fuzz_common::memory();
    for saved in state.virtio.iter().take(4) {
        let line = EventFd::new(EFD_NONBLOCK).unwrap();
        let Ok(mut transport) = MmioTransport::new(Box::new(Rng::new()), mem.clone(), line) else {
            continue;
        };
        let _ = transport.restore_state(saved);
    }
});
