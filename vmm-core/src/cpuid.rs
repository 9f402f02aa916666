//! The CPUID each vCPU sees: KVM's supported set, normalised for our topology, then filtered by
//! a profile.

use std::path::Path;
use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;

/// Which CPU features the guest is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuProfile {
    /// Everything KVM supports on this host (the default on hardware KVM).
    Host,
    /// Hides what KVM's instruction emulator cannot run, for PVM hosts without VT-x/AMD-V.
    PvmSafe,
}

/// Present on hosts whose /dev/kvm is the pagetable-based PVM module.
pub const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

impl CpuProfile {
    /// `PvmSafe` when the kvm_pvm module is loaded, `Host` otherwise.
    pub fn detect() -> Self {
        Self::for_host(Path::new(KVM_PVM_MODULE).exists())
    }

    /// The profile for a host with or without kvm_pvm.
    pub fn for_host(kvm_pvm_loaded: bool) -> Self {
        if kvm_pvm_loaded {
            Self::PvmSafe
        } else {
            Self::Host
        }
    }

    /// The profile's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::PvmSafe => "pvm-safe",
        }
    }
}

/// Unknown profile name.
#[derive(Debug, thiserror::Error)]
#[error("Unknown CPU profile '{0}' (expected host or pvm-safe)")]
pub struct UnknownProfile(String);

impl FromStr for CpuProfile {
    type Err = UnknownProfile;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Self::Host),
            "pvm-safe" => Ok(Self::PvmSafe),
            other => Err(UnknownProfile(other.to_string())),
        }
    }
}

/// Where one vCPU sits in the VM's topology (one socket, one thread per core).
#[derive(Clone, Copy, Debug)]
pub struct VcpuTopology {
    /// This vCPU's APIC ID (= its index).
    pub apic_id: u8,
    /// vCPUs in the VM.
    pub count: u8,
}

// Register bits, named as Linux's cpufeatures.h names them.
mod bit {
    // Leaf 1 ECX.
    pub const PCLMULQDQ: u32 = 1;
    pub const FMA: u32 = 12;
    pub const CX16: u32 = 13;
    pub const X2APIC: u32 = 21;
    pub const MOVBE: u32 = 22;
    pub const POPCNT: u32 = 23;
    pub const TSC_DEADLINE: u32 = 24;
    pub const AES: u32 = 25;
    pub const XSAVE: u32 = 26;
    pub const OSXSAVE: u32 = 27;
    pub const AVX: u32 = 28;
    pub const F16C: u32 = 29;
    pub const RDRAND: u32 = 30;
    pub const HYPERVISOR: u32 = 31;
    // Leaf 1 EDX.
    pub const HTT: u32 = 28;
    // Leaf 7.0 EBX.
    pub const FSGSBASE: u32 = 0;
    pub const BMI1: u32 = 3;
    pub const HLE: u32 = 4;
    pub const AVX2: u32 = 5;
    pub const SMEP: u32 = 7;
    pub const BMI2: u32 = 8;
    pub const ERMS: u32 = 9;
    pub const INVPCID: u32 = 10;
    pub const RTM: u32 = 11;
    pub const AVX512F: u32 = 16;
    pub const AVX512DQ: u32 = 17;
    pub const RDSEED: u32 = 18;
    pub const ADX: u32 = 19;
    pub const SMAP: u32 = 20;
    pub const AVX512IFMA: u32 = 21;
    pub const CLFLUSHOPT: u32 = 23;
    pub const CLWB: u32 = 24;
    pub const AVX512PF: u32 = 26;
    pub const AVX512ER: u32 = 27;
    pub const AVX512CD: u32 = 28;
    pub const SHA_NI: u32 = 29;
    pub const AVX512BW: u32 = 30;
    pub const AVX512VL: u32 = 31;
    // Leaf 7.0 ECX.
    pub const AVX512VBMI: u32 = 1;
    pub const UMIP: u32 = 2;
    pub const PKU: u32 = 3;
    pub const OSPKE: u32 = 4;
    pub const WAITPKG: u32 = 5;
    pub const AVX512_VBMI2: u32 = 6;
    pub const GFNI: u32 = 8;
    pub const VAES: u32 = 9;
    pub const VPCLMULQDQ: u32 = 10;
    pub const AVX512_VNNI: u32 = 11;
    pub const AVX512_BITALG: u32 = 12;
    pub const AVX512_VPOPCNTDQ: u32 = 14;
    pub const LA57: u32 = 16;
    pub const RDPID: u32 = 22;
    pub const MOVDIRI: u32 = 27;
    pub const MOVDIR64B: u32 = 28;
    // Leaf 7.0 EDX.
    pub const AVX512_4VNNIW: u32 = 2;
    pub const AVX512_4FMAPS: u32 = 3;
    pub const FSRM: u32 = 4;
    pub const AVX512_VP2INTERSECT: u32 = 8;
    // Leaf 0x8000_0001 ECX.
    pub const CMP_LEGACY: u32 = 1;
    pub const ABM: u32 = 5;
    pub const SSE4A: u32 = 6;
    pub const MISALIGNSSE: u32 = 7;
    pub const PREFETCH_3DNOW: u32 = 8;
    pub const XOP: u32 = 11;
    pub const FMA4: u32 = 16;
    pub const TBM: u32 = 21;
    pub const TOPOEXT: u32 = 22;
    pub const MWAITX: u32 = 29;
    // Leaf 0x8000_0008 EBX.
    pub const XSAVEERPTR: u32 = 2;
}

const fn mask(bits: &[u32]) -> u32 {
    let mut m = 0;
    let mut i = 0;
    while i < bits.len() {
        m |= 1 << bits[i];
        i += 1;
    }
    m
}

/// Leaf 1 ECX features the PVM emulator cannot run (or that need XSAVE).
const PVM_HIDDEN_1_ECX: u32 = mask(&[
    bit::PCLMULQDQ,
    bit::FMA,
    bit::CX16,
    bit::MOVBE,
    bit::POPCNT,
    bit::AES,
    bit::XSAVE,
    bit::OSXSAVE,
    bit::AVX,
    bit::F16C,
    bit::RDRAND,
]);
const PVM_HIDDEN_7_EBX: u32 = mask(&[
    bit::FSGSBASE,
    bit::BMI1,
    bit::HLE,
    bit::AVX2,
    bit::SMEP,
    bit::BMI2,
    bit::ERMS,
    bit::INVPCID,
    bit::RTM,
    bit::AVX512F,
    bit::AVX512DQ,
    bit::RDSEED,
    bit::ADX,
    bit::SMAP,
    bit::AVX512IFMA,
    bit::CLFLUSHOPT,
    bit::CLWB,
    bit::AVX512PF,
    bit::AVX512ER,
    bit::AVX512CD,
    bit::SHA_NI,
    bit::AVX512BW,
    bit::AVX512VL,
]);
const PVM_HIDDEN_7_ECX: u32 = mask(&[
    bit::AVX512VBMI,
    bit::UMIP,
    bit::PKU,
    bit::OSPKE,
    bit::WAITPKG,
    bit::AVX512_VBMI2,
    bit::GFNI,
    bit::VAES,
    bit::VPCLMULQDQ,
    bit::AVX512_VNNI,
    bit::AVX512_BITALG,
    bit::AVX512_VPOPCNTDQ,
    bit::LA57,
    bit::RDPID,
    bit::MOVDIRI,
    bit::MOVDIR64B,
]);
const PVM_HIDDEN_7_EDX: u32 = mask(&[
    bit::AVX512_4VNNIW,
    bit::AVX512_4FMAPS,
    bit::FSRM,
    bit::AVX512_VP2INTERSECT,
]);
const PVM_HIDDEN_EXT1_ECX: u32 = mask(&[
    bit::ABM,
    bit::SSE4A,
    bit::MISALIGNSSE,
    bit::PREFETCH_3DNOW,
    bit::XOP,
    bit::FMA4,
    bit::TBM,
    bit::MWAITX,
]);

/// Leaves rvmm edits.
mod leaf {
    pub const FEATURES: u32 = 0x1;
    pub const CACHE_PARAMS: u32 = 0x4;
    pub const EXT_FEATURES: u32 = 0x7;
    pub const EXT_TOPOLOGY: u32 = 0xb;
    pub const XSAVE: u32 = 0xd;
    pub const EXT_TOPOLOGY_V2: u32 = 0x1f;
    pub const AMD_FEATURES: u32 = 0x8000_0001;
    pub const AMD_SIZE_IDS: u32 = 0x8000_0008;
    pub const AMD_TOPOLOGY: u32 = 0x8000_001e;
}

/// Builds one vCPU's CPUID from KVM's supported entries.
///
/// `tsc_deadline` says whether KVM's in-kernel LAPIC offers the TSC-deadline timer.
pub fn vcpu_cpuid(
    supported: &[kvm_cpuid_entry2],
    topology: VcpuTopology,
    profile: CpuProfile,
    tsc_deadline: bool,
) -> Vec<kvm_cpuid_entry2> {
    let mut entries = supported.to_vec();
    for entry in &mut entries {
        normalize(entry, topology, tsc_deadline);
        if profile == CpuProfile::PvmSafe {
            hide_unemulated(entry);
        }
    }
    entries
}

/// Bits needed to number `count` logical processors.
fn id_bits(count: u8) -> u32 {
    u32::from(count).next_power_of_two().trailing_zeros()
}

fn normalize(entry: &mut kvm_cpuid_entry2, topo: VcpuTopology, tsc_deadline: bool) {
    let apic_id = u32::from(topo.apic_id);
    let count = u32::from(topo.count);
    match entry.function {
        leaf::FEATURES => {
            entry.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (entry.ebx & 0xff);
            entry.ecx |= 1 << bit::HYPERVISOR;
            if tsc_deadline {
                entry.ecx |= 1 << bit::TSC_DEADLINE;
            }
            if count > 1 {
                entry.edx |= 1 << bit::HTT;
            } else {
                entry.edx &= !(1 << bit::HTT);
            }
        }
        leaf::CACHE_PARAMS => {
            // Cores per package - 1 in EAX[31:26].
            entry.eax = (entry.eax & 0x03ff_ffff) | ((count - 1) << 26);
        }
        leaf::EXT_TOPOLOGY | leaf::EXT_TOPOLOGY_V2 => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    // SMT level: one thread per core.
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    // Core level: every vCPU is a core of the one socket.
                    entry.eax = id_bits(topo.count);
                    entry.ebx = count;
                    entry.ecx = (2 << 8) | 1;
                }
                index => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = index;
                }
            }
        }
        leaf::AMD_FEATURES => {
            // AMD guests would read topology from leaf 0x8000_001e, which KVM fills from the
            // host; hiding TOPOEXT makes them use the leaves set here instead.
            entry.ecx &= !(1 << bit::TOPOEXT);
            if count > 1 {
                entry.ecx |= 1 << bit::CMP_LEGACY;
            } else {
                entry.ecx &= !(1 << bit::CMP_LEGACY);
            }
        }
        leaf::AMD_SIZE_IDS => {
            entry.ecx = (id_bits(topo.count) << 12) | (count - 1);
        }
        leaf::AMD_TOPOLOGY => {
            entry.eax = apic_id;
            entry.ebx = 0;
            entry.ecx = 0;
        }
        _ => {}
    }
}

fn hide_unemulated(entry: &mut kvm_cpuid_entry2) {
    match (entry.function, entry.index) {
        (leaf::FEATURES, _) => {
            entry.ecx &= !PVM_HIDDEN_1_ECX;
            // The guest needs a working APIC timer and x2APIC: both are emulated in KVM.
            entry.ecx |= (1 << bit::X2APIC) | (1 << bit::TSC_DEADLINE);
        }
        (leaf::EXT_FEATURES, 0) => {
            entry.ebx &= !PVM_HIDDEN_7_EBX;
            entry.ecx &= !PVM_HIDDEN_7_ECX;
            entry.edx &= !PVM_HIDDEN_7_EDX;
        }
        (leaf::EXT_FEATURES, _) | (leaf::XSAVE, _) => {
            // Sub-leaf 7.1 holds AVX-VNNI and the fast-string variants; 0xd describes XSAVE.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        (leaf::AMD_FEATURES, _) => entry.ecx &= !PVM_HIDDEN_EXT1_ECX,
        (leaf::AMD_SIZE_IDS, _) => {
            // Without XSAVEERPTR an AMD guest runs an FXSAVE-leak workaround (fnclex, emms,
            // fildl) that the emulator rejects.
            entry.ebx |= 1 << bit::XSAVEERPTR;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    fn host_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0),
            entry(0x4, 0),
            entry(0x7, 0),
            entry(0x7, 1),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0xd, 0),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn has(reg: u32, b: u32) -> bool {
        reg & (1 << b) != 0
    }

    const TOPO: VcpuTopology = VcpuTopology {
        apic_id: 2,
        count: 4,
    };

    #[test]
    fn pvm_safe_hides_what_the_emulator_cannot_run() {
        let out = vcpu_cpuid(&host_like(), TOPO, CpuProfile::PvmSafe, false);
        let l1 = find(&out, 1, 0);
        for b in [
            bit::CX16,
            bit::XSAVE,
            bit::OSXSAVE,
            bit::POPCNT,
            bit::MOVBE,
            bit::AVX,
            bit::RDRAND,
        ] {
            assert!(!has(l1.ecx, b), "leaf 1 ecx bit {b} visible");
        }
        let l7 = find(&out, 7, 0);
        for b in [
            bit::FSGSBASE,
            bit::SMEP,
            bit::SMAP,
            bit::BMI1,
            bit::BMI2,
            bit::ERMS,
            bit::AVX2,
            bit::AVX512F,
            bit::RDSEED,
        ] {
            assert!(!has(l7.ebx, b), "leaf 7 ebx bit {b} visible");
        }
        assert!(!has(l7.ecx, bit::UMIP) && !has(l7.ecx, bit::PKU));
        assert!(!has(l7.edx, bit::FSRM));
        let ext1 = find(&out, 0x8000_0001, 0);
        assert!(!has(ext1.ecx, bit::ABM));
        let xsave = find(&out, 0xd, 0);
        assert_eq!((xsave.eax, xsave.ebx, xsave.ecx, xsave.edx), (0, 0, 0, 0));
        assert_eq!(find(&out, 7, 1).eax, 0);
    }

    #[test]
    fn pvm_safe_exposes_tsc_deadline_x2apic_and_xsaveerptr() {
        let mut supported = host_like();
        for e in &mut supported {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        let out = vcpu_cpuid(&supported, TOPO, CpuProfile::PvmSafe, false);
        let l1 = find(&out, 1, 0);
        assert!(has(l1.ecx, bit::TSC_DEADLINE));
        assert!(has(l1.ecx, bit::X2APIC));
        assert!(has(find(&out, 0x8000_0008, 0).ebx, bit::XSAVEERPTR));
    }

    #[test]
    fn host_profile_keeps_host_features() {
        let out = vcpu_cpuid(&host_like(), TOPO, CpuProfile::Host, true);
        let l1 = find(&out, 1, 0);
        assert!(has(l1.ecx, bit::CX16) && has(l1.ecx, bit::XSAVE) && has(l1.ecx, bit::POPCNT));
        assert!(has(find(&out, 7, 0).ebx, bit::SMAP));
        assert_eq!(find(&out, 0xd, 0).eax, u32::MAX);
    }

    #[test]
    fn host_profile_offers_tsc_deadline_only_when_kvm_does() {
        let mut supported = host_like();
        supported[0].ecx = 0;
        let out = vcpu_cpuid(&supported, TOPO, CpuProfile::Host, false);
        assert!(!has(find(&out, 1, 0).ecx, bit::TSC_DEADLINE));
        let out = vcpu_cpuid(&supported, TOPO, CpuProfile::Host, true);
        assert!(has(find(&out, 1, 0).ecx, bit::TSC_DEADLINE));
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id_and_the_vm_topology() {
        let out = vcpu_cpuid(&host_like(), TOPO, CpuProfile::Host, false);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processor count");
        assert!(has(l1.ecx, bit::HYPERVISOR));
        assert!(has(l1.edx, bit::HTT));
        assert_eq!(find(&out, 4, 0).eax >> 26, 3);
        let smt = find(&out, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&out, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        let invalid = find(&out, 0xb, 2);
        assert_eq!((invalid.eax, invalid.ebx, invalid.ecx & 0xff00), (0, 0, 0));
        assert!(!has(find(&out, 0x8000_0001, 0).ecx, bit::TOPOEXT));
        assert_eq!(find(&out, 0x8000_0008, 0).ecx, (2 << 12) | 3);
        assert_eq!(find(&out, 0x8000_001e, 0).eax, 2);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let topo = VcpuTopology {
            apic_id: 0,
            count: 1,
        };
        let out = vcpu_cpuid(&host_like(), topo, CpuProfile::Host, false);
        assert!(!has(find(&out, 1, 0).edx, bit::HTT));
        assert_eq!(find(&out, 0xb, 1).eax, 0);
    }

    #[test]
    fn profile_is_chosen_from_the_kvm_pvm_module_and_parsed_by_name() {
        assert_eq!(CpuProfile::for_host(true), CpuProfile::PvmSafe);
        assert_eq!(CpuProfile::for_host(false), CpuProfile::Host);
        assert_eq!(
            "pvm-safe".parse::<CpuProfile>().unwrap(),
            CpuProfile::PvmSafe
        );
        assert_eq!("host".parse::<CpuProfile>().unwrap(), CpuProfile::Host);
        assert!("fast".parse::<CpuProfile>().is_err());
    }
}
