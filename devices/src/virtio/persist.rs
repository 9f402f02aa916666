//! What a snapshot keeps of a virtio device and its transport. The structures are plain data;
//! vmm-core's `snapshot` module puts them in the versioned state file (and documents the
//! format). Restoring validates everything: a snapshot file is untrusted input.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use super::WorkerError;
use super::block::BlockState;
use super::mmio::MmioTransportState;
use super::net::NetState;
use super::pci::PciTransportState;
use crate::pci::ConfigSpaceMismatch;
use crate::pci::msix::MsixSizeMismatch;

/// One virtqueue: its configuration and where the device is in its rings (virtio-queue's
/// `QueueState`, field for field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device takes.
    pub next_avail: u16,
    /// Next used-ring entry the device fills.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The device-specific part of a virtio device's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-rng (nothing beyond its queue).
    Rng,
}

impl VirtioDeviceState {
    /// The device's name in messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block(_) => "virtio-blk",
            Self::Net(_) => "virtio-net",
            Self::Rng => "virtio-rng",
        }
    }
}

/// A transport's state. A new transport adds a variant at the end, which keeps older files
/// readable (a variant is encoded as its index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransportState {
    /// virtio-mmio.
    Mmio(MmioTransportState),
    /// virtio-pci (format version 2).
    Pci(PciTransportState),
}

impl TransportState {
    /// The transport's name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mmio(_) => "virtio-mmio",
            Self::Pci(_) => "virtio-pci",
        }
    }
}

/// A virtio device as a snapshot keeps it: the transport (with the queues) and the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceSnapshot {
    /// The transport's registers and queues.
    pub transport: TransportState,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

/// Errors saving a device's state.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The device runs: its queues move under the snapshot.
    #[error("The {0} device is not paused")]
    NotPaused(&'static str),
    /// The device keeps no state a snapshot can hold ([`super::VirtioDevice::save_state`]).
    #[error("The virtio device of type {0} cannot be saved")]
    Unsaved(u32),
}

/// Errors restoring a device from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot's device is another kind than the configured one.
    #[error("The snapshot has a {saved} device where the configuration has a {configured} device")]
    DeviceKind {
        /// In the snapshot.
        saved: &'static str,
        /// In the configuration.
        configured: &'static str,
    },
    /// The snapshot's device sits on another transport than the configured one.
    #[error("The snapshot's device is on {saved}, the configuration puts it on {configured}")]
    Transport {
        /// In the snapshot.
        saved: &'static str,
        /// In the configuration.
        configured: &'static str,
    },
    /// The snapshot's device type number is not the configured device's.
    #[error(
        "The snapshot's transport holds device type {saved}, the configured device is type {configured}"
    )]
    DeviceType {
        /// In the snapshot.
        saved: u32,
        /// In the configuration.
        configured: u32,
    },
    /// Queue count mismatch.
    #[error("The snapshot has {saved} queues, the device has {device}")]
    QueueCount {
        /// In the snapshot.
        saved: usize,
        /// The device's.
        device: usize,
    },
    /// A queue's saved state is impossible.
    #[error("Queue {index} of the snapshot is invalid")]
    Queue {
        /// The queue.
        index: usize,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// A saved queue lies outside guest memory.
    #[error("Queue {0} of the snapshot is not in guest memory")]
    QueueMemory(usize),
    /// Features the device does not offer.
    #[error(
        "The snapshot's driver features {saved:#x} are not a subset of the offered {offered:#x}"
    )]
    Features {
        /// Acked in the snapshot.
        saved: u64,
        /// Offered by the configured device.
        offered: u64,
    },
    /// The disk's size changed since the snapshot.
    #[error("Disk {path} has {configured} sectors, the snapshot's guest saw {saved}")]
    DiskSize {
        /// The disk.
        path: std::path::PathBuf,
        /// Its size now.
        configured: u64,
        /// In the snapshot.
        saved: u64,
    },
    /// Read-only setting changed.
    #[error("Disk {path} is {configured} now but was {saved} in the snapshot")]
    DiskMode {
        /// The disk.
        path: std::path::PathBuf,
        /// Now.
        configured: &'static str,
        /// Then.
        saved: &'static str,
    },
    /// The PCI function's configuration space is not the configured function's.
    #[error("The snapshot's PCI function does not match the configured one")]
    PciConfig(#[source] ConfigSpaceMismatch),
    /// One side has MSI-X and the other not (the host's KVM refused MSI routes on one of them).
    #[error("The snapshot's PCI function {saved} MSI-X, the configured one {configured} MSI-X")]
    MsixPresence {
        /// "has" or "has no", in the snapshot.
        saved: &'static str,
        /// The same for the configured function.
        configured: &'static str,
    },
    /// The MSI-X table is not the function's size.
    #[error("The snapshot's MSI-X state does not fit the function")]
    MsixSize(#[source] MsixSizeMismatch),
    /// Not one MSI-X vector setting per queue.
    #[error("The snapshot has MSI-X vectors for {saved} queues, the device has {device}")]
    QueueVectors {
        /// In the snapshot.
        saved: usize,
        /// The device's.
        device: usize,
    },
    /// The MAC address cannot be used.
    #[error("The snapshot's MAC address is multicast")]
    Mac,
    /// The restored device cannot be started.
    #[error("Cannot start the restored device: {0}")]
    Activate(String),
    /// The restored device cannot be paused before it starts.
    #[error("Cannot pause the restored device")]
    Pause(#[source] WorkerError),
}

/// Checks that the acked features are ones the device offers.
pub fn check_features(saved: u64, offered: u64) -> Result<(), RestoreError> {
    match saved & !offered {
        0 => Ok(()),
        _ => Err(RestoreError::Features { saved, offered }),
    }
}
