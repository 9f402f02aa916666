//! What a snapshot keeps of a virtio-pci function, and putting it back: the driver-facing core
//! (as virtio-mmio keeps it), the configuration space the guest programmed (command register,
//! BAR addresses, MSI-X message control, the `pci_cfg` window), the MSI-X table and pending
//! bits, and the virtio-pci registers (ISR status, the configuration and queue vectors).
//!
//! Restoring puts the registers back and lets the same code as a guest write re-create what
//! lives outside the function: MSI-X routes for the vectors the guest can receive (through the
//! function's [`MsiRouter`](crate::pci::msix::MsiRouter)); the root complex maps the restored
//! BARs, with their notification ioeventfds, when it next looks at the function.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::interrupt::NO_VECTOR;
use super::{MSIX_CONTROL_OFFSET, VirtioPciTransport};
use crate::pci::msix::MsixState;
use crate::virtio::VirtioInterrupt;
use crate::virtio::persist::{
    QueueSnapshot, RestoreError, SaveError, TransportState, VirtioDeviceSnapshot,
};
use crate::virtio::transport_core::CoreRegisters;

/// A virtio-pci transport's state (format version 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciTransportState {
    /// The device type behind the transport.
    pub device_type: u32,
    /// Device status (without NEEDS_RESET, kept apart).
    pub status: u32,
    /// DEVICE_NEEDS_RESET was signalled.
    pub needs_reset: bool,
    /// `device_feature_select`.
    pub device_features_select: u32,
    /// `driver_feature_select`.
    pub driver_features_select: u32,
    /// The driver's features as written.
    pub driver_features: u64,
    /// `queue_select`.
    pub queue_select: u32,
    /// `config_generation`.
    pub config_generation: u32,
    /// The queues, in order.
    pub queues: Vec<QueueSnapshot>,
    /// ISR status not yet read by the driver.
    pub isr: u8,
    /// `config_msix_vector`.
    pub config_vector: u16,
    /// Each queue's `queue_msix_vector`.
    pub queue_vectors: Vec<u16>,
    /// The conventional configuration space (256 bytes) as the guest reads it.
    pub config_space: Vec<u8>,
    /// The MSI-X table and pending bits; none for a function without MSI-X.
    pub msix: Option<MsixState>,
}

fn has(present: bool) -> &'static str {
    if present { "has" } else { "has no" }
}

impl VirtioPciTransport {
    /// The transport's and the device's state; the device must be paused.
    pub fn save_state(&self) -> Result<VirtioDeviceSnapshot, SaveError> {
        let (device, queues) = self.core.save()?;
        let core = &self.core;
        let interrupt = &self.interrupt;
        let transport = PciTransportState {
            device_type: core.device.device_type(),
            status: core.status,
            needs_reset: interrupt.needs_reset.load(Ordering::SeqCst),
            device_features_select: core.device_features_select,
            driver_features_select: core.driver_features_select,
            driver_features: core.driver_features,
            queue_select: core.queue_select,
            config_generation: core.config_generation,
            queues,
            isr: interrupt.isr.load(Ordering::SeqCst),
            config_vector: interrupt.config_vector.load(Ordering::SeqCst),
            queue_vectors: interrupt
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            config_space: self.config.save(),
            msix: self.msix.as_ref().map(|msix| msix.save()),
        };
        Ok(VirtioDeviceSnapshot {
            transport: TransportState::Pci(transport),
            device,
        })
    }

    /// Puts a new transport (over a device built from the same configuration) into the saved
    /// state, everything checked first: a snapshot is untrusted input. The device is paused; if
    /// the driver had it running it is activated again with the saved rings and starts once
    /// resumed. MSI-X vectors the guest had enabled and unmasked are routed again; the BARs are
    /// mapped by the root complex (see the module documentation).
    pub fn restore_state(&mut self, saved: &VirtioDeviceSnapshot) -> Result<(), RestoreError> {
        let state = match &saved.transport {
            TransportState::Pci(state) => state,
            other => {
                return Err(RestoreError::Transport {
                    saved: other.name(),
                    configured: "virtio-pci",
                });
            }
        };
        if state.msix.is_some() != self.msix.is_some() {
            return Err(RestoreError::MsixPresence {
                saved: has(state.msix.is_some()),
                configured: has(self.msix.is_some()),
            });
        }
        if state.queue_vectors.len() != self.interrupt.queue_vectors.len() {
            return Err(RestoreError::QueueVectors {
                saved: state.queue_vectors.len(),
                device: self.interrupt.queue_vectors.len(),
            });
        }
        if let (Some(msix), Some(saved)) = (&self.msix, &state.msix) {
            msix.check(saved).map_err(RestoreError::MsixSize)?;
        }
        // Checked on a copy: the function's space changes only once everything is valid.
        let mut config = self.config.clone();
        config
            .restore(&state.config_space)
            .map_err(RestoreError::PciConfig)?;
        let registers = CoreRegisters {
            device_type: state.device_type,
            status: state.status,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            driver_features: state.driver_features,
            queue_select: state.queue_select,
            config_generation: state.config_generation,
            queues: &state.queues,
        };
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.core
            .restore(registers, &saved.device, state.needs_reset, &interrupt)?;
        self.config = config;

        // The vectors as a guest write would have left them.
        let usable = |vector: u16| match &self.msix {
            Some(msix) if vector < msix.vector_count() => vector,
            _ => NO_VECTOR,
        };
        let irq = &self.interrupt;
        irq.isr.store(state.isr, Ordering::SeqCst);
        irq.needs_reset.store(state.needs_reset, Ordering::SeqCst);
        irq.config_vector
            .store(usable(state.config_vector), Ordering::SeqCst);
        for (slot, &vector) in irq.queue_vectors.iter().zip(&state.queue_vectors) {
            slot.store(usable(vector), Ordering::SeqCst);
        }
        irq.intx_enabled
            .store(self.config.intx_enabled(), Ordering::SeqCst);
        if let (Some(msix), Some(saved), Some(cap)) =
            (self.msix.as_mut(), &state.msix, self.msix_capability)
        {
            let control = self.config.u16_at(cap + MSIX_CONTROL_OFFSET);
            msix.restore(saved, control)
                .map_err(RestoreError::MsixSize)?;
        }
        Ok(())
    }
}
