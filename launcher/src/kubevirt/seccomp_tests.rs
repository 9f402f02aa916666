//! virt-launcher mode's gRPC runtime under its seccomp filter ([`grpc_filter`]): what it must
//! refuse (forked children), and the command server and the notify client working on a
//! filtered runtime (in a child test process, so that a missing rule kills only the child).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::grpc::tests::{TempDir, fake_virt_handler};
use super::grpc::{
    BackendError, GrpcRuntime, LauncherBackend, LauncherServer, connect_unix, init_socket_path,
};
use super::notify::{DomainEvent, Notifier};
use super::proto::cmd::info::CmdInfoRequest;
use super::proto::cmd::info::cmd_info_client::CmdInfoClient;
use super::proto::cmd::v1 as cmd;
use super::proto::cmd::v1::cmd_client::CmdClient;
use super::vmi::Vmi;
use crate::seccomp::tests::{
    EXITED_CLEANLY, KILLED_BY_SIGSYS, assert_allows_none, assert_child_passed,
    end_of_filtered_child, run_test_in_child,
};
use crate::seccomp::{grpc_filter, grpc_rules};

#[test]
fn grpc_rules_allow_no_thread_process_or_file_creation() {
    assert_allows_none(
        "grpc",
        grpc_rules(),
        &[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_ioctl,
        ],
    );
}

#[test]
fn grpc_filter_kills_a_thread_that_starts_a_thread_execs_or_opens_a_file() {
    let filter = grpc_filter().unwrap();
    let end = end_of_filtered_child(&filter, || {
        // SAFETY: a null clone_args with size 0 is rejected by the kernel before any effect.
        unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    });
    assert_eq!(end, KILLED_BY_SIGSYS, "clone3");
    let end = end_of_filtered_child(&filter, || {
        // SAFETY: null path and argument vectors: the kernel fails the call with EFAULT.
        unsafe { libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize) };
    });
    assert_eq!(end, KILLED_BY_SIGSYS, "execve");
    let end = end_of_filtered_child(&filter, || {
        // SAFETY: opens a constant, NUL-terminated path read-only; the child exits right
        // after, which closes it.
        unsafe {
            libc::open(
                c"/proc/self/maps".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
    });
    assert_eq!(end, KILLED_BY_SIGSYS, "openat");
    let end = end_of_filtered_child(&filter, || {
        // SAFETY: creates a socket from constant arguments; the child exits right after.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    });
    assert_eq!(end, KILLED_BY_SIGSYS, "an inet socket");
}

#[test]
fn grpc_filter_allows_the_notify_clients_unix_socket_and_the_servers_peer_checks() {
    let filter = grpc_filter().unwrap();
    let end = end_of_filtered_child(&filter, || {
        let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: creates a socket from constant arguments; the child exits right after.
        unsafe { libc::socket(libc::AF_UNIX, kind, 0) };
    });
    assert_eq!(end, EXITED_CLEANLY, "a unix socket");
    let end = end_of_filtered_child(&filter, || {
        let mut cred = [0u8; 12];
        let mut len = cred.len() as libc::socklen_t;
        // SAFETY: -1 is no descriptor: the call fails with EBADF; the buffers are valid.
        unsafe {
            libc::getsockopt(
                -1,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                cred.as_mut_ptr().cast(),
                &mut len,
            )
        };
    });
    assert_eq!(end, EXITED_CLEANLY, "SO_PEERCRED");
}

/// Set in the child test process of
/// [`filtered_runtime_serves_commands_and_reconnects_the_notify_client`].
const CHILD_ENV: &str = "RVMM_TEST_FILTERED_GRPC_RUNTIME";

#[test]
fn filtered_runtime_serves_commands_and_reconnects_the_notify_client() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return serve_and_notify_on_a_filtered_runtime();
    }
    // The filter applies to the runtime's thread of this process: run the test in a child,
    // which a missing rule kills with SIGSYS.
    let output = run_test_in_child(
        concat!(
            module_path!(),
            "::filtered_runtime_serves_commands_and_reconnects_the_notify_client"
        ),
        &[(CHILD_ENV, "1")],
    );
    assert_child_passed(&output);
}

/// Answers every command, and GetDomain with a fixed domain.
struct QuietBackend;

impl LauncherBackend for QuietBackend {
    fn sync(&self, _: &Vmi, _: &cmd::VirtualMachineOptions) -> Result<(), BackendError> {
        Ok(())
    }
    fn pause(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn unpause(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn shutdown(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn kill(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn delete(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn reset(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn soft_reboot(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn domain(&self) -> Option<Value> {
        Some(json!({"kind": "Domain"}))
    }
    fn domain_stats(&self) -> Result<Option<Value>, BackendError> {
        Ok(None)
    }
    fn migrate(&self, _: &Vmi, _: &[u8]) -> Result<(), BackendError> {
        Ok(())
    }
    fn sync_migration_target(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn cancel_migration(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn finalize_migration(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
    fn signal_target_pod_cleanup(&self, _: &Vmi) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A fake virt-handler on a runtime of its own, so that it can go away and come back.
fn start_virt_handler(
    share_dir: &Path,
) -> (
    GrpcRuntime,
    tokio::sync::mpsc::UnboundedReceiver<super::proto::notify::v1::DomainEventRequest>,
) {
    let _ = std::fs::remove_file(share_dir.join(super::notify::NOTIFY_SOCKET));
    let runtime = GrpcRuntime::start().unwrap();
    let received = {
        let _entered = runtime.handle().enter();
        fake_virt_handler(share_dir, vec![1])
    };
    (runtime, received)
}

/// The child's test: the command server and the notify client's connections on a runtime
/// filtered as in virt-launcher mode, the notify client reconnecting after virt-handler
/// went away.
fn serve_and_notify_on_a_filtered_runtime() {
    let dir = TempDir::new("seccomp");
    let runtime = GrpcRuntime::start_filtered(Some(grpc_filter().unwrap())).unwrap();
    let sockets = dir.0.join("sockets");
    let server = LauncherServer::start(&runtime, &sockets, Arc::new(QuietBackend), None).unwrap();

    // Commands: Info on the runtime, GetDomain through the control thread.
    let (client_runtime, mut received) = start_virt_handler(&dir.0);
    let socket = init_socket_path(&sockets);
    let (versions, domain) = client_runtime.handle().block_on(async {
        let channel = connect_unix(&socket).await.unwrap();
        let info = CmdInfoClient::new(channel.clone())
            .info(CmdInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        let domain = CmdClient::new(channel)
            .get_domain(cmd::EmptyRequest {})
            .await
            .unwrap()
            .into_inner();
        (info.supported_cmd_versions, domain.domain)
    });
    assert_eq!(versions, [super::grpc::CMD_VERSION]);
    assert_eq!(domain, json!({"kind": "Domain"}).to_string());

    // Domain events, sent over the filtered runtime.
    let mut notifier = Notifier::new(&dir.0);
    notifier.retry_interval = Duration::from_millis(50);
    let event = DomainEvent::modified(json!({"Spec": {}}));
    notifier.send_blocking(runtime.handle(), &event).unwrap();
    assert_eq!(received.blocking_recv().unwrap().event_type, "MODIFIED");
    // virt-handler restarts: the notifier's channel connects again.
    drop(client_runtime);
    let (_client_runtime, mut received) = start_virt_handler(&dir.0);
    notifier.send_blocking(runtime.handle(), &event).unwrap();
    assert_eq!(received.blocking_recv().unwrap().event_type, "MODIFIED");

    server.stop().unwrap();
    drop(runtime);
}
