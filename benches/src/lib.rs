//! Criterion benchmarks live in `benches/*.rs` of this crate; `benches/boot-time` (a script
//! beside them) measures start-up. This library has what the device benchmarks share: the
//! interrupt a device signals through on each virtio transport, wired as in a VM (an eventfd
//! per interrupt, KVM's irqfd) so the benchmarks include what a transport adds per interrupt.

use std::sync::Arc;

use rvmm_devices::pci::msix::{MsiMessage, MsiRouter, Msix};
use rvmm_devices::virtio::mmio::MmioInterrupt;
use rvmm_devices::virtio::pci::PciInterrupt;
use rvmm_devices::virtio::{InterruptKind, VirtioInterrupt};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A virtio transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// virtio-mmio: the interrupt status register, then the device's line.
    Mmio,
    /// virtio-pci with MSI-X enabled: each queue's own vector.
    Pci,
}

impl Transport {
    /// Both, in the order the benchmarks report them.
    pub const ALL: [Transport; 2] = [Transport::Mmio, Transport::Pci];

    /// The name in benchmark labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mmio => "mmio",
            Self::Pci => "pci",
        }
    }
}

/// MSI-X vectors as irqfds, as vmm-core's KVM router raises them (routing is a no-op here).
struct Irqfds(Vec<EventFd>);

impl MsiRouter for Irqfds {
    fn vector_count(&self) -> u16 {
        self.0.len() as u16
    }

    fn route(&self, _vector: u16, _message: Option<MsiMessage>) -> std::io::Result<()> {
        Ok(())
    }

    fn signal(&self, vector: u16) -> std::io::Result<()> {
        self.0[usize::from(vector)].write(1)
    }
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// The interrupt of a device with `queues` queues on `transport`, as a driver set it up: on
/// PCI, MSI-X enabled, vector 0 for configuration changes and vector n + 1 for queue n, all
/// unmasked.
pub fn interrupt(transport: Transport, queues: usize) -> Arc<dyn VirtioInterrupt> {
    match transport {
        Transport::Mmio => Arc::new(MmioInterrupt::new(eventfd())),
        Transport::Pci => {
            let vectors = queues + 1;
            let mut msix = Msix::new(Arc::new(Irqfds((0..vectors).map(|_| eventfd()).collect())));
            for vector in 0..vectors as u64 {
                let entry = vector * 16;
                msix.write_table(entry, &0xfee0_0000u64.to_le_bytes())
                    .expect("MSI-X address");
                msix.write_table(entry + 8, &(0x40 + vector as u32).to_le_bytes())
                    .expect("MSI-X data");
                msix.write_table(entry + 12, &0u32.to_le_bytes())
                    .expect("MSI-X unmask");
            }
            msix.write_control(1 << 15);
            let interrupt = PciInterrupt::new(queues, Some(msix.vectors()), eventfd());
            interrupt.set_vector(InterruptKind::Config, 0);
            for queue in 0..queues as u16 {
                interrupt.set_vector(InterruptKind::Queue(queue), queue + 1);
            }
            Arc::new(interrupt)
        }
    }
}
