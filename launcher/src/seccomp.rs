//! The seccomp filters of the launcher's own threads: the API threads (`api`, and `metrics`
//! with `--metrics-addr`), virt-launcher mode's gRPC runtime thread (`rvmm-grpc`) and
//! `kubevirt-notify`, the DHCP server's thread (`dhcp`, its own filter in [`crate::dhcp`]), the signal thread, the VM's waiter, the console's input threads, the
//! control threads (`vmm-control`, `vm-restart`, `launcher-control`, and `vmm-query` for the
//! API's reads; snapshots, restores and
//! the API's live migrations run there), virt-launcher mode's migration threads
//! (`kubevirt-migrate`, `kubevirt-receive`), timers, and the main thread once the VM runs
//! (both modes). The mechanism and the rules every filtered thread shares are in
//! [`rvmm_core::seccomp`].
//!
//! Only the control threads and `kubevirt-receive` (under the control filter) start threads
//! (a VM's vCPUs, device workers, waiter and console threads, which inherit the control filter
//! under their own); the others only move bytes,
//! wait or tear down. A thread inherits the filter of the thread that starts it, so these
//! filters are installed after the threads they start, or cover what those do.

use rvmm_core::seccomp::{Allow, BpfProgram, SeccompError, install, thread_filter, vcpu_rules};
use rvmm_devices::seccomp::{WorkerKind, activation_rules, worker_rules};
use vmm_sys_util::signal::SIGRTMIN;

/// `kind_rules`' filter when `seccomp` is on (`--seccomp` not false), else none.
pub fn thread_filter_for(
    seccomp: bool,
    kind_rules: Vec<Allow>,
) -> Result<Option<BpfProgram>, SeccompError> {
    seccomp.then(|| thread_filter(kind_rules)).transpose()
}

/// The `signals` thread ([`crate::shutdown`]): it waits for signals and for the end of the
/// grace period, and hands them to the VMM (locks, a condition variable, the i8042's
/// eventfd: shared rules) or to virt-launcher mode's handler (channels).
pub fn signal_rules() -> Vec<Allow> {
    vec![
        // sigwaitinfo and sigtimedwait (the grace period's timeout).
        Allow::any(libc::SYS_rt_sigtimedwait),
    ]
}

/// The `vm-waiter` thread: it waits for the VM's end, joins the vCPU threads and drops the
/// VM (stopping the device workers, closing descriptors, unmapping guest memory: shared
/// rules), then records the end and reports it (events to a file or a channel: writes and
/// futexes).
pub fn waiter_rules() -> Vec<Allow> {
    vec![
        // A VM whose NICs have a DHCP server stops it with the VM: the server removes its
        // `dhcp_started-<iface>` markers (virt-launcher mode).
        Allow::any(libc::SYS_unlink),
        Allow::any(libc::SYS_unlinkat),
    ]
}

/// virt-launcher mode's `qemu-timeout` watch: it sleeps, then may ask the VMM to exit.
pub fn timer_rules() -> Vec<Allow> {
    vec![
        // thread::sleep: glibc's nanosleep is clock_nanosleep.
        Allow::any(libc::SYS_clock_nanosleep),
        Allow::any(libc::SYS_nanosleep),
    ]
}

/// The console's input threads ([`crate::console`]): `serial-stdin` reads the terminal,
/// `serial-socket` accepts console clients and reads their keys. Guest output to a client is
/// written by whoever prints (a vCPU); attaching a client sends it the backlog from here.
pub fn serial_rules() -> Vec<Allow> {
    vec![
        // stdin (read) and a client's keys (std's socket read is recv, a recvfrom).
        Allow::any(libc::SYS_read),
        Allow::any(libc::SYS_recvfrom),
        // serial-socket waits for a client, a key, or the guest's FIFO to drain.
        Allow::any(libc::SYS_poll),
        // Accepting a client (close-on-exec) and keeping a second handle to read from.
        Allow::any(libc::SYS_accept4),
        Allow::arg_in(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64]),
        // Attaching a client makes sure it is blocking for its reads: ioctl(FIONBIO).
        Allow::arg_in(libc::SYS_ioctl, 1, &[libc::FIONBIO]),
        // The backlog to a new client: a send that never waits (MSG_DONTWAIT, leaving the
        // socket's flags to the reader) and raises no SIGPIPE (console_socket.rs).
        Allow::arg_in(
            libc::SYS_sendto,
            3,
            &[
                libc::MSG_NOSIGNAL as u64,
                (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u64,
            ],
        ),
        // serial-stdin waits for the guest to drain its FIFO (thread::sleep).
        Allow::any(libc::SYS_clock_nanosleep),
        Allow::any(libc::SYS_nanosleep),
    ]
}

/// The console input threads' filter.
pub fn serial_filter() -> Result<BpfProgram, SeccompError> {
    thread_filter(serial_rules())
}

/// virt-launcher mode's `kubevirt-notify` thread: it builds domains and sends them through
/// the notify client on the gRPC runtime (`Handle::block_on`): connecting to virt-handler's
/// socket happens here (the same calls as the gRPC thread's reconnects), after checking
/// which socket exists.
pub fn notify_rules() -> Vec<Allow> {
    let mut rules = grpc_rules();
    rules.extend([
        // Notifier::socket_path: Path::exists is a statx (newfstatat where statx is missing).
        Allow::any(libc::SYS_statx),
        Allow::any(libc::SYS_newfstatat),
    ]);
    rules
}

/// What an API thread needs beyond the rules every thread shares: a single-threaded tokio
/// runtime serving hyper HTTP/1.1 connections, on a unix socket (the API) or TCP (metrics).
/// The runtime's epoll and waker descriptors are created before the thread starts.
pub fn api_rules() -> Vec<Allow> {
    vec![
        // The reactor (mio) waits for clients, their bytes, wake-ups and the next timer
        // (hyper's header timeout, the body timeout, the pause after a failed accept): tokio's
        // time driver is the wait's timeout, there is no timerfd.
        Allow::any(libc::SYS_epoll_wait),
        // The same wait where libc makes it an epoll_pwait.
        Allow::any(libc::SYS_epoll_pwait),
        // Registering the listener (from_std) and each client with the reactor; deregistering
        // a client when its connection ends.
        Allow::any(libc::SYS_epoll_ctl),
        // Accepting clients (mio: non-blocking, close-on-exec).
        Allow::any(libc::SYS_accept4),
        // Reading requests: std's socket read is recv, a recvfrom.
        Allow::any(libc::SYS_recvfrom),
        // Writing answers: hyper queues the head and the body and writes them vectored.
        Allow::any(libc::SYS_writev),
        // hyper shuts the write side down when it ends a connection (`Connection: close`, the
        // client closed its side).
        Allow::arg_in(libc::SYS_shutdown, 1, &[libc::SHUT_WR as u64]),
        // Debug builds: tokio's from_std checks that the listener is non-blocking.
        Allow::arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFL as u64]),
        // Waking the runtime writes its eventfd (a shared rule); when the counter would
        // overflow, mio's waker reads it to reset it first.
        Allow::any(libc::SYS_read),
    ]
}

/// The API threads' filter.
pub fn api_filter() -> Result<BpfProgram, SeccompError> {
    thread_filter(api_rules())
}

/// What virt-launcher mode's gRPC runtime thread (`rvmm-grpc`, see
/// [`crate::kubevirt::grpc::GrpcRuntime`]) needs beyond the rules every thread shares: the
/// API threads' (a current-thread tokio runtime whose epoll and waker descriptors are created
/// before the thread starts; accept, read, vectored writes, shutdown) for tonic's server on
/// the launcher socket, plus what its connections and the notify client's connection tasks
/// do. Backend calls run on the `launcher-control` thread; the notify client connects from
/// the `kubevirt-notify` thread.
pub fn grpc_rules() -> Vec<Allow> {
    let mut rules = api_rules();
    rules.extend([
        // tonic's server reads each accepted unix client's connect info (UdsConnectInfo):
        // the peer's address and credentials (SO_PEERCRED). tokio completes a connect by
        // reading SO_ERROR (a reconnect below).
        Allow::any(libc::SYS_getpeername),
        Allow::args_match(
            libc::SYS_getsockopt,
            vec![
                vec![(1, libc::SOL_SOCKET as u64), (2, libc::SO_PEERCRED as u64)],
                vec![(1, libc::SOL_SOCKET as u64), (2, libc::SO_ERROR as u64)],
            ],
        ),
        // The notify client's channel reconnects on its worker task, on this thread, when
        // virt-handler's socket hung up since the last event: tonic's Reconnect calls the
        // connector (connect_unix: a non-blocking, close-on-exec unix stream socket, and
        // connect), and the new connection's HTTP/2 preface is a send (sendto with
        // MSG_NOSIGNAL), like any write of a plain buffer.
        Allow::args_match(
            libc::SYS_socket,
            vec![vec![
                (0, libc::AF_UNIX as u64),
                (
                    1,
                    (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64,
                ),
            ]],
        ),
        Allow::any(libc::SYS_connect),
        Allow::arg_in(libc::SYS_sendto, 3, &[libc::MSG_NOSIGNAL as u64]),
    ]);
    rules
}

/// A live migration's connection, at either end ([`crate::vmm::migration`]): a unix or TCP
/// stream socket that the sender connects (retrying for a moment while the receiver does not
/// listen yet: thread::sleep) and the receiver binds (replacing a stale unix socket), listens
/// on and accepts once (removing the unix socket then). Requests, answers and pages are
/// std's socket reads (recv, a recvfrom) and writes (send with MSG_NOSIGNAL). A cancel keeps a
/// second handle (F_DUPFD_CLOEXEC) and shuts the connection down both ways from another
/// thread.
pub fn migration_stream_rules() -> Vec<Allow> {
    // std's sockets: stream, close-on-exec; unix, IPv4 or IPv6 (`tcp:HOST:PORT`).
    let stream = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64;
    vec![
        Allow::args_match(
            libc::SYS_socket,
            vec![
                vec![(0, libc::AF_UNIX as u64), (1, stream)],
                vec![(0, libc::AF_INET as u64), (1, stream)],
                vec![(0, libc::AF_INET6 as u64), (1, stream)],
            ],
        ),
        Allow::any(libc::SYS_connect),
        Allow::any(libc::SYS_bind),
        Allow::any(libc::SYS_listen),
        Allow::any(libc::SYS_accept4),
        // Both ends turn Nagle off (requests are written whole, then answered); a TCP
        // listener reuses its address (std sets SO_REUSEADDR before bind).
        Allow::args_match(
            libc::SYS_setsockopt,
            vec![
                vec![(1, libc::IPPROTO_TCP as u64), (2, libc::TCP_NODELAY as u64)],
                vec![(1, libc::SOL_SOCKET as u64), (2, libc::SO_REUSEADDR as u64)],
            ],
        ),
        Allow::arg_in(libc::SYS_shutdown, 1, &[libc::SHUT_RDWR as u64]),
        Allow::any(libc::SYS_recvfrom),
        Allow::arg_in(libc::SYS_sendto, 3, &[libc::MSG_NOSIGNAL as u64]),
        Allow::arg_in(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64]),
        Allow::any(libc::SYS_unlink),
        Allow::any(libc::SYS_clock_nanosleep),
        Allow::any(libc::SYS_nanosleep),
    ]
}

/// virt-launcher mode's `kubevirt-migrate` thread (MigrateVirtualMachine, see
/// [`crate::kubevirt`]): it sends the running VM through virt-handler's migration proxy
/// ([`migration_stream_rules`]) and, once the target runs it, stops it here. Sending is
/// dirty-page logging (KVM_SET_USER_MEMORY_REGION with the log flag, KVM_GET_DIRTY_LOG),
/// pausing the vCPUs (they are kicked: tgkill) and the devices (futexes, eventfds: shared
/// rules), flushing the disks and reading the paused VM's state (KVM's VM and vCPU
/// requests). On a failure or a cancel it resumes the VM. It builds nothing: no files are
/// opened, no threads started.
pub fn migration_send_rules() -> Vec<Allow> {
    let pid = u64::from(std::process::id());
    let mut rules = migration_stream_rules();
    rules.extend([
        Allow::masked_in(libc::SYS_ioctl, 1, IOCTL_TYPE_MASK, &[KVM_IOCTLS]),
        Allow::args_match(
            libc::SYS_tgkill,
            vec![vec![(0, pid), (2, SIGRTMIN() as u64)]],
        ),
        Allow::any(libc::SYS_fsync),
        Allow::any(libc::SYS_fdatasync),
        Allow::any(libc::SYS_sched_yield),
    ]);
    rules
}

/// The `kubevirt-migrate` thread's filter.
pub fn migration_send_filter() -> Result<BpfProgram, SeccompError> {
    thread_filter(migration_send_rules())
}

/// An ioctl request's type byte (`_IOC_TYPE`), for [`Allow::masked_in`].
const IOCTL_TYPE_MASK: u32 = 0xff00;
/// KVM's ioctls (`KVMIO`, 0xAE): the system, VM and vCPU requests of building a VM.
const KVM_IOCTLS: u64 = 0xae00;
/// Type 'T' (0x54): the tap's TUNSET* requests, the terminal's TCGETS/TCSETS, FIONBIO.
const TTY_AND_TUN_IOCTLS: u64 = 0x5400;

/// The control threads (`vmm-control` for the API, `launcher-control` in virt-launcher
/// mode, [`crate::control_thread`]): every VM operation, building a VM included. It is the
/// widest list, and a superset of what the threads it starts do (vCPUs, device workers, the
/// VM's waiter, the console's input threads: they inherit it under their own). What it keeps
/// out: running programs (execve), new processes (fork, clone without CLONE_THREAD is not
/// reachable through clone3's allowance: glibc only forks with clone, which is refused),
/// tracing, mounting, module and BPF loading, namespaces, credentials, network sockets other
/// than a live migration's stream sockets.
pub fn control_rules() -> Vec<Allow> {
    let mut rules = vec![
        // Opening what a VM uses: kernel, initrd, disks, /dev/kvm, /dev/net/tun, the serial
        // file and log; in virt-launcher mode the VMI's files and the cloud-init disk.
        Allow::any(libc::SYS_openat),
        // Their kind and size (fs::metadata, File::metadata, Path::exists, the disk's end).
        Allow::any(libc::SYS_statx),
        Allow::any(libc::SYS_newfstatat),
        Allow::any(libc::SYS_fstat),
        Allow::any(libc::SYS_lseek),
        // Loading the kernel and initrd, reading files; writing the cloud-init disk.
        Allow::any(libc::SYS_read),
        Allow::any(libc::SYS_pread64),
        Allow::any(libc::SYS_pwrite64),
        Allow::any(libc::SYS_ftruncate),
        // virt-launcher mode copies a disk into the pod's ephemeral directory (fs::copy:
        // copy_file_range, sendfile where the file system has no copy_file_range).
        Allow::any(libc::SYS_copy_file_range),
        Allow::any(libc::SYS_sendfile),
        Allow::any(libc::SYS_fsync),
        Allow::any(libc::SYS_fdatasync),
        // Directories and names: virt-launcher mode's ephemeral disk directory, replacing a
        // stale serial socket, listing a directory.
        Allow::any(libc::SYS_mkdir),
        Allow::any(libc::SYS_mkdirat),
        Allow::any(libc::SYS_rename),
        Allow::any(libc::SYS_renameat),
        Allow::any(libc::SYS_renameat2),
        Allow::any(libc::SYS_unlink),
        Allow::any(libc::SYS_unlinkat),
        Allow::any(libc::SYS_getdents64),
        Allow::any(libc::SYS_readlink),
        // Socket and file modes (the serial socket's 0600).
        Allow::any(libc::SYS_chmod),
        Allow::any(libc::SYS_fchmod),
        Allow::any(libc::SYS_fchmodat),
        // KVM (system, VM and vCPU set-up), the tap and the terminal (raw mode on stdin).
        Allow::masked_in(
            libc::SYS_ioctl,
            1,
            IOCTL_TYPE_MASK,
            &[KVM_IOCTLS, TTY_AND_TUN_IOCTLS],
        ),
        // Descriptor flags and duplicates; disk image locks (open file description locks).
        Allow::arg_in(
            libc::SYS_fcntl,
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
                libc::F_OFD_GETLK as u64,
                libc::F_OFD_SETLK as u64,
            ],
        ),
        // The serial console's unix socket.
        Allow::args_match(libc::SYS_socket, vec![vec![(0, libc::AF_UNIX as u64)]]),
        Allow::any(libc::SYS_bind),
        Allow::any(libc::SYS_listen),
        // Threads: vCPUs, device workers, the VM's waiter, console input. pthread_create is
        // clone3 (set_robust_list and rseq in the new thread, mprotect for its guard page);
        // each new thread names itself (prctl) and filters itself (prctl, seccomp) after
        // dropping its capabilities (capget, capset, prctl).
        Allow::any(libc::SYS_clone3),
        Allow::any(libc::SYS_set_robust_list),
        Allow::any(libc::SYS_rseq),
        // A new thread's start-up in std (before its own filter): pthread_getattr_np, for
        // the stack guard, reads the thread's CPU affinity.
        Allow::any(libc::SYS_sched_getaffinity),
        Allow::any(libc::SYS_prctl),
        Allow::any(libc::SYS_seccomp),
        Allow::any(libc::SYS_capget),
        Allow::any(libc::SYS_capset),
        // The vCPU kick signal's handler, installed with the first vCPU.
        Allow::any(libc::SYS_rt_sigaction),
        // Guest memory and its KVM slots: anonymous mappings (shared rules), madvise.
        // Waiting a moment (thread::sleep), yielding.
        Allow::any(libc::SYS_clock_nanosleep),
        Allow::any(libc::SYS_nanosleep),
        Allow::any(libc::SYS_sched_yield),
        // Eventfds, epoll and io_uring for the devices (also the activation rules below).
        Allow::any(libc::SYS_eventfd2),
        Allow::any(libc::SYS_epoll_create1),
        Allow::any(libc::SYS_io_uring_enter),
    ];
    // What the threads it starts do (they inherit this filter under their own).
    rules.extend(vcpu_rules());
    rules.extend(activation_rules());
    for kind in WorkerKind::ALL {
        rules.extend(worker_rules(kind));
    }
    rules.extend(waiter_rules());
    rules.extend(serial_rules());
    // A virt-launcher Sync starts the pod network's DHCP server (`dhcp`) from here too.
    rules.extend(dhcp_rules());
    // vm.send-migration and vm.receive-migration run here; so does virt-launcher mode's
    // receiving thread (`kubevirt-receive`), which builds the VM it receives.
    rules.extend(migration_send_rules());
    rules.extend(name_lookup_rules());
    rules.extend(pod_network_rules());
    rules.extend([
        // virt-launcher mode's serial console log goes to KubeVirt's unprivileged user when
        // rvmm runs as root (backend.rs: geteuid, chown).
        Allow::any(libc::SYS_geteuid),
        Allow::any(libc::SYS_chown),
        Allow::any(libc::SYS_fchownat),
    ]);
    rules
}

/// A Sync in virt-launcher mode sets up the pod network's DHCP on the control thread
/// (launcher/src/dhcp/netif.rs, socket.rs): interface index, MTU and MAC by ioctl on a
/// throwaway datagram socket (if_nametoindex's is a unix one: control rules), the addresses
/// by getifaddrs (a netlink route socket: bind, getsockname, one request, the answers by
/// recvmsg), and the server's UDP sockets (the name lookup's datagram sockets) with their
/// options, bound to ports 67 and 547, IPv6 in the servers' multicast group.
fn pod_network_rules() -> Vec<Allow> {
    vec![
        Allow::args_match(
            libc::SYS_socket,
            vec![
                vec![
                    (0, libc::AF_INET as u64),
                    (1, (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64),
                ],
                vec![
                    (0, libc::AF_NETLINK as u64),
                    (1, (libc::SOCK_RAW | libc::SOCK_CLOEXEC) as u64),
                    (2, libc::NETLINK_ROUTE as u64),
                ],
            ],
        ),
        Allow::arg_in(
            libc::SYS_ioctl,
            1,
            &[libc::SIOCGIFINDEX, libc::SIOCGIFMTU, libc::SIOCGIFHWADDR],
        ),
        Allow::any(libc::SYS_getsockname),
        Allow::arg_in(libc::SYS_sendto, 3, &[0]),
        Allow::arg_in(libc::SYS_recvmsg, 2, &[0]),
        Allow::args_match(
            libc::SYS_setsockopt,
            vec![
                vec![(1, libc::SOL_SOCKET as u64), (2, libc::SO_BROADCAST as u64)],
                vec![(1, libc::IPPROTO_IP as u64), (2, libc::IP_PKTINFO as u64)],
                vec![
                    (1, libc::IPPROTO_IPV6 as u64),
                    (2, libc::IPV6_V6ONLY as u64),
                ],
                vec![
                    (1, libc::IPPROTO_IPV6 as u64),
                    (2, libc::IPV6_RECVPKTINFO as u64),
                ],
                vec![
                    (1, libc::IPPROTO_IPV6 as u64),
                    (2, libc::IPV6_ADD_MEMBERSHIP as u64),
                ],
            ],
        ),
    ]
}

/// `vm.send-migration` to `tcp:NAME:PORT` looks the name up (getaddrinfo) on the control
/// thread: glibc reads /etc/resolv.conf, nsswitch.conf and /etc/hosts (shared and control
/// rules), asks for the host's name (uname, for the search domain), may try nscd's socket (a
/// non-blocking unix socket: control rules), and asks the name servers over UDP: a
/// non-blocking datagram socket, connected, the queries sent (sendmmsg, or send with
/// MSG_NOSIGNAL), the answers awaited (poll) and read (recvfrom; FIONREAD's ioctl is in the
/// control rules' terminal range).
fn name_lookup_rules() -> Vec<Allow> {
    let datagram = (libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
    vec![
        Allow::any(libc::SYS_uname),
        Allow::args_match(
            libc::SYS_socket,
            vec![
                vec![(0, libc::AF_INET as u64), (1, datagram)],
                vec![(0, libc::AF_INET6 as u64), (1, datagram)],
            ],
        ),
        Allow::arg_in(libc::SYS_sendmmsg, 3, &[libc::MSG_NOSIGNAL as u64]),
        Allow::any(libc::SYS_poll),
    ]
}

/// The gRPC runtime thread's filter.
pub fn grpc_filter() -> Result<BpfProgram, SeccompError> {
    thread_filter(grpc_rules())
}

/// What the `dhcp` thread ([`crate::dhcp::server`]) needs beyond the rules every thread
/// shares: waiting on its sockets (DHCPv4, DHCPv6) and stop event, one datagram in and out at
/// a time. The sockets, their options and group memberships and the stop event are set up
/// before the thread starts; the started
/// markers are written and removed by the thread that starts and stops the server. Lease
/// events are handed on through the VMM's event listeners and event monitor (a channel and
/// writes, shared rules); dhcproto draws a random transaction id for each reply it builds
/// (getrandom, shared).
pub fn dhcp_rules() -> Vec<Allow> {
    vec![
        // The loop waits for a packet or the stop event: glibc's poll is a poll or a ppoll.
        Allow::any(libc::SYS_poll),
        Allow::any(libc::SYS_ppoll),
        // Each request with its interface (IP_PKTINFO), without flags (the socket is
        // non-blocking).
        Allow::arg_in(libc::SYS_recvmsg, 2, &[0]),
        // Each reply, out of the request's interface from the server address (IP_PKTINFO).
        Allow::arg_in(libc::SYS_sendmsg, 2, &[0]),
    ]
}

/// The `dhcp` thread's filter.
pub fn dhcp_filter() -> Result<BpfProgram, SeccompError> {
    thread_filter(dhcp_rules())
}

/// What the main thread needs beyond the rules every thread shares, from the moment it waits
/// for the VMM's end ([`crate::vmm::Vmm::wait_for_exit`]): the teardown
/// ([`crate::vmm::Vmm::teardown`]: stopping the VM and waiting for its waiter thread to take
/// it down, closing the console, the `vmm.shutdown` event), dropping the API server and
/// returning from `main`. Log lines, events and stdout's last flush are writes, allowed for
/// every thread. Whatever else receives the `vmm.shutdown` event on this thread may only hand
/// it on (a channel: futex, an eventfd write).
///
/// virt-launcher mode's main thread does the same and, in between, waits for the last domain
/// events (a channel), stops the command server (waiting on the gRPC runtime: futex, and its
/// timer; removing the launcher socket: unlink) and joins the runtime's thread; with
/// `--keep-after-failure` it then waits for a signal (a channel fed by the signal thread).
pub fn main_rules() -> Vec<Allow> {
    let pid = u64::from(std::process::id());
    let stdin = libc::STDIN_FILENO as u64;
    vec![
        // Stopping a running VM kicks its vCPUs out of KVM_RUN: pthread_kill is
        // tgkill(getpid(), tid, SIGRTMIN) (getpid and the signal mask around it are shared).
        Allow::args_match(
            libc::SYS_tgkill,
            vec![vec![(0, pid), (2, SIGRTMIN() as u64)]],
        ),
        // Removing the API socket (ApiServer's drop) and the serial console's socket
        // (Console::close).
        Allow::any(libc::SYS_unlink),
        // virt-launcher mode removes the containerDisk sockets at exit: it reads the
        // container-disk directory, opened at start (rewinddir's lseek, readdir's getdents64),
        // and unlinks each socket in it.
        Allow::any(libc::SYS_lseek),
        Allow::any(libc::SYS_getdents64),
        Allow::any(libc::SYS_unlinkat),
        // Console::close gives the terminal back (stdin in raw mode): isatty and tcgetattr
        // are TCGETS, tcsetattr(TCSANOW) is TCSETS.
        Allow::args_match(
            libc::SYS_ioctl,
            vec![
                vec![(0, stdin), (1, libc::TCGETS)],
                vec![(0, stdin), (1, libc::TCSETS)],
            ],
        ),
        // Returning from main ends the process.
        Allow::any(libc::SYS_exit_group),
    ]
}

/// The main thread's filter.
pub fn main_filter() -> Result<BpfProgram, SeccompError> {
    thread_filter(main_rules())
}

/// Drops the calling thread's capabilities (all of them: tearing down needs none) and filters
/// it with [`main_filter`]. Call it on the main thread once every other thread has started: a
/// thread started afterwards would inherit the filter.
pub fn filter_main_thread() -> Result<(), SeccompError> {
    let filter = main_filter()?;
    if let Err(e) = rvmm_core::seccomp::restrict_capabilities(&[]) {
        log::warn!("Cannot drop the main thread's capabilities: {e}");
    }
    install(&filter)
}

#[cfg(test)]
#[path = "seccomp_tests.rs"]
pub(crate) mod tests;
