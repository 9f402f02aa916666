//! SIGTERM and SIGINT ask the guest to shut down (Ctrl-Alt-Del); if it has not stopped after
//! the grace period, or a second signal comes, the VM is stopped hard.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::vmm::Vmm;

/// The shutdown signals, blocked in every thread so one thread can take them with sigwait.
#[allow(missing_debug_implementations)] // sigset_t has no Debug
pub struct ShutdownSignals {
    set: libc::sigset_t,
}

impl ShutdownSignals {
    /// Blocks SIGTERM and SIGINT in the calling thread and every thread it spawns afterwards.
    /// Call before any other thread starts.
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    /// Handles the signals on a thread of its own: each one goes to [`Vmm::shutdown_signal`].
    pub fn handle(self, vmm: Arc<Vmm>, grace: Duration) -> io::Result<()> {
        self.handle_with(move |_| vmm.shutdown_signal(grace))
    }

    /// Handles the signals on a thread of its own, calling `on_signal` with each one's number
    /// (a mode with its own shutdown policy: virt-launcher's).
    pub fn handle_with(self, mut on_signal: impl FnMut(i32) + Send + 'static) -> io::Result<()> {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                loop {
                    let mut signal = 0;
                    // SAFETY: `self.set` is initialised and `signal` is a valid out pointer.
                    if unsafe { libc::sigwait(&self.set, &mut signal) } != 0 {
                        continue;
                    }
                    log::info!("Signal {signal}");
                    on_signal(signal);
                }
            })?;
        Ok(())
    }
}
