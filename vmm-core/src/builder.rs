//! The VM builder: a straight recipe of `setup_*`/`attach_*` steps from a [`VmConfig`] to a
//! [`Vm`] ready to start. [`VmBuilder`] is its public face, [`build_vm`] the launcher's.
//!
//! Embedder devices ([`CustomDevice`], [`CustomVirtioDevice`]) come from factories, called at
//! every build. A bus device runs on the vCPU thread that touched its range, under the vCPU
//! seccomp filter when the VM has one ([`VmBuilder::seccomp`]): besides computing and taking
//! locks it may write to files it holds open and to eventfds (raising its interrupt is one),
//! nothing more; work that needs other system calls belongs on a thread of the device's own,
//! started by the factory (which runs on the thread building the VM). A VM with embedder
//! devices cannot be snapshotted, migrated or restored: the snapshot format has no place for
//! their state, so [`VmHandle::snapshot`] refuses, naming the device.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

mod custom;
mod virtio;
mod vm_builder;

use kvm_ioctls::{Cap, Kvm, VmFd};
use rvmm_devices::EventFdTrigger;
use rvmm_devices::legacy::{
    ACPI_PM_PORT_BASE, ACPI_PM_PORT_LEN, AcpiPm, COM1_IRQ, COM1_PORT_BASE, I8042, I8042_KBD_IRQ,
    I8042_PORT_BASE, I8042_PORT_LEN, I8042Snapshot, SCI_IRQ, SERIAL_PORT_LEN, SerialConsole,
    SerialRestoreError, SerialSnapshot,
};
use rvmm_devices::pci::MalformedPciAccesses;
use rvmm_devices::seccomp::SeccompError;
use rvmm_devices::virtio::VirtioDevice;
use rvmm_devices::virtio::block::{BlockConfig, DiskSync};
use rvmm_devices::virtio::net::NetConfig;

pub(crate) use self::custom::CustomDevices;
pub use self::custom::{
    AddressSpace, CustomDevice, CustomVirtioDevice, DeviceInterrupt, FactoryError,
};
use self::custom::{attach_custom_devices, check_ranges, interrupt_gsis};
pub(crate) use self::virtio::{Placement, create_virtio_devices, place, start_worker_threads};
use self::virtio::{attach_virtio_mmio, attach_virtio_pci};
pub use self::vm_builder::{DEFAULT_CMDLINE, VmBuilder};
use crate::acpi::{AcpiError, AcpiPlatform, write_acpi_tables};
use crate::boot::{
    BootError, LoadedKernel, PlatformInfo, build_cmdline, load_initrd, load_initrd_bytes,
    load_kernel, load_kernel_from, write_boot_params, write_cmdline,
};
use crate::bus::{Bus, BusError};
use crate::control::{ResetTrigger, StopReason, VmControl, VmPower};
use crate::cpuid::{CpuProfile, VcpuTopology, vcpu_cpuid};
use crate::disk_boot::{DiskBootError, boot_from_disk};
use crate::layout::{PCI_ECAM_SIZE, PCI_ECAM_START};
use crate::lifecycle::{RunningVm, VmHandle};
use crate::machine::{Machine, VcpuSlot, VirtioTransport};
use crate::memory::{GuestMemoryMmap, MemoryError, MemoryLayout, create_guest_memory};
use crate::metrics::{DiskSource, ExitCounters, ExitRecorder, MetricsHandle, NicSource};
use crate::mptable::{MAX_VCPUS, MptableError, setup_mptable};
use crate::pci::msi::MsiError;
use crate::pci::{PciError, PciRoot};
use crate::regs::{RegsError, write_boot_tables};
use crate::seccomp::vcpu_filter;
use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::{VmError, check_capabilities, create_vm, open_kvm, register_memory};

/// Where guest console output goes.
pub type SerialOutput = Box<dyn Write + Send>;
/// The guest's serial console.
pub type Serial = SerialConsole<EventFdTrigger, SerialOutput>;
/// The i8042 controller: resets end the VM, keyboard input raises IRQ 1.
pub type Keyboard = I8042<ResetTrigger, EventFdTrigger>;
/// The ACPI power-management registers: S5 and the reset register end the VM, events raise
/// the SCI.
pub type Power = AcpiPm<EventFdTrigger, VmPower>;

/// How virtio devices reach the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// virtio-mmio: a microVM's devices, announced in the DSDT (or on the command line without
    /// ACPI).
    #[default]
    Mmio,
    /// virtio-pci behind a PCI root complex, as distro kernels expect; needs ACPI.
    Pci,
}

impl Transport {
    /// The transport's name in configurations.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mmio => "mmio",
            Self::Pci => "pci",
        }
    }
}

/// Everything needed to build a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs (1 to 32).
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// What the guest boots.
    pub boot: BootSource,
    /// Kernel command line: the whole of it for [`BootSource::Kernel`], appended to the boot
    /// entry's for [`BootSource::Disk`].
    pub cmdline: String,
    /// CPU features shown to the guest.
    pub cpu_profile: CpuProfile,
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// Attach a virtio-rng device.
    pub rng: bool,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<BlockConfig>,
    /// virtio-net interfaces on existing taps, in the order the guest sees them.
    pub nets: Vec<NetConfig>,
    /// Filter the system calls of the vCPU and device worker threads ([`crate::seccomp`]);
    /// off only to debug (`--seccomp=false`).
    pub seccomp: bool,
    /// How the virtio devices reach the guest.
    pub transport: Transport,
    /// Give the guest ACPI tables and power management (the power button, S5); without it the
    /// guest finds its devices on the command line and the MP table, as a microVM without
    /// firmware.
    pub acpi: bool,
}

/// What the guest boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootSource {
    /// A kernel (ELF vmlinux or bzImage) and initrd from host files.
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Initrd/initramfs.
        initrd: Option<PathBuf>,
    },
    /// The kernel, initrd and command line that the boot configuration on disk `index` (of
    /// [`VmConfig::disks`]) names ([`crate::disk_boot`]), read again at every boot.
    Disk {
        /// Position of the disk among the VM's disks.
        index: usize,
    },
}

impl BootSource {
    /// A kernel without an initrd.
    pub fn kernel(path: impl Into<PathBuf>) -> Self {
        Self::Kernel {
            kernel: path.into(),
            initrd: None,
        }
    }
}

/// Errors building a VM. Each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// vCPU count out of range.
    #[error("Invalid vCPU count {0}: must be 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// The PCI transport without ACPI.
    #[error("The pci transport needs ACPI: the guest finds the PCI host bridge in the DSDT")]
    PciWithoutAcpi,
    /// The ACPI tables.
    #[error("Cannot write the ACPI tables")]
    Acpi(#[from] AcpiError),
    /// A PCI function cannot be put on the bus.
    #[error("Cannot attach a PCI function")]
    Pci(#[from] PciError),
    /// A device's MSI-X vectors.
    #[error("Cannot set up the MSI-X vectors of virtio device {index}")]
    Msi {
        /// The device's position.
        index: usize,
        /// Cause.
        #[source]
        source: MsiError,
    },
    /// Memory layout rejected.
    #[error("Cannot set up guest memory")]
    Memory(#[from] MemoryError),
    /// KVM VM creation failed.
    #[error("Cannot create the KVM VM")]
    Vm(#[from] VmError),
    /// Kernel, initrd or command line.
    #[error("Cannot load the guest")]
    Boot(#[from] BootError),
    /// The boot disk holds nothing rvmm can boot (the error names the image).
    #[error(transparent)]
    DiskBoot(#[from] DiskBootError),
    /// The boot disk index names no disk.
    #[error("Boot disk {0} is not one of the VM's disks")]
    NoBootDisk(usize),
    /// Boot tables.
    #[error("Cannot write the boot tables")]
    Regs(#[from] RegsError),
    /// MP table.
    #[error("Cannot write the MP table")]
    Mptable(#[from] MptableError),
    /// Device registration.
    #[error("Cannot attach a device")]
    Bus(#[from] BusError),
    /// Interrupt wiring.
    #[error("Cannot wire the {0} interrupt")]
    Irq(&'static str, #[source] std::io::Error),
    /// vCPU creation or configuration.
    #[error("Cannot set up the vCPUs")]
    Vcpu(#[from] VcpuError),
    /// A disk cannot be opened or used.
    #[error("Cannot attach disk {index}")]
    Disk {
        /// Position among the disks.
        index: usize,
        /// Cause (names the path).
        #[source]
        source: rvmm_devices::virtio::block::BlockError,
    },
    /// A network interface cannot be set up.
    #[error("Cannot attach network interface {index}")]
    Net {
        /// Position among the interfaces.
        index: usize,
        /// Cause (names the tap).
        #[source]
        source: rvmm_devices::virtio::net::NetError,
    },
    /// More virtio devices than MMIO slots and interrupt lines, or PCI slots.
    #[error("Too many virtio devices: at most {0}")]
    TooManyDevices(usize),
    /// A virtio transport could not be created.
    #[error("Cannot create the virtio transport of device {index}")]
    Transport {
        /// The device's slot.
        index: usize,
        /// Cause.
        #[source]
        source: rvmm_devices::virtio::transport_core::TransportError,
    },
    /// KVM_IOEVENTFD failed.
    #[error("Cannot register the queue notifier of virtio device {0}")]
    IoEvent(usize, #[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot read KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// A device's worker thread cannot be started.
    #[error("Cannot start the worker thread of virtio device {index}")]
    Worker {
        /// The device's slot.
        index: usize,
        /// Cause.
        #[source]
        source: rvmm_devices::virtio::WorkerError,
    },
    /// The vCPU seccomp filter cannot be built.
    #[error("Cannot build the vCPU seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// The snapshot's serial port state is invalid.
    #[error("Cannot restore the serial port")]
    Serial(#[source] SerialRestoreError),
    /// An embedder device's range is invalid or taken.
    #[error("Device {name}: {space} range {base:#x}+{len:#x} overlaps {owner}")]
    ReservedRange {
        /// The device.
        name: String,
        /// Port I/O or MMIO.
        space: &'static str,
        /// Start of its range.
        base: u64,
        /// Length of its range.
        len: u64,
        /// What the range collides with, and where that is.
        owner: String,
    },
    /// More embedder devices want an interrupt than the IOAPIC has free pins.
    #[error("No free interrupt lines for {wanted} devices")]
    NoFreeInterrupt {
        /// Devices that asked for a line.
        wanted: usize,
    },
    /// A restore asked of a VM with embedder devices, whose state a snapshot cannot hold.
    #[error("Device {0} is the embedder's: a snapshot cannot restore it")]
    CustomDeviceRestore(String),
    /// An embedder's factory failed.
    #[error("Cannot create device {name}")]
    CustomDevice {
        /// The device.
        name: String,
        /// What the factory returned.
        #[source]
        source: FactoryError,
    },
}

/// A VM built and ready to start.
#[derive(Debug)]
pub struct Vm {
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) keyboard: Arc<Mutex<Keyboard>>,
    pub(crate) power: Option<Arc<Mutex<Power>>>,
    pub(crate) metrics: MetricsHandle,
    pub(crate) disk_syncs: Arc<[DiskSync]>,
    pub(crate) transports: Vec<VirtioTransport>,
    pub(crate) kvm: Kvm,
    // Dropped in this order: the VM fd before the memory it maps. The devices that hold it
    // (PCI functions, to move ioeventfds and MSI routes) are dropped with the buses first.
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) layout: MemoryLayout,
    pub(crate) seccomp: bool,
    /// The embedder's devices, by name (a snapshot refuses them).
    pub(crate) custom: Vec<String>,
}

/// The virtio devices of a configuration, and what the VM keeps of them besides the devices.
pub(crate) struct VirtioDevices {
    /// In slot order.
    pub(crate) devices: Vec<Box<dyn VirtioDevice>>,
    pub(crate) disks: Vec<DiskSource>,
    pub(crate) nets: Vec<NicSource>,
    /// The writable disks.
    pub(crate) syncs: Vec<DiskSync>,
}

/// Builds the VM described by `config`, its console writing to `serial_out` (the launcher's
/// entry; [`VmBuilder`] adds the embedder's devices).
pub fn build_vm(config: &VmConfig, serial_out: SerialOutput) -> Result<Vm, BuildError> {
    build(config, &CustomDevices::default(), serial_out)
}

/// Builds the VM described by `config` with the embedder's `custom` devices.
fn build(
    config: &VmConfig,
    custom: &CustomDevices,
    serial_out: SerialOutput,
) -> Result<Vm, BuildError> {
    check_platform(config)?;
    let layout = MemoryLayout::new(config.memory_bytes)?;
    check_ranges(&layout, &custom.bus)?;
    let mem = create_guest_memory(&layout)?;
    // The user's files are checked before KVM is touched.
    let mut virtio = create_virtio_devices(config)?;
    for device in &custom.virtio {
        virtio.devices.push(device.create()?);
    }
    start_worker_threads(&mut virtio.devices, config.seccomp)?;
    let placement = place(config.transport, virtio.devices.len())?;
    let wanted = custom.bus.iter().filter(|d| d.wants_interrupt()).count();
    let gsis = interrupt_gsis(&placement, config.acpi, wanted)?;
    let platform = setup_acpi(&mem, &layout, config, &placement)?;
    let kernel = setup_boot(&mem, &layout, config, &placement, &platform)?;
    setup_mptable(&mem, config.vcpus)?;
    let kvm = open_kvm(&config.kvm_path)?;
    check_capabilities(&kvm)?;
    let vm_fd = Arc::new(create_vm(&kvm)?);
    register_memory(&vm_fd, &mem)?;
    let control = Arc::new(VmControl::new(usize::from(config.vcpus)));
    let mut pio = Bus::new("port I/O");
    let mut mmio = Bus::new("MMIO");
    let serial = attach_serial(&vm_fd, &mut pio, serial_out, None)?;
    let keyboard = attach_i8042(&vm_fd, &mut pio, &control, None)?;
    let power = match config.acpi {
        true => Some(attach_acpi_pm(&vm_fd, &mut pio, &control)?),
        false => None,
    };
    let attached = attach_virtio_devices(
        &vm_fd,
        (&mut pio, &mut mmio),
        &mem,
        &layout,
        virtio.devices,
        &placement,
    )?;
    attach_custom_devices(&vm_fd, (&mut pio, &mut mmio), &custom.bus, &gsis)?;
    let (exits, recorders) = ExitCounters::new(usize::from(config.vcpus));
    let vcpus = setup_vcpus(&kvm, &vm_fd, config, &kernel, recorders)?;
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
        custom: custom.names(),
    })
}

/// The configuration's vCPU count and platform (transport and ACPI) are possible.
pub(crate) fn check_platform(config: &VmConfig) -> Result<(), BuildError> {
    check_vcpu_count(config.vcpus)?;
    if config.transport == Transport::Pci && !config.acpi {
        return Err(BuildError::PciWithoutAcpi);
    }
    Ok(())
}

fn check_vcpu_count(vcpus: u8) -> Result<(), BuildError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BuildError::VcpuCount(vcpus));
    }
    Ok(())
}

/// COM1, new or (`saved`) as a snapshot left it.
pub(crate) fn attach_serial(
    vm_fd: &VmFd,
    pio: &mut Bus,
    out: SerialOutput,
    saved: Option<&SerialSnapshot>,
) -> Result<Arc<Mutex<Serial>>, BuildError> {
    let irq = EventFdTrigger::new().map_err(|e| BuildError::Irq("serial", e))?;
    vm_fd
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| BuildError::Irq("serial", e.into()))?;
    let console = match saved {
        Some(state) => SerialConsole::from_snapshot(state, irq, out).map_err(BuildError::Serial)?,
        None => SerialConsole::new(irq, out),
    };
    let serial = Arc::new(Mutex::new(console));
    pio.insert(COM1_PORT_BASE, SERIAL_PORT_LEN, serial.clone())?;
    Ok(serial)
}

/// The i8042, new or (`saved`) as a snapshot left it.
pub(crate) fn attach_i8042(
    vm_fd: &VmFd,
    pio: &mut Bus,
    control: &Arc<VmControl>,
    saved: Option<&I8042Snapshot>,
) -> Result<Arc<Mutex<Keyboard>>, BuildError> {
    let irq = EventFdTrigger::new().map_err(|e| BuildError::Irq("keyboard", e))?;
    vm_fd
        .register_irqfd(&irq, I8042_KBD_IRQ)
        .map_err(|e| BuildError::Irq("keyboard", e.into()))?;
    let reset = ResetTrigger(control.clone());
    let device = match saved {
        Some(state) => I8042::from_snapshot(state, reset, irq),
        None => I8042::new(reset, irq),
    };
    let i8042 = Arc::new(Mutex::new(device));
    pio.insert(I8042_PORT_BASE, I8042_PORT_LEN, i8042.clone())?;
    Ok(i8042)
}

/// Writes the ACPI tables when the configuration has ACPI, and says what the boot structures
/// must tell the kernel about them.
fn setup_acpi(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    config: &VmConfig,
    placement: &Placement,
) -> Result<PlatformInfo, BuildError> {
    if !config.acpi {
        return Ok(PlatformInfo::default());
    }
    let pci = placement.host_bridge(layout);
    // Linux uses the ECAM window only where the memory map reserves it.
    let reserved = match pci {
        Some(_) => vec![(PCI_ECAM_START, PCI_ECAM_SIZE)],
        None => Vec::new(),
    };
    let platform = AcpiPlatform {
        vcpus: config.vcpus,
        pci,
        virtio_mmio: placement.mmio_devices(),
    };
    Ok(PlatformInfo {
        acpi_rsdp: Some(write_acpi_tables(mem, &platform)?),
        reserved,
    })
}

fn setup_boot(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    config: &VmConfig,
    placement: &Placement,
    platform: &PlatformInfo,
) -> Result<LoadedKernel, BuildError> {
    let (kernel, initrd, cmdline) = match &config.boot {
        BootSource::Kernel { kernel, initrd } => {
            let loaded = load_kernel(mem, kernel)?;
            let initrd = match initrd {
                Some(path) => Some(load_initrd(mem, layout, loaded.end, path)?),
                None => None,
            };
            (loaded, initrd, config.cmdline.clone())
        }
        BootSource::Disk { index } => {
            let disk = config
                .disks
                .get(*index)
                .ok_or(BuildError::NoBootDisk(*index))?;
            let boot = boot_from_disk(&disk.path, disk.format)?;
            log::info!("Booting {} from {}", boot.source, disk.path.display());
            let name = |what: &str| disk.path.join(what);
            let loaded = load_kernel_from(
                mem,
                &mut std::io::Cursor::new(&boot.kernel),
                &name("kernel"),
            )?;
            let initrd = match &boot.initrd {
                Some(bytes) => Some(load_initrd_bytes(
                    mem,
                    layout,
                    loaded.end,
                    bytes,
                    &name("initrd"),
                )?),
                None => None,
            };
            let cmdline = format!("{} {}", boot.cmdline, config.cmdline);
            (loaded, initrd, cmdline)
        }
    };
    let cmdline = build_cmdline(&cmdline, &placement.cmdline(config.acpi))?;
    let cmdline_size = write_cmdline(mem, &cmdline)?;
    write_boot_params(mem, layout, &kernel, cmdline_size, initrd, platform)?;
    write_boot_tables(mem, kernel.entry)?;
    Ok(kernel)
}

/// The ACPI power-management registers, raising the SCI through an irqfd.
pub(crate) fn attach_acpi_pm(
    vm_fd: &VmFd,
    pio: &mut Bus,
    control: &Arc<VmControl>,
) -> Result<Arc<Mutex<Power>>, BuildError> {
    let sci = EventFdTrigger::new().map_err(|e| BuildError::Irq("SCI", e))?;
    vm_fd
        .register_irqfd(&sci, SCI_IRQ)
        .map_err(|e| BuildError::Irq("SCI", e.into()))?;
    let power = Arc::new(Mutex::new(AcpiPm::new(sci, VmPower(control.clone()))));
    pio.insert(ACPI_PM_PORT_BASE, ACPI_PM_PORT_LEN, power.clone())?;
    Ok(power)
}

/// The virtio devices on their transport.
pub(crate) struct AttachedVirtio {
    /// Each device's transport, in device order.
    pub(crate) transports: Vec<VirtioTransport>,
    /// With PCI, the root complex's malformed-access counters.
    pub(crate) malformed_pci: Option<Arc<MalformedPciAccesses>>,
    /// With PCI, the root complex (a restore has it map the restored BARs).
    pub(crate) pci_root: Option<Arc<PciRoot>>,
}

/// Attaches the virtio devices on their transport.
pub(crate) fn attach_virtio_devices(
    vm_fd: &Arc<VmFd>,
    (pio, mmio): (&mut Bus, &mut Bus),
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    devices: Vec<Box<dyn VirtioDevice>>,
    placement: &Placement,
) -> Result<AttachedVirtio, BuildError> {
    match placement {
        Placement::Mmio(slots) => Ok(AttachedVirtio {
            transports: attach_virtio_mmio(vm_fd, mmio, mem, devices, slots)?
                .into_iter()
                .map(VirtioTransport::Mmio)
                .collect(),
            malformed_pci: None,
            pci_root: None,
        }),
        Placement::Pci(slots) => {
            let (root, transports) =
                attach_virtio_pci(vm_fd, pio, mmio, mem, layout, devices, slots)?;
            Ok(AttachedVirtio {
                transports: transports.into_iter().map(VirtioTransport::Pci).collect(),
                malformed_pci: Some(root.malformed().clone()),
                pci_root: Some(root),
            })
        }
    }
}

fn setup_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    config: &VmConfig,
    kernel: &LoadedKernel,
    recorders: Vec<ExitRecorder>,
) -> Result<Vec<Vcpu>, BuildError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for (index, exits) in (0..config.vcpus).zip(recorders) {
        let mut vcpu = Vcpu::new(vm_fd, index, exits)?;
        let topology = VcpuTopology {
            apic_id: index,
            count: config.vcpus,
        };
        let cpuid = vcpu_cpuid(
            supported.as_slice(),
            topology,
            config.cpu_profile,
            tsc_deadline,
        );
        vcpu.configure(&cpuid)?;
        if index == 0 {
            vcpu.setup_boot_registers(kernel.entry)?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

impl Vm {
    /// The guest's serial console (to queue input).
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Reads the VM's statistics from any thread, now and once it runs.
    pub fn metrics_handle(&self) -> MetricsHandle {
        self.metrics.clone()
    }

    /// Starts one thread per vCPU, each under the vCPU seccomp filter when the configuration
    /// asks for it.
    pub fn start(self) -> Result<RunningVm, BuildError> {
        let filter = match self.seccomp {
            true => Some(vcpu_filter().map_err(BuildError::Seccomp)?),
            false => None,
        };
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let count = self.vcpus.len();
        let vcpu_slots: Vec<VcpuSlot> = self
            .vcpus
            .iter()
            .map(|v| VcpuSlot {
                fd: v.shared_fd(),
                cpuid: v.cpuid().to_vec(),
            })
            .collect();
        for vcpu in self.vcpus {
            let index = usize::from(vcpu.index());
            let (pio, mmio) = (self.pio.clone(), self.mmio.clone());
            match vcpu.start(self.control.clone(), pio, mmio, filter.clone()) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    self.control.request_stop(StopReason::Requested);
                    for never_started in index..count {
                        self.control.vcpu_exited(never_started);
                    }
                    for thread in threads {
                        let _ = thread.join();
                    }
                    return Err(e.into());
                }
            }
        }
        let machine = Arc::new(Machine {
            transports: self.transports,
            serial: self.serial.clone(),
            keyboard: self.keyboard.clone(),
            power: self.power.clone(),
            vcpus: vcpu_slots,
            kvm: self.kvm,
            vm_fd: self.vm_fd,
            mem: self.mem,
            layout: self.layout,
            custom: self.custom,
        });
        Ok(RunningVm {
            threads,
            serial: self.serial,
            _pio: self.pio,
            _mmio: self.mmio,
            handle: VmHandle {
                control: self.control,
                keyboard: self.keyboard,
                power: self.power,
                metrics: self.metrics,
                disk_syncs: self.disk_syncs,
                machine: Arc::downgrade(&machine),
            },
            machine,
        })
    }
}
