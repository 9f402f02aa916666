//! `rvmm virt-launcher` (or the binary installed as `virt-launcher`/`virt-launcher-monitor`):
//! rvmm in a KubeVirt launcher pod, in place of virt-launcher-monitor, virt-launcher, libvirt
//! and QEMU.
//!
//! Start-up: SIGTERM and SIGINT are blocked before any thread starts; then the VMM (CPU profile
//! `auto`, seccomp filters on, no event monitor; the console is the VMI's serial socket), the
//! gRPC runtime and its control thread, the domain-event thread and the command server on
//! `<share-dir>/sockets/launcher-init-sock`, renamed to `launcher-sock` once it serves: that
//! rename is KubeVirt's readiness signal. virt-handler then sends the VMI (SyncVirtualMachine)
//! and drives the VM through the command server ([`super::backend`]).
//!
//! The end:
//! - The guest powers off or crashes, or KillVirtualMachine stops the VM: the domain stays,
//!   Shutoff, as KubeVirt's does, until virt-handler deletes it (at most
//!   [`super::domain_events::DELETE_WAIT`]). A guest's reboot restarts the guest.
//! - DeleteVirtualMachine: the VM is stopped (if it still runs) and forgotten, the final event
//!   goes out, rvmm exits: 0, or as `rvmm run` for how the guest ended (3 a crash, 1 when KVM
//!   could not run it).
//! - SIGTERM: as KubeVirt's launcher, rvmm marks the domain for a graceful shutdown (a domain
//!   event) and lets virt-handler drive it (ShutdownVirtualMachine, then Kill); once
//!   `--grace-period-seconds` have passed the VM is stopped. Without a VM running rvmm exits at
//!   once; a second signal stops the VM at once.
//! - No VMI synced within `--qemu-timeout`: exit 1, as virt-launcher's "timed out waiting for
//!   domain to be defined".
//!
//! Every way out stops the VM (disks flushed), sends the last domain events (for at most
//! [`FINAL_EVENTS_WITHIN`]: a virt-handler that does not answer does not hold the pod), stops
//! the command server, removes its socket and, as virt-launcher-monitor does, the container
//! disks' sockets (`<container-disk-dir>/*.sock`), which ends the containerDisk containers.
//! `--keep-after-failure` then keeps a failed launcher (exit code not 0) alive until a signal,
//! for debugging; `--simulate-crash` fails at once. The other flags are accepted and logged
//! ([`super::launcher_flags::FLAG_USES`]).
//!
//! Seccomp: as `rvmm run`, one filter per thread kind ([`crate::seccomp`]) on every thread;
//! the mode has no `--seccomp` flag, filters are always on. The gRPC runtime thread has
//! [`crate::seccomp::grpc_filter`] (backend calls run on the `launcher-control` thread, which
//! builds the VM under [`crate::seccomp::control_rules`]); `kubevirt-notify`, the signal
//! thread and the `--qemu-timeout` watch have their own; so has a live migration's sending
//! thread (`kubevirt-migrate`, [`crate::seccomp::migration_send_rules`]), while the
//! receiving one (`kubevirt-receive`) builds the VM under the control rules; the main thread
//! filters itself with [`crate::seccomp::main_filter`] once every other thread of its own
//! has started, and then only waits for the end and tears down.

use std::path::Path;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rvmm_core::CpuProfile;
use rvmm_core::cpuid::KVM_PVM_MODULE;
use rvmm_core::seccomp::spawn_filtered;

use super::backend::{DomainRecord, KubevirtBackend};
use super::container_disks::ContainerDiskSockets;
use super::domain_events::{DELETE_WAIT, DomainEvents};
use super::grpc::{GrpcError, GrpcRuntime, LauncherServer, error_chain, ready_socket_path};
use super::launcher_flags::{LauncherFlags, VirtLauncherArgs};
use super::notify::{Notifier, VmiRef};
use crate::events::EventMonitor;
use crate::seccomp::{
    control_rules, filter_main_thread, grpc_filter, notify_rules, signal_rules, thread_filter_for,
    timer_rules,
};
use crate::shutdown::{ShutdownSignals, SignalEvent};
use crate::vmm::{EXIT_OK, EXIT_VMM_ERROR, OnReboot, Vmm, VmmSettings};

/// How long the launcher gives its last events at exit, when virt-handler does not take them
/// at once (its socket gone, say): the exit stays within the grace period plus a few seconds.
const FINAL_EVENTS_WITHIN: Duration = Duration::from_secs(3);

/// The mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum LauncherModeError {
    /// The shutdown signals cannot be blocked.
    #[error("Cannot block the shutdown signals")]
    Signals(#[source] std::io::Error),
    /// A thread of the mode cannot start.
    #[error("Cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// A filtered thread of the mode cannot start.
    #[error("Cannot start the {0} thread")]
    Spawn(&'static str, #[source] rvmm_core::seccomp::SpawnError),
    /// The command server cannot start or become ready.
    #[error("Cannot start the command server")]
    Server(#[source] GrpcError),
    /// The main thread cannot install its seccomp filter.
    #[error("Cannot filter the main thread's system calls")]
    Seccomp(#[source] rvmm_core::seccomp::SeccompError),
}

/// Runs the virt-launcher mode; returns the exit code.
/// The binary's `main` has made glibc keep one malloc arena first
/// ([`rvmm_core::seccomp::single_malloc_arena`]).
pub fn run(flags: &LauncherFlags) -> u8 {
    // Before any thread starts, so that every thread inherits the blocked signals.
    let signals = match ShutdownSignals::block() {
        Ok(signals) => signals,
        Err(e) => return fail(&LauncherModeError::Signals(e)),
    };
    let args = &flags.args;
    log::info!(
        "rvmm as virt-launcher for VMI {}/{} (uid {}), share dir {}",
        args.namespace,
        args.name,
        args.uid,
        args.kubevirt_share_dir.display()
    );
    flags.log_usage();
    // Opened before the main thread filters itself; cleaned up on every way out.
    let container_disks = ContainerDiskSockets::open(&args.container_disk_dir);
    if args.simulate_crash {
        eprintln!("rvmm: simulated virt-launcher crash (--simulate-crash)");
        container_disks.remove_sockets();
        return EXIT_VMM_ERROR;
    }
    let settings = settings();
    let seccomp = settings.seccomp;
    let vmm = Vmm::new(settings, EventMonitor::disabled());
    let backend = Arc::new(OnceLock::new());
    let grace = Duration::from_secs(u64::try_from(args.grace_period_seconds).unwrap_or(0));
    let (woken, signalled) = channel();
    let on_signal = {
        let vmm = vmm.clone();
        let backend = backend.clone();
        let mut first = true;
        move |event| match event {
            SignalEvent::Shutdown(_) => {
                let _ = woken.send(());
                shutdown_signal(
                    &vmm,
                    backend.get(),
                    std::mem::replace(&mut first, false),
                    grace,
                )
            }
            SignalEvent::TimerExpired => {
                vmm.grace_period_over();
                None
            }
        }
    };
    let signal_filter = match thread_filter_for(seccomp, signal_rules()) {
        Ok(filter) => filter,
        Err(e) => return fail(&LauncherModeError::Seccomp(e)),
    };
    if let Err(e) = signals.handle_with(signal_filter, on_signal) {
        return fail(&LauncherModeError::Spawn("signal", e));
    }
    let code = match Launcher::start(args, &vmm, seccomp) {
        Ok(launcher) => {
            let _ = backend.set(launcher.backend.clone());
            watch_first_sync(&vmm, &launcher.backend, args.qemu_timeout, seccomp);
            // The main thread has started its threads (signals, the gRPC runtime and the
            // control thread, the event thread, the --qemu-timeout watch; the grace timer
            // is the signal thread's, the VM's threads the control thread's): from here on
            // it only waits and tears down.
            let filtered = if seccomp {
                filter_main_thread().map_err(LauncherModeError::Seccomp)
            } else {
                Ok(())
            };
            if filtered.is_err() {
                vmm.request_exit(EXIT_VMM_ERROR);
            }
            let code = launcher.run_to_end(&vmm);
            match filtered {
                Ok(()) => code,
                Err(e) => fail(&e),
            }
        }
        Err(e) => {
            vmm.request_exit(EXIT_VMM_ERROR);
            vmm.teardown();
            fail(&e)
        }
    };
    container_disks.remove_sockets();
    if code != EXIT_OK && args.keep_after_failure {
        keep_after_failure(&signalled, code);
    }
    code
}

fn fail(err: &LauncherModeError) -> u8 {
    // The whole cause chain, once, on one line.
    eprintln!("rvmm: {}", error_chain(err));
    EXIT_VMM_ERROR
}

/// The VMM's host-side settings in a launcher pod (seccomp filters always on: the mode has
/// no `--seccomp` flag). As under KubeVirt's libvirt (no `on_reboot` in its domains), a guest
/// reboot restarts the guest and the domain stays running; a guest that ends itself leaves a
/// stopped domain for virt-handler to delete.
fn settings() -> VmmSettings {
    VmmSettings {
        kvm_path: "/dev/kvm".into(),
        cpu_profile: CpuProfile::for_host(Path::new(KVM_PVM_MODULE).exists()),
        serial_log: None,
        seccomp: true,
        on_reboot: OnReboot::Restart,
        exit_when_guest_ends: false,
    }
}

/// A shutdown signal (`first` for the first one); returns the grace period to time.
fn shutdown_signal(
    vmm: &Arc<Vmm>,
    backend: Option<&Arc<KubevirtBackend>>,
    first: bool,
    grace: Duration,
) -> Option<Duration> {
    if !first {
        log::warn!("Second shutdown signal: stopping the VM now");
        vmm.request_exit(EXIT_OK);
        return None;
    }
    if !backend.is_some_and(|b| b.mark_for_graceful_shutdown()) {
        log::info!("Shutdown signal: no VM runs, exiting");
        vmm.request_exit(vmm.vm_end_code());
        return None;
    }
    log::warn!(
        "Shutdown signal: domain marked for a graceful shutdown by virt-handler; the VM is \
         stopped in {} s",
        grace.as_secs()
    );
    Some(grace)
}

/// `--qemu-timeout`: without a synced VMI by then, the launcher fails.
fn watch_first_sync(
    vmm: &Arc<Vmm>,
    backend: &Arc<KubevirtBackend>,
    timeout: Duration,
    seccomp: bool,
) {
    let vmm = vmm.clone();
    let backend = backend.clone();
    let filter = match thread_filter_for(seccomp, timer_rules()) {
        Ok(filter) => filter,
        Err(e) => {
            log::warn!("--qemu-timeout is not watched: {e}");
            return;
        }
    };
    let watch = spawn_filtered("qemu-timeout", filter, move || {
        std::thread::sleep(timeout);
        if !backend.has_synced() {
            eprintln!(
                "rvmm: no VMI was synced within --qemu-timeout {}s",
                timeout.as_secs()
            );
            vmm.request_exit(EXIT_VMM_ERROR);
        }
    });
    if let Err(e) = watch {
        log::warn!("--qemu-timeout is not watched: {e}");
    }
}

/// `--keep-after-failure`: stay until a signal.
fn keep_after_failure(signalled: &Receiver<()>, code: u8) {
    // Signals that came before the failure do not count.
    while signalled.try_recv().is_ok() {}
    log::warn!("Exit code {code}: kept alive until a signal (--keep-after-failure)");
    let _ = signalled.recv();
}

/// The running launcher. Fields drop in order: the server before its runtime.
struct Launcher {
    server: LauncherServer,
    events: DomainEvents,
    backend: Arc<KubevirtBackend>,
    runtime: GrpcRuntime,
}

impl Launcher {
    /// Starts the event thread and the command server, and marks the launcher ready. The
    /// runtime's thread is filtered with [`grpc_filter`] when `seccomp` is true.
    fn start(
        args: &VirtLauncherArgs,
        vmm: &Arc<Vmm>,
        seccomp: bool,
    ) -> Result<Self, LauncherModeError> {
        let filter = seccomp
            .then(grpc_filter)
            .transpose()
            .map_err(|e| LauncherModeError::Server(GrpcError::Seccomp(e)))?;
        let runtime = GrpcRuntime::start_filtered(filter).map_err(LauncherModeError::Server)?;
        let record = Arc::new(DomainRecord::default());
        let vmi = VmiRef {
            namespace: args.namespace.clone(),
            name: args.name.clone(),
            uid: args.uid.clone(),
        };
        let notify_filter =
            thread_filter_for(seccomp, notify_rules()).map_err(LauncherModeError::Seccomp)?;
        let events = DomainEvents::start(
            Notifier::new(&args.kubevirt_share_dir),
            runtime.handle().clone(),
            record.clone(),
            vmm.clone(),
            vmi,
            DELETE_WAIT,
            notify_filter,
        )
        .map_err(|e| LauncherModeError::Spawn("domain-event", e))?;
        vmm.on_event(events.listener(record.clone()));
        let backend = Arc::new(
            KubevirtBackend::new(
                vmm.clone(),
                args.dirs(),
                args.uid.clone(),
                record,
                events.sender(),
            )
            .with_share_dir(args.kubevirt_share_dir.clone()),
        );
        let sockets = args.sockets_dir();
        let control_filter =
            thread_filter_for(seccomp, control_rules()).map_err(LauncherModeError::Seccomp)?;
        let server = LauncherServer::start(&runtime, &sockets, backend.clone(), control_filter)
            .map_err(LauncherModeError::Server)?;
        server.mark_ready().map_err(LauncherModeError::Server)?;
        log::info!(
            "Ready: commands on {}",
            ready_socket_path(&sockets).display()
        );
        Ok(Self {
            server,
            events,
            backend,
            runtime,
        })
    }

    /// Waits for the VMM's end, stops the VM, delivers the last events and stops serving.
    fn run_to_end(self, vmm: &Vmm) -> u8 {
        let code = vmm.wait_for_exit();
        vmm.teardown();
        let finished = self.events.finish(FINAL_EVENTS_WITHIN);
        if let Err(e) = self.server.stop() {
            log::warn!("Stopping the command server: {}", error_chain(&e));
        }
        if finished {
            drop(self.runtime);
        } else {
            // The event thread still waits inside the runtime: shutting the runtime down under
            // it would panic that thread. The process ends now anyway.
            log::warn!("The domain-event thread did not end: leaving it to the exit");
            std::mem::forget(self.runtime);
        }
        code
    }
}
