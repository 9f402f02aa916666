//! A PCI function's type-0 configuration header (PCI Local Bus 3.0 §6.1-6.2, §6.7): the
//! identification registers, command/status, memory BARs with the sizing protocol, the interrupt
//! line and pin, and the capability list. Every write goes through a per-bit mask, so read-only
//! fields keep their value whatever a guest writes.

use super::BarRegion;
use crate::cast::low_u32;

/// Size of the conventional configuration space; a PCIe (ECAM) function's extended space past
/// it reads as zero here (no extended capabilities).
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of a function's window in the PCIe enhanced configuration (ECAM) space.
pub const EXTENDED_CONFIG_SPACE_SIZE: usize = 4096;
/// How many BARs a type-0 header has.
pub const BAR_COUNT: usize = 6;

/// Vendor ID register.
pub const VENDOR_ID: usize = 0x00;
/// Command register.
pub const COMMAND: usize = 0x04;
/// Status register.
pub const STATUS: usize = 0x06;
/// First BAR register.
pub const BAR0: usize = 0x10;
/// Capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Interrupt line (the routing software wrote down; read/write, no effect on the device).
pub const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin (1 = INTA#).
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command: the function decodes its memory BARs.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: the function may not assert INTx.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command bits rvmm's functions implement: I/O and memory space, bus mastering, INTx
/// disable. The others read as zero.
const COMMAND_WRITABLE: u16 = 0b0111 | COMMAND_INTX_DISABLE;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const HEADER_TYPE: usize = 0x0e;
const FIRST_CAPABILITY: usize = 0x40;
const BAR_MEMORY_64BIT: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;

/// What a function is: the identification registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Base class code.
    pub class: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A memory BAR: its size (a power of two, at least 4 KiB) and type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBar {
    /// Bytes decoded.
    pub size: u64,
    /// A 64-bit BAR (takes this register and the next).
    pub is_64bit: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A saved configuration space that is not the function's: its length, or a read-only byte
/// (identification, BAR type, capability layout) differs from the configured function's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigSpaceMismatch {
    /// Not a conventional configuration space.
    #[error("The snapshot's PCI configuration space has {0} bytes, expected 256")]
    Length(usize),
    /// A read-only byte differs.
    #[error(
        "The snapshot's PCI configuration space differs from the configured function's at offset {offset:#x} ({saved:#04x}, expected {configured:#04x})"
    )]
    ReadOnly {
        /// The byte.
        offset: usize,
        /// In the snapshot.
        saved: u8,
        /// The configured function's.
        configured: u8,
    },
}

/// A type-0 configuration header.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    write_mask: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<MemoryBar>; BAR_COUNT],
    /// Where the next capability goes, and where the last one's next pointer is.
    next_capability: usize,
    last_next_pointer: usize,
}

impl ConfigSpace {
    /// A header for `id` with interrupt pin `pin` (0: none, 1: INTA#), routed to `line`.
    pub fn new(id: PciIdentity, pin: u8, line: u8) -> Self {
        let mut space = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            write_mask: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_next_pointer: CAPABILITIES_POINTER,
        };
        space.set_u16(VENDOR_ID, id.vendor);
        space.set_u16(0x02, id.device);
        space.bytes[0x08] = id.revision;
        space.bytes[0x09] = id.prog_if;
        space.bytes[0x0a] = id.subclass;
        space.bytes[0x0b] = id.class;
        space.bytes[HEADER_TYPE] = 0;
        space.set_u16(0x2c, id.subsystem_vendor);
        space.set_u16(0x2e, id.subsystem);
        space.bytes[INTERRUPT_PIN] = pin;
        space.bytes[INTERRUPT_LINE] = line;
        space.mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        // Cache line size and latency timer are read/write scratch registers for software.
        space.mask(0x0c, &[0xff, 0xff]);
        space.mask(INTERRUPT_LINE, &[0xff]);
        space
    }

    fn mask(&mut self, offset: usize, mask: &[u8]) {
        self.write_mask[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// Adds memory BAR `index` of `bar`'s size and type, placed at `addr` (as firmware would).
    ///
    /// # Panics
    /// On a BAR that cannot exist (index past the last register, a 64-bit BAR in the last one, a
    /// size that is not a power of two of at least 4 KiB, an address not aligned to the size, an
    /// index already used): those are the VMM's mistakes, not the guest's.
    pub fn add_memory_bar(&mut self, index: usize, bar: MemoryBar, addr: u64) {
        let registers = if bar.is_64bit { 2 } else { 1 };
        assert!(index + registers <= BAR_COUNT, "BAR {index} does not fit");
        assert!(
            bar.size.is_power_of_two() && bar.size >= 0x1000,
            "BAR size {:#x}",
            bar.size
        );
        assert!(addr.is_multiple_of(bar.size), "BAR address {addr:#x}");
        assert!(
            bar.is_64bit || addr + bar.size <= 1 << 32,
            "32-bit BAR above 4 GiB"
        );
        assert!(
            (index..index + registers).all(|i| self.bars[i].is_none() && self.mask_of_bar(i) == 0),
            "BAR {index} is used"
        );
        self.bars[index] = Some(bar);
        let flags = if bar.is_64bit { BAR_MEMORY_64BIT } else { 0 }
            | if bar.prefetchable {
                BAR_PREFETCHABLE
            } else {
                0
            };
        let size_mask = !(bar.size - 1);
        let offset = BAR0 + index * 4;
        self.set_u32(offset, (low_u32(addr) & !0xf) | flags);
        self.mask(offset, &(low_u32(size_mask) & !0xf).to_le_bytes());
        if bar.is_64bit {
            self.set_u32(offset + 4, (addr >> 32) as u32);
            self.mask(offset + 4, &((size_mask >> 32) as u32).to_le_bytes());
        }
    }

    fn mask_of_bar(&self, index: usize) -> u32 {
        let offset = BAR0 + index * 4;
        u32::from_le_bytes(
            self.write_mask[offset..offset + 4]
                .try_into()
                .unwrap_or([0; 4]),
        )
    }

    /// Appends a capability with ID `id` whose bytes after the ID and next pointer are `body`,
    /// writable where `body_mask` has bits set. Returns its offset.
    ///
    /// # Panics
    /// When the capabilities do not fit the header, or `body_mask` is not as long as `body`.
    pub fn add_capability(&mut self, id: u8, body: &[u8], body_mask: &[u8]) -> usize {
        assert_eq!(body.len(), body_mask.len());
        let offset = self.next_capability;
        let end = offset + 2 + body.len();
        assert!(end <= CONFIG_SPACE_SIZE, "capabilities overflow");
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..end].copy_from_slice(body);
        self.write_mask[offset + 2..end].copy_from_slice(body_mask);
        #[allow(
            clippy::cast_possible_truncation,
            reason = "asserted inside config space"
        )]
        let pointer = offset as u8;
        self.bytes[self.last_next_pointer] = pointer;
        self.last_next_pointer = offset + 1;
        // Capabilities start on a dword boundary.
        self.next_capability = end.next_multiple_of(4);
        let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
        self.set_u16(STATUS, status);
        offset
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the conventional space read as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes `data` at `offset` through the write masks; bytes past the conventional space are
    /// ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let at = offset + i;
            if let (Some(byte), Some(&mask)) = (self.bytes.get_mut(at), self.write_mask.get(at)) {
                *byte = (*byte & !mask) | (value & mask);
            }
        }
    }

    /// The little-endian u16 at `offset` (0 past the end).
    pub fn u16_at(&self, offset: usize) -> u16 {
        let mut bytes = [0; 2];
        self.read(offset, &mut bytes);
        u16::from_le_bytes(bytes)
    }

    /// The little-endian u32 at `offset` (0 past the end).
    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut bytes = [0; 4];
        self.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// Sets a u16 whatever its write mask (the device's own view of a register).
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// Sets a u32 whatever its write mask.
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Whether the function may assert INTx (the command register's INTx disable is clear).
    pub fn intx_enabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE == 0
    }

    /// The address BAR `index` holds now (its type bits cleared), if it is a BAR.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let offset = BAR0 + index * 4;
        let low = u64::from(self.u32_at(offset) & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.u32_at(offset + 4))
        } else {
            0
        };
        Some(high << 32 | low)
    }

    /// The memory BARs the function decodes now: memory space enabled in the command register,
    /// and an address assigned (zero means none, as software reads it).
    pub fn mapped_bars(&self) -> Vec<BarRegion> {
        if self.command() & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        (0..BAR_COUNT)
            .filter_map(|index| {
                let bar = self.bars[index]?;
                let addr = self.bar_address(index)?;
                (addr != 0).then_some(BarRegion {
                    index: u8::try_from(index).ok()?,
                    addr,
                    len: bar.size,
                })
            })
            .collect()
    }

    /// The whole conventional space as the guest reads it, for a snapshot.
    pub fn save(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Puts a saved space back: every byte the guest can write is taken from `saved` (command
    /// register, BAR addresses, capability fields such as MSI-X's message control), and every
    /// other byte must be the configured function's, which proves the snapshot was taken of the
    /// same function (a snapshot is untrusted input). Nothing changes on an error.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), ConfigSpaceMismatch> {
        if saved.len() != CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceMismatch::Length(saved.len()));
        }
        let differs =
            (0..CONFIG_SPACE_SIZE).find(|&i| (saved[i] ^ self.bytes[i]) & !self.write_mask[i] != 0);
        if let Some(offset) = differs {
            return Err(ConfigSpaceMismatch::ReadOnly {
                offset,
                saved: saved[offset],
                configured: self.bytes[offset],
            });
        }
        self.write(0, saved);
        Ok(())
    }

    /// Whether `offset..offset + len` overlaps a BAR register (writes there may move a BAR).
    pub fn touches_bars(offset: usize, len: usize) -> bool {
        offset < BAR0 + BAR_COUNT * 4 && offset + len > BAR0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let id = PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        };
        ConfigSpace::new(id, 1, 17)
    }

    #[test]
    fn identification_is_read_only() {
        let mut s = space();
        s.write(0, &[0xff; 4]);
        s.write(0x08, &[0xff; 4]);
        assert_eq!(s.u32_at(0), 0x1042_1af4);
        assert_eq!(s.u32_at(0x08), 0x0100_0001);
        assert_eq!(s.bytes[INTERRUPT_PIN], 1);
        s.write(INTERRUPT_PIN, &[4]);
        assert_eq!(s.bytes[INTERRUPT_PIN], 1);
        s.write(INTERRUPT_LINE, &[9]);
        assert_eq!(s.bytes[INTERRUPT_LINE], 9);
    }

    #[test]
    fn command_keeps_only_implemented_bits() {
        let mut s = space();
        s.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(s.command(), 0x0407);
        assert!(!s.intx_enabled());
    }

    #[test]
    fn sizing_a_64bit_bar_reads_back_its_size_and_restoring_keeps_the_address() {
        let mut s = space();
        let bar = MemoryBar {
            size: 0x8000,
            is_64bit: true,
            prefetchable: false,
        };
        s.add_memory_bar(0, bar, 0xc000_8000);
        assert_eq!(s.u32_at(BAR0), 0xc000_8004);
        assert_eq!(s.u32_at(BAR0 + 4), 0);
        s.write(BAR0, &[0xff; 4]);
        s.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(s.u32_at(BAR0), 0xffff_8004);
        assert_eq!(s.u32_at(BAR0 + 4), 0xffff_ffff);
        s.write(BAR0, &0xc000_8000u32.to_le_bytes());
        s.write(BAR0 + 4, &0u32.to_le_bytes());
        assert_eq!(s.bar_address(0), Some(0xc000_8000));
        // Unused BARs and the expansion ROM size as zero: no resource there.
        s.write(BAR0 + 8, &[0xff; 4]);
        s.write(0x30, &[0xff; 4]);
        assert_eq!(s.u32_at(BAR0 + 8), 0);
        assert_eq!(s.u32_at(0x30), 0);
    }

    #[test]
    fn bars_are_mapped_only_with_memory_space_enabled_and_an_address() {
        let mut s = space();
        let bar = MemoryBar {
            size: 0x4000,
            is_64bit: false,
            prefetchable: false,
        };
        s.add_memory_bar(2, bar, 0xc000_4000);
        assert!(s.mapped_bars().is_empty());
        s.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        let expected = BarRegion {
            index: 2,
            addr: 0xc000_4000,
            len: 0x4000,
        };
        assert_eq!(s.mapped_bars(), vec![expected]);
        s.write(BAR0 + 8, &0u32.to_le_bytes());
        assert!(s.mapped_bars().is_empty());
    }

    #[test]
    fn capabilities_are_chained_and_only_their_masked_bytes_are_writable() {
        let mut s = space();
        let first = s.add_capability(0x11, &[1, 2, 3], &[0xff, 0, 0]);
        let second = s.add_capability(0x09, &[4, 5], &[0, 0]);
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x48);
        assert_eq!(s.bytes[CAPABILITIES_POINTER], 0x40);
        assert_eq!(s.bytes[0x41], 0x48);
        assert_eq!(s.bytes[0x49], 0);
        assert_ne!(s.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        s.write(0x42, &[9, 9, 9]);
        assert_eq!(&s.bytes[0x42..0x45], &[9, 2, 3]);
        // The chain itself is read-only.
        s.write(0x41, &[0x80]);
        assert_eq!(s.bytes[0x41], 0x48);
    }

    #[test]
    fn a_saved_space_restores_the_guests_registers_and_refuses_another_function() {
        let bar = MemoryBar {
            size: 0x8000,
            is_64bit: true,
            prefetchable: false,
        };
        let mut s = space();
        s.add_memory_bar(0, bar, 0xc000_0000);
        let cap = s.add_capability(0x11, &[1, 0], &[0, 0xc0]);
        let mut fresh = s.clone();
        s.write(
            COMMAND,
            &(COMMAND_MEMORY | COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        s.write(BAR0, &0xc001_0000u32.to_le_bytes());
        s.write(BAR0 + 4, &1u32.to_le_bytes());
        s.write(cap + 3, &[0x80]);
        s.write(INTERRUPT_LINE, &[11]);
        fresh.restore(&s.save()).unwrap();
        assert_eq!(fresh.save(), s.save());
        assert_eq!(fresh.bar_address(0), Some(0x1_c001_0000));
        assert_eq!(fresh.mapped_bars(), s.mapped_bars());

        // Another device ID (read-only) is another function.
        let mut other = s.save();
        other[2] ^= 1;
        let before = fresh.save();
        assert_eq!(
            fresh.restore(&other),
            Err(ConfigSpaceMismatch::ReadOnly {
                offset: 2,
                saved: 0x43,
                configured: 0x42
            })
        );
        assert_eq!(fresh.save(), before, "a refused restore changed the space");
        assert_eq!(
            fresh.restore(&[0; 64]),
            Err(ConfigSpaceMismatch::Length(64))
        );
    }

    #[test]
    fn extended_space_reads_zero_and_ignores_writes() {
        let mut s = space();
        s.write(0x100, &[1, 2, 3, 4]);
        s.write(0xfe, &[1, 2, 3, 4]);
        let mut data = [0xff; 4];
        s.read(0x100, &mut data);
        assert_eq!(data, [0; 4]);
        s.read(0xffc, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
