//! vCPUs: configuration before the first entry, and the per-thread run loop.

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, Msrs, kvm_msr_entry, kvm_run};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::bus::Bus;
use crate::control::{RegisterSnapshot, StopReason, VmControl};
use crate::exit::{ExitAction, ExitReason, GuestStop, handle_kvm_exit};
use crate::metrics::ExitRecorder;
use crate::regs::{BootEntry, boot_fpu, boot_regs, boot_sregs};
use crate::seccomp::{BpfProgram, SpawnError, spawn_filtered};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("Cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// A configuration ioctl failed.
    #[error("Cannot set {what} of vCPU {index}")]
    Configure {
        /// Which state.
        what: &'static str,
        /// The vCPU.
        index: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID list did not fit KVM's limit.
    #[error("CPUID of vCPU {0} has too many entries")]
    CpuidSize(u8),
    /// Spawning the thread, or installing its seccomp filter, failed.
    #[error("Cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] SpawnError),
}

// Model-specific registers set at boot, as Linux expects them from firmware.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

// Local APIC LVT registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A vCPU's file descriptor, shared by its thread (which holds the lock around each
/// `KVM_RUN`) and the VMM, which reads and writes the state of a parked vCPU (snapshots,
/// migration) from an unfiltered thread.
pub type SharedVcpuFd = Arc<Mutex<VcpuFd>>;

/// Locks a vCPU's descriptor; a poisoned lock is still usable (the fd has no invariants).
pub fn lock_vcpu(fd: &SharedVcpuFd) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|p| p.into_inner())
}

/// A created vCPU, not yet running.
#[derive(Debug)]
pub struct Vcpu {
    fd: SharedVcpuFd,
    index: u8,
    exits: ExitRecorder,
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

fn configure_err(what: &'static str, index: u8) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Configure {
        what,
        index,
        source,
    }
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`, counting its exits with `exits`.
    pub fn new(vm: &VmFd, index: u8, exits: ExitRecorder) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Self {
            fd: Arc::new(Mutex::new(fd)),
            index,
            exits,
            cpuid: Vec::new(),
        })
    }

    /// This vCPU's index (and APIC ID).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The vCPU's descriptor, to read or write its state while it is parked.
    pub fn shared_fd(&self) -> SharedVcpuFd {
        self.fd.clone()
    }

    /// The CPUID table the vCPU was given.
    pub fn cpuid(&self) -> &[kvm_bindings::kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// Sets the CPUID table only (a restored vCPU gets the rest from its snapshot).
    pub fn set_cpuid(&mut self, cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> Result<(), VcpuError> {
        let i = self.index;
        let table = CpuId::from_entries(cpuid).map_err(|_| VcpuError::CpuidSize(i))?;
        lock_vcpu(&self.fd)
            .set_cpuid2(&table)
            .map_err(configure_err("CPUID", i))?;
        self.cpuid = cpuid.to_vec();
        Ok(())
    }

    /// Puts a snapshot's state into this new vCPU (instead of [`Vcpu::configure`] and the boot
    /// registers).
    pub fn restore(
        &mut self,
        state: &crate::snapshot::VcpuState,
    ) -> Result<(), crate::snapshot::VcpuStateError> {
        crate::snapshot::restore_vcpu(&lock_vcpu(&self.fd), usize::from(self.index), state)?;
        self.cpuid = state.cpuid.clone();
        Ok(())
    }

    /// Sets CPUID, boot MSRs, FPU and the local APIC's LINT0/LINT1 wiring.
    pub fn configure(&mut self, cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> Result<(), VcpuError> {
        let i = self.index;
        self.set_cpuid(cpuid)?;
        let fd = lock_vcpu(&self.fd);
        let entries: Vec<kvm_msr_entry> = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
        ]
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::CpuidSize(i))?;
        let written = fd.set_msrs(&msrs).map_err(configure_err("MSRs", i))?;
        if written != entries.len() {
            // Some hosts refuse an MSR (e.g. MTRRs); the guest copes without it.
            log::debug!(
                "vCPU {i}: KVM accepted {written} of {} boot MSRs",
                entries.len()
            );
        }
        fd.set_fpu(&boot_fpu()).map_err(configure_err("FPU", i))?;
        let mut lapic = fd.get_lapic().map_err(configure_err("local APIC", i))?;
        set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic)
            .map_err(configure_err("local APIC", i))?;
        Ok(())
    }

    /// Puts the boot vCPU at the kernel's entry. The others wait for INIT/SIPI from it.
    pub fn setup_boot_registers(&self, entry: BootEntry) -> Result<(), VcpuError> {
        let i = self.index;
        let fd = lock_vcpu(&self.fd);
        let sregs = fd
            .get_sregs()
            .map_err(configure_err("special registers", i))?;
        fd.set_sregs(&boot_sregs(sregs, entry))
            .map_err(configure_err("special registers", i))?;
        fd.set_regs(&boot_regs(entry))
            .map_err(configure_err("registers", i))
    }

    /// Starts the vCPU's thread, which installs `filter` (see [`crate::seccomp`]) before it
    /// enters the guest; none: unfiltered.
    pub fn start(
        self,
        control: Arc<VmControl>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        filter: Option<BpfProgram>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        install_kick_handler();
        let index = self.index;
        spawn_filtered(&format!("vcpu{index}"), filter, move || {
            self.run(&control, &pio, &mmio)
        })
        .map_err(|e| VcpuError::Spawn(index, e))
    }

    fn run(mut self, control: &VmControl, pio: &Bus, mmio: &Bus) {
        let index = usize::from(self.index);
        let run_ptr: *mut kvm_run = lock_vcpu(&self.fd).get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run_ptr));
        // SAFETY: pthread_self has no preconditions.
        control.vcpu_started(index, unsafe { libc::pthread_self() });
        let shared = self.fd.clone();
        while control.vcpu_may_run(index, || complete_pending_exit(&shared)) {
            let mut fd = lock_vcpu(&self.fd);
            let run = fd.run();
            self.exits.record(ExitReason::of(&run));
            let action = handle_kvm_exit(run, pio, mmio);
            // A kick may have set immediate_exit; the loop re-checks the run state next.
            fd.set_kvm_immediate_exit(0);
            drop(fd);
            if let ExitAction::Stop(stop) = action {
                let reason = self.stop_reason(stop);
                control.request_stop(reason);
                break;
            }
        }
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        control.vcpu_exited(index);
    }

    fn registers(&self) -> Option<RegisterSnapshot> {
        let fd = lock_vcpu(&self.fd);
        let regs = fd.get_regs().ok()?;
        let sregs = fd.get_sregs().ok()?;
        Some(RegisterSnapshot {
            rip: regs.rip,
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        })
    }

    fn internal_error_detail(&mut self) -> String {
        // SAFETY: KVM filled the `internal` member of the exit union for this exit reason.
        let internal = unsafe { lock_vcpu(&self.fd).get_kvm_run().__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        describe_internal_error(internal.suberror, &internal.data[..n])
    }

    fn stop_reason(&mut self, stop: GuestStop) -> StopReason {
        let vcpu = self.index;
        match stop {
            GuestStop::Reset => StopReason::Reset,
            GuestStop::PowerOff => StopReason::PowerOff,
            GuestStop::Crash => StopReason::GuestCrash { vcpu },
            GuestStop::TripleFault => StopReason::TripleFault {
                vcpu,
                regs: self.registers(),
            },
            GuestStop::InternalError => StopReason::KvmFailure {
                vcpu,
                exit: self.internal_error_detail(),
                regs: self.registers(),
            },
            GuestStop::FailEntry { reason } => StopReason::KvmFailure {
                vcpu,
                exit: format!("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x})"),
                regs: self.registers(),
            },
            GuestStop::UnexpectedExit(name) => StopReason::KvmFailure {
                vcpu,
                exit: format!("unexpected {name}"),
                regs: self.registers(),
            },
            GuestStop::RunFailed(e) => StopReason::KvmFailure {
                vcpu,
                exit: format!("KVM_RUN failed: {e}"),
                regs: None,
            },
        }
    }
}

/// Completes the I/O or MMIO exit a vCPU handled last without entering the guest: KVM
/// finishes an emulated instruction (a port read's value into RAX, RIP past it) only on the
/// next `KVM_RUN`, so a vCPU parks only after one with `immediate_exit` set, which returns
/// `EINTR` as soon as that is done. Its registers are then those after the instruction.
fn complete_pending_exit(fd: &SharedVcpuFd) {
    let mut fd = lock_vcpu(fd);
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => log::warn!("Cannot complete a vCPU's last exit before it parks: {e}"),
        Ok(_) => log::warn!("A vCPU exited instead of completing its last exit"),
    }
    fd.set_kvm_immediate_exit(0);
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Names a `KVM_EXIT_INTERNAL_ERROR`; for an emulation failure, with the instruction's bytes
/// (`data[0]` holds flags, then one byte of length and up to 15 bytes of instruction).
pub fn describe_internal_error(suberror: u32, data: &[u64]) -> String {
    let kind = match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    };
    if suberror == KVM_INTERNAL_ERROR_EMULATION
        && data.len() >= 2
        && data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0
    {
        let bytes: Vec<u8> = data[1..].iter().flat_map(|d| d.to_le_bytes()).collect();
        let size = usize::from(bytes[0]).min(15).min(bytes.len() - 1);
        let insn: Vec<String> = bytes[1..=size].iter().map(|b| format!("{b:02x}")).collect();
        return format!(
            "KVM_EXIT_INTERNAL_ERROR ({kind}, instruction bytes {})",
            insn.join(" ")
        );
    }
    let words: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
    format!(
        "KVM_EXIT_INTERNAL_ERROR ({kind}, suberror {suberror}, data [{}])",
        words.join(" ")
    )
}

/// Sets the delivery mode (bits 8..10) of a local APIC LVT register.
fn set_lvt_delivery_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = r.to_ne_bytes()[0];
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = std::os::raw::c_char::from_ne_bytes([b]);
    }
}

thread_local! {
    // The running vCPU's kvm_run page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a const-initialised thread-local Cell is touched: async-signal-safe.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's mapped kvm_run page, set while the vCPU (and so
        // the mapping) is alive on this thread and cleared before it is dropped. A volatile
        // byte store makes KVM_RUN return at once if the signal lands just before entry.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), handle_kick) {
            log::error!("Cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Interrupts `thread`'s `KVM_RUN` so it re-checks the run state.
pub(crate) fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live vCPU thread: VmControl stops kicking a thread once it has
    // marked itself exited, which happens before it can be joined.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 {
        log::warn!("Cannot kick a vCPU thread: error {rc}");
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test values"
)]
mod tests {
    use super::*;

    #[test]
    fn emulation_failure_names_the_instruction_bytes() {
        // What this machine's KVM reported for `popcnt %rbx, %rbx` (f3 48 0f b8 db).
        let msg = describe_internal_error(1, &[0x1, 0xd4bf_dbb8_0f48_f30f, 0xffff_fdce_e800_1002]);
        assert!(msg.contains("emulation failure"), "{msg}");
        assert!(
            msg.contains("instruction bytes f3 48 0f b8 db bf d4"),
            "{msg}"
        );
    }

    #[test]
    fn other_internal_errors_show_suberror_and_data() {
        let msg = describe_internal_error(3, &[0x80000b0e, 0x30]);
        assert_eq!(
            msg,
            "KVM_EXIT_INTERNAL_ERROR (delivery event, suberror 3, data [0x80000b0e 0x30])"
        );
        // A length byte larger than the data must not read past it.
        let msg = describe_internal_error(1, &[0x1, 0xff]);
        assert!(msg.contains("instruction bytes"), "{msg}");
    }

    #[test]
    fn lvt_delivery_mode_is_replaced_and_other_bits_kept() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x20;
        regs[APIC_LVT0 + 1] = 0x05; // mode 5 set, must be replaced
        regs[APIC_LVT0 + 2] = 0x01; // masked bit (16)
        set_lvt_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let value = u32::from_le_bytes([
            regs[APIC_LVT0] as u8,
            regs[APIC_LVT0 + 1] as u8,
            regs[APIC_LVT0 + 2] as u8,
            regs[APIC_LVT0 + 3] as u8,
        ]);
        assert_eq!(value, 0x0001_0720);
    }
}
