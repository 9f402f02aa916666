//! How guest accesses reach the root complex: configuration mechanism #1 on ports 0xCF8-0xCFF
//! (PCI Local Bus 3.0 §3.2.2.3.2), the PCIe enhanced configuration (ECAM) window (PCIe 4.0
//! §7.2.2), and the PCI windows in which BARs are mapped. Each is a [`BusDevice`] that checks the
//! access's shape and hands well-formed ones to the [`PciRoot`].

use std::sync::Arc;

use rvmm_devices::BusDevice;
use rvmm_devices::cast::usize_from;
use rvmm_devices::pci::{EXTENDED_CONFIG_SPACE_SIZE, PciAccessKind};

use super::{Bdf, PciRoot};

/// The configuration address port.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// The address port and the four data ports.
pub const CONFIG_PORTS_LEN: u64 = 8;

const ENABLE: u32 = 1 << 31;
/// Bits 30:24 are reserved: an address with any of them set is not a type 1 configuration
/// cycle rvmm answers.
const RESERVED: u32 = 0x7f00_0000;

/// Ports 0xCF8 (address, a dword) and 0xCFC-0xCFF (data at any width within the dword).
#[derive(Debug)]
pub struct PciConfigPorts {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigPorts {
    /// The ports of `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root, address: 0 }
    }

    /// The function and register offset of a data access `byte` bytes into the data port, if
    /// the address register selects a configuration cycle.
    fn target(&self, byte: u64) -> Option<(Bdf, usize)> {
        if self.address & ENABLE == 0 || self.address & RESERVED != 0 {
            return None;
        }
        let bdf = Bdf {
            bus: ((self.address >> 16) & 0xff) as u8,
            device: ((self.address >> 11) & 0x1f) as u8,
            function: ((self.address >> 8) & 0x7) as u8,
        };
        Some((bdf, (self.address & 0xfc) as usize + usize_from(byte)))
    }

    /// A data-port access: `offset` 4-7, within the dword.
    fn data_access(&self, offset: u64, len: usize) -> Option<(Bdf, usize)> {
        let byte = offset.checked_sub(4)?;
        if byte + len as u64 > 4 || !byte.is_multiple_of(len as u64) {
            self.root.malformed.count(
                PciAccessKind::Config,
                format_args!(
                    "{len}-byte access at port {:#x}",
                    CONFIG_ADDRESS_PORT + offset
                ),
            );
            return None;
        }
        self.target(byte)
    }
}

impl BusDevice for PciConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        match self.data_access(offset, data.len()) {
            Some((bdf, register)) => self.root.config_read(bdf, register, data),
            // Byte accesses to 0xCF8-0xCFB belong to other chipset registers (Linux probes
            // them); nothing is there.
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Ok(address) = data.try_into() {
                self.address = u32::from_le_bytes(address);
            }
            return;
        }
        if let Some((bdf, register)) = self.data_access(offset, data.len()) {
            self.root.config_write(bdf, register, data);
        }
    }
}

/// The ECAM window of bus 0: function `(device, function)`'s 4 KiB at
/// `(device << 15) | (function << 12)`.
#[derive(Debug)]
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    /// The window of `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }

    fn target(&self, offset: u64, len: usize) -> Option<(Bdf, usize)> {
        let register = usize_from(offset % EXTENDED_CONFIG_SPACE_SIZE as u64);
        if !matches!(len, 1 | 2 | 4) || !register.is_multiple_of(len) {
            self.root.malformed.count(
                PciAccessKind::Config,
                format_args!("{len}-byte ECAM access at offset {offset:#x}"),
            );
            return None;
        }
        let bdf = Bdf {
            bus: ((offset >> 20) & 0xff) as u8,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        Some((bdf, register))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset, data.len()) {
            Some((bdf, register)) => self.root.config_read(bdf, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bdf, register)) = self.target(offset, data.len()) {
            self.root.config_write(bdf, register, data);
        }
    }
}

/// A PCI window: the BARs mapped in it, at `base` in guest physical memory.
#[derive(Debug)]
pub struct PciWindow {
    root: Arc<PciRoot>,
    base: u64,
}

impl PciWindow {
    /// The window of `root` starting at `base`.
    pub fn new(root: Arc<PciRoot>, base: u64) -> Self {
        Self { root, base }
    }
}

impl BusDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.root.bar_read(self.base + offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.root.bar_write(self.base + offset, data);
    }
}
