//! KubeVirt's `stats.DomainStats` JSON (GetDomainStats) from rvmm's VM metrics.
//!
//! virt-handler turns these into its `kubevirt_vmi_*` Prometheus metrics. Like libvirt's bulk
//! stats, every value comes with a `...Set` flag, and virt-handler skips a value whose flag is
//! false; rvmm sets the flags of what it counts:
//!
//! - `Name`, `UUID`: the domain's; `NrVirtCpu`, the vCPU count (KubeVirt up to v1.6 reads it
//!   for the downward metrics' `ResourceProcessorLimit`).
//! - `Vcpu`: one entry per vCPU, `State` 1 (running), `Time` the CPU time its thread used (ns).
//! - `Cpu`: `Time`, the CPU time the whole VMM used (ns; libvirt's is QEMU's); no user/system
//!   split.
//! - `Memory`: `ActualBalloon` and `Total` = guest RAM in KiB (no balloon and no
//!   guest-reported figures).
//! - `Block`: per disk in guest order: `Name` (`vda`), `Alias` (the VMI disk name), `Path`,
//!   `RdReqs`/`RdBytes`, `WrReqs`/`WrBytes`, `FlReqs`, `Errors`; no times, no capacity.
//! - `Net`: per interface: `Name` (the tap), `Alias` (the VMI interface name), rx/tx bytes,
//!   packets, drops and errors.

use rvmm_core::metrics::VmMetrics;
use serde_json::{Value, json};

use super::vmi::{LaunchPlan, Vmi};

/// libvirt's `VIR_VCPU_RUNNING`.
const VCPU_RUNNING: u32 = 1;

/// The `stats.DomainStats` of `vmi` run as `plan`, from `metrics`. Disks and interfaces are
/// matched to the plan by position: the VM's devices are in the plan's order.
pub fn domain_stats(vmi: &Vmi, plan: &LaunchPlan, metrics: &VmMetrics) -> Value {
    let uuid = vmi
        .spec
        .domain
        .firmware
        .as_ref()
        .and_then(|f| f.uuid.clone())
        .unwrap_or_else(|| vmi.metadata.uid.clone());
    let vcpus: Vec<Value> = (0..usize::from(plan.config.cpus.boot_vcpus))
        .map(|i| {
            let mut vcpu = json!({"StateSet": true, "State": VCPU_RUNNING});
            if let Some(ns) = metrics.vcpu_cpu_ns.get(i).copied().flatten() {
                vcpu["TimeSet"] = json!(true);
                vcpu["Time"] = json!(ns);
            }
            vcpu
        })
        .collect();
    let cpu = match process_cpu_ns() {
        Some(ns) => json!({"TimeSet": true, "Time": ns}),
        None => json!({}),
    };
    let block: Vec<Value> = plan
        .disks
        .iter()
        .zip(&metrics.disks)
        .map(|(disk, m)| {
            json!({
                "NameSet": true,
                "Name": disk.target,
                "Alias": disk.name,
                "PathSet": true,
                "Path": disk.path,
                "RdReqsSet": true,
                "RdReqs": m.reads,
                "RdBytesSet": true,
                "RdBytes": m.read_bytes,
                "WrReqsSet": true,
                "WrReqs": m.writes,
                "WrBytesSet": true,
                "WrBytes": m.write_bytes,
                "FlReqsSet": true,
                "FlReqs": m.flushes,
                "ErrorsSet": true,
                "Errors": m.errors,
            })
        })
        .collect();
    let net: Vec<Value> = plan
        .interfaces
        .iter()
        .zip(&metrics.nets)
        .map(|(iface, m)| {
            json!({
                "NameSet": true,
                "Name": iface.tap,
                "AliasSet": true,
                "Alias": iface.name,
                "RxBytesSet": true,
                "RxBytes": m.rx_bytes,
                "RxPktsSet": true,
                "RxPkts": m.rx_packets,
                "RxErrsSet": true,
                "RxErrs": m.rx_errors,
                "RxDropSet": true,
                "RxDrop": m.rx_drops,
                "TxBytesSet": true,
                "TxBytes": m.tx_bytes,
                "TxPktsSet": true,
                "TxPkts": m.tx_packets,
                "TxErrsSet": true,
                "TxErrs": m.tx_errors,
                "TxDropSet": true,
                "TxDrop": m.tx_drops,
            })
        })
        .collect();
    json!({
        "Name": plan.domain_name,
        "UUID": uuid,
        "Cpu": cpu,
        "Memory": {
            "ActualBalloonSet": true,
            "ActualBalloon": metrics.memory_bytes >> 10,
            "TotalSet": true,
            "Total": metrics.memory_bytes >> 10,
        },
        "MigrateDomainJobInfo": null,
        "Vcpu": vcpus,
        "Net": net,
        "Block": block,
        "CPUMapSet": false,
        "CPUMap": null,
        "NrVirtCpu": plan.config.cpus.boot_vcpus,
        "DirtyRate": null,
        "Load": null,
    })
}

/// The CPU time the whole process has used, in nanoseconds.
fn process_cpu_ns() -> Option<u64> {
    // SAFETY: a zeroed timespec is valid; clock_gettime writes it.
    let mut time: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and out pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) } != 0 {
        return None;
    }
    let secs = u64::try_from(time.tv_sec).ok()?;
    let nanos = u64::try_from(time.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

#[cfg(test)]
mod tests {
    use rvmm_core::metrics::{DiskMetrics, NicMetrics};

    use super::*;
    use crate::kubevirt::domain::tests::{plan, vmi};

    #[test]
    fn stats_carry_vcpus_memory_and_per_alias_disk_and_nic_counters() {
        // The domain tests' VMI and plan: two disks (metrics here for the first), one NIC.
        let (vmi, plan) = (vmi(), plan());
        let metrics = VmMetrics {
            exits: vec![],
            disks: vec![DiskMetrics {
                id: "disk0".into(),
                reads: 3,
                writes: 4,
                read_bytes: 1536,
                write_bytes: 2048,
                flushes: 1,
                errors: 0,
                host_errors: 0,
            }],
            nets: vec![NicMetrics {
                id: "default".into(),
                rx_packets: 5,
                rx_bytes: 500,
                tx_packets: 6,
                tx_bytes: 600,
                ..Default::default()
            }],
            memory_bytes: 64 << 20,
            vcpu_cpu_ns: vec![Some(2_000_000), None],
            ..Default::default()
        };
        let s = domain_stats(&vmi, &plan, &metrics);
        assert_eq!(
            (s["Name"].as_str(), s["UUID"].as_str()),
            (
                Some("default_testvm"),
                Some("5d307ca9-b3ef-428c-8861-06e72d69f223")
            )
        );
        assert_eq!(
            s["Vcpu"],
            json!([
                {"StateSet": true, "State": 1, "TimeSet": true, "Time": 2_000_000},
                {"StateSet": true, "State": 1}
            ])
        );
        assert_eq!(s["NrVirtCpu"], 2);
        assert_eq!(s["Memory"]["ActualBalloon"], 65536);
        assert_eq!(
            (&s["Memory"]["TotalSet"], &s["Memory"]["Total"]),
            (&json!(true), &json!(65536))
        );
        assert_eq!(s["Cpu"]["TimeSet"], true);
        assert!(s["Cpu"]["Time"].as_u64().unwrap() > 0);
        let disk = &s["Block"][0];
        assert_eq!(
            (disk["Name"].as_str(), disk["Alias"].as_str()),
            (Some("vda"), Some("rootdisk"))
        );
        assert_eq!(
            [
                &disk["RdReqs"],
                &disk["RdBytes"],
                &disk["WrReqs"],
                &disk["WrBytes"],
                &disk["FlReqs"]
            ],
            [3, 1536, 4, 2048, 1].map(|n| json!(n)).each_ref()
        );
        let nic = &s["Net"][0];
        assert_eq!(
            (nic["Name"].as_str(), nic["Alias"].as_str()),
            (Some("tap0"), Some("default"))
        );
        assert_eq!(
            [
                &nic["RxBytes"],
                &nic["RxPkts"],
                &nic["TxBytes"],
                &nic["TxPkts"]
            ],
            [500, 5, 600, 6].map(|n| json!(n)).each_ref()
        );
        assert_eq!(nic["RxDropSet"], true);
    }
}
