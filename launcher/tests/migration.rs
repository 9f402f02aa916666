//! KVM tests of live migration between two rvmm processes on this host, through Cloud
//! Hypervisor's API: the `memtest` guest (which checks every page of its area on every pass)
//! moves over a unix socket and over TCP on loopback while it writes memory, the source exits
//! 0 and the guest goes on at the destination; a migration the receiver drops half way leaves
//! the source running; while a migration waits on a stalled receiver, the source's API still
//! answers its queries and refuses a second migration.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use common::http::{call, free_port, wait_for_socket};
use common::memtest::{
    API_TIMEOUT, events_named, memtest_running, migrate, passes, put, start_memtest, state,
};
use common::process::{Rvmm, TestDir, wait_for_text};
use common::{assert_threads_confined, kvm_available};

/// A fresh `rvmm run --api-socket` to receive, its console in `dst.log`.
fn start_receiver(dir: &TestDir) -> Rvmm {
    let socket = dir.path("dst.sock");
    let vmm = Rvmm::start(&[
        "run",
        "--api-socket",
        socket.to_str().unwrap(),
        "--serial",
        &format!("file={}", dir.path("dst.log").display()),
        "--event-monitor",
        &format!("path={}", dir.path("dst-events.jsonl").display()),
    ]);
    wait_for_socket(&socket, API_TIMEOUT);
    vmm
}

fn migrate_and_check(dir: &TestDir, receiver_url: &str) {
    let src_socket = dir.path("api.sock");
    let dst_socket = dir.path("dst.sock");
    let mut source = start_memtest(dir, "2", 16);
    let mut destination = start_receiver(dir);
    wait_for_text(&dir.path("serial.log"), " ok\n", 2);
    migrate(&src_socket, &dst_socket, receiver_url);
    assert_eq!(source.wait(API_TIMEOUT), Some(0), "source exit");
    let before = passes(&std::fs::read_to_string(dir.path("serial.log")).unwrap());
    assert_eq!(state(&dst_socket), "Running");
    // The received VM's threads (started on vmm-control, as a boot's) are filtered.
    assert_threads_confined(
        destination.0.id(),
        true,
        &["vcpu0"],
        "vmm-control",
        &["vm-restart"],
    );
    let text = wait_for_text(&dir.path("dst.log"), " ok\n", 3);
    let after = passes(&text);
    assert_eq!(
        after[0],
        before.last().unwrap() + 1,
        "the guest did not go on where it was: {text}"
    );
    assert!(!text.contains("start"), "{text}");
    let migrated = events_named(&dir.path("events.jsonl"), "vm.migrated");
    let stats = &migrated[0]["properties"];
    let downtime = stats["downtime_ms"].as_f64().unwrap();
    let total = stats["total_ms"].as_f64().unwrap();
    assert!(downtime > 0.0 && downtime < total, "{stats}");
    assert!(
        stats["memory_bytes"].as_u64().unwrap() >= 16 << 20,
        "{stats}"
    );
    println!("migration {receiver_url}: {stats}");
    assert_eq!(
        events_named(&dir.path("dst-events.jsonl"), "vm.migration-received").len(),
        1
    );
    put(&dst_socket, "vmm.shutdown", None);
    assert_eq!(destination.wait(API_TIMEOUT), Some(0));
}

#[test]
fn kvm_live_migration_over_a_unix_socket_moves_the_writing_guest_with_its_memory_intact() {
    if !kvm_available("migration over unix") {
        return;
    }
    let dir = TestDir::new("migrate-unix");
    let url = format!("unix:{}", dir.path("migration.sock").display());
    migrate_and_check(&dir, &url);
}

#[test]
fn kvm_live_migration_over_tcp_on_loopback_moves_the_writing_guest() {
    if !kvm_available("migration over tcp") {
        return;
    }
    let dir = TestDir::new("migrate-tcp");
    migrate_and_check(&dir, &format!("tcp:127.0.0.1:{}", free_port()));
}

/// Reads one request of rvmm's migration protocol: (command, payload length).
fn read_request(stream: &mut impl Read) -> (u16, u64) {
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head[..4], b"RVMG");
    (
        u16::from_le_bytes([head[4], head[5]]),
        u64::from_le_bytes(head[8..16].try_into().unwrap()),
    )
}

fn answer_ok(stream: &mut impl Write) {
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(b"RVMA");
    head[4] = 1;
    stream.write_all(&head).unwrap();
}

#[test]
fn kvm_migration_the_receiver_drops_half_way_leaves_the_source_running() {
    if !kvm_available("abandoned migration") {
        return;
    }
    let (dir, socket, _source) = memtest_running("migrate-abandoned");
    // A receiver that takes Start, Config and part of the memory, then goes away.
    let listener = UnixListener::bind(dir.path("migration.sock")).unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        for expected in [1u16, 2] {
            let (command, len) = read_request(&mut stream);
            assert_eq!(command, expected);
            let mut payload = vec![0u8; len as usize];
            stream.read_exact(&mut payload).unwrap();
            answer_ok(&mut stream);
        }
        let (command, _) = read_request(&mut stream);
        assert_eq!(command, 3, "memory");
        let mut some = [0u8; 4096];
        stream.read_exact(&mut some).unwrap();
    });
    let body = format!(
        r#"{{"destination_url": "unix:{}"}}"#,
        dir.path("migration.sock").display()
    );
    let answer = call(&socket, "PUT", "/api/v1/vm.send-migration", Some(&body));
    receiver.join().unwrap();
    assert_eq!(answer.status, 500, "{}", answer.body);
    assert!(
        answer.body.contains("Live migration failed"),
        "{}",
        answer.body
    );
    assert_eq!(state(&socket), "Running");
    let seen = passes(&std::fs::read_to_string(dir.path("serial.log")).unwrap()).len();
    wait_for_text(&dir.path("serial.log"), " ok\n", seen + 2);
    let failed = events_named(&dir.path("events.jsonl"), "vm.migration-failed");
    assert_eq!(failed[0]["properties"]["status"], "failed", "{failed:?}");
    let metrics = call(&socket, "GET", "/metrics", None).body;
    assert!(
        metrics.contains("rvmm_migration_rounds{status=\"failed\"}"),
        "{metrics}"
    );
}

#[test]
fn kvm_queries_answer_while_a_migration_waits_on_a_stalled_receiver() {
    if !kvm_available("queries during a migration") {
        return;
    }
    let (dir, socket, _source) = memtest_running("migrate-stalled");
    // A receiver that reads Start and then says nothing until the test is done asking.
    let listener = UnixListener::bind(dir.path("migration.sock")).unwrap();
    let (started, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let (started_tx, started_rx) = started;
    let (release_tx, release_rx) = release;
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let (command, len) = read_request(&mut stream);
        assert_eq!(command, 1, "start");
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).unwrap();
        started_tx.send(()).unwrap();
        let _ = release_rx.recv();
    });
    let body = format!(
        r#"{{"destination_url": "unix:{}"}}"#,
        dir.path("migration.sock").display()
    );
    let sender = {
        let (socket, body) = (socket.clone(), body.clone());
        std::thread::spawn(move || call(&socket, "PUT", "/api/v1/vm.send-migration", Some(&body)))
    };
    started_rx.recv().unwrap();
    // Each of these would wait for the migration's end (the client's 60 s read timeout
    // fails the test) if it queued behind the migration.
    let ping = call(&socket, "GET", "/api/v1/vmm.ping", None);
    assert_eq!(ping.status, 200, "{}", ping.body);
    assert_eq!(state(&socket), "Running");
    let counters = call(&socket, "GET", "/api/v1/vm.counters", None);
    assert_eq!(counters.status, 200, "{}", counters.body);
    let metrics = call(&socket, "GET", "/metrics", None).body;
    assert!(
        metrics.contains("rvmm_migration_rounds{status=\"running\"}"),
        "{metrics}"
    );
    release_tx.send(()).unwrap();
    receiver.join().unwrap();
    let answer = sender.join().unwrap();
    assert_eq!(answer.status, 500, "{}", answer.body);
    assert_eq!(state(&socket), "Running");
}
