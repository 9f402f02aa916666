//! `launcher/openapi.yaml` against the control API itself: the router and the spec list the
//! same operations, every request body the server parses has the spec's fields, and the real
//! server's answers (rvmm over its unix socket) are ones the spec lists, bodies validated
//! against its schemas with a JSON Schema 2020-12 validator.

mod common;
#[path = "openapi/spec.rs"]
mod spec;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::http::{Answer, call, parse, wait_for_socket};
use common::process::{Rvmm, TestDir, wait_for_text};
use common::{kvm_available, tiny_guest};
use rvmm_launcher::api::routes::routes;
use serde_json::{Value, json};
use spec::{Spec, Step, nest};

/// rvmm with only its API socket (`name` in `dir`), once it listens.
fn start_api_only(dir: &TestDir, name: &str) -> (Rvmm, PathBuf) {
    let socket = dir.path(name);
    let vmm = Rvmm::start(&["run", "--api-socket", socket.to_str().unwrap()]);
    wait_for_socket(&socket, Duration::from_secs(10));
    (vmm, socket)
}

/// A client of the API that holds every exchange to the spec.
struct Client<'a> {
    spec: &'a Spec,
    socket: &'a Path,
}

impl Client<'_> {
    /// Sends `body` (which the spec must allow) and checks the answer against the spec.
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Answer {
        if let Some(body) = body {
            self.spec.check_request(method, path, body);
        }
        self.exchange(method, path, body.map(Value::to_string).as_deref())
    }

    /// Sends a body the spec refuses too, expecting the server's 400.
    fn send_refused(&self, method: &str, path: &str, body: &Value) -> String {
        let complaints = self.spec.request_errors(method, path, body);
        assert!(
            !complaints.is_empty(),
            "the spec allows {body} on {method} {path}, which the server refuses"
        );
        let answer = self.exchange(method, path, Some(&body.to_string()));
        assert_eq!(
            answer.status, 400,
            "{method} {path} {body}: {}",
            answer.body
        );
        error_text(&answer)
    }

    /// Sends raw body text and checks the answer against the spec.
    fn exchange(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        let answer = call(self.socket, method, path, body);
        self.spec.check_answer(method, path, &answer);
        answer
    }

    fn put(&self, endpoint: &str) -> u16 {
        self.send("PUT", &api(endpoint), None).status
    }

    fn put_json(&self, endpoint: &str, body: &Value) -> u16 {
        self.send("PUT", &api(endpoint), Some(body)).status
    }

    fn info(&self) -> Value {
        let answer = self.send("GET", &api("vm.info"), None);
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.json()
    }
}

fn api(endpoint: &str) -> String {
    format!("/api/v1/{endpoint}")
}

fn error_text(answer: &Answer) -> String {
    answer.json()["error"].as_str().unwrap().to_string()
}

/// The field names after "expected" in serde's unknown-field message.
fn expected_fields(message: &str) -> BTreeSet<String> {
    let (_, expected) = message
        .split_once("expected")
        .unwrap_or_else(|| panic!("no expected fields in {message:?}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_spec_lists_exactly_the_paths_and_methods_the_router_serves() {
    let served: BTreeSet<(String, String)> = routes()
        .map(|(path, method)| (path, method.to_string()))
        .collect();
    let listed = Spec::load().operations();
    let unlisted: Vec<_> = served.difference(&listed).collect();
    let unserved: Vec<_> = listed.difference(&served).collect();
    assert!(
        unlisted.is_empty() && unserved.is_empty(),
        "served but not in the spec: {unlisted:?}; in the spec but not served: {unserved:?}"
    );
}

#[test]
fn every_schema_and_reference_in_the_spec_resolves() {
    let spec = Spec::load();
    for name in spec.schema_names() {
        spec.component(&name);
    }
    for (path, method) in spec.operations() {
        let operation = spec.operation(&method, &path);
        assert!(operation["operationId"].is_string(), "{method} {path}");
        if let Some(schema) = spec.request_schema(&method, &path) {
            spec.validator(schema);
        }
        let responses = operation["responses"].as_object().expect("responses");
        assert!(!responses.is_empty(), "{method} {path} lists no responses");
        for (status, response) in responses {
            assert!(
                status.len() == 3 && status.parse::<u16>().is_ok(),
                "{method} {path}: status {status}"
            );
            let response = spec.resolve(response);
            assert!(
                response["description"].is_string(),
                "{method} {path} {status}"
            );
            for media in response
                .get("content")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                spec.validator(&media.1["schema"]);
            }
        }
    }
}

/// Every object in every request body the spec describes, probed on the real server with an
/// unknown field: the server's refusal names the fields it parses there, which must be the
/// spec's.
#[test]
fn request_schemas_name_exactly_the_fields_the_server_parses() {
    let spec = Spec::load();
    let dir = TestDir::new("openapi-probe");
    let (_vmm, socket) = start_api_only(&dir, "api.sock");
    let client = Client {
        spec: &spec,
        socket: &socket,
    };
    let mut probed = 0;
    for (path, method) in spec.operations() {
        let Some(schema) = spec.request_schema(&method, &path) else {
            continue;
        };
        for (at, object) in spec.object_schemas(schema) {
            let body = nest(&at, json!({"__probe": true}));
            let error = client.send_refused(&method, &path, &body);
            assert!(error.contains("unknown field `__probe`"), "{body}: {error}");
            let listed: BTreeSet<String> = object["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            let place: Vec<String> = at
                .iter()
                .map(|step| match step {
                    Step::Field(name) => name.clone(),
                    Step::Item => "[]".into(),
                })
                .collect();
            assert_eq!(
                expected_fields(&error),
                listed,
                "{method} {path} at {place:?}: the server's fields, then the spec's"
            );
            probed += 1;
        }
    }
    // VmConfig's 12 objects (DHCP's among them) and the four other bodies.
    assert!(probed >= 16, "only {probed} objects probed");
}

/// The spec's bodiless PUTs on a VM (`vm.boot`, `vm.pause`, ...).
fn vm_actions(spec: &Spec) -> Vec<String> {
    spec.operations()
        .into_iter()
        .filter(|(path, method)| {
            path.starts_with("/api/v1/vm.")
                && method == "PUT"
                && spec.request_schema(method, path).is_none()
        })
        .map(|(path, _)| path)
        .collect()
}

/// A file the validation takes for a kernel (boots are not attempted here).
fn fake_kernel(dir: &TestDir) -> PathBuf {
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    kernel
}

/// A configuration with every field the spec's `VmConfig` has, each set to something other
/// than its default so that `vm.info` gives all of it back.
fn every_field_config(dir: &TestDir) -> Value {
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 64 << 20},
        "payload": {
            "kernel": fake_kernel(dir),
            "initramfs": disk,
            "cmdline": "console=ttyS0",
        },
        "disks": [{
            "path": disk,
            "readonly": true,
            "id": "data",
            "engine": "io_uring",
            "format": "raw",
        }],
        "net": [{
            "tap": "rvmm-openapi0",
            "mac": "52:54:00:12:34:56",
            "mtu": 1400,
            "id": "nic0",
            "dhcp": {
                "address": "10.0.2.2/24",
                "ipv6": {"address": "fd10:0:2::2/120", "dns": ["fd10:0:2::3"]},
                "gateway": "10.0.2.1",
                "dns": ["10.0.2.3"],
                "search": ["example.com"],
                "domain_name": "example.com",
                "hostname": "guest",
                "mtu": 1400,
                "routes": [{"destination": "0.0.0.0/0", "gateway": "10.0.2.1"}],
                "ntp_servers": ["10.0.2.4"],
                "tftp_server_name": "tftp.example.com",
                "boot_file_name": "pxelinux.0",
                "private_options": [{"option": 240, "value": "rvmm"}],
                "interface": "rvmm-openapi0",
                "server": "10.0.2.1",
            },
        }],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "File", "file": dir.path("serial.log")},
        "transport": "pci",
        "acpi": true,
    })
}

/// A declared body over the limit, without the body: 413 at once.
fn oversized_create(socket: &Path) -> Answer {
    let mut stream = UnixStream::connect(socket).unwrap();
    let head = "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: \
                application/json\r\nContent-Length: 1000000\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse(&raw)
}

#[test]
fn answers_of_a_vmm_without_a_booted_vm_match_the_spec() {
    let spec = Spec::load();
    let dir = TestDir::new("openapi-answers");
    let (mut vmm, socket) = start_api_only(&dir, "api.sock");
    let client = Client {
        spec: &spec,
        socket: &socket,
    };
    let ping = client.send("GET", &api("vmm.ping"), None);
    assert_eq!(ping.status, 200);
    assert_eq!(ping.json()["pid"], vmm.0.id());
    assert_eq!(client.send("GET", "/metrics", None).status, 200);

    // No VM: 404 for everything VM-level, also with valid bodies.
    assert_eq!(client.send("GET", &api("vm.info"), None).status, 404);
    assert_eq!(client.send("GET", &api("vm.counters"), None).status, 404);
    let actions = vm_actions(&spec);
    assert_eq!(actions.len(), 7, "{actions:?}");
    for path in &actions {
        assert_eq!(client.send("PUT", path, None).status, 404, "{path}");
    }
    let snapshot = json!({"destination_url": format!("file://{}", dir.path("snap").display())});
    let send = json!({"destination_url": "unix:/nonexistent/rvmm.sock", "local": false});
    assert_eq!(client.put_json("vm.snapshot", &snapshot), 404);
    assert_eq!(client.put_json("vm.send-migration", &send), 404);

    // Refused bodies: what the spec refuses, the server refuses with a 400 naming the field.
    let create = api("vm.create");
    assert_eq!(client.exchange("PUT", &create, None).status, 400);
    assert_eq!(
        client.exchange("PUT", &create, Some("{\"cpus\": ")).status,
        400
    );
    let oversized = oversized_create(&socket);
    assert_eq!(oversized.status, 413);
    spec.check_answer("PUT", &create, &oversized);
    let kernel = fake_kernel(&dir);
    for (body, field) in [
        (
            json!({"payload": {"kernel": kernel}, "cpus": {"boot_vcpus": 0}}),
            "cpus.boot_vcpus",
        ),
        (
            json!({"payload": {"kernel": kernel}, "cpus": {"boot_vcpus": 1, "turbo": 1}}),
            "cpus",
        ),
        (
            json!({"payload": {"kernel": kernel}, "disks": [{"path": kernel, "engine": "aio"}]}),
            "disks[0].engine",
        ),
        (
            json!({"payload": {"kernel": kernel}, "net": [{"tap": "t0", "mac": "52:54"}]}),
            "net[0].mac",
        ),
        (
            json!({"payload": {"kernel": kernel}, "net": [{"tap": "t0", "mtu": 60}]}),
            "net[0].mtu",
        ),
        (
            json!({"payload": {"kernel": kernel}, "serial": {"mode": "Pipe"}}),
            "serial.mode",
        ),
        (
            json!({"payload": {"kernel": kernel}, "transport": "isa"}),
            "transport",
        ),
        (
            json!({"payload": {"kernel": kernel}, "rng": {"src": "/dev/zero"}}),
            "rng.src",
        ),
    ] {
        let error = client.send_refused("PUT", &create, &body);
        assert!(error.contains(field), "{body}: {error}");
    }
    let bad_url = json!({"receiver_url": "file:///x"});
    let error = client.send_refused("PUT", &api("vm.receive-migration"), &bad_url);
    assert!(error.contains("receiver_url"), "{error}");
    let local = json!({"destination_url": "unix:/x", "local": true});
    let error = client.send_refused("PUT", &api("vm.send-migration"), &local);
    assert!(error.contains("local"), "{error}");
    let restore_url = json!({"source_url": "http://snapshots/x"});
    let error = client.send_refused("PUT", &api("vm.restore"), &restore_url);
    assert!(error.contains("source_url"), "{error}");
    // What only the server can tell: the kernel file is not there.
    let missing = json!({"payload": {"kernel": "/nonexistent/vmlinux"}});
    let answer = client.send("PUT", &create, Some(&missing));
    assert_eq!(answer.status, 400);
    assert!(
        error_text(&answer).contains("payload.kernel"),
        "{}",
        answer.body
    );
    let restore = json!({"source_url": format!("file://{}", dir.path("none").display())});
    assert_eq!(client.put_json("vm.restore", &restore), 400);

    // A VM with every field: created, and vm.info gives every field back.
    let config = every_field_config(&dir);
    assert_eq!(client.send("PUT", &create, Some(&config)).status, 204);
    assert_eq!(client.send("PUT", &create, Some(&config)).status, 405);
    let info = client.info();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"], config);
    assert_eq!(info["memory_actual_size"], 64 << 20);

    // Created, not booted: 405 where a running VM is needed.
    assert_eq!(client.send("GET", &api("vm.counters"), None).status, 405);
    // Each needs a running (or paused) VM; `vm.boot` and `vm.delete` take a created one.
    for path in actions
        .iter()
        .filter(|p| !p.ends_with("vm.boot") && !p.ends_with("vm.delete"))
    {
        assert_eq!(client.send("PUT", path, None).status, 405, "{path}");
    }
    let receive = json!({"receiver_url": format!("unix:{}", dir.path("m.sock").display())});
    let restore =
        json!({"source_url": format!("file://{}", dir.path("snap").display()), "prefault": true});
    assert_eq!(client.put_json("vm.snapshot", &snapshot), 405);
    assert_eq!(client.put_json("vm.send-migration", &send), 405);
    assert_eq!(client.put_json("vm.receive-migration", &receive), 405);
    assert_eq!(client.put_json("vm.restore", &restore), 405);

    // Requests no operation describes: the spec's Error, with Allow on a 405.
    let wrong_method = call(&socket, "GET", &api("vm.boot"), None);
    assert_eq!(
        (wrong_method.status, wrong_method.header("allow")),
        (405, Some("PUT"))
    );
    spec.check_error_answer(&wrong_method);
    let unknown = call(&socket, "GET", &api("vm.resize"), None);
    assert_eq!(unknown.status, 404);
    spec.check_error_answer(&unknown);

    assert_eq!(client.put("vm.delete"), 204);
    assert_eq!(client.send("GET", &api("vm.info"), None).status, 404);
    assert_eq!(client.put("vmm.shutdown"), 204);
    assert_eq!(vmm.wait(Duration::from_secs(30)), Some(0));
}

#[test]
fn kvm_answers_about_a_running_paused_snapshotted_and_restored_vm_match_the_spec() {
    if !kvm_available("OpenAPI answers of a booted VM") {
        return;
    }
    let spec = Spec::load();
    let dir = TestDir::new("openapi-kvm");
    let (mut vmm, socket) = start_api_only(&dir, "api.sock");
    let client = Client {
        spec: &spec,
        socket: &socket,
    };
    // A kernel that is none: the boot is refused as the configuration's fault.
    let not_a_kernel = json!({"payload": {"kernel": fake_kernel(&dir)}, "serial": {"mode": "Off"}});
    assert_eq!(client.put_json("vm.create", &not_a_kernel), 204);
    let refused = client.send("PUT", &api("vm.boot"), None);
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(client.info()["state"], "Created");
    assert_eq!(client.put("vm.delete"), 204);

    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let serial = dir.path("serial.log");
    let config = json!({
        "memory": {"size": 64 << 20},
        // The tiny guest has no ACPI: it finds the disk on the command line.
        "acpi": false,
        "payload": {"kernel": tiny_guest("virtio-blk"), "cmdline": "rvmm.hold=1"},
        "disks": [{"path": disk, "id": "data"}],
        "serial": {"mode": "File", "file": serial},
    });
    assert_eq!(client.put_json("vm.create", &config), 204);
    assert_eq!(client.put("vm.boot"), 204);
    assert_eq!(client.put("vm.boot"), 405);
    wait_for_text(&serial, "virtio-blk: holding\n", 1);
    assert_eq!(client.info()["state"], "Running");
    let counters = client.send("GET", &api("vm.counters"), None);
    assert_eq!(counters.status, 200, "{}", counters.body);
    let counters = counters.json();
    assert!(
        counters["data"]["read_ops"].as_u64().unwrap() > 0,
        "{counters}"
    );
    assert!(counters["vcpu_exits"].is_object(), "{counters}");

    assert_eq!(client.put("vm.pause"), 204);
    assert_eq!(client.info()["state"], "Paused");
    let snap = dir.path("snap");
    let snapshot = json!({"destination_url": format!("file://{}", snap.display())});
    assert_eq!(client.put_json("vm.snapshot", &snapshot), 204);
    assert_eq!(client.send("GET", &api("vm.counters"), None).status, 200);
    assert_eq!(client.put("vm.resume"), 204);
    assert_eq!(client.put("vm.power-button"), 204);
    assert_eq!(client.put("vm.reboot"), 204);
    assert_eq!(client.put("vm.shutdown"), 204);
    assert_eq!(client.info()["state"], "Shutdown");
    assert_eq!(client.put("vm.delete"), 204);

    let restore = json!({"source_url": format!("file://{}", snap.display()), "prefault": false});
    assert_eq!(client.put_json("vm.restore", &restore), 204);
    let info = client.info();
    assert_eq!(info["state"], "Paused");
    assert_eq!(info["config"]["disks"][0]["id"], "data");
    assert_eq!(client.put("vm.resume"), 204);
    assert_eq!(client.info()["state"], "Running");
    assert_eq!(client.put("vmm.shutdown"), 204);
    assert_eq!(vmm.wait(Duration::from_secs(30)), Some(0));
}

/// `vm.info` of a VM given by command-line flags: the configuration rvmm writes for it is the
/// spec's `VmConfig` too.
#[test]
fn kvm_info_of_a_vm_given_by_flags_matches_the_spec() {
    if !kvm_available("OpenAPI vm.info of a VM from flags") {
        return;
    }
    let spec = Spec::load();
    let dir = TestDir::new("openapi-flags");
    let socket = dir.path("api.sock");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let serial = dir.path("serial.log");
    let kernel = tiny_guest("virtio-blk");
    let mut vmm = Rvmm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--acpi=false",
        "--cmdline",
        "rvmm.hold=1",
        "--disk",
        &format!("path={},id=data,readonly=on", disk.display()),
        "--rng",
        "--serial",
        &format!("file={}", serial.display()),
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    // The API listens before the VM is created: ask once the guest runs.
    wait_for_text(&serial, "virtio-blk: holding\n", 1);
    let client = Client {
        spec: &spec,
        socket: &socket,
    };
    let info = client.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["disks"][0]["engine"], "sync");
    assert_eq!(info["config"]["serial"]["mode"], "File");
    assert_eq!(client.put("vmm.shutdown"), 204);
    assert_eq!(vmm.wait(Duration::from_secs(30)), Some(0));
}

/// Both ends of a live migration: `vm.receive-migration` answers once the VM runs there,
/// `vm.send-migration` once the receiver runs it, and the source exits 0.
#[test]
fn kvm_answers_of_both_ends_of_a_live_migration_match_the_spec() {
    if !kvm_available("OpenAPI answers of a live migration") {
        return;
    }
    let spec = Spec::load();
    let dir = TestDir::new("openapi-migration");
    let (mut source, source_socket) = start_api_only(&dir, "api.sock");
    let (mut destination, destination_socket) = start_api_only(&dir, "dst.sock");
    let source_client = Client {
        spec: &spec,
        socket: &source_socket,
    };
    let serial = dir.path("serial.log");
    let config = json!({
        "memory": {"size": 64 << 20},
        "payload": {"kernel": tiny_guest("ticker")},
        "serial": {"mode": "File", "file": serial},
    });
    assert_eq!(source_client.put_json("vm.create", &config), 204);
    assert_eq!(source_client.put("vm.boot"), 204);
    wait_for_text(&serial, "tick: 1\n", 1);

    let url = format!("unix:{}", dir.path("migration.sock").display());
    let receive = {
        let (socket, body) = (destination_socket.clone(), json!({ "receiver_url": url }));
        std::thread::spawn(move || {
            let spec = Spec::load();
            let client = Client {
                spec: &spec,
                socket: &socket,
            };
            client.put_json("vm.receive-migration", &body)
        })
    };
    let send =
        json!({"destination_url": url, "local": false, "downtime_ms": 300, "timeout_s": 600});
    assert_eq!(source_client.put_json("vm.send-migration", &send), 204);
    assert_eq!(receive.join().unwrap(), 204);
    assert_eq!(source.wait(Duration::from_secs(60)), Some(0));

    let destination_client = Client {
        spec: &spec,
        socket: &destination_socket,
    };
    let info = destination_client.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["size"], 64 << 20);
    assert_eq!(destination_client.put("vmm.shutdown"), 204);
    assert_eq!(destination.wait(Duration::from_secs(30)), Some(0));
}
