//! Shared by the KVM tests: KVM detection, the tiny test guests, running `rvmm`.
#![allow(dead_code)] // each test binary uses a different part

pub mod bridged;
pub mod fixtures;
pub mod guests;
pub mod http;
pub mod kubevirt;
pub mod linux;
pub mod memtest;
pub mod netns;
pub mod process;

#[allow(unused_imports)] // each test binary uses a different part
pub use guests::{kvm_available, tiny_guest};

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The rvmm binary under test.
pub fn rvmm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvmm"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `rvmm` with `args`, killing it after `timeout`.
pub fn run_rvmm(args: &[&str], timeout: Duration) -> Output {
    let mut child = rvmm().args(args).spawn().expect("spawn rvmm");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let out = String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned();
            panic!(
                "rvmm {args:?} still running after {timeout:?} (killed: {status}); console:\n{out}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// Console lines of a finished run.
pub fn lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// The `/proc/<pid>/task/*/status` fields of each live thread of process `pid`.
pub fn thread_statuses(pid: u32) -> Vec<std::collections::HashMap<String, String>> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        // A thread that just ended has no status any more.
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect()
        })
        .collect()
}

/// The threads of process `pid` that are not confined: each `(name, what is missing)` where a
/// thread lacks a seccomp filter (`Seccomp: 2`) or `NoNewPrivs: 1`.
pub fn unconfined_threads(pid: u32) -> Vec<(String, String)> {
    thread_statuses(pid)
        .into_iter()
        .filter(|s| s["Seccomp"] != "2" || s["NoNewPrivs"] != "1")
        .map(|s| {
            let what = format!("Seccomp: {}, NoNewPrivs: {}", s["Seccomp"], s["NoNewPrivs"]);
            (s["Name"].clone(), what)
        })
        .collect()
}

/// Each thread of process `pid` and its effective capabilities (`CapEff`, a bit mask).
pub fn thread_capabilities(pid: u32) -> Vec<(String, u64)> {
    thread_statuses(pid)
        .into_iter()
        // Kernel threads attached to the VM (kvm-nx-lpage-recovery) are not rvmm's.
        .filter(|s| !s["Name"].starts_with("kvm-"))
        .map(|s| {
            let caps = u64::from_str_radix(&s["CapEff"], 16).unwrap_or(u64::MAX);
            (s["Name"].clone(), caps)
        })
        .collect()
}

/// What a control thread keeps once a VM has booted: NET_BIND_SERVICE, SYS_NICE,
/// DAC_OVERRIDE, DAC_READ_SEARCH and, with network interfaces, NET_ADMIN.
pub const CONTROL_CAPS_AFTER_BOOT: u64 = 1 << 10 | 1 << 23 | 1 << 1 | 1 << 2 | 1 << 12;

/// Asserts that every thread of process `pid` is confined (a seccomp filter and NoNewPrivs),
/// that the `present` threads are among them (names cut to 15 bytes), and that only the
/// control thread (`control`; [`CONTROL_CAPS_AFTER_BOOT`] at most once a VM has `booted`)
/// and the threads doing its work (`like_control`, with none the control thread lacks) hold
/// capabilities.
pub fn assert_threads_confined(
    pid: u32,
    booted: bool,
    present: &[&str],
    control: &str,
    like_control: &[&str],
) {
    let loose = unconfined_threads(pid);
    assert!(loose.is_empty(), "unconfined threads: {loose:?}");
    let threads = thread_capabilities(pid);
    for name in present {
        assert!(
            threads.iter().any(|(n, _)| n == name),
            "no {name} thread: {threads:?}"
        );
    }
    let control_caps = threads
        .iter()
        .find(|(n, _)| n == control)
        .map_or(0, |(_, caps)| *caps);
    if booted {
        assert_eq!(
            control_caps & !CONTROL_CAPS_AFTER_BOOT,
            0,
            "{control} has capabilities {control_caps:#x}"
        );
    }
    for (name, caps) in &threads {
        if name == control {
            continue;
        }
        let allowed = if like_control.contains(&name.as_str()) {
            control_caps
        } else {
            0
        };
        assert_eq!(caps & !allowed, 0, "{name} has capabilities {caps:#x}");
    }
}
