//! Routing without a socket or KVM: status codes for every endpoint the VM's state allows or
//! refuses, bodies, methods.

use super::*;

fn vmm() -> Arc<Vmm> {
    Vmm::without_kvm()
}

fn put(vmm: &Arc<Vmm>, endpoint: &str) -> u16 {
    handle(vmm, "PUT", &format!("{API_PREFIX}{endpoint}"), None).status
}

/// The PUT endpoints that act on the VM: all but `vm.create`, which makes it.
fn vm_actions() -> impl Iterator<Item = &'static str> {
    ENDPOINTS
        .iter()
        .filter(|(name, method)| name.starts_with("vm.") && *method == "PUT")
        .map(|(name, _)| *name)
        // These take a body; see their own tests.
        .filter(|name| {
            !matches!(
                *name,
                "vm.create"
                    | "vm.snapshot"
                    | "vm.restore"
                    | "vm.send-migration"
                    | "vm.receive-migration"
            )
        })
}

fn create(vmm: &Arc<Vmm>, body: &str) -> Reply {
    handle(vmm, "PUT", "/api/v1/vm.create", Some(body.as_bytes()))
}

/// A configuration whose kernel exists (any regular file passes validation) but is no kernel.
fn config() -> String {
    let kernel = std::env::temp_dir().join(format!("rvmm-routes-{}.bin", std::process::id()));
    std::fs::write(&kernel, b"not a kernel").unwrap();
    json!({
        "payload": {"kernel": kernel},
        "memory": {"size": 64 << 20},
        "serial": {"mode": "Off"},
    })
    .to_string()
}

fn error_text(reply: &Reply) -> String {
    let (body, kind) = reply.body.clone().expect("error body");
    assert_eq!(kind, BodyKind::Json);
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    value["error"].as_str().unwrap().to_string()
}

#[test]
fn ping_answers_version_and_pid() {
    let reply = handle(&vmm(), "GET", "/api/v1/vmm.ping", None);
    assert_eq!(reply.status, 200);
    let (body, _) = reply.body.unwrap();
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(value["pid"], std::process::id());
    assert_eq!(value["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn every_vm_endpoint_is_404_before_create() {
    let vmm = vmm();
    for endpoint in vm_actions() {
        assert_eq!(put(&vmm, endpoint), 404, "{endpoint}");
    }
    assert_eq!(handle(&vmm, "GET", "/api/v1/vm.info", None).status, 404);
    assert_eq!(handle(&vmm, "GET", "/api/v1/vm.counters", None).status, 404);
}

#[test]
fn create_keeps_the_config_and_a_second_create_is_405() {
    let vmm = vmm();
    assert_eq!(create(&vmm, &config()).status, 204);
    let info = handle(&vmm, "GET", "/api/v1/vm.info", None);
    assert_eq!(info.status, 200);
    let (body, _) = info.body.unwrap();
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(value["state"], "Created");
    assert_eq!(value["config"]["memory"]["size"], 64 << 20);
    assert_eq!(value["memory_actual_size"], 64 << 20);
    assert_eq!(create(&vmm, &config()).status, 405);
}

#[test]
fn actions_that_need_a_running_vm_are_405_when_created() {
    let vmm = vmm();
    create(&vmm, &config());
    // Booting and deleting a created VM are allowed.
    for endpoint in vm_actions().filter(|e| !matches!(*e, "vm.boot" | "vm.delete")) {
        let reply = handle(&vmm, "PUT", &format!("{API_PREFIX}{endpoint}"), None);
        assert_eq!(
            (reply.status, reply.allow),
            (405, Some("PUT")),
            "{endpoint}"
        );
    }
    let reply = handle(&vmm, "GET", "/api/v1/vm.counters", None);
    assert_eq!((reply.status, reply.allow), (405, Some("GET")));
}

#[test]
fn boot_of_a_file_that_is_no_kernel_is_400_and_the_vm_stays_created() {
    let vmm = vmm();
    create(&vmm, &config());
    let reply = handle(&vmm, "PUT", "/api/v1/vm.boot", None);
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert!(error_text(&reply).starts_with("Cannot boot the VM: "));
    assert_eq!(vmm.state(), Some(crate::vmm::VmState::Created));
}

#[test]
fn delete_forgets_the_vm() {
    let vmm = vmm();
    create(&vmm, &config());
    assert_eq!(put(&vmm, "vm.delete"), 204);
    assert_eq!(handle(&vmm, "GET", "/api/v1/vm.info", None).status, 404);
    assert_eq!(create(&vmm, &config()).status, 204);
}

#[test]
fn create_without_a_body_or_with_bad_json_is_400_naming_the_field() {
    let vmm = vmm();
    let empty = handle(&vmm, "PUT", "/api/v1/vm.create", None);
    assert_eq!(empty.status, 400);
    assert!(error_text(&empty).contains("JSON body"));
    assert_eq!(create(&vmm, "{").status, 400);
    let unknown = create(&vmm, r#"{"payload": {"kernel": "/k"}, "gpu": true}"#);
    assert_eq!(unknown.status, 400);
    assert!(
        error_text(&unknown).contains("gpu"),
        "{}",
        error_text(&unknown)
    );
    let shape = create(
        &vmm,
        r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": "two"}}"#,
    );
    assert!(
        error_text(&shape).starts_with("cpus.boot_vcpus: "),
        "{}",
        error_text(&shape)
    );
    let missing = create(&vmm, r#"{"payload": {"kernel": "/nonexistent/k"}}"#);
    assert_eq!(missing.status, 400);
    assert!(error_text(&missing).contains("payload.kernel: /nonexistent/k"));
    let binary = handle(&vmm, "PUT", "/api/v1/vm.create", Some(&[0xff, 0xfe]));
    assert_eq!(binary.status, 400);
    assert_eq!(vmm.state(), None);
}

#[test]
fn wrong_method_is_405_with_allow_and_unknown_paths_are_404() {
    let vmm = vmm();
    let reply = handle(&vmm, "GET", "/api/v1/vm.boot", None);
    assert_eq!(reply.status, 405);
    assert_eq!(reply.allow, Some("PUT"));
    let reply = handle(&vmm, "POST", "/api/v1/vm.info", None);
    assert_eq!((reply.status, reply.allow), (405, Some("GET")));
    assert_eq!(handle(&vmm, "PUT", "/metrics", None).status, 405);
    assert_eq!(handle(&vmm, "GET", "/api/v1/", None).status, 404);
    assert_eq!(handle(&vmm, "GET", "/api/v2/vmm.ping", None).status, 404);
    assert_eq!(
        handle(&vmm, "GET", "/api/v1/vm.info/../vmm.ping", None).status,
        404
    );
}

#[test]
fn vmm_shutdown_answers_204_and_asks_to_exit_after() {
    let reply = handle(&vmm(), "PUT", "/api/v1/vmm.shutdown", None);
    assert_eq!(reply.status, 204);
    assert!(reply.exit_after);
}

#[test]
fn metrics_without_a_vm_still_report_state_and_uptime() {
    let reply = handle(&vmm(), "GET", "/metrics?x=1", None);
    assert_eq!(reply.status, 200);
    let (body, kind) = reply.body.unwrap();
    assert_eq!(kind, BodyKind::Text);
    assert!(body.contains("rvmm_uptime_seconds"), "{body}");
}

fn put_json(vmm: &Arc<Vmm>, endpoint: &str, body: &str) -> Reply {
    handle(
        vmm,
        "PUT",
        &format!("{API_PREFIX}{endpoint}"),
        Some(body.as_bytes()),
    )
}

#[test]
fn snapshot_needs_a_file_url_and_a_paused_vm() {
    let vmm = vmm();
    let snap = r#"{"destination_url": "file:///tmp/rvmm-never-written"}"#;
    assert_eq!(handle(&vmm, "PUT", "/api/v1/vm.snapshot", None).status, 400);
    assert_eq!(put_json(&vmm, "vm.snapshot", snap).status, 404);
    create(&vmm, &config());
    let reply = put_json(&vmm, "vm.snapshot", snap);
    assert_eq!((reply.status, reply.allow), (405, Some("PUT")));
    assert!(error_text(&reply).contains("state Created"), "{reply:?}");
    let reply = put_json(&vmm, "vm.snapshot", r#"{"destination_url": "http://x/y"}"#);
    assert_eq!(reply.status, 400);
    assert!(error_text(&reply).contains("destination_url"), "{reply:?}");
    let reply = put_json(&vmm, "vm.snapshot", r#"{"destination": "file:///x"}"#);
    assert_eq!(reply.status, 400);
    assert!(error_text(&reply).contains("vm.snapshot"), "{reply:?}");
    assert!(!std::path::Path::new("/tmp/rvmm-never-written").exists());
}

#[test]
fn restore_names_the_missing_snapshot_and_refuses_when_a_vm_exists() {
    let vmm = vmm();
    let dir = std::env::temp_dir().join(format!("rvmm-no-snapshot-{}", std::process::id()));
    let body = format!(r#"{{"source_url": "file://{}"}}"#, dir.display());
    let reply = put_json(&vmm, "vm.restore", &body);
    assert_eq!(reply.status, 400, "{reply:?}");
    let text = error_text(&reply);
    assert!(
        text.contains(&format!("{}/config.json", dir.display())),
        "{text}"
    );
    assert_eq!(vmm.state(), None, "a failed restore leaves no VM");
    let reply = put_json(&vmm, "vm.restore", r#"{"source_url": "tcp:1.2.3.4:5"}"#);
    assert_eq!(reply.status, 400);
    create(&vmm, &config());
    assert_eq!(put_json(&vmm, "vm.restore", &body).status, 405);
}

#[test]
fn migration_requests_need_a_supported_url_and_the_right_vm_state() {
    let vmm = vmm();
    let send = r#"{"destination_url": "unix:/tmp/rvmm-no-such-receiver.sock"}"#;
    assert_eq!(put_json(&vmm, "vm.send-migration", send).status, 404);
    let reply = put_json(&vmm, "vm.send-migration", r#"{"destination_url": "udp:x"}"#);
    assert_eq!(reply.status, 400);
    assert!(error_text(&reply).contains("destination_url"), "{reply:?}");
    let local = r#"{"destination_url": "unix:/x", "local": true}"#;
    assert!(error_text(&put_json(&vmm, "vm.send-migration", local)).contains("local"));
    let reply = put_json(
        &vmm,
        "vm.receive-migration",
        r#"{"receiver_url": "file:///x"}"#,
    );
    assert_eq!(reply.status, 400);
    assert!(error_text(&reply).contains("receiver_url"), "{reply:?}");
    create(&vmm, &config());
    // Only a running VM migrates; only a VMM without a VM receives.
    assert_eq!(put_json(&vmm, "vm.send-migration", send).status, 405);
    let receive = r#"{"receiver_url": "unix:/tmp/rvmm-never-bound.sock"}"#;
    assert_eq!(put_json(&vmm, "vm.receive-migration", receive).status, 405);
    assert!(!std::path::Path::new("/tmp/rvmm-never-bound.sock").exists());
}
