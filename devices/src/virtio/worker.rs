//! A device worker: one thread per active device, driven by event-manager, stopped through an
//! eventfd.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Event data reserved for the worker's stop eventfd; device events must use other values.
pub const STOP_EVENT: u32 = u32::MAX;

/// Wraps a device's subscriber with the stop eventfd.
struct Stoppable<H> {
    inner: H,
    stop: EventFd,
    stopped: Arc<AtomicBool>,
}

impl<H: MutEventSubscriber> MutEventSubscriber for Stoppable<H> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == STOP_EVENT {
            let _ = self.stop.read();
            self.stopped.store(true, Ordering::SeqCst);
        } else {
            self.inner.process(events, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.stop, STOP_EVENT, EventSet::IN)) {
            log::error!("Cannot watch a device worker's stop event: {e:?}");
            self.stopped.store(true, Ordering::SeqCst);
        }
        self.inner.init(ops);
    }
}

/// A running worker. Dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops the worker and waits for its thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("Cannot signal a device worker to stop: {e}");
                return;
            }
            if thread.join().is_err() {
                log::error!("A device worker panicked");
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Runs `handler` on a thread named `name` until the returned handle stops it.
pub fn spawn_worker<H>(name: &str, handler: H) -> std::io::Result<WorkerHandle>
where
    H: MutEventSubscriber + Send + 'static,
{
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let stopped = Arc::new(AtomicBool::new(false));
    let subscriber = Stoppable {
        inner: handler,
        stop: stop.try_clone()?,
        stopped: stopped.clone(),
    };
    let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            manager.add_subscriber(Box::new(subscriber));
            while !stopped.load(Ordering::SeqCst) {
                if let Err(e) = manager.run() {
                    log::error!("Device worker event loop failed: {e:?}");
                    break;
                }
            }
        })?;
    Ok(WorkerHandle {
        stop,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Counter {
        kick: EventFd,
        seen: Arc<Mutex<u64>>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let n = self.kick.read().unwrap_or(0);
            *self.seen.lock().unwrap() += n;
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::with_data(&self.kick, 0, EventSet::IN))
                .unwrap();
        }
    }

    #[test]
    fn worker_handles_device_events_until_stopped() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(Mutex::new(0));
        let worker = spawn_worker(
            "test-worker",
            Counter {
                kick: kick.try_clone().unwrap(),
                seen: seen.clone(),
            },
        )
        .unwrap();
        kick.write(3).unwrap();
        let start = std::time::Instant::now();
        while *seen.lock().unwrap() < 3 {
            assert!(start.elapsed().as_secs() < 10, "event not handled");
            std::thread::yield_now();
        }
        worker.stop();
    }
}
