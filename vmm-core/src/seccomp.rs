//! The vCPU threads' seccomp filter. The mechanism, the rules every thread shares and the
//! device workers' filters are in [`rvmm_devices::seccomp`], re-exported here for the launcher:
//! a thread kind of its own (the main thread, the control API's) gets its filter from
//! [`thread_filter`] with the rules it needs beyond [`common_rules`], and installs it with
//! [`install`] on the current thread (e.g. from a runtime's thread-start hook) or starts its
//! thread with [`spawn_filtered`]. A thread inherits the filter of the thread that starts it.

use std::os::raw::c_uint;

use kvm_bindings::{KVMIO, kvm_ioeventfd, kvm_irq_routing, kvm_regs, kvm_sregs};
use rvmm_devices::seccomp::activation_rules;
use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE, ioctl_expr};

pub use rvmm_devices::seccomp::{
    Allow, BpfProgram, Capability, DeniedAction, ON_DENIED, SeccompError, SpawnError, common_rules,
    effective_capabilities, install, restrict_capabilities, set_denied_action, single_malloc_arena,
    spawn_confined, spawn_filtered, thread_filter,
};
#[doc(hidden)]
pub use rvmm_devices::seccomp::{ChildEnd, run_in_filtered_child};

/// The size field of an ioctl number (14 bits; KVM's argument structs are far smaller).
#[allow(
    clippy::cast_possible_truncation,
    reason = "KVM structs of a few hundred bytes"
)]
const fn ioctl_size(size: usize) -> c_uint {
    size as c_uint
}

/// `KVM_RUN`: entering the guest.
pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0);
/// `KVM_GET_REGS`: the registers shown when the guest dies.
pub const KVM_GET_REGS: u64 = ioctl_expr(_IOC_READ, KVMIO, 0x81, ioctl_size(size_of::<kvm_regs>()));
/// `KVM_GET_SREGS`: the special registers shown when the guest dies.
pub const KVM_GET_SREGS: u64 =
    ioctl_expr(_IOC_READ, KVMIO, 0x83, ioctl_size(size_of::<kvm_sregs>()));

/// `KVM_SET_GSI_ROUTING`: the guest programmed or unmasked an MSI-X vector.
pub const KVM_SET_GSI_ROUTING: u64 = ioctl_expr(
    _IOC_WRITE,
    KVMIO,
    0x6a,
    ioctl_size(size_of::<kvm_irq_routing>()),
);
/// `KVM_IOEVENTFD`: the guest moved a BAR holding queue notifications, or turned its decoding
/// on or off.
pub const KVM_IOEVENTFD: u64 = ioctl_expr(
    _IOC_WRITE,
    KVMIO,
    0x79,
    ioctl_size(size_of::<kvm_ioeventfd>()),
);

/// What a vCPU thread needs beyond the rules every thread shares: running the guest, handling
/// its port and MMIO exits (the serial console, the i8042, the ACPI registers, the virtio-mmio and
/// virtio-pci transports, which activate and reset devices on this thread, and the PCI root
/// complex, which updates MSI routes and moves ioeventfds) and being kicked out of the guest.
pub fn vcpu_rules() -> Vec<Allow> {
    let pid = u64::from(std::process::id());
    let mut rules = vec![
        // The run loop; the registers for a triple fault or a KVM failure; the PCI root
        // complex's MSI routes and ioeventfds, which follow the guest's configuration writes.
        Allow::arg_in(
            libc::SYS_ioctl,
            1,
            &[
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                KVM_SET_GSI_ROUTING,
                KVM_IOEVENTFD,
            ],
        ),
        // Stopping the VM (guest reset or power off, a KVM failure) kicks every vCPU, this one
        // included: pthread_kill is tgkill(getpid(), tid, SIGRTMIN); its own tid comes from
        // gettid. The kick's handler returns through rt_sigreturn (shared rules).
        Allow::args_match(
            libc::SYS_tgkill,
            vec![vec![
                (0, pid),
                (
                    2,
                    u64::from(vmm_sys_util::signal::SIGRTMIN().cast_unsigned()),
                ),
            ]],
        ),
    ];
    // The serial console's output to stdout or a file is a write, allowed for every thread (so
    // are the irqfd writes that raise guest interrupts); to a socket client
    // (`--serial socket=PATH`) it is a send(MSG_DONTWAIT | MSG_NOSIGNAL), which never waits
    // for the client (launcher's console_socket.rs).
    rules.push(Allow::arg_in(
        libc::SYS_sendto,
        3,
        &[(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u64],
    ));
    rules.extend(activation_rules());
    rules
}

/// The vCPU threads' filter.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    thread_filter(vcpu_rules())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
    }

    #[test]
    fn vcpu_filter_compiles_and_allows_no_thread_creation() {
        assert!(!vcpu_filter().unwrap().is_empty());
        // Device workers are started ahead by the VMM: a vCPU never starts a thread.
        let mut rules = common_rules();
        rules.extend(vcpu_rules());
        for clone in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_execve,
        ] {
            assert!(rules.iter().all(|r| r.syscall() != clone), "{clone}");
        }
    }
}
