//! Domain events for virt-handler, from the VMM's own events.
//!
//! [`Vmm::on_event`] calls its listener with the VMM's lock held, so the listener only
//! translates the event ([`change_for`]), records the domain's new state and queues the
//! change; the `kubevirt-notify` thread builds each domain and delivers it through the
//! [`Notifier`], in order:
//!
//! | VMM event | domain state | sent |
//! | --- | --- | --- |
//! | `vm.booted`, `vm.migration-received` | Running | `ADDED` the first time, `MODIFIED` after |
//! | `vm.paused` | Paused (User) | `MODIFIED` |
//! | `vm.resumed`, `vm.rebooted` | Running | `MODIFIED` |
//! | `vm.shutdown` | Shutoff: Destroyed (stopped by rvmm: kill, delete, grace period over), Shutdown (the guest powered off or reset), Failed (KVM could not run it), Migrated (after a live migration away) | `MODIFIED` |
//! | `guest.crashed` | Shutoff (Crashed) | `MODIFIED` |
//! | `vmm.shutdown` | NoState (NonExistent), deletion timestamp | `MODIFIED`, the final event |
//!
//! The command backend adds two of its own: [`Change::Metadata`] (the grace-period metadata
//! changed: a graceful shutdown was asked for or SIGTERM came) and [`Change::Deleted`] (the
//! domain was deleted: the final event is sent at once and the VMM asked to exit, as
//! KubeVirt's launcher ends once its domain is gone). The launcher waits for the final event
//! before it exits ([`DomainEvents::wait_flushed`]).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::runtime::Handle;
use vmm_core::StopReason;

use super::backend::DomainRecord;
use super::domain::{DomainState, Reason};
use super::grpc::error_chain;
use super::notify::{DomainEvent, Notifier};
use crate::vmm::{EXIT_OK, EventListener, Vmm};

/// Something virt-handler must hear about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

/// The change a VMM event means for the domain, if any.
pub fn change_for(event: &str, properties: &Value) -> Option<Change> {
    Some(match event {
        // A VM that came in by live migration appears as one that booted.
        "vm.booted" | "vm.migration-received" => Change::Booted,
        "vm.paused" => Change::State(DomainState::PAUSED_BY_USER),
        "vm.resumed" | "vm.rebooted" => Change::State(DomainState::RUNNING),
        "vm.shutdown" => Change::State(DomainState::shutoff(stop_reason(properties))),
        "guest.crashed" => Change::State(DomainState::shutoff(Reason::Crashed)),
        "vmm.shutdown" => Change::Exit,
        _ => return None,
    })
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
}

impl DomainEvents {
    /// Starts the thread: it builds domains from `record` and sends them with `notifier` on
    /// `runtime`; after a deletion it asks `vmm` to exit.
    pub fn start(
        notifier: Notifier,
        runtime: Handle,
        record: Arc<DomainRecord>,
        vmm: Arc<Vmm>,
    ) -> std::io::Result<Self> {
        let (changes, queue) = channel();
        let (done, flushed) = channel();
        let mut sender = EventSender {
            notifier,
            runtime,
            record,
            vmm,
            state: None,
            added: false,
            final_sent: false,
        };
        std::thread::Builder::new()
            .name("kubevirt-notify".into())
            .spawn(move || {
                while let Ok(change) = queue.recv() {
                    if sender.handle(change) {
                        let _ = done.send(());
                        return;
                    }
                }
            })?;
        Ok(Self { changes, flushed })
    }

    /// Where the command backend queues its changes.
    pub fn sender(&self) -> Sender<Change> {
        self.changes.clone()
    }

    /// The VMM event listener for [`Vmm::on_event`]: records each state in `record` and queues
    /// the change. It takes only `record`'s state lock, which nobody holds while calling into
    /// the VMM.
    pub fn listener(&self, record: Arc<DomainRecord>) -> EventListener {
        let changes = self.changes.clone();
        Box::new(move |event, properties| {
            let Some(change) = change_for(event, properties) else {
                return;
            };
            let change = match change {
                Change::State(state) => Change::State(record.event_state(state)),
                other => other,
            };
            match change {
                Change::Booted => record.set_state(DomainState::RUNNING),
                Change::State(state) => record.set_state(state),
                Change::Metadata | Change::Deleted | Change::Exit => {}
            }
            let _ = changes.send(change);
        })
    }

    /// Waits until the final event is delivered (or given up on), at most `timeout`; false on
    /// timeout.
    pub fn wait_flushed(&self, timeout: Duration) -> bool {
        match self.flushed.recv_timeout(timeout) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => false,
        }
    }
}

struct EventSender {
    notifier: Notifier,
    runtime: Handle,
    record: Arc<DomainRecord>,
    vmm: Arc<Vmm>,
    /// The state of the last change handled: metadata changes go out in it (the record's
    /// state may be ahead of the queue).
    state: Option<DomainState>,
    /// `ADDED` went out.
    added: bool,
    /// The final (deleted) event went out.
    final_sent: bool,
}

impl EventSender {
    /// Sends what `change` calls for; true once the thread's work is done.
    fn handle(&mut self, change: Change) -> bool {
        match change {
            Change::Booted => {
                self.state = Some(DomainState::RUNNING);
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
                self.state = Some(state);
                if let Some(domain) = self.record.domain_in(state) {
                    self.send(&DomainEvent::modified(domain));
                }
            }
            Change::Metadata => {
                if let Some(state) = self.state
                    && let Some(domain) = self.record.domain_in(state)
                {
                    self.send(&DomainEvent::modified(domain));
                }
            }
            Change::Deleted => {
                self.send_final();
                self.vmm.request_exit(EXIT_OK);
            }
            Change::Exit => {
                self.send_final();
                return true;
            }
        }
        false
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
        match self.notifier.send_blocking(&self.runtime, event) {
            Ok(()) => log::info!(
                "Domain event {} {status} sent to virt-handler",
                event.event_type.as_str()
            ),
            Err(e) => log::warn!(
                "Domain event {} {status} not delivered: {}",
                event.event_type.as_str(),
                error_chain(&e)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::kubevirt::domain::LifeCycle;
    use crate::kubevirt::grpc::GrpcRuntime;
    use crate::kubevirt::grpc::tests::{TempDir, fake_virt_handler};
    use crate::kubevirt::proto::notify::v1::DomainEventRequest;
    use crate::kubevirt::vmi::{LauncherDirs, Vmi, plan};

    /// The event thread sending to a fake virt-handler in a temporary share directory, for a
    /// synced kernel-boot VMI (no KVM: the VMM's events are fed to the listener by hand).
    struct Harness {
        _dir: TempDir,
        _runtime: GrpcRuntime,
        vmm: Arc<Vmm>,
        events: DomainEvents,
        listener: EventListener,
        received: tokio::sync::mpsc::UnboundedReceiver<DomainEventRequest>,
    }

    impl Harness {
        fn new(tag: &str) -> Self {
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
            let received = {
                let _entered = runtime.handle().enter();
                fake_virt_handler(&dir.0, vec![1])
            };
            let vmm = Vmm::without_kvm();
            let events = DomainEvents::start(
                Notifier::new(&dir.0),
                runtime.handle().clone(),
                record.clone(),
                vmm.clone(),
            )
            .unwrap();
            let listener = events.listener(record);
            Self {
                _dir: dir,
                _runtime: runtime,
                vmm,
                events,
                listener,
                received,
            }
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
    }

    fn event(kind: &str, status: &str, reason: &str, gone: bool) -> (String, String, String, bool) {
        (kind.into(), status.into(), reason.into(), gone)
    }

    #[test]
    fn vm_life_reaches_virt_handler_in_order_with_the_final_event_before_exit() {
        let mut h = Harness::new("events-life");
        (h.listener)("vm.booted", &json!({"vcpus": 1}));
        (h.listener)("vm.paused", &Value::Null);
        h.events.sender().send(Change::Metadata).unwrap();
        (h.listener)("vm.resumed", &Value::Null);
        let killed = json!({"reason": StopReason::Requested.to_string()});
        (h.listener)("vm.shutdown", &killed);
        (h.listener)("vmm.shutdown", &json!({"exit_code": 0}));
        assert!(h.events.wait_flushed(Duration::from_secs(20)));
        assert_eq!(
            h.delivered(),
            [
                event("ADDED", "Running", "Unknown", false),
                event("MODIFIED", "Paused", "User", false),
                event("MODIFIED", "Paused", "User", false),
                event("MODIFIED", "Running", "Unknown", false),
                event("MODIFIED", "Shutoff", "Destroyed", false),
                event("MODIFIED", "NoState", "NonExistent", true),
            ]
        );
    }

    #[test]
    fn deletion_sends_the_final_event_once_and_ends_the_vmm() {
        let mut h = Harness::new("events-delete");
        (h.listener)("vm.booted", &Value::Null);
        h.events.sender().send(Change::Deleted).unwrap();
        assert_eq!(h.vmm.wait_for_exit(), EXIT_OK);
        (h.listener)("vmm.shutdown", &json!({"exit_code": 0}));
        assert!(h.events.wait_flushed(Duration::from_secs(20)));
        assert_eq!(
            h.delivered(),
            [
                event("ADDED", "Running", "Unknown", false),
                event("MODIFIED", "NoState", "NonExistent", true),
            ]
        );
    }

    #[test]
    fn vmm_exit_without_a_booted_vm_sends_nothing() {
        let mut h = Harness::new("events-none");
        (h.listener)("vmm.shutdown", &json!({"exit_code": 1}));
        assert!(h.events.wait_flushed(Duration::from_secs(20)));
        assert_eq!(h.delivered(), []);
    }

    #[test]
    fn vmm_events_map_to_domain_changes() {
        let none = Value::Null;
        assert_eq!(change_for("vm.booted", &none), Some(Change::Booted));
        assert_eq!(
            change_for("vm.paused", &none),
            Some(Change::State(DomainState::PAUSED_BY_USER))
        );
        for resumed in ["vm.resumed", "vm.rebooted"] {
            assert_eq!(
                change_for(resumed, &none),
                Some(Change::State(DomainState::RUNNING))
            );
        }
        assert_eq!(
            change_for("guest.crashed", &json!({"reason": "Guest triple fault"})),
            Some(Change::State(DomainState::new(
                LifeCycle::Shutoff,
                Reason::Crashed
            )))
        );
        assert_eq!(
            change_for("vmm.shutdown", &json!({"exit_code": 0})),
            Some(Change::Exit)
        );
        assert_eq!(change_for("vm.created", &none), None);
    }

    #[test]
    fn stopped_vm_reason_tells_kill_from_guest_shutdown_and_failure() {
        let stopped = |reason: String| change_for("vm.shutdown", &json!({ "reason": reason }));
        let shutoff = |reason| Some(Change::State(DomainState::shutoff(reason)));
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
    }
}
