//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability's enable and function-mask bits, the vector
//! table and pending-bit array a guest programs through a BAR, and delivery of each vector as a
//! message signalled interrupt through an [`MsiRouter`] (KVM's GSI routes and irqfds in a VM).
//!
//! The table is plain data owned by the device (saved and restored like any register); what the
//! device's worker threads need to raise a vector without taking the device's lock is in
//! [`MsixVectors`]: atomics for the enable, function mask, per-vector masks and pending bits.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::cast::usize_from;

/// MSI-X capability ID.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Offset of the message control register in the capability.
pub const MSIX_CONTROL_OFFSET: usize = 2;
/// The most vectors a function can have.
pub const MSIX_MAX_VECTORS: u16 = 2048;

/// The vector number of table entry `index` (or a table's length).
#[allow(
    clippy::cast_possible_truncation,
    reason = "tables hold at most MSIX_MAX_VECTORS entries"
)]
fn vector_of(index: usize) -> u16 {
    index as u16
}

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// Where an MSI goes: the address and data the guest programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (the local APIC window on x86).
    pub address: u64,
    /// Message data (vector and delivery mode on x86).
    pub data: u32,
}

/// Delivers a device's vectors: the VMM routes each to the message the guest programmed and
/// raises it on request. In a VM a vector is a KVM GSI with an MSI route and an irqfd.
pub trait MsiRouter: Send + Sync {
    /// How many vectors the router has.
    fn vector_count(&self) -> u16;
    /// Points `vector` at `message`; `None` removes its route.
    fn route(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()>;
    /// Raises `vector` (routed and unmasked: [`MsixVectors`] checks that).
    fn signal(&self, vector: u16) -> io::Result<()>;
}

/// A table entry as the guest wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address, low half (bits 1:0 are zero).
    pub address_lo: u32,
    /// Message address, high half.
    pub address_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl MsixEntry {
    /// A masked, empty entry (the state after reset).
    pub const RESET: Self = Self {
        address_lo: 0,
        address_hi: 0,
        data: 0,
        control: ENTRY_MASKED,
    };

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_hi) << 32 | u64::from(self.address_lo),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }
}

/// What a snapshot keeps of MSI-X besides the capability's message control register (which is
/// in the configuration space, saved with it): the table and the pending bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The vector table, entry by entry.
    pub table: Vec<MsixEntry>,
    /// Each vector's pending bit.
    pub pending: Vec<bool>,
}

/// A saved MSI-X state that does not fit the function's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "The snapshot's MSI-X table has {saved} vectors and {pending} pending bits, the function {configured}"
)]
pub struct MsixSizeMismatch {
    /// Table entries in the snapshot.
    pub saved: usize,
    /// Pending bits in the snapshot.
    pub pending: usize,
    /// The function's vectors.
    pub configured: usize,
}

/// A guest access to the table or PBA that MSI-X does not allow (a width other than a dword or
/// a qword, an unaligned offset, past the end, or a write to the read-only PBA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Malformed MSI-X access")]
pub struct MalformedMsixAccess;

/// What the worker threads raising vectors share with the transport that the guest programs.
pub struct MsixVectors {
    enabled: AtomicBool,
    function_masked: AtomicBool,
    masked: Box<[AtomicBool]>,
    pending: Box<[AtomicBool]>,
    router: Arc<dyn MsiRouter>,
}

impl std::fmt::Debug for MsixVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixVectors")
            .field("enabled", &self.enabled)
            .field("vectors", &self.masked.len())
            .finish_non_exhaustive()
    }
}

impl MsixVectors {
    /// Whether the guest enabled MSI-X (interrupts then never go through INTx).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    fn deliverable(&self, index: usize) -> bool {
        self.enabled.load(Ordering::SeqCst)
            && !self.function_masked.load(Ordering::SeqCst)
            && !self.masked[index].load(Ordering::SeqCst)
    }

    /// Raises `vector`, or marks it pending while it is masked (delivered once unmasked).
    /// A vector past the table is ignored.
    pub fn trigger(&self, vector: u16) -> io::Result<()> {
        let index = usize::from(vector);
        if index >= self.pending.len() {
            return Ok(());
        }
        if self.deliverable(index) {
            return self.router.signal(vector);
        }
        self.pending[index].store(true, Ordering::SeqCst);
        // The guest may have unmasked it meanwhile, and found nothing pending then.
        self.release_pending(index)
    }

    /// Delivers `index`'s pending interrupt if it can be delivered now.
    fn release_pending(&self, index: usize) -> io::Result<()> {
        if self.deliverable(index) && self.pending[index].swap(false, Ordering::SeqCst) {
            return self.router.signal(vector_of(index));
        }
        Ok(())
    }

    fn pending(&self, index: usize) -> bool {
        self.pending
            .get(index)
            .is_some_and(|p| p.load(Ordering::SeqCst))
    }
}

/// MSI-X as the guest programs it.
#[derive(Debug)]
pub struct Msix {
    /// The vector table.
    pub table: Vec<MsixEntry>,
    /// The message each vector is routed to now.
    routed: Vec<Option<MsiMessage>>,
    vectors: Arc<MsixVectors>,
}

impl Msix {
    /// MSI-X with as many vectors as `router` has (at most [`MSIX_MAX_VECTORS`]), all masked and
    /// disabled.
    pub fn new(router: Arc<dyn MsiRouter>) -> Self {
        let count = usize::from(router.vector_count().min(MSIX_MAX_VECTORS));
        let flags = |value: bool| (0..count).map(|_| AtomicBool::new(value)).collect();
        Self {
            table: vec![MsixEntry::RESET; count],
            routed: vec![None; count],
            vectors: Arc::new(MsixVectors {
                enabled: AtomicBool::new(false),
                function_masked: AtomicBool::new(false),
                masked: flags(true),
                pending: flags(false),
                router,
            }),
        }
    }

    /// Number of vectors.
    pub fn vector_count(&self) -> u16 {
        vector_of(self.table.len())
    }

    /// What the workers raise vectors through.
    pub fn vectors(&self) -> Arc<MsixVectors> {
        self.vectors.clone()
    }

    /// The capability's bytes after its ID and next pointer (message control, table and PBA
    /// offset/BIR) and their write mask, for a table at `table_offset` and a PBA at
    /// `pba_offset` in BAR `bar`.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vector_count() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut mask = [0u8; 10];
        mask[0..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
        (body, mask)
    }

    /// Bytes the table takes in its BAR.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes the PBA takes in its BAR (whole qwords).
    pub fn pba_len(&self) -> u64 {
        (self.table.len() as u64).div_ceil(64) * 8
    }

    /// The guest wrote the message control register.
    pub fn write_control(&mut self, control: u16) {
        self.vectors
            .enabled
            .store(control & CONTROL_ENABLE != 0, Ordering::SeqCst);
        self.vectors
            .function_masked
            .store(control & CONTROL_FUNCTION_MASK != 0, Ordering::SeqCst);
        for index in 0..self.table.len() {
            self.sync(index);
        }
    }

    /// Routes `index` to its entry's message when the guest can receive it, then delivers what
    /// was pending.
    fn sync(&mut self, index: usize) {
        let entry = self.table[index];
        self.vectors.masked[index].store(entry.masked(), Ordering::SeqCst);
        if !self.vectors.deliverable(index) {
            return;
        }
        let message = entry.message();
        if self.routed[index] != Some(message) {
            match self.vectors.router.route(vector_of(index), Some(message)) {
                Ok(()) => self.routed[index] = Some(message),
                Err(e) => {
                    log::warn!("Cannot route MSI-X vector {index} to {message:x?}: {e}");
                    return;
                }
            }
        }
        if let Err(e) = self.vectors.release_pending(index) {
            log::warn!("Cannot raise MSI-X vector {index}: {e}");
        }
    }

    /// The guest reads the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) -> Result<(), MalformedMsixAccess> {
        let (index, field) = self.table_slot(offset, data.len())?;
        let entry = &self.table[index];
        let words = [
            entry.address_lo,
            entry.address_hi,
            entry.data,
            entry.control,
        ];
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&words[field + i].to_le_bytes());
        }
        Ok(())
    }

    /// The guest writes the table at `offset`.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Result<(), MalformedMsixAccess> {
        let (index, field) = self.table_slot(offset, data.len())?;
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes(chunk.try_into().map_err(|_| MalformedMsixAccess)?);
            let entry = &mut self.table[index];
            match field + i {
                0 => entry.address_lo = value & !0b11,
                1 => entry.address_hi = value,
                2 => entry.data = value,
                _ => entry.control = value & ENTRY_MASKED,
            }
        }
        self.sync(index);
        Ok(())
    }

    /// The entry and dword within it of an access, if MSI-X allows it: an aligned dword, or an
    /// aligned qword within one entry.
    fn table_slot(&self, offset: u64, len: usize) -> Result<(usize, usize), MalformedMsixAccess> {
        let aligned = matches!(len, 4 | 8) && offset.is_multiple_of(len as u64);
        let index = usize::try_from(offset / MSIX_ENTRY_SIZE).map_err(|_| MalformedMsixAccess)?;
        if !aligned || index >= self.table.len() {
            return Err(MalformedMsixAccess);
        }
        Ok((index, (offset % MSIX_ENTRY_SIZE / 4) as usize))
    }

    /// The guest reads the pending-bit array at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) -> Result<(), MalformedMsixAccess> {
        let len = data.len() as u64;
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len) || offset + len > self.pba_len() {
            return Err(MalformedMsixAccess);
        }
        for (byte_index, byte) in data.iter_mut().enumerate() {
            let first = (usize_from(offset) + byte_index) * 8;
            *byte = (0..8)
                .filter(|bit| self.vectors.pending(first + bit))
                .fold(0, |acc, bit| acc | 1 << bit);
        }
        Ok(())
    }

    /// Whether `saved` fits this table (what [`Msix::restore`] checks first).
    pub fn check(&self, saved: &MsixState) -> Result<(), MsixSizeMismatch> {
        let count = self.table.len();
        if saved.table.len() != count || saved.pending.len() != count {
            return Err(MsixSizeMismatch {
                saved: saved.table.len(),
                pending: saved.pending.len(),
                configured: count,
            });
        }
        Ok(())
    }

    /// The table and the pending bits, for a snapshot.
    pub fn save(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: (0..self.table.len())
                .map(|index| self.vectors.pending(index))
                .collect(),
        }
    }

    /// Puts a saved table and pending bits back, then applies the message control register
    /// `control` as a guest write of it would: every vector the guest can receive is routed
    /// again (in a VM: its KVM GSI route, whose irqfd is already registered) and what was
    /// pending is delivered. Entries are taken as a guest write leaves them (reserved bits
    /// clear): a snapshot is untrusted input.
    pub fn restore(&mut self, saved: &MsixState, control: u16) -> Result<(), MsixSizeMismatch> {
        self.check(saved)?;
        for (index, (entry, &pending)) in saved.table.iter().zip(&saved.pending).enumerate() {
            self.table[index] = MsixEntry {
                address_lo: entry.address_lo & !0b11,
                control: entry.control & ENTRY_MASKED,
                ..*entry
            };
            self.vectors.pending[index].store(pending, Ordering::SeqCst);
        }
        self.write_control(control);
        Ok(())
    }

    /// Back to the reset state: disabled, every vector masked, not pending and unrouted.
    pub fn reset(&mut self) {
        self.write_control(0);
        for index in 0..self.table.len() {
            self.table[index] = MsixEntry::RESET;
            self.vectors.masked[index].store(true, Ordering::SeqCst);
            self.vectors.pending[index].store(false, Ordering::SeqCst);
            if self.routed[index].take().is_some()
                && let Err(e) = self.vectors.router.route(vector_of(index), None)
            {
                log::warn!("Cannot remove the route of MSI-X vector {index}: {e}");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records routes and signals.
    #[derive(Debug, Default)]
    pub(crate) struct RecordingRouter {
        pub count: u16,
        pub routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
        pub signals: Mutex<Vec<u16>>,
    }

    impl MsiRouter for RecordingRouter {
        fn vector_count(&self) -> u16 {
            self.count
        }
        fn route(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
            self.routes.lock().unwrap().push((vector, message));
            Ok(())
        }
        fn signal(&self, vector: u16) -> io::Result<()> {
            self.signals.lock().unwrap().push(vector);
            Ok(())
        }
    }

    pub(crate) fn router(count: u16) -> Arc<RecordingRouter> {
        Arc::new(RecordingRouter {
            count,
            ..Default::default()
        })
    }

    fn program(msix: &mut Msix, vector: u64, address: u64, data: u32, masked: bool) {
        let base = vector * MSIX_ENTRY_SIZE;
        msix.write_table(base, &address.to_le_bytes()).unwrap();
        msix.write_table(base + 8, &data.to_le_bytes()).unwrap();
        msix.write_table(base + 12, &u32::from(masked).to_le_bytes())
            .unwrap();
    }

    #[test]
    fn an_unmasked_vector_of_enabled_msix_is_routed_and_signalled() {
        let r = router(3);
        let mut msix = Msix::new(r.clone());
        msix.write_control(CONTROL_ENABLE);
        program(&mut msix, 1, 0xfee0_0000, 0x4041, false);
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        assert_eq!(*r.routes.lock().unwrap(), vec![(1, Some(message))]);
        msix.vectors().trigger(1).unwrap();
        assert_eq!(*r.signals.lock().unwrap(), vec![1]);
        let mut entry = [0u8; 16];
        msix.read_table(16, &mut entry[..8]).unwrap();
        msix.read_table(24, &mut entry[8..12]).unwrap();
        msix.read_table(28, &mut entry[12..]).unwrap();
        assert_eq!(&entry[..8], &0xfee0_0000u64.to_le_bytes());
        assert_eq!(&entry[8..12], &0x4041u32.to_le_bytes());
        assert_eq!(&entry[12..], &0u32.to_le_bytes());
    }

    #[test]
    fn a_masked_vector_is_pending_until_unmasked() {
        let r = router(2);
        let mut msix = Msix::new(r.clone());
        msix.write_control(CONTROL_ENABLE);
        program(&mut msix, 0, 0xfee0_0000, 0x30, true);
        msix.vectors().trigger(0).unwrap();
        assert!(r.signals.lock().unwrap().is_empty());
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba).unwrap();
        assert_eq!(pba[0], 1);
        msix.write_table(12, &0u32.to_le_bytes()).unwrap();
        assert_eq!(*r.signals.lock().unwrap(), vec![0]);
        msix.read_pba(0, &mut pba).unwrap();
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn function_mask_and_disable_hold_interrupts_back() {
        let r = router(1);
        let mut msix = Msix::new(r.clone());
        program(&mut msix, 0, 0xfee0_0000, 0x30, false);
        // Disabled: nothing routed or raised, the interrupt waits.
        msix.vectors().trigger(0).unwrap();
        assert!(r.routes.lock().unwrap().is_empty());
        msix.write_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(r.signals.lock().unwrap().is_empty());
        msix.write_control(CONTROL_ENABLE);
        assert_eq!(*r.signals.lock().unwrap(), vec![0]);
        assert_eq!(r.routes.lock().unwrap().len(), 1);
    }

    #[test]
    fn malformed_table_and_pba_accesses_are_refused() {
        let mut msix = Msix::new(router(2));
        let mut two = [0u8; 2];
        let mut four = [0u8; 4];
        assert_eq!(msix.read_table(0, &mut two), Err(MalformedMsixAccess));
        assert_eq!(msix.read_table(2, &mut four), Err(MalformedMsixAccess));
        assert_eq!(msix.write_table(32, &[0; 4]), Err(MalformedMsixAccess));
        assert_eq!(msix.write_table(4, &[0; 8]), Err(MalformedMsixAccess));
        assert_eq!(msix.read_pba(8, &mut four), Err(MalformedMsixAccess));
        assert_eq!(msix.read_pba(0, &mut two), Err(MalformedMsixAccess));
        // Nothing changed: every vector is still masked.
        assert!(msix.table.iter().all(|e| *e == MsixEntry::RESET));
    }

    #[test]
    fn capability_advertises_table_size_and_locations() {
        let msix = Msix::new(router(3));
        let (body, mask) = msix.capability(0, 0x4000, 0x6000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x6000);
        assert_eq!(u16::from_le_bytes([mask[0], mask[1]]), 0xc000);
        assert!(mask[2..].iter().all(|&b| b == 0));
    }

    #[test]
    fn reset_masks_everything_and_removes_routes() {
        let r = router(1);
        let mut msix = Msix::new(r.clone());
        msix.write_control(CONTROL_ENABLE);
        program(&mut msix, 0, 0xfee0_0000, 0x30, false);
        msix.reset();
        assert_eq!(r.routes.lock().unwrap().last(), Some(&(0, None)));
        assert!(!msix.vectors().enabled());
        msix.vectors().trigger(0).unwrap();
        assert!(r.signals.lock().unwrap().is_empty());
    }
}
