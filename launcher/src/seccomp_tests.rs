use rvmm_core::seccomp::{Allow, ChildEnd, common_rules, run_in_filtered_child};

use super::*;

/// Runs `action` in a forked child under `filter` and says how it ended. `action` may make
/// raw system calls only (the child of a multi-threaded process).
pub(crate) fn end_of_filtered_child(filter: &BpfProgram, action: fn()) -> ChildEnd {
    // SAFETY: every action given here makes raw system calls only (see above).
    unsafe { run_in_filtered_child(filter, action) }
}

pub(crate) const KILLED_BY_SIGSYS: ChildEnd = ChildEnd::Killed(libc::SIGSYS);

/// Runs the test `path` (`module_path!()` and the test's name) in a child process of this
/// test binary, with `env` set (the child tells it is the child by one of them): for tests
/// whose filters or aborts must not touch the harness's process.
pub(crate) fn run_test_in_child(path: &str, env: &[(&str, &str)]) -> std::process::Output {
    // The binary's test names leave out the crate's name.
    let name = path.split_once("::").map_or(path, |(_, name)| name);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.args(["--exact", name, "--test-threads=1", "--nocapture"]);
    for (key, value) in env {
        child.env(key, value);
    }
    child.output().unwrap()
}

/// Asserts that a child run by [`run_test_in_child`] passed its test.
pub(crate) fn assert_child_passed(output: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child test: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
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

/// Every kind of filtered thread, with its rules.
fn every_thread_kind() -> Vec<(&'static str, Vec<Allow>)> {
    use rvmm_devices::seccomp::{WorkerKind, worker_rules};
    let mut kinds = vec![
        ("api", api_rules()),
        ("grpc", grpc_rules()),
        ("notify", notify_rules()),
        ("signals", signal_rules()),
        ("waiter", waiter_rules()),
        ("timer", timer_rules()),
        ("serial", serial_rules()),
        ("control", control_rules()),
        ("migrate", migration_send_rules()),
        ("dhcp", dhcp_rules()),
        ("main", main_rules()),
        ("vcpu", rvmm_core::seccomp::vcpu_rules()),
    ];
    for kind in WorkerKind::ALL {
        kinds.push(("worker", worker_rules(kind)));
    }
    kinds
}

/// What a thread serving a large request does to the allocator: many small buffers, many
/// medium ones (from the arena's heap), a few large ones grown by reallocation, all freed.
fn churn_the_heap() {
    for _ in 0..3 {
        let small: Vec<Vec<u8>> = (0..10_000).map(|i| vec![i as u8; 100]).collect();
        let medium: Vec<Vec<u8>> = (0..200).map(|i| vec![i as u8; 64 << 10]).collect();
        let mut large = Vec::new();
        for chunk in 0..10 {
            large.extend_from_slice(&vec![chunk as u8; 1 << 20]);
        }
        let text = "x".repeat(3 << 20);
        assert_eq!(large.len() + text.len(), 13 << 20);
        drop((small, medium, large, text));
    }
}

/// Set in the child process of [`filtered_threads_survive_large_and_many_allocations`].
const ALLOC_CHILD_ENV: &str = "RVMM_TEST_FILTERED_ALLOCATIONS";

/// Runs [`filtered_threads_survive_large_and_many_allocations`] in a child test process,
/// with glibc's arena limit `arena_max` (`None`: glibc's default, one arena per thread).
fn allocation_child(arena_max: Option<u32>) -> std::process::Output {
    // The tunable is mallopt(M_ARENA_MAX)'s, applied before the harness's threads start
    // (rvmm's main calls single_malloc_arena first thing; a test binary cannot). Without it,
    // glibc's default: an arena per thread.
    let tunable = arena_max.map_or(String::new(), |max| format!("glibc.malloc.arena_max={max}"));
    run_test_in_child(
        concat!(
            module_path!(),
            "::filtered_threads_survive_large_and_many_allocations"
        ),
        &[(ALLOC_CHILD_ENV, "1"), ("GLIBC_TUNABLES", &tunable)],
    )
}

#[test]
fn filtered_threads_survive_large_and_many_allocations() {
    if std::env::var_os(ALLOC_CHILD_ENV).is_some() {
        for (kind, rules) in every_thread_kind() {
            let filter = rvmm_core::seccomp::thread_filter(rules).unwrap();
            let thread = rvmm_core::seccomp::spawn_filtered(kind, Some(filter), churn_the_heap);
            thread.unwrap().join().unwrap();
        }
        return;
    }
    // rvmm's allocator set-up (one arena): every kind of thread lives.
    assert_child_passed(&allocation_child(Some(1)));
    // The reproducer: with glibc's default, a thread arena's first trim opens
    // /proc/sys/vm/overcommit_memory, and the filter kills the process.
    let output = allocation_child(None);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&output.status),
        Some(libc::SIGSYS),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Set in the child process of [`migration_streams_work_on_the_threads_that_migrate`].
const STREAM_CHILD_ENV: &str = "RVMM_TEST_FILTERED_MIGRATION_STREAM";

/// What a migration does with its connection at both ends, over a unix socket and over TCP
/// (by address and by name), in one thread: bind and listen (unix), connect, accept, Nagle
/// off, bytes both ways, a second handle that shuts the connection down, the socket removed.
fn migration_stream_round_trip(tcp: &std::net::TcpListener, port: u16, hosts: &[&str]) {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    /// Bytes both ways, then a second handle of the sender ends the connection.
    fn talk<S: Read + Write>(mut sender: S, mut receiver: S, clone: fn(&S) -> S) {
        fn exchange(from: &mut impl Write, to: &mut impl Read) {
            from.write_all(b"state").unwrap();
            let mut got = [0u8; 5];
            to.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"state");
        }
        exchange(&mut sender, &mut receiver);
        exchange(&mut receiver, &mut sender);
        drop(clone(&sender));
        assert_eq!(receiver.read(&mut [0u8; 1]).unwrap(), 0);
    }
    let path = std::env::temp_dir().join(format!("rvmm-migration-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let sender = UnixStream::connect(&path).unwrap();
    let (receiver, _) = listener.accept().unwrap();
    std::fs::remove_file(&path).unwrap();
    talk(sender, receiver, |s| {
        let clone = s.try_clone().unwrap();
        clone.shutdown(std::net::Shutdown::Both).unwrap();
        clone
    });
    for host in hosts {
        let sender = std::net::TcpStream::connect(format!("{host}:{port}")).unwrap();
        sender.set_nodelay(true).unwrap();
        let (receiver, _) = tcp.accept().unwrap();
        receiver.set_nodelay(true).unwrap();
        talk(sender, receiver, |s| {
            let clone = s.try_clone().unwrap();
            clone.shutdown(std::net::Shutdown::Both).unwrap();
            clone
        });
    }
}

#[test]
fn migration_streams_work_on_the_threads_that_migrate() {
    if std::env::var_os(STREAM_CHILD_ENV).is_some() {
        for (kind, rules, hosts) in [
            // virt-launcher mode's sender: its URL is virt-handler's proxy socket.
            (
                "kubevirt-migrate",
                migration_send_rules(),
                &["127.0.0.1"][..],
            ),
            // vm.send-migration (`tcp:HOST:PORT`, a name too), vm.receive-migration,
            // virt-launcher mode's receiver.
            ("control", control_rules(), &["127.0.0.1", "localhost"][..]),
        ] {
            // Bound here, unfiltered: its address is read (getsockname) for the test only.
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = tcp.local_addr().unwrap().port();
            let filter = rvmm_core::seccomp::thread_filter(rules).unwrap();
            let thread = rvmm_core::seccomp::spawn_filtered(kind, Some(filter), move || {
                migration_stream_round_trip(&tcp, port, hosts);
            });
            thread.unwrap().join().unwrap();
        }
        return;
    }
    let output = run_test_in_child(
        concat!(
            module_path!(),
            "::migration_streams_work_on_the_threads_that_migrate"
        ),
        &[
            (STREAM_CHILD_ENV, "1"),
            ("GLIBC_TUNABLES", "glibc.malloc.arena_max=1"),
        ],
    );
    assert_child_passed(&output);
}
