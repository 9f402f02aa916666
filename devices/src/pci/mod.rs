//! PCI functions: the type-0 configuration header every function has ([`ConfigSpace`]), MSI-X
//! ([`msix`]), and the [`PciDevice`] interface through which a root complex (vmm-core's) routes
//! configuration cycles and BAR accesses to a function.
//!
//! Functions know nothing of KVM: their BARs are placed and moved by the root complex, which
//! also registers their [`BarWriteEvent`]s as KVM ioeventfds wherever the BAR is mapped.

mod config;
pub mod msix;

use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

pub use config::{
    BAR_COUNT, BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_INTX_DISABLE, COMMAND_MEMORY,
    CONFIG_SPACE_SIZE, ConfigSpace, ConfigSpaceMismatch, EXTENDED_CONFIG_SPACE_SIZE,
    INTERRUPT_LINE, INTERRUPT_PIN, MemoryBar, PciIdentity, STATUS, VENDOR_ID,
};

/// Where a memory BAR is mapped in guest physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR number (0-5).
    pub index: u8,
    /// Guest physical address.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
}

/// An eventfd that takes the place of guest writes at a BAR offset (a virtio queue
/// notification): the VMM registers it as a KVM ioeventfd at the BAR's address plus `offset`,
/// so such writes never leave the kernel.
#[derive(Debug)]
pub struct BarWriteEvent<'a> {
    /// BAR number.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Signalled on any write there.
    pub event: &'a EventFd,
}

/// A PCI function as the root complex drives it.
///
/// Configuration accesses come with an offset in the function's 4 KiB (ECAM) space and a width
/// of 1, 2 or 4 bytes that does not cross a dword: the root complex refuses other accesses.
/// BAR accesses come with the offset in the BAR and the guest's width (1 to 8 bytes), within
/// the BAR; a function answers whatever the guest does there without panicking.
pub trait PciDevice: Send {
    /// Reads configuration space.
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// Reads BAR `bar` at `offset`.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// Writes BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// The memory BARs the function decodes now (memory space enabled, address assigned).
    fn mapped_bars(&self) -> Vec<BarRegion>;
    /// Writes the VMM may turn into ioeventfds wherever their BAR is mapped.
    fn bar_write_events(&self) -> Vec<BarWriteEvent<'_>> {
        Vec::new()
    }
}

/// Where a malformed access was aimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciAccessKind {
    /// Configuration space: a width or alignment configuration cycles cannot have, or a write
    /// to a function that does not exist.
    Config,
    /// A BAR: outside any register, a width the register does not have, or PCI window space no
    /// BAR decodes.
    Bar,
    /// The MSI-X table or pending-bit array.
    Msix,
}

/// Guest accesses to the PCI emulation ignored because they were malformed, by kind; shared by
/// the root complex and every function, read by the VM's metrics.
#[derive(Debug, Default)]
pub struct MalformedPciAccesses {
    config: AtomicU64,
    bar: AtomicU64,
    msix: AtomicU64,
}

/// A reading of [`MalformedPciAccesses`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MalformedPciCounts {
    /// Configuration space.
    pub config: u64,
    /// BARs and unclaimed window space.
    pub bar: u64,
    /// MSI-X table and PBA.
    pub msix: u64,
}

impl MalformedPciAccesses {
    /// Counts one access of `kind` (logged once per kind, so a guest cannot flood the log).
    pub fn count(&self, kind: PciAccessKind, what: std::fmt::Arguments<'_>) {
        let counter = match kind {
            PciAccessKind::Config => &self.config,
            PciAccessKind::Bar => &self.bar,
            PciAccessKind::Msix => &self.msix,
        };
        if counter.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!("Ignored a malformed PCI access ({what}); further ones are only counted");
        }
    }

    /// The counts now.
    pub fn counts(&self) -> MalformedPciCounts {
        MalformedPciCounts {
            config: self.config.load(Ordering::Relaxed),
            bar: self.bar.load(Ordering::Relaxed),
            msix: self.msix.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_accesses_are_counted_by_kind() {
        let m = MalformedPciAccesses::default();
        m.count(PciAccessKind::Config, format_args!("a"));
        m.count(PciAccessKind::Config, format_args!("b"));
        m.count(PciAccessKind::Msix, format_args!("c"));
        assert_eq!(
            m.counts(),
            MalformedPciCounts {
                config: 2,
                bar: 0,
                msix: 1
            }
        );
    }
}
