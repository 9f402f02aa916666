//! virtio-net (virtio 1.x §5.1): a network card backed by a host tap.
//!
//! [`Net`] is the device as the transport sees it: one rx/tx queue pair, checksum and TSO
//! offloads both ways, merged rx buffers. Its worker is a [`NetHandler`] moving frames between
//! the queues and a [`NetBackend`]: a [`Tap`] in a VM, a [`SocketBackend`] in tests.

mod backend;
mod handler;
mod persist;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

pub use backend::{IoBufs, IovecCache, NetBackend, SocketBackend, Tap, TapError, VNET_HDR_LEN};
pub use handler::{MAX_BUFFER_LEN, MAX_FRAME_LEN, NetHandler};
pub use persist::NetState;

use super::persist::{RestoreError, VirtioDeviceState};
use super::{
    ActivateError, ActiveQueue, DeviceWorker, GuestMemoryMmap, TYPE_NET, VIRTIO_F_VERSION_1,
    VirtioDevice, VirtioInterrupt, WorkerError, read_config_bytes, take_queues,
};
use crate::seccomp::WorkerKind;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Smallest MTU the device accepts (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Length of `struct virtio_net_config` up to `mtu`.
const CONFIG_LEN: usize = 12;

/// How to set up a [`Net`] device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// Host tap interface (must exist for [`Net::new`]).
    pub tap: String,
    /// Guest MAC address; default: a random locally administered unicast one.
    pub mac: Option<[u8; 6]>,
    /// MTU to advertise (`VIRTIO_NET_F_MTU`); default: none, the guest picks.
    pub mtu: Option<u16>,
    /// Name in logs and the worker thread; default: the tap name.
    pub id: Option<String>,
}

/// Errors creating a [`Net`] device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap cannot be opened (the error names it).
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The MTU is too small.
    #[error("MTU {0} is below the minimum of {MIN_MTU}")]
    MtuTooSmall(u16),
    /// The MAC address is a multicast one.
    #[error("MAC address {} is multicast", format_mac(.0))]
    MulticastMac([u8; 6]),
    /// No random bytes for a MAC address.
    #[error("Cannot generate a MAC address")]
    RandomMac(#[source] std::io::Error),
}

/// Per-device statistics. Bytes count frames without their virtio header.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames from the backend dropped: too large for the guest's buffers, or malformed.
    pub rx_dropped: AtomicU64,
    /// Malformed rx chains (returned empty) and backend read failures.
    pub rx_errors: AtomicU64,
    /// Frames the guest sent that the backend took.
    pub tx_packets: AtomicU64,
    /// Bytes the guest sent that the backend took.
    pub tx_bytes: AtomicU64,
    /// Well-formed frames the backend refused (e.g. a bad GSO header, the tap down).
    pub tx_dropped: AtomicU64,
    /// Malformed tx chains (short, device-writable, outside guest memory, oversized): dropped.
    pub tx_errors: AtomicU64,
}

impl NetCounters {
    /// Loads a counter (relaxed: statistics only).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    backend: Box<dyn NetBackend>,
    id: String,
    mac: [u8; 6],
    mtu: Option<u16>,
    config: [u8; CONFIG_LEN],
    acked: u64,
    counters: Arc<NetCounters>,
    worker: DeviceWorker,
}

impl Net {
    /// Opens the existing tap `config.tap` (e.g. one that KubeVirt or `ip tuntap add` created).
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        Self::with_backend(config, Box::new(tap))
    }

    /// A device on any backend (`config.tap` only names it in logs).
    pub fn with_backend(config: NetConfig, backend: Box<dyn NetBackend>) -> Result<Self, NetError> {
        let NetConfig { tap, mac, mtu, id } = config;
        if let Some(mtu) = mtu
            && mtu < MIN_MTU
        {
            return Err(NetError::MtuTooSmall(mtu));
        }
        let mac = match mac {
            Some(mac) if mac[0] & 1 != 0 => return Err(NetError::MulticastMac(mac)),
            Some(mac) => mac,
            None => random_mac().map_err(NetError::RandomMac)?,
        };
        let id = id.unwrap_or(tap);
        Ok(Self {
            backend,
            worker: DeviceWorker::new(format!("virtio-net-{id}")),
            id,
            mac,
            mtu,
            config: config_space(mac, mtu),
            acked: 0,
            counters: Arc::new(NetCounters::default()),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's name in logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Frame statistics, shared with the worker.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Builds the worker for the rx and tx queues without starting a thread, with the backend's
    /// offloads set to what the driver accepted: [`VirtioDevice::activate`] runs it on the
    /// device's worker thread; tests and benchmarks drive it directly.
    pub fn handler<I: ?Sized + VirtioInterrupt>(
        &self,
        mem: GuestMemoryMmap,
        rx: ActiveQueue,
        tx: ActiveQueue,
        interrupt: Arc<I>,
    ) -> std::io::Result<NetHandler<I>> {
        let mut backend = self.backend.try_clone()?;
        let offloads = tap_offloads(self.acked);
        if let Err(e) = backend.set_offload(offloads) {
            // The tap then sends plain frames, which every driver takes.
            crate::limited_log!(
                log::Level::Warn,
                "virtio-net {}: cannot set offloads {offloads:#x}: {e}",
                self.id
            );
        }
        let mrg_rxbuf = self.acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        Ok(NetHandler::new(
            mem,
            rx,
            tx,
            interrupt,
            backend,
            self.counters.clone(),
            mrg_rxbuf,
        ))
    }
}

/// Tap offloads (`TUN_F_*`) matching the features the driver accepted: the frames the tap
/// hands over may then carry partial checksums and TSO. TSO needs GUEST_CSUM (as in the
/// spec's feature dependencies).
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

/// A random locally administered unicast address.
pub fn random_mac() -> std::io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    // SAFETY: `mac` is valid writable memory of the given length.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if usize::try_from(n).ok() != Some(mac.len()) {
        return Err(std::io::Error::last_os_error());
    }
    mac[0] = (mac[0] & !0x01) | 0x02;
    Ok(mac)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `struct virtio_net_config` up to `mtu`, little-endian.
fn config_space(mac: [u8; 6], mtu: Option<u16>) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[0..6].copy_from_slice(&mac);
    #[allow(clippy::cast_possible_truncation, reason = "the status bit is 1")]
    let link_up = VIRTIO_NET_S_LINK_UP as u16;
    c[6..8].copy_from_slice(&link_up.to_le_bytes());
    // max_virtqueue_pairs: one pair (MQ is not offered).
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    c
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
        for bit in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
        ] {
            features |= 1 << bit;
        }
        if self.mtu.is_some() {
            features |= 1 << VIRTIO_NET_F_MTU;
        }
        features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only for legacy drivers; nothing else is.
        log::debug!(
            "virtio-net {}: ignoring a {}-byte config write at {offset:#x}",
            self.id,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let [rx, tx] = take_queues(&self.worker, queues)?;
        let handler = self
            .handler(mem, rx, tx, interrupt)
            .map_err(ActivateError::Worker)?;
        self.worker.activate(handler).map_err(ActivateError::Run)?;
        log::debug!(
            "virtio-net {}: active, MAC {}, offloads {:#x}",
            self.id,
            format_mac(&self.mac),
            tap_offloads(self.acked)
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.worker.stop();
        self.acked = 0;
    }

    fn start_worker_thread(&mut self, seccomp: bool) -> Result<(), WorkerError> {
        self.worker.start_thread(WorkerKind::Net, seccomp)
    }

    fn worker(&self) -> Option<&DeviceWorker> {
        Some(&self.worker)
    }

    fn worker_mut(&mut self) -> Option<&mut DeviceWorker> {
        Some(&mut self.worker)
    }

    fn save_state(&self) -> Option<VirtioDeviceState> {
        Some(VirtioDeviceState::Net(self.persist()))
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        self.restore(state)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_rx;
#[cfg(test)]
mod tests_tap;
