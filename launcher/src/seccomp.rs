//! The seccomp filters of the launcher's own threads: the API threads (`api`, and `metrics`
//! with `--metrics-addr`), virt-launcher mode's gRPC runtime thread (`rvmm-grpc`), the DHCP
//! server's thread (`dhcp`) and the main thread once the VM runs (both modes). The mechanism and the rules every filtered thread
//! shares are in [`vmm_core::seccomp`].
//!
//! No kind starts a thread or a process: the API and gRPC threads only move bytes (VM
//! operations run on the unfiltered `vmm-control` or `launcher-control` thread), and the main
//! thread only waits for the end and tears the VM down, after it has started every other
//! thread. A thread inherits the filter of the thread that starts it, so these filters must be
//! installed after that.

use vmm_core::seccomp::{Allow, BpfProgram, SeccompError, install, thread_filter};
use vmm_sys_util::signal::SIGRTMIN;

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

/// Filters the calling thread with [`main_filter`]. Call it on the main thread once every
/// other thread has started: a thread started afterwards would inherit the filter.
pub fn filter_main_thread() -> Result<(), SeccompError> {
    install(&main_filter()?)
}

#[cfg(test)]
#[path = "seccomp_tests.rs"]
pub(crate) mod tests;
