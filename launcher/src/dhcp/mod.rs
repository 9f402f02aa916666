//! The launcher's DHCP server: a VM's NIC gets its address, router, DNS servers, search
//! domains, host name and MTU the way a stock cloud image expects, as KubeVirt's virt-launcher
//! serves them (pkg/network/dhcp in kubevirt/kubevirt) on a launcher pod's bridge.
//!
//! - [`config`]: the settings ([`DhcpConfig`], a NIC's `dhcp` in the VM configuration) and the
//!   lease they make for one client ([`LeaseConfig`]).
//! - [`flags`]: the same settings on `rvmm run --net`.
//! - [`handler`], [`handler6`]: DHCPv4 and DHCPv6 packet handling, pure functions of the
//!   client's packets.
//! - [`server`]: the `dhcp` thread that serves one or more NICs on their host interfaces;
//!   [`socket`]: its UDP sockets (interface-aware receive and send).
//! - [`netif`]: what the server reads of a host interface (index, addresses, MTU, MAC).
//!
//! The wire format is dhcproto's; which packets get which answers is rvmm's.

pub mod config;
pub mod flags;
pub mod handler;
pub mod handler6;
pub mod netif;
pub mod server;
pub mod socket;

pub use config::{DhcpConfig, DhcpConfigError, LeaseConfig};

use server::ServedNic;

use crate::config::VmSpec;

/// The NICs of a validated VM that have a DHCP server, with the tap, MAC and MTU the NIC has
/// (validation gave every such NIC a MAC).
pub fn served_nics(spec: &VmSpec) -> Vec<ServedNic> {
    spec.dhcp
        .iter()
        .zip(&spec.config.nets)
        .filter_map(|(dhcp, nic)| {
            let dhcp = dhcp.clone()?;
            let mac = nic.mac?;
            Some(ServedNic {
                nic: nic.id.clone().unwrap_or_else(|| nic.tap.clone()),
                interface: dhcp.interface.clone().unwrap_or_else(|| nic.tap.clone()),
                mac,
                nic_mtu: nic.mtu,
                config: dhcp,
            })
        })
        .collect()
}
