use std::sync::mpsc;

use super::*;

/// An errno no system call here returns by itself, so seeing it proves the filter answered.
const DENIED_ERRNO: i32 = libc::EHWPOISON;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A system call no filter of ours allows, that succeeds without one.
fn make_socket() -> libc::c_int {
    // SAFETY: creates a socket from constant arguments; no memory is passed.
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }
}

#[test]
fn every_worker_filter_compiles() {
    for kind in WorkerKind::ALL {
        let filter = worker_filter(kind).unwrap();
        assert!(!filter.is_empty(), "{kind:?}");
    }
    compile(&activation_rules(), ON_DENIED).unwrap();
}

#[test]
fn rules_for_the_same_syscall_merge_and_any_arguments_win() {
    let ioctl = |values: &[u64]| Allow::arg_in(libc::SYS_ioctl, 1, values);
    let narrow = compile(&[ioctl(&[1]), ioctl(&[2])], ON_DENIED).unwrap();
    let only_one = compile(&[ioctl(&[1])], ON_DENIED).unwrap();
    assert!(narrow.len() > only_one.len(), "both patterns are kept");
    let wide = compile(&[ioctl(&[1]), Allow::any(libc::SYS_ioctl)], ON_DENIED).unwrap();
    let any = compile(&[Allow::any(libc::SYS_ioctl)], ON_DENIED).unwrap();
    assert_eq!(wide, any);
}

#[test]
fn filtered_thread_gets_the_configured_errno_for_a_denied_syscall() {
    let mut allowlist = common_rules();
    allowlist.extend(worker_rules(WorkerKind::Rng));
    let filter = compile(&allowlist, SeccompAction::Errno(DENIED_ERRNO as u32)).unwrap();
    let (report, results) = mpsc::channel();
    let thread = spawn_filtered("seccomp-test", Some(filter), move || {
        let socket = make_socket();
        let socket_errno = errno();
        let mut byte = [0u8; 1];
        // SAFETY: `byte` is valid writable memory of the given length.
        let random = unsafe { libc::getrandom(byte.as_mut_ptr().cast(), 1, 0) };
        let _ = report.send((socket, socket_errno, random));
    })
    .unwrap();
    let (socket, socket_errno, random) = results.recv().unwrap();
    thread.join().unwrap();
    assert_eq!(
        (socket, socket_errno),
        (-1, DENIED_ERRNO),
        "socket was not denied"
    );
    assert_eq!(random, 1, "getrandom (on the list) must still work");
    // Only the filtered thread is affected.
    let socket = make_socket();
    assert!(socket >= 0, "the test thread is not filtered: {}", errno());
    // SAFETY: `socket` is a descriptor this test owns.
    unsafe { libc::close(socket) };
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
        // exit(2), not exit_group(2): the filters allow it, and the child has one thread, so
        // this ends it with status 0.
        // SAFETY: ends the calling (only) thread; nothing runs after it.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child and `status` a valid out pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid failed: {}", errno());
    status
}

#[test]
fn denied_syscall_kills_the_process_with_sigsys() {
    let filter = worker_filter(WorkerKind::Rng).unwrap();
    let status = status_of_filtered_child(&filter, || {
        make_socket();
    });
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
        "wait status {status:#x}: not killed by SIGSYS"
    );
    // The same filter lets a process that stays on the list live.
    let status = status_of_filtered_child(&filter, || {
        let mut byte = [0u8; 1];
        // SAFETY: `byte` is valid writable memory of the given length.
        unsafe { libc::getrandom(byte.as_mut_ptr().cast(), 1, 0) };
    });
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "wait status {status:#x}"
    );
}

#[test]
fn a_thread_whose_filter_cannot_be_installed_never_runs_its_body() {
    // An empty program is refused before reaching the kernel.
    let (ran, seen) = mpsc::channel();
    let err = spawn_filtered("seccomp-bad", Some(BpfProgram::new()), move || {
        let _ = ran.send(());
    })
    .unwrap_err();
    assert!(matches!(err, SpawnError::Filter(SeccompError::Install(_))));
    assert!(seen.recv().is_err(), "the body ran");
}
