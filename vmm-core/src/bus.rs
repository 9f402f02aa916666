//! Address routing for port I/O and MMIO: devices claim ranges, guest accesses are dispatched
//! to the device whose range holds them.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use rvmm_devices::BusDevice;

/// A device shared between the bus and whoever else drives it (an input thread, the API).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// How many distinct unclaimed addresses are logged before the bus goes quiet (a guest can
/// probe every port; the log must not grow without bound).
const MAX_LOGGED_UNCLAIMED: usize = 64;

/// Errors registering a device.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps a registered one.
    #[error("{bus} range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap {
        /// Which bus.
        bus: &'static str,
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length or wrapping range.
    #[error("{bus} range {base:#x}+{len:#x} is empty or wraps")]
    InvalidRange {
        /// Which bus.
        bus: &'static str,
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Range {
    len: u64,
    device: SharedDevice,
}

/// A bus: port I/O or MMIO.
pub struct Bus {
    name: &'static str,
    ranges: BTreeMap<u64, Range>,
    logged_unclaimed: Mutex<HashSet<u64>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("ranges", &self.ranges.len())
            .finish()
    }
}

impl Bus {
    /// An empty bus called `name` in log messages.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            ranges: BTreeMap::new(),
            logged_unclaimed: Mutex::new(HashSet::new()),
        }
    }

    /// Routes `base..base+len` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange {
                bus: self.name,
                base,
                len,
            })?;
        let overlaps_previous = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(start, r)| start + r.len > base);
        if overlaps_previous {
            return Err(BusError::Overlap {
                bus: self.name,
                base,
                len,
            });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (start, range) = self.ranges.range(..=addr).next_back()?;
        (addr - start < range.len).then_some((addr - start, &range.device))
    }

    /// Dispatches a guest read. Unclaimed addresses read as all ones (a floating bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, device)) => lock(device).read(offset, data),
            None => {
                data.fill(0xff);
                self.log_unclaimed(addr, "read");
            }
        }
    }

    /// Dispatches a guest write. Writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((offset, device)) => lock(device).write(offset, data),
            None => self.log_unclaimed(addr, "write"),
        }
    }

    fn log_unclaimed(&self, addr: u64, access: &str) {
        let mut logged = self
            .logged_unclaimed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if logged.len() < MAX_LOGGED_UNCLAIMED && logged.insert(addr) {
            log::info!(
                "Guest {access} at unclaimed {} address {addr:#x} ignored",
                self.name
            );
            if logged.len() == MAX_LOGGED_UNCLAIMED {
                log::info!("Further unclaimed {} accesses are not logged", self.name);
            }
        }
    }
}

/// A device whose lock was poisoned by a panic elsewhere is still usable: its registers are
/// plain data, and a guest must not be able to stop the VMM through it.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test values"
)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_offsets_relative_to_its_base() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("port I/O");
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        bus.write(0x3fb, &[7]);
        let mut data = [0u8; 1];
        bus.read(0x3fd, &mut data);
        assert_eq!(data, [5]);
        assert_eq!(dev.lock().unwrap().writes, vec![(3, vec![7])]);
    }

    #[test]
    fn unclaimed_reads_float_high_and_writes_are_dropped() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("port I/O");
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut data = [0u8; 4];
        bus.read(0x400, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.write(0x3f7, &[1]);
        bus.write(u64::MAX, &[1]);
        assert!(dev.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let mut bus = Bus::new("MMIO");
        let dev: SharedDevice = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x1000, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x1fff, 2, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x800, 0x1000, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x0, 0, dev.clone()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev.clone()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(0x2000, 0x1000, dev).unwrap();
    }

    #[test]
    fn probing_many_unclaimed_addresses_logs_a_bounded_number() {
        let bus = Bus::new("port I/O");
        for port in 0..10_000u64 {
            bus.write(port, &[0]);
        }
        assert_eq!(
            bus.logged_unclaimed.lock().unwrap().len(),
            MAX_LOGGED_UNCLAIMED
        );
    }
}
