//! virtio-rng: an entropy source backed by the host's `getrandom(2)`.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestMemoryError};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::persist::{RestoreError, VirtioDeviceState};
use super::{
    ActivateError, ActiveQueue, DeviceHandler, DeviceWorker, GuestMemoryMmap, InterruptKind,
    TYPE_RNG, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, WorkerError, take_queues,
};
use crate::seccomp::WorkerKind;

const QUEUE_SIZE: u16 = 256;
const WORKER_NAME: &str = "virtio-rng";
/// Bytes served per request at most: a guest asking for more gets this much.
const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    worker: DeviceWorker,
}

impl Default for Rng {
    fn default() -> Self {
        Self {
            worker: DeviceWorker::new(WORKER_NAME),
        }
    }
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let [ActiveQueue { queue, notify }] = take_queues(&self.worker, queues)?;
        let handler = RngHandler {
            mem,
            queue,
            notify,
            interrupt,
        };
        self.worker.activate(handler).map_err(ActivateError::Run)
    }

    fn start_worker_thread(&mut self, seccomp: bool) -> Result<(), WorkerError> {
        self.worker.start_thread(WorkerKind::Rng, seccomp)
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn worker(&self) -> Option<&DeviceWorker> {
        Some(&self.worker)
    }

    fn worker_mut(&mut self) -> Option<&mut DeviceWorker> {
        Some(&mut self.worker)
    }

    fn save_state(&self) -> Option<VirtioDeviceState> {
        Some(VirtioDeviceState::Rng)
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        match state {
            VirtioDeviceState::Rng => Ok(()),
            other => Err(RestoreError::DeviceKind {
                saved: other.kind(),
                configured: "virtio-rng",
            }),
        }
    }
}

/// Fills `buf` from the host's entropy pool.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is valid writable memory of the given length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n.unsigned_abs();
    }
    Ok(())
}

/// The worker's side: owns the queue.
#[allow(missing_debug_implementations)]
pub struct RngHandler<I: ?Sized + VirtioInterrupt = dyn VirtioInterrupt> {
    mem: GuestMemoryMmap,
    queue: Queue,
    notify: EventFd,
    interrupt: Arc<I>,
}

/// Events the rng worker waits for.
#[repr(u32)]
enum RngEvent {
    QueueNotify = 0,
}

impl<I: ?Sized + VirtioInterrupt> RngHandler<I> {
    /// A handler over `queue` (exposed for tests and fuzzing).
    pub fn new(mem: GuestMemoryMmap, queue: Queue, notify: EventFd, interrupt: Arc<I>) -> Self {
        Self {
            mem,
            queue,
            notify,
            interrupt,
        }
    }

    /// Serves every available request; returns how many were completed.
    pub fn process_queue(&mut self) -> Result<usize, virtio_queue::Error> {
        let mut served = 0;
        loop {
            self.queue.disable_notification(&self.mem)?;
            while let Some(chain) = self.queue.iter(&self.mem)?.next() {
                let head = chain.head_index();
                let mut written: u32 = 0;
                for desc in chain {
                    if !desc.is_write_only() || written >= MAX_REQUEST_BYTES {
                        continue;
                    }
                    let len = desc.len().min(MAX_REQUEST_BYTES - written);
                    match self.fill_guest(desc.addr(), len) {
                        Ok(()) => written += len,
                        Err(e) => {
                            log::debug!("virtio-rng: bad buffer: {e}");
                            break;
                        }
                    }
                }
                self.queue.add_used(&self.mem, head, written)?;
                served += 1;
                if self.queue.needs_notification(&self.mem)?
                    && let Err(e) = self.interrupt.trigger(InterruptKind::Queue(0))
                {
                    crate::limited_log!(
                        log::Level::Warn,
                        "virtio-rng: cannot interrupt the guest: {e}"
                    );
                }
            }
            if !self.queue.enable_notification(&self.mem)? {
                break;
            }
        }
        Ok(served)
    }

    fn fill_guest(&self, addr: vm_memory::GuestAddress, len: u32) -> Result<(), GuestMemoryError> {
        let mut buf = vec![0u8; len as usize];
        fill_random(&mut buf).map_err(GuestMemoryError::IOError)?;
        self.mem.write_slice(&buf, addr)
    }
}

impl<I: ?Sized + VirtioInterrupt + 'static> DeviceHandler for RngHandler<I>
where
    Self: Send,
{
    fn queue_states(&self) -> Vec<QueueState> {
        vec![self.queue.state()]
    }
}

impl<I: ?Sized + VirtioInterrupt> MutEventSubscriber for RngHandler<I> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() != RngEvent::QueueNotify as u32 {
            return;
        }
        let _ = self.notify.read();
        if let Err(e) = self.process_queue() {
            crate::limited_log!(
                log::Level::Warn,
                "virtio-rng: queue error, device needs reset: {e}"
            );
            self.interrupt.signal_needs_reset();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.notify,
            RngEvent::QueueNotify as u32,
            EventSet::IN,
        )) {
            log::error!("virtio-rng: cannot watch the queue: {e:?}");
        }
        // Requests posted before activation are served now.
        if let Err(e) = self.process_queue() {
            crate::limited_log!(
                log::Level::Warn,
                "virtio-rng: queue error, device needs reset: {e}"
            );
            self.interrupt.signal_needs_reset();
        }
    }
}

#[cfg(test)]
mod tests;
