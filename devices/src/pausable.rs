/// A device the VMM can pause (Cloud Hypervisor's `Pausable`): while paused it neither writes
/// guest memory nor its backend, and raises no interrupt; what arrives from the host meanwhile
/// waits for the resume. `vm.pause` pauses the vCPUs first, then every device.
pub trait Pausable {
    /// Finishes the work in flight, then stops working until [`Pausable::resume`].
    fn pause(&mut self) -> Result<(), PauseError>;
    /// Goes on where the device stopped.
    fn resume(&mut self);
}

/// Errors pausing a device.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// A virtio device's worker cannot be paused (it has ended).
    #[error("Cannot pause the {device} device")]
    Worker {
        /// The device type's name.
        device: &'static str,
        /// Cause.
        #[source]
        source: crate::virtio::WorkerError,
    },
}

impl Pausable for crate::virtio::mmio::MmioTransport {
    fn pause(&mut self) -> Result<(), PauseError> {
        let device = device_name(self.device_type());
        crate::virtio::mmio::MmioTransport::pause(self)
            .map_err(|source| PauseError::Worker { device, source })
    }

    fn resume(&mut self) {
        crate::virtio::mmio::MmioTransport::resume(self);
    }
}

impl Pausable for crate::virtio::pci::VirtioPciTransport {
    fn pause(&mut self) -> Result<(), PauseError> {
        let device = device_name(self.device_type());
        crate::virtio::pci::VirtioPciTransport::pause(self)
            .map_err(|source| PauseError::Worker { device, source })
    }

    fn resume(&mut self) {
        crate::virtio::pci::VirtioPciTransport::resume(self);
    }
}

fn device_name(device_type: u32) -> &'static str {
    match device_type {
        crate::virtio::TYPE_BLOCK => "virtio-blk",
        crate::virtio::TYPE_NET => "virtio-net",
        crate::virtio::TYPE_RNG => "virtio-rng",
        _ => "virtio",
    }
}
