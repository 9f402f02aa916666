//! The VM's statistics: KVM exits counted per vCPU, and the virtio devices' request counters,
//! read as a [`VmMetrics`] snapshot from any thread through a [`MetricsHandle`].
//!
//! Counting costs the vCPU loop one relaxed load and store on a cache line of its own per exit
//! (each vCPU is the only writer of its counters); the devices add their counters once per
//! batch. Readers never block a writer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rvmm_devices::pci::MalformedPciAccesses;
pub use rvmm_devices::pci::MalformedPciCounts;
use rvmm_devices::virtio::block::BlockCounters;
use rvmm_devices::virtio::net::NetCounters;

use crate::control::VmControl;
use crate::exit::ExitReason;

const REASONS: usize = ExitReason::ALL.len();

/// One vCPU's exit counts, 128-byte aligned so two vCPUs never write the same cache line
/// (or adjacent-line prefetch pair).
#[derive(Debug, Default)]
#[repr(align(128))]
struct VcpuExits([AtomicU64; REASONS]);

/// Exit counts of every vCPU of a VM.
#[derive(Debug)]
pub struct ExitCounters {
    vcpus: Vec<Arc<VcpuExits>>,
}

/// The counting end of one vCPU's exit counts: owned by its vCPU, the only writer.
#[derive(Debug)]
pub struct ExitRecorder {
    counts: Arc<VcpuExits>,
}

impl ExitCounters {
    /// Counters for `vcpus` vCPUs and a recorder for each, in vCPU order.
    pub fn new(vcpus: usize) -> (Arc<Self>, Vec<ExitRecorder>) {
        let slots: Vec<Arc<VcpuExits>> = (0..vcpus).map(|_| Arc::default()).collect();
        let recorders = slots
            .iter()
            .map(|counts| ExitRecorder {
                counts: counts.clone(),
            })
            .collect();
        (Arc::new(Self { vcpus: slots }), recorders)
    }

    /// Exits of every reason summed over the vCPUs, in [`ExitReason::ALL`] order.
    pub fn totals(&self) -> Vec<(&'static str, u64)> {
        ExitReason::ALL
            .iter()
            .map(|&reason| {
                let n = self.vcpus.iter().map(|v| v.get(reason)).sum();
                (reason.name(), n)
            })
            .collect()
    }

    /// Exits of vCPU `index` by reason, in [`ExitReason::ALL`] order (`None` past the last
    /// vCPU).
    pub fn vcpu(&self, index: usize) -> Option<Vec<(&'static str, u64)>> {
        let counts = self.vcpus.get(index)?;
        Some(
            ExitReason::ALL
                .iter()
                .map(|&reason| (reason.name(), counts.get(reason)))
                .collect(),
        )
    }
}

impl VcpuExits {
    fn get(&self, reason: ExitReason) -> u64 {
        self.0[reason as usize].load(Ordering::Relaxed)
    }
}

impl ExitRecorder {
    /// Counts one exit. Not a read-modify-write instruction: the recorder's vCPU thread is the
    /// only writer, and readers only need a recent value.
    #[inline]
    pub fn record(&self, reason: ExitReason) {
        let counter = &self.counts.0[reason as usize];
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }
}

/// A virtio-blk disk's statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskMetrics {
    /// The configured id, or `disk<N>` (N: position among the disks).
    pub id: String,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes read by completed reads.
    pub read_bytes: u64,
    /// Bytes written by completed writes.
    pub write_bytes: u64,
    /// Guest FLUSH requests completed.
    pub flushes: u64,
    /// Requests answered with an error status (malformed, unsupported or failed).
    pub errors: u64,
    /// Of `errors`, those the host failed (ENOSPC, EIO, ...).
    pub host_errors: u64,
}

/// A virtio-net interface's statistics (bytes exclude the virtio header).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicMetrics {
    /// The configured id, or `net<N>` (N: position among the interfaces).
    pub id: String,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames for the guest dropped (too large for its buffers, or malformed).
    pub rx_drops: u64,
    /// Malformed rx chains and tap read failures.
    pub rx_errors: u64,
    /// Frames the guest sent that the tap took.
    pub tx_packets: u64,
    /// Bytes the guest sent that the tap took.
    pub tx_bytes: u64,
    /// Well-formed frames the tap refused.
    pub tx_drops: u64,
    /// Malformed tx chains (dropped).
    pub tx_errors: u64,
}

/// A snapshot of a VM's statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmMetrics {
    /// KVM exits by reason (summed over the vCPUs), in [`ExitReason::ALL`] order.
    pub exits: Vec<(&'static str, u64)>,
    /// Disks, in the order the guest sees them.
    pub disks: Vec<DiskMetrics>,
    /// Network interfaces, in the order the guest sees them.
    pub nets: Vec<NicMetrics>,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The CPU time each vCPU's thread has used, in nanoseconds (`None` while not running).
    pub vcpu_cpu_ns: Vec<Option<u64>>,
    /// Malformed guest accesses to the PCI emulation, ignored (zero without PCI).
    pub malformed_pci: MalformedPciCounts,
}

/// A disk's counters, shared with its device.
#[derive(Debug)]
pub(crate) struct DiskSource {
    pub(crate) id: String,
    pub(crate) counters: Arc<BlockCounters>,
}

/// An interface's counters, shared with its device.
#[derive(Debug)]
pub(crate) struct NicSource {
    pub(crate) id: String,
    pub(crate) counters: Arc<NetCounters>,
}

#[derive(Debug)]
struct Sources {
    exits: Arc<ExitCounters>,
    disks: Vec<DiskSource>,
    nets: Vec<NicSource>,
    memory_bytes: u64,
    /// The vCPU threads' CPU time.
    vcpus: Arc<VmControl>,
    malformed_pci: Option<Arc<MalformedPciAccesses>>,
}

/// Reads a VM's statistics from any thread (an API server), while the VM runs or after it
/// has stopped: it holds the counters, not the VM.
#[derive(Clone, Debug)]
pub struct MetricsHandle {
    sources: Arc<Sources>,
}

impl MetricsHandle {
    pub(crate) fn new(
        exits: Arc<ExitCounters>,
        disks: Vec<DiskSource>,
        nets: Vec<NicSource>,
        memory_bytes: u64,
        vcpus: Arc<VmControl>,
        malformed_pci: Option<Arc<MalformedPciAccesses>>,
    ) -> Self {
        Self {
            sources: Arc::new(Sources {
                exits,
                disks,
                nets,
                memory_bytes,
                vcpus,
                malformed_pci,
            }),
        }
    }

    /// The counters now. Each value is read on its own (relaxed): a snapshot taken while the
    /// VM runs is not atomic across counters.
    pub fn snapshot(&self) -> VmMetrics {
        let s = &*self.sources;
        VmMetrics {
            exits: s.exits.totals(),
            disks: s.disks.iter().map(disk_metrics).collect(),
            nets: s.nets.iter().map(nic_metrics).collect(),
            memory_bytes: s.memory_bytes,
            vcpu_cpu_ns: s
                .vcpus
                .vcpu_cpu_times()
                .into_iter()
                .map(|t| t.map(|t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)))
                .collect(),
            malformed_pci: s
                .malformed_pci
                .as_ref()
                .map(|m| m.counts())
                .unwrap_or_default(),
        }
    }

    /// Exits of vCPU `index` by reason, in [`ExitReason::ALL`] order (`None` past the last
    /// vCPU).
    pub fn vcpu_exits(&self, index: usize) -> Option<Vec<(&'static str, u64)>> {
        self.sources.exits.vcpu(index)
    }
}

fn disk_metrics(disk: &DiskSource) -> DiskMetrics {
    let c = &*disk.counters;
    let get = BlockCounters::get;
    DiskMetrics {
        id: disk.id.clone(),
        reads: get(&c.reads),
        writes: get(&c.writes),
        read_bytes: get(&c.bytes_read),
        write_bytes: get(&c.bytes_written),
        flushes: get(&c.flushes),
        errors: get(&c.errors),
        host_errors: get(&c.host_errors),
    }
}

fn nic_metrics(nic: &NicSource) -> NicMetrics {
    let c = &*nic.counters;
    let get = NetCounters::get;
    NicMetrics {
        id: nic.id.clone(),
        rx_packets: get(&c.rx_packets),
        rx_bytes: get(&c.rx_bytes),
        rx_drops: get(&c.rx_dropped),
        rx_errors: get(&c.rx_errors),
        tx_packets: get(&c.tx_packets),
        tx_bytes: get(&c.tx_bytes),
        tx_drops: get(&c.tx_dropped),
        tx_errors: get(&c.tx_errors),
    }
}

/// The metrics id of the disk or interface at `index`: its configured id, else `<prefix><index>`.
pub(crate) fn device_id(configured: Option<&str>, prefix: &str, index: usize) -> String {
    configured.map_or_else(|| format!("{prefix}{index}"), str::to_string)
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::VcpuExit;
    use vmm_sys_util::errno;

    use super::*;

    fn count(exits: &[(&'static str, u64)], name: &str) -> u64 {
        exits.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn exit_reasons_index_their_counters_in_declaration_order() {
        for (i, reason) in ExitReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }

    #[test]
    fn exits_fed_through_the_decoder_are_counted_per_reason_and_summed_over_vcpus() {
        let (counters, recorders) = ExitCounters::new(2);
        let mut data = [0u8; 4];
        let runs: [Result<VcpuExit<'_>, errno::Error>; 4] = [
            Ok(VcpuExit::IoOut(0x3f8, b"x")),
            Ok(VcpuExit::MmioRead(0xd000_0000, &mut data)),
            Err(errno::Error::new(libc::EINTR)),
            Ok(VcpuExit::IoOut(0x3f8, b"y")),
        ];
        for run in &runs {
            recorders[0].record(ExitReason::of(run));
        }
        recorders[1].record(ExitReason::of(&Ok(VcpuExit::IoOut(0x80, &[0]))));
        recorders[1].record(ExitReason::of(&Ok(VcpuExit::SystemEvent(1, &[]))));

        let totals = counters.totals();
        let names: Vec<_> = totals.iter().map(|(n, _)| *n).collect();
        let expected: Vec<_> = ExitReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, expected, "stable order, every reason listed");
        assert_eq!(count(&totals, "io_out"), 3);
        assert_eq!(count(&totals, "mmio_read"), 1);
        assert_eq!(count(&totals, "interrupted"), 1);
        assert_eq!(count(&totals, "system_event"), 1);
        assert_eq!(count(&totals, "hlt"), 0);
        assert_eq!(totals.iter().map(|(_, n)| n).sum::<u64>(), 6);
        assert_eq!(count(&counters.vcpu(0).unwrap(), "io_out"), 2);
        assert_eq!(count(&counters.vcpu(1).unwrap(), "io_out"), 1);
        assert!(counters.vcpu(2).is_none());
    }

    #[test]
    fn vcpu_counters_do_not_share_a_cache_line() {
        assert!(std::mem::align_of::<VcpuExits>() >= 128);
        assert!(std::mem::size_of::<VcpuExits>().is_multiple_of(128));
    }

    #[test]
    fn snapshot_maps_device_counters_and_names_unnamed_devices_by_position() {
        let (exits, _) = ExitCounters::new(1);
        let block = Arc::new(BlockCounters::default());
        block.reads.store(3, Ordering::Relaxed);
        block.bytes_read.store(1536, Ordering::Relaxed);
        block.writes.store(2, Ordering::Relaxed);
        block.bytes_written.store(1024, Ordering::Relaxed);
        block.flushes.store(1, Ordering::Relaxed);
        block.errors.store(4, Ordering::Relaxed);
        let net = Arc::new(NetCounters::default());
        net.rx_packets.store(5, Ordering::Relaxed);
        net.rx_bytes.store(500, Ordering::Relaxed);
        net.rx_dropped.store(1, Ordering::Relaxed);
        net.tx_packets.store(6, Ordering::Relaxed);
        net.tx_bytes.store(600, Ordering::Relaxed);
        net.tx_dropped.store(2, Ordering::Relaxed);
        let malformed = Arc::new(MalformedPciAccesses::default());
        malformed.count(rvmm_devices::pci::PciAccessKind::Msix, format_args!("test"));
        let handle = MetricsHandle::new(
            exits,
            vec![DiskSource {
                id: device_id(None, "disk", 0),
                counters: block,
            }],
            vec![NicSource {
                id: device_id(Some("uplink"), "net", 0),
                counters: net,
            }],
            64 << 20,
            Arc::new(VmControl::new(1)),
            Some(malformed.clone()),
        );
        let m = handle.clone().snapshot();
        assert_eq!(
            m.disks,
            vec![DiskMetrics {
                id: "disk0".into(),
                reads: 3,
                writes: 2,
                read_bytes: 1536,
                write_bytes: 1024,
                flushes: 1,
                errors: 4,
                host_errors: 0,
            }]
        );
        assert_eq!(
            m.nets,
            vec![NicMetrics {
                id: "uplink".into(),
                rx_packets: 5,
                rx_bytes: 500,
                rx_drops: 1,
                rx_errors: 0,
                tx_packets: 6,
                tx_bytes: 600,
                tx_drops: 2,
                tx_errors: 0,
            }]
        );
        assert_eq!(m.memory_bytes, 64 << 20);
        assert_eq!(m.malformed_pci.msix, 1);
        assert_eq!(m.exits.len(), ExitReason::ALL.len());
    }

    #[test]
    fn a_reader_thread_sees_counts_recorded_on_another_thread() {
        let (counters, mut recorders) = ExitCounters::new(1);
        let handle = MetricsHandle::new(
            counters,
            Vec::new(),
            Vec::new(),
            0,
            Arc::new(VmControl::new(0)),
            None,
        );
        let recorder = recorders.pop().unwrap();
        std::thread::spawn(move || {
            for _ in 0..1000 {
                recorder.record(ExitReason::MmioWrite);
            }
        })
        .join()
        .unwrap();
        let reader = handle.clone();
        let seen = std::thread::spawn(move || count(&reader.snapshot().exits, "mmio_write"))
            .join()
            .unwrap();
        assert_eq!(seen, 1000);
    }
}
