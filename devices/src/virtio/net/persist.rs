//! virtio-net's part of a snapshot.

use serde::{Deserialize, Serialize};

use super::super::VirtioDevice;
use super::super::persist::{RestoreError, VirtioDeviceState, check_features};
use super::{Net, config_space};

/// virtio-net state, format version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The MAC address the guest knows (a random one was generated when none was configured).
    pub mac: [u8; 6],
    /// The MTU advertised.
    pub mtu: Option<u16>,
}

impl Net {
    pub(super) fn persist(&self) -> NetState {
        NetState {
            acked_features: self.acked,
            mac: self.mac,
            mtu: self.mtu,
        }
    }

    /// Takes a snapshot's state; the guest keeps its MAC address whatever the configuration
    /// says now.
    pub(super) fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        let VirtioDeviceState::Net(state) = state else {
            return Err(RestoreError::DeviceKind {
                saved: state.kind(),
                configured: "virtio-net",
            });
        };
        if state.mac[0] & 1 != 0 {
            return Err(RestoreError::Mac);
        }
        self.mac = state.mac;
        self.mtu = state.mtu;
        self.config = config_space(self.mac, self.mtu);
        check_features(state.acked_features, self.features())?;
        self.acked = state.acked_features;
        Ok(())
    }
}
