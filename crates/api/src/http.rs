//! A small HTTP/1.1 server on a Unix socket: one thread per connection, keep-alive, bodies
//! only with Content-Length and at most 64 KiB. Requests go to the VMM's main thread through
//! a channel; the connection waits for its answer.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Response;
use crate::routes::{self, Request};

/// The largest request body accepted unless `--http-api-max-payload-size` says otherwise.
pub const DEFAULT_MAX_BODY: usize = 64 << 10;
static MAX_BODY: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_BODY);

/// Sets the largest request body accepted (before the server starts).
pub fn set_max_body(bytes: usize) {
    MAX_BODY.store(bytes, Ordering::Relaxed);
}

fn max_body() -> usize {
    MAX_BODY.load(Ordering::Relaxed)
}
const MAX_HEAD: usize = 8 << 10;
const MAX_HEADERS: usize = 32;
const MAX_CONNECTIONS: usize = 256;
/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Once a request has begun, all of it (head and body) must arrive within this long, so that
/// a client trickling a byte at a time cannot hold a connection slot for ever.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// A client that does not read its answer for this long loses the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const THREAD_STACK: usize = 256 << 10;

/// A request for the VMM, with where to send the answer.
pub struct ApiCall {
    pub request: Request,
    pub reply: SyncSender<Response>,
}

/// What the connection threads share.
struct Shared {
    calls: Mutex<Sender<ApiCall>>,
    /// Wakes the VMM's main thread after a call was sent.
    poke: Box<dyn Fn() + Send + Sync>,
    connections: AtomicUsize,
}

/// The listening server; dropping it stops accepting, waits for the accept thread and removes
/// the socket file. Connections already open end on their own (closed or idle).
pub struct Server {
    path: PathBuf,
    listener: Arc<UnixListener>,
    thread: Option<sandbox::Thread<()>>,
    shared: Arc<Shared>,
}

/// How long a stopping server waits for open connections to finish their answers (the last
/// one may be the answer to the request that stopped the VMM).
const DRAIN: Duration = Duration::from_millis(500);

impl Server {
    /// Listens on `path` (which must not exist) and serves until dropped.
    pub fn spawn(path: &Path, calls: Sender<ApiCall>, poke: Box<dyn Fn() + Send + Sync>) -> std::io::Result<Server> {
        // Only the user the VMM runs as may connect: the socket is made 0600 as it is bound
        // (the umask applies to the bind; no other thread creates files this early).
        // SAFETY: umask only changes the process's file-creation mask, restored at once.
        let previous = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(previous) };
        let listener = Arc::new(bound?);
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let shared = Arc::new(Shared { calls: Mutex::new(calls), poke, connections: AtomicUsize::new(0) });
        let accepting = listener.clone();
        let serving = shared.clone();
        let thread = sandbox::spawn_with_stack(sandbox::ThreadKind::Api, "api", Some(THREAD_STACK), move || {
            for stream in accepting.incoming() {
                match stream {
                    Ok(stream) => accept(stream, &serving),
                    // The socket was shut down: the server is being dropped.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(e) => tracing::warn!("the API socket failed to accept a connection: {e}"),
                }
            }
        })?;
        Ok(Server { path: path.to_path_buf(), listener, thread: Some(thread), shared })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown on the listening socket this server owns; a blocked accept returns
        // EINVAL, which ends the accept thread.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let deadline = Instant::now() + DRAIN;
        while self.shared.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept(mut stream: UnixStream, shared: &Arc<Shared>) {
    if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        let busy = Response::error(503, format!("The API serves at most {MAX_CONNECTIONS} connections; retry later."));
        let _ = write_response(&mut stream, &busy, false);
        return;
    }
    let shared_for_thread = shared.clone();
    let spawned = sandbox::spawn_with_stack(sandbox::ThreadKind::Api, "api-conn", Some(THREAD_STACK), move || {
        serve_connection(stream, &shared_for_thread);
        shared_for_thread.connections.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("an API connection was dropped: no thread for it ({e})");
    }
}

/// A parsed request head and its body.
struct RawRequest {
    method: String,
    target: String,
    body: Vec<u8>,
    keep_alive: bool,
}

fn serve_connection(mut stream: UnixStream, shared: &Shared) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut buffer = Vec::new();
    loop {
        let raw = match read_request(&mut stream, &mut buffer) {
            Ok(Some(raw)) => raw,
            Ok(None) => return,
            Err(response) => {
                count("invalid", "request");
                let _ = write_response(&mut stream, &response, false);
                drain(&mut stream);
                return;
            }
        };
        let response = handle(&raw, shared);
        if write_response(&mut stream, &response, raw.keep_alive).is_err() || !raw.keep_alive {
            return;
        }
    }
}

/// Closing with unread input makes the kernel reset the connection, and the client may lose
/// the answer: read (a bounded amount of) what the client still sends before closing.
fn drain(stream: &mut UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 4096];
    let mut left = 4 * max_body();
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

fn handle(raw: &RawRequest, shared: &Shared) -> Response {
    let path = raw.target.split('?').next().unwrap_or("");
    count(&raw.method, routes::template_for(path).unwrap_or("unknown"));
    tracing::debug!("API {} {}", raw.method, raw.target);
    let request = match routes::parse(&raw.method, &raw.target, &raw.body) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let (reply, answer) = sync_channel(1);
    let sent = shared.calls.lock().unwrap_or_else(|p| p.into_inner()).send(ApiCall { request, reply });
    if sent.is_err() {
        return Response::error(503, "The VMM is shutting down; the request was not served.");
    }
    (shared.poke)();
    answer.recv().unwrap_or_else(|_| Response::error(503, "The VMM is shutting down; the request was not served."))
}

/// Reads one request from `stream`; `buffer` keeps bytes of the next pipelined request.
/// Ok(None): the client closed the connection (or went idle) between requests.
/// Reads into `chunk`: waiting up to IDLE_TIMEOUT for a request to begin, and only until
/// `deadline` once one has.
fn read_some(stream: &mut UnixStream, chunk: &mut [u8], deadline: Option<Instant>) -> std::io::Result<usize> {
    let wait = match deadline {
        None => IDLE_TIMEOUT,
        Some(deadline) => deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(std::io::ErrorKind::TimedOut)?,
    };
    stream.set_read_timeout(Some(wait))?;
    stream.read(chunk)
}

fn too_slow() -> Response {
    Response::error(
        408,
        format!("The request did not arrive whole within {} s; send it at once.", REQUEST_DEADLINE.as_secs()),
    )
}

fn read_request(stream: &mut UnixStream, buffer: &mut Vec<u8>) -> Result<Option<RawRequest>, Response> {
    let mut chunk = [0u8; 4096];
    // A request that is already partly buffered began when it was read.
    let mut deadline = (!buffer.is_empty()).then(|| Instant::now() + REQUEST_DEADLINE);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buffer) {
            Ok(httparse::Status::Complete(head_len)) => {
                let request = head(&parsed)?;
                let (method, target, keep_alive, body_len) = request;
                let total = head_len + body_len;
                while buffer.len() < total {
                    let n = read_some(stream, &mut chunk, deadline).map_err(|e| match e.kind() {
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => too_slow(),
                        _ => Response::error(400, "The request body ended early; send Content-Length bytes."),
                    })?;
                    if n == 0 {
                        return Err(Response::error(400, "The request body ended early; send Content-Length bytes."));
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                }
                let body = buffer[head_len..total].to_vec();
                buffer.drain(..total);
                return Ok(Some(RawRequest { method, target, body, keep_alive }));
            }
            Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD => {
                return Err(Response::error(431, format!("The request head is over {MAX_HEAD} bytes; shorten it.")));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Response::error(431, format!("The request has over {MAX_HEADERS} headers; send fewer.")));
            }
            Err(e) => {
                return Err(Response::error(400, format!("The request is not valid HTTP/1.1 ({e}); fix the client.")));
            }
        }
        match read_some(stream, &mut chunk, deadline) {
            Ok(0) | Err(_) if buffer.is_empty() => return Ok(None),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                return Err(too_slow());
            }
            Ok(0) | Err(_) => {
                return Err(Response::error(400, "The request ended in its head; send a complete request."));
            }
            Ok(n) => {
                deadline.get_or_insert_with(|| Instant::now() + REQUEST_DEADLINE);
                buffer.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// Method, target, keep-alive and body length of a complete head.
fn head(parsed: &httparse::Request) -> Result<(String, String, bool, usize), Response> {
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("/").to_string();
    let mut keep_alive = parsed.version == Some(1);
    let mut body_len = 0usize;
    for header in parsed.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("content-length") {
            body_len = value.trim().parse().map_err(|_| {
                Response::error(
                    400,
                    format!("Content-Length '{value}' is not a number; send the body's size in bytes."),
                )
            })?;
            if body_len > max_body() {
                return Err(Response::error(
                    413,
                    format!("The body is {body_len} bytes; the API takes at most {}.", max_body()),
                ));
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(411, "Chunked bodies are not accepted; send Content-Length instead."));
        } else if header.name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.trim().eq_ignore_ascii_case("close");
        }
    }
    Ok((method, target, keep_alive, body_len))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn write_response(stream: &mut UnixStream, response: &Response, keep_alive: bool) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: Ferrovisor\r\nConnection: {}\r\n",
        response.status,
        reason(response.status),
        if keep_alive { "keep-alive" } else { "close" }
    );
    if response.status != 204 {
        head.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\n",
            response.content_type,
            response.body.len()
        ));
    }
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if response.status != 204 {
        stream.write_all(response.body.as_bytes())?;
    }
    stream.flush()
}

/// API requests served, by "METHOD /template" ("invalid request" for unparseable HTTP).
static REQUESTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn count(method: &str, template: &str) {
    let mut requests = REQUESTS.lock().unwrap_or_else(|p| p.into_inner());
    // Unknown methods are folded together so that a client cannot grow the map without bound.
    let method = if matches!(method, "GET" | "PUT" | "PATCH" | "invalid") { method } else { "other" };
    *requests.entry(format!("{method} {template}")).or_default() += 1;
}

/// The API request counters, for the metrics.
pub fn request_counts() -> Vec<(String, u64)> {
    REQUESTS.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
}
