//! virtio-blk's part of a snapshot. The disk's contents are not in it: like Cloud
//! Hypervisor, rvmm leaves the disk image to the user, who restores it as it was (or
//! unchanged) alongside the snapshot.

use serde::{Deserialize, Serialize};

use super::super::VirtioDevice;
use super::super::persist::{RestoreError, VirtioDeviceState, check_features};
use super::Block;

/// virtio-blk state, format version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Disk size the guest saw, in 512-byte sectors.
    pub capacity: u64,
    /// The guest saw a read-only disk.
    pub readonly: bool,
}

fn mode(readonly: bool) -> &'static str {
    match readonly {
        true => "read-only",
        false => "writable",
    }
}

impl Block {
    pub(super) fn persist(&self) -> BlockState {
        BlockState {
            acked_features: self.acked,
            capacity: self.capacity,
            readonly: self.readonly,
        }
    }

    /// Takes a snapshot's state: the disk must look to the guest as it did.
    pub(super) fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        let VirtioDeviceState::Block(state) = state else {
            return Err(RestoreError::DeviceKind {
                saved: state.kind(),
                configured: "virtio-blk",
            });
        };
        if state.capacity != self.capacity {
            return Err(RestoreError::DiskSize {
                path: self.path.clone(),
                configured: self.capacity,
                saved: state.capacity,
            });
        }
        if state.readonly != self.readonly {
            return Err(RestoreError::DiskMode {
                path: self.path.clone(),
                configured: mode(self.readonly),
                saved: mode(state.readonly),
            });
        }
        check_features(state.acked_features, self.features())?;
        self.acked = state.acked_features;
        Ok(())
    }
}
