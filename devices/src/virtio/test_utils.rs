//! Test doubles shared by the device tests.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{InterruptKind, VirtioInterrupt};

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
