//! A device worker: one thread per device, driven by event-manager, stopped and paused
//! through eventfds.
//!
//! The thread ([`WorkerThread`]) is started ahead of activation by the thread that builds the
//! VM, so it does not inherit the filter of the vCPU thread that activates the device; it
//! installs its own seccomp filter first thing, then runs one activation's event loop at a
//! time ([`WorkerThread::run`]) until the device is reset or dropped.
//!
//! Pausing (the `Pausable` contract of Cloud Hypervisor's devices): the handler first finishes
//! the work it has started ([`DeviceHandler::quiesce`]: a block device completes its requests
//! in flight and returns them to the guest), then the thread parks until resumed or stopped.
//! While parked it touches neither guest memory nor its backend (disk, tap); guest kicks and
//! backend readiness stay pending in their eventfds and are served after the resume. The
//! queues' state as the worker left them ([`DeviceHandler::queue_states`]) is kept for a
//! snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use virtio_queue::QueueState;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::seccomp::{BpfProgram, SpawnError, WorkerKind, spawn_filtered, worker_filter};

/// Event data reserved for the worker's stop eventfd; device events must use other values.
pub const STOP_EVENT: u32 = u32::MAX;
/// Event data reserved for the worker's pause eventfd.
pub const PAUSE_EVENT: u32 = u32::MAX - 1;

/// A device worker's event handler: serves its queues and can be paused.
pub trait DeviceHandler: MutEventSubscriber + Send + 'static {
    /// Finishes the work already started, so that nothing more reaches guest memory or the
    /// backend until the worker is resumed: requests in flight complete and are returned to
    /// the guest. Work not yet taken off a queue stays there.
    fn quiesce(&mut self) {}

    /// The state of the handler's queues (where the device is in each ring), in queue order.
    fn queue_states(&self) -> Vec<QueueState>;
}

/// What the controller of a worker asks of it, and where the worker is.
#[derive(Debug, Default)]
struct GateState {
    pause: bool,
    stop: bool,
    parked: bool,
    ended: bool,
    queues: Vec<QueueState>,
}

/// Pause/resume hand-shake between a worker and its controller.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    /// Worker side: publishes `queues` and parks while a pause is asked for. False when the
    /// worker is to stop.
    fn park(&self, queues: Vec<QueueState>) -> bool {
        let mut state = self.lock();
        if state.pause && !state.stop {
            state.queues = queues;
            state.parked = true;
            self.changed.notify_all();
            while state.pause && !state.stop {
                state = self.wait(state);
            }
            state.parked = false;
        }
        !state.stop
    }

    fn set(&self, update: impl FnOnce(&mut GateState)) {
        update(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Wraps a device's handler with the stop and pause eventfds.
struct Stoppable<H> {
    inner: H,
    stop: EventFd,
    pause: EventFd,
    gate: Arc<Gate>,
    stopped: Arc<AtomicBool>,
}

impl<H: DeviceHandler> MutEventSubscriber for Stoppable<H> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // Events of the same wake-up that come after a stop are not served.
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        match events.data() {
            STOP_EVENT => {
                let _ = self.stop.read();
                self.stopped.store(true, Ordering::SeqCst);
            }
            PAUSE_EVENT => {
                let _ = self.pause.read();
                self.inner.quiesce();
                if !self.gate.park(self.inner.queue_states()) {
                    self.stopped.store(true, Ordering::SeqCst);
                }
            }
            _ => self.inner.process(events, ops),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in [(&self.stop, STOP_EVENT), (&self.pause, PAUSE_EVENT)] {
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                log::error!("Cannot watch a device worker's control event: {e:?}");
                self.stopped.store(true, Ordering::SeqCst);
            }
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
    /// the handler is dropped on the thread too. With `paused`, the handler is not started
    /// (not even its `init`) before [`WorkerHandle::resume`].
    pub fn run<H: DeviceHandler>(
        &self,
        handler: H,
        paused: bool,
    ) -> Result<WorkerHandle, WorkerError> {
        let event_fd = || EventFd::new(EFD_NONBLOCK).map_err(WorkerError::EventLoop);
        let (stop, pause) = (event_fd()?, event_fd()?);
        let stopped = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate::default());
        gate.lock().pause = paused;
        let subscriber = Stoppable {
            inner: handler,
            stop: stop.try_clone().map_err(WorkerError::EventLoop)?,
            pause: pause.try_clone().map_err(WorkerError::EventLoop)?,
            gate: gate.clone(),
            stopped: stopped.clone(),
        };
        let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
            .map_err(|e| WorkerError::EventLoop(std::io::Error::other(format!("{e:?}"))))?;
        let (finished, done) = mpsc::sync_channel(1);
        let worker_gate = gate.clone();
        let job: Job = Box::new(move || {
            if worker_gate.park(subscriber.inner.queue_states()) {
                manager.add_subscriber(Box::new(subscriber));
                while !stopped.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        log::error!("Device worker event loop failed: {e:?}");
                        break;
                    }
                }
            } else {
                drop(subscriber);
            }
            // The handler goes away here, on the worker thread, before the stop completes.
            drop(manager);
            worker_gate.set(|s| s.ended = true);
            let _ = finished.send(());
        });
        self.jobs
            .as_ref()
            .ok_or(WorkerError::Ended)?
            .send(job)
            .map_err(|_| WorkerError::Ended)?;
        Ok(WorkerHandle {
            stop,
            pause,
            gate,
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

/// A device's worker: its thread, the activation it runs, and whether the device is paused.
/// A device paused before it is activated (a VM restored paused) starts its handler paused.
#[derive(Debug)]
pub struct DeviceWorker {
    name: String,
    // Dropped before `thread`: the run stops before its thread ends.
    run: Option<WorkerHandle>,
    thread: Option<WorkerThread>,
    paused: bool,
}

impl DeviceWorker {
    /// No thread yet; `name` names the thread.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            run: None,
            thread: None,
            paused: false,
        }
    }

    /// Starts the thread of `kind`, filtered when `seccomp` is set (see
    /// [`VirtioDevice::start_worker_thread`](super::VirtioDevice::start_worker_thread)).
    pub fn start_thread(&mut self, kind: WorkerKind, seccomp: bool) -> Result<(), WorkerError> {
        if self.thread.is_some() {
            return Err(WorkerError::AlreadyStarted);
        }
        let filter = seccomp
            .then(|| worker_filter(kind))
            .transpose()
            .map_err(|e| WorkerError::Start(SpawnError::Filter(e)))?;
        self.thread = Some(WorkerThread::spawn(&self.name, filter)?);
        Ok(())
    }

    /// Whether an activation runs (the device is active).
    pub fn is_active(&self) -> bool {
        self.run.is_some()
    }

    /// Runs `handler` for a new activation, on the thread started ahead or, if the VMM did
    /// not start one (tests, fuzzing), on a new unfiltered thread.
    pub fn activate<H: DeviceHandler>(&mut self, handler: H) -> Result<(), WorkerError> {
        if self.run.is_some() {
            return Err(WorkerError::AlreadyStarted);
        }
        let thread = match &mut self.thread {
            Some(thread) => thread,
            None => self.thread.insert(WorkerThread::spawn(&self.name, None)?),
        };
        self.run = Some(thread.run(handler, self.paused)?);
        Ok(())
    }

    /// Ends the activation (the device is reset): its handler is dropped.
    pub fn stop(&mut self) {
        if let Some(run) = self.run.take() {
            run.stop();
        }
    }

    /// Pauses the device: an activation completes its work in flight and parks.
    pub fn pause(&mut self) -> Result<(), WorkerError> {
        if let Some(run) = &self.run {
            run.pause()?;
        }
        self.paused = true;
        Ok(())
    }

    /// Lets a paused device work again.
    pub fn resume(&mut self) {
        if let Some(run) = &self.run {
            run.resume();
        }
        self.paused = false;
    }

    /// Whether the device is paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The queue states of a paused activation; `None` when inactive or not paused.
    pub fn queue_states(&self) -> Option<Vec<QueueState>> {
        if !self.paused {
            return None;
        }
        self.run
            .as_ref()
            .and_then(WorkerHandle::parked_queue_states)
    }
}

/// A running activation of a worker. Dropping it stops the event loop and waits until the
/// handler is dropped.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: EventFd,
    pause: EventFd,
    gate: Arc<Gate>,
    done: Option<mpsc::Receiver<()>>,
    // Set by `spawn_worker`, whose handle owns its thread; dropped after the run stopped.
    thread: Option<WorkerThread>,
}

impl WorkerHandle {
    /// Stops the worker and waits for its handler to be dropped.
    pub fn stop(mut self) {
        self.stop_and_wait();
    }

    /// Asks the handler to finish its work in flight and park; returns once it has.
    pub fn pause(&self) -> Result<(), WorkerError> {
        self.gate.set(|s| s.pause = true);
        self.pause.write(1).map_err(WorkerError::EventLoop)?;
        let mut state = self.gate.lock();
        while !state.parked && !state.ended {
            state = self.gate.wait(state);
        }
        match state.parked {
            true => Ok(()),
            false => Err(WorkerError::Ended),
        }
    }

    /// Lets a paused handler go on.
    pub fn resume(&self) {
        self.gate.set(|s| s.pause = false);
    }

    /// The queue states the handler published when it parked; `None` while it runs.
    pub fn parked_queue_states(&self) -> Option<Vec<QueueState>> {
        let state = self.gate.lock();
        state.parked.then(|| state.queues.clone())
    }

    fn stop_and_wait(&mut self) {
        if let Some(done) = self.done.take() {
            self.gate.set(|s| s.stop = true);
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
pub fn spawn_worker<H: DeviceHandler>(name: &str, handler: H) -> Result<WorkerHandle, WorkerError> {
    let thread = WorkerThread::spawn(name, None)?;
    let mut handle = thread.run(handler, false)?;
    handle.thread = Some(thread);
    Ok(handle)
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test values"
)]
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

    impl DeviceHandler for Counter {
        fn queue_states(&self) -> Vec<QueueState> {
            let next_avail = *self.seen.lock().unwrap() as u16;
            vec![QueueState {
                next_avail,
                ..Default::default()
            }]
        }
    }

    fn counter() -> (Counter, EventFd, Arc<Mutex<u64>>) {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(Mutex::new(0));
        let counter = Counter {
            kick: kick.try_clone().unwrap(),
            seen: seen.clone(),
        };
        (counter, kick, seen)
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !done() {
            assert!(start.elapsed().as_secs() < 10, "{what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn paused_worker_serves_no_event_until_resumed_and_publishes_its_queues() {
        let (counter, kick, seen) = counter();
        let mut worker = DeviceWorker::new("test-pause");
        worker.activate(counter).unwrap();
        kick.write(2).unwrap();
        wait_until("first kick not served", || *seen.lock().unwrap() == 2);
        assert_eq!(worker.queue_states(), None, "running: no parked state");
        worker.pause().unwrap();
        assert_eq!(worker.queue_states().unwrap()[0].next_avail, 2);
        kick.write(3).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(*seen.lock().unwrap(), 2, "served while paused");
        worker.resume();
        wait_until("kick pending across the pause not served", || {
            *seen.lock().unwrap() == 5
        });
        worker.stop();
    }

    #[test]
    fn activation_of_a_paused_device_starts_parked_and_stop_needs_no_resume() {
        let (counter, kick, seen) = counter();
        let mut worker = DeviceWorker::new("test-paused-start");
        worker.pause().unwrap();
        kick.write(1).unwrap();
        worker.activate(counter).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(*seen.lock().unwrap(), 0, "served before resume");
        worker.resume();
        wait_until("kick not served after resume", || {
            *seen.lock().unwrap() == 1
        });
        worker.pause().unwrap();
        // Stopping a parked worker ends it without a resume.
        worker.stop();
        assert!(!worker.is_active());
    }

    #[test]
    fn worker_handles_device_events_until_stopped() {
        let (counter, kick, seen) = counter();
        let worker = spawn_worker("test-worker", counter).unwrap();
        kick.write(3).unwrap();
        wait_until("event not handled", || *seen.lock().unwrap() >= 3);
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

    impl DeviceHandler for Probe {
        fn queue_states(&self) -> Vec<QueueState> {
            Vec::new()
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
            let probe = Probe {
                report,
                dropped: dropped.clone(),
            };
            let run = thread.run(probe, false).unwrap();
            assert_eq!(results.recv().unwrap(), (-1, denied));
            run.stop();
            assert!(dropped.load(Ordering::SeqCst), "handler outlived stop()");
        }
    }
}
