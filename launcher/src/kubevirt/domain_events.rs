//! Domain events for virt-handler, from the VMM's own events.
//!
//! [`Vmm::on_event`] calls its listener with the VMM's lock held, so the listener only
//! translates the event ([`changes_for`], an exhaustive `match` over [`Event`]), records the
//! domain's new state and queues the changes; the `kubevirt-notify` thread builds each domain
//! and delivers it through the [`Notifier`], in order:
//!
//! | VMM event ([`Event`]) | domain state | sent |
//! | --- | --- | --- |
//! | `Booted`, `MigrationReceived` | Running | `ADDED` the first time, `MODIFIED` after |
//! | `Paused` | Paused (User) | `MODIFIED` |
//! | `Resumed`, `Rebooted` (by the host or the guest) | Running | `MODIFIED` |
//! | `Shutdown` | Shutoff: Destroyed (`Requested`: stopped by rvmm: kill, delete, grace period over), Shutdown (`PowerOff`, or `Reset` with nothing to boot it again or after the power button), Failed (`KvmFailure`, `RebootFailed`), Migrated (any, after a live migration away) | `MODIFIED` |
//! | `Crashed` | Shutoff (Crashed) | the Kubernetes event `GuestPanicked`, then `MODIFIED` |
//! | `VmmShutdown` | NoState (NonExistent), deletion timestamp | `MODIFIED`, the final event, unless sent already |
//! | `Dhcp` (a lease bound or released) | unchanged; the guest's address in `Status.Interfaces` (cleared when the VM stops) | `MODIFIED` |
//! | `Snapshotted`, `Restored`, `MigrationStarted`, `Migrated`, `MigrationFailed` | unchanged (a migration's progress goes out in its metadata) | nothing |
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

use rvmm_core::seccomp::{BpfProgram, SpawnError, spawn_filtered};
use rvmm_core::{CrashReason, ShutdownReason, VmEvent};
use tokio::runtime::Handle;

use super::backend::DomainRecord;
use super::domain::{DomainState, LifeCycle, Reason};
use super::notify::{DomainEvent, ExitDeadline, K8sEvent, Notifier, NotifyError, VmiRef};
use crate::dhcp::handler::LeaseChange;
use crate::dhcp::server::format_mac;
use crate::errors::error_chain;
use crate::events::Event;
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
    /// The guest crashed (how): the Kubernetes event `GuestPanicked`.
    GuestPanicked(CrashReason),
    /// GuestPing found no guest agent: the Kubernetes event `GuestAgentPingFailed`.
    GuestAgentPingFailed,
    /// The guest's addresses changed (a DHCP lease); the state did not.
    Interfaces,
}

/// The changes a VMM event means for the domain, in order.
pub fn changes_for(event: &Event) -> Vec<Change> {
    match event {
        Event::Vm(event) => vm_changes(event),
        Event::Dhcp(_) => vec![Change::Interfaces],
        Event::VmmShutdown { .. } => vec![Change::Exit],
    }
}

fn vm_changes(event: &VmEvent) -> Vec<Change> {
    match event {
        // A VM that came in by live migration appears as one that booted.
        VmEvent::Booted(_) | VmEvent::MigrationReceived(_) => vec![Change::Booted],
        VmEvent::Paused => vec![Change::State(DomainState::PAUSED_BY_USER)],
        VmEvent::Resumed | VmEvent::Rebooted { .. } => vec![Change::State(DomainState::RUNNING)],
        VmEvent::Shutdown(reason) => vec![Change::State(DomainState::shutoff(stop_reason(reason)))],
        VmEvent::Crashed(reason) => vec![
            Change::GuestPanicked(reason.clone()),
            Change::State(DomainState::shutoff(Reason::Crashed)),
        ],
        // The domain's state does not change: a restored VM is not a KubeVirt domain, and the
        // migration's own progress reaches virt-handler through the migration metadata.
        VmEvent::Snapshotted(_)
        | VmEvent::Restored(_)
        | VmEvent::MigrationStarted { .. }
        | VmEvent::Migrated(_)
        | VmEvent::MigrationFailed { .. } => vec![],
    }
}

/// The Shutoff reason of a VM that stopped.
fn stop_reason(reason: &ShutdownReason) -> Reason {
    match reason {
        ShutdownReason::Requested => Reason::Destroyed,
        ShutdownReason::PowerOff | ShutdownReason::Reset => Reason::Shutdown,
        ShutdownReason::KvmFailure { .. } | ShutdownReason::RebootFailed(_) => Reason::Failed,
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
        Box::new(move |event| {
            for change in changes_for(event) {
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
                        if let Event::Dhcp(lease) = event {
                            let (address, held) = match lease.change {
                                LeaseChange::Bound(address) => (address, true),
                                LeaseChange::Released(address) => (address, false),
                            };
                            record.set_guest_address(&format_mac(&lease.mac), address, held);
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
#[path = "domain_events_tests.rs"]
mod tests;
