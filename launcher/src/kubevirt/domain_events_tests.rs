//! The domain events' translation and delivery, without KVM: the VMM's events are fed to the
//! listener by hand and delivered to a fake virt-handler.

use rvmm_core::{BootInfo, CrashReason, RebootCause};
use serde_json::{Value, json};

use super::*;
use crate::dhcp::server::LeaseEvent;
use crate::kubevirt::grpc::GrpcRuntime;
use crate::kubevirt::grpc::tests::{TempDir, fake_virt_handler_with_k8s_events};
use crate::kubevirt::proto::notify::v1::DomainEventRequest;
use crate::kubevirt::vmi::{LauncherDirs, Vmi, plan};
use crate::vmm::EXIT_OK;

/// The event thread sending to a fake virt-handler (or to none) in a temporary share
/// directory, for a synced kernel-boot VMI (no KVM: the VMM's events are fed to the
/// listener by hand).
struct Harness {
    _dir: TempDir,
    _runtime: GrpcRuntime,
    vmm: Arc<Vmm>,
    events: Option<DomainEvents>,
    listener: EventListener,
    received: tokio::sync::mpsc::UnboundedReceiver<DomainEventRequest>,
    k8s_events: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl Harness {
    fn new(tag: &str) -> Self {
        Self::with(tag, true, DELETE_WAIT)
    }

    fn with(tag: &str, virt_handler: bool, delete_wait: Duration) -> Self {
        let dir = TempDir::new(tag);
        let dirs = LauncherDirs::under(&dir.0);
        let kernel = dirs.container_disks.join("kernel-boot/vmlinux");
        std::fs::create_dir_all(kernel.parent().unwrap()).unwrap();
        std::fs::write(&kernel, b"kernel").unwrap();
        let vmi = Vmi::from_json(
            json!({
                "metadata": {"name": "vm", "namespace": "ns", "uid": "u-1"},
                "spec": {"domain": {
                    "devices": {"autoattachSerialConsole": false},
                    "firmware": {"kernelBoot": {"container": {"kernelPath": "/vmlinux"}}},
                    "memory": {"guest": "64Mi"}
                }}
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let plan = plan(&vmi, &dirs).unwrap();
        let record = Arc::new(DomainRecord::synced(vmi, plan));
        let runtime = GrpcRuntime::start().unwrap();
        let (received, k8s_events) = {
            let _entered = runtime.handle().enter();
            let (received, k8s_events) = fake_virt_handler_with_k8s_events(&dir.0, vec![1]);
            if !virt_handler {
                std::fs::remove_file(dir.0.join("domain-notify-pipe.sock")).unwrap();
            }
            (received, k8s_events)
        };
        let vmm = Vmm::without_kvm();
        let vmi_ref = VmiRef {
            namespace: "ns".into(),
            name: "vm".into(),
            uid: "u-1".into(),
        };
        let events = DomainEvents::start(
            Notifier::new(&dir.0),
            runtime.handle().clone(),
            record.clone(),
            vmm.clone(),
            vmi_ref,
            delete_wait,
            None,
        )
        .unwrap();
        let listener = events.listener(record);
        Self {
            _dir: dir,
            _runtime: runtime,
            vmm,
            events: Some(events),
            listener,
            received,
            k8s_events,
        }
    }

    fn send(&self, change: Change) {
        self.events.as_ref().unwrap().sender().send(change).unwrap();
    }

    /// (type, status, reason, has a deletion timestamp) of each event delivered so far.
    fn delivered(&mut self) -> Vec<(String, String, String, bool)> {
        let mut seen = Vec::new();
        while let Ok(request) = self.received.try_recv() {
            let d: Value = serde_json::from_slice(&request.domain_json).unwrap();
            seen.push((
                request.event_type,
                d["Status"]["Status"].as_str().unwrap().to_owned(),
                d["Status"]["Reason"].as_str().unwrap().to_owned(),
                d["ObjectMeta"].get("deletionTimestamp").is_some(),
            ));
        }
        seen
    }

    /// Waits for `count` domain events.
    fn wait_for(&mut self, count: usize) -> Vec<(String, String, String, bool)> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while seen.len() < count {
            assert!(start.elapsed() < Duration::from_secs(20), "{seen:?}");
            seen.extend(self.delivered());
            std::thread::sleep(Duration::from_millis(5));
        }
        seen
    }

    /// Ends the VMM as the launcher does and waits for the thread.
    fn exit(mut self) -> Self {
        (self.listener)(&Event::VmmShutdown { exit_code: 0 });
        assert!(self.events.take().unwrap().finish(Duration::from_secs(3)));
        self
    }

    /// Whether the VMM was asked to exit within `within`.
    fn exits_within(&self, within: Duration) -> bool {
        let (exited, exit) = std::sync::mpsc::channel();
        let vmm = self.vmm.clone();
        std::thread::spawn(move || exited.send(vmm.wait_for_exit()));
        exit.recv_timeout(within).is_ok()
    }
}

fn event(kind: &str, status: &str, reason: &str, gone: bool) -> (String, String, String, bool) {
    (kind.into(), status.into(), reason.into(), gone)
}

fn boot() -> BootInfo {
    BootInfo {
        vcpus: 1,
        memory_bytes: 64 << 20,
        source: "/vmlinux".into(),
    }
}

fn booted() -> Event {
    VmEvent::Booted(boot()).into()
}

fn rebooted(cause: RebootCause) -> Event {
    VmEvent::Rebooted {
        boot: boot(),
        cause,
    }
    .into()
}

fn shutdown(reason: ShutdownReason) -> Event {
    VmEvent::Shutdown(reason).into()
}

fn lease(address: &str, bound: bool) -> Event {
    let address = address.parse().unwrap();
    Event::Dhcp(LeaseEvent {
        nic: "default".into(),
        mac: [2, 0, 0, 0, 0, 1],
        prefix_len: if bound { 24 } else { 120 },
        change: if bound {
            LeaseChange::Bound(address)
        } else {
            LeaseChange::Released(address)
        },
    })
}

#[test]
fn vm_life_reaches_virt_handler_in_order_with_the_final_event_before_exit() {
    let h = Harness::new("events-life");
    (h.listener)(&booted());
    (h.listener)(&VmEvent::Paused.into());
    h.send(Change::Metadata);
    (h.listener)(&VmEvent::Resumed.into());
    (h.listener)(&rebooted(RebootCause::Guest));
    (h.listener)(&shutdown(ShutdownReason::Requested));
    let mut h = h.exit();
    assert_eq!(
        h.delivered(),
        [
            event("ADDED", "Running", "Unknown", false),
            event("MODIFIED", "Paused", "User", false),
            event("MODIFIED", "Paused", "User", false),
            event("MODIFIED", "Running", "Unknown", false),
            event("MODIFIED", "Running", "Unknown", false),
            event("MODIFIED", "Shutoff", "Destroyed", false),
            event("MODIFIED", "NoState", "NonExistent", true),
        ]
    );
}

#[test]
fn guest_power_off_leaves_the_domain_until_virt_handler_deletes_it() {
    let mut h = Harness::new("events-poweroff");
    (h.listener)(&booted());
    (h.listener)(&shutdown(ShutdownReason::PowerOff));
    assert_eq!(
        h.wait_for(2),
        [
            event("ADDED", "Running", "Unknown", false),
            event("MODIFIED", "Shutoff", "Shutdown", false),
        ]
    );
    // virt-handler records the VMI's end from Shutoff, then deletes the domain; until
    // then the launcher stays and the domain is not gone.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.delivered(), []);
    h.send(Change::Deleted);
    assert_eq!(h.vmm.wait_for_exit(), EXIT_OK);
    assert_eq!(
        h.wait_for(1),
        [event("MODIFIED", "NoState", "NonExistent", true)]
    );
    let mut h = h.exit();
    assert_eq!(h.delivered(), [], "one final event");
}

#[test]
fn stopped_vm_that_is_not_deleted_ends_the_launcher_after_the_wait() {
    let mut h = Harness::with("events-nodelete", true, Duration::from_millis(300));
    (h.listener)(&booted());
    let start = Instant::now();
    let crash = CrashReason::TripleFault {
        vcpu: 0,
        regs: None,
    };
    (h.listener)(&VmEvent::Crashed(crash).into());
    h.vmm.wait_for_exit();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        h.wait_for(2),
        [
            event("ADDED", "Running", "Unknown", false),
            event("MODIFIED", "Shutoff", "Crashed", false),
        ]
    );
    // The crash went to virt-handler as a Kubernetes event too, before the state.
    let panicked = h.k8s_events.try_recv().unwrap();
    assert_eq!(panicked["reason"], "GuestPanicked");
    assert_eq!(
        panicked["message"],
        "GuestPanicked: Guest triple fault on vCPU 0 (KVM_EXIT_SHUTDOWN)"
    );
    assert_eq!(panicked["involvedObject"]["uid"], "u-1");
}

#[test]
fn a_vm_booted_again_waits_for_no_deletion() {
    let mut h = Harness::with("events-reboot", true, Duration::from_millis(200));
    (h.listener)(&booted());
    (h.listener)(&shutdown(ShutdownReason::Requested));
    (h.listener)(&rebooted(RebootCause::Host));
    assert_eq!(h.wait_for(3).len(), 3);
    assert!(!h.exits_within(Duration::from_millis(600)));
}

#[test]
fn guest_agent_ping_failure_is_a_kubernetes_warning_about_the_vmi() {
    let mut h = Harness::new("events-ping");
    h.send(Change::GuestAgentPingFailed);
    let start = Instant::now();
    let event = loop {
        if let Ok(event) = h.k8s_events.try_recv() {
            break event;
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        (&event["type"], &event["reason"], &event["message"]),
        (
            &json!("Warning"),
            &json!("GuestAgentPingFailed"),
            &json!("GuestAgentPing probe failed for VMI vm")
        )
    );
}

#[test]
fn exit_without_virt_handler_gives_up_on_the_last_events_in_time() {
    let mut h = Harness::with("events-absent", false, DELETE_WAIT);
    (h.listener)(&booted());
    h.send(Change::Metadata);
    (h.listener)(&shutdown(ShutdownReason::Requested));
    (h.listener)(&Event::VmmShutdown { exit_code: 0 });
    let start = Instant::now();
    assert!(h.events.take().unwrap().finish(Duration::from_secs(1)));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_dhcp_lease_reaches_virt_handler_in_status_interfaces_until_released() {
    let mut h = Harness::new("lease");
    let interfaces = |ips: &[&str]| json!([{"Mac": "02:00:00:00:00:01", "Ip": ips[0], "IPs": ips, "InterfaceName": ""}]);
    // Each event is built when sent, from the record as it is then: one at a time.
    for (event, expected) in [
        (booted(), Value::Null),
        (lease("10.0.2.2", true), interfaces(&["10.0.2.2"])),
        (
            lease("fd10:0:2::2", true),
            interfaces(&["10.0.2.2", "fd10:0:2::2"]),
        ),
        (lease("10.0.2.2", false), interfaces(&["fd10:0:2::2"])),
        (
            lease("10.0.2.2", true),
            interfaces(&["10.0.2.2", "fd10:0:2::2"]),
        ),
        (shutdown(ShutdownReason::Requested), Value::Null),
    ] {
        (h.listener)(&event);
        let start = Instant::now();
        let request = loop {
            if let Ok(request) = h.received.try_recv() {
                break request;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{event:?} not delivered"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let domain: Value = serde_json::from_slice(&request.domain_json).unwrap();
        assert_eq!(domain["Status"]["Interfaces"], expected, "after {event:?}");
    }
    h.exit();
}

#[test]
fn vmm_exit_without_a_booted_vm_sends_nothing() {
    let mut h = Harness::new("events-none").exit();
    assert_eq!(h.delivered(), []);
}

#[test]
fn every_vmm_event_maps_to_its_domain_changes() {
    let running = || vec![Change::State(DomainState::RUNNING)];
    let received = rvmm_core::ReceivedReport {
        receiver: "tcp:0.0.0.0:1".into(),
        memory_bytes: 1,
        duration: Duration::ZERO,
    };
    let crash = CrashReason::Reported { vcpu: 1 };
    let cases: Vec<(Event, Vec<Change>)> = vec![
        (booted(), vec![Change::Booted]),
        (
            VmEvent::MigrationReceived(received).into(),
            vec![Change::Booted],
        ),
        (
            VmEvent::Paused.into(),
            vec![Change::State(DomainState::PAUSED_BY_USER)],
        ),
        (VmEvent::Resumed.into(), running()),
        (rebooted(RebootCause::Host), running()),
        (rebooted(RebootCause::Guest), running()),
        (
            VmEvent::Crashed(crash.clone()).into(),
            vec![
                Change::GuestPanicked(crash),
                Change::State(DomainState::new(LifeCycle::Shutoff, Reason::Crashed)),
            ],
        ),
        (lease("10.0.2.2", true), vec![Change::Interfaces]),
        (lease("10.0.2.2", false), vec![Change::Interfaces]),
        (Event::VmmShutdown { exit_code: 3 }, vec![Change::Exit]),
        (
            VmEvent::MigrationStarted {
                destination: "tcp:h:1".into(),
            }
            .into(),
            vec![],
        ),
        (
            VmEvent::MigrationFailed {
                cancelled: true,
                error: "x".into(),
            }
            .into(),
            vec![],
        ),
        (
            VmEvent::Migrated(rvmm_core::MigrationReport {
                total: Duration::ZERO,
                downtime: Duration::ZERO,
                rounds: 0,
                memory_bytes: 0,
                started_at: SystemTime::UNIX_EPOCH,
                ended_at: SystemTime::UNIX_EPOCH,
            })
            .into(),
            vec![],
        ),
        (
            VmEvent::Snapshotted(rvmm_core::SnapshotReport {
                destination: "/s".into(),
                info: rvmm_core::SnapshotInfo {
                    state_bytes: 0,
                    memory_bytes: 0,
                    memory_size: 0,
                },
                duration: Duration::ZERO,
            })
            .into(),
            vec![],
        ),
        (
            VmEvent::Restored(rvmm_core::RestoreReport {
                source: "file:///s".into(),
                duration: Duration::ZERO,
            })
            .into(),
            vec![],
        ),
    ];
    for (event, changes) in cases {
        assert_eq!(changes_for(&event), changes, "{event:?}");
    }
}

#[test]
fn stopped_vm_reason_tells_kill_from_guest_shutdown_and_failure() {
    let shutoff = |reason| vec![Change::State(DomainState::shutoff(reason))];
    for (reason, shutoff_reason) in [
        (ShutdownReason::Requested, Reason::Destroyed),
        (ShutdownReason::PowerOff, Reason::Shutdown),
        (ShutdownReason::Reset, Reason::Shutdown),
        (
            ShutdownReason::KvmFailure {
                vcpu: 0,
                exit: "KVM_EXIT_INTERNAL_ERROR".into(),
                regs: None,
            },
            Reason::Failed,
        ),
        (
            ShutdownReason::RebootFailed(
                "Cannot boot the VM again after the guest reset: x".into(),
            ),
            Reason::Failed,
        ),
    ] {
        assert_eq!(
            changes_for(&shutdown(reason.clone())),
            shutoff(shutoff_reason),
            "{reason:?}"
        );
    }
}
