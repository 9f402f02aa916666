//! Snapshot and migration tests through rvmm's API: the `memtest` tiny guest, restoring a
//! snapshot, migrating between two rvmm processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::http::{call, wait_for_socket};
use super::process::{Rvmm, TestDir, wait_for_text};
use super::tiny_guest;

/// How long an API socket may take to appear.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// PUT `endpoint` with an optional JSON body, which must answer 204.
pub fn put(socket: &Path, endpoint: &str, body: Option<&str>) {
    let answer = call(socket, "PUT", &format!("/api/v1/{endpoint}"), body);
    assert_eq!(answer.status, 204, "{endpoint}: {}", answer.body);
}

/// `vm.info`'s state.
pub fn state(socket: &Path) -> String {
    let info = call(socket, "GET", "/api/v1/vm.info", None);
    assert_eq!(info.status, 200, "{}", info.body);
    info.json()["state"].as_str().unwrap().to_string()
}

/// The numbers of the `memtest: pass N ok` lines, in order; fails on a CORRUPT or bad pass
/// and on more than one `start` (a reboot).
pub fn passes(text: &str) -> Vec<u64> {
    assert!(!text.contains("CORRUPT"), "memory lost: {text}");
    assert!(
        text.matches("memtest: start").count() <= 1,
        "rebooted: {text}"
    );
    text.lines()
        .filter_map(|l| l.strip_prefix("memtest: pass "))
        .map(|rest| {
            let (n, verdict) = rest.split_once(' ').unwrap();
            assert_eq!(verdict, "ok", "{text}");
            n.parse().unwrap()
        })
        .collect()
}

/// `rvmm run` of memtest over `mib` MiB with the API on `dir`'s `api.sock`, console to
/// `serial.log`, events to `events.jsonl`; returns once the API listens.
pub fn start_memtest(dir: &TestDir, vcpus: &str, mib: u32) -> Rvmm {
    start_memtest_with(dir, vcpus, mib, &[])
}

/// [`start_memtest`] with more `rvmm run` arguments (a disk, say).
pub fn start_memtest_with(dir: &TestDir, vcpus: &str, mib: u32, extra: &[&str]) -> Rvmm {
    let kernel = tiny_guest("memtest");
    let socket = dir.path("api.sock");
    let cmdline = format!("memtest.mib={mib}");
    let serial = format!("file={}", dir.path("serial.log").display());
    let events = format!("path={}", dir.path("events.jsonl").display());
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--vcpus",
        vcpus,
        "--cmdline",
        &cmdline,
        "--serial",
        &serial,
        "--event-monitor",
        &events,
        "--api-socket",
        socket.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let vmm = Rvmm::start(&args);
    wait_for_socket(&socket, API_TIMEOUT);
    vmm
}

/// A one-vCPU memtest guest over 4 MiB in a new test directory `name`, once it has passed
/// its first check: the directory, the API socket and the VMM.
pub fn memtest_running(name: &str) -> (TestDir, PathBuf, Rvmm) {
    let dir = TestDir::new(name);
    let socket = dir.path("api.sock");
    let vmm = start_memtest(&dir, "1", 4);
    wait_for_text(&dir.path("serial.log"), " ok\n", 1);
    (dir, socket, vmm)
}

/// The events of an event-monitor file with `name`, as JSON.
pub fn events_named(file: &Path, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == name)
        .collect()
}

/// `rvmm run --restore` of the snapshot in `snap`, its console as `serial` says (`file=PATH`
/// or `socket=PATH`), the API on `socket`; returns once the VM is there, checked Paused.
pub fn restore_paused(snap: &Path, serial: &str, socket: &Path) -> Rvmm {
    let vmm = Rvmm::start(&[
        "run",
        "--restore",
        &format!("source_url=file://{}", snap.display()),
        "--serial",
        serial,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    wait_for_socket(socket, API_TIMEOUT);
    // The API answers while the restore is still under way (vm.info: 404 until the VM exists).
    let restoring = std::time::Instant::now();
    while call(socket, "GET", "/api/v1/vm.info", None).status == 404 {
        assert!(
            restoring.elapsed() < API_TIMEOUT,
            "the restore never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(state(socket), "Paused");
    vmm
}

/// Migrates the VM behind the API socket `src` to the fresh rvmm behind `dst` over `url`: the
/// receiver is asked first (its answer comes once the VM runs there), then the sender, which
/// waits (up to 10 s) for the receiver to listen. Both must answer 204.
pub fn migrate(src: &Path, dst: &Path, url: &str) {
    let receive = {
        let (socket, body) = (dst.to_owned(), format!(r#"{{"receiver_url": "{url}"}}"#));
        std::thread::spawn(move || {
            call(&socket, "PUT", "/api/v1/vm.receive-migration", Some(&body))
        })
    };
    put(
        src,
        "vm.send-migration",
        Some(&format!(r#"{{"destination_url": "{url}"}}"#)),
    );
    let received = receive.join().unwrap();
    assert_eq!(received.status, 204, "{}", received.body);
}
