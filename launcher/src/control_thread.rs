//! The thread that runs VM operations for a server whose own thread only moves bytes (the
//! control API's `vmm-control`, the KubeVirt mode's `launcher-control`), or for a thread that
//! must not start threads itself (`vm-restart`, which boots a VM again after its guest reset,
//! for the VM's waiter).
//!
//! Its filter ([`crate::seccomp::control_rules`]) is the widest: building a VM opens KVM,
//! disks, taps and sockets, maps guest memory and starts threads (vCPUs, device workers, the
//! VM's waiter), which inherit it under their own. Start it before the server's thread, which
//! may not create threads.

use std::sync::{Arc, mpsc};

use rvmm_core::seccomp::{BpfProgram, Capability, SpawnError, spawn_confined};
use tokio::sync::oneshot;

/// An operation handed to the thread.
type Job = Box<dyn FnOnce() + Send>;

/// Why an operation has no result.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The thread is gone (the VMM is exiting).
    #[error("The control thread has stopped")]
    Stopped,
}

/// Runs operations one at a time, in order, until every handle to it is dropped.
#[derive(Clone, Debug)]
pub struct ControlThread {
    jobs: Arc<mpsc::Sender<Job>>,
}

impl ControlThread {
    /// Starts the thread, named `name`, filtered with `filter` (none: `--seccomp=false`).
    /// It keeps its capabilities to open devices, until the first boot lowers them.
    pub fn start(name: &str, filter: Option<BpfProgram>) -> Result<Self, SpawnError> {
        let filtered = filter.is_some();
        let this = Self::spawn(name, filter, None)?;
        if filtered {
            // When a VM boots on another thread (the main thread's --kernel or --restore, a
            // migration's receiving thread), an empty job makes this one lower its
            // capabilities then, not at its next operation. Weak: the thread still ends once
            // every handle is dropped.
            let weak = Arc::downgrade(&this.jobs);
            crate::privileges::on_lowered(Box::new(move || {
                let Some(jobs) = weak.upgrade() else {
                    return false;
                };
                jobs.send(Box::new(|| {})).is_ok()
            }));
        }
        Ok(this)
    }

    /// Starts a thread for operations that only read the VMM's state (the API's `GET`
    /// requests): the same filter as [`ControlThread::start`]'s, no capabilities at all.
    pub fn start_reader(name: &str, filter: Option<BpfProgram>) -> Result<Self, SpawnError> {
        Self::spawn(name, filter, Some(&[]))
    }

    fn spawn(
        name: &str,
        filter: Option<BpfProgram>,
        keep: Option<&'static [Capability]>,
    ) -> Result<Self, SpawnError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        // A panic aborts the process (crate::panic::abort_on_panic), as in release builds:
        // nothing is caught here.
        spawn_confined(name, filter, keep, move || {
            for job in queue {
                crate::privileges::apply_ceiling();
                job();
            }
        })?;
        Ok(Self {
            jobs: Arc::new(jobs),
        })
    }

    /// Queues `call` on the thread without waiting for it; dropped if the thread is gone.
    pub fn submit(&self, call: impl FnOnce() + Send + 'static) {
        let _ = self.jobs.send(Box::new(call));
    }

    /// Runs `call` on the thread and waits for its result without blocking the runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ControlError> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(call());
        });
        self.jobs.send(job).map_err(|_| ControlError::Stopped)?;
        result.await.map_err(|_| ControlError::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn operations_run_on_the_named_thread_in_order() {
        let control = ControlThread::start("control-test", None).unwrap();
        let names: Vec<_> = (0..3)
            .map(|i| {
                block_on(control.run(move || (i, std::thread::current().name().map(str::to_owned))))
                    .unwrap()
            })
            .collect();
        for (i, (n, name)) in names.into_iter().enumerate() {
            assert_eq!((n, name.as_deref()), (i, Some("control-test")));
        }
    }

    #[test]
    fn submitted_operations_run_in_order_without_a_caller_waiting() {
        let control = ControlThread::start("control-submit", None).unwrap();
        let (done, finished) = mpsc::channel();
        for i in 0..3 {
            let done = done.clone();
            control.submit(move || done.send(i).unwrap());
        }
        let order: Vec<i32> = (0..3).map(|_| finished.recv().unwrap()).collect();
        assert_eq!(order, [0, 1, 2]);
    }
}
