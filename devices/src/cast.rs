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

/// The low 32 bits of `x`, for the halves of a 64-bit register or address.
#[allow(
    clippy::cast_possible_truncation,
    reason = "dropping the high half is the point"
)]
#[must_use]
pub const fn low_u32(x: u64) -> u32 {
    x as u32
}
