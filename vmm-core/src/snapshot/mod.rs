//! Snapshots: the VM's state in a versioned file, its memory in a sparse file.
//!
//! A snapshot directory holds (Cloud Hypervisor's layout; the launcher adds `config.json`, the
//! VM's configuration):
//!
//! - `state.bin`: every component's state ([`VmState`]) behind a fixed header (see
//!   [`format`](mod@format)): the magic `RVMMSNAP`, the format version, the payload's length and its
//!   CRC-32, then the payload in postcard's documented, stable encoding.
//! - `memory.bin`: guest RAM, its regions back to back in guest-address order (the region
//!   at 4 GiB follows the one below the MMIO hole). Pages of zeros are not written: the file is
//!   sparse, so a mostly empty guest makes a small snapshot. A restore maps it copy-on-write
//!   (`MAP_PRIVATE`) instead of reading it: pages come in as the guest touches them.
//!
//! Disk images are not part of a snapshot: as with Cloud Hypervisor, keeping them as they
//! were (or unchanged) is the user's business.

pub mod dirty;
pub mod format;
pub mod memory_file;
mod restore;
mod source;
mod vcpu_state;
mod vm_state;

pub use dirty::{DirtyLogError, DirtyPages};
pub use format::{
    FORMAT_VERSION, READABLE_VERSIONS, StateFileError, decode_state, encode_state, read_state,
    write_state,
};
pub use memory_file::{MemoryFileError, map_memory_file, memory_regions, write_memory_file};
pub use restore::{RestoreError, build_restored, restore_vm};
pub use source::MigrationSource;
pub use vcpu_state::{MsrEntry, VcpuState, VcpuStateError, restore_vcpu, save_vcpu};
pub use vm_state::{
    KvmVmState, MemoryRegionState, VmState, VmStateError, restore_vm_kvm_state, save_vm_kvm_state,
};

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// Name of the guest memory file.
pub const MEMORY_FILE: &str = "memory.bin";
/// Name of the configuration file (written and read by the launcher).
pub const CONFIG_FILE: &str = "config.json";
