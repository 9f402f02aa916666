//! Domain events for virt-handler, from the VMM's own events.
//!
//! [`Vmm::on_event`] calls its listener with the VMM's lock held, so the listener only
//! translates the event ([`changes_for`]), records the domain's new state and queues the
//! changes; the `kubevirt-notify` thread builds each domain and delivers it through the
//! [`Notifier`], in order:
//!
//! | VMM event | domain state | sent |
//! | --- | --- | --- |
//! | `vm.booted`, `vm.migration-received` | Running | `ADDED` the first time, `MODIFIED` after |
//! | `vm.paused` | Paused (User) | `MODIFIED` |
//! | `vm.resumed`, `vm.rebooted` (also a guest's own reboot) | Running | `MODIFIED` |
//! | `vm.shutdown` | Shutoff: Destroyed (stopped by rvmm: kill, delete, grace period over), Shutdown (the guest powered off, or reset after the power button), Failed (KVM could not run it, or it could not boot again), Migrated (after a live migration away) | `MODIFIED` |
//! | `guest.crashed` | Shutoff (Crashed) | the Kubernetes event `GuestPanicked`, then `MODIFIED` |
//! | `vmm.shutdown` | NoState (NonExistent), deletion timestamp | `MODIFIED`, the final event, unless sent already |
//! | `net.dhcp-lease`, `net.dhcp-release` | unchanged; the guest's address in `Status.Interfaces` (cleared when the VM stops) | `MODIFIED` |
//!
//! The command backend adds its own: [`Change::Metadata`] (the grace-period metadata changed: a
//! graceful shutdown was asked for or SIGTERM came), [`Change::Deleted`] and
//! [`Change::GuestAgentPingFailed`] (the Kubernetes event `GuestAgentPingFailed`).
//!
//! The end, as KubeVirt's launcher: the domain of a VM that stopped (the guest powered off or
//! crashed, or virt-handler killed it) stays, Shutoff, until virt-handler deletes it
//! (DeleteVirtualMachine): only then goes the final event (NoState, with a deletion timestamp)
//! and the launcher exits. Sending it right after Shutoff would let virt-handler take its
//! orphan path before it records the VMI's end, and later fail the VMI (Running, no domain).
//! Without a deletion within [`DELETE_WAIT`] (KubeVirt's launcher waits 15 s, kills, and waits
//! 30 s more) the launcher exits all the same. Events that cannot be delivered are logged once
//! (then counted); at exit, the last events get until the exit deadline
//! ([`DomainEvents::finish`]).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rvmm_core::StopReason;
use rvmm_core::seccomp::{BpfProgram, SpawnError, spawn_filtered};
use serde_json::Value;
use tokio::runtime::Handle;

use super::backend::DomainRecord;
use super::domain::{DomainState, LifeCycle, Reason};
use super::notify::{DomainEvent, ExitDeadline, K8sEvent, Notifier, NotifyError, VmiRef};
use crate::errors::error_chain;
use crate::vmm::{EventListener, Vmm};

/// How long a stopped VM's launcher waits for virt-handler to delete the domain.
pub const DELETE_WAIT: Duration = Duration::from_secs(45);

/// Something virt-handler must hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The VM booted: `ADDED` the first time, then `MODIFIED`.
    Booted,
    /// The VM is now in this state.
    State(DomainState),
    /// The grace-period metadata changed; the state did not.
    Metadata,
    /// The domain was deleted: send the final event, then end the launcher.
    Deleted,
    /// The VMM is exiting: send the final event if it is still owed, then stop.
    Exit,
    /// The guest crashed (the reason): the Kubernetes event `GuestPanicked`.
    GuestPanicked(String),
    /// GuestPing found no guest agent: the Kubernetes event `GuestAgentPingFailed`.
    GuestAgentPingFailed,
    /// The guest's addresses changed (a DHCP lease); the state did not.
    Interfaces,
}

/// The changes a VMM event means for the domain, in order.
pub fn changes_for(event: &str, properties: &Value) -> Vec<Change> {
    match event {
        // A VM that came in by live migration appears as one that booted.
        "vm.booted" | "vm.migration-received" => vec![Change::Booted],
        "vm.paused" => vec![Change::State(DomainState::PAUSED_BY_USER)],
        "vm.resumed" | "vm.rebooted" => vec![Change::State(DomainState::RUNNING)],
        "vm.shutdown" => vec![Change::State(DomainState::shutoff(stop_reason(properties)))],
        "guest.crashed" => vec![
            Change::GuestPanicked(properties["reason"].as_str().unwrap_or_default().into()),
            Change::State(DomainState::shutoff(Reason::Crashed)),
        ],
        "vmm.shutdown" => vec![Change::Exit],
        "net.dhcp-lease" | "net.dhcp-release" => vec![Change::Interfaces],
        _ => vec![],
    }
}

/// Why a VM stopped, from `vm.shutdown`'s `reason` (a [`StopReason`]'s text).
fn stop_reason(properties: &Value) -> Reason {
    let reason = properties["reason"].as_str().unwrap_or_default();
    if reason == StopReason::Requested.to_string() {
        Reason::Destroyed
    } else if reason == StopReason::PowerOff.to_string() || reason == StopReason::Reset.to_string()
    {
        Reason::Shutdown
    } else {
        Reason::Failed
    }
}

/// The `kubevirt-notify` thread and the queue feeding it.
#[derive(Debug)]
pub struct DomainEvents {
    changes: Sender<Change>,
    flushed: Receiver<()>,
    exit_deadline: ExitDeadline,
    thread: Option<JoinHandle<()>>,
}

impl DomainEvents {
    /// Starts the thread: it builds domains from `record` and sends them, and Kubernetes events
    /// about `vmi`, with `notifier` on `runtime`; once the domain is deleted (or was not
    /// within `delete_wait`, [`DELETE_WAIT`] in a pod, of the VM's stop) it asks `vmm` to exit.
    pub fn start(
        notifier: Notifier,
        runtime: Handle,
        record: Arc<DomainRecord>,
        vmm: Arc<Vmm>,
        vmi: VmiRef,
        delete_wait: Duration,
        filter: Option<BpfProgram>,
    ) -> Result<Self, SpawnError> {
        let (changes, queue) = channel();
        let (done, flushed) = channel();
        let exit_deadline = notifier.exit_deadline.clone();
        let mut sender = EventSender {
            notifier,
            runtime,
            record,
            vmm,
            vmi,
            state: None,
            added: false,
            final_sent: false,
            delete_wait,
            delete_by: None,
            undelivered: 0,
        };
        let thread = spawn_filtered("kubevirt-notify", filter, move || {
            while let Some(change) = sender.next(&queue) {
                if sender.handle(change) {
                    break;
                }
            }
            let _ = done.send(());
        })?;
        Ok(Self {
            changes,
            flushed,
            exit_deadline,
            thread: Some(thread),
        })
    }

    /// Where the command backend queues its changes.
    pub fn sender(&self) -> Sender<Change> {
        self.changes.clone()
    }

    /// The VMM event listener for [`Vmm::on_event`]: records each state in `record` and queues
    /// the changes. It takes only `record`'s state lock, which nobody holds while calling into
    /// the VMM.
    pub fn listener(&self, record: Arc<DomainRecord>) -> EventListener {
        let changes = self.changes.clone();
        Box::new(move |event, properties| {
            for change in changes_for(event, properties) {
                // A stop after the VM migrated away is reported as Shutoff (Migrated).
                let change = match change {
                    Change::State(state) => Change::State(record.event_state(state)),
                    other => other,
                };
                match &change {
                    Change::Booted => record.set_state(DomainState::RUNNING),
                    Change::State(state) => {
                        record.set_state(*state);
                        if state.status == LifeCycle::Shutoff {
                            // Nothing holds a lease in a stopped VM.
                            record.clear_guest_addresses();
                        }
                    }
                    Change::Interfaces => {
                        let address = properties["address"].as_str().and_then(|a| a.parse().ok());
                        if let (Some(mac), Some(address)) = (properties["mac"].as_str(), address) {
                            record.set_guest_address(mac, address, event == "net.dhcp-lease");
                        }
                    }
                    _ => {}
                }
                let _ = changes.send(change);
            }
        })
    }

    /// At exit (after the VMM's `vmm.shutdown`): gives the last events until `within` from
    /// now, then waits for the thread to end. False when it did not end in time (it is then
    /// still inside the runtime: keep the runtime alive).
    pub fn finish(mut self, within: Duration) -> bool {
        self.exit_deadline.set(Instant::now() + within);
        // The last attempt ends at the deadline; a retry pause may add a second.
        match self.flushed.recv_timeout(within + Duration::from_secs(2)) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
        }
    }
}

struct EventSender {
    notifier: Notifier,
    runtime: Handle,
    record: Arc<DomainRecord>,
    vmm: Arc<Vmm>,
    vmi: VmiRef,
    /// The state of the last change handled: metadata changes go out in it (the record's
    /// state may be ahead of the queue).
    state: Option<DomainState>,
    /// `ADDED` went out.
    added: bool,
    /// The final (deleted) event went out.
    final_sent: bool,
    /// How long a stopped VM waits for its deletion.
    delete_wait: Duration,
    /// The VM stopped: the launcher exits at this time if the domain was not deleted by then.
    delete_by: Option<Instant>,
    /// Events not delivered (the first is logged with its cause).
    undelivered: usize,
}

impl EventSender {
    /// The next change; `None` once nobody can queue any. While a stopped VM waits for its
    /// deletion, gives up waiting at [`DELETE_WAIT`] and ends the launcher.
    fn next(&mut self, queue: &Receiver<Change>) -> Option<Change> {
        loop {
            let Some(deadline) = self.delete_by else {
                return queue.recv().ok();
            };
            match queue.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(change) => return Some(change),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    log::warn!(
                        "The VM stopped {} s ago and virt-handler did not delete its domain: \
                         exiting",
                        self.delete_wait.as_secs()
                    );
                    self.delete_by = None;
                    self.vmm.request_exit(self.vmm.vm_end_code());
                }
            }
        }
    }

    /// Sends what `change` calls for; true once the thread's work is done.
    fn handle(&mut self, change: Change) -> bool {
        match change {
            Change::Booted => {
                self.running();
                if let Some(domain) = self.record.domain_in(DomainState::RUNNING) {
                    let event = if std::mem::replace(&mut self.added, true) {
                        DomainEvent::modified(domain)
                    } else {
                        DomainEvent::added(domain)
                    };
                    self.send(&event);
                }
            }
            Change::State(state) => {
                if state.status == LifeCycle::Shutoff {
                    self.delete_by
                        .get_or_insert(Instant::now() + self.delete_wait);
                } else {
                    self.running();
                }
                self.state = Some(state);
                if let Some(domain) = self.record.domain_in(state) {
                    self.send(&DomainEvent::modified(domain));
                }
            }
            Change::Metadata | Change::Interfaces => {
                if let Some(state) = self.state
                    && let Some(domain) = self.record.domain_in(state)
                {
                    self.send(&DomainEvent::modified(domain));
                }
            }
            Change::Deleted => {
                self.delete_by = None;
                self.send_final();
                self.vmm.request_exit(self.vmm.vm_end_code());
            }
            Change::Exit => {
                self.send_final();
                if self.undelivered > 1 {
                    log::warn!(
                        "{} events were not delivered to virt-handler",
                        self.undelivered
                    );
                }
                return true;
            }
            Change::GuestPanicked(reason) => self.send_k8s_event(K8sEvent {
                warning: true,
                reason: "GuestPanicked",
                message: format!("GuestPanicked: {reason}"),
            }),
            Change::GuestAgentPingFailed => self.send_k8s_event(K8sEvent {
                warning: true,
                reason: "GuestAgentPingFailed",
                message: format!("GuestAgentPing probe failed for VMI {}", self.vmi.name),
            }),
        }
        false
    }

    /// The VM runs (again): nothing to wait for.
    fn running(&mut self) {
        self.state = Some(DomainState::RUNNING);
        self.delete_by = None;
    }

    /// The domain gone (NoState, deletion timestamp), once, if it ever existed.
    fn send_final(&mut self) {
        if !self.added || std::mem::replace(&mut self.final_sent, true) {
            return;
        }
        if let Some(domain) = self.record.domain_in(DomainState::gone(SystemTime::now())) {
            self.send(&DomainEvent::modified(domain));
        }
    }

    fn send(&mut self, event: &DomainEvent) {
        let status = event
            .domain
            .as_ref()
            .map(|d| {
                let status = &d["Status"];
                format!(
                    "{}({})",
                    status["Status"].as_str().unwrap_or_default(),
                    status["Reason"].as_str().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        let what = format!("Domain event {} {status}", event.event_type.as_str());
        let sent = self.notifier.send_blocking(&self.runtime, event);
        self.delivered(&what, sent);
    }

    fn send_k8s_event(&mut self, event: K8sEvent) {
        let what = format!("Kubernetes event {}", event.reason);
        let sent = self
            .notifier
            .send_k8s_event_blocking(&self.runtime, &event, &self.vmi);
        self.delivered(&what, sent);
    }

    fn delivered(&mut self, what: &str, sent: Result<(), NotifyError>) {
        match sent {
            Ok(()) => log::info!("{what} sent to virt-handler"),
            Err(e) => {
                self.undelivered += 1;
                if self.undelivered == 1 {
                    log::warn!(
                        "{what} not delivered ({}); further undelivered events are counted",
                        error_chain(&e)
                    );
                } else {
                    log::debug!("{what} not delivered: {}", error_chain(&e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
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
            (self.listener)("vmm.shutdown", &json!({"exit_code": 0}));
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

    #[test]
    fn vm_life_reaches_virt_handler_in_order_with_the_final_event_before_exit() {
        let h = Harness::new("events-life");
        (h.listener)("vm.booted", &json!({"vcpus": 1}));
        (h.listener)("vm.paused", &Value::Null);
        h.send(Change::Metadata);
        (h.listener)("vm.resumed", &Value::Null);
        (h.listener)("vm.rebooted", &json!({"cause": "guest"}));
        let killed = json!({"reason": StopReason::Requested.to_string()});
        (h.listener)("vm.shutdown", &killed);
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
        (h.listener)("vm.booted", &Value::Null);
        let off = json!({"reason": StopReason::PowerOff.to_string()});
        (h.listener)("vm.shutdown", &off);
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
        (h.listener)("vm.booted", &Value::Null);
        let start = Instant::now();
        (h.listener)(
            "guest.crashed",
            &json!({"reason": "Guest triple fault on vCPU 0"}),
        );
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
            "GuestPanicked: Guest triple fault on vCPU 0"
        );
        assert_eq!(panicked["involvedObject"]["uid"], "u-1");
    }

    #[test]
    fn a_vm_booted_again_waits_for_no_deletion() {
        let mut h = Harness::with("events-reboot", true, Duration::from_millis(200));
        (h.listener)("vm.booted", &Value::Null);
        (h.listener)("vm.shutdown", &json!({"reason": "Stopped on request"}));
        (h.listener)("vm.rebooted", &Value::Null);
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
        (h.listener)("vm.booted", &Value::Null);
        h.send(Change::Metadata);
        (h.listener)("vm.shutdown", &json!({"reason": "Stopped on request"}));
        (h.listener)("vmm.shutdown", &json!({"exit_code": 0}));
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
        let lease = json!({"id": "default", "mac": "02:00:00:00:00:01",
                           "address": "10.0.2.2", "prefix_len": 24});
        let lease6 = json!({"id": "default", "mac": "02:00:00:00:00:01",
                            "address": "fd10:0:2::2", "prefix_len": 120});
        let stopped = json!({"reason": StopReason::Requested.to_string()});
        let interfaces = |ips: &[&str]| json!([{"Mac": "02:00:00:00:00:01", "Ip": ips[0], "IPs": ips, "InterfaceName": ""}]);
        // Each event is built when sent, from the record as it is then: one at a time.
        for (event, properties, expected) in [
            ("vm.booted", json!({}), Value::Null),
            ("net.dhcp-lease", lease.clone(), interfaces(&["10.0.2.2"])),
            (
                "net.dhcp-lease",
                lease6,
                interfaces(&["10.0.2.2", "fd10:0:2::2"]),
            ),
            (
                "net.dhcp-release",
                lease.clone(),
                interfaces(&["fd10:0:2::2"]),
            ),
            (
                "net.dhcp-lease",
                lease,
                interfaces(&["10.0.2.2", "fd10:0:2::2"]),
            ),
            ("vm.shutdown", stopped, Value::Null),
        ] {
            (h.listener)(event, &properties);
            let start = Instant::now();
            let request = loop {
                if let Ok(request) = h.received.try_recv() {
                    break request;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "{event} not delivered"
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            let domain: Value = serde_json::from_slice(&request.domain_json).unwrap();
            assert_eq!(domain["Status"]["Interfaces"], expected, "after {event}");
        }
        h.exit();
    }

    #[test]
    fn vmm_exit_without_a_booted_vm_sends_nothing() {
        let mut h = Harness::new("events-none").exit();
        assert_eq!(h.delivered(), []);
    }

    #[test]
    fn vmm_events_map_to_domain_changes() {
        let none = Value::Null;
        assert_eq!(changes_for("vm.booted", &none), [Change::Booted]);
        assert_eq!(
            changes_for("vm.paused", &none),
            [Change::State(DomainState::PAUSED_BY_USER)]
        );
        for resumed in ["vm.resumed", "vm.rebooted"] {
            assert_eq!(
                changes_for(resumed, &none),
                [Change::State(DomainState::RUNNING)]
            );
        }
        assert_eq!(
            changes_for("guest.crashed", &json!({"reason": "Guest triple fault"})),
            [
                Change::GuestPanicked("Guest triple fault".into()),
                Change::State(DomainState::new(LifeCycle::Shutoff, Reason::Crashed))
            ]
        );
        assert_eq!(
            changes_for("vmm.shutdown", &json!({"exit_code": 0})),
            [Change::Exit]
        );
        assert_eq!(changes_for("vm.created", &none), []);
    }

    #[test]
    fn stopped_vm_reason_tells_kill_from_guest_shutdown_and_failure() {
        let stopped = |reason: String| changes_for("vm.shutdown", &json!({ "reason": reason }));
        let shutoff = |reason| vec![Change::State(DomainState::shutoff(reason))];
        assert_eq!(
            stopped(StopReason::Requested.to_string()),
            shutoff(Reason::Destroyed)
        );
        assert_eq!(
            stopped(StopReason::PowerOff.to_string()),
            shutoff(Reason::Shutdown)
        );
        assert_eq!(
            stopped(StopReason::Reset.to_string()),
            shutoff(Reason::Shutdown)
        );
        let kvm = StopReason::KvmFailure {
            vcpu: 0,
            exit: "KVM_EXIT_INTERNAL_ERROR".into(),
            regs: None,
        };
        assert_eq!(stopped(kvm.to_string()), shutoff(Reason::Failed));
        assert_eq!(
            stopped("Cannot boot the VM again after the guest reset: x".into()),
            shutoff(Reason::Failed)
        );
    }
}
