//! Integer conversions that cannot lose bits on the hosts rvmm runs on.
//!
//! rvmm runs on 64-bit KVM hosts only, where `usize` holds every `u64`: a `u64` offset or
//! length indexes memory without truncation. The assertion below keeps that true at build time.

const _: () = assert!(usize::BITS == u64::BITS, "rvmm needs a 64-bit host");

/// `x` as a `usize`, which is as wide as `u64` on every host rvmm builds for.
#[allow(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits wide (asserted above)"
)]
#[must_use]
pub const fn usize_from(x: u64) -> usize {
    x as usize
}
