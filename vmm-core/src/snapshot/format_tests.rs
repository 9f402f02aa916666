use rvmm_devices::EventFdTrigger;
use rvmm_devices::legacy::{AcpiPmSnapshot, I8042, SerialConsole};
use rvmm_devices::virtio::mmio::MmioTransportState;
use rvmm_devices::virtio::persist::{
    QueueSnapshot, TransportState, VirtioDeviceSnapshot, VirtioDeviceState,
};

use super::*;
use crate::snapshot::{KvmVmState, MemoryRegionState};

fn trigger() -> EventFdTrigger {
    EventFdTrigger::new().unwrap()
}

fn mmio_rng() -> VirtioDeviceSnapshot {
    VirtioDeviceSnapshot {
        transport: TransportState::Mmio(MmioTransportState {
            device_type: 4,
            status: 0xf,
            needs_reset: false,
            interrupt_status: 1,
            device_features_select: 1,
            driver_features_select: 1,
            driver_features: 1 << 32,
            queue_select: 0,
            config_generation: 0,
            queues: vec![QueueSnapshot {
                max_size: 256,
                size: 16,
                ready: true,
                desc_table: 0x10000,
                avail_ring: 0x11000,
                used_ring: 0x12000,
                ..Default::default()
            }],
        }),
        device: VirtioDeviceState::Rng,
    }
}

fn state(acpi_pm: Option<AcpiPmSnapshot>) -> VmState {
    VmState {
        memory: vec![MemoryRegionState {
            guest_addr: 0,
            len: 64 << 20,
        }],
        vcpus: Vec::new(),
        kvm: KvmVmState {
            clock: Default::default(),
            irqchips: Vec::new(),
            pit: Default::default(),
        },
        serial: SerialConsole::new(trigger(), Vec::new()).snapshot(),
        i8042: I8042::new(trigger(), trigger()).snapshot(),
        virtio: vec![mmio_rng()],
        acpi_pm,
    }
}

#[test]
fn this_build_writes_version_2_with_the_acpi_registers_and_reads_it_back() {
    let pm = AcpiPmSnapshot {
        status: 0,
        enable: 1 << 8,
        sleep_type: 0,
    };
    let bytes = encode_state(&state(Some(pm))).unwrap();
    assert_eq!(&bytes[8..12], &2u32.to_le_bytes());
    let decoded = decode_state(&bytes).unwrap();
    assert_eq!(decoded.acpi_pm, Some(pm));
    assert_eq!(decoded.virtio, vec![mmio_rng()]);
    assert_eq!(encode_state(&decoded).unwrap(), bytes);
}

#[test]
fn a_version_1_state_of_virtio_mmio_devices_still_decodes_without_acpi_registers() {
    // Version 1's payload: the same fields in the same order, without `acpi_pm` (postcard
    // encodes a struct as its fields in order, as it does a tuple).
    let s = state(None);
    let v1 = postcard::to_stdvec(&(&s.memory, &s.vcpus, &s.kvm, &s.serial, &s.i8042, &s.virtio))
        .unwrap();
    let decoded = decode_state(&frame(1, &v1)).unwrap();
    assert_eq!(decoded.acpi_pm, None);
    assert_eq!(decoded.virtio, vec![mmio_rng()]);
    assert_eq!(decoded.memory, s.memory);
    // The same payload as version 2 lacks its last field.
    assert!(matches!(
        decode_state(&frame(2, &v1)),
        Err(StateFileError::Decode(_))
    ));
}

#[test]
fn a_newer_version_is_refused_by_name() {
    let v2 = encode_state(&state(None)).unwrap();
    let err = decode_state(&frame(3, &v2[HEADER_LEN..])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Snapshot state format version 3 cannot be read by this rvmm (it reads versions 1, 2)"
    );
}
