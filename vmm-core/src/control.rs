//! The VM's run state, shared by the vCPU threads and whoever drives the VM: pause, resume and
//! stop requests, and the reason the VM stopped.

use std::fmt;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rvmm_devices::Trigger;
use rvmm_devices::legacy::PowerControl;

use crate::events::{CrashReason, ShutdownReason, VmEnd, VmEvent};
use crate::vcpu::kick_thread;

/// What the vCPUs are asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Run the guest.
    Running,
    /// Stay out of the guest until resumed.
    Paused,
    /// Leave the run loop for good.
    Stopping,
}

/// The guest registers shown when the guest dies, so a user can see what it was doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterSnapshot {
    /// Instruction pointer.
    pub rip: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

impl fmt::Display for RegisterSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rip={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip, self.cr0, self.cr3, self.cr4, self.efer
        )
    }
}

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset itself (i8042 pulse or reset event): a microVM treats that as its end.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The host asked the VM to stop.
    Requested,
    /// The guest triple-faulted.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
        /// Its registers.
        regs: Option<RegisterSnapshot>,
    },
    /// The guest reported a crash.
    GuestCrash {
        /// The reporting vCPU.
        vcpu: u8,
    },
    /// KVM could not run the guest: the exit named, with the registers at that point.
    KvmFailure {
        /// The vCPU.
        vcpu: u8,
        /// The exit and its details.
        exit: String,
        /// Its registers.
        regs: Option<RegisterSnapshot>,
    },
}

/// How the VM's end is reported to a process supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest shut down or reset, or the host stopped it.
    Clean,
    /// The guest crashed.
    GuestCrash,
    /// The VMM could not keep running the guest.
    VmmError,
}

impl StopReason {
    /// The class of ending.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Reset | Self::PowerOff | Self::Requested => Outcome::Clean,
            Self::TripleFault { .. } | Self::GuestCrash { .. } => Outcome::GuestCrash,
            Self::KvmFailure { .. } => Outcome::VmmError,
        }
    }

    /// How the VM ended, as its event says it: a shutdown or a guest crash.
    pub fn end(&self) -> VmEnd {
        match self {
            Self::Reset => VmEnd::Shutdown(ShutdownReason::Reset),
            Self::PowerOff => VmEnd::Shutdown(ShutdownReason::PowerOff),
            Self::Requested => VmEnd::Shutdown(ShutdownReason::Requested),
            Self::KvmFailure { vcpu, exit, regs } => VmEnd::Shutdown(ShutdownReason::KvmFailure {
                vcpu: *vcpu,
                exit: exit.clone(),
                regs: *regs,
            }),
            Self::TripleFault { vcpu, regs } => VmEnd::Crashed(CrashReason::TripleFault {
                vcpu: *vcpu,
                regs: *regs,
            }),
            Self::GuestCrash { vcpu } => VmEnd::Crashed(CrashReason::Reported { vcpu: *vcpu }),
        }
    }

    /// The event that reports this ending ([`VmEvent::Shutdown`] or [`VmEvent::Crashed`]).
    pub fn event(&self) -> VmEvent {
        self.end().into()
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One text per ending: its event's.
        self.end().fmt(f)
    }
}

#[derive(Debug, Default)]
struct VcpuSlot {
    thread: Option<libc::pthread_t>,
    parked: bool,
    exited: bool,
}

#[derive(Debug)]
struct Shared {
    run: RunState,
    reason: Option<StopReason>,
    vcpus: Vec<VcpuSlot>,
}

/// Run state and stop reason shared by the vCPUs and the VM's owner.
#[derive(Debug)]
pub struct VmControl {
    shared: Mutex<Shared>,
    changed: Condvar,
    /// Where the VM's events go ([`VmControl::subscribe`]).
    subscribers: Mutex<Vec<Sender<VmEvent>>>,
}

impl VmControl {
    /// Control for `vcpus` vCPUs, initially running.
    pub fn new(vcpus: usize) -> Self {
        Self::with_state(vcpus, RunState::Running)
    }

    /// Control for `vcpus` vCPUs that park as they start (a restored VM, resumed later).
    pub fn new_paused(vcpus: usize) -> Self {
        Self::with_state(vcpus, RunState::Paused)
    }

    fn with_state(vcpus: usize, run: RunState) -> Self {
        Self {
            shared: Mutex::new(Shared {
                run,
                reason: None,
                vcpus: (0..vcpus).map(|_| VcpuSlot::default()).collect(),
            }),
            changed: Condvar::new(),
            subscribers: Mutex::new(Vec::new()),
        }
    }

    /// The VM's events from now on: paused, resumed, and its end (a shutdown or a crash, once
    /// every vCPU has left). A receiver that is dropped is forgotten at the next event.
    /// The channel closes after the end, so a receiver's iteration ends there; a subscriber
    /// that comes after the end gets the end alone.
    pub fn subscribe(&self) -> Receiver<VmEvent> {
        let (sender, receiver) = channel();
        // Lock order: `shared`, then `subscribers` (as every publisher holds them).
        let shared = self.lock();
        if Self::ended(&shared) {
            let _ = sender.send(Self::end_event(&shared));
        } else {
            self.subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sender);
        }
        receiver
    }

    /// Sends `event` to every subscriber still listening. Callers hold `shared`, so events
    /// go out in the order the state changed.
    fn publish(&self, _shared: &Shared, event: &VmEvent) {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s.send(event.clone()).is_ok());
    }

    /// Every vCPU thread has left: the VM has ended.
    fn ended(shared: &Shared) -> bool {
        shared.vcpus.iter().all(|v| v.exited)
    }

    fn end_event(shared: &Shared) -> VmEvent {
        shared
            .reason
            .clone()
            .unwrap_or(StopReason::Requested)
            .event()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current run state.
    pub fn state(&self) -> RunState {
        self.lock().run
    }

    /// Why the VM stopped, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.lock().reason.clone()
    }

    fn kick_all(shared: &Shared) {
        for slot in &shared.vcpus {
            if let (Some(thread), false) = (slot.thread, slot.exited) {
                kick_thread(thread);
            }
        }
    }

    /// Asks every vCPU to stop; the first reason given is kept.
    pub fn request_stop(&self, reason: StopReason) {
        let mut shared = self.lock();
        shared.reason.get_or_insert(reason);
        shared.run = RunState::Stopping;
        Self::kick_all(&shared);
        self.changed.notify_all();
    }

    /// Takes every vCPU out of the guest and waits until they are all parked. Returns false
    /// when the VM is not running.
    pub fn pause(&self) -> bool {
        let mut shared = self.lock();
        if shared.run != RunState::Running {
            return false;
        }
        shared.run = RunState::Paused;
        Self::kick_all(&shared);
        while shared.run == RunState::Paused && shared.vcpus.iter().any(|v| !v.parked && !v.exited)
        {
            shared = self.changed.wait(shared).unwrap_or_else(|p| p.into_inner());
        }
        let paused = shared.run == RunState::Paused;
        if paused {
            self.publish(&shared, &VmEvent::Paused);
        }
        paused
    }

    /// Lets paused vCPUs run again. Returns false when the VM is not paused.
    pub fn resume(&self) -> bool {
        let mut shared = self.lock();
        if shared.run != RunState::Paused {
            return false;
        }
        shared.run = RunState::Running;
        self.publish(&shared, &VmEvent::Resumed);
        self.changed.notify_all();
        true
    }

    /// Called by vCPU `index`'s thread before it first enters the guest.
    pub(crate) fn vcpu_started(&self, index: usize, thread: libc::pthread_t) {
        let mut shared = self.lock();
        shared.vcpus[index].thread = Some(thread);
        if shared.run != RunState::Running {
            // A request made before this thread registered could not kick it.
            kick_thread(thread);
        }
    }

    /// Called by vCPU `index` before each entry: blocks while paused, false once stopping.
    /// Before it parks, the vCPU runs `settle` (without the lock): it completes the exit it
    /// handled last, so that the state a snapshot reads is consistent (see
    /// `Vcpu::complete_pending_exit`).
    pub(crate) fn vcpu_may_run(&self, index: usize, mut settle: impl FnMut()) -> bool {
        let mut shared = self.lock();
        loop {
            match shared.run {
                RunState::Running => return true,
                RunState::Stopping => return false,
                RunState::Paused => {
                    drop(shared);
                    settle();
                    shared = self.lock();
                    if shared.run != RunState::Paused {
                        continue;
                    }
                    shared.vcpus[index].parked = true;
                    self.changed.notify_all();
                    shared = self.changed.wait(shared).unwrap_or_else(|p| p.into_inner());
                    shared.vcpus[index].parked = false;
                }
            }
        }
    }

    /// Called by vCPU `index`'s thread as it leaves; it is never kicked again.
    pub(crate) fn vcpu_exited(&self, index: usize) {
        let mut shared = self.lock();
        shared.vcpus[index].exited = true;
        if Self::ended(&shared) {
            // Sent before the waiters wake, so whoever `wait_stopped` returns to finds it;
            // then the channels close (nothing follows the end).
            self.publish(&shared, &Self::end_event(&shared));
            self.subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        self.changed.notify_all();
    }

    /// The CPU time each vCPU thread has used so far (`None` for one not started or gone).
    pub fn vcpu_cpu_times(&self) -> Vec<Option<Duration>> {
        let shared = self.lock();
        shared
            .vcpus
            .iter()
            .map(|slot| match (slot.thread, slot.exited) {
                (Some(thread), false) => thread_cpu_time(thread),
                _ => None,
            })
            .collect()
    }

    /// Waits until every vCPU thread has left and returns why the VM stopped.
    pub fn wait_stopped(&self) -> StopReason {
        let mut shared = self.lock();
        while !shared.vcpus.iter().all(|v| v.exited) {
            shared = self.changed.wait(shared).unwrap_or_else(|p| p.into_inner());
        }
        shared.reason.clone().unwrap_or(StopReason::Requested)
    }
}

/// The CPU time `thread` has used, from its CPU-time clock.
fn thread_cpu_time(thread: libc::pthread_t) -> Option<Duration> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` has not exited, so it is not joined yet and its handle is valid (the
    // caller holds the lock its exit takes); `clock` is a valid out pointer.
    if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } != 0 {
        return None;
    }
    // SAFETY: a zeroed timespec is valid; clock_gettime writes it.
    let mut time: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `clock` is a CPU-time clock id and `time` a valid out pointer.
    if unsafe { libc::clock_gettime(clock, &mut time) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(time.tv_sec).ok()?,
        u32::try_from(time.tv_nsec).ok()?,
    ))
}

/// The i8042's reset line: a guest reset ends the VM.
#[derive(Debug, Clone)]
pub struct ResetTrigger(pub std::sync::Arc<VmControl>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(StopReason::Reset);
        Ok(())
    }
}

/// What the guest's ACPI power management does to the VM: S5 is a power-off, the reset
/// register a reset (which ends a microVM, as the i8042's does).
#[derive(Debug, Clone)]
pub struct VmPower(pub std::sync::Arc<VmControl>);

impl PowerControl for VmPower {
    fn power_off(&self) {
        self.0.request_stop(StopReason::PowerOff);
    }

    fn reset(&self) {
        self.0.request_stop(StopReason::Reset);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn events_end_with_the_stop_and_the_channel_closes_after_it() {
        let control = VmControl::new(1);
        let early = control.subscribe();
        control.request_stop(StopReason::PowerOff);
        assert!(
            early.try_recv().is_err(),
            "nothing before the last vCPU leaves"
        );
        control.vcpu_exited(0);
        let end = VmEvent::Shutdown(ShutdownReason::PowerOff);
        assert_eq!(early.recv(), Ok(end.clone()));
        assert!(early.recv().is_err(), "the channel closes after the end");
        let late = control.subscribe();
        assert_eq!(late.recv(), Ok(end));
        assert!(late.recv().is_err());
    }

    #[test]
    fn pause_resume_and_the_end_are_events_in_their_order() {
        let control = Arc::new(VmControl::new(1));
        let events = control.subscribe();
        let c = control.clone();
        let vcpu = thread::spawn(move || {
            while c.vcpu_may_run(0, || {}) {
                thread::yield_now();
            }
            c.vcpu_exited(0);
        });
        assert!(control.pause());
        assert!(!control.pause());
        assert!(control.resume());
        control.request_stop(StopReason::Requested);
        assert_eq!(control.wait_stopped(), StopReason::Requested);
        vcpu.join().unwrap();
        let seen: Vec<VmEvent> = events.iter().collect();
        assert_eq!(
            seen,
            [
                VmEvent::Paused,
                VmEvent::Resumed,
                VmEvent::Shutdown(ShutdownReason::Requested)
            ]
        );
    }

    #[test]
    fn first_stop_reason_wins() {
        let control = VmControl::new(0);
        control.request_stop(StopReason::Reset);
        control.request_stop(StopReason::Requested);
        assert_eq!(control.wait_stopped(), StopReason::Reset);
        assert_eq!(control.state(), RunState::Stopping);
    }

    #[test]
    fn pause_waits_for_vcpus_to_park_and_resume_releases_them() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let control = Arc::new(VmControl::new(2));
        let entries = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let workers: Vec<_> = (0..2)
            .map(|i| {
                let (c, entries) = (control.clone(), entries.clone());
                thread::spawn(move || {
                    while c.vcpu_may_run(i, || {}) {
                        entries[i].fetch_add(1, Ordering::SeqCst);
                        thread::yield_now();
                    }
                    c.vcpu_exited(i);
                })
            })
            .collect();
        let wait_for_entries = |at_least: [usize; 2]| {
            while (0..2).any(|i| entries[i].load(Ordering::SeqCst) < at_least[i]) {
                thread::yield_now();
            }
        };
        wait_for_entries([1, 1]);
        assert!(control.pause());
        assert_eq!(control.state(), RunState::Paused);
        // Parked vCPUs do not enter the guest.
        let frozen = [0, 1].map(|i| entries[i].load(Ordering::SeqCst));
        thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(frozen, [0, 1].map(|i| entries[i].load(Ordering::SeqCst)));
        assert!(!control.pause(), "already paused");
        assert!(control.resume());
        assert!(!control.resume(), "already running");
        wait_for_entries([frozen[0] + 1, frozen[1] + 1]);
        control.request_stop(StopReason::Requested);
        assert_eq!(control.wait_stopped(), StopReason::Requested);
        for w in workers {
            w.join().unwrap();
        }
    }

    #[test]
    fn stop_while_paused_releases_parked_vcpus() {
        let control = Arc::new(VmControl::new(1));
        let c = control.clone();
        let worker = thread::spawn(move || {
            while c.vcpu_may_run(0, || {}) {
                thread::yield_now();
            }
            c.vcpu_exited(0);
        });
        assert!(control.pause());
        control.request_stop(StopReason::PowerOff);
        assert_eq!(control.wait_stopped(), StopReason::PowerOff);
        worker.join().unwrap();
    }

    #[test]
    fn vcpu_cpu_time_is_read_while_the_thread_runs_and_not_after() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let control = Arc::new(VmControl::new(2));
        let done = Arc::new(AtomicBool::new(false));
        let (started, running) = std::sync::mpsc::channel();
        let (c, d) = (control.clone(), done.clone());
        let worker = thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            c.vcpu_started(0, unsafe { libc::pthread_self() });
            started.send(()).unwrap();
            while !d.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            c.vcpu_exited(0);
        });
        running.recv().unwrap();
        thread::sleep(std::time::Duration::from_millis(20));
        let times = control.vcpu_cpu_times();
        assert!(times[0].is_some_and(|t| t > Duration::ZERO), "{times:?}");
        assert_eq!(times[1], None, "never started");
        done.store(true, Ordering::SeqCst);
        worker.join().unwrap();
        assert_eq!(control.vcpu_cpu_times(), [None, None]);
    }

    #[test]
    fn reset_trigger_requests_a_reset_stop() {
        let control = Arc::new(VmControl::new(0));
        ResetTrigger(control.clone()).trigger().unwrap();
        assert_eq!(control.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn acpi_power_off_and_reset_stop_the_vm_for_those_reasons() {
        let control = Arc::new(VmControl::new(0));
        VmPower(control.clone()).power_off();
        VmPower(control.clone()).reset();
        assert_eq!(control.stop_reason(), Some(StopReason::PowerOff));
        let control = Arc::new(VmControl::new(0));
        VmPower(control.clone()).reset();
        assert_eq!(control.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn outcomes_and_messages_name_the_cause() {
        assert_eq!(StopReason::Reset.outcome(), Outcome::Clean);
        let tf = StopReason::TripleFault {
            vcpu: 0,
            regs: Some(RegisterSnapshot {
                rip: 0x100_0000,
                ..Default::default()
            }),
        };
        assert_eq!(tf.outcome(), Outcome::GuestCrash);
        let msg = tf.to_string();
        assert!(
            msg.contains("triple fault") && msg.contains("rip=0x1000000"),
            "{msg}"
        );
        let fail = StopReason::KvmFailure {
            vcpu: 1,
            exit: "KVM_EXIT_INTERNAL_ERROR (emulation failure)".into(),
            regs: None,
        };
        assert_eq!(fail.outcome(), Outcome::VmmError);
        assert!(fail.to_string().contains("vCPU 1: KVM_EXIT_INTERNAL_ERROR"));
    }
}
