//! The PCI root complex: segment 0, bus 0, a host bridge at 00:00.0 and one function per slot
//! after it. Configuration cycles arrive through ports 0xCF8/0xCFC or the PCIe ECAM window
//! ([`access`]); the functions' memory BARs are routed in the PCI windows wherever the guest
//! maps them, and their queue notifications become KVM ioeventfds at the mapped address, moved
//! along when the guest moves a BAR.
//!
//! Locking: a BAR access finds its function under the mapping table's lock, then takes the
//! function's lock alone; a configuration write takes the function's lock, then the table's.
//! The table's lock is never held while taking a function's, so the two orders cannot meet.

pub mod access;
mod host_bridge;
pub mod msi;

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use rvmm_devices::pci::{BarRegion, MalformedPciAccesses, PciAccessKind, PciDevice};
use vmm_sys_util::eventfd::EventFd;

use self::host_bridge::HostBridge;

/// Devices (slots) on bus 0, the host bridge's included.
pub const SLOTS: usize = 32;

/// The slot of the `index`th virtio device of a VM on the PCI transport: devices follow the
/// host bridge in configuration order (disks, network interfaces, the entropy device), so a
/// guest's PCI addresses are stable and derivable (00:01.0 is the first disk).
pub fn device_slot(index: usize) -> Option<u8> {
    index
        .checked_add(1)
        .filter(|&slot| slot < SLOTS)
        .and_then(|slot| u8::try_from(slot).ok())
}

/// A function shared by the bus and the root complex.
pub type SharedFunction = Arc<Mutex<dyn PciDevice>>;

/// A configuration address: bus, device (slot) and function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0-31).
    pub device: u8,
    /// Function number (0-7).
    pub function: u8,
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Registers eventfds that take guest writes at an address (KVM ioeventfds in a VM).
pub trait IoEventRegistry: Send + Sync {
    /// Writes at `addr` signal `event` from now on.
    fn register(&self, event: &EventFd, addr: u64) -> io::Result<()>;
    /// Writes at `addr` no longer signal `event`.
    fn unregister(&self, event: &EventFd, addr: u64) -> io::Result<()>;
}

/// KVM's ioeventfds.
#[derive(Debug)]
pub struct KvmIoEvents(pub Arc<VmFd>);

impl IoEventRegistry for KvmIoEvents {
    fn register(&self, event: &EventFd, addr: u64) -> io::Result<()> {
        self.0
            .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }

    fn unregister(&self, event: &EventFd, addr: u64) -> io::Result<()> {
        self.0
            .unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }
}

/// Errors putting a function on the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// The slot is taken or does not exist.
    #[error("PCI slot {0} is taken or does not exist")]
    Slot(usize),
}

/// A BAR mapped in a window.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    slot: usize,
    region: BarRegion,
}

#[derive(Debug, Default)]
struct Mappings {
    /// By start address.
    by_addr: BTreeMap<u64, Mapping>,
    /// What each slot has mapped.
    by_slot: Vec<Vec<BarRegion>>,
}

/// The root complex.
pub struct PciRoot {
    functions: Vec<Option<SharedFunction>>,
    mappings: Mutex<Mappings>,
    windows: Vec<Range<u64>>,
    ioevents: Arc<dyn IoEventRegistry>,
    malformed: Arc<MalformedPciAccesses>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slots: Vec<usize> = (0..SLOTS)
            .filter(|&s| self.functions[s].is_some())
            .collect();
        f.debug_struct("PciRoot")
            .field("slots", &slots)
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Registers are plain data: a panic elsewhere must not take the bus down with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PciRoot {
    /// A bus with only the host bridge, whose functions' BARs may be mapped in `windows`.
    pub fn new(
        windows: Vec<Range<u64>>,
        ioevents: Arc<dyn IoEventRegistry>,
        malformed: Arc<MalformedPciAccesses>,
    ) -> Self {
        let mut functions: Vec<Option<SharedFunction>> = vec![None; SLOTS];
        functions[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        Self {
            functions,
            mappings: Mutex::new(Mappings {
                by_addr: BTreeMap::new(),
                by_slot: vec![Vec::new(); SLOTS],
            }),
            windows,
            ioevents,
            malformed,
        }
    }

    /// Puts `function` in `slot` (1-31), mapping whatever BARs it already decodes.
    pub fn add(&mut self, slot: usize, function: SharedFunction) -> Result<(), PciError> {
        match self.functions.get_mut(slot) {
            Some(entry @ None) if slot > 0 => *entry = Some(function.clone()),
            _ => return Err(PciError::Slot(slot)),
        }
        self.remap(slot, &*lock(&function));
        Ok(())
    }

    /// Where malformed accesses are counted.
    pub fn malformed(&self) -> &Arc<MalformedPciAccesses> {
        &self.malformed
    }

    fn function(&self, bdf: Bdf) -> Option<&SharedFunction> {
        if bdf.bus != 0 || bdf.function != 0 {
            return None;
        }
        self.functions.get(usize::from(bdf.device))?.as_ref()
    }

    /// A configuration read at `offset` (below 4 KiB, naturally aligned, 1, 2 or 4 bytes: the
    /// access paths check that). A function that does not exist reads as all ones, which is
    /// how software finds empty slots.
    pub fn config_read(&self, bdf: Bdf, offset: usize, data: &mut [u8]) {
        match self.function(bdf) {
            Some(function) => lock(function).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; one to a function that does not exist is malformed.
    pub fn config_write(&self, bdf: Bdf, offset: usize, data: &[u8]) {
        let Some(function) = self.function(bdf) else {
            self.malformed.count(
                PciAccessKind::Config,
                format_args!("write to absent function {bdf}"),
            );
            return;
        };
        let mut function = lock(function);
        function.write_config(offset, data);
        // The command register or a BAR may have changed what the function decodes.
        self.remap(usize::from(bdf.device), &*function);
    }

    /// Maps what every function decodes now, as after a guest's configuration write: a
    /// restore puts the guest's command registers and BAR addresses back into functions already
    /// on the bus, and this maps their BARs there, with the notification ioeventfds.
    pub fn remap_all(&self) {
        for (slot, function) in self.functions.iter().enumerate().skip(1) {
            if let Some(function) = function {
                self.remap(slot, &*lock(function));
            }
        }
    }

    /// Brings the mapping table and the ioeventfds in line with the BARs `function` (in
    /// `slot`) decodes now.
    fn remap(&self, slot: usize, function: &dyn PciDevice) {
        let wanted = function.mapped_bars();
        let mut mappings = lock(&self.mappings);
        if mappings.by_slot[slot] == wanted {
            return;
        }
        let events = function.bar_write_events();
        let before = std::mem::take(&mut mappings.by_slot[slot]);
        let mut mapped = Vec::with_capacity(wanted.len());
        for region in before {
            if wanted.contains(&region) {
                mapped.push(region);
                continue;
            }
            mappings.by_addr.remove(&region.addr);
            for e in events.iter().filter(|e| e.bar == region.index) {
                if let Err(err) = self.ioevents.unregister(e.event, region.addr + e.offset) {
                    log::warn!("Cannot remove an ioeventfd of PCI slot {slot}: {err}");
                }
            }
        }
        for region in wanted {
            if mapped.contains(&region) {
                continue;
            }
            if !self.in_a_window(&region) || overlaps(&mappings.by_addr, &region) {
                // Real hardware would decode there; the guest only loses the BAR's registers
                // until it moves the BAR back into a free part of a window.
                log::debug!("PCI slot {slot}: BAR {region:x?} left unmapped");
                continue;
            }
            mappings
                .by_addr
                .insert(region.addr, Mapping { slot, region });
            for e in events.iter().filter(|e| e.bar == region.index) {
                if let Err(err) = self.ioevents.register(e.event, region.addr + e.offset) {
                    // The write still reaches the function as an MMIO exit.
                    log::warn!("Cannot add an ioeventfd for PCI slot {slot}: {err}");
                }
            }
            mapped.push(region);
        }
        mappings.by_slot[slot] = mapped;
    }

    fn in_a_window(&self, region: &BarRegion) -> bool {
        let Some(end) = region.addr.checked_add(region.len) else {
            return false;
        };
        self.windows
            .iter()
            .any(|w| w.start <= region.addr && end <= w.end)
    }

    /// The function, BAR and offset that decode `addr` for an access of `len` bytes.
    fn decode(&self, addr: u64, len: usize) -> Option<(SharedFunction, u8, u64)> {
        let mappings = lock(&self.mappings);
        let (&start, mapping) = mappings.by_addr.range(..=addr).next_back()?;
        let offset = addr - start;
        if offset.checked_add(len as u64)? > mapping.region.len {
            return None;
        }
        let function = self.functions[mapping.slot].clone()?;
        Some((function, mapping.region.index, offset))
    }

    /// A guest read at `addr` in a PCI window.
    pub fn bar_read(&self, addr: u64, data: &mut [u8]) {
        match self.decode(addr, data.len()) {
            Some((function, bar, offset)) => lock(&function).read_bar(bar, offset, data),
            None => {
                data.fill(0xff);
                self.malformed.count(
                    PciAccessKind::Bar,
                    format_args!("read at {addr:#x}, which no BAR decodes"),
                );
            }
        }
    }

    /// A guest write at `addr` in a PCI window.
    pub fn bar_write(&self, addr: u64, data: &[u8]) {
        match self.decode(addr, data.len()) {
            Some((function, bar, offset)) => lock(&function).write_bar(bar, offset, data),
            None => self.malformed.count(
                PciAccessKind::Bar,
                format_args!("write at {addr:#x}, which no BAR decodes"),
            ),
        }
    }
}

fn overlaps(by_addr: &BTreeMap<u64, Mapping>, region: &BarRegion) -> bool {
    by_addr
        .range(..region.addr + region.len)
        .next_back()
        .is_some_and(|(&start, m)| start + m.region.len > region.addr)
}

#[cfg(test)]
mod tests;
