//! KVM tests of the serial console's host side: a unix socket that clients attach to, detach
//! from and re-attach to without losing output, and the --serial-log copy.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{kvm_available, rvmm, tiny_guest};

/// Reads from `stream` until `needle` has been seen (or panics after 60 s).
fn read_until(stream: &mut UnixStream, needle: &str) -> String {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no '{needle}' in {text:?}"
        );
        if let Ok(n) = stream.read(&mut buf) {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    text
}

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
