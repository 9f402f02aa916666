//! Building a VM from a saved state instead of a kernel: the same devices from the same
//! configuration, then every component put back as it was. The VM starts paused.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{
    MEMORY_FILE, MemoryFileError, STATE_FILE, StateFileError, VcpuStateError, VmState,
    VmStateError, map_memory_file, memory_regions, read_state, restore_vm_kvm_state,
};
use crate::builder::{
    BuildError, SerialOutput, Vm, VmConfig, attach_acpi_pm, attach_i8042, attach_serial,
    attach_virtio_devices, check_platform, create_virtio_devices, place, start_worker_threads,
};
use crate::bus::Bus;
use crate::control::VmControl;
use crate::memory::{GuestMemoryMmap, MemoryLayout};
use crate::metrics::{ExitCounters, MetricsHandle};
use crate::vcpu::Vcpu;
use crate::vm::{check_capabilities, create_vm, open_kvm, register_memory};

/// Errors restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state file.
    #[error("Cannot read the snapshot state")]
    State(#[from] StateFileError),
    /// The memory file.
    #[error("Cannot map the snapshot memory")]
    Memory(#[from] MemoryFileError),
    /// The configuration's memory differs from the snapshot's.
    #[error(
        "The snapshot's guest memory ({saved} bytes in {regions} regions) does not match the configuration's {configured} bytes"
    )]
    MemorySize {
        /// In the snapshot.
        saved: u64,
        /// Regions in the snapshot.
        regions: usize,
        /// In the configuration.
        configured: u64,
    },
    /// The configuration's vCPU count differs.
    #[error("The snapshot has {saved} vCPUs, the configuration {configured}")]
    VcpuCount {
        /// In the snapshot.
        saved: usize,
        /// In the configuration.
        configured: u8,
    },
    /// The configuration's device list differs.
    #[error("The snapshot has {saved} virtio devices, the configuration {configured}")]
    DeviceCount {
        /// In the snapshot.
        saved: usize,
        /// In the configuration.
        configured: usize,
    },
    /// Building the VM (opening disks, taps, KVM).
    #[error("Cannot build the VM")]
    Build(#[from] BuildError),
    /// A vCPU's state.
    #[error("Cannot restore the vCPUs")]
    Vcpu(#[from] VcpuStateError),
    /// The clock, irqchip or PIT.
    #[error("Cannot restore the VM's clock and interrupt controllers")]
    Vm(#[from] VmStateError),
    /// The ACPI PM registers.
    #[error("Cannot restore the ACPI registers")]
    AcpiPm(#[from] rvmm_devices::legacy::AcpiPmRestoreError),
    /// A virtio device's state.
    #[error("Cannot restore virtio device {index} ({kind})")]
    Device {
        /// Its slot.
        index: usize,
        /// The snapshot's device kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: rvmm_devices::virtio::persist::RestoreError,
    },
}

/// Restores the snapshot in `dir` with the VM configuration `config` (the one the snapshot
/// was taken with): the state is read, the memory file mapped copy-on-write (and read in at
/// once with `prefault`). The VM is built paused; [`crate::VmHandle::resume`] lets it go on.
pub fn restore_vm(
    config: &VmConfig,
    dir: &Path,
    prefault: bool,
    serial_out: SerialOutput,
) -> Result<Vm, RestoreError> {
    let state = read_state(&dir.join(STATE_FILE))?;
    let mem = map_memory_file(&dir.join(MEMORY_FILE), &state.memory, prefault)?;
    build_restored(config, &state, mem, serial_out)
}

/// Builds a paused VM in `state` over `mem`, which already holds the guest's memory (mapped
/// from a snapshot, or received by a migration).
pub fn build_restored(
    config: &VmConfig,
    state: &VmState,
    mem: GuestMemoryMmap,
    serial_out: SerialOutput,
) -> Result<Vm, RestoreError> {
    check_platform(config)?;
    check_layout(config, state, &mem)?;
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(RestoreError::VcpuCount {
            saved: state.vcpus.len(),
            configured: config.vcpus,
        });
    }
    let layout = MemoryLayout::new(config.memory_bytes).map_err(BuildError::Memory)?;
    let mut virtio = create_virtio_devices(config)?;
    if virtio.devices.len() != state.virtio.len() {
        return Err(RestoreError::DeviceCount {
            saved: state.virtio.len(),
            configured: virtio.devices.len(),
        });
    }
    start_worker_threads(&mut virtio.devices, config.seccomp)?;
    let placement = place(config.transport, virtio.devices.len())?;
    let kvm = open_kvm(&config.kvm_path).map_err(BuildError::Vm)?;
    check_capabilities(&kvm).map_err(BuildError::Vm)?;
    let vm_fd = Arc::new(create_vm(&kvm).map_err(BuildError::Vm)?);
    register_memory(&vm_fd, &mem).map_err(BuildError::Vm)?;
    restore_vm_kvm_state(&vm_fd, &state.kvm)?;
    let control = Arc::new(VmControl::new_paused(usize::from(config.vcpus)));
    let mut pio = Bus::new("port I/O");
    let mut mmio = Bus::new("MMIO");
    let serial = attach_serial(&vm_fd, &mut pio, serial_out, Some(&state.serial))?;
    let keyboard = attach_i8042(&vm_fd, &mut pio, &control, Some(&state.i8042))?;
    let power = match config.acpi {
        true => Some(attach_acpi_pm(&vm_fd, &mut pio, &control)?),
        false => None,
    };
    // A version 1 snapshot has no ACPI registers: they start as at boot.
    if let (Some(power), Some(saved)) = (&power, &state.acpi_pm) {
        lock(power).restore(saved)?;
    }
    let attached = attach_virtio_devices(
        &vm_fd,
        (&mut pio, &mut mmio),
        &mem,
        &layout,
        virtio.devices,
        &placement,
    )?;
    for (index, (transport, saved)) in attached.transports.iter().zip(&state.virtio).enumerate() {
        transport
            .restore_state(saved)
            .map_err(|source| RestoreError::Device {
                index,
                kind: saved.device.kind(),
                source,
            })?;
    }
    // The functions decode their restored BARs: map them, with their ioeventfds.
    if let Some(root) = &attached.pci_root {
        root.remap_all();
    }
    let (exits, recorders) = ExitCounters::new(usize::from(config.vcpus));
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for ((index, saved), exits) in (0..config.vcpus).zip(&state.vcpus).zip(recorders) {
        let mut vcpu = Vcpu::new(&vm_fd, index, exits).map_err(BuildError::Vcpu)?;
        vcpu.restore(saved)?;
        vcpus.push(vcpu);
    }
    let metrics = MetricsHandle::new(
        exits,
        virtio.disks,
        virtio.nets,
        layout.size(),
        control.clone(),
        attached.malformed_pci,
    );
    Ok(Vm {
        vcpus,
        control,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        serial,
        keyboard,
        power,
        metrics,
        disk_syncs: virtio.syncs.into(),
        transports: attached.transports,
        kvm,
        vm_fd,
        mem,
        layout,
        seccomp: config.seccomp,
        custom: Vec::new(),
    })
}

/// The snapshot's memory must be the configuration's layout, region for region.
fn check_layout(
    config: &VmConfig,
    state: &VmState,
    mem: &GuestMemoryMmap,
) -> Result<(), RestoreError> {
    let saved: u64 = state.memory.iter().map(|r| r.len).sum();
    let mismatch = || RestoreError::MemorySize {
        saved,
        regions: state.memory.len(),
        configured: config.memory_bytes,
    };
    let layout = MemoryLayout::new(config.memory_bytes).map_err(|_| mismatch())?;
    let expected: Vec<(u64, u64)> = layout
        .ram_regions()
        .into_iter()
        .map(|(addr, len)| (addr.0, len))
        .collect();
    let in_state: Vec<(u64, u64)> = state.memory.iter().map(|r| (r.guest_addr, r.len)).collect();
    let mapped: Vec<(u64, u64)> = memory_regions(mem)
        .iter()
        .map(|r| (r.guest_addr, r.len))
        .collect();
    if expected != in_state || mapped != in_state || mem.num_regions() != state.memory.len() {
        return Err(mismatch());
    }
    debug_assert!(mem.iter().all(|r| r.len() > 0));
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
