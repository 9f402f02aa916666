//! The block handler's life around the request path: the worker's event loop, pausing (every
//! request in flight completed and returned) and stopping (in-flight I/O drained, then a flush
//! if anything was written since the last one).

use std::io;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::QueueState;
use vmm_sys_util::epoll::EventSet;

use super::super::super::{DeviceHandler, VirtioInterrupt};
use super::super::backend::DiskOp;
use super::{BlockEvent, BlockHandler, STOP_FLUSH_TOKEN};

impl<I: ?Sized + VirtioInterrupt> BlockHandler<I> {
    /// Whether writes were started since the last completed FLUSH covering them.
    pub fn has_unflushed_writes(&self) -> bool {
        self.writes_started > self.writes_synced
    }

    /// Waits for every operation in flight, then flushes the disk if anything was written
    /// since the last completed FLUSH. Requests that finish here are not returned to the
    /// guest: the device is being reset or the VM is going away. Runs when the handler is
    /// dropped, i.e. when its worker stops; errors are logged there with the disk's path.
    pub(super) fn drain_and_flush(&mut self) -> io::Result<()> {
        let waited = self.backend.wait_all(&mut self.done);
        self.done.clear();
        self.in_flight.clear();
        self.free.clear();
        self.busy = 0;
        waited?;
        if self.disk.read_only
            || self.disk.handed_over.load(Ordering::SeqCst)
            || !self.has_unflushed_writes()
        {
            return Ok(());
        }
        let outcome = match self
            .backend
            .start(&self.mem, DiskOp::Flush, STOP_FLUSH_TOKEN)
        {
            Some(outcome) => outcome,
            None => {
                self.backend.wait_all(&mut self.done)?;
                self.done
                    .drain(..)
                    .find(|(token, _)| *token == STOP_FLUSH_TOKEN)
                    .map_or_else(|| Err(io::Error::other("flush did not complete")), |d| d.1)
            }
        };
        outcome?;
        self.writes_synced = self.writes_started;
        Ok(())
    }
}

impl<I: ?Sized + VirtioInterrupt> Drop for BlockHandler<I> {
    fn drop(&mut self) {
        if let Err(e) = self.drain_and_flush() {
            log::error!(
                "virtio-blk: cannot flush disk {} as its worker stops: {e}",
                self.disk.path.display()
            );
        }
    }
}

impl<I: ?Sized + VirtioInterrupt> BlockHandler<I> {
    /// Waits for every operation in flight and returns its request to the guest (status,
    /// used entry, interrupt): what a pause needs before the worker parks.
    pub fn complete_in_flight(&mut self) -> Result<usize, virtio_queue::Error> {
        self.settle_image();
        let completed = self.flush_answers()?;
        self.notify_guest()?;
        self.stats.publish(&self.disk.counters);
        Ok(completed)
    }
}

impl<I: ?Sized + VirtioInterrupt> BlockHandler<I> {
    /// Waits for every operation in flight (their answers queued) and writes a qcow2 image's
    /// cached metadata to the file: a snapshot or a migration's receiver opens the image
    /// afresh and must see every completed write.
    fn settle_image(&mut self) {
        if let Err(e) = self.backend.wait_all(&mut self.done) {
            log::warn!(
                "virtio-blk: waiting for the I/O in flight on {} failed: {e}",
                self.disk.path.display()
            );
        }
        self.finish_done();
        if let Err(e) = self.backend.write_back() {
            log::error!(
                "virtio-blk: cannot write back the metadata of {}: {e}",
                self.disk.path.display()
            );
        }
    }
}

impl<I: ?Sized + VirtioInterrupt + 'static> DeviceHandler for BlockHandler<I>
where
    Self: Send,
{
    fn quiesce(&mut self) {
        if self.broken {
            // The queue waits for a reset, but the image is settled all the same.
            self.settle_image();
            return;
        }
        if let Err(e) = self.complete_in_flight() {
            self.fail(e);
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        vec![self.queue.state()]
    }
}

impl<I: ?Sized + VirtioInterrupt> MutEventSubscriber for BlockHandler<I> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let result = match events.data() {
            d if d == BlockEvent::QueueNotify as u32 => {
                let _ = self.notify.read();
                if self.broken {
                    return;
                }
                self.process_queue()
            }
            d if d == BlockEvent::Completion as u32 => {
                if let Some(fd) = self.backend.completion_fd() {
                    drain_eventfd(fd);
                }
                if self.broken {
                    return;
                }
                self.process_completions()
            }
            _ => return,
        };
        if let Err(e) = result {
            self.fail(e);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.notify,
            BlockEvent::QueueNotify as u32,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: cannot watch the queue: {e:?}");
        }
        if let Some(fd) = self.backend.completion_fd()
            && let Err(e) = ops.add(Events::with_data_raw(
                fd,
                BlockEvent::Completion as u32,
                EventSet::IN,
            ))
        {
            log::error!("virtio-blk: cannot watch I/O completions: {e:?}");
        }
        // Requests posted before activation are served now.
        if let Err(e) = self.process_queue() {
            self.fail(e);
        }
    }
}

/// Resets a non-blocking eventfd the handler does not own as an `EventFd`.
fn drain_eventfd(fd: std::os::fd::RawFd) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from an open eventfd (non-blocking).
    let _ = unsafe { libc::read(fd, (&raw mut value).cast(), std::mem::size_of::<u64>()) };
}
