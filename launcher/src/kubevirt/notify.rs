//! Domain events to virt-handler: `kubevirt.notify.v1.Notify/HandleDomainEvent` on
//! `<share-dir>/domain-notify-pipe.sock` (or the legacy `domain-notify.sock` when present),
//! after the `kubevirt.notify.info` version handshake.
//!
//! What KubeVirt's launcher sends, and so what the VM controller should: `ADDED` with the
//! domain once it is defined, `MODIFIED` with the domain on every state change, and at the
//! end `MODIFIED` with the domain in [`super::domain::DomainState::gone`] (a deletion
//! timestamp), which tells virt-handler the VM is gone. `ERROR` carries a `metav1.Status`
//! instead of a domain. Kubernetes events about the VMI (`HandleK8sEvent`, a `core/v1.Event`)
//! go to the same socket; virt-handler records them on the VMI.
//!
//! An event is retried for 20 s, as KubeVirt's notifier does, but never past the exit deadline
//! ([`ExitDeadline`]): a launcher on its way out gives up on a virt-handler that does not
//! answer (its socket gone, say) rather than hold the pod.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::runtime::Handle;
use tonic::transport::Channel;

use super::grpc::connect_unix;
use super::proto::notify::info::NotifyInfoRequest;
use super::proto::notify::info::notify_info_client::NotifyInfoClient;
use super::proto::notify::v1::notify_client::NotifyClient;
use super::proto::notify::v1::{DomainEventRequest, K8sEventRequest};

/// The notify protocol version rvmm speaks.
pub const NOTIFY_VERSION: u32 = 1;
/// virt-handler's notify socket in the share directory.
pub const NOTIFY_SOCKET: &str = "domain-notify-pipe.sock";
/// The socket's name for VMIs started by old virt-handlers.
pub const LEGACY_NOTIFY_SOCKET: &str = "domain-notify.sock";

/// A Kubernetes watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// The domain was defined.
    Added,
    /// The domain changed.
    Modified,
    /// The domain was removed.
    Deleted,
    /// The launcher hit an error; the event carries a status, not a domain.
    Error,
}

impl EventType {
    /// The wire spelling (`ADDED`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
            Self::Error => "ERROR",
        }
    }
}

/// One event for virt-handler.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainEvent {
    /// The watch event type.
    pub event_type: EventType,
    /// The `api.Domain` JSON (not for errors).
    pub domain: Option<Value>,
    /// The `metav1.Status` JSON (errors only).
    pub status: Option<Value>,
}

impl DomainEvent {
    /// The domain was defined.
    pub fn added(domain: Value) -> Self {
        Self::with_domain(EventType::Added, domain)
    }

    /// The domain changed (including the final "gone" state).
    pub fn modified(domain: Value) -> Self {
        Self::with_domain(EventType::Modified, domain)
    }

    /// The domain was removed.
    pub fn deleted(domain: Value) -> Self {
        Self::with_domain(EventType::Deleted, domain)
    }

    /// A launcher error, as a failed `metav1.Status`.
    pub fn error(message: &str) -> Self {
        Self {
            event_type: EventType::Error,
            domain: None,
            status: Some(json!({"status": "Failure", "message": message})),
        }
    }

    fn with_domain(event_type: EventType, domain: Value) -> Self {
        Self {
            event_type,
            domain: Some(domain),
            status: None,
        }
    }

    fn request(&self) -> DomainEventRequest {
        let bytes = |v: &Option<Value>| v.as_ref().map(|v| v.to_string().into_bytes());
        DomainEventRequest {
            domain_json: bytes(&self.domain).unwrap_or_default(),
            status_json: bytes(&self.status).unwrap_or_default(),
            event_type: self.event_type.as_str().into(),
        }
    }
}

/// The VMI a Kubernetes event is about, as virt-handler finds it (namespace, name, UID).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmiRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

/// A Kubernetes event about the VMI, as KubeVirt's launcher sends them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sEvent {
    /// `Warning` (all of KubeVirt's launcher events are warnings).
    pub warning: bool,
    /// The reason (`GuestPanicked`, `GuestAgentPingFailed`).
    pub reason: &'static str,
    /// The message.
    pub message: String,
}

impl K8sEvent {
    /// The `core/v1.Event` JSON about `vmi`.
    pub fn to_json(&self, vmi: &VmiRef) -> Value {
        json!({
            "metadata": {"creationTimestamp": null},
            "involvedObject": {
                "kind": "VirtualMachineInstance",
                "namespace": vmi.namespace,
                "name": vmi.name,
                "uid": vmi.uid,
                "apiVersion": "kubevirt.io/v1",
            },
            "reason": self.reason,
            "message": self.message,
            "source": {},
            "firstTimestamp": null,
            "lastTimestamp": null,
            "eventTime": null,
            "reportingComponent": "",
            "reportingInstance": "",
            "type": if self.warning { "Warning" } else { "Normal" },
        })
    }
}

/// When a launcher on its way out stops retrying undelivered events; shared by the notifier
/// and whoever ends the launcher.
#[derive(Clone, Debug, Default)]
pub struct ExitDeadline(Arc<Mutex<Option<Instant>>>);

impl ExitDeadline {
    /// Gives up on events at `when`.
    pub fn set(&self, when: Instant) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(when);
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An event could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The socket does not answer.
    #[error("Cannot connect to virt-handler at {}", path.display())]
    Connect {
        /// The notify socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The version handshake failed.
    #[error("The notify version handshake failed")]
    Handshake(#[source] tonic::Status),
    /// virt-handler speaks no version rvmm does.
    #[error("virt-handler offers notify versions {offered:?}, rvmm speaks {NOTIFY_VERSION}")]
    NoCommonVersion {
        /// virt-handler's versions.
        offered: Vec<u32>,
    },
    /// The call failed.
    #[error("Sending the domain event failed")]
    Send(#[source] tonic::Status),
    /// The call took too long.
    #[error("Sending the event timed out after {0:?}")]
    Timeout(Duration),
    /// virt-handler answered `success: false`.
    #[error("virt-handler refused the event: {0}")]
    Refused(String),
    /// The launcher is exiting and the event was not out in time.
    #[error("The launcher exited before the event was delivered")]
    Exiting,
}

/// One of the notify service's two calls.
#[derive(Clone, Debug)]
enum Call {
    Domain(DomainEventRequest),
    K8s(K8sEventRequest),
}

/// The client side of virt-handler's notify socket; reconnects as needed.
#[derive(Debug)]
pub struct Notifier {
    share_dir: PathBuf,
    client: Option<NotifyClient<Channel>>,
    /// Pause between attempts.
    pub retry_interval: Duration,
    /// Give up on an event after this long.
    pub total_timeout: Duration,
    /// Time allowed for one call.
    pub send_timeout: Duration,
    /// No retries past this once it is set.
    pub exit_deadline: ExitDeadline,
}

impl Notifier {
    /// A notifier for virt-handler's socket in `share_dir` (`--kubevirt-share-dir`), with
    /// KubeVirt's timing: retry every second for 20 s, 5 s per call.
    pub fn new(share_dir: &Path) -> Self {
        Self {
            share_dir: share_dir.to_owned(),
            client: None,
            retry_interval: Duration::from_secs(1),
            total_timeout: Duration::from_secs(20),
            send_timeout: Duration::from_secs(5),
            exit_deadline: ExitDeadline::default(),
        }
    }

    /// The socket in use: the legacy one if it exists, else the pipe.
    pub fn socket_path(&self) -> PathBuf {
        let legacy = self.share_dir.join(LEGACY_NOTIFY_SOCKET);
        if legacy.exists() {
            legacy
        } else {
            self.share_dir.join(NOTIFY_SOCKET)
        }
    }

    async fn connect(&mut self) -> Result<NotifyClient<Channel>, NotifyError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let path = self.socket_path();
        let channel = connect_unix(&path)
            .await
            .map_err(|source| NotifyError::Connect { path, source })?;
        let info = NotifyInfoClient::new(channel.clone())
            .info(NotifyInfoRequest {})
            .await
            .map_err(NotifyError::Handshake)?
            .into_inner();
        if !info.supported_notify_versions.contains(&NOTIFY_VERSION) {
            return Err(NotifyError::NoCommonVersion {
                offered: info.supported_notify_versions,
            });
        }
        let client = NotifyClient::new(channel);
        self.client = Some(client.clone());
        Ok(client)
    }

    async fn attempt(&mut self, call: Call, timeout: Duration) -> Result<(), NotifyError> {
        let call = async {
            let mut client = self.connect().await?;
            match call {
                Call::Domain(request) => client.handle_domain_event(request).await,
                Call::K8s(request) => client.handle_k8s_event(request).await,
            }
            .map_err(NotifyError::Send)
        };
        let response = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| NotifyError::Timeout(timeout))??
            .into_inner();
        if response.success {
            Ok(())
        } else {
            Err(NotifyError::Refused(response.message))
        }
    }

    /// Delivers `event`, retrying until [`Self::total_timeout`] (or the exit deadline); a
    /// refusal or a virt-handler without our notify version is not retried.
    pub async fn send(&mut self, event: &DomainEvent) -> Result<(), NotifyError> {
        self.deliver(Call::Domain(event.request())).await
    }

    /// Delivers a Kubernetes event about `vmi`, as [`Self::send`] does a domain event.
    pub async fn send_k8s_event(
        &mut self,
        event: &K8sEvent,
        vmi: &VmiRef,
    ) -> Result<(), NotifyError> {
        let request = K8sEventRequest {
            event_json: event.to_json(vmi).to_string().into_bytes(),
        };
        self.deliver(Call::K8s(request)).await
    }

    async fn deliver(&mut self, call: Call) -> Result<(), NotifyError> {
        let deadline = Instant::now() + self.total_timeout;
        let mut last = None;
        loop {
            let now = Instant::now();
            let deadline = self
                .exit_deadline
                .get()
                .map_or(deadline, |e| e.min(deadline));
            let Some(left) = deadline
                .checked_duration_since(now)
                .filter(|l| !l.is_zero())
            else {
                return Err(last.unwrap_or(NotifyError::Exiting));
            };
            match self
                .attempt(call.clone(), self.send_timeout.min(left))
                .await
            {
                Ok(()) => return Ok(()),
                // Neither gets better by asking again.
                Err(e @ (NotifyError::Refused(_) | NotifyError::NoCommonVersion { .. })) => {
                    return Err(e);
                }
                Err(e) => {
                    // Reconnect next time: the socket may have been recreated.
                    self.client = None;
                    let next = Instant::now() + self.retry_interval;
                    let deadline = self
                        .exit_deadline
                        .get()
                        .map_or(deadline, |e| e.min(deadline));
                    if next > deadline {
                        return Err(e);
                    }
                    log::debug!("event not delivered yet: {e}");
                    last = Some(e);
                    tokio::time::sleep(self.retry_interval).await;
                }
            }
        }
    }

    /// [`Self::send`] from a thread outside the runtime (the domain-event thread).
    pub fn send_blocking(
        &mut self,
        runtime: &Handle,
        event: &DomainEvent,
    ) -> Result<(), NotifyError> {
        runtime.block_on(self.send(event))
    }

    /// [`Self::send_k8s_event`] from a thread outside the runtime.
    pub fn send_k8s_event_blocking(
        &mut self,
        runtime: &Handle,
        event: &K8sEvent,
        vmi: &VmiRef,
    ) -> Result<(), NotifyError> {
        runtime.block_on(self.send_k8s_event(event, vmi))
    }
}
