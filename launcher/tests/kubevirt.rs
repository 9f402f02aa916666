//! The real binary in virt-launcher mode, driven as virt-handler drives it: commands over
//! `<share-dir>/sockets/launcher-sock` with tonic clients of KubeVirt's protocol, domain events
//! received by a fake virt-handler on `<share-dir>/domain-notify-pipe.sock`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::kubevirt::*;
use common::kvm_available;
use launcher::kubevirt::grpc::GrpcRuntime;
use launcher::kubevirt::proto::cmd::v1 as cmd;
use serde_json::{Value, json};

#[test]
fn launcher_under_its_pod_name_answers_info_refuses_bad_vmis_and_exits_on_sigterm() {
    let pod = Pod::new("pod");
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

    // A hard reset boots the guest afresh; a soft reboot has no sound mapping in rvmm.
    assert_eq!(handler.vmi_command("Reset", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("MODIFIED", "Running", "Unknown"));
    let (success, message) = handler.vmi_command("SoftReboot", &vmi);
    assert!(
        !success && message.ends_with("is not supported by rvmm"),
        "{message}"
    );

    // The graceful shutdown: Ctrl-Alt-Del, which the ticker ignores; the grace period starts.
    assert!(handler.vmi_command("Shutdown", &vmi).0);
    let (kind, state, _, domain) = next_event(&session.events);
    assert_eq!((kind.as_str(), state.as_str()), ("MODIFIED", "Running"));
    let grace = &domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"];
    assert_eq!(grace["DeletionGracePeriodSeconds"], 30);
    assert!(grace["DeletionTimestamp"].is_string(), "{grace}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(handler.domain_status(), status("Running", "Unknown"));

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
    // virt-handler's cue to call ShutdownVirtualMachine; this one does not.
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
fn kvm_guest_that_ends_itself_ends_the_launcher_after_its_shutoff_and_final_events() {
    if !kvm_available("virt-launcher guest end") {
        return;
    }
    // hello resets when done (a microVM's end: Shutdown); triple triple-faults (Crashed).
    for (guest, reason, code) in [("hello", "Shutdown", 0), ("triple", "Crashed", 3)] {
        let mut session = Session::start(guest, guest, 30);
        let handler = session.handler();
        let vmi = kernel_boot_vmi("uid-1", &format!("{guest}.elf"));
        assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
        assert_eq!(
            session.next(),
            event("ADDED", "Running", "Unknown"),
            "{guest}"
        );
        assert_eq!(
            session.next(),
            event("MODIFIED", "Shutoff", reason),
            "{guest}"
        );
        assert_eq!(
            session.next(),
            event("MODIFIED", "NoState", "NonExistent"),
            "{guest}"
        );
        let exit = session.launcher.wait(Duration::from_secs(10));
        assert_eq!(
            exit.code(),
            Some(code),
            "{guest}: {}",
            session.launcher.log()
        );
    }
}

#[test]
fn kvm_delete_stops_the_vm_sends_the_final_event_and_ends_the_launcher() {
    if !kvm_available("virt-launcher delete") {
        return;
    }
    let mut session = Session::start("delete", "ticker", 30);
    let handler = session.handler();
    let vmi = kernel_boot_vmi("uid-1", "ticker.elf");
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("ADDED", "Running", "Unknown"));
    assert_eq!(handler.vmi_command("Delete", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("MODIFIED", "Shutoff", "Destroyed"));
    assert_eq!(session.next(), event("MODIFIED", "NoState", "NonExistent"));
    let exit = session.launcher.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "log:\n{}", session.launcher.log());
    assert!(session.events.try_recv().is_err(), "one final event");
}
