//! Bounded HTTP/1.1 serving for the ledger and query services: an explicit accept loop over
//! hyper that no client can exhaust by holding sockets open, trickling bytes, or going quiet.
//!
//! Invariants of [`serve`], each bounded by a field of [`ServeLimits`]:
//!
//! * At most `max_connections` connections are served at once. When all slots are taken, the
//!   next connection is accepted and held (one at most, so `max_connections + 1` sockets) while
//!   room is made for it: the connection quiet for longest, with no request in a handler and no
//!   byte moved for at least [`EVICT_QUIET_AT_LEAST`], is closed. So thousands of idle sockets
//!   cannot keep a client that sends its request out: each new connection displaces the oldest
//!   idle one, and a client that is sending is never the quietest. When every slot has a
//!   request in a handler, the held connection waits for one to finish, and later connections
//!   wait in the kernel's listen backlog (they are not closed).
//! * A request head (request line, query string and headers) is at most `max_head_bytes` and
//!   100 headers; a larger one is answered `431` (`head_too_large`, or hyper's own empty 431
//!   when its read buffer, bounded near `max_head_bytes`, fills first), so a connection's read
//!   buffer, and the memory of all of them, is bounded.
//! * A request head must arrive within `header_read_timeout`, or the connection is closed
//!   (slowloris). hyper 1.12 starts that clock whenever the connection begins waiting for a head:
//!   at accept, and again as soon as a response has been written on a kept-alive connection
//!   (`State::idle` sets `notify_read` when `h1_header_read_timeout` is set, and `poll_read_head`
//!   arms the timer). So a kept-alive connection waiting for its next request is also closed after
//!   `header_read_timeout`.
//! * A connection on which no request is in a handler and no byte moved either way for
//!   `idle_timeout` is closed by a per-connection watchdog: an IO wrapper records the last read or
//!   write, a guard counts requests in handlers. It covers what hyper's timer does not — a client
//!   that stops reading a response, or a body that stopped arriving after its handler returned —
//!   and closes kept-alive connections after `idle_timeout` if that is shorter than
//!   `header_read_timeout`.
//! * A handler that has not produced its response head within `request_timeout` is dropped and
//!   the caller gets `503 {"error": {"code": "request_timeout", ...}}`.
//! * Accept errors (`EMFILE`, `ENFILE`, `ENOBUFS`, ...) are logged and retried after a short
//!   pause; they never end the server. Per-connection failures end only that connection.
//! * When `shutdown` completes the listener is closed, idle connections are closed, in-flight
//!   requests finish (keep-alive off), and after `shutdown_timeout` whatever is left is aborted;
//!   then [`serve`] returns.
//!
//! [`loopback_host_only`] is the DNS-rebinding guard for services running without a token file
//! (allowed only on loopback listeners): requests must name `localhost`, `127.0.0.1` or `[::1]`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt as _;

/// The bounds [`serve`] enforces; see the module documentation for what each one covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Connections open at once; beyond it new connections wait in the listen backlog.
    pub max_connections: usize,
    /// Time to receive a complete request head, counted from when the connection starts waiting
    /// for one (accept, or the end of the previous response).
    pub header_read_timeout: Duration,
    /// A connection with no request in a handler and no bytes moving for this long is closed.
    pub idle_timeout: Duration,
    /// Time for a handler to produce its response head.
    pub request_timeout: Duration,
    /// After shutdown, how long in-flight requests get before their connections are dropped.
    pub shutdown_timeout: Duration,
    /// Bytes a request head may take (hyper's read buffer; at least 8,192).
    pub max_head_bytes: usize,
}

impl Default for ServeLimits {
    /// 1024 connections, 10 s to send a request head, 60 s idle, 60 s per request, 10 s to drain,
    /// 64 KiB per request head.
    fn default() -> Self {
        ServeLimits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            max_head_bytes: 64 * 1024,
        }
    }
}

/// Pause after an accept error that is not about one connection (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);
/// At most one "connection limit reached" warning per this interval.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// A connection is closed to make room only after this long without a byte either way and with
/// no request in a handler: a client whose request is on its way is not displaced.
pub const EVICT_QUIET_AT_LEAST: Duration = Duration::from_secs(1);
/// While the server is full and nothing can be displaced, how often it looks again.
const FULL_RETRY: Duration = Duration::from_millis(50);

/// Each connection being served: what it is doing, and how to tell it to close.
type OpenConnections = std::collections::HashMap<u64, (Arc<Activity>, Arc<tokio::sync::Notify>)>;

/// The connections being served, so that a full server can close the quietest to make room.
#[derive(Default)]
struct Served {
    next_id: AtomicU64,
    open: std::sync::Mutex<OpenConnections>,
}

impl Served {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new connection: its activity, and the `Notify` that tells it to close.
    fn register(self: &Arc<Self>) -> ServedGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (activity, evict) = (Arc::new(Activity::new()), Arc::new(tokio::sync::Notify::new()));
        self.lock().insert(id, (Arc::clone(&activity), Arc::clone(&evict)));
        ServedGuard { served: Arc::clone(self), id, activity, evict }
    }

    /// Tells the connection quiet for longest (at least [`EVICT_QUIET_AT_LEAST`], with no
    /// request in a handler) to close; `false` when none is.
    fn evict_quietest(&self) -> bool {
        let open = self.lock();
        let quietest = open.iter().filter_map(|(id, (activity, _))| activity.quiet_for().filter(|q| *q >= EVICT_QUIET_AT_LEAST).map(|q| (q, *id))).max();
        match quietest.and_then(|(_, id)| open.get(&id)) {
            Some((_, evict)) => {
                evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A connection's entry in [`Served`], removed when the connection ends.
struct ServedGuard {
    served: Arc<Served>,
    id: u64,
    activity: Arc<Activity>,
    evict: Arc<tokio::sync::Notify>,
}

impl Drop for ServedGuard {
    fn drop(&mut self) {
        self.served.lock().remove(&self.id);
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes, then drains (bounded
/// by `limits.shutdown_timeout`) and returns. Accept errors are logged and retried, never
/// returned.
pub async fn serve(listener: TcpListener, app: Router, limits: ServeLimits, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut last_full_warning: Option<Instant> = None;
    let served = Arc::new(Served::default());
    tokio::pin!(shutdown);
    'accepting: loop {
        // Reap finished connections so the set holds only live ones.
        while let Some(done) = connections.try_join_next() {
            if let Err(e) = done {
                if e.is_panic() {
                    tracing::error!(error = %e, "http connection task panicked");
                }
            }
        }
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %e, "accept: connection failed before it was accepted");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "accept failed; retrying shortly");
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
                continue;
            }
        };
        // A slot for it; when all are taken, make room by closing the quietest idle connection.
        // Until a slot frees this one is held and no other is accepted: they wait in the backlog.
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if last_full_warning.is_none_or(|t| t.elapsed() >= FULL_WARNING_INTERVAL) {
                    tracing::warn!(max_connections = max, "http connection limit reached; closing the quietest idle connections to make room");
                    last_full_warning = Some(Instant::now());
                }
                loop {
                    // A displaced connection closes at once and frees its slot; with nothing to
                    // displace (every slot busy or recently active), look again shortly.
                    let displaced = served.evict_quietest();
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break 'accepting,
                        p = Arc::clone(&slots).acquire_owned() => break p.expect("the connection semaphore is never closed"),
                        () = tokio::time::sleep(FULL_RETRY), if !displaced => {}
                    }
                }
            }
        };
        let guard = served.register();
        connections.spawn(connection(stream, peer, app.clone(), limits, stop_rx.clone(), permit, guard));
    }
    // Stop accepting: from here the kernel refuses new connections.
    drop(listener);
    let _ = stop_tx.send(true);
    let open = connections.len();
    let drained = tokio::time::timeout(limits.shutdown_timeout, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open,
            left = connections.len(),
            timeout_ms = limits.shutdown_timeout.as_millis() as u64,
            "http shutdown: dropping connections still busy"
        );
        connections.shutdown().await;
    }
    Ok(())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// Serves one connection until it ends, is idle for `idle_timeout`, or shutdown drains it.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
    served: ServedGuard,
) {
    let _ = stream.set_nodelay(true);
    let (activity, evict) = (Arc::clone(&served.activity), Arc::clone(&served.evict));
    let io = TokioIo::new(Tracked { inner: stream, activity: Arc::clone(&activity) });
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let in_flight = InFlight::begin(&activity);
            let app = app.clone();
            async move {
                let _in_flight = in_flight;
                if let Some(size) = head_size(&request).filter(|size| *size > limits.max_head_bytes) {
                    // hyper's buffer bound is approximate (a head that arrives in one large read
                    // passes it): the exact bound is applied here, before any handler.
                    tracing::debug!(%peer, size, "request head too large");
                    return Ok::<_, Infallible>(head_too_large(limits.max_head_bytes));
                }
                let (method, path) = (request.method().clone(), request.uri().path().to_owned());
                let response = match tokio::time::timeout(limits.request_timeout, app.oneshot(request)).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        tracing::warn!(%method, path, timeout_ms = limits.request_timeout.as_millis() as u64, "request timed out");
                        request_timeout(limits.request_timeout)
                    }
                };
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(MIN_HEAD_BYTES))
        .max_headers(MAX_HEADERS);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let watchdog = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(watchdog);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "http connection ended with an error");
                }
                return;
            }
            // The sender only ever sends `true`, and is dropped only when `serve` returns.
            _ = stop.changed(), if !stopping => {
                // Idle connections close now; a request in flight finishes, without keep-alive.
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = evict.notified() => {
                // The server is full and this connection was the quietest: dropping `conn`
                // closes the socket and frees the slot for a new one.
                tracing::debug!(%peer, "closing the quietest idle http connection to make room");
                return;
            }
            () = watchdog.as_mut() => match activity.idle_deadline(limits.idle_timeout) {
                Some(deadline) => watchdog.as_mut().reset(deadline),
                None => {
                    // Nothing in a handler, nothing moving: dropping `conn` closes the socket.
                    tracing::debug!(%peer, idle_ms = limits.idle_timeout.as_millis() as u64, "closing idle http connection");
                    return;
                }
            },
        }
    }
}

/// The bytes of `request`'s head as sent: its request line and headers (`None`: no overflow
/// possible in practice; a sum past `usize` is too large anyway).
fn head_size<B>(request: &hyper::Request<B>) -> Option<usize> {
    let line = request.method().as_str().len() + request.uri().to_string().len() + 12;
    request.headers().iter().try_fold(line, |sum, (name, value)| sum.checked_add(name.as_str().len() + value.len() + 4)).or(Some(usize::MAX))
}

fn head_too_large(limit: usize) -> Response {
    let body = serde_json::json!({"error": {
        "code": "head_too_large",
        "message": format!("the request line and headers are over {limit} bytes"),
    }});
    (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, [(header::CONTENT_TYPE, "application/json"), (header::CONNECTION, "close")], body.to_string()).into_response()
}

/// hyper refuses a read buffer below 8 KiB.
const MIN_HEAD_BYTES: usize = 8 * 1024;
/// Headers a request may carry (hyper's default, stated).
const MAX_HEADERS: usize = 100;

fn request_timeout(limit: Duration) -> Response {
    let body = serde_json::json!({"error": {
        "code": "request_timeout",
        "message": format!("the request took longer than {} ms", limit.as_millis()),
    }});
    (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// What a connection's watchdog reads: the last byte moved and the requests in handlers.
struct Activity {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last read or write that moved bytes.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity { epoch: Instant::now(), last_ms: AtomicU64::new(0), in_flight: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long no byte moved either way, when no request is in a handler.
    fn quiet_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(Instant::now().saturating_duration_since(last))
    }

    /// When to look again, or `None` if the connection has been idle for `idle_timeout`.
    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        let now = Instant::now();
        match self.quiet_for() {
            // A handler is running: `request_timeout` bounds it; look again later.
            None => Some(now + idle_timeout),
            Some(quiet) => (quiet < idle_timeout).then(|| now + (idle_timeout - quiet)),
        }
    }
}

/// Counts a request as in a handler for as long as it lives (dropped futures included).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket, recording in [`Activity`] every read or write that moves bytes.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---- DNS-rebinding guard -----------------------------------------------------------------------

/// Middleware for services running without a token file (authorization off, loopback only):
/// refuses with `403 {"error": {"code": "bad_host"}}` any request whose `Host` header or
/// absolute-form target names anything but `localhost`, `127.0.0.1` or `[::1]` (any port). A
/// page on another site whose name was rebound to 127.0.0.1 still sends its own name as `Host`,
/// so it cannot reach the unauthenticated API. A request naming no host at all (HTTP/1.0 without
/// `Host`) passes: browsers, the only clients a rebinding page can drive, always send one.
///
/// Use as `router.layer(axum::middleware::from_fn(loopback_host_only))`.
pub async fn loopback_host_only(request: Request, next: Next) -> Response {
    let header = request.headers().get(header::HOST).map(|v| v.to_str().ok());
    let target = request.uri().authority().map(|a| a.as_str());
    let ok = match (header, target) {
        (None, None) => true,
        (Some(h), t) => h.is_some_and(is_loopback_authority) && t.is_none_or(is_loopback_authority),
        (None, Some(t)) => is_loopback_authority(t),
    };
    if ok {
        return next.run(request).await;
    }
    tracing::info!(host = ?request.headers().get(header::HOST), "refused: Host is not a loopback name (authorization is off)");
    let body = serde_json::json!({"error": {
        "code": "bad_host",
        "message": "without a token file this service answers only requests for localhost, 127.0.0.1 or [::1]",
    }});
    (StatusCode::FORBIDDEN, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Whether `authority` (`host[:port]`) names the loopback interface: `localhost`, `127.0.0.1` or
/// `[::1]`, with an optional numeric port.
pub fn is_loopback_authority(authority: &str) -> bool {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, port)) => (&authority[..inner.len() + 2], port),
            None => return false,
        }
    } else {
        match authority.find(':') {
            Some(i) => authority.split_at(i),
            None => (authority, ""),
        }
    };
    let port_ok = port.is_empty() || port.strip_prefix(':').is_some_and(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    port_ok && (host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1" || host == "[::1]")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Generous bound on anything a test waits for.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn app() -> Router {
        Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    "slow"
                }),
            )
            .route(
                "/stuck",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    "never"
                }),
            )
    }

    fn limits(header_ms: u64, idle_ms: u64) -> ServeLimits {
        ServeLimits {
            max_connections: 1024,
            header_read_timeout: Duration::from_millis(header_ms),
            idle_timeout: Duration::from_millis(idle_ms),
            request_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(5),
            max_head_bytes: 64 * 1024,
        }
    }

    struct Server {
        addr: SocketAddr,
        stop: tokio::sync::oneshot::Sender<()>,
        done: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start(app: Router, limits: ServeLimits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(serve(listener, app, limits, async move {
            let _ = stopped.await;
        }));
        Server { addr, stop, done }
    }

    /// Reads one response (head and `Content-Length` body): (status, body).
    async fn read_response(stream: &mut TcpStream) -> (u16, String) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk)).await.expect("response in time").unwrap();
            assert!(n > 0, "connection closed mid-response: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
            let length: usize =
                head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())).unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk)).await.expect("body in time").unwrap();
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return (status, String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned());
        }
    }

    /// One request on a new connection.
    async fn get_with_host(addr: SocketAddr, path: &str, host: Option<&str>) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
        stream.write_all(format!("GET {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n").as_bytes()).await.unwrap();
        read_response(&mut stream).await
    }

    async fn fetch(addr: SocketAddr, path: &str) -> (u16, String) {
        get_with_host(addr, path, Some("localhost")).await
    }

    /// Waits until the server closes `stream` (EOF or reset); how long that took.
    async fn closed_within(stream: &mut TcpStream, bound: Duration) -> Duration {
        let started = Instant::now();
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(started + bound, stream.read(&mut chunk)).await {
                Err(_) => panic!("connection still open after {bound:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => continue,
            }
        }
    }

    async fn stop(server: Server) {
        let _ = server.stop.send(());
        tokio::time::timeout(PATIENCE, server.done).await.expect("serve returns after shutdown").unwrap().unwrap();
    }

    /// Sends `head` (and nothing else) on a new connection: the status answered.
    async fn send_head(addr: SocketAddr, head: &[u8]) -> u16 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The server may answer and close before it has read everything: ignore a reset.
        let _ = stream.write_all(head).await;
        read_response(&mut stream).await.0
    }

    #[test]
    fn a_heads_size_counts_its_request_line_and_every_header() {
        let request = hyper::Request::get("/x?q=abc").header("host", "localhost").header("x-a", "1234").body(()).unwrap();
        // "GET" + "/x?q=abc" + 12 (spaces, "HTTP/1.1", CRLF), then name + value + 4 per header.
        assert_eq!(head_size(&request), Some(3 + 8 + 12 + (4 + 9 + 4) + (3 + 4 + 4)));
        let response = head_too_large(64);
        assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    #[tokio::test]
    async fn huge_heads_query_strings_and_header_counts_are_refused_and_others_still_served() {
        let server = start(app(), limits(10_000, 30_000)).await;
        let big_header = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
        assert_eq!(send_head(server.addr, big_header.as_bytes()).await, 431);
        // A request line past 64 KiB: hyper answers 414 URI Too Long itself.
        let big_query = format!("GET /?q={} HTTP/1.1\r\nHost: localhost\r\n\r\n", "a".repeat(70 * 1024));
        assert_eq!(send_head(server.addr, big_query.as_bytes()).await, 414);
        // Headers that pass hyper's buffer in one read but not the bound: 431 head_too_large.
        let split = format!("GET /?q={} HTTP/1.1\r\nHost: localhost\r\nX-A: {}\r\n\r\n", "a".repeat(40 * 1024), "b".repeat(30 * 1024));
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(split.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut stream).await;
        assert!(status == 431 && (body.is_empty() || body.contains("head_too_large")), "{status} {body}");
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X-H{i}: v\r\n")).collect();
        assert_eq!(send_head(server.addr, format!("GET / HTTP/1.1\r\nHost: localhost\r\n{many}\r\n").as_bytes()).await, 431);
        // Just under the bound is served.
        let fits = format!("GET /?q={} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", "a".repeat(60 * 1024));
        assert_eq!(send_head(server.addr, fits.as_bytes()).await, 200);
        assert_eq!(fetch(server.addr, "/").await, (200, "ok".into()));
        stop(server).await;
    }

    #[tokio::test]
    async fn silent_and_half_request_clients_are_disconnected_after_the_header_timeout() {
        let server = start(app(), limits(300, 30_000)).await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut half = TcpStream::connect(server.addr).await.unwrap();
        half.write_all(b"GET / HT").await.unwrap();
        closed_within(&mut silent, Duration::from_secs(5)).await;
        closed_within(&mut half, Duration::from_secs(5)).await;
        // The server is unharmed.
        assert_eq!(fetch(server.addr, "/").await, (200, "ok".into()));
        stop(server).await;
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
        // Header timeout far away: only the idle watchdog can close this connection.
        let server = start(app(), limits(30_000, 300)).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        for _ in 0..2 {
            stream.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
            assert_eq!(read_response(&mut stream).await, (200, "ok".into()));
        }
        closed_within(&mut stream, Duration::from_secs(5)).await;
        stop(server).await;
    }

    #[tokio::test]
    async fn hypers_header_timeout_also_closes_a_kept_alive_connection_waiting_for_its_next_request() {
        // Idle watchdog far away: hyper 1.12 restarts the header clock once a response is written.
        let server = start(app(), limits(300, 30_000)).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        assert_eq!(read_response(&mut stream).await, (200, "ok".into()));
        closed_within(&mut stream, Duration::from_secs(5)).await;
        stop(server).await;
    }

    #[tokio::test]
    async fn a_slow_handler_is_not_cut_off_by_the_idle_watchdog() {
        // /slow takes 400 ms with no bytes moving; idle is 150 ms but a handler is running.
        let server = start(app(), limits(30_000, 150)).await;
        assert_eq!(fetch(server.addr, "/slow").await, (200, "slow".into()));
        stop(server).await;
    }

    #[tokio::test]
    async fn a_request_is_answered_while_300_idle_connections_are_open() {
        let server = start(app(), limits(10_000, 10_000)).await;
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(server.addr).await.unwrap());
        }
        let answered = tokio::time::timeout(Duration::from_secs(5), fetch(server.addr, "/")).await.expect("answered despite 300 idle sockets");
        assert_eq!(answered, (200, "ok".into()));
        drop(idle);
        stop(server).await;
    }

    #[tokio::test]
    async fn at_the_connection_cap_with_every_slot_busy_new_connections_wait_until_one_frees() {
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let app = {
            let release = Arc::clone(&release);
            app().route(
                "/hold",
                get(move || {
                    let release = Arc::clone(&release);
                    async move {
                        release.acquire().await.unwrap().forget();
                        "held"
                    }
                }),
            )
        };
        let server = start(app, ServeLimits { max_connections: 4, ..limits(30_000, 30_000) }).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut h = TcpStream::connect(server.addr).await.unwrap();
            h.write_all(b"GET /hold HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
            held.push(h);
        }
        let mut fifth = TcpStream::connect(server.addr).await.unwrap();
        fifth.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut byte = [0u8; 1];
        // Longer than a connection must be quiet to be displaced: a busy one never is.
        let early = tokio::time::timeout(EVICT_QUIET_AT_LEAST + Duration::from_millis(500), fifth.peek(&mut byte)).await;
        assert!(early.is_err(), "the fifth connection was served while four requests held every slot");
        // One held request finishes; its connection closes and lets the fifth in.
        release.add_permits(1);
        assert_eq!(tokio::time::timeout(PATIENCE, read_response(&mut fifth)).await.expect("served once a slot freed"), (200, "ok".into()));
        release.add_permits(3);
        drop(held);
        stop(server).await;
    }

    #[tokio::test]
    async fn at_the_connection_cap_the_quietest_idle_connection_makes_room() {
        // The header timeout is far away: only displacement can let the fifth in.
        let server = start(app(), ServeLimits { max_connections: 4, ..limits(120_000, 120_000) }).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(server.addr).await.unwrap());
        }
        tokio::time::sleep(EVICT_QUIET_AT_LEAST).await;
        let answered = tokio::time::timeout(PATIENCE, fetch(server.addr, "/")).await.expect("the fifth displaced an idle connection");
        assert_eq!(answered, (200, "ok".into()));
        // Exactly one made room: the first to have gone quiet (they all went quiet together; any
        // one of them is the quietest), and the other three are still open.
        let mut closed = 0;
        for h in &mut idle {
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), h.read(&mut byte)).await {
                closed += 1;
            }
        }
        assert_eq!(closed, 1, "one idle connection made room");
        stop(server).await;
    }

    /// Ten thousand sockets that never send a byte (issue #19, item 7) cannot keep out a client
    /// that sends its request: each new connection displaces the quietest, and the server never
    /// holds more than its limit plus one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_idle_connections_do_not_keep_out_a_client_that_sends_its_request() {
        const IDLE: usize = 10_000;
        let server = start(app(), ServeLimits { max_connections: 1024, ..limits(120_000, 120_000) }).await;
        let opened = Arc::new(AtomicUsize::new(0));
        let mut idle = JoinSet::new();
        for wave in 0..IDLE / 500 {
            for _ in 0..500 {
                let (addr, opened) = (server.addr, Arc::clone(&opened));
                idle.spawn(async move {
                    let stream = TcpStream::connect(addr).await;
                    if stream.is_ok() {
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    stream
                });
            }
            // Waves, so the listen backlog is not flooded faster than the server accepts.
            if wave % 4 == 3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut sockets = Vec::new();
        while let Some(joined) = idle.join_next().await {
            if let Ok(stream) = joined.unwrap() {
                sockets.push(stream);
            }
        }
        assert_eq!(opened.load(Ordering::Relaxed), IDLE, "every idle connection was accepted by the kernel");
        tokio::time::sleep(EVICT_QUIET_AT_LEAST).await;
        // This process holds the 10,000 client sockets; the server's side is at most its limit
        // plus the one it holds while making room (and a few descriptors of the runtime).
        let descriptors = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert!(descriptors <= IDLE + 1025 + 64, "{descriptors} descriptors open: the server kept more than its limit");
        for _ in 0..3 {
            let answered = tokio::time::timeout(PATIENCE, fetch(server.addr, "/")).await.expect("served while 10,000 idle sockets are open");
            assert_eq!(answered, (200, "ok".into()));
        }
        drop(sockets);
        stop(server).await;
    }

    #[tokio::test]
    async fn a_full_server_frees_itself_as_idle_connections_time_out() {
        let server = start(app(), ServeLimits { max_connections: 4, ..limits(300, 300) }).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(TcpStream::connect(server.addr).await.unwrap());
        }
        // The four never close their side; the server's timeouts must free the slots.
        let answered = tokio::time::timeout(PATIENCE, fetch(server.addr, "/")).await.expect("the fifth request is answered once the idle ones time out");
        assert_eq!(answered, (200, "ok".into()));
        for mut h in held {
            closed_within(&mut h, Duration::from_secs(5)).await;
        }
        stop(server).await;
    }

    #[tokio::test]
    async fn a_handler_past_the_request_timeout_gets_a_json_503() {
        let server = start(app(), ServeLimits { request_timeout: Duration::from_millis(200), ..limits(10_000, 10_000) }).await;
        let (status, body) = fetch(server.addr, "/stuck").await;
        assert_eq!(status, 503);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["code"], "request_timeout", "{body}");
        stop(server).await;
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_requests_finish_closes_idle_connections_and_returns() {
        let server = start(app(), limits(30_000, 30_000)).await;
        let addr = server.addr;
        // An idle kept-alive connection and a fresh silent one must not hold up the shutdown.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        assert_eq!(read_response(&mut kept).await, (200, "ok".into()));
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = server.stop.send(());
        assert_eq!(read_response(&mut busy).await, (200, "slow".into()));
        closed_within(&mut busy, Duration::from_secs(5)).await;
        closed_within(&mut kept, Duration::from_secs(5)).await;
        closed_within(&mut silent, Duration::from_secs(5)).await;
        tokio::time::timeout(PATIENCE, server.done).await.expect("serve returns").unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_a_stuck_request_after_the_drain_timeout() {
        let server = start(app(), ServeLimits { shutdown_timeout: Duration::from_millis(300), ..limits(30_000, 30_000) }).await;
        let mut stuck = TcpStream::connect(server.addr).await.unwrap();
        stuck.write_all(b"GET /stuck HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop(server).await;
        closed_within(&mut stuck, Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn without_a_token_file_only_loopback_host_names_are_served() {
        let app = app().layer(axum::middleware::from_fn(loopback_host_only));
        let server = start(app, limits(10_000, 10_000)).await;
        for host in ["127.0.0.1:1234", "localhost", "LOCALHOST:8080", "[::1]:8081", "127.0.0.1"] {
            assert_eq!(get_with_host(server.addr, "/", Some(host)).await, (200, "ok".into()), "{host}");
        }
        for host in ["evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.1.nip.io", "test"] {
            let (status, body) = get_with_host(server.addr, "/", Some(host)).await;
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!((status, json["error"]["code"].as_str()), (403, Some("bad_host")), "{host}");
        }
        // No Host at all (HTTP/1.0): not something a browser sends, so not a rebinding attack.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        assert_eq!(read_response(&mut stream).await, (200, "ok".into()));
        // An absolute-form target must name loopback too.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"GET http://evil.example/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        assert_eq!(read_response(&mut stream).await.0, 403);
        stop(server).await;
    }

    #[test]
    fn loopback_authorities() {
        for ok in ["localhost", "localhost:1", "127.0.0.1:65535", "[::1]", "[::1]:80", "LocalHost"] {
            assert!(is_loopback_authority(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "localhost:",
            "localhost:80x",
            "localhost:123456",
            "127.0.0.1:80:80",
            "user@localhost",
            "[::1",
            "[::2]",
            "::1",
            "127.0.0.2",
            "0.0.0.0",
            "localhost.",
            "127.0.0.1.evil.example",
        ] {
            assert!(!is_loopback_authority(bad), "{bad}");
        }
    }
}
