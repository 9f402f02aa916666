//! KVM tests of snapshots through the real binary: pause, snapshot, kill, `rvmm run --restore`,
//! resume, on the `memtest` tiny guest, which checks every page of its memory area on every
//! pass; a paused VM that writes nothing; snapshots that are corrupt, truncated, of another
//! format version or of another VM, refused with an error that names the problem; serial input
//! that reaches a restored guest through its new console socket (the `echo` tiny guest).

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::http::wait_for_socket;
use common::memtest::{
    API_TIMEOUT, memtest_running, passes, put, restore_paused, start_memtest, state,
};
use common::process::{Rvmm, TestDir, read_until, wait_for_path, wait_for_text};
use common::{assert_threads_confined, kvm_available, tiny_guest};

fn snapshot(socket: &Path, dir: &Path) {
    let body = format!(r#"{{"destination_url": "file://{}"}}"#, dir.display());
    put(socket, "vm.snapshot", Some(&body));
}

/// `rvmm run` with its console in `log` and its API on `socket`, plus `args`; returns once the
/// API socket exists.
fn start_vmm(socket: &Path, log: &Path, args: &[&str]) -> Rvmm {
    let serial = format!("file={}", log.display());
    let mut all = vec![
        "run",
        "--serial",
        &serial,
        "--api-socket",
        socket.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let vmm = Rvmm::start(&all);
    wait_for_socket(socket, API_TIMEOUT);
    vmm
}

#[test]
fn kvm_snapshot_kill_restore_resume_goes_on_where_the_guest_was_with_memory_intact() {
    if !kvm_available("snapshot/restore") {
        return;
    }
    let dir = TestDir::new("snapshot-restore");
    let socket = dir.path("api.sock");
    let mut source = start_memtest(&dir, "2", 4);
    wait_for_text(&dir.path("serial.log"), " ok\n", 3);
    put(&socket, "vm.pause", None);
    let before = std::fs::read_to_string(dir.path("serial.log")).unwrap();
    let last = *passes(&before).last().unwrap();

    // Paused means paused: two snapshots a while apart have the same memory.
    let (first, second) = (dir.path("snap"), dir.path("snap-later"));
    snapshot(&socket, &first);
    std::thread::sleep(Duration::from_millis(500));
    snapshot(&socket, &second);
    let memory = std::fs::read(first.join("memory.bin")).unwrap();
    assert!(
        memory == std::fs::read(second.join("memory.bin")).unwrap(),
        "guest memory changed while paused"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path("serial.log")).unwrap(),
        before
    );
    let meta = std::fs::metadata(first.join("memory.bin")).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 16 << 20,
        "memory file not sparse"
    );
    source.signal(libc::SIGKILL);
    source.wait(API_TIMEOUT);

    let restored_socket = dir.path("restored.sock");
    let restored_log = dir.path("restored.log");
    let serial = format!("file={}", restored_log.display());
    let mut restored = restore_paused(&first, &serial, &restored_socket);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_to_string(&restored_log).unwrap_or_default(),
        ""
    );
    put(&restored_socket, "vm.resume", None);
    let text = wait_for_text(&restored_log, " ok\n", 3);
    let after = passes(&text);
    assert_eq!(after[0], last + 1, "did not go on where it was: {text}");
    assert!(!text.contains("start"), "{text}");
    // The restored VM's threads (started before the main thread filters itself) are filtered.
    assert_threads_confined(
        restored.0.id(),
        true,
        &["vcpu0"],
        "vmm-control",
        &["vm-restart"],
    );
    put(&restored_socket, "vmm.shutdown", None);
    assert_eq!(restored.wait(API_TIMEOUT), Some(0));
}

#[test]
fn kvm_restored_guest_reads_input_from_its_new_console_socket() {
    if !kvm_available("serial input after restore") {
        return;
    }
    let dir = TestDir::new("snapshot-serial");
    let (console, api) = (dir.path("serial.sock"), dir.path("api.sock"));
    let kernel = tiny_guest("echo");
    let mut source = Rvmm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--serial",
        &format!("socket={}", console.display()),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    wait_for_socket(&api, API_TIMEOUT);
    wait_for_path(&console);
    let mut client = UnixStream::connect(&console).unwrap();
    read_until(&mut client, "echo: ready\n");
    client.write_all(b"before the snapshot\n").unwrap();
    read_until(&mut client, "echo: before the snapshot\n");
    put(&api, "vm.pause", None);
    let snap = dir.path("snap");
    snapshot(&api, &snap);
    source.signal(libc::SIGKILL);
    source.wait(API_TIMEOUT);

    let (console2, api2) = (dir.path("restored-serial.sock"), dir.path("restored.sock"));
    let serial = format!("socket={}", console2.display());
    let mut restored = restore_paused(&snap, &serial, &api2);
    let mut client = UnixStream::connect(&console2).unwrap();
    // Typed while the restored guest is paused: held, then read after the resume.
    client.write_all(b"while paused\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    put(&api2, "vm.resume", None);
    let text = read_until(&mut client, "echo: while paused\n");
    assert!(!text.contains("ready"), "the guest started again: {text}");
    client.write_all(b"after the restore\nbye\n").unwrap();
    read_until(&mut client, "echo: after the restore\n");
    assert_eq!(restored.wait(API_TIMEOUT), Some(0), "bye resets the guest");
}

/// Runs `rvmm run --restore` of `snap` and returns its exit code and stderr.
fn restore_fails(snap: &Path) -> (Option<i32>, String) {
    let mut vmm = Rvmm::start(&[
        "run",
        "--restore",
        &format!("source_url=file://{}", snap.display()),
        "--serial",
        "off",
    ]);
    let code = vmm.wait(API_TIMEOUT);
    (code, vmm.stderr())
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["config.json", "state.bin", "memory.bin"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn kvm_corrupt_truncated_foreign_and_mismatched_snapshots_are_refused_by_name() {
    if !kvm_available("bad snapshots") {
        return;
    }
    let (dir, socket, _source) = memtest_running("snapshot-bad");
    put(&socket, "vm.pause", None);
    let good = dir.path("good");
    snapshot(&socket, &good);
    let state = std::fs::read(good.join("state.bin")).unwrap();

    let case = |name: &str, edit: &dyn Fn(&Path), expect: &[&str]| {
        let snap = dir.path(name);
        copy_snapshot(&good, &snap);
        edit(&snap);
        let (code, stderr) = restore_fails(&snap);
        assert_eq!(code, Some(2), "{name}: {stderr}");
        for needle in expect {
            assert!(
                stderr.contains(needle),
                "{name}: {needle:?} not in {stderr}"
            );
        }
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    };
    case(
        "truncated",
        &|s| std::fs::write(s.join("state.bin"), &state[..state.len() / 2]).unwrap(),
        &["truncated"],
    );
    case(
        "flipped",
        &|s| {
            let mut bad = state.clone();
            let at = bad.len() - 100;
            bad[at] ^= 0x40;
            std::fs::write(s.join("state.bin"), bad).unwrap();
        },
        &["corrupt", "CRC-32"],
    );
    case(
        "version",
        &|s| {
            let mut bad = state.clone();
            bad[8..12].copy_from_slice(&99u32.to_le_bytes());
            std::fs::write(s.join("state.bin"), bad).unwrap();
        },
        &["format version 99", "reads versions 1, 2"],
    );
    case(
        "not-a-snapshot",
        &|s| std::fs::write(s.join("state.bin"), b"{\"json\": true}").unwrap(),
        &["RVMMSNAP"],
    );
    case(
        "short-memory",
        &|s| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(s.join("memory.bin"))
                .unwrap();
            f.set_len(32 << 20).unwrap();
        },
        &["memory.bin", "67108864 bytes"],
    );
    case(
        "other-vm",
        &|s| {
            let path = s.join("config.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replace("67108864", "134217728");
            std::fs::write(path, text).unwrap();
        },
        &["does not match", "134217728"],
    );
    case(
        "missing",
        &|s| std::fs::remove_file(s.join("state.bin")).unwrap(),
        &["state.bin"],
    );
}

#[test]
fn kvm_vm_restore_through_the_api_runs_the_snapshot_under_the_control_threads_filter() {
    if !kvm_available("vm.restore") {
        return;
    }
    let dir = TestDir::new("snapshot-api-restore");
    let socket = dir.path("api.sock");
    let mut source = start_memtest(&dir, "1", 4);
    wait_for_text(&dir.path("serial.log"), " ok\n", 2);
    // Booted by the main thread: vmm-control, idle so far, has lowered its capabilities too.
    assert_threads_confined(
        source.0.id(),
        true,
        &["vcpu0"],
        "vmm-control",
        &["vm-restart"],
    );
    put(&socket, "vm.pause", None);
    let last = *passes(&std::fs::read_to_string(dir.path("serial.log")).unwrap())
        .last()
        .unwrap();
    let snap = dir.path("snap");
    snapshot(&socket, &snap);
    source.signal(libc::SIGKILL);
    source.wait(API_TIMEOUT);

    // A VMM without a VM restores it on vmm-control: the memory file mapped copy-on-write
    // (read in at once: prefault), the state read, KVM and the devices set up, all under the
    // control thread's filter.
    let restored_socket = dir.path("restored.sock");
    let restored_log = dir.path("restored.log");
    let mut restored = start_vmm(&restored_socket, &restored_log, &[]);
    let body = format!(
        r#"{{"source_url": "file://{}", "prefault": true}}"#,
        snap.display()
    );
    put(&restored_socket, "vm.restore", Some(&body));
    assert_eq!(state(&restored_socket), "Paused");
    put(&restored_socket, "vm.resume", None);
    let text = wait_for_text(&restored_log, " ok\n", 2);
    assert_eq!(
        passes(&text)[0],
        last + 1,
        "did not go on where it was: {text}"
    );
    assert_threads_confined(
        restored.0.id(),
        true,
        &["vcpu0"],
        "vmm-control",
        &["vm-restart"],
    );
    put(&restored_socket, "vmm.shutdown", None);
    assert_eq!(restored.wait(API_TIMEOUT), Some(0));
}
