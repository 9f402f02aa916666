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
