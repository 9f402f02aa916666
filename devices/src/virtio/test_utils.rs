//! Test doubles shared by the device tests.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::{
    ActivateError, ActiveQueue, GuestMemoryMmap, InterruptKind, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioInterrupt, persist,
};

/// Counts the interrupts a device raises and its needs-reset signals.
#[derive(Default)]
pub(crate) struct CountingInterrupt {
    pub queue: AtomicUsize,
    pub needs_reset: AtomicUsize,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        self.queue.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// What a [`FakeDevice`] was asked to do.
#[derive(Default)]
pub(crate) struct Record {
    pub acked: u64,
    pub activations: Vec<Vec<(u16, u64, u64, u64)>>,
    pub resets: usize,
    pub config_writes: Vec<(u64, Vec<u8>)>,
}

/// A virtio device with two queues (16 and 8 entries) that records what the transport does to
/// it; its configuration space reads back offset + index.
pub(crate) struct FakeDevice {
    record: Arc<Mutex<Record>>,
    fail_activation: bool,
    device_type: u32,
    queue_sizes: Vec<u16>,
}

impl FakeDevice {
    /// A device whose activations fail when `fail_activation` is set, and its record.
    pub(crate) fn new(fail_activation: bool) -> (Self, Arc<Mutex<Record>>) {
        let record = Arc::new(Mutex::new(Record::default()));
        let device = Self {
            record: record.clone(),
            fail_activation,
            device_type: crate::virtio::TYPE_RNG,
            queue_sizes: vec![16, 8],
        };
        (device, record)
    }

    /// A device of type `device_type` with queues of `queue_sizes`.
    pub(crate) fn shaped(device_type: u32, queue_sizes: Vec<u16>) -> Self {
        Self {
            device_type,
            queue_sizes,
            ..Self::new(false).0
        }
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << 3
    }
    fn ack_features(&mut self, features: u64) {
        self.record.lock().unwrap().acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.record
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::AlreadyActive);
        }
        let qs = queues
            .iter()
            .map(|q| {
                (
                    q.queue.size(),
                    q.queue.desc_table(),
                    q.queue.avail_ring(),
                    q.queue.used_ring(),
                )
            })
            .collect();
        self.record.lock().unwrap().activations.push(qs);
        Ok(())
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
    }
    fn save_state(&self) -> Option<persist::VirtioDeviceState> {
        Some(persist::VirtioDeviceState::Rng)
    }
    fn restore_state(
        &mut self,
        state: &persist::VirtioDeviceState,
    ) -> Result<(), persist::RestoreError> {
        match state {
            persist::VirtioDeviceState::Rng => Ok(()),
            other => Err(persist::RestoreError::DeviceKind {
                saved: other.kind(),
                configured: "fake",
            }),
        }
    }
}
