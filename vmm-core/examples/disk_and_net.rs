//! A VM with a virtio-blk disk (an image file) and a virtio-net interface on a tap.
//!
//! ```text
//! ip tuntap add dev tap0 mode tap vnet_hdr && ip link set tap0 up
//! cargo run --release --example disk_and_net -- KERNEL DISK TAP [CMDLINE]
//! ```
//!
//! The disk is the guest's `/dev/vda` (raw or qcow2, by its header); the interface gets a
//! random local MAC. The default command line mounts the disk as the root file system.
//! Statistics of both devices are printed when the guest ends.

use std::process::ExitCode;

use rvmm_core::{BootSource, Outcome, VmBuilder};
use rvmm_devices::virtio::block::BlockConfig;
use rvmm_devices::virtio::net::NetConfig;

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, disk, tap, rest @ ..] = args.as_slice() else {
        return Err("usage: disk_and_net KERNEL DISK TAP [CMDLINE]".into());
    };
    let cmdline = match rest {
        [cmdline] => cmdline.clone(),
        _ => "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw".into(),
    };
    let vm = VmBuilder::new(BootSource::kernel(kernel))
        .memory_mib(512)
        .cmdline(cmdline)
        .disk(BlockConfig {
            path: disk.into(),
            ..Default::default()
        })
        .net(NetConfig {
            tap: tap.clone(),
            ..Default::default()
        })
        .build(Box::new(std::io::stdout()))?
        .start()?;
    let metrics = vm.metrics_handle();
    let reason = vm.wait();
    let end = metrics.snapshot();
    for d in &end.disks {
        let (r, w) = ((d.reads, d.read_bytes), (d.writes, d.write_bytes));
        eprintln!("{}: reads {r:?} writes {w:?} (requests, bytes)", d.id);
    }
    for n in &end.nets {
        let (rx, tx) = ((n.rx_packets, n.rx_bytes), (n.tx_packets, n.tx_bytes));
        eprintln!("{}: rx {rx:?} tx {tx:?} (frames, bytes)", n.id);
    }
    eprintln!("{reason}");
    Ok(match reason.outcome() {
        Outcome::Clean => ExitCode::SUCCESS,
        Outcome::GuestCrash | Outcome::VmmError => ExitCode::FAILURE,
    })
}
