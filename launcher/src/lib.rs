//! The rvmm launcher as a library: command line and config file, the VM's life ([`vmm::Vmm`]),
//! the control API, events, metrics, the serial console's host side, shutdown signals and the
//! seccomp filters of the launcher's own threads.
//! The `rvmm` binary is a thin `main` over it; tests and fuzz targets use it directly.

pub mod api;
pub mod cli;
pub mod config;
pub mod console;
pub mod console_socket;
pub mod control_thread;
pub mod dhcp;
pub mod errors;
pub mod events;
pub mod keyvalue;
pub mod kubevirt;
pub mod metrics;
pub mod panic;
pub mod privileges;
pub mod seccomp;
pub mod shutdown;
pub mod vmm;
