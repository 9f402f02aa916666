//! The launcher's command server: KubeVirt's `kubevirt.cmd.v1.Cmd` and `kubevirt.cmd.info`
//! services on `<share-dir>/sockets/launcher-init-sock`, renamed to `launcher-sock` once the
//! launcher is ready (virt-handler only talks to `launcher-sock`).
//!
//! The server is coded against [`LauncherBackend`]; the VM controller implements it. As
//! KubeVirt's server does, a failed command is a gRPC success carrying
//! `Response { success: false, message }`; a VMI that does not parse fails the same way.
//! RPCs rvmm does not implement answer gRPC `UNIMPLEMENTED`, which virt-handler's client
//! reports as such.
//!
//! Commands (Sync, Pause, Shutdown, ...) are blocking calls into the VM controller, made one
//! at a time on the `launcher-control` thread ([`ControlThread`]). Queries are answered on the
//! runtime's thread from the current state, never behind a running command: virt-handler gives
//! GetDomain and GetDomainStats 5 s, and a Sync may take longer (it gets 20 s). Info, Ping and
//! the guest-agent RPCs need no state. The runtime's thread only moves bytes and reads state,
//! under a narrow seccomp filter ([`crate::seccomp::grpc_filter`]): building a VM needs KVM,
//! memory mappings, files and new threads, which only the control thread does.
//!
//! Guest agent: rvmm has no guest-agent channel, and answers as KubeVirt's launcher does when a
//! guest runs no agent: GetGuestInfo, GetUsers and GetFilesystems succeed with empty data
//! (virt-handler's metrics scrape calls GetFilesystems after GetDomainStats and drops the whole
//! VMI's metrics on an error); GuestPing and Exec fail with a gRPC error saying that no agent
//! is connected, and a failed GuestPing is reported as a `GuestAgentPingFailed` Kubernetes
//! event, as KubeVirt's launcher does on its main branch (after v1.8).

use std::collections::BTreeMap;
use std::error::Error;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rvmm_core::seccomp::{BpfProgram, SeccompError, SpawnError, spawn_filtered};
use rvmm_devices::log_limit::{LogLimiter, left_out};
use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

use super::h2_authority::AuthorityFix;
use super::proto::cmd::info::cmd_info_server::{CmdInfo, CmdInfoServer};
use super::proto::cmd::info::{CmdInfoRequest, CmdInfoResponse};
use super::proto::cmd::v1 as cmd;
use super::proto::cmd::v1::cmd_server::{Cmd, CmdServer as CmdService};
use super::vmi::{Vmi, VmiError};
use crate::control_thread::ControlThread;

/// The command protocol version rvmm speaks.
pub const CMD_VERSION: u32 = 1;
/// The socket's name until the launcher is ready.
pub const INIT_SOCKET: &str = "launcher-init-sock";
/// The socket's name once the launcher is ready.
pub const READY_SOCKET: &str = "launcher-sock";
/// How long a stopping server waits for in-flight calls.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Why a backend call failed; the gRPC reply carries the whole cause chain.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VMI asks for something rvmm cannot do.
    #[error("The VMI cannot run on rvmm")]
    Vmi(#[source] VmiError),
    /// The command needs a VM and none is defined.
    #[error("No VM is defined")]
    NoVm,
    /// rvmm has no way to do this (e.g. a soft reboot without a guest agent).
    #[error("{0} is not supported by rvmm")]
    Unsupported(&'static str),
    /// The VM controller failed.
    #[error("The VM controller failed")]
    Controller(#[source] Box<dyn Error + Send + Sync>),
}

/// What the command server asks of the VM controller. Commands may block; they run one at a
/// time on the [`ControlThread`]. Queries ([`Self::domain`], [`Self::domain_stats`],
/// [`Self::guest_ping_failed`]) run on the runtime's thread, concurrently with a command: they
/// must answer from the current state at once, without waiting for a command to finish.
pub trait LauncherBackend: Send + Sync + 'static {
    /// Defines and starts the VM for `vmi`, or reconciles the running one; idempotent.
    fn sync(&self, vmi: &Vmi, options: &cmd::VirtualMachineOptions) -> Result<(), BackendError>;
    /// Pauses the vCPUs.
    fn pause(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// Resumes the vCPUs.
    fn unpause(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// Asks the guest to power off (ACPI); returns without waiting for it.
    fn shutdown(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// Stops the VM at once.
    fn kill(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// Stops the VM at once and forgets it (GetDomain then reports none).
    fn delete(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// Hard reset.
    fn reset(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// Asks the guest to reboot.
    fn soft_reboot(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// The `api.Domain` JSON (see [`super::domain::build`]), or `None` before a sync.
    fn domain(&self) -> Option<Value>;
    /// KubeVirt's `stats.DomainStats` JSON, or `None` when there is no VM.
    fn domain_stats(&self) -> Result<Option<Value>, BackendError>;
    /// Starts migrating the VM away (returns at once); `options` is KubeVirt's
    /// `MigrationOptions` JSON.
    fn migrate(&self, vmi: &Vmi, options: &[u8]) -> Result<(), BackendError>;
    /// Prepares this launcher to receive `vmi` (returns at once).
    fn sync_migration_target(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// Aborts the migration in progress, if any.
    fn cancel_migration(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// Completes an incoming migration.
    fn finalize_migration(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// A target pod whose migration will not come ends.
    fn signal_target_pod_cleanup(&self, vmi: &Vmi) -> Result<(), BackendError>;
    /// GuestPing failed (there is no guest agent): report it to virt-handler.
    fn guest_ping_failed(&self) {}
}

/// What GetGuestInfo answers without a guest agent: KubeVirt's
/// `VirtualMachineInstanceGuestAgentInfo` with nothing filled in, as Go marshals it (the
/// timezone is KubeVirt's `"<zone>, <offset>"` of an empty zone).
pub const NO_AGENT_GUEST_INFO: &str = r#"{"os":{},"timezone":", 0","fsInfo":{"disks":null}}"#;
/// What GuestPing and Exec fail with: libvirt's words for a guest without an agent.
pub const NO_AGENT: &str = "Guest agent is not responding: no guest agent is connected (rvmm \
                            has no guest agent channel)";

/// The command server failed to start, serve or become ready.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The sockets directory cannot be created.
    #[error("Cannot create {}", path.display())]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket cannot be bound.
    #[error("Cannot listen on {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The readiness rename failed.
    #[error("Cannot rename {} to {}", from.display(), to.display())]
    MarkReady {
        /// The init socket.
        from: PathBuf,
        /// The ready socket.
        to: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("The command server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The runtime or the control thread cannot start.
    #[error("Cannot start the gRPC runtime")]
    Runtime(#[source] std::io::Error),
    /// The runtime's thread cannot start under its seccomp filter.
    #[error("Cannot start the gRPC runtime's thread")]
    Thread(#[source] SpawnError),
    /// The runtime thread's seccomp filter cannot be built.
    #[error("Cannot build the gRPC runtime's seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// The server task panicked or was cancelled.
    #[error("The command server task ended abnormally")]
    Task(#[source] tokio::task::JoinError),
}

pub use crate::errors::error_chain;

/// `<sockets_dir>/launcher-init-sock`.
pub fn init_socket_path(sockets_dir: &Path) -> PathBuf {
    sockets_dir.join(INIT_SOCKET)
}

/// `<sockets_dir>/launcher-sock`.
pub fn ready_socket_path(sockets_dir: &Path) -> PathBuf {
    sockets_dir.join(READY_SOCKET)
}

/// Binds `launcher-init-sock` in `sockets_dir` (mode 0600), replacing stale sockets from an
/// earlier run.
/// Must run inside the tokio runtime.
pub fn bind(sockets_dir: &Path) -> Result<UnixListener, GrpcError> {
    std::fs::create_dir_all(sockets_dir).map_err(|source| GrpcError::SocketDir {
        path: sockets_dir.to_owned(),
        source,
    })?;
    let path = init_socket_path(sockets_dir);
    for stale in [&path, &ready_socket_path(sockets_dir)] {
        if std::fs::remove_file(stale).is_ok() {
            log::warn!("Replaced the stale socket {}", stale.display());
        }
    }
    let listener = UnixListener::bind(&path).map_err(|source| GrpcError::Bind {
        path: path.clone(),
        source,
    })?;
    // virt-handler connects as root: nobody else has business on the socket.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| GrpcError::Bind { path, source })?;
    Ok(listener)
}

/// Renames `launcher-init-sock` to `launcher-sock`: virt-handler starts talking to the
/// launcher. Open connections are unaffected.
pub fn mark_ready(sockets_dir: &Path) -> Result<(), GrpcError> {
    let from = init_socket_path(sockets_dir);
    let to = ready_socket_path(sockets_dir);
    std::fs::rename(&from, &to).map_err(|source| GrpcError::MarkReady { from, to, source })
}

/// Serves both services on `listener` until `shutdown` completes, with backend calls on a
/// [`ControlThread`] of its own, started from the task's thread: not for a filtered runtime
/// ([`LauncherServer`] starts the control thread before the runtime's filter applies).
pub async fn serve(
    listener: UnixListener,
    backend: Arc<dyn LauncherBackend>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    let control = ControlThread::start("launcher-control", None).map_err(GrpcError::Thread)?;
    serve_with(listener, backend, control, shutdown).await
}

/// [`serve`] with backend calls on `control`.
pub async fn serve_with(
    listener: UnixListener,
    backend: Arc<dyn LauncherBackend>,
    control: ControlThread,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    let clients = UnixListenerStream::new(listener).map(|client| client.map(AuthorityFix::new));
    Server::builder()
        .add_service(CmdInfoServer::new(InfoService))
        .add_service(CmdService::new(CmdHandler { backend, control }))
        .serve_with_incoming_shutdown(clients, shutdown)
        .await
        .map_err(GrpcError::Serve)
}

/// A gRPC channel to a server on the unix socket `path` (the notify client's, and tests').
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is a placeholder: the connector ignores it and dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

struct InfoService;

#[tonic::async_trait]
impl CmdInfo for InfoService {
    async fn info(&self, _: Request<CmdInfoRequest>) -> Result<Response<CmdInfoResponse>, Status> {
        Ok(Response::new(CmdInfoResponse {
            supported_cmd_versions: vec![CMD_VERSION],
        }))
    }
}

struct CmdHandler {
    backend: Arc<dyn LauncherBackend>,
    control: ControlThread,
}

fn ok() -> cmd::Response {
    cmd::Response {
        success: true,
        message: String::new(),
    }
}

fn failed(message: String) -> cmd::Response {
    cmd::Response {
        success: false,
        message,
    }
}

/// The rate limits of the commands' log lines, one per command and outcome: a Sync repeated on
/// every change of the VMI leaves the lines of a Shutdown (each a power button press) alone.
static COMMAND_LOGS: Mutex<BTreeMap<(&str, bool), LogLimiter>> = Mutex::new(BTreeMap::new());

/// Whether the line of command `what`'s outcome (`done`: it succeeded) is logged now; `Some`
/// carries how many of its lines were left out since the last one.
fn command_log_due(what: &'static str, done: bool) -> Option<u64> {
    COMMAND_LOGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((what, done))
        .or_default()
        .check()
}

impl CmdHandler {
    /// Runs `call` on the control thread.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn LauncherBackend) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let backend = self.backend.clone();
        self.control
            .run(move || call(&*backend))
            .await
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// Parses the VMI of `request`, runs `call`, and answers KubeVirt-style.
    async fn vmi_command(
        &self,
        what: &'static str,
        request: Request<cmd::VmiRequest>,
        call: impl FnOnce(
            &dyn LauncherBackend,
            &Vmi,
            &cmd::VirtualMachineOptions,
        ) -> Result<(), BackendError>
        + Send
        + 'static,
    ) -> Result<Response<cmd::Response>, Status> {
        let request = request.into_inner();
        let vmi = match request.vmi.as_ref().map(|v| Vmi::from_json(&v.vmi_json)) {
            Some(Ok(vmi)) => vmi,
            Some(Err(e)) => {
                return Ok(Response::new(failed(format!(
                    "No valid vmi object present in command server request: {e}"
                ))));
            }
            None => {
                return Ok(Response::new(failed(
                    "No valid vmi object present in command server request".into(),
                )));
            }
        };
        let options = request.options.unwrap_or_default();
        let name = vmi.domain_name();
        let result = self.blocking(move |b| call(b, &vmi, &options)).await?;
        Ok(Response::new(match result {
            // virt-handler repeats its commands (Sync on every change of the VMI): both lines
            // are rate limited, each command's on its own.
            Ok(()) => {
                if let Some(n) = command_log_due(what, true) {
                    log::info!("{what} {name}: done{}", left_out(n));
                }
                ok()
            }
            Err(e) => {
                let message = error_chain(&e);
                if let Some(n) = command_log_due(what, false) {
                    log::error!("{what} {name}: {message}{}", left_out(n));
                }
                failed(message)
            }
        }))
    }
}

#[tonic::async_trait]
impl Cmd for CmdHandler {
    async fn sync_virtual_machine(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("Sync", request, |b, v, o| b.sync(v, o))
            .await
    }

    async fn pause_virtual_machine(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("Pause", request, |b, v, _| b.pause(v))
            .await
    }

    async fn unpause_virtual_machine(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("Unpause", request, |b, v, _| b.unpause(v))
            .await
    }

    async fn reset_virtual_machine(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("Reset", request, |b, v, _| b.reset(v))
            .await
    }

    async fn soft_reboot_virtual_machine(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("SoftReboot", request, |b, v, _| b.soft_reboot(v))
            .await
    }

    async fn shutdown_virtual_machine(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("Shutdown", request, |b, v, _| b.shutdown(v))
            .await
    }

    async fn kill_virtual_machine(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("Kill", request, |b, v, _| b.kill(v)).await
    }

    async fn delete_virtual_machine(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("Delete", request, |b, v, _| b.delete(v))
            .await
    }

    async fn get_domain(
        &self,
        _: Request<cmd::EmptyRequest>,
    ) -> Result<Response<cmd::DomainResponse>, Status> {
        let domain = self.backend.domain();
        Ok(Response::new(cmd::DomainResponse {
            response: Some(ok()),
            // An empty string tells virt-handler that no domain exists.
            domain: domain.map(|d| d.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_domain_stats(
        &self,
        _: Request<cmd::EmptyRequest>,
    ) -> Result<Response<cmd::DomainStatsResponse>, Status> {
        let stats = self.backend.domain_stats();
        Ok(Response::new(match stats {
            Ok(stats) => cmd::DomainStatsResponse {
                response: Some(ok()),
                domain_stats: stats.map(|s| s.to_string()).unwrap_or_default(),
            },
            Err(e) => cmd::DomainStatsResponse {
                response: Some(failed(error_chain(&e))),
                domain_stats: String::new(),
            },
        }))
    }

    async fn ping(&self, _: Request<cmd::EmptyRequest>) -> Result<Response<cmd::Response>, Status> {
        Ok(Response::new(ok()))
    }

    async fn migrate_virtual_machine(
        &self,
        request: Request<cmd::MigrationRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        let request = request.into_inner();
        let options = request.options;
        let vmi_request = Request::new(cmd::VmiRequest {
            vmi: request.vmi,
            options: None,
        });
        self.vmi_command("Migrate", vmi_request, move |b, v, _| {
            b.migrate(v, &options)
        })
        .await
    }

    async fn sync_migration_target(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("SyncMigrationTarget", request, |b, v, _| {
            b.sync_migration_target(v)
        })
        .await
    }

    async fn cancel_virtual_machine_migration(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("CancelMigration", request, |b, v, _| b.cancel_migration(v))
            .await
    }

    async fn finalize_virtual_machine_migration(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("FinalizeMigration", request, |b, v, _| {
            b.finalize_migration(v)
        })
        .await
    }

    async fn signal_target_pod_cleanup(
        &self,
        request: Request<cmd::VmiRequest>,
    ) -> Result<Response<cmd::Response>, Status> {
        self.vmi_command("SignalTargetPodCleanup", request, |b, v, _| {
            b.signal_target_pod_cleanup(v)
        })
        .await
    }

    async fn get_guest_info(
        &self,
        _: Request<cmd::EmptyRequest>,
    ) -> Result<Response<cmd::GuestInfoResponse>, Status> {
        Ok(Response::new(cmd::GuestInfoResponse {
            response: Some(ok()),
            guest_info_response: NO_AGENT_GUEST_INFO.into(),
        }))
    }

    async fn get_users(
        &self,
        _: Request<cmd::EmptyRequest>,
    ) -> Result<Response<cmd::GuestUserListResponse>, Status> {
        Ok(Response::new(cmd::GuestUserListResponse {
            response: Some(ok()),
            guest_user_list_response: "[]".into(),
        }))
    }

    async fn get_filesystems(
        &self,
        _: Request<cmd::EmptyRequest>,
    ) -> Result<Response<cmd::GuestFilesystemsResponse>, Status> {
        Ok(Response::new(cmd::GuestFilesystemsResponse {
            response: Some(ok()),
            guest_filesystems_response: "[]".into(),
        }))
    }

    async fn guest_ping(
        &self,
        _: Request<cmd::GuestPingRequest>,
    ) -> Result<Response<cmd::GuestPingResponse>, Status> {
        self.backend.guest_ping_failed();
        Err(Status::unknown(NO_AGENT))
    }

    async fn exec(
        &self,
        _: Request<cmd::ExecRequest>,
    ) -> Result<Response<cmd::ExecResponse>, Status> {
        Err(Status::unknown(NO_AGENT))
    }
}

/// virt-launcher mode's one tokio runtime: a current-thread scheduler on its own thread
/// (`rvmm-grpc`), so the VM controller stays synchronous. Dropping it stops everything
/// spawned on it.
///
/// The runtime is built on the caller's thread: that creates its epoll instance and its
/// waker's eventfd, which the thread's filter does not allow. It has no blocking pool in use
/// (backend calls go to the [`ControlThread`]), so the thread starts no thread.
#[derive(Debug)]
pub struct GrpcRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcRuntime {
    /// Starts the runtime thread, unfiltered (tests, in-process clients).
    pub fn start() -> Result<Self, GrpcError> {
        Self::start_filtered(None)
    }

    /// Starts the runtime thread, which installs `filter` first (none: `--seccomp=false`;
    /// virt-launcher mode's is [`crate::seccomp::grpc_filter`]). Start the threads the
    /// runtime's users need (the [`ControlThread`]) from elsewhere: this one cannot.
    pub fn start_filtered(filter: Option<BpfProgram>) -> Result<Self, GrpcError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(GrpcError::Runtime)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = spawn_filtered("rvmm-grpc", filter, move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(GrpcError::Thread)?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where to spawn tasks or `block_on` from other threads.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for GrpcRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The command server running on a [`GrpcRuntime`], for synchronous callers. Stop (or drop) it
/// from outside the runtime, before the runtime.
#[derive(Debug)]
pub struct LauncherServer {
    handle: Handle,
    sockets_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), GrpcError>>>,
}

impl LauncherServer {
    /// Binds `launcher-init-sock` in `sockets_dir` and starts serving `backend`, with backend
    /// calls on a [`ControlThread`] started here, filtered with `control_filter`.
    pub fn start(
        runtime: &GrpcRuntime,
        sockets_dir: &Path,
        backend: Arc<dyn LauncherBackend>,
        control_filter: Option<BpfProgram>,
    ) -> Result<Self, GrpcError> {
        let handle = runtime.handle().clone();
        let listener = {
            let _entered = handle.enter();
            bind(sockets_dir)?
        };
        let control =
            ControlThread::start("launcher-control", control_filter).map_err(GrpcError::Thread)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = handle.spawn(serve_with(listener, backend, control, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            handle,
            sockets_dir: sockets_dir.to_owned(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Renames the socket to `launcher-sock` (see [`mark_ready`]).
    pub fn mark_ready(&self) -> Result<(), GrpcError> {
        mark_ready(&self.sockets_dir)
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) -> Result<(), GrpcError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), GrpcError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = match self.task.take() {
            // A graceful stop waits for clients to hang up, and virt-handler keeps its
            // connection: give in-flight calls a moment, then drop the connections.
            Some(mut task) => self.handle.block_on(async {
                match tokio::time::timeout(STOP_GRACE, &mut task).await {
                    Ok(joined) => joined.map_err(GrpcError::Task).and_then(|r| r),
                    Err(_) => {
                        task.abort();
                        Ok(())
                    }
                }
            }),
            None => Ok(()),
        };
        for path in [
            init_socket_path(&self.sockets_dir),
            ready_socket_path(&self.sockets_dir),
        ] {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

impl Drop for LauncherServer {
    fn drop(&mut self) {
        if self.task.is_some()
            && let Err(e) = self.shutdown()
        {
            log::warn!("stopping the command server: {}", error_chain(&e));
        }
    }
}

#[cfg(test)]
#[path = "grpc_tests.rs"]
pub(crate) mod tests;
