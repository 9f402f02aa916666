//! KVM tests of live migration between two rvmm processes on this host, through Cloud
//! Hypervisor's API: the `memtest` guest (which checks every page of its area on every pass)
//! moves over a unix socket and over TCP on loopback while it writes memory, the source exits
//! 0 and the guest goes on at the destination; a migration the receiver drops half way leaves
//! the source running; while a migration waits on a stalled receiver, the source's API still
//! answers its queries and refuses a second migration. A VM with a writable disk hands the
//! disk's image lock to the destination (the same file, as on shared storage), and takes it
//! back when the migration fails, or stays paused while someone else (a QEMU VM, standing in
//! for a receiver that runs the VM) holds it.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use common::http::{call, free_port, wait_for_socket};
use common::memtest::{
    API_TIMEOUT, events_named, memtest_running, migrate, passes, put, restore_paused,
    start_memtest, start_memtest_with, state,
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

/// A VM restored from a snapshot runs on memory mapped from the snapshot's file; its dirty
/// pages (the vCPUs' in KVM's log, the devices' in the memory's bitmap) must be seen as a booted
/// VM's are. Before, that memory had an empty bitmap, KVM's log was merged into nothing, the
/// first round was the only one, and memtest found the pages it wrote meanwhile stale.
#[test]
fn kvm_live_migration_of_a_restored_vm_moves_the_memory_it_writes_intact() {
    if !kvm_available("migration of a restored VM") {
        return;
    }
    let dir = TestDir::new("migrate-restored");
    let booted = start_memtest(&dir, "1", 16);
    let first = dir.path("api.sock");
    wait_for_text(&dir.path("serial.log"), " ok\n", 1);
    put(&first, "vm.pause", None);
    let snap = dir.path("snap");
    let body = format!(r#"{{"destination_url": "file://{}"}}"#, snap.display());
    put(&first, "vm.snapshot", Some(&body));
    put(&first, "vmm.shutdown", None);
    let mut booted = booted;
    assert_eq!(booted.wait(API_TIMEOUT), Some(0));

    let source_socket = dir.path("restored.sock");
    let serial = format!("file={}", dir.path("restored.log").display());
    let mut source = restore_paused(&snap, &serial, &source_socket);
    put(&source_socket, "vm.resume", None);
    wait_for_text(&dir.path("restored.log"), " ok\n", 2);
    let mut destination = start_receiver(&dir);
    let url = format!("unix:{}", dir.path("migration.sock").display());
    migrate(&source_socket, &dir.path("dst.sock"), &url);
    assert_eq!(source.wait(API_TIMEOUT), Some(0), "source exit");
    let text = wait_for_text(&dir.path("dst.log"), " ok\n", 3);
    assert!(
        !text.contains("CORRUPT") && !text.contains(" bad"),
        "memory changed in the migration: {text}"
    );
    put(&dir.path("dst.sock"), "vmm.shutdown", None);
    assert_eq!(destination.wait(API_TIMEOUT), Some(0));
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

/// `qemu-io` writing a sector of the raw image at `disk`: QEMU's own image locks decide
/// whether it may (rvmm takes the same ones). Returns what it printed when it was refused.
fn qemu_io_write(disk: &std::path::Path) -> Result<(), String> {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(disk)
        .output()
        .expect("qemu-io (Debian's qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !text.contains("lock") {
        Ok(())
    } else {
        Err(text)
    }
}

/// A 16 MiB raw disk in `dir`, and the `--disk` argument for it.
fn writable_disk(dir: &TestDir) -> (std::path::PathBuf, String) {
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let arg = format!("path={}", disk.display());
    (disk, arg)
}

#[test]
fn kvm_live_migration_hands_a_writable_disk_over_to_the_destination() {
    if !kvm_available("migration with a disk") {
        return;
    }
    let dir = TestDir::new("migrate-disk");
    let (disk, disk_arg) = writable_disk(&dir);
    let mut source = start_memtest_with(&dir, "1", 4, &["--disk", &disk_arg]);
    let mut destination = start_receiver(&dir);
    wait_for_text(&dir.path("serial.log"), " ok\n", 1);
    let refused = qemu_io_write(&disk).expect_err("the source holds the disk");
    assert!(refused.contains("lock"), "{refused}");

    let url = format!("unix:{}", dir.path("migration.sock").display());
    migrate(&dir.path("api.sock"), &dir.path("dst.sock"), &url);
    assert_eq!(source.wait(API_TIMEOUT), Some(0), "source exit");
    let dst_socket = dir.path("dst.sock");
    assert_eq!(state(&dst_socket), "Running");
    wait_for_text(&dir.path("dst.log"), " ok\n", 2);
    // The destination holds the disk now, as the source did.
    let refused = qemu_io_write(&disk).expect_err("the destination holds the disk");
    assert!(refused.contains("lock"), "{refused}");
    put(&dst_socket, "vmm.shutdown", None);
    assert_eq!(destination.wait(API_TIMEOUT), Some(0));
    qemu_io_write(&disk).expect("the disk is free once the VM is gone");
}

/// The protocol's State and Complete commands.
const STATE: u16 = 4;
const COMPLETE: u16 = 5;

/// A receiver that answers every request until `last`, then goes away without answering it;
/// `at_last` runs first.
fn receiver_dropping_at(
    last: u16,
    listener: UnixListener,
    at_last: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        loop {
            let (command, len) = read_request(&mut stream);
            let mut payload = vec![0u8; usize::try_from(len).unwrap()];
            stream.read_exact(&mut payload).unwrap();
            if command == last {
                at_last();
                return;
            }
            answer_ok(&mut stream);
        }
    })
}

#[test]
fn kvm_a_failed_migration_takes_the_disk_back_or_stays_paused_while_another_holds_it() {
    if !kvm_available("failed migration with a disk") {
        return;
    }
    let dir = TestDir::new("migrate-disk-back");
    let (disk, disk_arg) = writable_disk(&dir);
    let _source = start_memtest_with(&dir, "1", 4, &["--disk", &disk_arg]);
    let socket = dir.path("api.sock");
    wait_for_text(&dir.path("serial.log"), " ok\n", 1);
    let sock_path = dir.path("migration.sock");
    let body = format!(r#"{{"destination_url": "unix:{}"}}"#, sock_path.display());

    // The receiver goes away at State, after the source let go of the disk: it takes the
    // disk back and runs on.
    let receiver = receiver_dropping_at(STATE, UnixListener::bind(&sock_path).unwrap(), || {});
    let answer = call(&socket, "PUT", "/api/v1/vm.send-migration", Some(&body));
    receiver.join().unwrap();
    assert_eq!(answer.status, 500, "{}", answer.body);
    assert_eq!(state(&socket), "Running");
    let seen = passes(&std::fs::read_to_string(dir.path("serial.log")).unwrap()).len();
    wait_for_text(&dir.path("serial.log"), " ok\n", seen + 1);
    let refused = qemu_io_write(&disk).expect_err("the source has the disk again");
    assert!(refused.contains("lock"), "{refused}");

    // This time a QEMU VM takes the disk while it is free (standing in for a receiver that
    // runs the VM): the source must not run on it, and stays paused until the disk is free.
    std::fs::remove_file(&sock_path).unwrap();
    let (holder_tx, holder_rx) = std::sync::mpsc::channel();
    let disk_for_holder = disk.clone();
    let receiver =
        receiver_dropping_at(STATE, UnixListener::bind(&sock_path).unwrap(), move || {
            let holder = std::process::Command::new("qemu-system-x86_64")
                .args(["-S", "-nodefaults", "-display", "none", "-drive"])
                .arg(format!(
                    "file={},format=raw,if=virtio",
                    disk_for_holder.display()
                ))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("qemu-system-x86_64 (Debian's qemu-system-x86)");
            // Until QEMU holds the image, a write of ours would still be allowed (it starts
            // slowly on a loaded machine).
            let start = std::time::Instant::now();
            while qemu_io_write(&disk_for_holder).is_ok() {
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(300),
                    "QEMU never locked the disk"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            holder_tx.send(holder).unwrap();
        });
    let answer = call(&socket, "PUT", "/api/v1/vm.send-migration", Some(&body));
    receiver.join().unwrap();
    let mut holder = holder_rx.recv().unwrap();
    assert_eq!(answer.status, 500, "{}", answer.body);
    assert_eq!(state(&socket), "Paused");
    let refused = call(&socket, "PUT", "/api/v1/vm.resume", None);
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        refused.body.contains("receiver has the disks") && refused.body.contains("in use"),
        "{}",
        refused.body
    );
    assert_eq!(state(&socket), "Paused");

    holder.kill().unwrap();
    holder.wait().unwrap();
    put(&socket, "vm.resume", None);
    assert_eq!(state(&socket), "Running");
    let seen = passes(&std::fs::read_to_string(dir.path("serial.log")).unwrap()).len();
    wait_for_text(&dir.path("serial.log"), " ok\n", seen + 1);
}

/// Once Complete is sent the receiver may be running the VM; when its answer does not come,
/// the source cannot know, so it does not run its copy: it stays paused for whoever manages
/// the VM (as QEMU's source stays in `postmigrate`), and `vm.resume` is theirs to call.
#[test]
fn kvm_a_migration_whose_complete_goes_unanswered_leaves_the_source_paused() {
    if !kvm_available("unanswered Complete") {
        return;
    }
    let (dir, socket, _source) = memtest_running("migrate-unanswered");
    let sock_path = dir.path("migration.sock");
    let receiver = receiver_dropping_at(COMPLETE, UnixListener::bind(&sock_path).unwrap(), || {});
    let body = format!(r#"{{"destination_url": "unix:{}"}}"#, sock_path.display());
    let answer = call(&socket, "PUT", "/api/v1/vm.send-migration", Some(&body));
    receiver.join().unwrap();
    assert_eq!(answer.status, 500, "{}", answer.body);
    assert_eq!(state(&socket), "Paused");
    let seen = passes(&std::fs::read_to_string(dir.path("serial.log")).unwrap()).len();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let now = passes(&std::fs::read_to_string(dir.path("serial.log")).unwrap()).len();
    assert_eq!(now, seen, "the paused source ran on");
    put(&socket, "vm.resume", None);
    assert_eq!(state(&socket), "Running");
    wait_for_text(&dir.path("serial.log"), " ok\n", seen + 1);
}

/// A sender scripted from a snapshot's files (`config.json`, `memory.bin`, `state.bin`) over
/// rvmm's own protocol module, which closes the connection as soon as Complete is sent: the
/// receiver resumes the VM and then cannot answer. The VM runs there all the same (it may be
/// writing its disks already; dropping it would leave them behind an older copy).
#[test]
fn kvm_a_receiver_keeps_the_vm_it_resumed_when_its_answer_to_complete_cannot_be_sent() {
    use rvmm_launcher::vmm::migration::protocol::{
        Command, read_answer, send_request, start_payload, write_header,
    };
    if !kvm_available("unanswerable Complete") {
        return;
    }
    let (dir, socket, mut source) = memtest_running("migrate-receiver-keeps");
    put(&socket, "vm.pause", None);
    let snap = dir.path("snap");
    let body = format!(r#"{{"destination_url": "file://{}"}}"#, snap.display());
    put(&socket, "vm.snapshot", Some(&body));
    put(&socket, "vmm.shutdown", None);
    assert_eq!(source.wait(API_TIMEOUT), Some(0));

    let mut destination = start_receiver(&dir);
    let url = format!("unix:{}", dir.path("migration.sock").display());
    let receive = {
        let (socket, body) = (
            dir.path("dst.sock"),
            format!(r#"{{"receiver_url": "{url}"}}"#),
        );
        std::thread::spawn(move || {
            call(&socket, "PUT", "/api/v1/vm.receive-migration", Some(&body))
        })
    };
    let path = dir.path("migration.sock");
    let start = std::time::Instant::now();
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(stream) => break stream,
            Err(_) if start.elapsed() < API_TIMEOUT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("the receiver never listened: {e}"),
        }
    };
    let mut request = |command: Command, payload: &[u8]| {
        send_request(&mut stream, command, payload).unwrap();
        read_answer(&mut stream, command).unwrap();
    };
    request(Command::Start, &start_payload());
    request(
        Command::Config,
        &std::fs::read(snap.join("config.json")).unwrap(),
    );
    // The memory's non-zero pages (the guest's RAM starts at 0 in one region at this size).
    let memory = std::fs::read(snap.join("memory.bin")).unwrap();
    for (index, chunk) in memory.chunks(1 << 20).enumerate() {
        if chunk.iter().all(|b| *b == 0) {
            continue;
        }
        let mut payload = Vec::with_capacity(24 + chunk.len());
        payload.extend_from_slice(&1u64.to_le_bytes());
        payload.extend_from_slice(&((index as u64) << 20).to_le_bytes());
        payload.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
        payload.extend_from_slice(chunk);
        request(Command::Memory, &payload);
    }
    request(
        Command::State,
        &std::fs::read(snap.join("state.bin")).unwrap(),
    );
    write_header(&mut stream, Command::Complete, 0).unwrap();
    drop(stream);

    let received = receive.join().unwrap();
    assert_eq!(received.status, 204, "{}", received.body);
    let dst_socket = dir.path("dst.sock");
    assert_eq!(state(&dst_socket), "Running");
    let text = wait_for_text(&dir.path("dst.log"), " ok\n", 2);
    assert!(!text.contains("CORRUPT"), "{text}");
    put(&dst_socket, "vmm.shutdown", None);
    assert_eq!(destination.wait(API_TIMEOUT), Some(0));
}
