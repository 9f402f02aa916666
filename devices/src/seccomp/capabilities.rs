//! Linux capabilities of a thread. Capabilities are per thread (capset(2) changes the calling
//! thread only), so each thread drops its own as it confines itself: a filtered thread keeps
//! none, unless its kind needs some (the control thread that opens a VM's devices).

pub use caps::errors::CapsError;
pub use caps::{CapSet, Capability};

/// Reduces the calling thread's capabilities to `keep` (those it has of them): effective,
/// permitted and inheritable sets, the ambient set cleared, and the bounding set (when the
/// thread may change it: CAP_SETPCAP) cut down too, so no later execve could regain them.
pub fn restrict_capabilities(keep: &[Capability]) -> Result<(), CapsError> {
    let keep: caps::CapsHashSet = keep.iter().copied().collect();
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for cap in caps::read(None, CapSet::Bounding)?.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap)?;
        }
    }
    // Older kernels have no ambient set: nothing to clear there.
    let _ = caps::clear(None, CapSet::Ambient);
    // Effective first: it must stay within the permitted set.
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        let now = caps::read(None, set)?;
        if !now.is_subset(&keep) {
            caps::set(None, set, &now.intersection(&keep).copied().collect())?;
        }
    }
    Ok(())
}

/// The calling thread's effective capabilities.
pub fn effective_capabilities() -> Result<caps::CapsHashSet, CapsError> {
    caps::read(None, CapSet::Effective)
}
