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

#[test]
fn denied_syscall_kills_the_process_with_sigsys() {
    let filter = worker_filter(WorkerKind::Rng).unwrap();
    let socket: fn() = || {
        make_socket();
    };
    // SAFETY: the action makes one raw system call.
    let end = unsafe { run_in_filtered_child(&filter, socket) };
    assert_eq!(end, ChildEnd::Killed(libc::SIGSYS));
    // The same filter lets a process that stays on the list live.
    let random: fn() = || {
        let mut byte = [0u8; 1];
        // SAFETY: `byte` is valid writable memory of the given length.
        unsafe { libc::getrandom(byte.as_mut_ptr().cast(), 1, 0) };
    };
    // SAFETY: the action makes one raw system call.
    let end = unsafe { run_in_filtered_child(&filter, random) };
    assert_eq!(end, ChildEnd::Exited(0));
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

#[test]
fn log_mode_names_the_thread_and_call_and_the_call_fails_with_enosys() {
    let filter = compile(&common_rules(), SeccompAction::Trap).unwrap();
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    let piped = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(piped, 0);
    // SAFETY: the child makes raw system calls and async-signal-safe calls only (sigaction,
    // the filter's prctl and seccomp, socket, the handler's write) and then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: as above; stderr becomes the pipe's write end.
        unsafe { libc::dup2(pipe[1], libc::STDERR_FILENO) };
        let code = if set_denied_action(DeniedAction::Log).is_err() {
            10
        } else if install(&filter).is_err() {
            11
        } else {
            let first = make_socket();
            let first_errno = errno();
            // Logged once per call: the second attempt is quiet.
            let second = make_socket();
            match (first, first_errno, second) {
                (-1, libc::ENOSYS, -1) => 0,
                (-1, _, _) => 12,
                _ => 13,
            }
        };
        // exit(2), not exit_group(2) (not on the list): the child has one thread.
        // SAFETY: ends the calling (only) thread; nothing runs after it.
        unsafe { libc::syscall(libc::SYS_exit, code) };
    }
    // SAFETY: closes our copy of the write end, so the read below ends with the child.
    unsafe { libc::close(pipe[1]) };
    let mut status = 0;
    // SAFETY: `pid` is our child and `status` a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    // SAFETY: the read end is ours; File takes it over and closes it.
    let mut reader = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
    let mut logged = String::new();
    std::io::Read::read_to_string(&mut reader, &mut logged).unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}: {logged}"
    );
    let thread = std::thread::current().name().unwrap_or_default().to_owned();
    let thread: String = thread.chars().take(15).collect();
    assert_eq!(
        logged,
        format!(
            "rvmm: seccomp (--seccomp=log): thread {thread} made system call socket (41), outside \
             its filter: it fails with ENOSYS\n"
        )
    );
}
