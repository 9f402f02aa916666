//! `--event-monitor path=FILE|fd=N`: one JSON object per line for every change in the VM's
//! life (`vm.booted`, `vm.paused`, `vm.resumed`, `vm.shutdown`, `vm.rebooted`, `guest.crashed`,
//! `vmm.shutdown`) and in its NICs' DHCP leases (`net.dhcp-lease`, `net.dhcp-release`), each
//! with a wall-clock timestamp and the VMM's uptime.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::keyvalue::KeyValues;

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
    pub fn emit(&self, event: &str, properties: Value) {
        let Some(out) = &self.out else {
            return;
        };
        let line = event_line(event, properties, SystemTime::now(), self.started.elapsed());
        let mut file = out.lock().unwrap_or_else(|p| p.into_inner());
        // One write per line so readers of a pipe never see half an event.
        if let Err(e) = file.write_all(line.as_bytes()) {
            log::warn!("Cannot write event {event} to the event monitor: {e}");
        }
    }
}

/// The JSON line for `event`.
fn event_line(
    event: &str,
    properties: Value,
    now: SystemTime,
    uptime: std::time::Duration,
) -> String {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut line = json!({
        "timestamp": since_epoch.as_secs_f64(),
        "uptime_seconds": uptime.as_secs_f64(),
        "event": event,
        "properties": properties,
    })
    .to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn event_is_one_json_line_with_timestamp_and_properties() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let line = event_line(
            "vm.booted",
            json!({"vcpus": 2}),
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
        monitor.emit("vm.booted", Value::Null);
        monitor.emit("vm.paused", Value::Null);
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
        EventMonitor::disabled().emit("vm.booted", Value::Null);
    }
}
