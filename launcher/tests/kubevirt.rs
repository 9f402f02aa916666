//! The real binary in virt-launcher mode, driven as virt-handler drives it: commands over
//! `<share-dir>/sockets/launcher-sock` with tonic clients of KubeVirt's protocol, domain events
//! received by a fake virt-handler on `<share-dir>/domain-notify-pipe.sock`
//! ([`common::kubevirt`]). The end of a VM's life (guest power-off, reboot, crash, delete) is in
//! `kubevirt_lifecycle.rs`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::kubevirt::{
    Handler, Launcher, Pod, Session, event, kernel_boot_vmi, next_event, status,
};
use common::kvm_available;
use rvmm_launcher::kubevirt::grpc::GrpcRuntime;
use rvmm_launcher::kubevirt::proto::cmd::v1 as cmd;
use serde_json::{Value, json};

#[test]
fn launcher_under_its_pod_name_answers_info_refuses_bad_vmis_and_exits_on_sigterm() {
    let pod = Pod::new("pod");
    // A containerDisk container's socket: it ends when the socket is gone.
    let disk_socket = pod.path("cd/disk_0.sock");
    let _container_disk = std::os::unix::net::UnixListener::bind(&disk_socket).unwrap();
    // The pod's command: the binary installed as virt-launcher-monitor.
    let program = pod.path("virt-launcher-monitor");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_rvmm"), &program).unwrap();
    std::fs::write(pod.path("cd/kernel-boot/vmlinux"), b"never booted").unwrap();
    let mut args: Vec<String> = [
        "--qemu-timeout",
        "325s",
        "--name",
        "testvm",
        "--uid",
        "uid-1",
        "--namespace",
        "default",
        "--hook-sidecars",
        "0",
        "--future-flag",
        "x",
    ]
    .map(String::from)
    .into();
    args.extend(pod.flags());
    let mut launcher = Launcher::start(&program, &args, &pod);
    launcher.wait_for(&pod.ready_socket(), Duration::from_secs(10));

    let runtime = GrpcRuntime::start().unwrap();
    let handler = Handler::connect(&runtime, &pod.ready_socket());
    assert_eq!(handler.info(), [1]);
    assert_eq!(handler.domain(), None, "no domain before a sync");
    let mut c = handler.cmd();
    let freeze = handler
        .block_on(c.freeze_virtual_machine(cmd::FreezeRequest::default()))
        .unwrap_err();
    assert_eq!(freeze.code(), tonic::Code::Unimplemented);

    let mut sata = kernel_boot_vmi("uid-1", "vmlinux");
    sata["spec"]["domain"]["devices"]["disks"] = json!([{"name": "root", "disk": {"bus": "sata"}}]);
    sata["spec"]["volumes"] = json!([{"name": "root", "emptyDisk": {"capacity": "1Gi"}}]);
    let (success, message) = handler.vmi_command("Sync", &sata);
    assert!(!success);
    assert!(
        message.contains("spec.domain.devices.disks[0].disk.bus: sata is not supported"),
        "{message}"
    );
    // Disk boot from bad containerDisks: refused at Sync, naming the image, nothing started.
    let disk_vmi = json!({
        "metadata": {"name": "testvm", "namespace": "default", "uid": "uid-1"},
        "spec": {
            "domain": {
                "devices": {"autoattachSerialConsole": false,
                            "disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                "memory": {"guest": "64Mi"}
            },
            "volumes": [{"name": "root", "containerDisk": {"image": "example.com/bad"}}]
        }
    });
    let mut truncated = devices_overlay_bytes();
    truncated.truncate(0x30000);
    let bad_images: [(Vec<u8>, &str); 2] = [
        (
            truncated,
            "disk_0.img is not a usable qcow2 image: l1_table_offset",
        ),
        (vec![0u8; 1 << 20], "no partition table (GPT or MBR)"),
    ];
    for (bytes, problem) in bad_images {
        std::fs::write(pod.path("cd/disk_0.img"), bytes).unwrap();
        let (success, message) = handler.vmi_command("Sync", &disk_vmi);
        assert!(!success);
        assert!(message.contains(problem), "{message}");
        assert_eq!(handler.domain(), None);
    }
    let (success, message) = handler.vmi_command("Sync", &kernel_boot_vmi("uid-2", "vmlinux"));
    assert!(!success);
    assert!(
        message.contains("is not this launcher's VMI uid-1"),
        "{message}"
    );
    assert_eq!(handler.domain(), None);

    launcher.sigterm();
    let exit = launcher.wait(Duration::from_secs(5));
    assert_eq!(exit.code(), Some(0), "log:\n{}", launcher.log());
    assert!(
        !pod.ready_socket().exists(),
        "the socket is removed on exit"
    );
    assert!(
        !disk_socket.exists(),
        "the containerDisk sockets are removed on exit"
    );
    assert!(
        pod.path("cd/kernel-boot/vmlinux").exists(),
        "and nothing else"
    );
    let log = launcher.log();
    assert!(
        log.contains("--hook-sidecars: accepted, ignored") && log.contains("--future-flag"),
        "flags rvmm does not act on are logged:\n{log}"
    );
}

#[test]
fn launcher_without_a_vmi_within_qemu_timeout_fails_and_keeps_the_pod_when_asked() {
    let pod = Pod::new("timeout");
    let mut args: Vec<String> = [
        "virt-launcher",
        "--qemu-timeout",
        "300ms",
        "--keep-after-failure",
    ]
    .map(String::from)
    .into();
    args.extend(pod.flags());
    let mut launcher = Launcher::start(Path::new(env!("CARGO_BIN_EXE_rvmm")), &args, &pod);
    let start = Instant::now();
    while !launcher.log().contains("kept alive until a signal") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "log:\n{}",
            launcher.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(launcher.child.try_wait().unwrap().is_none(), "still alive");
    assert!(!pod.ready_socket().exists(), "no longer serving");
    launcher.sigterm();
    assert_eq!(launcher.wait(Duration::from_secs(5)).code(), Some(1));
    assert!(
        launcher
            .log()
            .contains("no VMI was synced within --qemu-timeout"),
        "{}",
        launcher.log()
    );

    let args = ["virt-launcher".to_string(), "--simulate-crash".into()];
    let mut crashing = Launcher::start(Path::new(env!("CARGO_BIN_EXE_rvmm")), &args, &pod);
    assert_eq!(crashing.wait(Duration::from_secs(5)).code(), Some(1));
    assert!(crashing.log().contains("simulated virt-launcher crash"));
}

#[test]
fn kvm_virt_handler_drives_a_vmi_through_its_life_and_gets_every_domain_event() {
    if !kvm_available("virt-launcher VMI life") {
        return;
    }
    let mut session = Session::start("life", "ticker", 30);
    let handler = session.handler();
    assert_eq!(handler.info(), [1]);

    let vmi = kernel_boot_vmi("uid-1", "ticker.elf");
    let sync = handler.vmi_command("Sync", &vmi);
    assert_eq!(
        sync,
        (true, String::new()),
        "log:\n{}",
        session.launcher.log()
    );
    let (kind, state, reason, domain) = next_event(&session.events);
    assert_eq!(
        (kind.as_str(), state.as_str(), reason.as_str()),
        ("ADDED", "Running", "Unknown")
    );
    assert_eq!(domain["Spec"]["Name"], "default_testvm");
    assert_eq!(domain["Spec"]["Metadata"]["KubeVirt"]["UID"], "uid-1");
    assert_eq!(handler.domain_status(), status("Running", "Unknown"));
    // virt-handler syncs again and again: the running VM is left alone.
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));

    assert!(handler.vmi_command("Pause", &vmi).0);
    assert_eq!(handler.domain_status(), status("Paused", "User"));
    let (kind, state, reason, _) = next_event(&session.events);
    assert_eq!(
        (kind.as_str(), state.as_str(), reason.as_str()),
        ("MODIFIED", "Paused", "User")
    );
    assert!(handler.vmi_command("Unpause", &vmi).0);
    let (_, state, _, _) = next_event(&session.events);
    assert_eq!(state, "Running");

    let mut c = handler.cmd();
    let stats = handler
        .block_on(c.get_domain_stats(cmd::EmptyRequest {}))
        .unwrap()
        .into_inner();
    let stats: Value = serde_json::from_str(&stats.domain_stats).unwrap();
    assert_eq!(stats["Name"], "default_testvm");
    assert_eq!(stats["Vcpu"].as_array().map(Vec::len), Some(1));
    assert_eq!(stats["Memory"]["ActualBalloon"], 64 * 1024);
    assert_eq!(stats["NrVirtCpu"], 1);
    // The vCPU thread's and the VMM's CPU time, in nanoseconds.
    assert!(
        stats["Vcpu"][0]["Time"].as_u64().is_some_and(|t| t > 0),
        "{stats}"
    );
    assert!(
        stats["Cpu"]["Time"].as_u64().is_some_and(|t| t > 0),
        "{stats}"
    );
    // virt-handler's metrics scrape asks for the guest's filesystems right after.
    let filesystems = handler
        .block_on(c.get_filesystems(cmd::EmptyRequest {}))
        .unwrap()
        .into_inner();
    assert!(filesystems.response.unwrap().success);

    // A hard reset boots the guest afresh; a soft reboot has no sound mapping in rvmm.
    assert_eq!(handler.vmi_command("Reset", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("MODIFIED", "Running", "Unknown"));
    let (success, message) = handler.vmi_command("SoftReboot", &vmi);
    assert!(
        !success && message.ends_with("is not supported by rvmm"),
        "{message}"
    );

    // The graceful shutdown: the power button, which the ticker ignores; the grace period
    // starts. virt-handler asks again every 5 s (a booting guest can miss the button): each
    // time the button is pressed again, the grace period keeps its start.
    assert!(handler.vmi_command("Shutdown", &vmi).0);
    let (kind, state, _, domain) = next_event(&session.events);
    assert_eq!((kind.as_str(), state.as_str()), ("MODIFIED", "Running"));
    let grace = domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"].clone();
    assert_eq!(grace["DeletionGracePeriodSeconds"], 30);
    assert!(grace["DeletionTimestamp"].is_string(), "{grace}");
    std::thread::sleep(Duration::from_millis(1100));
    assert!(handler.vmi_command("Shutdown", &vmi).0);
    assert!(handler.vmi_command("Shutdown", &vmi).0);
    std::thread::sleep(Duration::from_millis(300));
    let domain = handler.domain().unwrap();
    assert_eq!(domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"], grace);
    assert_eq!(handler.domain_status(), status("Running", "Unknown"));
    let presses = session
        .launcher
        .log()
        .matches("Shutdown default_testvm: done")
        .count();
    assert_eq!(presses, 3, "{}", session.launcher.log());

    // The grace period is over for virt-handler: Kill.
    assert!(handler.vmi_command("Kill", &vmi).0);
    let (kind, state, reason, _) = next_event(&session.events);
    assert_eq!(
        (kind.as_str(), state.as_str(), reason.as_str()),
        ("MODIFIED", "Shutoff", "Destroyed")
    );
    assert_eq!(handler.domain_status(), status("Shutoff", "Destroyed"));
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));

    session.launcher.sigterm();
    let exit = session.launcher.wait(Duration::from_secs(5));
    assert_eq!(exit.code(), Some(0), "log:\n{}", session.launcher.log());
    let (kind, state, reason, domain) = next_event(&session.events);
    assert_eq!(
        (kind.as_str(), state.as_str(), reason.as_str()),
        ("MODIFIED", "NoState", "NonExistent"),
        "the final event: the domain is gone"
    );
    assert!(domain["ObjectMeta"]["deletionTimestamp"].is_string());
    assert!(
        session.events.try_recv().is_err(),
        "nothing after the final event"
    );
}

#[test]
fn kvm_sigterm_marks_the_domain_for_virt_handler_and_stops_the_vm_after_the_grace_period() {
    if !kvm_available("virt-launcher SIGTERM") {
        return;
    }
    let mut session = Session::start("term", "ticker", 1);
    let handler = session.handler();
    let vmi = kernel_boot_vmi("uid-1", "ticker.elf");
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("ADDED", "Running", "Unknown"));

    let signalled = Instant::now();
    session.launcher.sigterm();
    // virt-handler's cue to call ShutdownVirtualMachine; this one does not: the launcher
    // stops the VM when the grace period is over and exits (the pod is going).
    let (kind, state, _, domain) = next_event(&session.events);
    assert_eq!((kind.as_str(), state.as_str()), ("MODIFIED", "Running"));
    assert_eq!(
        domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["MarkedForGracefulShutdown"],
        true
    );
    assert_eq!(session.next(), event("MODIFIED", "Shutoff", "Destroyed"));
    assert_eq!(session.next(), event("MODIFIED", "NoState", "NonExistent"));
    let exit = session.launcher.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "log:\n{}", session.launcher.log());
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "the VM ran out its 1 s grace period"
    );
}

#[test]
fn kvm_sigterm_without_virt_handler_exits_within_the_grace_period_and_a_few_seconds() {
    if !kvm_available("virt-launcher SIGTERM, no virt-handler") {
        return;
    }
    // virt-handler's notify socket is missing: every event fails.
    let mut session = Session::with("term-alone", "ticker", 1, "uid-1", false);
    let handler = session.handler();
    let vmi = kernel_boot_vmi("uid-1", "ticker.elf");
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
    let signalled = Instant::now();
    session.launcher.sigterm();
    let exit = session.launcher.wait(Duration::from_secs(20));
    let log = session.launcher.log();
    assert_eq!(exit.code(), Some(0), "log:\n{log}");
    assert!(
        signalled.elapsed() < Duration::from_secs(1 + 5),
        "exit took {:?}; log:\n{log}",
        signalled.elapsed()
    );
    assert!(!log.contains("panicked"), "log:\n{log}");
    // The undelivered events are logged once, then counted.
    let logged = log
        .matches("further undelivered events are counted")
        .count();
    assert_eq!(logged, 1, "log:\n{log}");
    assert!(
        log.contains("events were not delivered to virt-handler"),
        "log:\n{log}"
    );
}

/// An empty qcow2 image of 1 GiB without a backing file (rvmm's own overlay layout).
fn devices_overlay_bytes() -> Vec<u8> {
    rvmm_devices::image::qcow2::overlay_test_bytes(1 << 30)
}

/// A Sync whose VMI carries `size` bytes of annotation: `Ok(success)`, or the gRPC status.
fn sync_of_size(handler: &Handler, vmi: &Value, size: usize) -> Result<bool, tonic::Code> {
    let mut vmi = vmi.clone();
    vmi["metadata"]["annotations"] = json!({ "example.com/padding": "p".repeat(size) });
    let request = cmd::VmiRequest {
        vmi: Some(cmd::Vmi {
            vmi_json: vmi.to_string().into_bytes(),
        }),
        options: None,
    };
    let mut c = handler.cmd();
    handler
        .block_on(c.sync_virtual_machine(request))
        .map(|r| r.into_inner().success)
        .map_err(|status| status.code())
}

#[test]
fn kvm_a_burst_of_large_grpc_messages_leaves_the_vm_running_and_every_thread_confined() {
    if !kvm_available("virt-launcher large messages") {
        return;
    }
    let mut session = Session::start("burst", "ticker", 30);
    let handler = session.handler();
    let vmi = kernel_boot_vmi("uid-1", "ticker.elf");
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("ADDED", "Running", "Unknown"));
    for round in 0..3 {
        for mib in [3, 5, 8, 10] {
            let outcome = sync_of_size(&handler, &vmi, mib << 20);
            assert!(
                // Over tonic's 4 MiB message limit: OutOfRange, as grpc-go's server answers.
                matches!(outcome, Ok(_) | Err(tonic::Code::OutOfRange)),
                "round {round}, {mib} MiB: {outcome:?}; log:\n{}",
                session.launcher.log()
            );
        }
    }
    assert_eq!(handler.domain_status(), status("Running", "Unknown"));
    assert!(
        session.launcher.child.try_wait().unwrap().is_none(),
        "log:\n{}",
        session.launcher.log()
    );
    let loose = common::unconfined_threads(session.launcher.child.id());
    assert!(loose.is_empty(), "unconfined threads: {loose:?}");
    // Capabilities: none, but for the control thread's KubeVirt set (NET_BIND_SERVICE,
    // SYS_NICE) and what booting again needs (DAC_OVERRIDE, DAC_READ_SEARCH), which the
    // control thread that boots the VM again after a guest reset (vm-restart) has too.
    let after_boot: u64 = 1 << 10 | 1 << 23 | 1 << 1 | 1 << 2;
    for (name, caps) in common::thread_capabilities(session.launcher.child.id()) {
        // Thread names are cut to 15 bytes.
        let allowed = if name == "launcher-contro" || name == "vm-restart" {
            after_boot
        } else {
            0
        };
        assert_eq!(caps & !allowed, 0, "{name} has capabilities {caps:#x}");
    }
    let mode = std::fs::metadata(session.pod.ready_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "launcher-sock mode {mode:o}");
    session.launcher.sigterm();
    let exit = session.launcher.wait(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(0), "log:\n{}", session.launcher.log());
}
