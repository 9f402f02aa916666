//! KubeVirt's live migration through two real launchers in virt-launcher mode, the test
//! playing both virt-handlers: tonic clients of KubeVirt's command protocol, fake notify
//! servers for the domain events, and the migration proxy between the source pod's
//! `<share-dir>/migrationproxy/<uid>-49152-source.sock` and the target pod's (virt-handler's
//! proxies carry the stream between nodes; here a local byte pump does).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::kubevirt::{Handler, Session, kernel_boot_vmi, next_event};
use common::{assert_threads_confined, kvm_available};
use rvmm_launcher::kubevirt::proto::cmd::v1 as cmd;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The test's VMI: memtest with a virtio-rng, which the launcher puts on PCI (KubeVirt's
/// platform: virtio-pci functions with MSI-X, ACPI), so that the migration carries a PCI
/// function's state and the ACPI registers.
fn vmi() -> Value {
    let mut vmi = kernel_boot_vmi("uid-1", "memtest.elf");
    vmi["spec"]["domain"]["devices"]["rng"] = json!({});
    vmi
}

/// The VMI as virt-handler sends it once virt-controller set up the migration.
fn migrating_vmi() -> Value {
    let mut vmi = vmi();
    vmi["status"] = json!({
        "migrationTransport": "Unix",
        "migrationState": {
            "migrationUid": "migration-1",
            "sourcePod": "virt-launcher-testvm-src",
            "targetPod": "virt-launcher-testvm-dst",
        },
    });
    vmi
}

fn proxy_socket(session: &Session) -> std::path::PathBuf {
    session
        .pod
        .path("share/migrationproxy/uid-1-49152-source.sock")
}

fn migrate(handler: &Handler, vmi: &Value) -> (bool, String) {
    let request = cmd::MigrationRequest {
        vmi: Some(cmd::Vmi {
            vmi_json: vmi.to_string().into_bytes(),
        }),
        options: br#"{"CompletionTimeoutPerGiB":150,"ProgressTimeout":150}"#.to_vec(),
    };
    let mut c = handler.cmd();
    let response = handler
        .block_on(c.migrate_virtual_machine(request))
        .unwrap()
        .into_inner();
    (response.success, response.message)
}

/// Polls GetDomain until its migration metadata has an end timestamp; returns the domain.
fn wait_for_migration_end(handler: &Handler, who: &str) -> Value {
    let start = Instant::now();
    loop {
        if let Some(domain) = handler.domain()
            && domain["Spec"]["Metadata"]["KubeVirt"]["Migration"]["EndTimestamp"].is_string()
        {
            return domain;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "{who}: the migration did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// virt-handler's proxies, in one: every connection to `from` is joined to `to`.
fn pump(from: &Path, to: std::path::PathBuf) {
    std::fs::create_dir_all(from.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(from).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let mut server = UnixStream::connect(&to).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            let _ = std::io::copy(&mut server, &mut client);
            let _ = client.shutdown(std::net::Shutdown::Write);
        }
    });
}

#[test]
fn kvm_virt_handlers_migrate_a_vmi_between_two_launcher_pods_with_kubevirts_commands() {
    if !kvm_available("KubeVirt migration") {
        return;
    }
    let source = Session::start("msrc", "memtest", 30);
    let target = Session::start("mdst", "memtest", 30);
    let (src, dst) = (source.handler(), target.handler());
    let vmi = vmi();
    assert_eq!(src.vmi_command("Sync", &vmi), (true, String::new()));
    assert_eq!(next_event(&source.events).0, "ADDED");
    std::thread::sleep(Duration::from_millis(500));

    let vmi = migrating_vmi();
    let prepared = dst.vmi_command("SyncMigrationTarget", &vmi);
    assert_eq!(prepared, (true, String::new()), "{}", target.launcher.log());
    assert!(proxy_socket(&target).exists(), "{}", target.launcher.log());
    assert_eq!(dst.domain(), None, "no domain before the VM arrives");
    // The thread waiting for the VM is filtered (it builds the VM as the control thread does).
    let target_pid = target.launcher.child.id();
    assert_threads_confined(
        target_pid,
        false,
        &["kubevirt-receiv"],
        "launcher-contro",
        &["kubevirt-receiv", "vm-restart"],
    );
    pump(&proxy_socket(&source), proxy_socket(&target));

    assert_eq!(migrate(&src, &vmi), (true, String::new()));
    let (kind, state, _, _) = next_event(&target.events);
    assert_eq!((kind.as_str(), state.as_str()), ("ADDED", "Running"));
    let domain = wait_for_migration_end(&dst, "target");
    let meta = &domain["Spec"]["Metadata"]["KubeVirt"]["Migration"];
    assert_eq!(meta["UID"], "migration-1", "{meta}");
    assert!(
        meta["StartTimestamp"].is_string() && meta["Failed"].is_null(),
        "{meta}"
    );
    assert_eq!(dst.domain_status(), ("Running".into(), "Unknown".into()));
    // The received VM's threads, started by the receiving thread, are filtered too.
    assert_threads_confined(
        target_pid,
        true,
        &["vcpu0"],
        "launcher-contro",
        &["kubevirt-receiv", "vm-restart"],
    );
    let domain = wait_for_migration_end(&src, "source");
    let meta = &domain["Spec"]["Metadata"]["KubeVirt"]["Migration"];
    assert_eq!(
        (&meta["UID"], &meta["Mode"], &meta["Failed"]),
        (&json!("migration-1"), &json!("PreCopy"), &Value::Null),
        "{meta}\n{}",
        source.launcher.log()
    );
    assert_eq!(src.domain_status(), ("Shutoff".into(), "Migrated".into()));

    assert_eq!(
        dst.vmi_command("FinalizeMigration", &vmi),
        (true, String::new())
    );
    // The same migration is one shot.
    let (again, message) = migrate(&src, &vmi);
    assert!(!again && message.contains("already executed"), "{message}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(dst.domain_status(), ("Running".into(), "Unknown".into()));
}

#[test]
fn kvm_cancel_virtual_machine_migration_aborts_and_the_source_goes_on() {
    if !kvm_available("KubeVirt migration cancel") {
        return;
    }
    let source = Session::start("mcancel", "memtest", 30);
    let src = source.handler();
    let vmi = vmi();
    assert_eq!(src.vmi_command("Sync", &vmi), (true, String::new()));
    // A target that takes the start and the configuration, then stalls.
    let socket = proxy_socket(&source);
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    let stalled = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        for _ in 0..2 {
            let mut head = [0u8; 16];
            stream.read_exact(&mut head).unwrap();
            let len = u64::from_le_bytes(head[8..16].try_into().unwrap());
            std::io::copy(&mut (&stream).take(len), &mut std::io::sink()).unwrap();
            let mut ok = [0u8; 16];
            ok[..4].copy_from_slice(b"RVMA");
            ok[4] = 1;
            stream.write_all(&ok).unwrap();
        }
        // Hold the connection until the sender drops it.
        let _ = std::io::copy(&mut stream, &mut std::io::sink());
    });
    let vmi = migrating_vmi();
    assert_eq!(migrate(&src, &vmi), (true, String::new()));
    std::thread::sleep(Duration::from_millis(500));
    // The sending thread, stalled by the target: filtered, no capabilities.
    assert_threads_confined(
        source.launcher.child.id(),
        true,
        &["kubevirt-migrat"],
        "launcher-contro",
        &["vm-restart"],
    );
    assert!(src.vmi_command("CancelMigration", &vmi).0);
    let domain = wait_for_migration_end(&src, "source");
    let meta = &domain["Spec"]["Metadata"]["KubeVirt"]["Migration"];
    assert_eq!(meta["Failed"], true, "{meta}");
    assert_eq!(meta["AbortStatus"], "Succeeded", "{meta}");
    assert_eq!(meta["FailureReason"], "Live migration has been aborted");
    stalled.join().unwrap();
    assert_eq!(src.domain_status(), ("Running".into(), "Unknown".into()));
    // Nothing migrates now: a second cancel is ignored.
    assert!(src.vmi_command("CancelMigration", &vmi).0);
}
