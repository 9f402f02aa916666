//! Emulated devices for rvmm.
//!
//! Devices here know nothing of KVM: they see register reads and writes through [`BusDevice`]
//! and raise interrupts through a [`vm_superio::Trigger`] (an eventfd wired to an irqfd in
//! production, a counter in tests).

#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

mod bus_device;
pub mod cast;
pub mod image;
pub mod image_lock;
pub mod legacy;
pub mod log_limit;
mod pausable;
pub mod pci;
pub mod seccomp;
mod trigger;
pub mod virtio;

pub use bus_device::BusDevice;
pub use pausable::{Pausable, PauseError};
pub use trigger::EventFdTrigger;
pub use vm_superio::Trigger;
