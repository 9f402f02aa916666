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
        VmmError::Config(_) | VmmError::Console(_) => 400,
        VmmError::Boot(_) if err.is_bad_config() => 400,
        VmmError::Boot(_) | VmmError::Waiter(_) => 500,
    };
    Reply::error(status, error_chain(err))
}

fn done(result: Result<(), VmmError>) -> Reply {
    match result {
        Ok(()) => Reply::no_content(),
        Err(e) => vmm_error(&e),
    }
}

/// The endpoints under [`API_PREFIX`] and the method each takes.
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
];

/// Answers one request.
pub fn handle(vmm: &Arc<Vmm>, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    // A query string changes nothing here.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path == METRICS_PATH {
        if method != "GET" {
            return wrong_method(method, path, "GET");
        }
        return Reply {
            body: Some((
                crate::metrics::render(
                    vmm.state().map_or("NotCreated", VmState::name),
                    vmm.uptime(),
                    vmm.metrics().as_ref(),
                ),
                BodyKind::Text,
            )),
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
        "vm.power-button" => done(vmm.power_button()),
        "vm.delete" => done(vmm.delete()),
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
