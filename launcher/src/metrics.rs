//! The VMM's statistics in the Prometheus text exposition format, version 0.0.4.
//!
//! [`render`] is pure: the caller (the API server) gathers the VM state, the process uptime and
//! a [`VmMetrics`] snapshot. Names follow Prometheus conventions: an `rvmm_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters. Families:
//!
//! | family | type | labels |
//! | --- | --- | --- |
//! | `rvmm_vm_state` | gauge, 1 for the current state, 0 for the others | `state` |
//! | `rvmm_uptime_seconds` | gauge, VMM process uptime | |
//! | `rvmm_guest_memory_bytes` | gauge | |
//! | `rvmm_vcpu_exits_total` | counter, summed over vCPUs | `reason` |
//! | `rvmm_disk_{reads,writes,read_bytes,write_bytes,flushes,errors,host_errors}_total` | counter | `disk` |
//! | `rvmm_net_{rx,tx}_{packets,bytes,dropped,errors}_total` | counter | `interface` |
//! | `rvmm_pci_malformed_accesses_total` | counter, guest accesses the PCI emulation ignored | `kind` (`config`, `bar`, `msix`) |
//!
//! Without a VM only the state and uptime are reported. `rvmm_vm_state` has a series for each
//! of [`VM_STATES`]; a state outside that list gets a series of its own, so the current state
//! is never lost.

use std::fmt::{Display, Write};
use std::time::Duration;

use rvmm_core::{DiskMetrics, NicMetrics, VmMetrics};

/// The HTTP `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The VM states `rvmm_vm_state` always has a series for.
pub const VM_STATES: [&str; 4] = ["Created", "Running", "Paused", "Shutdown"];

type DiskField = fn(&DiskMetrics) -> u64;
type NicField = fn(&NicMetrics) -> u64;

const DISK_COUNTERS: [(&str, &str, DiskField); 7] = [
    (
        "rvmm_disk_reads_total",
        "Disk read requests completed.",
        |d| d.reads,
    ),
    (
        "rvmm_disk_writes_total",
        "Disk write requests completed.",
        |d| d.writes,
    ),
    (
        "rvmm_disk_read_bytes_total",
        "Bytes read by completed disk reads.",
        |d| d.read_bytes,
    ),
    (
        "rvmm_disk_write_bytes_total",
        "Bytes written by completed disk writes.",
        |d| d.write_bytes,
    ),
    (
        "rvmm_disk_flushes_total",
        "Guest flush requests completed.",
        |d| d.flushes,
    ),
    (
        "rvmm_disk_errors_total",
        "Disk requests answered with an error status (malformed, unsupported or failed).",
        |d| d.errors,
    ),
    (
        "rvmm_disk_host_errors_total",
        "Disk requests the host failed (no space, I/O error, image shorter than the disk).",
        |d| d.host_errors,
    ),
];

const NIC_COUNTERS: [(&str, &str, NicField); 8] = [
    (
        "rvmm_net_rx_packets_total",
        "Frames delivered to the guest.",
        |n| n.rx_packets,
    ),
    (
        "rvmm_net_rx_bytes_total",
        "Bytes delivered to the guest, without the virtio header.",
        |n| n.rx_bytes,
    ),
    (
        "rvmm_net_rx_dropped_total",
        "Frames for the guest dropped: too large for its buffers, or malformed.",
        |n| n.rx_drops,
    ),
    (
        "rvmm_net_rx_errors_total",
        "Malformed receive buffers and tap read failures.",
        |n| n.rx_errors,
    ),
    (
        "rvmm_net_tx_packets_total",
        "Frames the guest sent that the tap took.",
        |n| n.tx_packets,
    ),
    (
        "rvmm_net_tx_bytes_total",
        "Bytes the guest sent that the tap took, without the virtio header.",
        |n| n.tx_bytes,
    ),
    (
        "rvmm_net_tx_dropped_total",
        "Well-formed frames from the guest that the tap refused.",
        |n| n.tx_drops,
    ),
    (
        "rvmm_net_tx_errors_total",
        "Malformed frames from the guest, dropped.",
        |n| n.tx_errors,
    ),
];

/// Renders the exposition: `state` is the VM's state name (see [`VM_STATES`]), `uptime` the
/// VMM process's, `vm` the VM's statistics when a VM exists.
pub fn render(state: &str, uptime: Duration, vm: Option<&VmMetrics>) -> String {
    let mut out = String::with_capacity(4096);
    let o = &mut out;
    header(
        o,
        "rvmm_vm_state",
        "gauge",
        "VM state: 1 for the current one, 0 for the others.",
    );
    for known in VM_STATES {
        sample(
            o,
            "rvmm_vm_state",
            Some(("state", known)),
            u8::from(known == state),
        );
    }
    if !VM_STATES.contains(&state) {
        sample(o, "rvmm_vm_state", Some(("state", state)), 1);
    }
    header(
        o,
        "rvmm_uptime_seconds",
        "gauge",
        "Time since the VMM process started.",
    );
    sample(o, "rvmm_uptime_seconds", None, uptime.as_secs_f64());
    let Some(vm) = vm else {
        return out;
    };
    header(o, "rvmm_guest_memory_bytes", "gauge", "Guest RAM.");
    sample(o, "rvmm_guest_memory_bytes", None, vm.memory_bytes);
    header(
        o,
        "rvmm_vcpu_exits_total",
        "counter",
        "KVM exits of all vCPUs by reason.",
    );
    for (reason, n) in &vm.exits {
        sample(o, "rvmm_vcpu_exits_total", Some(("reason", reason)), n);
    }
    let pci = "rvmm_pci_malformed_accesses_total";
    header(
        o,
        pci,
        "counter",
        "Malformed guest accesses to PCI configuration space, BARs and MSI-X, ignored.",
    );
    let m = &vm.malformed_pci;
    for (kind, n) in [("config", m.config), ("bar", m.bar), ("msix", m.msix)] {
        sample(o, pci, Some(("kind", kind)), n);
    }
    if !vm.disks.is_empty() {
        for (name, help, field) in DISK_COUNTERS {
            header(o, name, "counter", help);
            for disk in &vm.disks {
                sample(o, name, Some(("disk", &disk.id)), field(disk));
            }
        }
    }
    if !vm.nets.is_empty() {
        for (name, help, field) in NIC_COUNTERS {
            header(o, name, "counter", help);
            for nic in &vm.nets {
                sample(o, name, Some(("interface", &nic.id)), field(nic));
            }
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {}", escape(help, false));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, label: Option<(&str, &str)>, value: impl Display) {
    let _ = match label {
        Some((key, v)) => writeln!(out, "{name}{{{key}=\"{}\"}} {value}", escape(v, true)),
        None => writeln!(out, "{name} {value}"),
    };
}

/// Escapes a label value (backslash, double quote, line feed) or HELP text (backslash, line
/// feed) as the format requires.
fn escape(text: &str, quote: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
