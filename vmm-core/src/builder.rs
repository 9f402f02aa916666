//! The VM builder: a straight recipe of `setup_*`/`attach_*` steps from a [`VmConfig`] to a
//! [`Vm`] ready to start.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::EventFdTrigger;
use devices::legacy::{
    COM1_IRQ, COM1_PORT_BASE, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_PORT_LEN,
    SerialConsole,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::boot::{
    BootError, LoadedKernel, build_cmdline, load_initrd, load_kernel, write_boot_params,
    write_cmdline,
};
use crate::bus::{Bus, BusError};
use crate::control::{ResetTrigger, RunState, StopReason, VmControl};
use crate::cpuid::{CpuProfile, VcpuTopology, vcpu_cpuid};
use crate::memory::{GuestMemoryMmap, MemoryError, MemoryLayout, create_guest_memory};
use crate::mptable::{MAX_VCPUS, MptableError, setup_mptable};
use crate::regs::{RegsError, write_boot_tables};
use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::{VmError, check_capabilities, create_vm, open_kvm, register_memory};

/// Where guest console output goes.
pub type SerialOutput = Box<dyn Write + Send>;
/// The guest's serial console.
pub type Serial = SerialConsole<EventFdTrigger, SerialOutput>;

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
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot read KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// A VM built and ready to start.
#[derive(Debug)]
pub struct Vm {
    vcpus: Vec<Vcpu>,
    control: Arc<VmControl>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    // Dropped in this order: the VM fd before the memory it maps.
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    layout: MemoryLayout,
}

/// Builds the VM described by `config`, its console writing to `serial_out`.
pub fn build_vm(config: &VmConfig, serial_out: SerialOutput) -> Result<Vm, BuildError> {
    check_vcpu_count(config.vcpus)?;
    let layout = MemoryLayout::new(config.memory_bytes)?;
    let mem = create_guest_memory(&layout)?;
    // The user's files are checked before KVM is touched.
    let kernel = setup_boot(&mem, &layout, config)?;
    setup_mptable(&mem, config.vcpus)?;
    let kvm = open_kvm(&config.kvm_path)?;
    check_capabilities(&kvm)?;
    let vm_fd = create_vm(&kvm)?;
    register_memory(&vm_fd, &mem)?;
    let control = Arc::new(VmControl::new(usize::from(config.vcpus)));
    let mut pio = Bus::new("port I/O");
    let mmio = Bus::new("MMIO");
    let serial = attach_serial(&vm_fd, &mut pio, serial_out)?;
    attach_i8042(&mut pio, &control)?;
    let vcpus = setup_vcpus(&kvm, &vm_fd, config, &kernel)?;
    Ok(Vm {
        vcpus,
        control,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        serial,
        vm_fd,
        mem,
        layout,
    })
}

fn check_vcpu_count(vcpus: u8) -> Result<(), BuildError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BuildError::VcpuCount(vcpus));
    }
    Ok(())
}

fn attach_serial(
    vm_fd: &VmFd,
    pio: &mut Bus,
    out: SerialOutput,
) -> Result<Arc<Mutex<Serial>>, BuildError> {
    let irq = EventFdTrigger::new().map_err(|e| BuildError::Irq("serial", e))?;
    vm_fd
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| BuildError::Irq("serial", e.into()))?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(irq, out)));
    pio.insert(COM1_PORT_BASE, SERIAL_PORT_LEN, serial.clone())?;
    Ok(serial)
}

fn attach_i8042(pio: &mut Bus, control: &Arc<VmControl>) -> Result<(), BuildError> {
    let i8042 = Arc::new(Mutex::new(I8042::new(ResetTrigger(control.clone()))));
    pio.insert(I8042_PORT_BASE, I8042_PORT_LEN, i8042)?;
    Ok(())
}

fn setup_boot(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    config: &VmConfig,
) -> Result<LoadedKernel, BuildError> {
    let kernel = load_kernel(mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(mem, layout, kernel.end, path)?),
        None => None,
    };
    let cmdline = build_cmdline(&config.cmdline, &[])?;
    let cmdline_size = write_cmdline(mem, &cmdline)?;
    write_boot_params(mem, layout, &kernel, cmdline_size, initrd)?;
    write_boot_tables(mem, kernel.entry)?;
    Ok(kernel)
}

fn setup_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    config: &VmConfig,
    kernel: &LoadedKernel,
) -> Result<Vec<Vcpu>, BuildError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(vm_fd, index)?;
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

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, BuildError> {
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let count = self.vcpus.len();
        for vcpu in self.vcpus {
            let index = usize::from(vcpu.index());
            match vcpu.start(self.control.clone(), self.pio.clone(), self.mmio.clone()) {
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
        Ok(RunningVm {
            threads,
            control: self.control,
            serial: self.serial,
            _vm_fd: self.vm_fd,
            _mem: self.mem,
            layout: self.layout,
        })
    }
}

/// A VM whose vCPUs are running (or paused).
#[derive(Debug)]
pub struct RunningVm {
    threads: Vec<JoinHandle<()>>,
    control: Arc<VmControl>,
    serial: Arc<Mutex<Serial>>,
    _vm_fd: VmFd,
    _mem: GuestMemoryMmap,
    layout: MemoryLayout,
}

impl RunningVm {
    /// The guest's serial console.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// Shared run control (pause, resume, stop from other threads).
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.control.state()
    }

    /// Guest RAM size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.layout.size()
    }

    /// Takes every vCPU out of the guest; false when the VM was not running.
    pub fn pause(&self) -> bool {
        self.control.pause()
    }

    /// Lets the vCPUs run again; false when the VM was not paused.
    pub fn resume(&self) -> bool {
        self.control.resume()
    }

    /// Stops the VM.
    pub fn stop(&self) {
        self.control.request_stop(StopReason::Requested);
    }

    /// Waits for the VM to stop, joins the vCPU threads and says why it stopped.
    pub fn wait(self) -> StopReason {
        let reason = self.control.wait_stopped();
        for thread in self.threads {
            if thread.join().is_err() {
                log::error!("A vCPU thread panicked");
            }
        }
        reason
    }
}
