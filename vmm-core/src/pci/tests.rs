#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use rvmm_devices::BusDevice;
use rvmm_devices::pci::{
    BAR0, BarWriteEvent, COMMAND, COMMAND_MEMORY, ConfigSpace, MemoryBar, PciIdentity,
};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::access::{PciConfigPorts, PciEcam, PciWindow};
use super::*;

const WINDOW: Range<u64> = 0xc000_0000..0xd000_0000;

/// Records ioeventfd registrations as (registered, address).
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<(bool, u64)>>);

impl IoEventRegistry for Recorder {
    fn register(&self, _event: &EventFd, addr: u64) -> io::Result<()> {
        lock(&self.0).push((true, addr));
        Ok(())
    }
    fn unregister(&self, _event: &EventFd, addr: u64) -> io::Result<()> {
        lock(&self.0).push((false, addr));
        Ok(())
    }
}

/// A function with one 64-bit BAR of 16 KiB, an ioeventfd at offset 0x100 of it, and registers
/// that read back their offset.
struct Function {
    config: ConfigSpace,
    event: EventFd,
    writes: Vec<(u8, u64, Vec<u8>)>,
}

impl Function {
    fn shared(bar_addr: u64) -> Arc<Mutex<Function>> {
        let id = PciIdentity {
            vendor: 0x1af4,
            device: 0x1041,
            revision: 1,
            class: 2,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        };
        let mut config = ConfigSpace::new(id, 1, 16);
        let bar = MemoryBar {
            size: 0x4000,
            is_64bit: true,
            prefetchable: false,
        };
        config.add_memory_bar(0, bar, bar_addr);
        Arc::new(Mutex::new(Function {
            config,
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
            writes: Vec::new(),
        }))
    }
}

impl PciDevice for Function {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8 + bar);
    }
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.writes.push((bar, offset, data.to_vec()));
    }
    fn mapped_bars(&self) -> Vec<BarRegion> {
        self.config.mapped_bars()
    }
    fn bar_write_events(&self) -> Vec<BarWriteEvent<'_>> {
        vec![BarWriteEvent {
            bar: 0,
            offset: 0x100,
            event: &self.event,
        }]
    }
}

struct Bus {
    root: Arc<PciRoot>,
    ports: PciConfigPorts,
    ecam: PciEcam,
    window: PciWindow,
    events: Arc<Recorder>,
    function: Arc<Mutex<Function>>,
}

/// A root with the test function in slot 1 (BAR at 0xc000_4000) and slot 2 (BAR at
/// 0xc000_8000).
fn bus() -> Bus {
    let events = Arc::new(Recorder::default());
    let mut root = PciRoot::new(
        vec![WINDOW],
        events.clone(),
        Arc::new(MalformedPciAccesses::default()),
    );
    let function = Function::shared(0xc000_4000);
    root.add(1, function.clone()).unwrap();
    root.add(2, Function::shared(0xc000_8000)).unwrap();
    assert!(matches!(
        root.add(1, Function::shared(0xc000_c000)),
        Err(PciError::Slot(1))
    ));
    assert!(root.add(0, Function::shared(0xc000_c000)).is_err());
    assert!(root.add(32, Function::shared(0xc000_c000)).is_err());
    let root = Arc::new(root);
    Bus {
        ports: PciConfigPorts::new(root.clone()),
        ecam: PciEcam::new(root.clone()),
        window: PciWindow::new(root.clone(), WINDOW.start),
        root,
        events,
        function,
    }
}

fn address(device: u32, register: u32) -> [u8; 4] {
    (0x8000_0000 | device << 11 | register).to_le_bytes()
}

fn cf8_read(bus: &mut Bus, device: u32, register: u32, len: usize) -> u32 {
    bus.ports.write(0, &address(device, register & !3));
    let mut data = [0u8; 4];
    bus.ports
        .read(4 + u64::from(register & 3), &mut data[..len]);
    u32::from_le_bytes(data)
}

fn cf8_write(bus: &mut Bus, device: u32, register: u32, data: &[u8]) {
    bus.ports.write(0, &address(device, register & !3));
    bus.ports.write(4 + u64::from(register & 3), data);
}

#[test]
fn the_host_bridge_and_functions_answer_and_empty_slots_read_all_ones() {
    let mut bus = bus();
    assert_eq!(cf8_read(&mut bus, 0, 0, 4), 0x0008_1b36);
    assert_eq!(cf8_read(&mut bus, 0, 0x0a, 2), 0x0600, "host bridge class");
    assert_eq!(cf8_read(&mut bus, 1, 0, 4), 0x1041_1af4);
    assert_eq!(cf8_read(&mut bus, 1, 0x3d, 1), 1);
    assert_eq!(cf8_read(&mut bus, 5, 0, 4), u32::MAX);
    // Another bus, another function number, the enable bit clear.
    bus.ports.write(0, &(0x8001_0000u32).to_le_bytes());
    let mut data = [0u8; 4];
    bus.ports.read(4, &mut data);
    assert_eq!(data, [0xff; 4]);
    bus.ports.write(0, &(0x8000_0900u32).to_le_bytes());
    bus.ports.read(4, &mut data);
    assert_eq!(data, [0xff; 4]);
    bus.ports.write(0, &(0x0000_0800u32).to_le_bytes());
    bus.ports.read(4, &mut data);
    assert_eq!(data, [0xff; 4]);
    // The address register reads back.
    bus.ports.read(0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x800);
    assert_eq!(
        bus.root.malformed().counts().config,
        0,
        "probing is not malformed"
    );
}

#[test]
fn ecam_reaches_the_same_functions() {
    let mut bus = bus();
    let mut data = [0u8; 4];
    bus.ecam.read(1 << 15, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x1041_1af4);
    let mut word = [0u8; 2];
    bus.ecam.read((1 << 15) + 0x0a, &mut word);
    assert_eq!(u16::from_le_bytes(word), 0x0200);
    // Extended space reads zero: no extended capabilities.
    bus.ecam.read((1 << 15) + 0x100, &mut data);
    assert_eq!(data, [0; 4]);
    bus.ecam
        .write((1 << 15) + COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
    assert_eq!(cf8_read(&mut bus, 1, COMMAND as u32, 2), 2);
}

#[test]
fn malformed_configuration_accesses_are_counted_and_ignored() {
    let mut bus = bus();
    // A dword at 0xcfd crosses the data register; a word at 0xcfd is unaligned.
    bus.ports.write(0, &address(1, 0));
    let mut data = [0u8; 4];
    bus.ports.read(5, &mut data);
    assert_eq!(data, [0xff; 4]);
    bus.ports.write(5, &[0xff, 0xff]);
    // ECAM: unaligned, eight bytes.
    bus.ecam.read((1 << 15) + 2, &mut data);
    bus.ecam.write(1 << 15, &[0xff; 8]);
    // A write to a function that is not there.
    cf8_write(&mut bus, 7, COMMAND as u32, &[0xff, 0xff]);
    assert_eq!(bus.root.malformed().counts().config, 5);
    assert_eq!(cf8_read(&mut bus, 1, COMMAND as u32, 2), 0);
}

fn enable_memory(bus: &mut Bus, device: u32) {
    cf8_write(bus, device, COMMAND as u32, &COMMAND_MEMORY.to_le_bytes());
}

#[test]
fn bars_are_mapped_with_their_ioeventfds_when_memory_space_is_enabled() {
    let mut bus = bus();
    assert!(lock(&bus.events.0).is_empty(), "decoding is off at reset");
    enable_memory(&mut bus, 1);
    assert_eq!(*lock(&bus.events.0), vec![(true, 0xc000_4100)]);
    let mut data = [0u8; 2];
    bus.window.read(0x4010, &mut data);
    assert_eq!(data, [0x10; 2]);
    bus.window.write(0x4008, &[1, 2, 3, 4]);
    assert_eq!(lock(&bus.function).writes, vec![(0, 8, vec![1, 2, 3, 4])]);
    // Slot 2 does not decode yet: its BAR's space is nobody's.
    bus.window.read(0x8000, &mut data);
    assert_eq!(data, [0xff; 2]);
    assert_eq!(bus.root.malformed().counts().bar, 1);
    // Disabling memory space unmaps the BAR.
    cf8_write(&mut bus, 1, COMMAND as u32, &[0, 0]);
    assert_eq!(lock(&bus.events.0).last(), Some(&(false, 0xc000_4100)));
    bus.window.read(0x4010, &mut data);
    assert_eq!(data, [0xff; 2]);
}

#[test]
fn a_moved_bar_takes_its_ioeventfd_along_and_cannot_leave_the_windows_or_overlap() {
    let mut bus = bus();
    enable_memory(&mut bus, 1);
    enable_memory(&mut bus, 2);
    cf8_write(&mut bus, 1, BAR0 as u32, &0xc001_0000u32.to_le_bytes());
    let events = lock(&bus.events.0).clone();
    assert_eq!(
        &events[2..],
        &[(false, 0xc000_4100), (true, 0xc001_0100)],
        "{events:x?}"
    );
    let mut data = [0u8; 1];
    bus.window.read(0x1_0004, &mut data);
    assert_eq!(data, [4]);
    // Onto slot 2's BAR: refused, slot 1 decodes nothing now.
    cf8_write(&mut bus, 1, BAR0 as u32, &0xc000_8000u32.to_le_bytes());
    bus.window.read(0x8001, &mut data);
    assert_eq!(data, [1], "still slot 2");
    bus.window.read(0x1_0004, &mut data);
    assert_eq!(data, [0xff]);
    // Above 4 GiB, out of every window: refused too; back in the window: mapped again.
    cf8_write(&mut bus, 1, BAR0 as u32 + 4, &1u32.to_le_bytes());
    cf8_write(&mut bus, 1, BAR0 as u32 + 4, &0u32.to_le_bytes());
    cf8_write(&mut bus, 1, BAR0 as u32, &0xc002_0000u32.to_le_bytes());
    assert_eq!(lock(&bus.events.0).last(), Some(&(true, 0xc002_0100)));
    // An access running past the BAR's end is malformed.
    let mut wide = [0u8; 8];
    bus.window.read(0x2_3ffc, &mut wide);
    assert_eq!(wide, [0xff; 8]);
}

#[test]
fn remapping_after_a_restore_maps_the_bars_where_the_functions_now_decode_them() {
    let mut bus = bus();
    // A restore writes the function's registers without a configuration cycle.
    {
        let mut f = lock(&bus.function);
        f.config.write(BAR0, &0xc001_0000u32.to_le_bytes());
        f.config.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
    }
    let mut data = [0u8; 1];
    bus.window.read(0x1_0000, &mut data);
    assert_eq!(data, [0xff], "not mapped before the remap");
    bus.root.remap_all();
    assert_eq!(*lock(&bus.events.0), vec![(true, 0xc001_0100)]);
    bus.window.read(0x1_0004, &mut data);
    assert_eq!(data, [4]);
    // Nothing changed: nothing registered twice.
    bus.root.remap_all();
    assert_eq!(lock(&bus.events.0).len(), 1);
}
