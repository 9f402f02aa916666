//! The control API. The first byte picks the mode: even (`R`) for raw HTTP bytes into the
//! real server code, odd (`S`) for a structured sequence of API calls that walks the VM's
//! state machine. Every input gets fresh VMMs (`/nonexistent/kvm`): no state leaks between
//! inputs.
//!
//! Raw mode: the bytes are written to the client end of a `tokio::io::duplex`, whose write
//! side is then shut down, while `rvmm_launcher::api::serve_stream` (hyper, on the target's
//! current-thread tokio runtime) serves the other end; everything it answers is read.
//! Oracles: the server is done within 2 s (the client's EOF ends even a truncated request:
//! no waiting for the 10 s header timeout); the answer is a sequence of complete
//! `HTTP/1.1 NNN` responses (`HTTP/1.0` to HTTP/1.0 requests), with statuses the server or
//! hyper give (no 5xx: only a failed boot answers 500, and raw inputs never boot, see below),
//! JSON bodies that parse and a non-empty `error` in every JSON error.
//!
//! Structured mode: calls (mostly the right method on a real endpoint; rarely a wrong method,
//! an unknown path, a query string, a missing, raw or misplaced body) go to
//! `api::routes::handle` on one VMM and are checked against a model of the VM's state (404
//! before `vm.create`, 405 with `Allow` for a wrong method, 405 for what a created VM cannot
//! do, `vm.info` giving back the created VM's file form, `vm.boot` failing with 400 for a bad payload or
//! 500 naming `/nonexistent/kvm`, the VM staying created); then the same calls, pipelined
//! through the HTTP server to a fresh VMM, must get the same statuses (413 for a body over the
//! server's limit, after which the server may close the connection). Configurations come from
//! a model over fixture files (a minimal ELF kernel, a file that is no kernel, a disk image, a
//! directory) in a temp directory removed at exit.
//!
//! Host safety: booting a created VM opens its console file or socket, its disks and its
//! taps, and loads its kernel. Structured mode only creates VMs whose files are fixtures,
//! with no tap and no file or socket console (calls creating anything else are skipped;
//! `config_json` covers their validation). Raw inputs naming both `vm.create` and `vm.boot`
//! are rejected: a fresh VMM cannot boot without a create, and both must appear verbatim in a
//! request target. Snapshot and migration endpoints read, write, listen on or connect to
//! what their body names: raw inputs naming them are rejected, structured calls to them with
//! a JSON body are skipped (the rest must answer 400).

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Result, Unstructured};
use fuzz_common::{fixture_dir, rarely};
use rvmm_launcher::api::routes::{self, API_PREFIX, BodyKind, METRICS_PATH, Reply};
use rvmm_launcher::api::{MAX_BODY_BYTES, serve_stream};
use rvmm_launcher::config::{SerialModeName, VmConfigFile};
use rvmm_launcher::events::EventMonitor;
use rvmm_launcher::api::routes::ENDPOINTS;
use rvmm_launcher::vmm::{OnReboot, Vmm, VmmSettings};
use libfuzzer_sys::{Corpus, fuzz_target};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use rvmm_core::CpuProfile;

const KVM: &str = "/nonexistent/kvm";
/// How long the server may take to answer everything once the client has sent its EOF.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Methods for the rare wrong one (no HEAD: its answers have no body to compare).
const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"];
/// Statuses the API server answers (`routes`, `to_response`) or hyper sends by itself (parse
/// errors, `100 Continue`), besides 500.
const STATUSES: &[u16] = &[100, 200, 204, 400, 404, 405, 413, 414, 431];

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
});

fn new_vmm() -> Arc<Vmm> {
    Vmm::new(
        VmmSettings {
            kvm_path: KVM.into(),
            cpu_profile: CpuProfile::Host,
            serial_log: None,
            // As `rvmm run`: device threads a boot starts run under their filters.
            seccomp: true,
            on_reboot: OnReboot::Exit,
            exit_when_guest_ends: true,
        },
        EventMonitor::disabled(),
    )
}

// ---- Fixture files ----

static FIXTURES: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = fixture_dir("api");
    std::fs::create_dir(dir.join("dir")).expect("fixture directory");
    std::fs::write(dir.join("vmlinux"), tiny_elf()).expect("fixture kernel");
    std::fs::write(dir.join("garbage"), b"neither a kernel nor an initramfs").expect("fixture");
    std::fs::write(dir.join("disk.img"), vec![0u8; 64 << 10]).expect("fixture disk");
    dir
});

/// An ELF64 vmlinux of one 3-byte PT_LOAD segment (`hlt; jmp .-1`) at 1 MiB: loads, so a boot
/// gets as far as opening KVM.
fn tiny_elf() -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let code = [0xf4, 0xeb, 0xfd];
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 0, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R+X
    let offset = 64 + 56;
    for word in [
        offset,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    elf
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Fixture {
    Vmlinux,
    Garbage,
    DiskImage,
    Dir,
    Missing,
}

impl Fixture {
    fn path(self) -> PathBuf {
        FIXTURES.join(match self {
            Fixture::Vmlinux => "vmlinux",
            Fixture::Garbage => "garbage",
            Fixture::DiskImage => "disk.img",
            Fixture::Dir => "dir",
            Fixture::Missing => "missing",
        })
    }

    /// `usual` unless rarely another.
    fn mostly(u: &mut Unstructured<'_>, usual: Self) -> Result<Self> {
        if rarely(u, 32)? {
            Self::arbitrary(u)
        } else {
            Ok(usual)
        }
    }
}

/// Whether booting `file` touches nothing on the host but fixtures.
fn hermetic(file: &VmConfigFile) -> bool {
    let fixture = |p: &Path| p.starts_with(&*FIXTURES);
    file.payload.kernel.as_deref().is_none_or(fixture)
        && file.payload.initramfs.as_deref().is_none_or(fixture)
        && file.disks.iter().all(|d| fixture(&d.path))
        && file.net.is_empty()
        && file.serial.as_ref().is_none_or(|s| {
            matches!(
                s.mode,
                SerialModeName::Off | SerialModeName::Null | SerialModeName::Tty
            )
        })
}

// ---- Structured calls ----

struct Call {
    method: String,
    /// Starts with `/`; only URI-safe characters.
    target: String,
    /// Empty bodies are sent as none, as the server does.
    body: Option<Vec<u8>>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.target)?;
        if let Some(body) = &self.body {
            let shown = String::from_utf8_lossy(&body[..body.len().min(300)]);
            write!(f, " {shown:?} ({} bytes)", body.len())?;
        }
        Ok(())
    }
}

/// A VM configuration, mostly valid, over the fixtures.
fn config(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut top = Map::new();
    let vcpus = if rarely(u, 16)? {
        u8::arbitrary(u)?
    } else {
        1 + u8::arbitrary(u)? % 4
    };
    let mut cpus = json!({ "boot_vcpus": vcpus });
    if rarely(u, 32)? {
        cpus["max_vcpus"] = json!(u8::arbitrary(u)?);
    }
    top.insert("cpus".into(), cpus);
    let memory = if rarely(u, 16)? {
        u64::arbitrary(u)?
    } else {
        [64 << 20, 16 << 20, 256 << 20, 1 << 30, 5 << 30, 1 << 40]
            [usize::from(u8::arbitrary(u)? % 6)]
    };
    top.insert("memory".into(), json!({ "size": memory }));
    let mut payload = json!({ "kernel": Fixture::mostly(u, Fixture::Vmlinux)?.path() });
    if rarely(u, 32)? {
        payload["initramfs"] = json!(Fixture::arbitrary(u)?.path());
    }
    if rarely(u, 64)? {
        let len = usize::from(u16::arbitrary(u)?);
        payload["cmdline"] = json!("x".repeat(len));
    } else if bool::arbitrary(u)? {
        payload["cmdline"] = json!("console=ttyS0 reboot=k panic=-1");
    }
    top.insert("payload".into(), payload);
    if rarely(u, 32)? {
        let disks: Vec<Value> = (0..1 + u8::arbitrary(u)? % 3)
            .map(|i| -> Result<Value> {
                let mut disk = json!({ "path": Fixture::mostly(u, Fixture::DiskImage)?.path() });
                disk["readonly"] = json!(bool::arbitrary(u)?);
                if bool::arbitrary(u)? {
                    disk["id"] = json!(format!("disk{}", i % 2));
                }
                if bool::arbitrary(u)? {
                    disk["engine"] =
                        json!(["sync", "io_uring", "aio"][usize::from(u8::arbitrary(u)? % 3)]);
                }
                Ok(disk)
            })
            .collect::<Result<_>>()?;
        top.insert("disks".into(), Value::Array(disks));
    }
    if bool::arbitrary(u)? {
        let src = if rarely(u, 32)? {
            "/dev/hwrng"
        } else {
            "/dev/urandom"
        };
        top.insert("rng".into(), json!({ "src": src }));
    }
    // Never File or Socket: see the host safety note.
    let mode = ["Off", "Null", "Tty"][usize::from(u8::arbitrary(u)? % 3)];
    if !rarely(u, 32)? {
        top.insert("serial".into(), json!({ "mode": mode }));
    }
    if rarely(u, 32)? {
        top.insert("balloon".into(), json!({ "size": 1 }));
    }
    Ok(Value::Object(top))
}

/// Endpoint kinds: one of [`ENDPOINTS`], the metrics path, or an unknown path.
const KINDS: u8 = ENDPOINTS.len() as u8 + 2;

fn call(u: &mut Unstructured<'_>, kind: u8) -> Result<Call> {
    let (mut target, mut method) = match usize::from(kind % KINDS) {
        i if i < ENDPOINTS.len() => (format!("{API_PREFIX}{}", ENDPOINTS[i].0), ENDPOINTS[i].1),
        i if i == ENDPOINTS.len() => (METRICS_PATH.to_string(), "GET"),
        _ => {
            const CHARS: &[u8] = b"abcmpv.-_/1";
            let n = u8::arbitrary(u)? % 24;
            let mut path = String::from(if bool::arbitrary(u)? { API_PREFIX } else { "/" });
            for _ in 0..n {
                path.push(char::from(
                    CHARS[usize::from(u8::arbitrary(u)?) % CHARS.len()],
                ));
            }
            (path, "GET")
        }
    };
    let is_create = target.ends_with("/vm.create");
    if rarely(u, 24)? {
        method = METHODS[usize::from(u8::arbitrary(u)?) % METHODS.len()];
    }
    if rarely(u, 24)? {
        target.push_str("?x=1&y");
    }
    let body = match (is_create, rarely(u, 24)?) {
        (true, false) => Some(config(u)?.to_string().into_bytes()),
        (false, false) => None,
        (_, true) => match u8::arbitrary(u)? % 4 {
            0 => None,
            1 => Some(config(u)?.to_string().into_bytes()),
            2 => Some(b"{\"payload\":".to_vec()),
            _ => Some(Vec::<u8>::arbitrary(u)?),
        },
    };
    Ok(Call {
        method: method.into(),
        target,
        body: body.filter(|b| !b.is_empty()),
    })
}

/// The VM `vm.create` keeps for `body` in its file form (what `vm.info` shows), or `None` if
/// it answers 400.
fn created_file(body: Option<&[u8]>) -> Option<VmConfigFile> {
    let file = VmConfigFile::from_json(std::str::from_utf8(body?).ok()?).ok()?;
    let spec = file.validate(&new_vmm().settings().host()).ok()?;
    Some(spec.to_file())
}

fn error_text(reply: &Reply) -> String {
    match &reply.body {
        Some((body, BodyKind::Json)) => {
            let value: Value = serde_json::from_str(body).expect("JSON error body");
            value["error"]
                .as_str()
                .expect("an `error` text")
                .to_string()
        }
        other => panic!(
            "error reply {} without a JSON body: {other:?}",
            reply.status
        ),
    }
}

fn check_reply(reply: &Reply) {
    if reply.status >= 400 {
        assert!(!error_text(reply).is_empty(), "empty error text");
    }
    if let Some((body, BodyKind::Json)) = &reply.body {
        serde_json::from_str::<Value>(body).expect("JSON body parses");
    }
}

/// Runs `calls` straight through `routes::handle` against the model; returns the statuses
/// (413 for a body the HTTP server refuses before routing).
fn run_direct(calls: &[Call]) -> Vec<u16> {
    let vmm = new_vmm();
    let mut created: Option<VmConfigFile> = None;
    let mut statuses = Vec::new();
    for call in calls {
        if call.body.as_ref().is_some_and(|b| b.len() > MAX_BODY_BYTES) {
            // What the HTTP server answers before the call gets this far.
            statuses.push(413);
            continue;
        }
        let reply = routes::handle(&vmm, &call.method, &call.target, call.body.as_deref());
        check_reply(&reply);
        statuses.push(reply.status);
        let path = call
            .target
            .split_once('?')
            .map_or(&*call.target, |(p, _)| p);
        let endpoint = path
            .strip_prefix(API_PREFIX)
            .and_then(|name| ENDPOINTS.iter().find(|(n, _)| *n == name));
        let what = format!("{} {} -> {}", call.method, call.target, reply.status);
        if path == METRICS_PATH {
            let expected = if call.method == "GET" { 200 } else { 405 };
            assert_eq!(reply.status, expected, "{what}");
            continue;
        }
        let Some(&(name, allowed)) = endpoint else {
            assert_eq!(reply.status, 404, "{what}");
            continue;
        };
        if call.method != allowed {
            assert_eq!(reply.status, 405, "{what}");
            assert_eq!(reply.allow, Some(allowed), "{what}");
            continue;
        }
        let vm_or_404 = |status: u16| if created.is_some() { status } else { 404 };
        match name {
            "vmm.ping" => assert_eq!(reply.status, 200, "{what}"),
            "vmm.shutdown" => {
                assert_eq!(reply.status, 204, "{what}");
                assert!(reply.exit_after, "{what} without exit_after");
            }
            "vm.create" => match created_file(call.body.as_deref()) {
                None => assert_eq!(reply.status, 400, "{what}"),
                Some(_) if created.is_some() => assert_eq!(reply.status, 405, "{what}"),
                Some(file) => {
                    assert_eq!(reply.status, 204, "{what}");
                    created = Some(file);
                }
            },
            "vm.boot" if created.is_some() => match reply.status {
                400 => {}
                500 => {
                    let error = error_text(&reply);
                    assert!(error.contains(KVM), "500 not from opening KVM: {error}");
                }
                _ => panic!("{what}: boot cannot succeed without KVM"),
            },
            "vm.info" => {
                assert_eq!(reply.status, vm_or_404(200), "{what}");
                if let (Some(file), Some((body, _))) = (&created, &reply.body) {
                    let info: Value = serde_json::from_str(body).expect("vm.info JSON");
                    assert_eq!(info["state"], "Created", "{body}");
                    let config = VmConfigFile::from_json(&info["config"].to_string())
                        .expect("vm.info's config parses");
                    assert_eq!(&config, file, "vm.info gives back another file");
                }
            }
            "vm.delete" => {
                assert_eq!(reply.status, vm_or_404(204), "{what}");
                created = None;
            }
            // Their bodies never parse here (calls whose body is JSON are skipped, see
            // `touches_host`): the body is checked before the VM's state.
            "vm.snapshot" | "vm.restore" | "vm.send-migration" | "vm.receive-migration" => {
                assert_eq!(reply.status, 400, "{what}");
            }
            // boot without a VM; the rest needs a running VM, which never exists here.
            _ => assert_eq!(reply.status, vm_or_404(405), "{what}"),
        }
    }
    statuses
}

// ---- HTTP ----

/// One response of the server's answer.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        write!(f, "{} {:?} {body:?}", self.status, self.headers)
    }
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Splits the answer into responses, panicking if it is anything else. A response to HEAD
/// has a Content-Length but no body: a body is taken only if what follows it is the end or
/// another response.
fn parse_answer(mut rest: &[u8]) -> Vec<Response> {
    // hyper answers an HTTP/1.0 request in kind.
    let starts = |r: &[u8]| r.starts_with(b"HTTP/1.1 ") || r.starts_with(b"HTTP/1.0 ");
    let next_ok = |r: &[u8]| r.is_empty() || starts(r);
    let mut responses = Vec::new();
    while !rest.is_empty() {
        let shown = String::from_utf8_lossy(&rest[..rest.len().min(200)]).into_owned();
        assert!(starts(rest), "not a status line: {shown:?}");
        let status = &rest["HTTP/1.1 ".len()..];
        assert!(
            status.len() >= 4 && status[..3].iter().all(u8::is_ascii_digit) && status[3] == b' ',
            "malformed status: {shown:?}"
        );
        let status: u16 = std::str::from_utf8(&status[..3]).unwrap().parse().unwrap();
        let end = find(rest, b"\r\n\r\n").unwrap_or_else(|| panic!("unfinished head: {shown:?}"));
        let head = std::str::from_utf8(&rest[..end]).expect("ASCII head");
        let headers: Vec<(String, String)> = head
            .split("\r\n")
            .skip(1)
            .map(|line| {
                let (n, v) = line.split_once(':').expect("header line with a colon");
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        rest = &rest[end + 4..];
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let length = response
            .header("content-length")
            .map(|v| v.parse::<usize>().expect("numeric Content-Length"));
        match length {
            Some(n) if rest.len() >= n && next_ok(&rest[n..]) => {
                response.body = rest[..n].to_vec();
                rest = &rest[n..];
            }
            _ => assert!(next_ok(rest), "bytes after a response: {shown:?}"),
        }
        responses.push(response);
    }
    responses
}

fn check_response(r: &Response, allow_500: bool) {
    assert!(
        STATUSES.contains(&r.status) || (allow_500 && r.status == 500),
        "unexpected status: {r:?}"
    );
    if r.header("content-type") == Some("application/json") && !r.body.is_empty() {
        let value: Value = serde_json::from_slice(&r.body).expect("JSON body parses");
        if r.status >= 400 {
            let error = value["error"].as_str().expect("an `error` text");
            assert!(!error.is_empty(), "empty error text: {r:?}");
        }
    }
}

/// Feeds `request` to the server on a fresh VMM and returns everything it answers.
fn serve(request: &[u8]) -> Vec<u8> {
    RUNTIME.block_on(async {
        let (client, server) = tokio::io::duplex(64 << 10);
        let served = tokio::spawn(serve_stream(server, new_vmm()));
        let (mut read, mut write) = tokio::io::split(client);
        let send = async {
            // The server may close first (a parse error): what is left unsent does not matter.
            let _ = write.write_all(request).await;
            let _ = write.shutdown().await;
        };
        let mut answer = Vec::new();
        let receive = read.read_to_end(&mut answer);
        let (_, received) =
            tokio::time::timeout(ANSWER_TIMEOUT, async { tokio::join!(send, receive) })
                .await
                .expect("the server answers and closes within 2 s of the client's EOF");
        received.expect("reading the answer");
        tokio::time::timeout(ANSWER_TIMEOUT, served)
            .await
            .expect("the connection task ends")
            .expect("the connection task does not panic");
        answer
    })
}

/// Endpoints whose valid requests reach outside the process: `vm.restore` reads the
/// snapshot directory it names, `vm.receive-migration` listens on the socket it names,
/// `vm.snapshot` and `vm.send-migration` write or connect (after a state check, but a model
/// does not bet the host on that).
const HOST_ENDPOINTS: &[&str] = &[
    "vm.snapshot",
    "vm.restore",
    "vm.send-migration",
    "vm.receive-migration",
];

/// Whether `call` goes to one of [`HOST_ENDPOINTS`] with a body that could be a request.
fn touches_host(call: &Call) -> bool {
    HOST_ENDPOINTS.iter().any(|name| call.target.contains(name))
        && call
            .body
            .as_deref()
            .is_some_and(|b| serde_json::from_slice::<Value>(b).is_ok())
}

fn raw(data: &[u8]) -> Corpus {
    if find(data, b"vm.create").is_some() && find(data, b"vm.boot").is_some() {
        return Corpus::Reject;
    }
    if HOST_ENDPOINTS
        .iter()
        .any(|name| find(data, name.as_bytes()).is_some())
    {
        return Corpus::Reject;
    }
    for response in parse_answer(&serve(data)) {
        check_response(&response, false);
    }
    Corpus::Keep
}

fn structured(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let n = 1 + u8::arbitrary(&mut u)? % 16;
    let kinds: Vec<u8> = (0..n)
        .map(|_| u8::arbitrary(&mut u))
        .collect::<Result<_>>()?;
    let mut calls = Vec::new();
    for kind in kinds {
        let call = call(&mut u, kind)?;
        let safe = match VmConfigFile::from_json(
            std::str::from_utf8(call.body.as_deref().unwrap_or_default()).unwrap_or_default(),
        ) {
            Ok(file) => hermetic(&file),
            Err(_) => true,
        };
        if !safe || touches_host(&call) {
            continue;
        }
        let shutdown = call.method == "PUT" && call.target.starts_with("/api/v1/vmm.shutdown");
        calls.push(call);
        // `vmm.shutdown` closes the connection: nothing after it is answered.
        if shutdown {
            break;
        }
    }
    let direct = run_direct(&calls);

    let mut request = Vec::new();
    for call in &calls {
        let body = call.body.as_deref().unwrap_or_default();
        request.extend_from_slice(
            format!(
                "{} {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
                call.method,
                call.target,
                body.len()
            )
            .as_bytes(),
        );
        request.extend_from_slice(body);
    }
    let responses = parse_answer(&serve(&request));
    if std::env::var_os("RVMM_FUZZ_DEBUG").is_some() {
        eprintln!("calls {calls:#?}\ndirect statuses {direct:?}");
        eprintln!("answer {responses:#?}");
    }
    let mut statuses = Vec::new();
    for response in responses.iter().filter(|r| r.status >= 200) {
        check_response(response, true);
        statuses.push(response.status);
    }
    // A 413 leaves the rest of its body unread: hyper may then close the connection.
    let answered = statuses.len().min(direct.len());
    let cut_by_413 = answered > 0 && direct[answered - 1] == 413;
    assert!(
        statuses == direct || (statuses == direct[..answered] && cut_by_413),
        "HTTP and direct calls disagree: {statuses:?} != {direct:?} for {calls:?}"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| -> Corpus {
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => raw(rest),
        Some((_, rest)) => {
            let _ = structured(rest);
            Corpus::Keep
        }
        None => Corpus::Reject,
    }
});
