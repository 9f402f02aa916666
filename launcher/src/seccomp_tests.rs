use vmm_core::seccomp::common_rules;

use super::*;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Runs `action` in a forked child under `filter` and returns its wait status. The child only
/// makes raw system calls: no allocation, no locks (the test harness has other threads).
fn status_of_filtered_child(filter: &BpfProgram, action: fn()) -> libc::c_int {
    // SAFETY: the child only calls async-signal-safe functions and raw system calls below.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", errno());
    if pid == 0 {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `no_core` is a valid rlimit; a SIGSYS death must not leave a core file.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        if install(filter).is_err() {
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(2) };
        }
        action();
        // exit(2): every filter allows it, and it ends the child's only thread with status 0.
        // SAFETY: ends the calling (only) thread; nothing runs after it.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child and `status` a valid out pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid failed: {}", errno());
    status
}

fn killed_by_sigsys(status: libc::c_int) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

fn exited_cleanly(status: libc::c_int) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
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
        let mut allowlist = common_rules();
        allowlist.extend(rules);
        for denied in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_open,
            libc::SYS_openat,
        ] {
            assert!(
                allowlist.iter().all(|r| r.syscall() != denied),
                "{kind} allows syscall {denied}"
            );
        }
    }
}

#[test]
fn api_filter_kills_a_thread_that_starts_a_thread_or_opens_a_socket() {
    let filter = api_filter().unwrap();
    let status = status_of_filtered_child(&filter, try_clone3);
    assert!(killed_by_sigsys(status), "clone3: wait status {status:#x}");
    let status = status_of_filtered_child(&filter, try_socket);
    assert!(killed_by_sigsys(status), "socket: wait status {status:#x}");
    // What the server does stays allowed: shutting down a (here bad) descriptor's write side.
    let status = status_of_filtered_child(&filter, || {
        // SAFETY: -1 is no descriptor; the call fails with EBADF and touches nothing.
        unsafe { libc::shutdown(-1, libc::SHUT_WR) };
    });
    assert!(exited_cleanly(status), "shutdown: wait status {status:#x}");
}

#[test]
fn main_filter_kills_a_thread_that_starts_a_thread_or_opens_a_socket() {
    let filter = main_filter().unwrap();
    let status = status_of_filtered_child(&filter, try_clone3);
    assert!(killed_by_sigsys(status), "clone3: wait status {status:#x}");
    let status = status_of_filtered_child(&filter, try_socket);
    assert!(killed_by_sigsys(status), "socket: wait status {status:#x}");
    // Console::close's terminal calls (set_canon_mode) are allowed on stdin, tty or not.
    let status = status_of_filtered_child(&filter, || {
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
    assert!(
        exited_cleanly(status),
        "stdin's termios: wait status {status:#x}"
    );
    let status = status_of_filtered_child(&filter, || {
        // SAFETY: isatty only reads the descriptor's terminal attributes.
        unsafe { libc::isatty(libc::STDERR_FILENO) };
    });
    assert!(
        killed_by_sigsys(status),
        "isatty(2): wait status {status:#x}"
    );
}
