//! A vCPU's state: what KVM keeps of it, read and written while its thread is parked.

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// One model-specific register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// A vCPU's state, format version 1. The KVM structures are kept as KVM hands them out.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM saves and restores (its `KVM_GET_MSR_INDEX_LIST`).
    pub msrs: Vec<MsrEntry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// The TSC frequency the guest runs at, in kHz.
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

/// Errors reading or writing a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed (the name says which state).
    #[error("Cannot {action} the {what} of vCPU {index}")]
    Ioctl {
        /// "read" or "write".
        action: &'static str,
        /// Which state.
        what: &'static str,
        /// The vCPU.
        index: usize,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took only some of the MSRs.
    #[error("KVM {action} {done} of the {total} MSRs of vCPU {index}; MSR {failed:#x} was refused")]
    Msrs {
        /// "read" or "wrote".
        action: &'static str,
        /// How many went through.
        done: usize,
        /// How many were asked for.
        total: usize,
        /// The first refused.
        failed: u32,
        /// The vCPU.
        index: usize,
    },
    /// Too many entries for KVM's lists.
    #[error("The snapshot's {0} list of vCPU {1} is too long")]
    TooMany(&'static str, usize),
}

fn ioctl_err(
    action: &'static str,
    what: &'static str,
    index: usize,
) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl {
        action,
        what,
        index,
        source,
    }
}

/// KVM's MSR entries for (index, value) pairs.
fn msr_entries(pairs: impl Iterator<Item = (u32, u64)>) -> Vec<kvm_msr_entry> {
    pairs
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

/// Reads the state of parked vCPU `index`; `msr_indices` are the MSRs to save, `cpuid` the
/// table it was given.
pub fn save_vcpu(
    fd: &VcpuFd,
    index: usize,
    cpuid: &[kvm_cpuid_entry2],
    msr_indices: &[u32],
) -> Result<VcpuState, VcpuStateError> {
    let read = |what| ioctl_err("read", what, index);
    let entries = msr_entries(msr_indices.iter().map(|&index| (index, 0)));
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany("MSR", index))?;
    let got = fd.get_msrs(&mut msrs).map_err(read("MSRs"))?;
    if got != entries.len() {
        return Err(VcpuStateError::Msrs {
            action: "read",
            done: got,
            total: entries.len(),
            failed: entries[got].index,
            index,
        });
    }
    Ok(VcpuState {
        cpuid: cpuid.to_vec(),
        msrs: msrs
            .as_slice()
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            })
            .collect(),
        regs: fd.get_regs().map_err(read("registers"))?,
        sregs: fd.get_sregs().map_err(read("special registers"))?,
        xsave: fd.get_xsave().map_err(read("XSAVE area"))?,
        xcrs: fd.get_xcrs().map_err(read("XCRs"))?,
        debugregs: fd.get_debug_regs().map_err(read("debug registers"))?,
        lapic: fd.get_lapic().map_err(read("local APIC"))?,
        mp_state: fd.get_mp_state().map_err(read("MP state"))?,
        vcpu_events: fd.get_vcpu_events().map_err(read("pending events"))?,
        tsc_khz: fd.get_tsc_khz().map_err(read("TSC frequency"))?,
    })
}

/// `IA32_TSC_DEADLINE`: the local APIC timer's deadline in TSC-deadline mode.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Writes a saved state into a new vCPU, in the order KVM needs: CPUID first (it decides
/// which MSRs exist), the MSRs before the registers, the local APIC after the special
/// registers (its base), the TSC deadline again after the local APIC (its timer mode), the
/// MP state and the pending events last.
pub fn restore_vcpu(fd: &VcpuFd, index: usize, state: &VcpuState) -> Result<(), VcpuStateError> {
    let write = |what| ioctl_err("write", what, index);
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::TooMany("CPUID", index))?;
    fd.set_cpuid2(&cpuid).map_err(write("CPUID"))?;
    match fd.get_tsc_khz() {
        Ok(khz) if khz != state.tsc_khz => {
            // Without TSC scaling the guest's TSC now ticks at the host's rate.
            if let Err(e) = fd.set_tsc_khz(state.tsc_khz) {
                log::warn!(
                    "vCPU {index}: the snapshot's TSC runs at {} kHz, this host's at {khz} kHz, \
                     and KVM cannot scale it ({e}); guest time may drift",
                    state.tsc_khz
                );
            }
        }
        _ => {}
    }
    let entries = msr_entries(state.msrs.iter().map(|m| (m.index, m.data)));
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany("MSR", index))?;
    let set = fd.set_msrs(&msrs).map_err(write("MSRs"))?;
    if set != entries.len() {
        return Err(VcpuStateError::Msrs {
            action: "wrote",
            done: set,
            total: entries.len(),
            failed: entries[set].index,
            index,
        });
    }
    fd.set_regs(&state.regs).map_err(write("registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(write("special registers"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` as KVM_GET_XSAVE returned it (4 KiB); the
    // host's XSAVE area is no larger (the VM refuses hosts whose KVM_CAP_XSAVE2 says more).
    unsafe { fd.set_xsave(&state.xsave) }.map_err(write("XSAVE area"))?;
    fd.set_xcrs(&state.xcrs).map_err(write("XCRs"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(write("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(write("local APIC"))?;
    // KVM drops a TSC deadline written while the local APIC timer is not in TSC-deadline
    // mode, which a new vCPU's is not: written with the MSRs above, the deadline is lost and a
    // guest idling until its next timer tick never wakes. Again now that the APIC is restored.
    if let Some(deadline) = state.msrs.iter().find(|m| m.index == MSR_IA32_TSC_DEADLINE) {
        let entries = msr_entries(std::iter::once((deadline.index, deadline.data)));
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany("MSR", index))?;
        let set = fd.set_msrs(&msrs).map_err(write("TSC deadline"))?;
        if set != 1 {
            return Err(VcpuStateError::Msrs {
                action: "wrote",
                done: set,
                total: 1,
                failed: deadline.index,
                index,
            });
        }
    }
    fd.set_mp_state(state.mp_state).map_err(write("MP state"))?;
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(write("pending events"))?;
    Ok(())
}
