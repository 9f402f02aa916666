//! The VM builder: a straight recipe of `setup_*`/`attach_*` steps from a [`VmConfig`] to a
//! [`Vm`] ready to start.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::EventFdTrigger;
use devices::legacy::{
    COM1_IRQ, COM1_PORT_BASE, I8042, I8042_KBD_IRQ, I8042_PORT_BASE, I8042_PORT_LEN, I8042Snapshot,
    SERIAL_PORT_LEN, SerialConsole, SerialRestoreError, SerialSnapshot,
};
use devices::seccomp::SeccompError;
use devices::virtio::VirtioDevice;
use devices::virtio::block::{Block, BlockConfig, DiskSync};
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::virtio::net::{Net, NetConfig};
use devices::virtio::rng::Rng;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{
    BootError, LoadedKernel, build_cmdline, load_initrd, load_kernel, write_boot_params,
    write_cmdline,
};
use crate::bus::{Bus, BusError};
use crate::control::{ResetTrigger, StopReason, VmControl};
use crate::cpuid::{CpuProfile, VcpuTopology, vcpu_cpuid};
use crate::layout::{VIRTIO_MMIO_DEVICE_SIZE, virtio_slot};
use crate::lifecycle::{RunningVm, VmHandle};
use crate::machine::{Machine, VcpuSlot};
use crate::memory::{GuestMemoryMmap, MemoryError, MemoryLayout, create_guest_memory};
use crate::metrics::{DiskSource, ExitCounters, ExitRecorder, MetricsHandle, NicSource, device_id};
use crate::mptable::{MAX_VCPUS, MptableError, setup_mptable};
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

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs (1 to 32).
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Kernel image: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initrd/initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
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
}

/// Errors building a VM. Each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// vCPU count out of range.
    #[error("Invalid vCPU count {0}: must be 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// Memory layout rejected.
    #[error("Cannot set up guest memory")]
    Memory(#[from] MemoryError),
    /// KVM VM creation failed.
    #[error("Cannot create the KVM VM")]
    Vm(#[from] VmError),
    /// Kernel, initrd or command line.
    #[error("Cannot load the guest")]
    Boot(#[from] BootError),
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
        source: devices::virtio::block::BlockError,
    },
    /// A network interface cannot be set up.
    #[error("Cannot attach network interface {index}")]
    Net {
        /// Position among the interfaces.
        index: usize,
        /// Cause (names the tap).
        #[source]
        source: devices::virtio::net::NetError,
    },
    /// More virtio devices than MMIO slots and interrupt lines.
    #[error("Too many virtio devices: at most {0}")]
    TooManyDevices(usize),
    /// A virtio transport could not be created.
    #[error("Cannot create the virtio-mmio transport of device {index}")]
    Transport {
        /// The device's slot.
        index: usize,
        /// Cause.
        #[source]
        source: devices::virtio::mmio::TransportError,
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
        source: devices::virtio::WorkerError,
    },
    /// The vCPU seccomp filter cannot be built.
    #[error("Cannot build the vCPU seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// The snapshot's serial port state is invalid.
    #[error("Cannot restore the serial port")]
    Serial(#[source] SerialRestoreError),
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
    pub(crate) metrics: MetricsHandle,
    pub(crate) disk_syncs: Arc<[DiskSync]>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) kvm: Kvm,
    // Dropped in this order: the VM fd before the memory it maps.
    pub(crate) vm_fd: VmFd,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) layout: MemoryLayout,
    pub(crate) seccomp: bool,
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

/// Builds the VM described by `config`, its console writing to `serial_out`.
pub fn build_vm(config: &VmConfig, serial_out: SerialOutput) -> Result<Vm, BuildError> {
    check_vcpu_count(config.vcpus)?;
    let layout = MemoryLayout::new(config.memory_bytes)?;
    let mem = create_guest_memory(&layout)?;
    // The user's files are checked before KVM is touched.
    let mut virtio = create_virtio_devices(config)?;
    start_worker_threads(&mut virtio.devices, config.seccomp)?;
    let slots = virtio_slots(virtio.devices.len())?;
    let kernel = setup_boot(&mem, &layout, config, &virtio_cmdline(&slots))?;
    setup_mptable(&mem, config.vcpus)?;
    let kvm = open_kvm(&config.kvm_path)?;
    check_capabilities(&kvm)?;
    let vm_fd = create_vm(&kvm)?;
    register_memory(&vm_fd, &mem)?;
    let control = Arc::new(VmControl::new(usize::from(config.vcpus)));
    let mut pio = Bus::new("port I/O");
    let mut mmio = Bus::new("MMIO");
    let serial = attach_serial(&vm_fd, &mut pio, serial_out, None)?;
    let keyboard = attach_i8042(&vm_fd, &mut pio, &control, None)?;
    let transports = attach_virtio_devices(&vm_fd, &mut mmio, &mem, virtio.devices, &slots)?;
    let (exits, recorders) = ExitCounters::new(usize::from(config.vcpus));
    let vcpus = setup_vcpus(&kvm, &vm_fd, config, &kernel, recorders)?;
    let metrics = MetricsHandle::new(
        exits,
        virtio.disks,
        virtio.nets,
        layout.size(),
        control.clone(),
    );
    Ok(Vm {
        vcpus,
        control,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        serial,
        keyboard,
        metrics,
        disk_syncs: virtio.syncs.into(),
        transports,
        kvm,
        vm_fd,
        mem,
        layout,
        seccomp: config.seccomp,
    })
}

pub(crate) fn check_vcpu_count(vcpus: u8) -> Result<(), BuildError> {
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

fn setup_boot(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    config: &VmConfig,
    device_cmdline: &[String],
) -> Result<LoadedKernel, BuildError> {
    let kernel = load_kernel(mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(mem, layout, kernel.end, path)?),
        None => None,
    };
    let cmdline = build_cmdline(&config.cmdline, device_cmdline)?;
    let cmdline_size = write_cmdline(mem, &cmdline)?;
    write_boot_params(mem, layout, &kernel, cmdline_size, initrd, &Default::default())?;
    write_boot_tables(mem, kernel.entry)?;
    Ok(kernel)
}

/// The virtio devices the configuration asks for, in slot order, with their counters and
/// the writable disks' flush handles.
pub(crate) fn create_virtio_devices(config: &VmConfig) -> Result<VirtioDevices, BuildError> {
    let mut virtio = VirtioDevices {
        devices: Vec::new(),
        disks: Vec::new(),
        nets: Vec::new(),
        syncs: Vec::new(),
    };
    for (index, disk) in config.disks.iter().enumerate() {
        let disk_err = |source| BuildError::Disk { index, source };
        let block = Block::new(disk.clone()).map_err(disk_err)?;
        virtio.syncs.extend(block.disk_sync().map_err(disk_err)?);
        virtio.disks.push(DiskSource {
            id: device_id(disk.id.as_deref(), "disk", index),
            counters: block.counters(),
        });
        virtio.devices.push(Box::new(block));
    }
    for (index, net) in config.nets.iter().enumerate() {
        let nic = Net::new(net.clone()).map_err(|source| BuildError::Net { index, source })?;
        virtio.nets.push(NicSource {
            id: device_id(net.id.as_deref(), "net", index),
            counters: nic.counters(),
        });
        virtio.devices.push(Box::new(nic));
    }
    if config.rng {
        virtio.devices.push(Box::new(Rng::new()));
    }
    Ok(virtio)
}

/// Starts the devices' worker threads from this (unfiltered) thread, each filtered with its
/// own list when `seccomp` is set: started at activation by a vCPU, they would inherit its
/// filter, which does not allow starting threads.
pub(crate) fn start_worker_threads(
    devices: &mut [Box<dyn VirtioDevice>],
    seccomp: bool,
) -> Result<(), BuildError> {
    for (index, device) in devices.iter_mut().enumerate() {
        device
            .start_worker_thread(seccomp)
            .map_err(|source| BuildError::Worker { index, source })?;
    }
    Ok(())
}

/// An MMIO window and interrupt line for each of `count` devices.
pub(crate) fn virtio_slots(count: usize) -> Result<Vec<(u64, u32)>, BuildError> {
    (0..count)
        .map(|i| virtio_slot(i).ok_or(BuildError::TooManyDevices(i)))
        .collect()
}

/// How the guest kernel learns of each device (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
fn virtio_cmdline(slots: &[(u64, u32)]) -> Vec<String> {
    slots
        .iter()
        .map(|(base, irq)| format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
        .collect()
}

/// Puts each device behind a virtio-mmio transport: interrupts through an irqfd, queue
/// notifications through ioeventfds so the vCPU thread never runs device code.
pub(crate) fn attach_virtio_devices(
    vm_fd: &VmFd,
    mmio: &mut Bus,
    mem: &GuestMemoryMmap,
    devices: Vec<Box<dyn VirtioDevice>>,
    slots: &[(u64, u32)],
) -> Result<Vec<Arc<Mutex<MmioTransport>>>, BuildError> {
    let mut transports = Vec::with_capacity(devices.len());
    for (index, (device, &(base, irq))) in devices.into_iter().zip(slots).enumerate() {
        let line = EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::Irq("virtio", e))?;
        vm_fd
            .register_irqfd(&line, irq)
            .map_err(|e| BuildError::Irq("virtio", e.into()))?;
        let transport = MmioTransport::new(device, mem.clone(), line)
            .map_err(|source| BuildError::Transport { index, source })?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            vm_fd
                .register_ioevent(event, &notify, queue as u32)
                .map_err(|e| BuildError::IoEvent(index, e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, VIRTIO_MMIO_DEVICE_SIZE, transport.clone())?;
        transports.push(transport);
    }
    Ok(transports)
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
            vcpus: vcpu_slots,
            kvm: self.kvm,
            vm_fd: self.vm_fd,
            mem: self.mem,
            layout: self.layout,
        });
        Ok(RunningVm {
            threads,
            serial: self.serial,
            _pio: self.pio,
            _mmio: self.mmio,
            handle: VmHandle {
                control: self.control,
                keyboard: self.keyboard,
                metrics: self.metrics,
                disk_syncs: self.disk_syncs,
                machine: Arc::downgrade(&machine),
            },
            machine,
        })
    }
}
