#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::sync::Mutex;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::interrupt::{ISR_CONFIG, ISR_QUEUE};
use super::*;
use crate::pci::msix::MsiMessage;
use crate::pci::msix::tests::{RecordingRouter, router};
use crate::pci::{BAR0, CAPABILITIES_POINTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY};
use crate::virtio::persist::{RestoreError, TransportState, VirtioDeviceSnapshot};
use crate::virtio::test_utils::{FakeDevice, Record};
use crate::virtio::transport_core::{
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use crate::virtio::{InterruptKind, VIRTIO_F_VERSION_1, VirtioInterrupt};

const STATUS_ACKNOWLEDGE: u8 = 1;
const ALL_OK: u8 =
    STATUS_ACKNOWLEDGE | (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK) as u8;
const BAR_ADDR: u64 = 0xc000_8000;
const MSIX_ENABLE: u16 = 1 << 15;

struct Fixture {
    t: VirtioPciTransport,
    record: Arc<Mutex<Record>>,
    intx: EventFd,
    router: Option<Arc<RecordingRouter>>,
    malformed: Arc<MalformedPciAccesses>,
}

fn fixture(with_msix: bool) -> Fixture {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let (device, record) = FakeDevice::new(false);
    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    let router = with_msix.then(|| router(3));
    let malformed = Arc::new(MalformedPciAccesses::default());
    let placement = PciPlacement {
        bar_addr: BAR_ADDR,
        intx: intx.try_clone().unwrap(),
        intx_gsi: 17,
        msi: router.clone().map(|r| r as Arc<dyn MsiRouter>),
        malformed: malformed.clone(),
    };
    let t = VirtioPciTransport::new(Box::new(device), mem, placement).unwrap();
    Fixture {
        t,
        record,
        intx,
        router,
        malformed,
    }
}

fn read_bar(t: &mut VirtioPciTransport, offset: u64, len: usize) -> u64 {
    let mut data = [0u8; 8];
    t.read_bar(VIRTIO_BAR, offset, &mut data[..len]);
    u64::from_le_bytes(data)
}

fn write_bar(t: &mut VirtioPciTransport, offset: u64, len: usize, value: u64) {
    t.write_bar(VIRTIO_BAR, offset, &value.to_le_bytes()[..len]);
}

fn config_u32(t: &mut VirtioPciTransport, offset: usize) -> u32 {
    let mut data = [0u8; 4];
    t.read_config(offset, &mut data);
    u32::from_le_bytes(data)
}

fn config_u8(t: &mut VirtioPciTransport, offset: usize) -> u8 {
    let mut data = [0u8; 1];
    t.read_config(offset, &mut data);
    data[0]
}

/// The capabilities as (ID, offset) in list order, and the virtio ones' configuration types.
fn capabilities(t: &mut VirtioPciTransport) -> Vec<(u8, usize, u8)> {
    let mut caps = Vec::new();
    let mut next = usize::from(config_u8(t, CAPABILITIES_POINTER));
    while next != 0 && caps.len() < 16 {
        let id = config_u8(t, next);
        caps.push((id, next, config_u8(t, next + 3)));
        next = usize::from(config_u8(t, next + 1));
    }
    caps
}

/// The driver side of feature negotiation, queue setup and DRIVER_OK through the common
/// configuration, with MSI-X vectors 0 (config), 1 and 2 (queues).
fn bring_up(t: &mut VirtioPciTransport) {
    write_bar(t, 0x14, 1, u64::from(STATUS_ACKNOWLEDGE));
    write_bar(t, 0x14, 1, u64::from(STATUS_ACKNOWLEDGE) | 2);
    write_bar(t, 0x08, 4, 1);
    write_bar(t, 0x0c, 4, VIRTIO_F_VERSION_1 >> 32);
    write_bar(t, 0x14, 1, u64::from(STATUS_ACKNOWLEDGE) | 2 | 8);
    assert_eq!(read_bar(t, 0x14, 1) & 8, 8, "FEATURES_OK");
    write_bar(t, 0x10, 2, 0);
    for (queue, base) in [(0u64, 0x10000u64), (1, 0x20000)] {
        write_bar(t, 0x16, 2, queue);
        write_bar(t, 0x1a, 2, queue + 1);
        write_bar(t, 0x20, 8, base);
        write_bar(t, 0x28, 4, base + 0x1000);
        write_bar(t, 0x2c, 4, 0);
        write_bar(t, 0x30, 8, base + 0x2000);
        write_bar(t, 0x1c, 2, 1);
    }
    write_bar(t, 0x14, 1, u64::from(ALL_OK));
}

fn enable_msix(t: &mut VirtioPciTransport) {
    let cap = capabilities(t)[0].1;
    t.write_config(cap + 2, &MSIX_ENABLE.to_le_bytes());
    for vector in 0..3u64 {
        write_bar(t, 0x4000 + vector * 16, 8, 0xfee0_0000);
        write_bar(t, 0x4008 + vector * 16, 4, 0x40 + vector);
        write_bar(t, 0x400c + vector * 16, 4, 0);
    }
}

#[test]
fn the_function_is_a_modern_virtio_device_with_its_capabilities() {
    let Fixture { mut t, .. } = fixture(true);
    assert_eq!(config_u32(&mut t, 0), 0x1044_1af4, "vendor, 0x1040 + rng");
    assert_eq!(config_u8(&mut t, 0x08), 1, "revision 1");
    assert_eq!(config_u8(&mut t, 0x3d), 1, "INTA#");
    assert_eq!(config_u8(&mut t, 0x3c), 17, "interrupt line");
    let caps = capabilities(&mut t);
    let ids: Vec<(u8, u8)> = caps.iter().map(|&(id, _, ty)| (id, ty)).collect();
    assert_eq!(ids[0].0, 0x11, "MSI-X first");
    assert_eq!(
        &ids[1..],
        &[
            (9, CAP_COMMON),
            (9, CAP_NOTIFY),
            (9, CAP_ISR),
            (9, CAP_DEVICE),
            (9, CAP_PCI_CFG)
        ]
    );
    let notify = caps[2].1;
    assert_eq!(config_u32(&mut t, notify + 8), NOTIFY_OFFSET as u32);
    assert_eq!(config_u32(&mut t, notify + 12), 8, "two queues");
    assert_eq!(config_u32(&mut t, notify + 16), NOTIFY_OFF_MULTIPLIER);
    let msix_control = u16::from_le_bytes([config_u8(&mut t, 0x42), config_u8(&mut t, 0x43)]);
    assert_eq!(msix_control, 2, "three vectors");
    // Without a router there is no MSI-X capability.
    let Fixture { mut t, .. } = fixture(false);
    assert_eq!(capabilities(&mut t)[0], (9, 0x40, CAP_COMMON));
}

#[test]
fn the_bar_sizes_as_32_kib_and_is_decoded_only_with_memory_space_enabled() {
    let Fixture { mut t, .. } = fixture(true);
    assert_eq!(config_u32(&mut t, BAR0), BAR_ADDR as u32 | 0b100);
    t.write_config(BAR0, &[0xff; 4]);
    assert_eq!(config_u32(&mut t, BAR0), 0xffff_8004);
    t.write_config(BAR0, &(BAR_ADDR as u32).to_le_bytes());
    assert!(t.mapped_bars().is_empty());
    t.write_config(COMMAND, &COMMAND_MEMORY.to_le_bytes());
    let region = BarRegion {
        index: 0,
        addr: BAR_ADDR,
        len: VIRTIO_BAR_SIZE,
    };
    assert_eq!(t.mapped_bars(), vec![region]);
    let events: Vec<u64> = t.bar_write_events().iter().map(|e| e.offset).collect();
    assert_eq!(events, vec![0x3000, 0x3004]);
}

#[test]
fn driver_ok_through_the_common_configuration_activates_the_device() {
    let Fixture { mut t, record, .. } = fixture(true);
    assert_eq!(read_bar(&mut t, 0x12, 2), 2, "num_queues");
    write_bar(&mut t, 0x16, 2, 1);
    assert_eq!(read_bar(&mut t, 0x18, 2), 8, "queue 1 size");
    assert_eq!(read_bar(&mut t, 0x1e, 2), 1, "queue 1 notify offset");
    bring_up(&mut t);
    assert_eq!(read_bar(&mut t, 0x14, 1), u64::from(ALL_OK));
    let record = record.lock().unwrap();
    assert_eq!(record.acked, VIRTIO_F_VERSION_1);
    assert_eq!(
        record.activations,
        vec![vec![
            (16, 0x10000, 0x11000, 0x12000),
            (8, 0x20000, 0x21000, 0x22000)
        ]]
    );
}

#[test]
fn with_msix_enabled_each_queue_raises_its_own_vector() {
    let Fixture {
        mut t,
        router,
        intx,
        ..
    } = fixture(true);
    let router = router.unwrap();
    bring_up(&mut t);
    enable_msix(&mut t);
    t.interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    t.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    t.interrupt.trigger(InterruptKind::Config).unwrap();
    assert_eq!(*router.signals.lock().unwrap(), vec![2, 1, 0]);
    assert!(intx.read().is_err(), "no INTx with MSI-X");
    // A queue without a vector interrupts nobody.
    write_bar(&mut t, 0x16, 2, 0);
    write_bar(&mut t, 0x1a, 2, u64::from(NO_VECTOR));
    t.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(router.signals.lock().unwrap().len(), 3);
}

#[test]
fn a_vector_past_the_table_reads_back_as_no_vector() {
    let Fixture { mut t, .. } = fixture(true);
    write_bar(&mut t, 0x10, 2, 3);
    assert_eq!(read_bar(&mut t, 0x10, 2), u64::from(NO_VECTOR));
    write_bar(&mut t, 0x16, 2, 1);
    write_bar(&mut t, 0x1a, 2, 2);
    assert_eq!(read_bar(&mut t, 0x1a, 2), 2);
    let Fixture { mut t, .. } = fixture(false);
    write_bar(&mut t, 0x10, 2, 0);
    assert_eq!(read_bar(&mut t, 0x10, 2), u64::from(NO_VECTOR));
}

#[test]
fn without_msix_interrupts_set_isr_and_raise_intx_until_intx_is_disabled() {
    let Fixture { mut t, intx, .. } = fixture(true);
    t.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    t.interrupt.trigger(InterruptKind::Config).unwrap();
    assert_eq!(intx.read().unwrap(), 2);
    assert_eq!(read_bar(&mut t, 0x1000, 1), 3, "queue and config bits");
    assert_eq!(read_bar(&mut t, 0x1000, 1), 0, "reading ISR clears it");
    t.write_config(COMMAND, &COMMAND_INTX_DISABLE.to_le_bytes());
    t.interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    assert!(intx.read().is_err());
    assert_eq!(read_bar(&mut t, 0x1000, 1), 1);
}

#[test]
fn status_zero_resets_the_device_and_its_vectors_and_it_comes_up_again() {
    let Fixture { mut t, record, .. } = fixture(true);
    bring_up(&mut t);
    t.interrupt.signal_needs_reset();
    assert_ne!(read_bar(&mut t, 0x14, 1) & u64::from(STATUS_NEEDS_RESET), 0);
    write_bar(&mut t, 0x14, 1, 0);
    assert_eq!(read_bar(&mut t, 0x14, 1), 0);
    assert_eq!(record.lock().unwrap().resets, 1);
    assert_eq!(read_bar(&mut t, 0x10, 2), u64::from(NO_VECTOR));
    write_bar(&mut t, 0x16, 2, 0);
    assert_eq!(read_bar(&mut t, 0x1c, 2), 0, "queue disabled");
    assert_eq!(read_bar(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    bring_up(&mut t);
    assert_eq!(record.lock().unwrap().activations.len(), 2);
}

#[test]
fn notification_writes_kick_their_queue() {
    let Fixture { mut t, .. } = fixture(true);
    write_bar(&mut t, NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
    assert!(t.queue_events()[0].read().is_err());
}

#[test]
fn device_configuration_is_forwarded_and_bumps_the_generation() {
    let Fixture { mut t, record, .. } = fixture(true);
    assert_eq!(read_bar(&mut t, 0x2004, 2), 0x0504);
    write_bar(&mut t, 0x2008, 1, 7);
    assert_eq!(record.lock().unwrap().config_writes, vec![(8, vec![7])]);
    assert_eq!(read_bar(&mut t, 0x15, 1), 1);
}

#[test]
fn the_pci_cfg_capability_reaches_the_bar_through_configuration_space() {
    let Fixture { mut t, .. } = fixture(true);
    let cap = capabilities(&mut t)[5].1;
    // Read num_queues (2 bytes at 0x12) through the window.
    t.write_config(cap + PCI_CFG_BAR, &[0]);
    t.write_config(cap + PCI_CFG_OFFSET, &0x12u32.to_le_bytes());
    t.write_config(cap + PCI_CFG_LENGTH, &2u32.to_le_bytes());
    assert_eq!(config_u32(&mut t, cap + PCI_CFG_DATA), 2);
    // Kick queue 1 through it.
    t.write_config(cap + PCI_CFG_OFFSET, &0x3004u32.to_le_bytes());
    t.write_config(cap + PCI_CFG_DATA, &1u16.to_le_bytes());
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
}

#[test]
fn malformed_accesses_are_counted_and_change_nothing() {
    let Fixture {
        mut t,
        malformed,
        record,
        ..
    } = fixture(true);
    // Common configuration at the wrong width, a read-only field written, past its end.
    assert_eq!(read_bar(&mut t, 0x14, 4), 0);
    write_bar(&mut t, 0x12, 2, 9);
    write_bar(&mut t, 0x100, 4, 1);
    // ISR at the wrong width, notification past the queues or unaligned, past the BAR.
    read_bar(&mut t, 0x1000, 4);
    write_bar(&mut t, NOTIFY_OFFSET + 8, 2, 0);
    write_bar(&mut t, NOTIFY_OFFSET + 2, 2, 0);
    write_bar(&mut t, VIRTIO_BAR_SIZE - 2, 4, 0);
    t.write_bar(3, 0, &[0]);
    assert_eq!(malformed.counts().bar, 8);
    // MSI-X table at a byte, PBA written.
    write_bar(&mut t, 0x4001, 1, 0);
    write_bar(&mut t, 0x6000, 8, u64::MAX);
    // The configuration window pointing nowhere.
    let cap = capabilities(&mut t)[5].1;
    t.write_config(cap + PCI_CFG_LENGTH, &3u32.to_le_bytes());
    config_u32(&mut t, cap + PCI_CFG_DATA);
    let counts = malformed.counts();
    assert_eq!((counts.bar, counts.msix), (9, 2));
    assert_eq!(read_bar(&mut t, 0x12, 2), 2);
    assert!(record.lock().unwrap().activations.is_empty());
}

fn pci_state(saved: &VirtioDeviceSnapshot) -> &PciTransportState {
    match &saved.transport {
        TransportState::Pci(state) => state,
        other => panic!("a {} state", other.name()),
    }
}

/// A function as a running guest leaves it: BAR moved, memory and bus mastering on, the device
/// running on its rings, MSI-X enabled with vector 2 masked and pending, a configuration
/// interrupt in ISR, queue 1 selected.
fn programmed() -> Fixture {
    let mut f = fixture(true);
    let t = &mut f.t;
    t.write_config(BAR0, &0xc001_0000u32.to_le_bytes());
    t.write_config(COMMAND, &(COMMAND_MEMORY | 0b100).to_le_bytes());
    bring_up(t);
    enable_msix(t);
    write_bar(t, 0x402c, 4, 1);
    t.interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    t.interrupt.trigger(InterruptKind::Config).unwrap();
    f
}

#[test]
fn a_saved_and_restored_function_has_its_state_and_its_enabled_vectors_routed_again() {
    let source = programmed();
    let saved = source.t.save_state().unwrap();
    let state = pci_state(&saved);
    assert_eq!(state.status, u32::from(ALL_OK));
    assert_eq!(state.queue_select, 1);
    assert_eq!((state.isr, state.config_vector), (ISR_CONFIG, 0));
    assert_eq!(state.queue_vectors, [1, 2]);
    let msix = state.msix.as_ref().unwrap();
    assert_eq!(msix.pending, [false, false, true]);
    assert_eq!(msix.table[2].data, 0x42);

    let Fixture {
        mut t,
        record,
        router,
        intx,
        ..
    } = fixture(true);
    let router = router.unwrap();
    t.restore_state(&saved).unwrap();
    assert_eq!(
        t.save_state().unwrap(),
        saved,
        "the state is not the saved one"
    );
    // The BAR where the guest put it, decoded.
    assert_eq!(t.mapped_bars(), source.t.mapped_bars());
    assert_eq!(t.mapped_bars()[0].addr, 0xc001_0000);
    // The device runs on the saved rings again.
    assert_eq!(
        record.lock().unwrap().activations,
        vec![vec![
            (16, 0x10000, 0x11000, 0x12000),
            (8, 0x20000, 0x21000, 0x22000)
        ]]
    );
    // Vectors 0 and 1 (enabled, unmasked) routed again to the guest's messages; 2 stays
    // masked, so unrouted and pending.
    let message = |data| MsiMessage {
        address: 0xfee0_0000,
        data,
    };
    assert_eq!(
        *router.routes.lock().unwrap(),
        vec![(0, Some(message(0x40))), (1, Some(message(0x41)))]
    );
    assert!(router.signals.lock().unwrap().is_empty());
    t.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(*router.signals.lock().unwrap(), vec![1]);
    assert_eq!(read_bar(&mut t, 0x6000, 8), 0b100, "vector 2 pending");
    write_bar(&mut t, 0x402c, 4, 0);
    assert_eq!(*router.signals.lock().unwrap(), vec![1, 2]);
    assert_eq!(router.routes.lock().unwrap()[2], (2, Some(message(0x42))));
    // The registers the driver reads back.
    assert_eq!(read_bar(&mut t, 0x16, 2), 1, "queue_select");
    assert_eq!(read_bar(&mut t, 0x1a, 2), 2, "queue 1's vector");
    assert_eq!(read_bar(&mut t, 0x1000, 1), u64::from(ISR_CONFIG));
    assert!(intx.read().is_err(), "no INTx with MSI-X");
}

#[test]
fn a_function_without_msix_restores_intx_and_isr() {
    let Fixture { mut t, .. } = fixture(false);
    t.write_config(
        COMMAND,
        &(COMMAND_MEMORY | COMMAND_INTX_DISABLE).to_le_bytes(),
    );
    bring_up(&mut t);
    t.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    let saved = t.save_state().unwrap();
    let Fixture {
        t: mut restored,
        intx,
        ..
    } = fixture(false);
    restored.restore_state(&saved).unwrap();
    assert_eq!(restored.save_state().unwrap(), saved);
    restored.interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    assert!(
        intx.read().is_err(),
        "INTx disabled by the restored command"
    );
    assert_eq!(read_bar(&mut restored, 0x1000, 1), u64::from(ISR_QUEUE));
}

#[test]
fn restoring_another_functions_state_is_refused_by_name_and_changes_nothing() {
    let saved = programmed().t.save_state().unwrap();
    let Fixture {
        t: mut without_msix,
        ..
    } = fixture(false);
    let err = without_msix.restore_state(&saved).unwrap_err();
    assert_eq!(
        err.to_string(),
        "The snapshot's PCI function has MSI-X, the configured one has no MSI-X"
    );

    let Fixture { mut t, router, .. } = fixture(true);
    let fresh = t.save_state().unwrap();
    let mut tampered = saved.clone();
    let TransportState::Pci(state) = &mut tampered.transport else {
        unreachable!()
    };
    state.config_space[0x08] = 7; // revision ID: read-only
    let err = t.restore_state(&tampered).unwrap_err();
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("at offset 0x8"),
        "{err}"
    );
    let TransportState::Pci(state) = &mut tampered.transport else {
        unreachable!()
    };
    state.config_space = saved_config(&saved);
    state.msix.as_mut().unwrap().table.pop();
    let err = t.restore_state(&tampered).unwrap_err();
    assert!(matches!(err, RestoreError::MsixSize(_)), "{err}");
    assert_eq!(
        t.save_state().unwrap(),
        fresh,
        "a refused restore changed the function"
    );
    assert!(router.unwrap().routes.lock().unwrap().is_empty());
}

fn saved_config(saved: &VirtioDeviceSnapshot) -> Vec<u8> {
    pci_state(saved).config_space.clone()
}

fn placement() -> PciPlacement {
    PciPlacement {
        bar_addr: BAR_ADDR,
        intx: EventFd::new(EFD_NONBLOCK).unwrap(),
        intx_gsi: 17,
        msi: None,
        malformed: Arc::new(MalformedPciAccesses::default()),
    }
}

#[test]
fn a_device_with_more_queues_than_the_notify_region_holds_is_refused() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let device = FakeDevice::shaped(crate::virtio::TYPE_RNG, vec![8; 1025]);
    assert!(matches!(
        VirtioPciTransport::new(Box::new(device), mem.clone(), placement()),
        Err(TransportError::TooManyQueues(1025, 1024))
    ));
    let device = FakeDevice::shaped(crate::virtio::TYPE_RNG, vec![8; 1024]);
    assert!(VirtioPciTransport::new(Box::new(device), mem, placement()).is_ok());
}

#[test]
fn a_device_type_without_a_16_bit_pci_device_id_is_refused() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    // 0x1040 + 0x1_0001 cut to 16 bits would pass for device ID 0x1041 (a network card).
    let device = FakeDevice::shaped(0x1_0001, vec![8]);
    assert!(matches!(
        VirtioPciTransport::new(Box::new(device), mem.clone(), placement()),
        Err(TransportError::DeviceType(0x1_0001))
    ));
    let device = FakeDevice::shaped(0xffff - 0x1040 + 1, vec![8]);
    assert!(matches!(
        VirtioPciTransport::new(Box::new(device), mem, placement()),
        Err(TransportError::DeviceType(_))
    ));
}
