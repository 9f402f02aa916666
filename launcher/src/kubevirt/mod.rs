//! rvmm as KubeVirt's virt-launcher: the pieces that let an unmodified virt-handler drive rvmm.
//!
//! - [`vmi`]: a `VirtualMachineInstance` (JSON) to an rvmm VM configuration, or an error naming
//!   the VMI field rvmm cannot honour.
//! - [`domain`]: the `api.Domain` JSON virt-handler reads back (GetDomain, domain events).
//! - [`launcher_flags`]: the command line virt-controller gives the launcher pod.
//! - [`grpc`]: the command server (`cmd.v1` + `cmd.info`) on the launcher socket;
//!   [`h2_authority`] lets it answer clients that send the socket path as `:authority`.
//! - [`notify`]: the client that sends domain events to virt-handler's notify socket.
//! - [`backend`]: virt-handler's commands on the VM controller ([`crate::vmm::Vmm`]).
//! - [`domain_events`]: the VMM's events turned into domain events for virt-handler.
//! - [`stats`]: GetDomainStats from the VM's metrics.
//! - [`container_disks`]: the containerDisk sockets removed at exit.
//! - [`pod_network`], [`pod_dns`]: the DHCP server KubeVirt's launcher runs for bridge and
//!   masquerade interfaces, and what it hands out.
//! - [`launcher_mode`]: `rvmm virt-launcher`, the mode that puts it all together.
//!
//! Only this mode runs a tokio runtime (one current-thread scheduler on its own thread);
//! `rvmm run` never does.

pub mod backend;
pub mod container_disks;
pub mod domain;
pub mod domain_events;
pub mod grpc;
pub mod h2_authority;
pub mod launcher_flags;
pub mod launcher_mode;
pub mod migration;
pub mod nocloud;
pub mod notify;
pub mod pod_dns;
pub mod pod_network;
pub mod quantity;
#[cfg(test)]
mod seccomp_tests;
pub mod stats;
pub mod vmi;
mod vmi_model;

/// Code generated from `launcher/proto/` (KubeVirt's handler-launcher protocol).
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod proto {
    /// The command service virt-handler calls on the launcher.
    pub mod cmd {
        /// Version 1 of the command service.
        pub mod v1 {
            tonic::include_proto!("kubevirt.cmd.v1");
        }
        /// The version handshake.
        pub mod info {
            tonic::include_proto!("kubevirt.cmd.info");
        }
    }
    /// The service virt-handler runs for launcher events.
    pub mod notify {
        /// Version 1 of the notify service.
        pub mod v1 {
            tonic::include_proto!("kubevirt.notify.v1");
        }
        /// The version handshake.
        pub mod info {
            tonic::include_proto!("kubevirt.notify.info");
        }
    }
}
