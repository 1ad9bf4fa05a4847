//! HTTP plumbing that runs in both builds: an axum `Router` as the service, our own accept loop
//! and a small keep-alive client pool. What carries the requests is the one part that differs
//! (`axum::serve` and `reqwest` do not run under madsim):
//! - std build ([`tcp`]): HTTP/1.1 by hyper at the connection level over `tokio::net` streams;
//! - simulation ([`sim`]): the `http::Request` and the answer themselves, as values, over a
//!   connection madsim opens (refused at once over a clogged link), with madsim's per-message
//!   latency and its delay while a node is cut off ([`clog_node`]) — without encoding them to
//!   bytes and parsing them back. In the 30,000-host run hyper was a large part of the
//!   profile (docs/perf-log.md), and the bytes it parses under simulation are the ones it
//!   wrote itself; the std build's tests run the real HTTP/1.1 path.

use axum::Router;
use bytes::Bytes;
use hyper::Request;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

#[cfg(madsim)]
mod sim;
#[cfg(madsim)]
use sim as wire;
#[cfg(madsim)]
pub use sim::{clog_node, set_wire_faults, unclog_node, wire_faults_fired, WireFaults};
#[cfg(not(madsim))]
mod tcp;
#[cfg(not(madsim))]
use tcp as wire;

/// Bind `addr` and serve `app` in a background task until the node stops; returns the bound
/// address. Each connection gets its own task.
pub async fn spawn_server(addr: SocketAddr, app: Router) -> std::io::Result<SocketAddr> {
    spawn_server_with(addr, app, ()).await
}

/// [`spawn_server`] with a clone of `ext` added to every request as an extension (so one router
/// can serve many servers).
pub async fn spawn_server_with<X: Clone + Send + Sync + 'static>(
    addr: SocketAddr,
    app: Router,
    ext: X,
) -> std::io::Result<SocketAddr> {
    let listener = Listener::bind(addr).await?;
    let local = listener.addr();
    listener.serve_with(app, ext);
    Ok(local)
}

/// A bound address whose server is not running yet: what it is (port 0 chosen by the system)
/// is known before the app that will serve it is made — a management node tells agents its
/// address when it builds its services.
pub struct Listener {
    bound: wire::Bound,
    addr: SocketAddr,
}

impl Listener {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
        let (bound, addr) = wire::bind(addr).await?;
        Ok(Listener { bound, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve `app` in a background task until the node stops.
    pub fn serve(self, app: Router) {
        self.serve_with(app, ());
    }

    /// [`Listener::serve`] with a clone of `ext` added to every request as an extension.
    pub fn serve_with<X: Clone + Send + Sync + 'static>(self, app: Router, ext: X) {
        wire::serve(self.bound, app, ext);
    }
}

/// The address a request came from: an extension of every request a server takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Run one request through `app`, with `ext` and the [`PeerAddr`] added as extensions.
async fn route<X: Clone + Send + Sync + 'static>(
    app: Router,
    ext: X,
    peer: SocketAddr,
    mut req: Request<axum::body::Body>,
) -> axum::response::Response {
    req.extensions_mut().insert(ext);
    req.extensions_mut().insert(PeerAddr(peer));
    match app.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// The text of header `name`, when it is there and is text.
pub fn header<'a>(h: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Handler argument: the request's headers, moved out of it. axum's own `HeaderMap` argument
/// copies them (an allocation for the map and one for every header value made at run time);
/// the handlers here only read them. An argument after this one sees no headers, so it goes
/// last among the arguments that read the request's parts (`Bytes`, the body, may follow).
pub struct TakeHeaders(pub hyper::HeaderMap);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for TakeHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut hyper::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(TakeHeaders(std::mem::take(&mut parts.headers)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("no answer from {0} within {1} ms")]
    Timeout(SocketAddr, u128),
    #[error("request to {0} failed: {1}")]
    Request(SocketAddr, String),
    #[error("bad url {0:?}: expected http://IP:PORT/PATH")]
    BadUrl(String),
}

/// Why a connection's round trip failed.
#[derive(Debug)]
pub(super) enum TripError {
    /// The connection was found closed before the request was written, which is given back: no
    /// server saw it.
    NotSent(Box<Request<Bytes>>, String),
    /// The request left (or may have), and the connection failed before any answer came back.
    NoAnswer(String),
    /// An answer began and broke off (HTTP/1.1 only: under simulation an answer is one value).
    #[cfg_attr(madsim, allow(dead_code))]
    Broken(String),
}

impl std::fmt::Display for TripError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TripError::NotSent(_, e) | TripError::NoAnswer(e) | TripError::Broken(e) => {
                f.write_str(e)
            }
        }
    }
}

/// The header that makes any request safe to send twice: its server acts on one key once.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Whether sending a request twice does what sending it once does: an idempotent method (RFC
/// 9110, 9.2.2), or a key that makes a repeat harmless — [`IDEMPOTENCY_KEY`], or the client's
/// own replay key (see [`HttpClient::with_replay_key`]).
fn replayable(method: &str, headers: &[(&'static str, &str)], replay_key: Option<&str>) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
    ) || (headers.iter()).any(|(k, _)| *k == IDEMPOTENCY_KEY || Some(*k) == replay_key)
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Idle keep-alive connections are closed after this long unused (as `reqwest` does after its
/// pool idle timeout), unless the client was made with [`HttpClient::with_idle_timeout`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

struct Idle<C = wire::Conn> {
    /// Per address, the idle connections with the time each was put back (oldest first: a
    /// connection is put back last and taken from the back).
    conns: HashMap<SocketAddr, Vec<(C, tokio::time::Instant)>>,
    /// Every put-back in time order, so the reaper finds what expired without visiting every
    /// address: walking the whole map at every reap showed in profiles of the 30,000-host run,
    /// where the management node holds connections to a few hundred hosts at any moment. An
    /// entry whose connection was taken again finds nothing to close.
    order: VecDeque<(tokio::time::Instant, SocketAddr)>,
    /// The reaper task, while it runs (it also ends when the node running it is killed).
    reaper: Option<tokio::task::JoinHandle<()>>,
}

impl<C> Default for Idle<C> {
    fn default() -> Self {
        Idle {
            conns: HashMap::new(),
            order: VecDeque::new(),
            reaper: None,
        }
    }
}

impl<C> Idle<C> {
    /// Close the connections put back at or before `cutoff`.
    fn close_older(&mut self, cutoff: tokio::time::Instant) {
        while let Some(&(at, addr)) = self.order.front() {
            if at > cutoff {
                break;
            }
            self.order.pop_front();
            if let Some(list) = self.conns.get_mut(&addr) {
                let old = list.partition_point(|(_, t)| *t <= at);
                list.drain(..old);
                if list.is_empty() {
                    self.conns.remove(&addr);
                }
            }
        }
    }
}

struct Pool {
    idle: Mutex<Idle>,
    connector: wire::Connector,
    max_idle_per_host: usize,
    idle_timeout: Duration,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes connections idle for longer than the pool's idle timeout; ends when the pool is empty
/// or gone.
async fn reap(pool: std::sync::Weak<Pool>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = tokio::time::Instant::now();
        let mut idle = pool.lock();
        if let Some(cutoff) = now.checked_sub(every) {
            idle.close_older(cutoff);
        }
        if idle.conns.is_empty() {
            // Under the lock: a connection put back from now on starts a new reaper.
            idle.order.clear();
            idle.reaper = None;
            return;
        }
    }
}

/// A request to `addr`, its header map allocated once at its final size. Header names are
/// `'static` (the protocol's constants), so they are used as they are instead of being copied
/// into every request — and into every copy of its headers.
fn build_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&'static str, &str)],
    body: Bytes,
) -> Result<Request<Bytes>, hyper::http::Error> {
    use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
    let mut map = HeaderMap::with_capacity(headers.len() + 2);
    map.insert(HOST, HeaderValue::try_from(addr.to_string())?);
    map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in headers {
        map.append(HeaderName::from_static(k), HeaderValue::from_str(v)?);
    }
    let mut req = Request::builder().method(method).uri(path).body(body)?;
    *req.headers_mut() = map;
    Ok(req)
}

/// A keep-alive HTTP/1.1 client. Cheap to clone; connections are reused per address and closed
/// after [`IDLE_TIMEOUT`] (or the client's own idle timeout) unused.
#[derive(Clone)]
pub struct HttpClient {
    pool: Arc<Pool>,
    /// A header besides [`IDEMPOTENCY_KEY`] under which a repeat is harmless.
    replay_key: Option<&'static str>,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient::new(4)
    }
}

/// Split `http://IP:PORT/PATH` into the address and the path.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String), HttpError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HttpError::BadUrl(url.to_string()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .parse::<SocketAddr>()
        .map_err(|_| HttpError::BadUrl(url.to_string()))?;
    Ok((addr, path.to_string()))
}

impl HttpClient {
    pub fn new(max_idle_per_host: usize) -> Self {
        Self::with_idle_timeout(max_idle_per_host, IDLE_TIMEOUT)
    }

    /// A client whose idle connections close after `idle_timeout` instead of [`IDLE_TIMEOUT`].
    pub fn with_idle_timeout(max_idle_per_host: usize, idle_timeout: Duration) -> Self {
        HttpClient {
            pool: Arc::new(Pool {
                idle: Mutex::new(Idle::default()),
                connector: wire::Connector::default(),
                max_idle_per_host,
                idle_timeout,
            }),
            replay_key: None,
        }
    }

    /// This client also sends a request carrying `header` once more when its kept connection
    /// turns out closed: a protocol whose server runs one value of that header once however
    /// often it comes, and hands a finished one's result back again (the agent protocol's task
    /// id).
    pub fn with_replay_key(mut self, header: &'static str) -> Self {
        self.replay_key = Some(header);
        self
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<wire::Conn> {
        let mut idle = self.pool.lock();
        let list = idle.conns.get_mut(&addr)?;
        while let Some((s, _)) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, addr: SocketAddr, s: wire::Conn) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.pool.lock();
        let list = idle.conns.entry(addr).or_default();
        if list.len() < self.pool.max_idle_per_host {
            let now = tokio::time::Instant::now();
            list.push((s, now));
            idle.order.push_back((now, addr));
        }
        if idle.reaper.as_ref().is_none_or(|h| h.is_finished()) {
            let every = self.pool.idle_timeout;
            idle.reaper = Some(tokio::spawn(reap(Arc::downgrade(&self.pool), every)));
        }
    }

    /// Idle connections kept (all addresses). One its server closed counts until the reaper
    /// reaches it; it is never handed out.
    pub fn idle_connections(&self) -> usize {
        self.pool.lock().conns.values().map(Vec::len).sum()
    }

    async fn send(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&'static str, &str)],
        body: Bytes,
    ) -> Result<HttpResponse, HttpError> {
        let connect = |addr| async move {
            self.pool
                .connector
                .connect(addr)
                .await
                .map_err(|e| HttpError::Connect(addr, e))
        };
        let (mut conn, mut kept) = match self.take_idle(addr) {
            Some(c) => (c, true),
            None => (connect(addr).await?, false),
        };
        if !conn.ready().await {
            conn = connect(addr).await?;
            kept = false;
        }
        // A kept connection can turn out closed by its server (an agent restarted) only as the
        // request goes. Then the request goes once more on a new connection when that is safe,
        // as Go's HTTP client does: when it never left, or when it left but a repeat is harmless
        // and nothing came back. A copy of the body is kept for that (a reference count).
        let spare = (kept && replayable(method, headers, self.replay_key)).then(|| body.clone());
        let build = |body| {
            build_request(addr, method, path, headers, body)
                .map_err(|e| HttpError::Request(addr, e.to_string()))
        };
        let failed = |e: TripError| HttpError::Request(addr, e.to_string());
        let (status, body) = match conn.round_trip(build(body)?).await {
            Ok(answer) => answer,
            Err(e) => {
                let why = e.to_string();
                let req = match e {
                    TripError::NotSent(req, _) if kept => *req,
                    TripError::NoAnswer(_) if spare.is_some() => build(spare.unwrap_or_default())?,
                    e => return Err(failed(e)),
                };
                tracing::debug!(%addr, error = %why, "kept connection closed; sending again on a new one");
                conn = connect(addr).await?;
                conn.round_trip(req).await.map_err(failed)?
            }
        };
        self.put_idle(addr, conn);
        Ok(HttpResponse { status, body })
    }

    /// One request with an overall timeout (connect, send and read the whole body).
    pub async fn request(
        &self,
        method: &str,
        addr: SocketAddr,
        path: &str,
        headers: &[(&'static str, &str)],
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        match crate::deadline::timeout(timeout, self.send(addr, method, path, headers, body.into()))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(addr, timeout.as_millis())),
        }
    }

    pub async fn post(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&'static str, &str)],
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        self.request("POST", addr, path, headers, body, timeout)
            .await
    }

    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&'static str, &str)],
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        self.request("GET", addr, path, headers, Bytes::new(), timeout)
            .await
    }

    /// POST to a full `http://IP:PORT/PATH` URL.
    pub async fn post_url(
        &self,
        url: &str,
        headers: &[(&'static str, &str)],
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        let (addr, path) = parse_url(url)?;
        self.post(addr, &path, headers, body, timeout).await
    }
}

#[cfg(test)]
mod tests;
