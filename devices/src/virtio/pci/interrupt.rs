//! How a virtio-pci device interrupts the driver (virtio 1.x §4.1.4.5, §4.1.5.3-4): through the
//! MSI-X vector the driver chose for the queue or for configuration changes when MSI-X is
//! enabled, otherwise through the ISR status byte and the INTx line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::pci::msix::MsixVectors;
use crate::virtio::{InterruptKind, VirtioInterrupt};

/// The vector value meaning "no vector" (`VIRTIO_MSI_NO_VECTOR`).
pub const NO_VECTOR: u16 = 0xffff;

/// ISR status: a queue interrupt.
pub(super) const ISR_QUEUE: u8 = 1;
/// ISR status: a configuration change (or NEEDS_RESET).
pub(super) const ISR_CONFIG: u8 = 2;

/// The interrupt state a virtio-pci transport shares with its device's worker thread.
#[derive(Debug)]
pub struct PciInterrupt {
    pub(super) isr: AtomicU8,
    pub(super) needs_reset: AtomicBool,
    pub(super) config_vector: AtomicU16,
    pub(super) queue_vectors: Box<[AtomicU16]>,
    /// Set while the command register's INTx disable bit is clear.
    pub(super) intx_enabled: AtomicBool,
    msix: Option<Arc<MsixVectors>>,
    intx: EventFd,
}

impl PciInterrupt {
    /// Interrupts for `queues` queues: MSI-X through `msix` when the guest enables it, INTx by
    /// raising `intx` (an irqfd) otherwise.
    pub fn new(queues: usize, msix: Option<Arc<MsixVectors>>, intx: EventFd) -> Self {
        Self {
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            intx_enabled: AtomicBool::new(true),
            msix,
            intx,
        }
    }

    /// The MSI-X vector interrupts of `kind` raise, as the driver sets it (restoring a saved
    /// device, driving a device without its transport); a queue the device lacks is ignored.
    pub fn set_vector(&self, kind: InterruptKind, vector: u16) {
        let slot = match kind {
            InterruptKind::Queue(index) => self.queue_vectors.get(usize::from(index)),
            InterruptKind::Config => Some(&self.config_vector),
        };
        if let Some(slot) = slot {
            slot.store(vector, Ordering::SeqCst);
        }
    }

    /// Back to the state after a device reset: no vectors, nothing pending in ISR.
    pub(super) fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for vector in &self.queue_vectors {
            vector.store(NO_VECTOR, Ordering::SeqCst);
        }
    }

    /// Reads ISR status, which clears it (the INTx line drops at the guest's EOI).
    pub(super) fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::SeqCst)
    }

    fn vector(&self, kind: InterruptKind) -> u16 {
        match kind {
            InterruptKind::Queue(index) => self
                .queue_vectors
                .get(usize::from(index))
                .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst)),
            InterruptKind::Config => self.config_vector.load(Ordering::SeqCst),
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        if kind == InterruptKind::Config {
            // Set whichever way the interrupt goes (§4.1.5.3).
            self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        }
        if let Some(msix) = self.msix.as_ref().filter(|m| m.enabled()) {
            return match self.vector(kind) {
                // The driver asked for no interrupt of this kind.
                NO_VECTOR => Ok(()),
                vector => msix.trigger(vector),
            };
        }
        if matches!(kind, InterruptKind::Queue(_)) {
            self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        }
        if self.intx_enabled.load(Ordering::SeqCst) {
            self.intx.write(1)?;
        }
        Ok(())
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.trigger(InterruptKind::Config) {
            log::warn!("Cannot raise the needs-reset interrupt: {e}");
        }
    }
}
