//! KVM tests of the serial console's host side: a unix socket that clients attach to, detach
//! from and re-attach to without losing output, the --serial-log copy, and host input that
//! reaches the guest (the `echo` tiny guest answers each line) from a socket client or stdin.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::process::{Rvmm, TestDir, read_until, wait_for_path};
use common::{kvm_available, rvmm, tiny_guest};

fn tick_numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick: "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

#[test]
fn kvm_socket_console_survives_detach_and_reattach_and_keeps_a_log() {
    if !kvm_available("socket console") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("rvmm-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("serial.sock");
    let log = dir.join("serial.log");
    let kernel = tiny_guest("ticker");
    let mut child = rvmm()
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
        ])
        .arg("--serial")
        .arg(format!("socket={}", socket.display()))
        .arg("--serial-log")
        .arg(&log)
        .args(["--grace-period-seconds", "1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "console socket must be private");

    let mut first = UnixStream::connect(&socket).unwrap();
    let seen = read_until(&mut first, "tick: 3\n");
    drop(first);
    let last_seen = *tick_numbers(&seen).last().unwrap();
    // Output while detached waits for the next client.
    std::thread::sleep(Duration::from_millis(500));
    let mut second = UnixStream::connect(&socket).unwrap();
    let target = format!("tick: {}\n", last_seen + 5);
    let resumed = read_until(&mut second, &target);
    let log_mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(log_mode, 0o600, "the serial log must be private");
    // Every thread, the console's included, is filtered once the guest runs.
    let loose = common::unconfined_threads(child.id());
    assert!(loose.is_empty(), "unconfined threads: {loose:?}");
    // No control thread here: no thread keeps a capability.
    for (name, caps) in common::thread_capabilities(child.id()) {
        assert_eq!(caps, 0, "{name} has capabilities {caps:#x}");
    }
    let numbers = tick_numbers(&resumed);
    assert!(
        numbers.contains(&(last_seen + 1)),
        "tick {} lost: {numbers:?}",
        last_seen + 1
    );

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "socket left behind");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.starts_with("tick: 0\n"), "{logged:.80}");
    assert!(tick_numbers(&logged).len() > last_seen as usize + 5);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn kvm_on_a_terminal_rvmm_exits_and_restores_it_when_the_guest_ends() {
    if !kvm_available("terminal console") {
        return;
    }
    // `script` gives rvmm a pseudo-terminal on stdin, so it switches it to raw mode and reads
    // it on a thread; the exit must still restore the terminal and return.
    let kernel = tiny_guest("hello");
    let command = format!(
        "{} run --kernel {} --memory 64M",
        env!("CARGO_BIN_EXE_rvmm"),
        kernel.display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script(1) from util-linux");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("rvmm on a terminal did not exit after its guest reset");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("rvmm-tiny hello: guest is alive"), "{out}");
}

#[test]
fn kvm_socket_client_input_reaches_the_guest_also_after_a_reattach() {
    if !kvm_available("socket console input") {
        return;
    }
    let dir = TestDir::new("console-input");
    let socket = dir.path("serial.sock");
    let kernel = tiny_guest("echo");
    let mut vmm = Rvmm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--serial",
        &format!("socket={}", socket.display()),
    ]);
    wait_for_path(&socket);
    let mut first = UnixStream::connect(&socket).unwrap();
    read_until(&mut first, "echo: ready\n");
    // The client waits a moment before typing, as a person does: its input thread must still
    // be reading by then.
    std::thread::sleep(Duration::from_millis(300));
    first.write_all(b"hello guest\n").unwrap();
    read_until(&mut first, "echo: hello guest\n");
    drop(first);

    let mut second = UnixStream::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    second.write_all(b"typed after a re-attach\n").unwrap();
    read_until(&mut second, "echo: typed after a re-attach\n");
    // More than the UART's 64-byte receive FIFO in one write: the rest waits for the guest.
    let long = "x".repeat(70);
    second
        .write_all(format!("{long}\nbye\n").as_bytes())
        .unwrap();
    read_until(&mut second, &format!("echo: {long}\n"));
    assert_eq!(
        vmm.wait(Duration::from_secs(60)),
        Some(0),
        "bye resets the guest"
    );
}

#[test]
fn kvm_stdin_input_reaches_the_guest() {
    if !kvm_available("stdin console input") {
        return;
    }
    let kernel = tiny_guest("echo");
    let mut child = rvmm()
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"from stdin\nbye\n").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the guest never read 'bye' from stdin");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("echo: from stdin\n"), "{out}");
}
