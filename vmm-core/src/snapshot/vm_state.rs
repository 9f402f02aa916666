//! The VM's state as a whole, and the VM-wide KVM state: the KVM clock, the in-kernel PIC and
//! IOAPIC, the PIT.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use rvmm_devices::legacy::{AcpiPmSnapshot, I8042Snapshot, SerialSnapshot};
use rvmm_devices::virtio::persist::VirtioDeviceSnapshot;
use serde::{Deserialize, Serialize};

use super::VcpuState;

/// One guest RAM region: where it is and how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub len: u64,
}

/// The VM-wide KVM state, format version 1.
#[derive(Clone, Serialize, Deserialize)]
#[allow(missing_debug_implementations)] // raw KVM structures: nothing useful to print
pub struct KvmVmState {
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC (in that order).
    pub irqchips: Vec<kvm_irqchip>,
    /// The i8254.
    pub pit: kvm_pit_state2,
}

/// Everything a snapshot keeps besides memory, format version 2 (version 1 lacked `acpi_pm`,
/// and its virtio devices were all on virtio-mmio).
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM layout (the memory file holds the regions in this order).
    pub memory: Vec<MemoryRegionState>,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// Clock, interrupt controllers and PIT.
    pub kvm: KvmVmState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042.
    pub i8042: I8042Snapshot,
    /// The virtio devices, in slot order.
    pub virtio: Vec<VirtioDeviceSnapshot>,
    /// The ACPI PM1 registers; none for a VM without ACPI, or a version 1 snapshot (a restore
    /// then starts them as at boot).
    pub acpi_pm: Option<AcpiPmSnapshot>,
}

/// Format version 1's [`VmState`]: the same fields but the last.
#[derive(Deserialize)]
pub(super) struct VmStateV1 {
    memory: Vec<MemoryRegionState>,
    vcpus: Vec<VcpuState>,
    kvm: KvmVmState,
    serial: SerialSnapshot,
    i8042: I8042Snapshot,
    virtio: Vec<VirtioDeviceSnapshot>,
}

impl From<VmStateV1> for VmState {
    fn from(v1: VmStateV1) -> Self {
        Self {
            memory: v1.memory,
            vcpus: v1.vcpus,
            kvm: v1.kvm,
            serial: v1.serial,
            i8042: v1.i8042,
            virtio: v1.virtio,
            acpi_pm: None,
        }
    }
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("memory", &self.memory)
            .field("vcpus", &self.vcpus)
            .field("virtio", &self.virtio.len())
            .finish_non_exhaustive()
    }
}

/// Errors reading or writing the VM-wide KVM state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// An ioctl failed.
    #[error("Cannot {action} the {what}")]
    Ioctl {
        /// "read" or "write".
        action: &'static str,
        /// Which state.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The snapshot does not have the three interrupt controllers.
    #[error("The snapshot has {0} interrupt controller states, expected 3")]
    Irqchips(usize),
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "PIC master"),
    (KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

fn err(action: &'static str, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Ioctl {
        action,
        what,
        source,
    }
}

/// Reads the clock, the interrupt controllers and the PIT (vCPUs parked).
pub fn save_vm_kvm_state(vm: &VmFd) -> Result<KvmVmState, VmStateError> {
    let mut irqchips = Vec::with_capacity(CHIPS.len());
    for (chip_id, name) in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(err("read", name))?;
        irqchips.push(chip);
    }
    Ok(KvmVmState {
        clock: vm.get_clock().map_err(err("read", "KVM clock"))?,
        irqchips,
        pit: vm.get_pit2().map_err(err("read", "PIT"))?,
    })
}

/// Writes a saved clock, interrupt controllers and PIT into a new VM.
pub fn restore_vm_kvm_state(vm: &VmFd, state: &KvmVmState) -> Result<(), VmStateError> {
    if state.irqchips.len() != CHIPS.len() {
        return Err(VmStateError::Irqchips(state.irqchips.len()));
    }
    for ((chip_id, name), saved) in CHIPS.iter().zip(&state.irqchips) {
        // The chip id decides what KVM writes: it must be the one of this position.
        let mut chip = *saved;
        chip.chip_id = *chip_id;
        vm.set_irqchip(&chip).map_err(err("write", name))?;
    }
    vm.set_pit2(&state.pit).map_err(err("write", "PIT"))?;
    // Only KVM_CLOCK_REALTIME may be passed in; the other flags are KVM's own reports.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(err("write", "KVM clock"))
}
