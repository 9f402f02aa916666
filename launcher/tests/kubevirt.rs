//! The real binary in virt-launcher mode, driven as virt-handler drives it: commands over
//! `<share-dir>/sockets/launcher-sock` with tonic clients of KubeVirt's protocol, domain events
//! received by a fake virt-handler on `<share-dir>/domain-notify-pipe.sock`.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use common::{kvm_available, tiny_guest};
use launcher::kubevirt::grpc::{GrpcRuntime, connect_unix};
use launcher::kubevirt::proto::cmd::info::CmdInfoRequest;
use launcher::kubevirt::proto::cmd::info::cmd_info_client::CmdInfoClient;
use launcher::kubevirt::proto::cmd::v1 as cmd;
use launcher::kubevirt::proto::cmd::v1::cmd_client::CmdClient;
use launcher::kubevirt::proto::notify::info::notify_info_server::{NotifyInfo, NotifyInfoServer};
use launcher::kubevirt::proto::notify::info::{NotifyInfoRequest, NotifyInfoResponse};
use launcher::kubevirt::proto::notify::v1 as notify;
use launcher::kubevirt::proto::notify::v1::notify_server::{Notify, NotifyServer};
use serde_json::{Value, json};
use tokio::runtime::Handle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

/// A launcher pod's directories in a temporary directory, removed on drop.
struct Pod {
    root: PathBuf,
}

impl Pod {
    fn new(tag: &str) -> Self {
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

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// virt-launcher's directory flags for this pod.
    fn flags(&self) -> Vec<String> {
        vec![
            "--kubevirt-share-dir".into(),
            self.path("share").display().to_string(),
            "--ephemeral-disk-dir".into(),
            self.path("ephemeral").display().to_string(),
            "--container-disk-dir".into(),
            self.path("cd").display().to_string(),
        ]
    }

    fn ready_socket(&self) -> PathBuf {
        self.path("share/sockets/launcher-sock")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The launcher process; killed if the test ends before it exits.
struct Launcher {
    child: Child,
    stderr: PathBuf,
}

impl Launcher {
    /// Runs `program` (the rvmm binary, or a link to it) with `args`.
    fn start(program: &Path, args: &[String], pod: &Pod) -> Self {
        let stderr = pod.path("launcher.log");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn rvmm");
        Self { child, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_for(&self, path: &Path, timeout: Duration) {
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

    fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill has no memory effects; the pid is our child's, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
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
struct FakeVirtHandler {
    events: Sender<notify::DomainEventRequest>,
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
}

/// Serves the fake virt-handler at `<share-dir>/domain-notify-pipe.sock` on `runtime`.
fn fake_virt_handler(runtime: &GrpcRuntime, pod: &Pod) -> Receiver<notify::DomainEventRequest> {
    let (events, received) = channel();
    let handler = FakeVirtHandler { events };
    let _entered = runtime.handle().enter();
    let listener =
        tokio::net::UnixListener::bind(pod.path("share/domain-notify-pipe.sock")).unwrap();
    runtime.handle().spawn(
        Server::builder()
            .add_service(NotifyInfoServer::new(handler.clone()))
            .add_service(NotifyServer::new(handler))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    received
}

/// A domain event: type, `Status.Status`, `Status.Reason`, and the domain.
fn next_event(events: &Receiver<notify::DomainEventRequest>) -> (String, String, String, Value) {
    let request = events
        .recv_timeout(Duration::from_secs(20))
        .expect("a domain event within 20 s");
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
struct Handler {
    runtime: Handle,
    channel: Channel,
}

impl Handler {
    fn connect(runtime: &GrpcRuntime, socket: &Path) -> Self {
        let runtime = runtime.handle().clone();
        let channel = runtime.block_on(connect_unix(socket)).unwrap();
        Self { runtime, channel }
    }

    fn info(&self) -> Vec<u32> {
        let mut client = CmdInfoClient::new(self.channel.clone());
        self.runtime
            .block_on(client.info(CmdInfoRequest {}))
            .unwrap()
            .into_inner()
            .supported_cmd_versions
    }

    fn cmd(&self) -> CmdClient<Channel> {
        CmdClient::new(self.channel.clone())
    }

    fn block_on<T>(&self, call: impl Future<Output = T>) -> T {
        self.runtime.block_on(call)
    }

    /// Runs a VMI command; returns `(success, message)`.
    fn vmi_command(&self, name: &str, vmi: &Value) -> (bool, String) {
        let request = cmd::VmiRequest {
            vmi: Some(cmd::Vmi {
                vmi_json: vmi.to_string().into_bytes(),
            }),
            options: None,
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
                other => panic!("no command {other}"),
            }
        });
        let response = response
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .into_inner();
        (response.success, response.message)
    }

    /// GetDomain's domain, `None` for "no domain".
    fn domain(&self) -> Option<Value> {
        let mut c = self.cmd();
        let response = self
            .block_on(c.get_domain(cmd::EmptyRequest {}))
            .unwrap()
            .into_inner();
        assert!(response.response.unwrap().success);
        (!response.domain.is_empty()).then(|| serde_json::from_str(&response.domain).unwrap())
    }

    fn domain_status(&self) -> (String, String) {
        let d = self.domain().expect("a domain");
        (
            d["Status"]["Status"].as_str().unwrap().into(),
            d["Status"]["Reason"].as_str().unwrap().into(),
        )
    }
}

fn status(status: &str, reason: &str) -> (String, String) {
    (status.into(), reason.into())
}

/// A kernel-boot VMI booting `kernel` (a file name in the container-disk directory's
/// `kernel-boot/`) with 64 MiB; no serial console (its socket lives in
/// /var/run/kubevirt-private).
fn kernel_boot_vmi(uid: &str, kernel: &str) -> Value {
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

/// `rvmm virt-launcher` for VMI `uid-1` with a fake virt-handler, `tiny_guest(guest)` as the
/// VMI's kernel and `--grace-period-seconds grace`, ready for commands.
struct Session {
    // Declared first: the launcher is killed before the pod's directory goes.
    launcher: Launcher,
    events: Receiver<notify::DomainEventRequest>,
    runtime: GrpcRuntime,
    pod: Pod,
}

impl Session {
    fn start(tag: &str, guest: &str, grace: u32) -> Self {
        let pod = Pod::new(tag);
        let kernel = format!("cd/kernel-boot/{guest}.elf");
        std::fs::copy(tiny_guest(guest), pod.path(&kernel)).unwrap();
        let runtime = GrpcRuntime::start().unwrap();
        let events = fake_virt_handler(&runtime, &pod);
        let mut args: Vec<String> = [
            "virt-launcher",
            "--name",
            "testvm",
            "--namespace",
            "default",
            "--uid",
            "uid-1",
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
            runtime,
            pod,
        }
    }

    fn handler(&self) -> Handler {
        Handler::connect(&self.runtime, &self.pod.ready_socket())
    }

    /// The next event's type, state and reason.
    fn next(&self) -> (String, String, String) {
        let (kind, state, reason, _) = next_event(&self.events);
        (kind, state, reason)
    }
}

fn event(kind: &str, state: &str, reason: &str) -> (String, String, String) {
    (kind.into(), state.into(), reason.into())
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
