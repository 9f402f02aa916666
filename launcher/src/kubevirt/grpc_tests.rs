//! The command server and notify client against real unix sockets in a temporary directory,
//! with a fake backend and a fake virt-handler notify server.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tokio::sync::mpsc;

use super::*;
use crate::kubevirt::notify::{DomainEvent, K8sEvent, Notifier, NotifyError, VmiRef};
use crate::kubevirt::proto::cmd::info::cmd_info_client::CmdInfoClient;
use crate::kubevirt::proto::cmd::v1::cmd_client::CmdClient;
use crate::kubevirt::proto::notify::info::notify_info_server::{NotifyInfo, NotifyInfoServer};
use crate::kubevirt::proto::notify::info::{NotifyInfoRequest, NotifyInfoResponse};
use crate::kubevirt::proto::notify::v1 as notify;
use crate::kubevirt::proto::notify::v1::notify_server::{Notify, NotifyServer};

/// A temporary directory, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rvmm-grpc-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Records calls; fails the ones named in `fail`, takes `slow` to answer the one named there.
#[derive(Default)]
pub(crate) struct FakeBackend {
    calls: Mutex<Vec<String>>,
    fail: Option<&'static str>,
    slow: Option<(&'static str, Duration)>,
}

impl FakeBackend {
    fn record(&self, what: &str, vmi: &Vmi) -> Result<(), BackendError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{what} {}", vmi.domain_name()));
        if let Some((slow, delay)) = self.slow
            && slow == what
        {
            std::thread::sleep(delay);
        }
        if self.fail == Some(what) {
            return Err(BackendError::Controller("vCPU thread died".into()));
        }
        Ok(())
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl LauncherBackend for FakeBackend {
    fn sync(&self, vmi: &Vmi, options: &cmd::VirtualMachineOptions) -> Result<(), BackendError> {
        let formats: Vec<_> = options
            .disks_info
            .values()
            .map(|d| d.format.clone())
            .collect();
        self.record(&format!("sync{formats:?}"), vmi)
    }
    fn pause(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("pause", vmi)
    }
    fn unpause(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("unpause", vmi)
    }
    fn shutdown(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("shutdown", vmi)
    }
    fn kill(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("kill", vmi)
    }
    fn delete(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("delete", vmi)
    }
    fn reset(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("reset", vmi)
    }
    fn soft_reboot(&self, _: &Vmi) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(
            "A soft reboot without a guest agent",
        ))
    }
    fn domain(&self) -> Option<Value> {
        let synced = self.calls().iter().any(|c| c.starts_with("sync"));
        synced.then(|| json!({"kind": "Domain", "Status": {"Status": "Running"}}))
    }
    fn domain_stats(&self) -> Result<Option<Value>, BackendError> {
        Ok(Some(json!({"Name": "default_testvm", "Cpu": {}})))
    }
    fn migrate(&self, vmi: &Vmi, options: &[u8]) -> Result<(), BackendError> {
        self.record(&format!("migrate{}", String::from_utf8_lossy(options)), vmi)
    }
    fn sync_migration_target(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("sync-migration-target", vmi)
    }
    fn cancel_migration(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("cancel-migration", vmi)
    }
    fn finalize_migration(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("finalize-migration", vmi)
    }
    fn signal_target_pod_cleanup(&self, vmi: &Vmi) -> Result<(), BackendError> {
        self.record("signal-target-pod-cleanup", vmi)
    }
    fn guest_ping_failed(&self) {
        self.calls.lock().unwrap().push("guest ping failed".into());
    }
}

fn vmi_request(json: &str) -> cmd::VmiRequest {
    cmd::VmiRequest {
        vmi: Some(cmd::Vmi {
            vmi_json: json.as_bytes().to_vec(),
        }),
        options: None,
    }
}

/// Awaits a call that must reach the server and returns its reply.
async fn reply<T>(call: impl Future<Output = Result<Response<T>, Status>>) -> T {
    call.await.unwrap().into_inner()
}

/// Whether the command server answered a call with success.
async fn succeeded(call: impl Future<Output = Result<Response<cmd::Response>, Status>>) -> bool {
    reply(call).await.success
}

const VMI: &str = r#"{"metadata": {"name": "testvm", "namespace": "default", "uid": "u1"}}"#;

/// A server on `<dir>/sockets`, returning the dir, the backend, a client and the stopper.
async fn start(backend: Arc<FakeBackend>) -> (TempDir, CmdClient<Channel>, oneshot::Sender<()>) {
    let dir = TempDir::new("cmd");
    let sockets = dir.0.join("sockets");
    let listener = bind(&sockets).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, backend, async {
        let _ = stopped.await;
    }));
    let channel = connect_unix(&init_socket_path(&sockets)).await.unwrap();
    (dir, CmdClient::new(channel), stop)
}

#[tokio::test]
async fn info_reports_cmd_version_1() {
    let (dir, _, _stop) = start(Arc::default()).await;
    let channel = connect_unix(&init_socket_path(&dir.0.join("sockets")))
        .await
        .unwrap();
    let info = CmdInfoClient::new(channel)
        .info(CmdInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.supported_cmd_versions, vec![1]);
}

#[tokio::test]
async fn sync_passes_vmi_and_options_to_backend_then_domain_appears() {
    let backend = Arc::new(FakeBackend::default());
    let (_dir, mut client, _stop) = start(backend.clone()).await;
    let before = reply(client.get_domain(cmd::EmptyRequest {})).await;
    assert_eq!(before.domain, "", "no domain before the first sync");
    assert!(before.response.unwrap().success);

    let mut request = vmi_request(VMI);
    let mut options = cmd::VirtualMachineOptions::default();
    options.disks_info.insert(
        "rootdisk".into(),
        cmd::DiskInfo {
            format: "raw".into(),
            ..Default::default()
        },
    );
    request.options = Some(options);
    let response = reply(client.sync_virtual_machine(request)).await;
    assert!(response.success, "{}", response.message);
    assert_eq!(backend.calls(), vec!["sync[\"raw\"] default_testvm"]);

    let after = reply(client.get_domain(cmd::EmptyRequest {})).await;
    let domain: Value = serde_json::from_str(&after.domain).unwrap();
    assert_eq!(domain["Status"]["Status"], "Running");
}

#[tokio::test]
async fn lifecycle_commands_reach_the_backend() {
    let backend = Arc::new(FakeBackend::default());
    let (_dir, mut client, _stop) = start(backend.clone()).await;
    assert!(succeeded(client.pause_virtual_machine(vmi_request(VMI))).await);
    assert!(succeeded(client.unpause_virtual_machine(vmi_request(VMI))).await);
    assert!(succeeded(client.reset_virtual_machine(vmi_request(VMI))).await);
    assert!(succeeded(client.shutdown_virtual_machine(vmi_request(VMI))).await);
    assert!(succeeded(client.kill_virtual_machine(vmi_request(VMI))).await);
    assert!(succeeded(client.delete_virtual_machine(vmi_request(VMI))).await);
    assert!(succeeded(client.ping(cmd::EmptyRequest {})).await);
    assert_eq!(
        backend.calls(),
        [
            "pause default_testvm",
            "unpause default_testvm",
            "reset default_testvm",
            "shutdown default_testvm",
            "kill default_testvm",
            "delete default_testvm",
        ]
    );
}

#[tokio::test]
async fn backend_failure_is_an_unsuccessful_response_with_the_cause_chain() {
    let backend = Arc::new(FakeBackend {
        fail: Some("pause"),
        ..Default::default()
    });
    let (_dir, mut client, _stop) = start(backend).await;
    let response = reply(client.pause_virtual_machine(vmi_request(VMI))).await;
    assert!(!response.success);
    assert_eq!(
        response.message,
        "The VM controller failed: vCPU thread died"
    );
    let response = reply(client.soft_reboot_virtual_machine(vmi_request(VMI))).await;
    assert_eq!(
        (response.success, response.message.as_str()),
        (
            false,
            "A soft reboot without a guest agent is not supported by rvmm"
        )
    );
}

#[tokio::test]
async fn invalid_vmi_json_is_refused_without_calling_the_backend() {
    let backend = Arc::new(FakeBackend::default());
    let (_dir, mut client, _stop) = start(backend.clone()).await;
    let response = client
        .sync_virtual_machine(vmi_request(
            r#"{"spec": {"domain": {"cpu": {"cores": "x"}}}}"#,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.success);
    assert!(
        response
            .message
            .starts_with("No valid vmi object present in command server request: "),
        "{}",
        response.message
    );
    let response = reply(client.pause_virtual_machine(cmd::VmiRequest::default())).await;
    assert!(!response.success);
    assert!(backend.calls().is_empty());
}

#[tokio::test]
async fn rpcs_rvmm_lacks_are_unimplemented() {
    let (_dir, mut client, _stop) = start(Arc::default()).await;
    let status = client
        .get_qemu_version(cmd::EmptyRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let status = client
        .freeze_virtual_machine(cmd::FreezeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn migration_commands_reach_the_backend_with_their_vmi_and_options() {
    let backend = Arc::new(FakeBackend::default());
    let (_dir, mut client, _stop) = start(backend.clone()).await;
    let migrate = cmd::MigrationRequest {
        vmi: vmi_request(VMI).vmi,
        options: br#"{"CompletionTimeoutPerGiB":150}"#.to_vec(),
    };
    assert!(succeeded(client.migrate_virtual_machine(migrate)).await);
    assert!(succeeded(client.sync_migration_target(vmi_request(VMI))).await);
    assert!(succeeded(client.cancel_virtual_machine_migration(vmi_request(VMI))).await);
    assert!(succeeded(client.finalize_virtual_machine_migration(vmi_request(VMI))).await);
    assert!(succeeded(client.signal_target_pod_cleanup(vmi_request(VMI))).await);
    let names: Vec<String> = backend
        .calls()
        .iter()
        .map(|c| c.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            r#"migrate{"CompletionTimeoutPerGiB":150}"#,
            "sync-migration-target",
            "cancel-migration",
            "finalize-migration",
            "signal-target-pod-cleanup"
        ]
    );
    let bad = cmd::MigrationRequest::default();
    assert!(!succeeded(client.migrate_virtual_machine(bad)).await);
}

#[tokio::test]
async fn guest_agent_queries_answer_empty_and_guest_ping_and_exec_fail_like_no_agent() {
    let backend = Arc::new(FakeBackend::default());
    let (_dir, mut client, _stop) = start(backend.clone()).await;
    let info = reply(client.get_guest_info(cmd::EmptyRequest {})).await;
    assert!(info.response.unwrap().success);
    let info: Value = serde_json::from_str(&info.guest_info_response).unwrap();
    assert_eq!(info["os"], json!({}));
    assert!(info.get("guestAgentVersion").is_none(), "{info}");
    let users = reply(client.get_users(cmd::EmptyRequest {})).await;
    assert!(users.response.unwrap().success);
    assert_eq!(users.guest_user_list_response, "[]");
    // What virt-handler's metrics scrape calls right after GetDomainStats.
    let filesystems = reply(client.get_filesystems(cmd::EmptyRequest {})).await;
    assert!(filesystems.response.unwrap().success);
    assert_eq!(filesystems.guest_filesystems_response, "[]");

    let ping = client
        .guest_ping(cmd::GuestPingRequest {
            domain_name: "default_testvm".into(),
            timeout_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(ping.code(), tonic::Code::Unknown);
    assert!(ping.message().starts_with("Guest agent is not responding"));
    let exec = client
        .exec(cmd::ExecRequest {
            domain_name: "default_testvm".into(),
            command: "/bin/true".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(exec.code(), tonic::Code::Unknown);
    assert_eq!(backend.calls(), ["guest ping failed"]);
}

#[tokio::test]
async fn queries_are_answered_while_a_slow_command_runs() {
    let backend = Arc::new(FakeBackend {
        slow: Some(("shutdown", Duration::from_secs(3))),
        ..Default::default()
    });
    let (_dir, mut client, _stop) = start(backend.clone()).await;
    let mut slow_client = client.clone();
    let shutdown =
        tokio::spawn(async move { slow_client.shutdown_virtual_machine(vmi_request(VMI)).await });
    while backend.calls().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The shutdown holds the control thread for 3 s; queries do not wait for it.
    let start = std::time::Instant::now();
    reply(client.get_domain(cmd::EmptyRequest {})).await;
    reply(client.get_domain_stats(cmd::EmptyRequest {})).await;
    assert!(succeeded(client.ping(cmd::EmptyRequest {})).await);
    reply(client.get_filesystems(cmd::EmptyRequest {})).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "queries waited {:?} behind the shutdown",
        start.elapsed()
    );
    assert!(shutdown.await.unwrap().unwrap().into_inner().success);
}

#[tokio::test]
async fn domain_stats_are_returned_as_json_text() {
    let (_dir, mut client, _stop) = start(Arc::default()).await;
    let stats = reply(client.get_domain_stats(cmd::EmptyRequest {})).await;
    assert!(stats.response.unwrap().success);
    let stats: Value = serde_json::from_str(&stats.domain_stats).unwrap();
    assert_eq!(stats["Name"], "default_testvm");
}

#[test]
fn launcher_server_renames_its_socket_when_ready_and_removes_it_on_stop() {
    let dir = TempDir::new("ready");
    let sockets = dir.0.join("sockets");
    // A stale socket from a crashed launcher is replaced.
    std::fs::create_dir_all(&sockets).unwrap();
    std::fs::write(ready_socket_path(&sockets), b"stale").unwrap();
    let runtime = GrpcRuntime::start().unwrap();
    let server =
        LauncherServer::start(&runtime, &sockets, Arc::new(FakeBackend::default()), None).unwrap();
    assert!(init_socket_path(&sockets).exists());
    assert!(!ready_socket_path(&sockets).exists());
    server.mark_ready().unwrap();
    assert!(!init_socket_path(&sockets).exists());

    // virt-handler's view: only launcher-sock.
    let client_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let versions = client_runtime.block_on(async {
        let channel = connect_unix(&ready_socket_path(&sockets)).await.unwrap();
        CmdInfoClient::new(channel)
            .info(CmdInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .supported_cmd_versions
    });
    assert_eq!(versions, vec![1]);
    server.stop().unwrap();
    assert!(!ready_socket_path(&sockets).exists());
}

/// virt-handler's side of the notify socket.
struct FakeVirtHandler {
    events: mpsc::UnboundedSender<notify::DomainEventRequest>,
    k8s_events: mpsc::UnboundedSender<Value>,
    versions: Vec<u32>,
}

#[tonic::async_trait]
impl NotifyInfo for Arc<FakeVirtHandler> {
    async fn info(
        &self,
        _: Request<NotifyInfoRequest>,
    ) -> Result<Response<NotifyInfoResponse>, Status> {
        Ok(Response::new(NotifyInfoResponse {
            supported_notify_versions: self.versions.clone(),
        }))
    }
}

#[tonic::async_trait]
impl Notify for Arc<FakeVirtHandler> {
    async fn handle_domain_event(
        &self,
        request: Request<notify::DomainEventRequest>,
    ) -> Result<Response<notify::Response>, Status> {
        let request = request.into_inner();
        let refuse = serde_json::from_slice::<Value>(&request.domain_json)
            .is_ok_and(|d| d["refuse"] == json!(true));
        let _ = self.events.send(request);
        Ok(Response::new(notify::Response {
            success: !refuse,
            message: if refuse {
                "domain not found".into()
            } else {
                String::new()
            },
        }))
    }

    async fn handle_k8s_event(
        &self,
        request: Request<notify::K8sEventRequest>,
    ) -> Result<Response<notify::Response>, Status> {
        let event = serde_json::from_slice(&request.into_inner().event_json).unwrap();
        let _ = self.k8s_events.send(event);
        Ok(Response::new(notify::Response {
            success: true,
            message: String::new(),
        }))
    }
}

/// A fake virt-handler notify server in `share_dir`; domain events arrive on the receiver.
pub(crate) fn fake_virt_handler(
    share_dir: &Path,
    versions: Vec<u32>,
) -> mpsc::UnboundedReceiver<notify::DomainEventRequest> {
    fake_virt_handler_with_k8s_events(share_dir, versions).0
}

/// [`fake_virt_handler`], with the Kubernetes events (`core/v1.Event` JSON) on a second
/// receiver.
pub(crate) fn fake_virt_handler_with_k8s_events(
    share_dir: &Path,
    versions: Vec<u32>,
) -> (
    mpsc::UnboundedReceiver<notify::DomainEventRequest>,
    mpsc::UnboundedReceiver<Value>,
) {
    let (events, received) = mpsc::unbounded_channel();
    let (k8s_events, k8s_received) = mpsc::unbounded_channel();
    let handler = Arc::new(FakeVirtHandler {
        events,
        k8s_events,
        versions,
    });
    let listener = UnixListener::bind(share_dir.join("domain-notify-pipe.sock")).unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(NotifyInfoServer::new(handler.clone()))
            .add_service(NotifyServer::new(handler))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    (received, k8s_received)
}

#[tokio::test]
async fn notifier_delivers_domain_events_to_virt_handler() {
    let dir = TempDir::new("notify");
    let mut received = fake_virt_handler(&dir.0, vec![1]);
    let mut notifier = Notifier::new(&dir.0);
    let domain = json!({"kind": "Domain", "Status": {"Status": "Running", "Reason": "Unknown"}});
    notifier
        .send(&DomainEvent::added(domain.clone()))
        .await
        .unwrap();
    notifier
        .send(&DomainEvent::error("VMM crashed"))
        .await
        .unwrap();

    let added = received.recv().await.unwrap();
    assert_eq!(added.event_type, "ADDED");
    assert_eq!(
        serde_json::from_slice::<Value>(&added.domain_json).unwrap(),
        domain
    );
    assert!(added.status_json.is_empty());
    let error = received.recv().await.unwrap();
    assert_eq!(error.event_type, "ERROR");
    assert!(error.domain_json.is_empty());
    let status: Value = serde_json::from_slice(&error.status_json).unwrap();
    assert_eq!(
        status,
        json!({"status": "Failure", "message": "VMM crashed"})
    );
}

#[tokio::test]
async fn notifier_gives_up_when_virt_handler_speaks_another_version() {
    let dir = TempDir::new("notify-version");
    let _received = fake_virt_handler(&dir.0, vec![2]);
    let mut notifier = Notifier::new(&dir.0);
    notifier.retry_interval = Duration::from_millis(10);
    // Generous, so a loaded machine still gets its first answer; the version answer must end
    // the attempts at once instead of retrying until then.
    notifier.total_timeout = Duration::from_secs(20);
    let started = std::time::Instant::now();
    let err = notifier
        .send(&DomainEvent::modified(json!({})))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "retried: {err}"
    );
    assert!(
        matches!(&err, NotifyError::NoCommonVersion { offered } if *offered == [2]),
        "{err}"
    );
}

#[tokio::test]
async fn notifier_reports_a_refused_event_without_retrying() {
    let dir = TempDir::new("notify-refused");
    let mut received = fake_virt_handler(&dir.0, vec![1]);
    let mut notifier = Notifier::new(&dir.0);
    let err = notifier
        .send(&DomainEvent::modified(json!({"refuse": true})))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "virt-handler refused the event: domain not found"
    );
    assert_eq!(received.recv().await.unwrap().event_type, "MODIFIED");
    assert!(received.try_recv().is_err(), "sent once");
}

#[tokio::test]
async fn notifier_sends_kubernetes_events_about_the_vmi() {
    let dir = TempDir::new("notify-k8s");
    let (_domains, mut k8s) = fake_virt_handler_with_k8s_events(&dir.0, vec![1]);
    let mut notifier = Notifier::new(&dir.0);
    let vmi = VmiRef {
        namespace: "default".into(),
        name: "testvm".into(),
        uid: "u-1".into(),
    };
    let event = K8sEvent {
        warning: true,
        reason: "GuestPanicked",
        message: "GuestPanicked: triple fault".into(),
    };
    notifier.send_k8s_event(&event, &vmi).await.unwrap();
    let got = k8s.recv().await.unwrap();
    // What virt-handler's notify server reads: the VMI by namespace, name and UID.
    assert_eq!(
        got["involvedObject"],
        json!({"kind": "VirtualMachineInstance", "namespace": "default", "name": "testvm",
               "uid": "u-1", "apiVersion": "kubevirt.io/v1"})
    );
    assert_eq!(
        (&got["type"], &got["reason"], &got["message"]),
        (
            &json!("Warning"),
            &json!("GuestPanicked"),
            &json!("GuestPanicked: triple fault")
        )
    );
}

#[tokio::test]
async fn notifier_stops_retrying_at_the_exit_deadline() {
    let dir = TempDir::new("notify-exit");
    let mut notifier = Notifier::new(&dir.0);
    notifier.retry_interval = Duration::from_millis(10);
    notifier
        .exit_deadline
        .set(std::time::Instant::now() + Duration::from_millis(200));
    let start = std::time::Instant::now();
    let err = notifier
        .send(&DomainEvent::modified(json!({})))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(err, NotifyError::Connect { .. } | NotifyError::Exiting),
        "{err}"
    );
    // Past the deadline nothing is tried.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let err = notifier
        .send(&DomainEvent::modified(json!({})))
        .await
        .unwrap_err();
    assert!(matches!(err, NotifyError::Exiting), "{err}");
}

#[tokio::test]
async fn notifier_without_virt_handler_times_out() {
    let dir = TempDir::new("notify-absent");
    let mut notifier = Notifier::new(&dir.0);
    notifier.retry_interval = Duration::from_millis(10);
    notifier.total_timeout = Duration::from_millis(40);
    let err = notifier
        .send(&DomainEvent::modified(json!({})))
        .await
        .unwrap_err();
    assert!(matches!(err, NotifyError::Connect { .. }), "{err}");
}

#[test]
fn notifier_sends_from_a_thread_outside_the_runtime() {
    let dir = TempDir::new("notify-blocking");
    let runtime = GrpcRuntime::start().unwrap();
    let mut received = {
        let _entered = runtime.handle().enter();
        fake_virt_handler(&dir.0, vec![1])
    };
    let mut notifier = Notifier::new(&dir.0);
    notifier
        .send_blocking(
            runtime.handle(),
            &DomainEvent::modified(json!({"Spec": {}})),
        )
        .unwrap();
    assert_eq!(received.blocking_recv().unwrap().event_type, "MODIFIED");
}
