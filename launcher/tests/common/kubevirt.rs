//! virt-launcher mode's tests' harness: a launcher pod in a temporary directory, the real
//! binary in it, virt-handler's command client (tonic, from KubeVirt's protos) and a fake
//! virt-handler notify server that records every domain and Kubernetes event.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use rvmm_launcher::kubevirt::grpc::{GrpcRuntime, connect_unix};
use rvmm_launcher::kubevirt::proto::cmd::info::CmdInfoRequest;
use rvmm_launcher::kubevirt::proto::cmd::info::cmd_info_client::CmdInfoClient;
use rvmm_launcher::kubevirt::proto::cmd::v1 as cmd;
use rvmm_launcher::kubevirt::proto::cmd::v1::cmd_client::CmdClient;
use rvmm_launcher::kubevirt::proto::notify::info::notify_info_server::{
    NotifyInfo, NotifyInfoServer,
};
use rvmm_launcher::kubevirt::proto::notify::info::{NotifyInfoRequest, NotifyInfoResponse};
use rvmm_launcher::kubevirt::proto::notify::v1 as notify;
use rvmm_launcher::kubevirt::proto::notify::v1::notify_server::{Notify, NotifyServer};
use serde_json::{Value, json};
use tokio::runtime::Handle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use super::tiny_guest;

/// A launcher pod's directories in a temporary directory, removed on drop.
pub struct Pod {
    pub root: PathBuf,
}

impl Pod {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // Short: unix socket paths are limited to 107 bytes.
        let root = std::env::temp_dir().join(format!(
            "rvmm-kv-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("share")).unwrap();
        std::fs::create_dir_all(root.join("cd/kernel-boot")).unwrap();
        Self { root }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// virt-launcher's directory flags for this pod.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--kubevirt-share-dir".into(),
            self.path("share").display().to_string(),
            "--ephemeral-disk-dir".into(),
            self.path("ephemeral").display().to_string(),
            "--container-disk-dir".into(),
            self.path("cd").display().to_string(),
        ]
    }

    pub fn ready_socket(&self) -> PathBuf {
        self.path("share/sockets/launcher-sock")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The launcher process; killed if the test ends before it exits.
pub struct Launcher {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Launcher {
    /// Runs `program` (the rvmm binary, or a link to it) with `args`.
    pub fn start(program: &Path, args: &[String], pod: &Pod) -> Self {
        let mut command = Command::new(program);
        command.args(args);
        Self::spawn(command, pod)
    }

    /// Runs `command` (rvmm, or something that executes it) with its log in the pod.
    pub fn spawn(mut command: Command, pod: &Pod) -> Self {
        let stderr = pod.path("launcher.log");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn rvmm");
        Self { child, stderr }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn wait_for(&self, path: &Path, timeout: Duration) {
        let start = Instant::now();
        while !path.exists() {
            assert!(
                start.elapsed() < timeout,
                "{} did not appear within {timeout:?}; launcher log:\n{}",
                path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill has no memory effects; the pid is our child's, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "the launcher did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// virt-handler's side of the notify socket: records every domain event.
#[derive(Clone)]
pub struct FakeVirtHandler {
    events: Sender<notify::DomainEventRequest>,
    k8s_events: Sender<Value>,
}

#[tonic::async_trait]
impl NotifyInfo for FakeVirtHandler {
    async fn info(
        &self,
        _: Request<NotifyInfoRequest>,
    ) -> Result<Response<NotifyInfoResponse>, Status> {
        Ok(Response::new(NotifyInfoResponse {
            supported_notify_versions: vec![1],
        }))
    }
}

#[tonic::async_trait]
impl Notify for FakeVirtHandler {
    async fn handle_domain_event(
        &self,
        request: Request<notify::DomainEventRequest>,
    ) -> Result<Response<notify::Response>, Status> {
        let _ = self.events.send(request.into_inner());
        Ok(Response::new(notify::Response {
            success: true,
            message: String::new(),
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

/// Serves the fake virt-handler at `<share-dir>/domain-notify-pipe.sock` on `runtime`:
/// domain events arrive on the first receiver, Kubernetes events (`core/v1.Event` JSON) on
/// the second.
pub fn fake_virt_handler(
    runtime: &GrpcRuntime,
    pod: &Pod,
) -> (Receiver<notify::DomainEventRequest>, Receiver<Value>) {
    let (events, received) = channel();
    let (k8s_events, k8s_received) = channel();
    let handler = FakeVirtHandler { events, k8s_events };
    let _entered = runtime.handle().enter();
    let listener =
        tokio::net::UnixListener::bind(pod.path("share/domain-notify-pipe.sock")).unwrap();
    runtime.handle().spawn(
        Server::builder()
            .add_service(NotifyInfoServer::new(handler.clone()))
            .add_service(NotifyServer::new(handler))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    (received, k8s_received)
}

/// A domain event: type, `Status.Status`, `Status.Reason`, and the domain.
pub fn next_event(
    events: &Receiver<notify::DomainEventRequest>,
) -> (String, String, String, Value) {
    next_event_within(events, Duration::from_secs(20))
}

/// [`next_event`], waiting up to `timeout`.
pub fn next_event_within(
    events: &Receiver<notify::DomainEventRequest>,
    timeout: Duration,
) -> (String, String, String, Value) {
    let request = events
        .recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("a domain event within {timeout:?}"));
    let domain: Value = serde_json::from_slice(&request.domain_json).unwrap();
    (
        request.event_type,
        domain["Status"]["Status"]
            .as_str()
            .unwrap_or_default()
            .into(),
        domain["Status"]["Reason"]
            .as_str()
            .unwrap_or_default()
            .into(),
        domain,
    )
}

/// virt-handler's client, on the client runtime.
pub struct Handler {
    runtime: Handle,
    channel: Channel,
}

impl Handler {
    pub fn connect(runtime: &GrpcRuntime, socket: &Path) -> Self {
        let runtime = runtime.handle().clone();
        let channel = runtime.block_on(connect_unix(socket)).unwrap();
        Self { runtime, channel }
    }

    pub fn info(&self) -> Vec<u32> {
        let mut client = CmdInfoClient::new(self.channel.clone());
        self.runtime
            .block_on(client.info(CmdInfoRequest {}))
            .unwrap()
            .into_inner()
            .supported_cmd_versions
    }

    pub fn cmd(&self) -> CmdClient<Channel> {
        CmdClient::new(self.channel.clone())
    }

    pub fn block_on<T>(&self, call: impl Future<Output = T>) -> T {
        self.runtime.block_on(call)
    }

    /// Runs a VMI command; returns `(success, message)`.
    pub fn vmi_command(&self, name: &str, vmi: &Value) -> (bool, String) {
        self.vmi_command_with(name, vmi, None)
    }

    /// Runs a VMI command with `options`, as virt-handler sends them with a sync.
    pub fn vmi_command_with(
        &self,
        name: &str,
        vmi: &Value,
        options: Option<cmd::VirtualMachineOptions>,
    ) -> (bool, String) {
        let request = cmd::VmiRequest {
            vmi: Some(cmd::Vmi {
                vmi_json: vmi.to_string().into_bytes(),
            }),
            options,
        };
        let mut c = self.cmd();
        let response = self.block_on(async {
            match name {
                "Sync" => c.sync_virtual_machine(request).await,
                "Pause" => c.pause_virtual_machine(request).await,
                "Unpause" => c.unpause_virtual_machine(request).await,
                "Shutdown" => c.shutdown_virtual_machine(request).await,
                "Kill" => c.kill_virtual_machine(request).await,
                "Delete" => c.delete_virtual_machine(request).await,
                "Reset" => c.reset_virtual_machine(request).await,
                "SoftReboot" => c.soft_reboot_virtual_machine(request).await,
                "SyncMigrationTarget" => c.sync_migration_target(request).await,
                "CancelMigration" => c.cancel_virtual_machine_migration(request).await,
                "FinalizeMigration" => c.finalize_virtual_machine_migration(request).await,
                "SignalTargetPodCleanup" => c.signal_target_pod_cleanup(request).await,
                other => panic!("no command {other}"),
            }
        });
        let response = response
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .into_inner();
        (response.success, response.message)
    }

    /// GetDomain's domain, `None` for "no domain".
    pub fn domain(&self) -> Option<Value> {
        let mut c = self.cmd();
        let response = self
            .block_on(c.get_domain(cmd::EmptyRequest {}))
            .unwrap()
            .into_inner();
        assert!(response.response.unwrap().success);
        (!response.domain.is_empty()).then(|| serde_json::from_str(&response.domain).unwrap())
    }

    pub fn domain_status(&self) -> (String, String) {
        let d = self.domain().expect("a domain");
        (
            d["Status"]["Status"].as_str().unwrap().into(),
            d["Status"]["Reason"].as_str().unwrap().into(),
        )
    }
}

pub fn status(status: &str, reason: &str) -> (String, String) {
    (status.into(), reason.into())
}

/// A kernel-boot VMI booting `kernel` (a file name in the container-disk directory's
/// `kernel-boot/`) with 64 MiB; no serial console (its socket lives in
/// /var/run/kubevirt-private).
pub fn kernel_boot_vmi(uid: &str, kernel: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "testvm", "namespace": "default", "uid": uid},
        "spec": {
            "domain": {
                "devices": {"autoattachSerialConsole": false},
                "firmware": {"kernelBoot": {"container": {
                    "image": "example.com/ticker-kernel",
                    "kernelPath": format!("/boot/{kernel}")
                }}},
                "memory": {"guest": "64Mi"}
            },
            "terminationGracePeriodSeconds": 30
        }
    })
}

/// `rvmm virt-launcher` for VMI `uid-1` with a fake virt-handler, `tiny_guest(guest)` as the
/// VMI's kernel and `--grace-period-seconds grace`, ready for commands.
pub struct Session {
    // Declared first: the launcher is killed before the pod's directory goes.
    pub launcher: Launcher,
    pub events: Receiver<notify::DomainEventRequest>,
    pub k8s_events: Receiver<Value>,
    pub runtime: GrpcRuntime,
    pub pod: Pod,
}

impl Session {
    pub fn start(tag: &str, guest: &str, grace: u32) -> Self {
        Self::with(tag, guest, grace, "uid-1", true)
    }

    /// A session for VMI `uid`; without a fake virt-handler when `virt_handler` is false (its
    /// notify socket is missing).
    pub fn with(tag: &str, guest: &str, grace: u32, uid: &str, virt_handler: bool) -> Self {
        let kernel = (tiny_guest(guest), format!("{guest}.elf"));
        Self::with_files(tag, &[kernel], grace, uid, virt_handler)
    }

    /// A session whose pod's kernel-boot directory holds `files` (source, name there).
    pub fn with_files(
        tag: &str,
        files: &[(PathBuf, String)],
        grace: u32,
        uid: &str,
        virt_handler: bool,
    ) -> Self {
        let pod = Pod::new(tag);
        for (from, name) in files {
            std::fs::copy(from, pod.path(&format!("cd/kernel-boot/{name}"))).unwrap();
        }
        let runtime = GrpcRuntime::start().unwrap();
        let (events, k8s_events) = if virt_handler {
            fake_virt_handler(&runtime, &pod)
        } else {
            (channel().1, channel().1)
        };
        let mut args: Vec<String> = [
            "virt-launcher",
            "--name",
            "testvm",
            "--namespace",
            "default",
            "--uid",
            uid,
            "--grace-period-seconds",
            &grace.to_string(),
        ]
        .map(String::from)
        .into();
        args.extend(pod.flags());
        let launcher = Launcher::start(Path::new(env!("CARGO_BIN_EXE_rvmm")), &args, &pod);
        launcher.wait_for(&pod.ready_socket(), Duration::from_secs(10));
        Self {
            launcher,
            events,
            k8s_events,
            runtime,
            pod,
        }
    }

    pub fn handler(&self) -> Handler {
        Handler::connect(&self.runtime, &self.pod.ready_socket())
    }

    /// The next event's type, state and reason.
    pub fn next(&self) -> (String, String, String) {
        let (kind, state, reason, _) = next_event(&self.events);
        (kind, state, reason)
    }
}

pub fn event(kind: &str, state: &str, reason: &str) -> (String, String, String) {
    (kind.into(), state.into(), reason.into())
}
