//! The host bridge at 00:00.0: identification only, no BARs, nothing writable that matters.

use rvmm_devices::pci::{BarRegion, ConfigSpace, PciDevice, PciIdentity};

/// Red Hat's vendor ID and its generic PCIe host bridge device ID (no chipset to emulate).
const IDENTITY: PciIdentity = PciIdentity {
    vendor: 0x1b36,
    device: 0x0008,
    revision: 0,
    class: 0x06,    // bridge
    subclass: 0x00, // host bridge
    prog_if: 0,
    subsystem_vendor: 0x1b36,
    subsystem: 0x0008,
};

/// The host bridge.
#[derive(Debug)]
pub(super) struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub(super) fn new() -> Self {
        Self {
            config: ConfigSpace::new(IDENTITY, 0, 0),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn mapped_bars(&self) -> Vec<BarRegion> {
        Vec::new()
    }
}
