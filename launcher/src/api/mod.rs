//! The control API: HTTP/1.1 on a unix socket with Cloud Hypervisor's paths (`/api/v1/vm.boot`,
//! ...) and a Prometheus scrape at `/metrics`; with `--metrics-addr`, the scrape on TCP too.
//!
//! One thread runs a single-threaded tokio runtime with a task per client, so a slow, stuck or
//! half-closed client only ever holds its own connection. The VM operations themselves are
//! blocking calls into [`Vmm`], made one at a time on the `vmm-control` thread; `GET` requests
//! (`vmm.ping`, `vm.info`, `vm.counters`, `/metrics`), which only read, run on the `vmm-query`
//! thread instead, so they answer while an operation runs (a live migration takes minutes).
//! The API thread only moves bytes, under a narrow seccomp filter
//! ([`crate::seccomp::api_filter`]).

pub mod routes;

use std::convert::Infallible;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::ext::ReasonPhrase;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use rvmm_core::seccomp::{SeccompError, SpawnError, spawn_filtered};

use self::routes::{BodyKind, METRICS_PATH, Reply};
use crate::control_thread::ControlThread;
use crate::seccomp::{api_filter, control_rules, thread_filter_for};
use crate::vmm::{EXIT_OK, Vmm};

/// Largest request body accepted (a VM configuration is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = crate::config::MAX_CONFIG_BYTES;
/// Largest request line and headers accepted (431 beyond).
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// A connection's read buffer at most (headers, then the body as it streams through).
const MAX_READ_BUFFER_BYTES: usize = 32 << 10;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an API or metrics listener cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Something other than a stale socket is in the way.
    #[error("--api-socket: {} exists and is not a socket", .0.display())]
    PathInUse(PathBuf),
    /// bind/chmod on the unix socket failed.
    #[error("--api-socket: cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// bind on the TCP address failed.
    #[error("--metrics-addr: cannot listen on {addr}")]
    BindTcp {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server's thread or runtime cannot start.
    #[error("Cannot start the API server")]
    Start(#[source] std::io::Error),
    /// The server's seccomp filter cannot be built.
    #[error("Cannot build the API server's seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// The server's thread cannot start under its seccomp filter.
    #[error("Cannot start the API server's thread")]
    Thread(#[source] SpawnError),
}

impl ApiServerError {
    /// True when the command line, not the host, is at fault (the socket path or address).
    pub fn is_bad_config(&self) -> bool {
        matches!(
            self,
            Self::PathInUse(_) | Self::Bind { .. } | Self::BindTcp { .. }
        )
    }
}

/// Where the unix socket's requests run.
#[derive(Clone, Debug)]
struct Workers {
    /// VM operations, one at a time.
    control: ControlThread,
    /// `GET` requests, which only read: never queued behind an operation.
    query: ControlThread,
}

/// Which requests a listener serves, and where they run.
#[derive(Clone, Debug)]
enum Scope {
    /// Everything (the unix socket). Requests run on the workers when there are some, else
    /// inline on the runtime's thread (fuzzing).
    Api(Option<Workers>),
    /// `GET /metrics` alone (TCP): reading counters, answered inline.
    MetricsOnly,
}

/// The API server; dropping it removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path` (mode 0600; a stale socket there is replaced) and serves `vmm` on a
    /// thread of its own, filtered with [`api_filter`] when `seccomp` is true (`--seccomp`).
    pub fn start(path: &Path, vmm: Arc<Vmm>, seccomp: bool) -> Result<Self, ApiServerError> {
        let listener = bind_private(path)?;
        let this = Self {
            path: path.to_owned(),
        };
        let control_filter =
            thread_filter_for(seccomp, control_rules()).map_err(ApiServerError::Seccomp)?;
        let workers = Workers {
            control: ControlThread::start("vmm-control", control_filter.clone())
                .map_err(ApiServerError::Thread)?,
            // The GET requests ran on vmm-control before: the same filter, no capabilities.
            query: ControlThread::start_reader("vmm-query", control_filter)
                .map_err(ApiServerError::Thread)?,
        };
        spawn_server("api", seccomp, move || async move {
            let listener = tokio::net::UnixListener::from_std(listener)?;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let scope = Scope::Api(Some(workers.clone()));
                        tokio::spawn(serve_connection(stream, vmm.clone(), scope));
                    }
                    Err(e) => accept_failed(&e).await,
                }
            }
        })?;
        Ok(this)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// `--metrics-addr`: the Prometheus scrape on TCP, on a thread of its own filtered with
/// [`api_filter`] when `seccomp` is true. Returns the bound address.
pub fn start_metrics_server(
    addr: SocketAddr,
    vmm: Arc<Vmm>,
    seccomp: bool,
) -> Result<SocketAddr, ApiServerError> {
    let bind_error = |source| ApiServerError::BindTcp { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    spawn_server("metrics", seccomp, move || async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, vmm.clone(), Scope::MetricsOnly));
                }
                Err(e) => accept_failed(&e).await,
            }
        }
    })?;
    Ok(bound)
}

/// Runs `serve` on a single-threaded runtime on a thread named `name`, which installs the API
/// filter first when `seccomp` is true.
///
/// The runtime is built here, on the caller's thread: that creates its epoll instance and its
/// waker's eventfd, which the filter does not allow. A current-thread runtime with only I/O
/// and timers never starts a thread by itself (only its blocking pool would, which nothing
/// here uses; hyper's HTTP/1.1 connections need no executor): the filter allows none.
fn spawn_server<F, Fut>(name: &str, seccomp: bool, serve: F) -> Result<(), ApiServerError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ApiServerError::Start)?;
    let filter = seccomp
        .then(api_filter)
        .transpose()
        .map_err(ApiServerError::Seccomp)?;
    let thread_name = name.to_string();
    spawn_filtered(name, filter, move || {
        if let Err(e) = runtime.block_on(serve()) {
            log::error!("The {thread_name} server stopped: {e}");
        }
    })
    .map_err(ApiServerError::Thread)?;
    Ok(())
}

/// accept() failures (out of descriptors, say) are logged and retried after a pause rather
/// than spinning.
async fn accept_failed(e: &std::io::Error) {
    rvmm_devices::limited_log!(log::Level::Warn, "Cannot accept a client: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn bind_private(path: &Path) -> Result<std::os::unix::net::UnixListener, ApiServerError> {
    let bind_error = |source| ApiServerError::Bind {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Left by a run that could not clean up (SIGKILL): nobody listens there.
            log::warn!(
                "--api-socket: replacing the stale socket {}",
                path.display()
            );
            fs::remove_file(path).map_err(bind_error)?;
        }
        Ok(_) => return Err(ApiServerError::PathInUse(path.to_owned())),
        Err(_) => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

/// Serves the full API on one already connected client, as the unix socket does, until the
/// client is done. For the `api_request` fuzz target and tests that bring their own stream
/// (`tokio::io::duplex`, say).
pub async fn serve_stream<S>(stream: S, vmm: Arc<Vmm>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_connection(stream, vmm, Scope::Api(None)).await
}

async fn serve_connection<S>(stream: S, vmm: Arc<Vmm>, scope: Scope)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exit_after = Arc::new(AtomicBool::new(false));
    let service = {
        let (vmm, exit_after) = (vmm.clone(), exit_after.clone());
        service_fn(move |request| answer(request, vmm.clone(), scope.clone(), exit_after.clone()))
    };
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // Cloud Hypervisor's `api_client` (ch-remote) finds `Content-Length: ` by its exact
        // spelling; without it, it reads no body.
        .title_case_headers(true)
        // Requests are small: a client cannot make the thread buffer more than this (431).
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_READ_BUFFER_BYTES)
        // A client that shuts down its write side after the request still gets the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        log::debug!("API client: {e}");
    }
    // `vmm.shutdown` answers with `Connection: close`: the VMM exits once the answer is out.
    if exit_after.load(Ordering::SeqCst) {
        vmm.request_exit(EXIT_OK);
    }
}

async fn answer(
    request: Request<Incoming>,
    vmm: Arc<Vmm>,
    scope: Scope,
    exit_after: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    if matches!(scope, Scope::MetricsOnly) && path != METRICS_PATH {
        return Ok(to_response(Reply::error(
            404,
            format!("No endpoint {path}: only {METRICS_PATH} here"),
        )));
    }
    // A declared length over the limit is refused before any of the body is read (the client
    // may be waiting for a `100 Continue`, or send nothing at all).
    if request.body().size_hint().lower() > MAX_BODY_BYTES as u64 {
        let mut response = to_response(too_large());
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return Ok(response);
    }
    let limited = Limited::new(request.into_body(), MAX_BODY_BYTES);
    let body = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => {
            return Ok(to_response(Reply::error(
                408,
                "The request body took too long",
            )));
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(to_response(too_large()));
        }
        Ok(Err(e)) => {
            return Ok(to_response(Reply::error(
                400,
                format!("Bad request body: {e}"),
            )));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let reads = routes::only_reads(&method);
    let run = move || {
        let body = (!body.is_empty()).then_some(&body[..]);
        routes::handle(&vmm, &method, &path, body)
    };
    let reply = match scope {
        Scope::Api(Some(workers)) => {
            let worker = if reads {
                &workers.query
            } else {
                &workers.control
            };
            worker
                .run(run)
                .await
                .unwrap_or_else(|e| Reply::error(500, e.to_string()))
        }
        Scope::Api(None) | Scope::MetricsOnly => run(),
    };
    if reply.exit_after {
        exit_after.store(true, Ordering::SeqCst);
    }
    Ok(to_response(reply))
}

/// 413 for a body over [`MAX_BODY_BYTES`].
fn too_large() -> Reply {
    Reply::error(
        413,
        format!("The request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// The HTTP response for `reply`.
///
/// The status line is `HTTP/1.1 204 ` (no reason phrase), as Cloud Hypervisor's server writes
/// it: its `api_client` (ch-remote) parses everything after `HTTP/1.1 ` up to the line's end
/// as the status number, so a reason phrase fails every answer there.
fn to_response(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .extensions_mut()
        .insert(ReasonPhrase::from_static(b""));
    let headers = response.headers_mut();
    if let Some(allow) = reply.allow {
        headers.insert(ALLOW, HeaderValue::from_static(allow));
    }
    if reply.exit_after {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some((body, kind)) = reply.body {
        let media = match kind {
            BodyKind::Json => "application/json",
            BodyKind::Text => "text/plain; version=0.0.4; charset=utf-8",
        };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(media));
        *response.body_mut() = Full::new(Bytes::from(body));
    }
    response
}
