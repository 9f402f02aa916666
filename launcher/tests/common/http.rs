//! A minimal HTTP/1.1 client for the API tests: one request per connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A parsed answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

fn request_bytes(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(body) = body {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    text.push_str("\r\n");
    if let Some(body) = body {
        text.push_str(body);
    }
    text.into_bytes()
}

/// Parses a whole response (the connection was closed after it).
pub fn parse(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Sends one request on the unix socket and reads the answer.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(&request_bytes(method, path, body))
        .unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    parse(&raw)
}

/// What Cloud Hypervisor's `api_client` (the client inside `ch-remote`) gets from one request:
/// the status and, when the answer has a `Content-Length`, the body.
#[derive(Debug, PartialEq, Eq)]
pub struct ChAnswer {
    pub status: u16,
    pub body: Option<String>,
}

/// Sends a request the way `api_client` does (request line, `Host: localhost`, `Accept: */*`,
/// `Content-Length` only with a body; the connection stays open) and reads the answer by its
/// rules: 256-byte reads until the header block is complete and, if a header spelled exactly
/// `Content-Length: ` is there, until the body is in; the status is everything between
/// `HTTP/1.1 ` and the line's `\r`, trimmed, as an integer (a reason phrase makes it fail);
/// the body is the rest after the header block.
pub fn ch_api_client(socket: &Path, method: &str, command: &str, body: Option<&str>) -> ChAnswer {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request =
        format!("{method} /api/v1/{command} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    stream.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    let mut content: Option<(usize, usize)> = None;
    loop {
        let mut chunk = [0u8; 256];
        let count = stream.read(&mut chunk).unwrap();
        if count == 0 {
            break;
        }
        text.push_str(std::str::from_utf8(&chunk[..count]).unwrap());
        if let Some(end) = text.find("\r\n\r\n") {
            let offset = end + 4;
            let Some(length) = exact_header(&text, "Content-Length") else {
                break;
            };
            let length: usize = length.trim().parse().expect("Content-Length is a number");
            content = Some((offset, length));
            if text.len() >= offset + length {
                break;
            }
        }
    }
    let start = text.find("HTTP/1.1").expect("HTTP/1.1 in the answer") + "HTTP/1.1 ".len();
    let end = start + text[start..].find('\r').expect("a status line end");
    let status = text[start..end]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("status line {:?}: {e}", &text[..end]));
    ChAnswer {
        status,
        body: content.map(|(offset, _)| text[offset..].to_string()),
    }
}

/// The value of the header spelled exactly `name` (case-sensitive, as `api_client` looks).
fn exact_header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}: ");
    let start = text.find(&key)? + key.len();
    Some(&text[start..start + text[start..].find('\r')?])
}

/// GET over TCP.
pub fn get_tcp(addr: &str, path: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(&request_bytes("GET", path, None)).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

/// Waits until something listens on the unix socket.
pub fn wait_for_socket(socket: &Path, timeout: Duration) {
    let start = Instant::now();
    while UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on loopback (bound and released; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One sample of a Prometheus text exposition: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses the text exposition format strictly enough to catch malformed output: every sample
/// belongs to a family declared with `# TYPE`, counters end in `_total`, values are numbers.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut types: Vec<(String, String)> = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has name and type");
            assert!(
                ["counter", "gauge", "untyped", "histogram", "summary"].contains(&kind),
                "{line}"
            );
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
            }
            types.push((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("labels end with }");
                let labels = inner
                    .split("\",")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once("=\"").expect("label is k=\"v\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        assert!(
            types.iter().any(|(t, _)| *t == name),
            "sample {name} has no # TYPE line"
        );
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The value of `name` with label `label=value` (or the first one when `label` is empty).
pub fn sample(samples: &[Sample], name: &str, label: (&str, &str)) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && (label.0.is_empty()
                    || s.labels.iter().any(|(k, v)| k == label.0 && v == label.1))
        })
        .map(|s| s.value)
}
