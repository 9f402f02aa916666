//! The control API's endpoints, as a pure function of (method, path, body) so tests and the
//! `api_request` fuzz target can drive it without a socket.

use std::sync::Arc;

use serde_json::json;

use crate::config::VmConfigFile;
use crate::errors::error_chain;
use crate::vmm::{VmState, Vmm, VmmError};

/// Where Cloud Hypervisor's API lives; rvmm keeps its paths.
pub const API_PREFIX: &str = "/api/v1/";
/// The Prometheus scrape path.
pub const METRICS_PATH: &str = "/metrics";
/// The one method [`METRICS_PATH`] takes.
pub const METRICS_METHOD: &str = "GET";

/// What an endpoint answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Body and whether it is JSON (otherwise plain text).
    pub body: Option<(String, BodyKind)>,
    /// The methods the path takes (for a 405 on the wrong method).
    pub allow: Option<&'static str>,
    /// The VMM should exit once the reply is sent (`vmm.shutdown`).
    pub exit_after: bool,
}

/// A reply body's media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json`.
    Json,
    /// `text/plain` (Prometheus exposition format 0.0.4).
    Text,
}

impl Reply {
    fn no_content() -> Self {
        Self::status(204)
    }

    fn status(status: u16) -> Self {
        Self {
            status,
            body: None,
            allow: None,
            exit_after: false,
        }
    }

    fn json(status: u16, value: &serde_json::Value) -> Self {
        Self {
            body: Some((value.to_string(), BodyKind::Json)),
            ..Self::status(status)
        }
    }

    /// An error reply: `{"error": "..."}` with the whole cause chain.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &json!({ "error": message.into() }))
    }
}

fn vmm_error(err: &VmmError) -> Reply {
    let status = match err {
        VmmError::NotCreated => 404,
        VmmError::WrongState { .. } | VmmError::AlreadyCreated(_) | VmmError::Exiting => 405,
        VmmError::Config(_) | VmmError::Console(_) | VmmError::Url { .. } => 400,
        VmmError::Boot(_) | VmmError::Restore(_) | VmmError::Dhcp(_) if err.is_bad_config() => 400,
        VmmError::MigrationBusy | VmmError::DisksTaken(_) => 409,
        VmmError::Boot(_)
        | VmmError::Waiter(_)
        | VmmError::Snapshot(_)
        | VmmError::Restore(_)
        | VmmError::Migration(_)
        | VmmError::Dhcp(_)
        | VmmError::RebootRefused(_)
        | VmmError::RebootFailed(_) => 500,
    };
    Reply::error(status, error_chain(err))
}

fn done(result: Result<(), VmmError>) -> Reply {
    match result {
        Ok(()) => Reply::no_content(),
        Err(e) => vmm_error(&e),
    }
}

/// Whether a request with this method only reads: every `GET` endpoint (`vmm.ping`,
/// `vm.info`, `vm.counters`, `/metrics`) does, and a `GET` of any other path is refused
/// unchanged. Such requests may run beside a VM operation.
pub fn only_reads(method: &str) -> bool {
    method == "GET"
}

/// The endpoints under [`API_PREFIX`] and the method each takes; every `GET` one only reads
/// ([`only_reads`]).
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("vmm.ping", "GET"),
    ("vmm.shutdown", "PUT"),
    ("vm.create", "PUT"),
    ("vm.boot", "PUT"),
    ("vm.info", "GET"),
    ("vm.counters", "GET"),
    ("vm.pause", "PUT"),
    ("vm.resume", "PUT"),
    ("vm.shutdown", "PUT"),
    ("vm.reboot", "PUT"),
    ("vm.power-button", "PUT"),
    ("vm.delete", "PUT"),
    ("vm.snapshot", "PUT"),
    ("vm.restore", "PUT"),
    ("vm.send-migration", "PUT"),
    ("vm.receive-migration", "PUT"),
];

/// Every path the router serves, with its method: what `launcher/openapi.yaml` must list
/// (`tests/openapi.rs` holds the two to each other).
pub fn routes() -> impl Iterator<Item = (String, &'static str)> {
    ENDPOINTS
        .iter()
        .map(|(name, method)| (format!("{API_PREFIX}{name}"), *method))
        .chain(std::iter::once((METRICS_PATH.to_string(), METRICS_METHOD)))
}

/// Answers one request.
pub fn handle(vmm: &Arc<Vmm>, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    // A query string changes nothing here.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path == METRICS_PATH {
        if method != METRICS_METHOD {
            return wrong_method(method, path, METRICS_METHOD);
        }
        let mut text = crate::metrics::render(
            vmm.state().map_or("NotCreated", VmState::name),
            vmm.uptime(),
            vmm.metrics().as_ref(),
        );
        text.push_str(&crate::vmm::migration::render_metrics(
            vmm.migration_stats().as_ref(),
        ));
        return Reply {
            body: Some((text, BodyKind::Text)),
            ..Reply::status(200)
        };
    }
    let Some((name, allowed)) = path
        .strip_prefix(API_PREFIX)
        .and_then(|name| ENDPOINTS.iter().find(|(n, _)| *n == name))
    else {
        return Reply::error(404, format!("No endpoint {path}"));
    };
    if method != *allowed {
        return wrong_method(method, path, allowed);
    }
    let mut reply = endpoint(vmm, name, path, body);
    if reply.status == 405 {
        // A 405 names the methods the resource takes (RFC 9110), also when it is the VM's
        // state, not the method, that is wrong.
        reply.allow = Some(allowed);
    }
    reply
}

fn endpoint(vmm: &Arc<Vmm>, name: &str, path: &str, body: Option<&[u8]>) -> Reply {
    match name {
        "vmm.ping" => Reply::json(
            200,
            &json!({
                "build_version": env!("CARGO_PKG_VERSION"),
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "features": [],
            }),
        ),
        "vmm.shutdown" => Reply {
            exit_after: true,
            ..Reply::no_content()
        },
        "vm.create" => create(vmm, body),
        "vm.boot" => done(vmm.boot()),
        "vm.info" => match vmm.info() {
            Ok(info) => Reply::json(200, &json!(info)),
            Err(e) => vmm_error(&e),
        },
        "vm.counters" => match vmm.counters() {
            Ok(counters) => Reply::json(200, &counters),
            Err(e) => vmm_error(&e),
        },
        "vm.pause" => done(vmm.pause()),
        "vm.resume" => done(vmm.resume()),
        "vm.shutdown" => done(vmm.shutdown()),
        "vm.reboot" => done(vmm.reboot()),
        "vm.power-button" => done(vmm.power_button().map(drop)),
        "vm.delete" => done(vmm.delete()),
        "vm.snapshot" => match json_body::<SnapshotRequest>(name, body) {
            Ok(req) => done(vmm.snapshot(&req.destination_url)),
            Err(reply) => reply,
        },
        "vm.restore" => match json_body::<RestoreRequest>(name, body) {
            Ok(req) => done(vmm.restore(&req.source_url, req.prefault, vmm.serial_override())),
            Err(reply) => reply,
        },
        "vm.send-migration" => match json_body::<SendMigrationRequest>(name, body) {
            Ok(req) => send_migration(vmm, &req),
            Err(reply) => reply,
        },
        "vm.receive-migration" => match json_body::<ReceiveMigrationRequest>(name, body) {
            Ok(req) => done(vmm.receive_migration(&req.receiver_url, vmm.serial_override())),
            Err(reply) => reply,
        },
        _ => Reply::error(404, format!("No endpoint {path}")),
    }
}

fn wrong_method(method: &str, path: &str, allowed: &'static str) -> Reply {
    Reply {
        allow: Some(allowed),
        ..Reply::error(
            405,
            format!("{method} is not allowed on {path}: use {allowed}"),
        )
    }
}

/// `vm.snapshot`'s body (Cloud Hypervisor's `VmSnapshotConfig`).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    destination_url: String,
}

/// `vm.restore`'s body (Cloud Hypervisor's `RestoreConfig`; `memory_restore_mode` `OnDemand`
/// is what rvmm always does, `Copy` is taken as the same).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    source_url: String,
    #[serde(default)]
    prefault: bool,
    #[serde(default, rename = "memory_restore_mode")]
    _memory_restore_mode: Option<String>,
}

/// `vm.send-migration`'s body (Cloud Hypervisor's `SendMigrationData`, the fields rvmm
/// honours).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMigrationRequest {
    destination_url: String,
    #[serde(default)]
    local: bool,
    downtime_ms: Option<u64>,
    timeout_s: Option<u64>,
}

/// `vm.receive-migration`'s body (Cloud Hypervisor's `ReceiveMigrationData`).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveMigrationRequest {
    receiver_url: String,
}

/// Migrates the VM away; once the receiver runs it this VMM exits 0 (after the answer).
fn send_migration(vmm: &Arc<Vmm>, req: &SendMigrationRequest) -> Reply {
    if req.local {
        return Reply::error(
            400,
            "vm.send-migration: local: memory-fd migration is not supported; leave it false",
        );
    }
    let mut options = crate::vmm::migration::SendOptions::default();
    if let Some(ms) = req.downtime_ms.filter(|ms| *ms > 0) {
        options.downtime = std::time::Duration::from_millis(ms);
    }
    if let Some(s) = req.timeout_s.filter(|s| *s > 0) {
        options.timeout = std::time::Duration::from_secs(s);
    }
    match vmm.send_migration(&req.destination_url, &options) {
        Ok(_) => Reply {
            exit_after: true,
            ..Reply::no_content()
        },
        Err(e) => vmm_error(&e),
    }
}

/// Parses a request's JSON body, naming the endpoint and the field in a 400.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    name: &str,
    body: Option<&[u8]>,
) -> Result<T, Reply> {
    let Some(body) = body.filter(|b| !b.is_empty()) else {
        return Err(Reply::error(400, format!("{name} needs a JSON body")));
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de)
        .map_err(|e| Reply::error(400, format!("{name}: {}: {}", e.path(), e.inner())))
}

fn create(vmm: &Vmm, body: Option<&[u8]>) -> Reply {
    let Some(body) = body.filter(|b| !b.is_empty()) else {
        return Reply::error(400, "vm.create needs the VM configuration as a JSON body");
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return Reply::error(400, "The body is not UTF-8 JSON");
    };
    match VmConfigFile::from_json(text) {
        Ok(file) => done(vmm.create(file)),
        Err(e) => Reply::error(400, error_chain(&e)),
    }
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
