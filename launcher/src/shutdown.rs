//! Signals: SIGTERM, SIGINT, SIGHUP and SIGQUIT ask the guest to shut down (Ctrl-Alt-Del); if
//! it has not stopped after the grace period, or a second signal comes, the VM is stopped hard.
//! SIGUSR1 and SIGUSR2 are logged and ignored. Every way out removes the sockets.
//!
//! One thread (`signals`) takes them all with `sigtimedwait`, which also times the grace period:
//! it starts no other thread, so it runs under a narrow filter ([`crate::seccomp::signal_rules`]).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvmm_core::seccomp::{BpfProgram, SpawnError, spawn_filtered};

use crate::vmm::Vmm;

/// The signals that end rvmm gracefully: `kill` and `docker stop` (TERM), Ctrl-C (INT), a
/// closed terminal (HUP), Ctrl-\ (QUIT; as virt-launcher-monitor, no core dump).
pub const SHUTDOWN_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];
/// Signals whose default action would end rvmm without cleanup, and that mean nothing to it.
pub const IGNORED_SIGNALS: [i32; 2] = [libc::SIGUSR1, libc::SIGUSR2];

/// What the signal thread reports to its handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalEvent {
    /// One of [`SHUTDOWN_SIGNALS`] came.
    Shutdown(i32),
    /// The timer the handler last asked for ran out (the grace period).
    TimerExpired,
}

/// The signals above, blocked in every thread so one thread can take them.
#[allow(missing_debug_implementations)] // sigset_t has no Debug
pub struct ShutdownSignals {
    set: libc::sigset_t,
}

/// A signal's name for the log.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "a signal",
    }
}

impl ShutdownSignals {
    /// Blocks the signals in the calling thread and every thread it spawns afterwards. Call
    /// before any other thread starts, and after the user's input is read (until then they
    /// keep their default action: a stuck read can still be interrupted).
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for signal in SHUTDOWN_SIGNALS.into_iter().chain(IGNORED_SIGNALS) {
            // SAFETY: as above; the signal numbers are valid.
            unsafe { libc::sigaddset(&mut set, signal) };
        }
        // SAFETY: `set` is initialised; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    /// Handles the signals on a thread of its own (filtered with `filter`): each goes to
    /// [`Vmm::shutdown_signal`], the grace timer's end to [`Vmm::grace_period_over`].
    pub fn handle(
        self,
        vmm: Arc<Vmm>,
        grace: Duration,
        filter: Option<BpfProgram>,
    ) -> Result<(), SpawnError> {
        self.handle_with(filter, move |event| match event {
            SignalEvent::Shutdown(_) => vmm.shutdown_signal(grace),
            SignalEvent::TimerExpired => {
                vmm.grace_period_over();
                None
            }
        })
    }

    /// Handles the signals on a thread of its own, filtered with `filter`, calling `on_event`
    /// with each (a mode with its own shutdown policy: virt-launcher's). When `on_event`
    /// returns a duration, [`SignalEvent::TimerExpired`] follows once it has passed (unless
    /// a later call asks for another).
    pub fn handle_with(
        self,
        filter: Option<BpfProgram>,
        mut on_event: impl FnMut(SignalEvent) -> Option<Duration> + Send + 'static,
    ) -> Result<(), SpawnError> {
        spawn_filtered("signals", filter, move || {
            let mut deadline: Option<Instant> = None;
            loop {
                let event = match self.wait(deadline) {
                    Some(signal) if IGNORED_SIGNALS.contains(&signal) => {
                        log::info!("{} ignored", signal_name(signal));
                        continue;
                    }
                    Some(signal) => {
                        log::info!("{}", signal_name(signal));
                        SignalEvent::Shutdown(signal)
                    }
                    None if deadline.is_some_and(|d| d <= Instant::now()) => {
                        deadline = None;
                        SignalEvent::TimerExpired
                    }
                    None => continue,
                };
                if let Some(after) = on_event(event) {
                    deadline = Some(Instant::now() + after);
                }
            }
        })?;
        Ok(())
    }

    /// The next signal, or `None` when `deadline` passed (or the wait was interrupted).
    fn wait(&self, deadline: Option<Instant>) -> Option<i32> {
        let signal = match deadline {
            // SAFETY: `self.set` is initialised; no siginfo is wanted.
            None => unsafe { libc::sigwaitinfo(&self.set, std::ptr::null_mut()) },
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = libc::timespec {
                    tv_sec: left.as_secs() as libc::time_t,
                    tv_nsec: left.subsec_nanos() as libc::c_long,
                };
                // SAFETY: as above; `timeout` is a valid timespec.
                unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &timeout) }
            }
        };
        (signal > 0).then_some(signal)
    }
}
