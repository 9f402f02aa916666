//! `--event-monitor path=FILE|fd=N`: one JSON object per line for every change in the VM's
//! life (`vm.booted`, `vm.paused`, `vm.resumed`, `vm.shutdown`, `vm.rebooted`, `guest.crashed`,
//! `vm.snapshotted`, `vm.restored`, `vm.migration-started`, `vm.migrated`,
//! `vm.migration-failed`, `vm.migration-received`), in its NICs' DHCP leases
//! (`net.dhcp-lease`, `net.dhcp-release`) and the VMM's end (`vmm.shutdown`), each with a
//! wall-clock timestamp and the VMM's uptime.
//!
//! The events are typed ([`Event`], wrapping rvmm-core's [`VmEvent`]); their names and
//! properties here are the one place that turns them into text.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rvmm_core::{BootInfo, RebootCause, VmEvent};
use serde_json::{Value, json};

use crate::dhcp::handler::LeaseChange;
use crate::dhcp::server::{LeaseEvent, format_mac};
use crate::keyvalue::KeyValues;

/// Everything the VMM reports: its VM's life, its NICs' DHCP leases and its own end.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A change in the VM's life.
    Vm(VmEvent),
    /// A NIC's DHCP lease was bound or released.
    Dhcp(LeaseEvent),
    /// The VMM is exiting.
    VmmShutdown {
        /// Its exit code.
        exit_code: u8,
    },
}

impl From<VmEvent> for Event {
    fn from(event: VmEvent) -> Self {
        Self::Vm(event)
    }
}

impl Event {
    /// The event's name in the event stream.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Vm(event) => match event {
                VmEvent::Booted(_) => "vm.booted",
                VmEvent::Paused => "vm.paused",
                VmEvent::Resumed => "vm.resumed",
                VmEvent::Rebooted { .. } => "vm.rebooted",
                VmEvent::Shutdown(_) => "vm.shutdown",
                VmEvent::Crashed(_) => "guest.crashed",
                VmEvent::Snapshotted(_) => "vm.snapshotted",
                VmEvent::Restored(_) => "vm.restored",
                VmEvent::MigrationStarted { .. } => "vm.migration-started",
                VmEvent::Migrated(_) => "vm.migrated",
                VmEvent::MigrationFailed { .. } => "vm.migration-failed",
                VmEvent::MigrationReceived(_) => "vm.migration-received",
            },
            Self::Dhcp(lease) => match lease.change {
                LeaseChange::Bound(_) => "net.dhcp-lease",
                LeaseChange::Released(_) => "net.dhcp-release",
            },
            Self::VmmShutdown { .. } => "vmm.shutdown",
        }
    }

    /// The event's properties in the event stream.
    pub fn properties(&self) -> Value {
        match self {
            Self::Vm(event) => vm_properties(event),
            Self::Dhcp(lease) => {
                let (LeaseChange::Bound(address) | LeaseChange::Released(address)) = lease.change;
                json!({
                    "id": lease.nic,
                    "mac": format_mac(&lease.mac),
                    "address": address.to_string(),
                    "prefix_len": lease.prefix_len,
                })
            }
            Self::VmmShutdown { exit_code } => json!({ "exit_code": exit_code }),
        }
    }
}

fn vm_properties(event: &VmEvent) -> Value {
    match event {
        VmEvent::Booted(boot) => boot_properties(boot),
        VmEvent::Paused | VmEvent::Resumed => Value::Null,
        VmEvent::Rebooted { boot, cause } => {
            let mut properties = boot_properties(boot);
            match cause {
                RebootCause::Host => {}
                RebootCause::Guest => properties["cause"] = json!("guest"),
            }
            properties
        }
        VmEvent::Shutdown(reason) => json!({ "reason": reason.to_string() }),
        VmEvent::Crashed(reason) => json!({ "reason": reason.to_string() }),
        VmEvent::Snapshotted(report) => json!({
            "destination": report.destination.to_string_lossy(),
            "state_bytes": report.info.state_bytes,
            "memory_bytes_written": report.info.memory_bytes,
            "memory_size": report.info.memory_size,
            "snapshot_ms": millis(report.duration),
        }),
        VmEvent::Restored(report) => json!({
            "source_url": report.source,
            "restore_ms": millis(report.duration),
        }),
        VmEvent::MigrationStarted { destination } => json!({ "destination_url": destination }),
        VmEvent::Migrated(report) => json!({
            "status": "completed",
            "total_ms": millis(report.total),
            "downtime_ms": millis(report.downtime),
            "rounds": report.rounds,
            "memory_bytes": report.memory_bytes,
            "start_timestamp": unix_seconds(report.started_at),
            "end_timestamp": unix_seconds(report.ended_at),
        }),
        VmEvent::MigrationFailed { cancelled, error } => json!({
            "status": if *cancelled { "cancelled" } else { "failed" },
            "error": error,
        }),
        VmEvent::MigrationReceived(report) => json!({
            "receiver_url": report.receiver,
            "memory_bytes": report.memory_bytes,
            "total_ms": millis(report.duration),
        }),
    }
}

fn boot_properties(boot: &BootInfo) -> Value {
    json!({
        "vcpus": boot.vcpus,
        "memory_bytes": boot.memory_bytes,
        "kernel": boot.source,
    })
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Why `--event-monitor` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EventMonitorError {
    /// Not `path=FILE` or `fd=N`.
    #[error("--event-monitor: '{0}' is not path=FILE or fd=N")]
    Syntax(String),
    /// The file cannot be opened.
    #[error("--event-monitor: cannot open {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The descriptor is not open.
    #[error("--event-monitor: fd {0} is not an open file descriptor")]
    BadFd(RawFd),
}

/// Where events go; writes nothing when no monitor was asked for.
#[derive(Debug)]
pub struct EventMonitor {
    out: Option<Mutex<File>>,
    started: Instant,
}

impl EventMonitor {
    /// No monitor.
    pub fn disabled() -> Self {
        Self {
            out: None,
            started: Instant::now(),
        }
    }

    /// Parses `path=FILE` (appended to, created when missing) or `fd=N` (inherited from the
    /// parent and owned from now on).
    pub fn open(spec: &str) -> Result<Self, EventMonitorError> {
        let syntax = || EventMonitorError::Syntax(spec.to_string());
        let kv = KeyValues::parse(spec, &["path", "fd"]).map_err(|_| syntax())?;
        let file = match (kv.get("path"), kv.get("fd")) {
            (Some(path), None) if !path.is_empty() => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| EventMonitorError::Open {
                    path: path.into(),
                    source,
                })?,
            (None, Some(fd)) => {
                let fd: RawFd = fd.parse().map_err(|_| syntax())?;
                // SAFETY: F_GETFD only reads the descriptor's flags; any integer is safe.
                if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(EventMonitorError::BadFd(fd));
                }
                // SAFETY: the descriptor is open (checked above) and the user handed it to
                // rvmm for events alone, so nothing else in the process owns it.
                unsafe { File::from_raw_fd(fd) }
            }
            _ => return Err(syntax()),
        };
        Ok(Self {
            out: Some(Mutex::new(file)),
            started: Instant::now(),
        })
    }

    /// Writes one event line; a failing monitor is logged, never fatal to the VM.
    pub fn emit(&self, event: &Event) {
        let Some(out) = &self.out else {
            return;
        };
        let line = event_line(event, SystemTime::now(), self.started.elapsed());
        let mut file = out.lock().unwrap_or_else(|p| p.into_inner());
        // One write per line so readers of a pipe never see half an event.
        if let Err(e) = file.write_all(line.as_bytes()) {
            log::warn!(
                "Cannot write event {} to the event monitor: {e}",
                event.name()
            );
        }
    }
}

/// The JSON line for `event`.
fn event_line(event: &Event, now: SystemTime, uptime: Duration) -> String {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut line = json!({
        "timestamp": since_epoch.as_secs_f64(),
        "uptime_seconds": uptime.as_secs_f64(),
        "event": event.name(),
        "properties": event.properties(),
    })
    .to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use rvmm_core::{
        CrashReason, MigrationReport, ReceivedReport, RestoreReport, ShutdownReason, SnapshotInfo,
        SnapshotReport,
    };

    use super::*;

    fn boot() -> BootInfo {
        BootInfo {
            vcpus: 2,
            memory_bytes: 64 << 20,
            source: "/boot/vmlinux".into(),
        }
    }

    fn lease(change: LeaseChange) -> Event {
        Event::Dhcp(LeaseEvent {
            nic: "default".into(),
            mac: [2, 0, 0, 0, 0, 1],
            prefix_len: 24,
            change,
        })
    }

    /// The name and properties of `event` in the stream.
    fn stream_form(event: impl Into<Event>) -> (&'static str, Value) {
        let event = event.into();
        (event.name(), event.properties())
    }

    #[test]
    fn vm_life_events_keep_their_stream_names_and_properties() {
        let boot_json = json!({"vcpus": 2, "memory_bytes": 64 << 20, "kernel": "/boot/vmlinux"});
        assert_eq!(
            stream_form(VmEvent::Booted(boot())),
            ("vm.booted", boot_json.clone())
        );
        assert_eq!(stream_form(VmEvent::Paused), ("vm.paused", Value::Null));
        assert_eq!(stream_form(VmEvent::Resumed), ("vm.resumed", Value::Null));
        let host_reboot = VmEvent::Rebooted {
            boot: boot(),
            cause: RebootCause::Host,
        };
        assert_eq!(stream_form(host_reboot), ("vm.rebooted", boot_json));
        let guest_reboot = VmEvent::Rebooted {
            boot: boot(),
            cause: RebootCause::Guest,
        };
        assert_eq!(
            stream_form(guest_reboot),
            (
                "vm.rebooted",
                json!({"vcpus": 2, "memory_bytes": 64 << 20, "kernel": "/boot/vmlinux",
                       "cause": "guest"})
            )
        );
    }

    #[test]
    fn every_stop_is_vm_shutdown_or_guest_crashed_with_its_reason_text() {
        let shutdown = |reason| stream_form(VmEvent::Shutdown(reason));
        let with_reason = |name, text: &str| (name, json!({ "reason": text }));
        assert_eq!(
            shutdown(ShutdownReason::PowerOff),
            with_reason("vm.shutdown", "Guest powered off")
        );
        assert_eq!(
            shutdown(ShutdownReason::Reset),
            with_reason("vm.shutdown", "Guest reset")
        );
        assert_eq!(
            shutdown(ShutdownReason::Requested),
            with_reason("vm.shutdown", "Stopped on request")
        );
        assert_eq!(
            shutdown(ShutdownReason::KvmFailure {
                vcpu: 1,
                exit: "KVM_EXIT_INTERNAL_ERROR".into(),
                regs: None
            }),
            with_reason(
                "vm.shutdown",
                "KVM cannot run vCPU 1: KVM_EXIT_INTERNAL_ERROR"
            )
        );
        assert_eq!(
            shutdown(ShutdownReason::RebootFailed("Cannot boot: x".into())),
            with_reason("vm.shutdown", "Cannot boot: x")
        );
        let crashed = |reason| stream_form(VmEvent::Crashed(reason));
        assert_eq!(
            crashed(CrashReason::TripleFault {
                vcpu: 0,
                regs: None
            }),
            with_reason(
                "guest.crashed",
                "Guest triple fault on vCPU 0 (KVM_EXIT_SHUTDOWN)"
            )
        );
        assert_eq!(
            crashed(CrashReason::Reported { vcpu: 3 }),
            with_reason("guest.crashed", "Guest reported a crash on vCPU 3")
        );
    }

    #[test]
    fn snapshot_and_migration_events_keep_their_stream_form() {
        let snapshot = VmEvent::Snapshotted(SnapshotReport {
            destination: "/snap".into(),
            info: SnapshotInfo {
                state_bytes: 10,
                memory_bytes: 20,
                memory_size: 30,
            },
            duration: Duration::from_millis(1500),
        });
        assert_eq!(
            stream_form(snapshot),
            (
                "vm.snapshotted",
                json!({"destination": "/snap", "state_bytes": 10, "memory_bytes_written": 20,
                       "memory_size": 30, "snapshot_ms": 1500.0})
            )
        );
        let restored = VmEvent::Restored(RestoreReport {
            source: "file:///snap".into(),
            duration: Duration::from_millis(2),
        });
        assert_eq!(
            stream_form(restored),
            (
                "vm.restored",
                json!({"source_url": "file:///snap", "restore_ms": 2.0})
            )
        );
        let started = VmEvent::MigrationStarted {
            destination: "tcp:10.0.0.1:6000".into(),
        };
        assert_eq!(
            stream_form(started),
            (
                "vm.migration-started",
                json!({"destination_url": "tcp:10.0.0.1:6000"})
            )
        );
        let migrated = VmEvent::Migrated(MigrationReport {
            total: Duration::from_millis(250),
            downtime: Duration::from_millis(5),
            rounds: 3,
            memory_bytes: 1 << 20,
            started_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            ended_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
        });
        assert_eq!(
            stream_form(migrated),
            (
                "vm.migrated",
                json!({"status": "completed", "total_ms": 250.0, "downtime_ms": 5.0,
                       "rounds": 3, "memory_bytes": 1 << 20,
                       "start_timestamp": 1_700_000_000.0, "end_timestamp": 1_700_000_000.25})
            )
        );
        for (cancelled, status) in [(true, "cancelled"), (false, "failed")] {
            let failed = VmEvent::MigrationFailed {
                cancelled,
                error: "gone".into(),
            };
            assert_eq!(
                stream_form(failed),
                (
                    "vm.migration-failed",
                    json!({"status": status, "error": "gone"})
                )
            );
        }
        let received = VmEvent::MigrationReceived(ReceivedReport {
            receiver: "unix:/tmp/m.sock".into(),
            memory_bytes: 4096,
            duration: Duration::from_millis(40),
        });
        assert_eq!(
            stream_form(received),
            (
                "vm.migration-received",
                json!({"receiver_url": "unix:/tmp/m.sock", "memory_bytes": 4096,
                       "total_ms": 40.0})
            )
        );
    }

    #[test]
    fn launcher_events_keep_their_stream_form() {
        let v4: IpAddr = "10.0.2.2".parse().unwrap();
        let v6: IpAddr = "fd10:0:2::2".parse().unwrap();
        let properties = |address: &str| {
            json!({"id": "default", "mac": "02:00:00:00:00:01", "address": address,
                   "prefix_len": 24})
        };
        assert_eq!(
            stream_form(lease(LeaseChange::Bound(v4))),
            ("net.dhcp-lease", properties("10.0.2.2"))
        );
        assert_eq!(
            stream_form(lease(LeaseChange::Released(v6))),
            ("net.dhcp-release", properties("fd10:0:2::2"))
        );
        assert_eq!(
            stream_form(Event::VmmShutdown { exit_code: 3 }),
            ("vmm.shutdown", json!({"exit_code": 3}))
        );
    }

    #[test]
    fn event_is_one_json_line_with_timestamp_and_properties() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let line = event_line(
            &VmEvent::Booted(boot()).into(),
            now,
            Duration::from_millis(1500),
        );
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["event"], "vm.booted");
        assert_eq!(value["timestamp"], 1_700_000_000.25);
        assert_eq!(value["uptime_seconds"], 1.5);
        assert_eq!(value["properties"]["vcpus"], 2);
    }

    #[test]
    fn path_monitor_appends_lines_to_the_file() {
        let dir = std::env::temp_dir().join(format!("rvmm-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let monitor = EventMonitor::open(&format!("path={}", path.display())).unwrap();
        monitor.emit(&VmEvent::Booted(boot()).into());
        monitor.emit(&VmEvent::Paused.into());
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].to_string())
            .collect();
        assert_eq!(events, ["\"vm.booted\"", "\"vm.paused\""]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_specs_are_rejected_naming_the_flag() {
        for spec in ["", "file=/tmp/x", "fd=abc", "path=", "path=/a,fd=3"] {
            let err = EventMonitor::open(spec).unwrap_err().to_string();
            assert!(err.starts_with("--event-monitor: "), "{spec}: {err}");
        }
        let err = EventMonitor::open("fd=987654").unwrap_err().to_string();
        assert_eq!(
            err,
            "--event-monitor: fd 987654 is not an open file descriptor"
        );
    }

    #[test]
    fn disabled_monitor_writes_nothing() {
        EventMonitor::disabled().emit(&VmEvent::Paused.into());
    }
}
