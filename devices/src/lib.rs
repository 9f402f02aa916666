//! Emulated devices for rvmm, the KVM virtual machine monitor: the legacy PC devices
//! ([`legacy`]: serial port, i8042, ACPI power management), virtio devices ([`virtio`]:
//! block with raw and qcow2 images, net on a tap, entropy) on the virtio-mmio and virtio-pci
//! transports, and the PCI configuration space they share ([`pci`]).
//!
//! Devices here know nothing of KVM: they see register reads and writes through [`BusDevice`]
//! and raise interrupts through a [`vm_superio::Trigger`] (an [`EventFdTrigger`] wired to an
//! irqfd in a VM, a counter in tests). `rvmm-core` puts them in a VM; its `VmBuilder` takes
//! an embedder's own devices too, implementing the same traits:
//!
//! - a port I/O or MMIO device implements [`BusDevice`]: the vCPU that touched its range calls
//!   it with the offset and the access's bytes;
//! - a virtio device implements [`virtio::VirtioDevice`]: it says what it offers and takes its
//!   queues once the driver is ready; the transport (MMIO or PCI) does the rest.
//!
//! ```
//! use rvmm_devices::BusDevice;
//!
//! /// A scratch register: reads return what was last written, byte for byte.
//! #[derive(Default)]
//! struct Scratch([u8; 8]);
//!
//! impl BusDevice for Scratch {
//!     fn read(&mut self, offset: u64, data: &mut [u8]) {
//!         // The guest picks the offset and width: everything out of range reads as zero.
//!         for (i, byte) in data.iter_mut().enumerate() {
//!             let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
//!             *byte = at.and_then(|at| self.0.get(at)).copied().unwrap_or(0);
//!         }
//!     }
//!     fn write(&mut self, offset: u64, data: &[u8]) {
//!         for (i, byte) in data.iter().enumerate() {
//!             let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
//!             if let Some(slot) = at.and_then(|at| self.0.get_mut(at)) {
//!                 *slot = *byte;
//!             }
//!         }
//!     }
//! }
//!
//! let mut scratch = Scratch::default();
//! scratch.write(2, &[0xab, 0xcd]);
//! let mut word = [0u8; 4];
//! scratch.read(0, &mut word);
//! assert_eq!(word, [0, 0, 0xab, 0xcd]);
//! scratch.read(u64::MAX, &mut word);
//! assert_eq!(word, [0; 4]);
//! ```

#![deny(missing_docs)]
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

/// The rust-vmm crates this crate's API speaks in (queues, guest memory, eventfds), for an
/// embedder's devices to use the same versions.
pub use {virtio_queue, vm_memory, vmm_sys_util};

pub use bus_device::BusDevice;
pub use pausable::{Pausable, PauseError};
pub use trigger::EventFdTrigger;
pub use vm_superio::Trigger;
