use vmm_core::seccomp::{Allow, ChildEnd, common_rules, run_in_filtered_child};

use super::*;

/// Runs `action` in a forked child under `filter` and says how it ended. `action` may make
/// raw system calls only (the child of a multi-threaded process).
pub(crate) fn end_of_filtered_child(filter: &BpfProgram, action: fn()) -> ChildEnd {
    // SAFETY: every action given here makes raw system calls only (see above).
    unsafe { run_in_filtered_child(filter, action) }
}

pub(crate) const KILLED_BY_SIGSYS: ChildEnd = ChildEnd::Killed(libc::SIGSYS);
pub(crate) const EXITED_CLEANLY: ChildEnd = ChildEnd::Exited(0);

/// Asserts that the `kind` thread's list (with the shared rules) has none of `denied`.
pub(crate) fn assert_allows_none(kind: &str, rules: Vec<Allow>, denied: &[i64]) {
    let mut allowlist = common_rules();
    allowlist.extend(rules);
    for &syscall in denied {
        assert!(
            allowlist.iter().all(|r| r.syscall() != syscall),
            "{kind} allows syscall {syscall}"
        );
    }
}

/// Starting a thread: clone3 with no arguments fails with EFAULT when it is allowed, so the
/// child cannot actually start anything.
fn try_clone3() {
    // SAFETY: a null clone_args with size 0 is rejected by the kernel before any effect.
    unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
}

/// Opening a socket.
fn try_socket() {
    // SAFETY: creates a socket from constant arguments; no memory is passed. The child exits
    // right after, which closes it.
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
}

#[test]
fn api_and_main_filters_compile_and_allow_no_thread_or_process_creation() {
    assert!(!api_filter().unwrap().is_empty());
    assert!(!main_filter().unwrap().is_empty());
    for (kind, rules) in [("api", api_rules()), ("main", main_rules())] {
        assert_allows_none(
            kind,
            rules,
            &[
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_socket,
                libc::SYS_open,
                libc::SYS_openat,
            ],
        );
    }
}

#[test]
fn api_filter_kills_a_thread_that_starts_a_thread_or_opens_a_socket() {
    let filter = api_filter().unwrap();
    let end = end_of_filtered_child(&filter, try_clone3);
    assert_eq!(end, KILLED_BY_SIGSYS, "clone3");
    let end = end_of_filtered_child(&filter, try_socket);
    assert_eq!(end, KILLED_BY_SIGSYS, "socket");
    // What the server does stays allowed: shutting down a (here bad) descriptor's write side.
    let end = end_of_filtered_child(&filter, || {
        // SAFETY: -1 is no descriptor; the call fails with EBADF and touches nothing.
        unsafe { libc::shutdown(-1, libc::SHUT_WR) };
    });
    assert_eq!(end, EXITED_CLEANLY, "shutdown");
}

#[test]
fn main_filter_kills_a_thread_that_starts_a_thread_or_opens_a_socket() {
    let filter = main_filter().unwrap();
    let end = end_of_filtered_child(&filter, try_clone3);
    assert_eq!(end, KILLED_BY_SIGSYS, "clone3");
    let end = end_of_filtered_child(&filter, try_socket);
    assert_eq!(end, KILLED_BY_SIGSYS, "socket");
    // Console::close's terminal calls (set_canon_mode) are allowed on stdin, tty or not.
    let end = end_of_filtered_child(&filter, || {
        // SAFETY: termios is plain data; tcgetattr fills it in when stdin is a terminal.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: isatty and tcgetattr read the terminal's attributes into valid memory;
        // tcsetattr sets them back unchanged, and only when tcgetattr succeeded.
        unsafe {
            libc::isatty(libc::STDIN_FILENO);
            if libc::tcgetattr(libc::STDIN_FILENO, &mut termios) == 0 {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &termios);
            } else {
                // Not a terminal: the same ioctl, answered ENOTTY rather than SIGSYS.
                libc::ioctl(libc::STDIN_FILENO, libc::TCSETS, &termios);
            }
        }
    });
    assert_eq!(end, EXITED_CLEANLY, "stdin's termios");
    let end = end_of_filtered_child(&filter, || {
        // SAFETY: isatty only reads the descriptor's terminal attributes.
        unsafe { libc::isatty(libc::STDERR_FILENO) };
    });
    assert_eq!(end, KILLED_BY_SIGSYS, "isatty(2)");
}

#[test]
fn dhcp_filter_allows_its_loop_and_kills_a_thread_that_opens_a_socket_or_starts_a_thread() {
    assert_allows_none(
        "dhcp",
        dhcp_rules(),
        &[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_bind,
            libc::SYS_setsockopt,
            libc::SYS_openat,
            libc::SYS_unlink,
        ],
    );
    let filter = dhcp_filter().unwrap();
    assert_eq!(end_of_filtered_child(&filter, try_clone3), KILLED_BY_SIGSYS);
    assert_eq!(end_of_filtered_child(&filter, try_socket), KILLED_BY_SIGSYS);
    // The loop's calls, on a bad descriptor: answered EBADF, not SIGSYS.
    let end = end_of_filtered_child(&filter, || {
        let mut fd = libc::pollfd {
            fd: -1,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: an empty header and a pollfd on no descriptor: the calls touch nothing.
        unsafe {
            libc::poll(&mut fd, 1, 0);
            let mut header: libc::msghdr = std::mem::zeroed();
            libc::recvmsg(-1, &mut header, 0);
            libc::sendmsg(-1, &header, 0);
        }
    });
    assert_eq!(end, EXITED_CLEANLY, "poll, recvmsg, sendmsg");
    let end = end_of_filtered_child(&filter, || {
        // SAFETY: an empty header on no descriptor: the call touches nothing.
        unsafe {
            let mut header: libc::msghdr = std::mem::zeroed();
            libc::recvmsg(-1, &mut header, libc::MSG_PEEK);
        }
    });
    assert_eq!(end, KILLED_BY_SIGSYS, "recvmsg with flags");
}
