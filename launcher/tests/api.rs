//! The control API over its real unix socket: every endpoint, every state transition and the
//! wrong-state 405s, bad bodies, awkward clients, events, and the Prometheus scrape.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::{
    ChAnswer, call, ch_api_client, free_port, get_tcp, parse, parse_exposition, sample,
    wait_for_socket,
};
use common::process::{Rvmm, TestDir, wait_for_text};
use common::{kvm_available, tiny_guest};
use serde_json::{Value, json};

/// The PUT endpoints that act on a VM: 404 before `vm.create`.
const VM_ACTIONS: [&str; 7] = [
    "vm.boot",
    "vm.pause",
    "vm.resume",
    "vm.shutdown",
    "vm.reboot",
    "vm.power-button",
    "vm.delete",
];

/// Those that need a booted VM: 405 when it is created or shut down.
const RUNNING_VM_ACTIONS: [&str; 5] = [
    "vm.pause",
    "vm.resume",
    "vm.shutdown",
    "vm.reboot",
    "vm.power-button",
];

fn state(socket: &Path) -> String {
    let info = call(socket, "GET", "/api/v1/vm.info", None);
    assert_eq!(info.status, 200, "{}", info.body);
    info.json()["state"].as_str().unwrap().to_string()
}

fn put(socket: &Path, endpoint: &str) -> u16 {
    call(socket, "PUT", &format!("/api/v1/{endpoint}"), None).status
}

fn events(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert!(v["timestamp"].as_f64().unwrap() > 1.6e9, "{l}");
            v["event"].as_str().unwrap().to_string()
        })
        .collect()
}

/// `rvmm run` with only the API socket and an event monitor in `dir`, once it listens.
fn start_api_only(dir: &TestDir) -> (Rvmm, PathBuf, PathBuf) {
    let socket = dir.path("api.sock");
    let event_file = dir.path("events.jsonl");
    let vmm = Rvmm::start(&[
        "run",
        "--api-socket",
        socket.to_str().unwrap(),
        "--event-monitor",
        &format!("path={}", event_file.display()),
    ]);
    wait_for_socket(&socket, Duration::from_secs(10));
    (vmm, socket, event_file)
}

#[test]
fn kvm_api_drives_a_vm_through_every_endpoint_and_state() {
    if !kvm_available("API lifecycle") {
        return;
    }
    let dir = TestDir::new("api-lifecycle");
    let serial = dir.path("serial.log");
    let (mut vmm, socket, event_file) = start_api_only(&dir);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let ping = call(&socket, "GET", "/api/v1/vmm.ping", None);
    assert_eq!(ping.status, 200);
    assert_eq!(ping.json()["pid"], vmm.0.id());
    assert!(ping.json()["version"].is_string());

    // No VM yet: 404 for everything VM-level.
    assert_eq!(call(&socket, "GET", "/api/v1/vm.info", None).status, 404);
    assert_eq!(
        call(&socket, "GET", "/api/v1/vm.counters", None).status,
        404
    );
    for endpoint in VM_ACTIONS {
        assert_eq!(put(&socket, endpoint), 404, "{endpoint} without a VM");
    }

    // Bad bodies: 400 naming the problem, nothing created.
    let missing = call(&socket, "PUT", "/api/v1/vm.create", None);
    assert_eq!(missing.status, 400);
    let malformed = call(&socket, "PUT", "/api/v1/vm.create", Some("{\"cpus\": "));
    assert_eq!(malformed.status, 400);
    let unknown = call(
        &socket,
        "PUT",
        "/api/v1/vm.create",
        Some(r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "turbo": true}}"#),
    );
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.json()["error"].as_str().unwrap().contains("cpus"),
        "{}",
        unknown.body
    );
    let no_kernel = call(
        &socket,
        "PUT",
        "/api/v1/vm.create",
        Some(r#"{"payload": {"kernel": "/nonexistent/vmlinux"}}"#),
    );
    assert_eq!(no_kernel.status, 400);
    let error = no_kernel.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("payload.kernel") && error.contains("/nonexistent/vmlinux"),
        "{error}"
    );
    assert_eq!(call(&socket, "GET", "/api/v1/vm.info", None).status, 404);

    let config = json!({
        "cpus": {"boot_vcpus": 1},
        "memory": {"size": 64 << 20},
        "payload": {"kernel": tiny_guest("ticker")},
        "serial": {"mode": "File", "file": serial},
    })
    .to_string();
    assert_eq!(
        call(&socket, "PUT", "/api/v1/vm.create", Some(&config)).status,
        204
    );
    assert_eq!(
        call(&socket, "PUT", "/api/v1/vm.create", Some(&config)).status,
        405
    );
    let info = call(&socket, "GET", "/api/v1/vm.info", None).json();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["memory"]["size"], 64 << 20);
    for endpoint in RUNNING_VM_ACTIONS {
        assert_eq!(put(&socket, endpoint), 405, "{endpoint} when Created");
    }

    assert_eq!(put(&socket, "vm.boot"), 204);
    assert_eq!(state(&socket), "Running");
    assert_eq!(put(&socket, "vm.boot"), 405);
    assert_eq!(put(&socket, "vm.resume"), 405);
    wait_for_text(&serial, "tick: 3\n", 1);

    assert_eq!(put(&socket, "vm.pause"), 204);
    assert_eq!(state(&socket), "Paused");
    assert_eq!(put(&socket, "vm.pause"), 405);
    assert_eq!(put(&socket, "vm.power-button"), 405);
    let frozen = std::fs::read_to_string(&serial).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_to_string(&serial).unwrap(),
        frozen,
        "output while paused"
    );
    assert_eq!(put(&socket, "vm.resume"), 204);
    assert_eq!(state(&socket), "Running");

    let counters = call(&socket, "GET", "/api/v1/vm.counters", None);
    assert_eq!(counters.status, 200);
    assert!(counters.json().is_object(), "{}", counters.body);
    // The ticker ignores Ctrl-Alt-Del; the press itself is accepted.
    assert_eq!(put(&socket, "vm.power-button"), 204);

    // Reboot: a fresh guest starts counting again.
    assert_eq!(put(&socket, "vm.reboot"), 204);
    assert_eq!(state(&socket), "Running");
    wait_for_text(&serial, "tick: 0\n", 2);

    assert_eq!(put(&socket, "vm.shutdown"), 204);
    assert_eq!(state(&socket), "Shutdown");
    for endpoint in RUNNING_VM_ACTIONS {
        assert_eq!(put(&socket, endpoint), 405, "{endpoint} when Shutdown");
    }
    assert_eq!(
        call(&socket, "GET", "/api/v1/vm.counters", None).status,
        405
    );
    // A shut-down VM boots again.
    assert_eq!(put(&socket, "vm.boot"), 204);
    wait_for_text(&serial, "tick: 0\n", 3);
    assert_eq!(put(&socket, "vm.delete"), 204);
    assert_eq!(call(&socket, "GET", "/api/v1/vm.info", None).status, 404);

    // Methods and paths.
    let wrong = call(&socket, "GET", "/api/v1/vm.boot", None);
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("PUT"));
    assert_eq!(call(&socket, "PUT", "/api/v1/vmm.ping", None).status, 405);
    assert_eq!(call(&socket, "GET", "/api/v1/vm.nothing", None).status, 404);
    assert_eq!(call(&socket, "GET", "/nothing", None).status, 404);

    assert_eq!(put(&socket, "vmm.shutdown"), 204);
    assert_eq!(vmm.wait(Duration::from_secs(30)), Some(0));
    assert!(!socket.exists(), "the API socket is removed on exit");
    assert_eq!(
        events(&event_file),
        [
            "vm.booted",
            "vm.paused",
            "vm.resumed",
            "vm.rebooted",
            "vm.shutdown",
            "vm.booted",
            "vm.shutdown",
            "vmm.shutdown"
        ]
    );
}

#[test]
fn kvm_api_booted_guest_that_resets_ends_the_vmm_with_exit_0() {
    if !kvm_available("API guest reset") {
        return;
    }
    let dir = TestDir::new("api-reset");
    let (mut vmm, socket, event_file) = start_api_only(&dir);
    let config = json!({
        "memory": {"size": 64 << 20},
        "payload": {"kernel": tiny_guest("hello")},
        "serial": {"mode": "Null"},
    })
    .to_string();
    assert_eq!(
        call(&socket, "PUT", "/api/v1/vm.create", Some(&config)).status,
        204
    );
    assert_eq!(put(&socket, "vm.boot"), 204);
    assert_eq!(vmm.wait(Duration::from_secs(60)), Some(0));
    assert_eq!(
        events(&event_file),
        ["vm.booted", "vm.shutdown", "vmm.shutdown"]
    );
}

#[test]
fn api_survives_slow_half_closed_oversized_and_malformed_clients() {
    let dir = TestDir::new("api-clients");
    let socket = dir.path("api.sock");
    let mut vmm = Rvmm::start(&["run", "--api-socket", socket.to_str().unwrap()]);
    wait_for_socket(&socket, Duration::from_secs(10));

    // A client that sends half a request line and stalls, and one that never sends anything.
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.write_all(b"GET /api/v1/vmm.pi").unwrap();
    let _silent = UnixStream::connect(&socket).unwrap();
    // A body that promises more than it sends.
    let mut short_body = UnixStream::connect(&socket).unwrap();
    short_body
        .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"cpus\"")
        .unwrap();

    let start = Instant::now();
    let ping = call(&socket, "GET", "/api/v1/vmm.ping", None);
    assert_eq!(ping.status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    // Half-closed: the request, then shutdown(SHUT_WR); the answer still comes.
    let mut half = UnixStream::connect(&socket).unwrap();
    half.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = Vec::new();
    half.read_to_end(&mut raw).unwrap();
    assert_eq!(parse(&raw).status, 200);

    // Oversized: refused by its Content-Length, before the body is read.
    let mut big = UnixStream::connect(&socket).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = vec![b' '; 1 << 20];
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    big.write_all(head.as_bytes()).unwrap();
    let _ = big.write_all(&body);
    let mut raw = Vec::new();
    let _ = big.read_to_end(&mut raw);
    let answer = parse(&raw);
    assert_eq!(answer.status, 413, "{}", answer.body);

    // Garbage instead of HTTP.
    let mut garbage = UnixStream::connect(&socket).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    garbage.write_all(b"\x00\x01\x02 not http\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = garbage.read_to_end(&mut raw);
    assert!(
        raw.is_empty() || parse(&raw).status == 400,
        "{:?}",
        String::from_utf8_lossy(&raw)
    );

    // Not JSON, and JSON of the wrong shape.
    assert_eq!(
        call(&socket, "PUT", "/api/v1/vm.create", Some("not json")).status,
        400
    );
    let shape = call(
        &socket,
        "PUT",
        "/api/v1/vm.create",
        Some(r#"{"payload": {"kernel": 7}}"#),
    );
    assert_eq!(shape.status, 400);
    assert!(shape.body.contains("payload.kernel"), "{}", shape.body);

    // Still serving, then SIGTERM with no VM ends the VMM at once.
    assert_eq!(call(&socket, "GET", "/api/v1/vmm.ping", None).status, 200);
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.wait(Duration::from_secs(10)), Some(0));
    assert!(!socket.exists());
    drop(slow);
}

#[test]
fn answers_read_by_cloud_hypervisor_api_client_carry_their_status_and_body() {
    let dir = TestDir::new("ch-client");
    let socket = dir.path("api.sock");
    let mut vmm = Rvmm::start(&["run", "--api-socket", socket.to_str().unwrap()]);
    wait_for_socket(&socket, Duration::from_secs(10));

    let ping = ch_api_client(&socket, "GET", "vmm.ping", None);
    assert_eq!(ping.status, 200);
    let body: Value = serde_json::from_str(ping.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["pid"], vmm.0.id());
    // A 404 and a 405 (wrong method) with their JSON error bodies.
    let missing = ch_api_client(&socket, "GET", "vm.info", None);
    assert_eq!(missing.status, 404);
    assert!(missing.body.unwrap().contains("No VM has been created"));
    assert_eq!(ch_api_client(&socket, "PUT", "vmm.ping", None).status, 405);
    // 204: no body, and the client does not wait for one.
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, b"not booted here").unwrap();
    let config = json!({"payload": {"kernel": kernel}}).to_string();
    assert_eq!(
        ch_api_client(&socket, "PUT", "vm.create", Some(&config)),
        ChAnswer {
            status: 204,
            body: None
        }
    );
    let info = ch_api_client(&socket, "GET", "vm.info", None);
    assert_eq!(info.status, 200);
    let info: Value = serde_json::from_str(&info.body.unwrap()).unwrap();
    assert_eq!(info["state"], "Created");
    // The raw status line is Cloud Hypervisor's: no reason phrase.
    let raw = {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        String::from_utf8(raw).unwrap()
    };
    assert!(raw.starts_with("HTTP/1.1 200 \r\n"), "{raw:?}");
    assert!(raw.contains("\r\nContent-Length: "), "{raw:?}");
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.wait(Duration::from_secs(10)), Some(0));
}

/// A 1 MiB disk image of zeros.
fn zero_disk(path: &Path) {
    std::fs::write(path, vec![0u8; 1 << 20]).unwrap();
}

#[test]
fn kvm_metrics_scrape_moves_with_guest_io_and_sigterm_leaves_the_last_write_on_disk() {
    if !kvm_available("metrics and SIGTERM") {
        return;
    }
    let dir = TestDir::new("api-metrics");
    let socket = dir.path("api.sock");
    let serial = dir.path("serial.log");
    let disk = dir.path("disk.img");
    zero_disk(&disk);
    let addr = format!("127.0.0.1:{}", free_port());
    let kernel = tiny_guest("virtio-blk");
    let mut vmm = Rvmm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        // The tiny guest has no ACPI: it finds the device on the command line.
        "--acpi=false",
        "--cmdline",
        "rvmm.hold=1",
        "--disk",
        &format!("path={},id=data", disk.display()),
        "--serial",
        &format!("file={}", serial.display()),
        "--api-socket",
        socket.to_str().unwrap(),
        "--metrics-addr",
        &addr,
        "--grace-period-seconds",
        "1",
    ]);
    wait_for_socket(&socket, Duration::from_secs(10));
    wait_for_text(&serial, "virtio-blk: tick 1\n", 1);
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("virtio-blk: write status 0"), "{text}");

    let scrape = get_tcp(&addr, "/metrics");
    assert_eq!(scrape.status, 200);
    assert!(
        scrape
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let first = parse_exposition(&scrape.body);
    let writes = sample(&first, "rvmm_disk_writes_total", ("disk", "data")).unwrap();
    let reads = sample(&first, "rvmm_disk_reads_total", ("disk", "data")).unwrap();
    assert!(writes >= 1.0 && reads >= 1.0, "{}", scrape.body);
    assert_eq!(
        sample(&first, "rvmm_vm_state", ("state", "Running")),
        Some(1.0),
        "{}",
        scrape.body
    );
    assert_eq!(
        sample(&first, "rvmm_guest_memory_bytes", ("", "")),
        Some((64u64 << 20) as f64)
    );
    let io_out = sample(&first, "rvmm_vcpu_exits_total", ("reason", "io_out")).unwrap();
    assert!(io_out > 0.0);

    // The guest keeps printing: its port writes keep counting. Same scrape on the API socket.
    wait_for_text(&serial, "virtio-blk: tick 3\n", 1);
    let again = call(&socket, "GET", "/metrics", None);
    assert_eq!(again.status, 200);
    let second = parse_exposition(&again.body);
    let later = sample(&second, "rvmm_vcpu_exits_total", ("reason", "io_out")).unwrap();
    assert!(later > io_out, "io_out exits {io_out} -> {later}");
    assert_eq!(
        get_tcp(&addr, "/api/v1/vm.info").status,
        404,
        "TCP serves metrics only"
    );
    let counters = call(&socket, "GET", "/api/v1/vm.counters", None).json();
    assert!(
        counters["data"]["write_bytes"].as_u64().unwrap() >= 512,
        "{counters}"
    );

    // SIGTERM: the tiny guest ignores Ctrl-Alt-Del, so the grace period ends it; the write it
    // made (never flushed by the guest) is in the file when rvmm has exited.
    vmm.signal(libc::SIGTERM);
    assert_eq!(vmm.wait(Duration::from_secs(30)), Some(0));
    let bytes = std::fs::read(&disk).unwrap();
    assert_eq!(&bytes[512..528], b"rvmm-tiny-write!", "{}", vmm.stderr());
    assert!(!socket.exists());
}

/// Sends `head` (and nothing else) on a new connection and reads the answer.
fn raw_exchange(socket: &Path, head: &[u8]) -> (common::http::Answer, Duration) {
    let start = Instant::now();
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(head);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    (parse(&raw), start.elapsed())
}

#[test]
fn api_answers_a_megabyte_header_with_431_and_an_oversized_length_with_413_at_once() {
    let dir = TestDir::new("big-requests");
    let socket = dir.path("api.sock");
    let mut vmm = Rvmm::start(&["run", "--api-socket", socket.to_str().unwrap()]);
    wait_for_socket(&socket, Duration::from_secs(10));
    // Several times: glibc trims a heap only once it has grown and shrunk.
    for _ in 0..5 {
        let head = format!(
            "GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(1 << 20)
        );
        let (answer, _) = raw_exchange(&socket, head.as_bytes());
        assert_eq!(answer.status, 431, "{}", answer.body);
    }
    // A length over the 64 KiB limit and no body: refused before the body timeout.
    let head = b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n";
    let (answer, took) = raw_exchange(&socket, head);
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(call(&socket, "GET", "/api/v1/vmm.ping", None).status, 200);
    vmm.signal(libc::SIGTERM);
    assert_eq!(
        vmm.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        vmm.stderr()
    );
}

#[test]
fn sighup_ends_rvmm_like_sigterm_and_sigusr1_is_ignored_and_a_stale_socket_is_replaced() {
    let dir = TestDir::new("signals");
    let socket = dir.path("api.sock");
    // A socket left by a killed run: replaced, and said so.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut vmm = Rvmm::start(&["run", "--api-socket", socket.to_str().unwrap()]);
    wait_for_socket(&socket, Duration::from_secs(10));
    for ignored in [libc::SIGUSR1, libc::SIGUSR2] {
        vmm.signal(ignored);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(call(&socket, "GET", "/api/v1/vmm.ping", None).status, 200);
    vmm.signal(libc::SIGHUP);
    assert_eq!(vmm.wait(Duration::from_secs(10)), Some(0));
    assert!(!socket.exists(), "the socket is removed on SIGHUP");
    let stderr = vmm.stderr();
    assert!(
        stderr.contains(&format!("replacing the stale socket {}", socket.display())),
        "{stderr}"
    );
}

#[test]
fn kvm_a_reboot_that_cannot_open_its_disk_keeps_the_vm_or_ends_it_with_a_reason() {
    if !kvm_available("failed reboot") {
        return;
    }
    let dir = TestDir::new("reboot-fail");
    let (mut vmm, socket, event_file) = start_api_only(&dir);
    let disk = dir.path("disk.img");
    zero_disk(&disk);
    let config = json!({
        "payload": {"kernel": tiny_guest("ticker")},
        "memory": {"size": 64 << 20},
        "disks": [{"path": disk}],
        "serial": {"mode": "Off"},
    });
    let created = call(
        &socket,
        "PUT",
        "/api/v1/vm.create",
        Some(&config.to_string()),
    );
    assert_eq!(created.status, 204, "{}", created.body);
    assert_eq!(put(&socket, "vm.boot"), 204);

    // The disk is gone: the reboot is refused and the VM keeps running.
    std::fs::rename(&disk, dir.path("moved.img")).unwrap();
    let refused = call(&socket, "PUT", "/api/v1/vm.reboot", None);
    assert_eq!(refused.status, 500, "{}", refused.body);
    assert_eq!(
        refused.json()["error"],
        format!(
            "Cannot reboot: the VM keeps running: Cannot open the disk 0 {}: No such file or \
             directory (os error 2)",
            disk.display()
        )
    );
    assert_eq!(state(&socket), "Running");

    // It opens, but is no disk (a FIFO has no size): the old VM is stopped by then, so it
    // ends in Shutdown, with the reason in the event, and can boot again.
    let fifo = std::process::Command::new("mkfifo")
        .arg(&disk)
        .status()
        .unwrap();
    assert!(fifo.success());
    let failed = call(&socket, "PUT", "/api/v1/vm.reboot", None);
    assert_eq!(failed.status, 500, "{}", failed.body);
    let error = failed.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with("The VM stopped for a reboot and cannot boot again (state Shutdown)"),
        "{error}"
    );
    assert_eq!(state(&socket), "Shutdown");
    let text = wait_for_text(&event_file, "cannot boot again", 1);
    assert!(text.contains("\"event\":\"vm.shutdown\""), "{text}");
    std::fs::remove_file(&disk).unwrap();
    std::fs::rename(dir.path("moved.img"), &disk).unwrap();
    assert_eq!(put(&socket, "vm.boot"), 204);
    assert_eq!(state(&socket), "Running");
    assert_eq!(put(&socket, "vmm.shutdown"), 204);
    assert_eq!(
        vmm.wait(Duration::from_secs(30)),
        Some(0),
        "{}",
        vmm.stderr()
    );
}
