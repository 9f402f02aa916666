//! Capabilities: a thread keeps only what it needs, and the VMM as a whole only what
//! KubeVirt's launcher keeps once its VM's devices are open.
//!
//! Capabilities belong to threads, so each drops its own: every filtered thread drops all of
//! them as it starts ([`rvmm_core::seccomp::spawn_filtered`]), the main thread before it
//! filters itself. The control threads, which open devices, keep their capabilities until the
//! first VM has booted (on whichever thread: the others are told); from then on they keep
//! [`AFTER_BOOT`] (or [`AFTER_BOOT_WITH_NICS`]): KubeVirt's launcher's `CAP_NET_BIND_SERVICE` (virt-launcher-monitor's ambient capability)
//! and `CAP_SYS_NICE` (a root launcher pod's, for CPU affinity), plus what booting the VM
//! again needs (reboot, reset): reading and writing its files whatever their owner, and
//! re-attaching a tap owned by another user (`CAP_NET_ADMIN`, only with network interfaces).
//! Everything else (`CAP_SYS_ADMIN`, `CAP_SETUID`, `CAP_CHOWN`, `CAP_KILL`, ...) is gone.

use std::sync::Mutex;

use rvmm_core::seccomp::{Capability, restrict_capabilities};

/// What the control thread keeps after the first boot of a VM without network interfaces.
pub const AFTER_BOOT: &[Capability] = &[
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_NICE,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// [`AFTER_BOOT`] and `CAP_NET_ADMIN`, for a VM with network interfaces.
pub const AFTER_BOOT_WITH_NICS: &[Capability] = &[
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_NICE,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_NET_ADMIN,
];

/// What the control threads keep from now on (`None`: all they have, before the first boot).
static CEILING: Mutex<Option<&'static [Capability]>> = Mutex::new(None);

/// Tells a control thread to apply the ceiling; false once the thread is gone.
pub type Poke = Box<dyn Fn() -> bool + Send>;

/// The control threads to tell when the ceiling is lowered.
static POKES: Mutex<Vec<Poke>> = Mutex::new(Vec::new());

/// Registers a control thread: `poke` makes it apply the ceiling soon (it applies it before
/// each operation), and is called whenever the ceiling is lowered.
pub fn on_lowered(poke: Poke) {
    POKES.lock().unwrap_or_else(|p| p.into_inner()).push(poke);
}

/// A VM has booted (its devices are open): from now on the control threads keep at most
/// [`AFTER_BOOT`] (with `CAP_NET_ADMIN` when `nics`), and the calling thread drops the rest
/// now. Lowering is for good: a later VM with network interfaces cannot regain it.
pub fn lower_after_boot(nics: bool) {
    let wanted = if nics {
        AFTER_BOOT_WITH_NICS
    } else {
        AFTER_BOOT
    };
    let ceiling = {
        let mut ceiling = CEILING.lock().unwrap_or_else(|p| p.into_inner());
        // Never raise it again: the smaller of the two (AFTER_BOOT is a prefix).
        let lowered = match *ceiling {
            Some(now) if now.len() <= wanted.len() => now,
            _ => wanted,
        };
        *ceiling = Some(lowered);
        lowered
    };
    if let Err(e) = restrict_capabilities(ceiling) {
        log::warn!("Cannot drop capabilities after the boot: {e}");
    }
    // The other control threads, idle now, lower theirs too.
    POKES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|poke| poke());
}

/// Applies the ceiling to the calling (control) thread, before each operation.
pub fn apply_ceiling() {
    let ceiling = *CEILING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ceiling) = ceiling
        && let Err(e) = restrict_capabilities(ceiling)
    {
        log::warn!("Cannot drop the control thread's capabilities: {e}");
    }
}
