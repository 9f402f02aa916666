//! The launcher's DHCP server: a VM's NIC gets its address, router, DNS servers, search
//! domains, host name and MTU the way a stock cloud image expects, as KubeVirt's virt-launcher
//! serves them (pkg/network/dhcp in kubevirt/kubevirt) on a launcher pod's bridge.
//!
//! - [`config`]: the settings ([`DhcpConfig`], a NIC's `dhcp` in the VM configuration) and the
//!   lease they make for one client ([`LeaseConfig`]).
//! - [`handler`]: DHCPv4 packet handling, a pure function of the client's packets.
//! - [`server`]: the `dhcp` thread that serves one or more NICs on their host interfaces, and
//!   its seccomp rules.
//! - [`netif`]: what the server reads of a host interface (index, addresses, MTU, MAC).
//!
//! The wire format is dhcproto's; which packets get which answers is rvmm's.

pub mod config;
pub mod handler;
pub mod netif;
pub mod server;

pub use config::{DhcpConfig, DhcpConfigError, LeaseConfig};

