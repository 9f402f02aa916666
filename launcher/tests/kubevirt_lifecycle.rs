//! The end of a VMI's life on rvmm in virt-launcher mode, as virt-handler sees it through the
//! events KubeVirt's launcher sends: a guest power-off leaves the domain Shutoff (virt-handler
//! records the VMI as Succeeded) until virt-handler deletes it, and only then comes the final
//! event; a guest reboot keeps the VMI running; a crash is a Kubernetes event and a Crashed
//! domain; a Sync of a changed VMI is refused naming the field; a Linux guest powers off
//! through ACPI on ShutdownVirtualMachine. virt-handler's side is played
//! with tonic clients of KubeVirt's protocol and a fake notify server ([`common::kubevirt`]).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::kubevirt::{Session, event, kernel_boot_vmi, next_event, status};
use common::kvm_available;
use common::linux::{image_dir, manifest};
use serde_json::json;

/// Waits until the launcher's log has `needle` `count` times.
fn wait_for_log(session: &Session, needle: &str, count: usize) {
    let start = Instant::now();
    while session.launcher.log().matches(needle).count() < count {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{needle:?} x{count} not in the log:\n{}",
            session.launcher.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kvm_guest_power_off_leaves_a_shutoff_domain_until_virt_handler_deletes_it() {
    if !kvm_available("virt-launcher guest power-off") {
        return;
    }
    // `button` powers off when its power button is pressed (it resets after the press: rvmm's
    // guest power-off until the guest has ACPI).
    let mut session = Session::start("poweroff", "button", 30);
    let handler = session.handler();
    let vmi = kernel_boot_vmi("uid-1", "button.elf");
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("ADDED", "Running", "Unknown"));
    // The VMI is deleted: virt-handler asks for a graceful shutdown.
    assert!(handler.vmi_command("Shutdown", &vmi).0);
    let (kind, state, _, domain) = next_event(&session.events);
    assert_eq!((kind.as_str(), state.as_str()), ("MODIFIED", "Running"));
    assert!(domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["DeletionTimestamp"].is_string());
    // The guest powers off: Shutoff (Shutdown), which virt-handler maps to Succeeded.
    assert_eq!(session.next(), event("MODIFIED", "Shutoff", "Shutdown"));
    assert_eq!(handler.domain_status(), status("Shutoff", "Shutdown"));
    // No final event yet: the domain is still there for virt-handler to read and delete.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        session.events.try_recv().is_err(),
        "no final event before the deletion"
    );
    assert!(
        session.launcher.child.try_wait().unwrap().is_none(),
        "still serving"
    );
    assert_eq!(
        handler.vmi_command("Sync", &vmi),
        (true, String::new()),
        "not started again"
    );
    // virt-handler deletes the domain of the finished VMI: the final event, and the end.
    assert_eq!(handler.vmi_command("Delete", &vmi), (true, String::new()));
    let (kind, state, reason, domain) = next_event(&session.events);
    assert_eq!(
        (kind.as_str(), state.as_str(), reason.as_str()),
        ("MODIFIED", "NoState", "NonExistent")
    );
    assert!(domain["ObjectMeta"]["deletionTimestamp"].is_string());
    let exit = session.launcher.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "log:\n{}", session.launcher.log());
    assert!(session.events.try_recv().is_err(), "one final event");
}

#[test]
fn kvm_guest_reboot_restarts_the_guest_and_the_vmi_keeps_running() {
    if !kvm_available("virt-launcher guest reboot") {
        return;
    }
    // `hello` resets as soon as it has printed: every reset boots it again.
    let mut session = Session::start("reboot", "hello", 30);
    let handler = session.handler();
    let vmi = kernel_boot_vmi("uid-1", "hello.elf");
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("ADDED", "Running", "Unknown"));
    wait_for_log(&session, "Guest reset: booting the VM again", 3);
    assert_eq!(handler.domain_status(), status("Running", "Unknown"));
    // Each reboot is a Running domain, never a Shutoff that would end the VMI.
    while let Ok(request) = session.events.try_recv() {
        let domain: serde_json::Value = serde_json::from_slice(&request.domain_json).unwrap();
        assert_eq!(domain["Status"]["Status"], "Running", "{domain}");
    }
    assert!(
        session.launcher.child.try_wait().unwrap().is_none(),
        "still running"
    );
    // The VMI is deleted while the guest reboots over and over.
    assert_eq!(handler.vmi_command("Kill", &vmi), (true, String::new()));
    let mut last = session.next();
    while last.1 == "Running" {
        last = session.next();
    }
    assert_eq!(last, event("MODIFIED", "Shutoff", "Destroyed"));
    assert_eq!(handler.vmi_command("Delete", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("MODIFIED", "NoState", "NonExistent"));
    let exit = session.launcher.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "log:\n{}", session.launcher.log());
}

#[test]
fn kvm_guest_crash_is_a_kubernetes_event_and_a_crashed_domain_until_deleted() {
    if !kvm_available("virt-launcher guest crash") {
        return;
    }
    let mut session = Session::start("crash", "triple", 30);
    let handler = session.handler();
    let vmi = kernel_boot_vmi("uid-1", "triple.elf");
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("ADDED", "Running", "Unknown"));
    assert_eq!(session.next(), event("MODIFIED", "Shutoff", "Crashed"));
    let panicked = session
        .k8s_events
        .recv_timeout(Duration::from_secs(20))
        .expect("a GuestPanicked event");
    assert_eq!(
        (&panicked["type"], &panicked["reason"]),
        (&json!("Warning"), &json!("GuestPanicked"))
    );
    assert_eq!(panicked["involvedObject"]["uid"], "uid-1");
    assert!(
        panicked["message"]
            .as_str()
            .unwrap()
            .contains("triple fault")
    );
    assert_eq!(handler.domain_status(), status("Shutoff", "Crashed"));
    assert_eq!(handler.vmi_command("Delete", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("MODIFIED", "NoState", "NonExistent"));
    let exit = session.launcher.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(3), "log:\n{}", session.launcher.log());
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

#[test]
fn kvm_sync_of_a_changed_vmi_refuses_hotplug_naming_the_field_and_applies_the_grace_period() {
    if !kvm_available("virt-launcher changed VMI") {
        return;
    }
    let mut session = Session::start("resync", "ticker", 30);
    let handler = session.handler();
    let vmi = kernel_boot_vmi("uid-1", "ticker.elf");
    assert_eq!(handler.vmi_command("Sync", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("ADDED", "Running", "Unknown"));

    let mut bigger = vmi.clone();
    bigger["spec"]["domain"]["memory"]["guest"] = json!("128Mi");
    let (success, message) = handler.vmi_command("Sync", &bigger);
    assert!(!success);
    assert!(
        message.contains(
            "spec.domain.memory.guest: 64 MiB to 128 MiB: memory hotplug is not supported"
        ),
        "{message}"
    );
    let mut more_cpus = vmi.clone();
    more_cpus["spec"]["domain"]["cpu"] = json!({"sockets": 2});
    let (success, message) = handler.vmi_command("Sync", &more_cpus);
    assert!(
        !success && message.contains("spec.domain.cpu: 1 to 2 vCPUs"),
        "{message}"
    );
    let mut disk = vmi.clone();
    disk["spec"]["domain"]["devices"]["disks"] = json!([{"name": "scratch"}]);
    disk["spec"]["volumes"] = json!([{"name": "scratch", "emptyDisk": {"capacity": "1Mi"}}]);
    let (success, message) = handler.vmi_command("Sync", &disk);
    assert!(
        !success && message.contains("spec.domain.devices.disks: 0 to 1 entries"),
        "{message}"
    );
    // Labels, annotations and status change freely.
    let mut relabelled = vmi.clone();
    relabelled["metadata"]["labels"] = json!({"kubevirt.io/nodeName": "node1"});
    relabelled["status"] = json!({"phase": "Running"});
    assert_eq!(
        handler.vmi_command("Sync", &relabelled),
        (true, String::new())
    );
    // A new grace period reaches the domain, as KubeVirt's launcher applies it.
    let mut longer = vmi.clone();
    longer["spec"]["terminationGracePeriodSeconds"] = json!(90);
    assert_eq!(handler.vmi_command("Sync", &longer), (true, String::new()));
    let (_, state, _, domain) = next_event(&session.events);
    assert_eq!(state, "Running");
    assert_eq!(
        domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["DeletionGracePeriodSeconds"],
        90
    );
    assert_eq!(handler.domain_status(), status("Running", "Unknown"));
    assert_eq!(handler.vmi_command("Delete", &vmi), (true, String::new()));
    session.launcher.wait(Duration::from_secs(10));
}

/// The Linux guest's console, read from the launcher's serial socket (as `virtctl console`
/// reads it), until `line`; every line so far.
fn console_until(socket: &Path, line: &str, timeout: Duration) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    let start = Instant::now();
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(start.elapsed() < timeout, "{}: {e}", socket.display());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut lines = Vec::new();
    for text in BufReader::new(stream).lines() {
        let text = text.expect("console within the timeout");
        let text = text.trim_end_matches('\r').to_string();
        eprintln!("[console] {text}");
        let done = text == line;
        lines.push(text);
        if done {
            return lines;
        }
    }
    panic!("the console closed before '{line}'");
}

/// A directory outside the test's own, removed however the test ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Linux guest (guest-images/build) on virtio-pci with INTx (`pci=nomsi`: the DSDT's
/// `_PRT`, level-triggered lines through resampling irqfds), shut down as virt-handler does
/// it: the ACPI power button, the guest's own power-off (ACPI S5), a Shutoff/Shutdown domain.
#[test]
fn kvm_shutdown_powers_a_linux_vmi_off_through_acpi_and_the_domain_is_shutoff_shutdown() {
    let test = "virt-launcher Linux shutdown";
    let Some(dir) = image_dir(test) else { return };
    if !kvm_available(test) {
        return;
    }
    let m = manifest(&dir);
    // A UID of its own: the serial console lives under the real /var/run/kubevirt-private.
    let uid = format!("uid-linux-{}", std::process::id());
    let files = [
        (PathBuf::from(&m["vmlinux"]), "vmlinux".to_string()),
        (PathBuf::from(&m["initramfs"]), "initramfs.cpio".to_string()),
    ];
    let mut session = Session::with_files("linux", &files, 600, &uid, true);
    let handler = session.handler();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let cmdline = if pvm { &m["cmdline"] } else { &m["cmdline_hw"] };
    let vmi = json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "testvm", "namespace": "default", "uid": uid},
        "spec": {
            "domain": {
                "devices": {"rng": {}},
                "firmware": {"kernelBoot": {
                    // INTx here (the other PCI boot has MSI-X): pci=nomsi.
                    "kernelArgs": format!("{cmdline} rvmm.hold rvmm.virtio_bus=pci pci=nomsi"),
                    "container": {
                        "image": "example.com/linux-kernel",
                        "kernelPath": "/boot/vmlinux",
                        "initrdPath": "/boot/initramfs.cpio"
                    }
                }},
                "memory": {"guest": "256Mi"}
            },
            "terminationGracePeriodSeconds": 600
        }
    });
    let sync = handler.vmi_command("Sync", &vmi);
    assert_eq!(
        sync,
        (true, String::new()),
        "log:\n{}",
        session.launcher.log()
    );
    assert_eq!(session.next(), event("ADDED", "Running", "Unknown"));

    // Shut down once the guest waits for it (its ACPI power button enabled by then).
    let private = RemoveOnDrop(Path::new("/var/run/kubevirt-private").join(&uid));
    let console = console_until(
        &private.0.join("virt-serial0"),
        "RVMM-HOLD",
        Duration::from_secs(900),
    );
    for check in ["rng", "virtio_bus", "pci_irq", "acpi"] {
        let ok = format!("RVMM-CHECK {check} ok");
        assert!(console.contains(&ok), "missing '{ok}'");
    }
    assert!(handler.vmi_command("Shutdown", &vmi).0);
    let (kind, state, _, domain) = next_event(&session.events);
    assert_eq!((kind.as_str(), state.as_str()), ("MODIFIED", "Running"));
    assert!(domain["Spec"]["Metadata"]["KubeVirt"]["GracePeriod"]["DeletionTimestamp"].is_string());
    // The guest powers off by itself (ACPI S5): Shutoff for the reason Shutdown, as libvirt
    // reports a guest that shut down.
    let request = session
        .events
        .recv_timeout(Duration::from_secs(300))
        .expect("the guest powers off");
    let domain: serde_json::Value = serde_json::from_slice(&request.domain_json).unwrap();
    assert_eq!(
        (
            domain["Status"]["Status"].as_str(),
            domain["Status"]["Reason"].as_str()
        ),
        (Some("Shutoff"), Some("Shutdown")),
        "log:\n{}",
        session.launcher.log()
    );
    let log = session.launcher.log();
    assert!(log.contains("the guest got the ACPI power button"), "{log}");
    assert!(log.contains("Guest powered off"), "{log}");
    // virt-handler deletes the finished VMI's domain: the final event, and the end.
    assert_eq!(handler.vmi_command("Delete", &vmi), (true, String::new()));
    assert_eq!(session.next(), event("MODIFIED", "NoState", "NonExistent"));
    let exit = session.launcher.wait(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "log:\n{}", session.launcher.log());
}
