//! The snapshot state decoder (`state.bin`, and the `State` request of a migration) and what
//! a restore does with a decoded state before any KVM call: the serial port, the i8042, the
//! ACPI PM registers and the virtio-mmio and virtio-pci transports take their saved state.
//!
//! Inputs: mostly a payload behind a correct header of this build's version or of version 1
//! (so that postcard's decoding of the state is explored, not only the checksum), sometimes the
//! bytes as they are (the header's checks: magic, version, length, CRC-32).
//!
//! Oracles: decoding never panics and refuses bad input with an error; a decoded state
//! encodes to a file that decodes again and encodes to the same bytes; restoring the devices
//! of a decoded state either succeeds or names the problem, never panics; a restored transport
//! that claims a running device has its queues inside guest memory; a restored virtio-pci
//! function saves a state that restores into a fresh function as the same state, and raises
//! only MSI-X vectors it routed ([`CheckingMsiRouter`]).

#![no_main]

use std::sync::Arc;

use rvmm_devices::legacy::{AcpiPm, I8042, PowerControl, SerialConsole};
use rvmm_devices::pci::MalformedPciAccesses;
use rvmm_devices::pci::msix::MsiRouter;
use rvmm_devices::virtio::GuestMemoryMmap;
use rvmm_devices::virtio::mmio::MmioTransport;
use rvmm_devices::virtio::pci::{PciPlacement, VirtioPciTransport};
use rvmm_devices::virtio::persist::TransportState;
use rvmm_devices::virtio::rng::Rng;
use fuzz_common::{CheckingMsiRouter, CountingTrigger};
use libfuzzer_sys::fuzz_target;
use rvmm_core::snapshot::format::{FORMAT_VERSION, HEADER_LEN, MAGIC, frame};
use rvmm_core::snapshot::{decode_state, encode_state};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The guest's power requests go nowhere.
struct NoPower;

impl PowerControl for NoPower {
    fn power_off(&self) {}
    fn reset(&self) {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let version = if mode & 0x80 != 0 { 1 } else { FORMAT_VERSION };
    let bytes = match mode % 8 {
        0 => rest.to_vec(),
        // Seeds are whole state files: their payload is framed again with their own version.
        _ if rest.starts_with(MAGIC) && rest.len() >= HEADER_LEN => {
            let own = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
            frame(own, &rest[HEADER_LEN..])
        }
        _ => frame(version, rest),
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
    if let Some(saved) = &state.acpi_pm {
        let mut pm = AcpiPm::new(CountingTrigger::default(), NoPower);
        if pm.restore(saved).is_ok() {
            assert_eq!(pm.snapshot(), *saved, "ACPI registers restored differently");
        }
    }
    let mem = fuzz_common::memory();
    for saved in state.virtio.iter().take(4) {
        match &saved.transport {
            TransportState::Mmio(_) => {
                let line = EventFd::new(EFD_NONBLOCK).unwrap();
                let Ok(mut transport) = MmioTransport::new(Box::new(Rng::new()), mem.clone(), line)
                else {
                    continue;
                };
                let _ = transport.restore_state(saved);
            }
            TransportState::Pci(state) => {
                let with_msix = state.msix.is_some();
                let Some(mut transport) = pci_rng(&mem, with_msix) else {
                    continue;
                };
                if transport.restore_state(saved).is_err() {
                    continue;
                }
                let again = transport.save_state().expect("a restored function saves");
                let mut fresh = pci_rng(&mem, with_msix).expect("transport");
                fresh
                    .restore_state(&again)
                    .expect("a restored function's state restores");
                assert_eq!(
                    fresh.save_state().expect("saves"),
                    again,
                    "a restored function's state restores differently"
                );
            }
        }
    }
});

/// A virtio-rng function, with MSI-X (two vectors) or without.
fn pci_rng(mem: &GuestMemoryMmap, with_msix: bool) -> Option<VirtioPciTransport> {
    let router = Arc::new(CheckingMsiRouter::new(2));
    let placement = PciPlacement {
        bar_addr: 0xc000_0000,
        intx: EventFd::new(EFD_NONBLOCK).ok()?,
        intx_gsi: 16,
        msi: with_msix.then(|| router as Arc<dyn MsiRouter>),
        malformed: Arc::new(MalformedPciAccesses::default()),
    };
    VirtioPciTransport::new(Box::new(Rng::new()), mem.clone(), placement).ok()
}
