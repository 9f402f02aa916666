//! A device worker: one thread per device, driven by event-manager, stopped through an eventfd.
//!
//! The thread ([`WorkerThread`]) is started ahead of activation by the thread that builds the
//! VM, so it does not inherit the filter of the vCPU thread that activates the device; it
//! installs its own seccomp filter first thing, then runs one activation's event loop at a
//! time ([`WorkerThread::run`]) until the device is reset or dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::seccomp::{BpfProgram, SpawnError, WorkerKind, spawn_filtered, worker_filter};

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

/// Errors starting or using a worker thread.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The thread cannot be started or cannot install its filter.
    #[error("Cannot start the device worker thread")]
    Start(#[source] SpawnError),
    /// The eventfd or epoll instance of an activation cannot be created.
    #[error("Cannot set up the device worker's event loop")]
    EventLoop(#[source] std::io::Error),
    /// The thread has ended (a handler panicked).
    #[error("The device worker thread has ended")]
    Ended,
    /// The device's worker thread was started already.
    #[error("The device worker thread is already started")]
    AlreadyStarted,
}

type Job = Box<dyn FnOnce() + Send>;

/// A device's worker thread: idle until [`WorkerThread::run`] hands it an event loop. Dropping
/// it ends the thread (stop the current run first: drop the [`WorkerHandle`] before it).
#[derive(Debug)]
pub struct WorkerThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerThread {
    /// Starts the thread `name`; it installs `filter` before anything else (none: unfiltered).
    pub fn spawn(name: &str, filter: Option<BpfProgram>) -> Result<Self, WorkerError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = spawn_filtered(name, filter, move || {
            while let Ok(job) = queue.recv() {
                job();
            }
        })
        .map_err(WorkerError::Start)?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `handler` under event-manager on this thread until the returned handle stops it;
    /// the handler is dropped on the thread too.
    pub fn run<H>(&self, handler: H) -> Result<WorkerHandle, WorkerError>
    where
        H: MutEventSubscriber + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::EventLoop)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let subscriber = Stoppable {
            inner: handler,
            stop: stop.try_clone().map_err(WorkerError::EventLoop)?,
            stopped: stopped.clone(),
        };
        let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
            .map_err(|e| WorkerError::EventLoop(std::io::Error::other(format!("{e:?}"))))?;
        let (finished, done) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            manager.add_subscriber(Box::new(subscriber));
            while !stopped.load(Ordering::SeqCst) {
                if let Err(e) = manager.run() {
                    log::error!("Device worker event loop failed: {e:?}");
                    break;
                }
            }
            // The handler goes away here, on the worker thread, before the stop completes.
            drop(manager);
            let _ = finished.send(());
        });
        self.jobs
            .as_ref()
            .ok_or(WorkerError::Ended)?
            .send(job)
            .map_err(|_| WorkerError::Ended)?;
        Ok(WorkerHandle {
            stop,
            done: Some(done),
            thread: None,
        })
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        // Without jobs to wait for, the thread ends.
        self.jobs = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("A device worker thread panicked");
        }
    }
}

/// Starts a device's worker thread of `kind` into `slot`, filtered when `seccomp` is set (see
/// [`VirtioDevice::start_worker_thread`](super::VirtioDevice::start_worker_thread)).
pub fn start_worker_in(
    slot: &mut Option<WorkerThread>,
    name: &str,
    kind: WorkerKind,
    seccomp: bool,
) -> Result<(), WorkerError> {
    if slot.is_some() {
        return Err(WorkerError::AlreadyStarted);
    }
    let filter = seccomp
        .then(|| worker_filter(kind))
        .transpose()
        .map_err(|e| WorkerError::Start(SpawnError::Filter(e)))?;
    *slot = Some(WorkerThread::spawn(name, filter)?);
    Ok(())
}

/// The device's worker thread in `slot`, started now without a filter if the VMM did not start
/// it ahead (tests, fuzzing).
pub fn worker_thread<'a>(
    slot: &'a mut Option<WorkerThread>,
    name: &str,
) -> Result<&'a WorkerThread, WorkerError> {
    match slot {
        Some(thread) => Ok(thread),
        None => Ok(slot.insert(WorkerThread::spawn(name, None)?)),
    }
}

/// A running activation of a worker. Dropping it stops the event loop and waits until the
/// handler is dropped.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: EventFd,
    done: Option<mpsc::Receiver<()>>,
    // Set by `spawn_worker`, whose handle owns its thread; dropped after the run stopped.
    thread: Option<WorkerThread>,
}

impl WorkerHandle {
    /// Stops the worker and waits for its handler to be dropped.
    pub fn stop(mut self) {
        self.stop_and_wait();
    }

    fn stop_and_wait(&mut self) {
        if let Some(done) = self.done.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("Cannot signal a device worker to stop: {e}");
                return;
            }
            if done.recv().is_err() {
                log::error!("A device worker panicked");
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop_and_wait();
    }
}

/// Runs `handler` on a new, unfiltered thread named `name` until the returned handle stops it
/// (the thread ends then too).
pub fn spawn_worker<H>(name: &str, handler: H) -> Result<WorkerHandle, WorkerError>
where
    H: MutEventSubscriber + Send + 'static,
{
    let thread = WorkerThread::spawn(name, None)?;
    let mut handle = thread.run(handler)?;
    handle.thread = Some(thread);
    Ok(handle)
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

    /// Reports what a system call outside the filter's list gives inside `init`, and whether
    /// it was dropped.
    struct Probe {
        report: mpsc::Sender<(libc::c_int, i32)>,
        dropped: Arc<AtomicBool>,
    }

    impl MutEventSubscriber for Probe {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
        fn init(&mut self, _ops: &mut EventOps) {
            // SAFETY: creates a socket from constant arguments; no memory is passed.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            let _ = self.report.send((fd, errno));
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn each_activation_runs_under_the_thread_filter_and_stop_drops_the_handler() {
        use crate::seccomp::{SeccompAction, WorkerKind, common_rules, compile, worker_rules};
        let mut allowlist = common_rules();
        allowlist.extend(worker_rules(WorkerKind::Rng));
        let denied = libc::EHWPOISON;
        let filter = compile(&allowlist, SeccompAction::Errno(denied as u32)).unwrap();
        let thread = WorkerThread::spawn("test-filtered", Some(filter)).unwrap();
        // A device reset and re-activation reuses the thread.
        for _ in 0..2 {
            let (report, results) = mpsc::channel();
            let dropped = Arc::new(AtomicBool::new(false));
            let run = thread
                .run(Probe {
                    report,
                    dropped: dropped.clone(),
                })
                .unwrap();
            assert_eq!(results.recv().unwrap(), (-1, denied));
            run.stop();
            assert!(dropped.load(Ordering::SeqCst), "handler outlived stop()");
        }
    }
}
