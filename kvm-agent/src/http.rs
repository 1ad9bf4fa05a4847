//! HTTP/1.1 plumbing that works in both builds: hyper at the connection level over `tokio::net`
//! streams (simulated under madsim), with an axum `Router` as the service, our own accept loop
//! and a small keep-alive client pool. (`axum::serve` and `reqwest` do not run under madsim.)

use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Serve `app` on `listener` until the task is dropped. Each connection gets its own task, and
/// each request carries a clone of `ext` as an extension (so one router can serve many servers).
pub async fn serve<X: Clone + Send + Sync + 'static>(listener: TcpListener, app: Router, ext: X) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (app, ext) = (app.clone(), ext.clone());
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ext.clone());
            app.clone().oneshot(req)
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(FlushOnWrite::new(stream)), svc);
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "http connection ended with an error");
            }
        });
    }
}

/// Bind `addr` and serve `app` in a background task; returns the bound address.
pub async fn spawn_server(addr: SocketAddr, app: Router) -> std::io::Result<SocketAddr> {
    spawn_server_with(addr, app, ()).await
}

/// [`spawn_server`] with `ext` added to every request (see [`serve`]).
pub async fn spawn_server_with<X: Clone + Send + Sync + 'static>(
    addr: SocketAddr,
    app: Router,
    ext: X,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, app, ext));
    Ok(local)
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

type Sender = SendRequest<Full<Bytes>>;

/// Idle keep-alive connections are closed after this long unused (as `reqwest` does after its
/// pool idle timeout), unless the client was made with [`HttpClient::with_idle_timeout`]. It is
/// shorter than the default ping interval (60 s), so a host that is only pinged holds no
/// connection between pings: in the 30,000-host simulation idle connections were a third of the
/// memory.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Idle {
    /// Per address, the idle connections with the time each was put back (newest last).
    conns: HashMap<SocketAddr, Vec<(Sender, tokio::time::Instant)>>,
    /// The reaper task, while it runs (it also ends when the node running it is killed).
    reaper: Option<tokio::task::JoinHandle<()>>,
}

struct Pool {
    idle: Mutex<Idle>,
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
        idle.conns.retain(|_, list| {
            list.retain(|(s, at)| now.duration_since(*at) < every && !s.is_closed());
            !list.is_empty()
        });
        if idle.conns.is_empty() {
            // Under the lock: a connection put back from now on starts a new reaper.
            idle.reaper = None;
            return;
        }
    }
}

/// A keep-alive HTTP/1.1 client. Cheap to clone; connections are reused per address and closed
/// after [`IDLE_TIMEOUT`] (or the client's own idle timeout) unused.
#[derive(Clone)]
pub struct HttpClient {
    pool: Arc<Pool>,
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
                max_idle_per_host,
                idle_timeout,
            }),
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<Sender> {
        let mut idle = self.pool.lock();
        let list = idle.conns.get_mut(&addr)?;
        while let Some((s, _)) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, addr: SocketAddr, s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.pool.lock();
        let list = idle.conns.entry(addr).or_default();
        if list.len() < self.pool.max_idle_per_host {
            list.push((s, tokio::time::Instant::now()));
        }
        if idle.reaper.as_ref().is_none_or(|h| h.is_finished()) {
            let every = self.pool.idle_timeout;
            idle.reaper = Some(tokio::spawn(reap(Arc::downgrade(&self.pool), every)));
        }
    }

    /// Drop the idle connections to `addr` (after it restarted, say).
    pub fn forget(&self, addr: SocketAddr) {
        self.pool.lock().conns.remove(&addr);
    }

    /// Idle connections kept (all addresses).
    pub fn idle_connections(&self) -> usize {
        self.pool.lock().conns.values().map(Vec::len).sum()
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Sender, HttpError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| HttpError::Connect(addr, e.to_string()))?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(FlushOnWrite::new(stream)))
                .await
                .map_err(|e| HttpError::Connect(addr, e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "http client connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn send(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<HttpResponse, HttpError> {
        let mut sender = match self.take_idle(addr) {
            Some(s) => s,
            None => self.connect(addr).await?,
        };
        if sender.ready().await.is_err() {
            sender = self.connect(addr).await?;
        }
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| HttpError::Request(addr, e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| HttpError::Request(addr, e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| HttpError::Request(addr, e.to_string()))?
            .to_bytes();
        self.put_idle(addr, sender);
        Ok(HttpResponse { status, body })
    }

    /// One request with an overall timeout (connect, send and read the whole body).
    pub async fn request(
        &self,
        method: &str,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
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
        headers: &[(&str, &str)],
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
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        self.request("GET", addr, path, headers, Bytes::new(), timeout)
            .await
    }

    /// POST to a full `http://IP:PORT/PATH` URL.
    pub async fn post_url(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        let (addr, path) = parse_url(url)?;
        self.post(addr, &path, headers, body, timeout).await
    }
}

/// A stream whose flush does nothing when nothing was written since the last one.
///
/// madsim's simulated `TcpStream` sends a message on every flush, also an empty one, and an
/// empty message wakes the peer, whose hyper connection flushes in turn: two idle keep-alive
/// connections would ping-pong empty messages for as long as the simulation runs (measured:
/// most of the wall time of an idle simulated datacenter). Real sockets flush nothing then too,
/// so the wrapper is harmless in the std build.
struct FlushOnWrite<S> {
    inner: S,
    dirty: bool,
}

impl<S> FlushOnWrite<S> {
    fn new(inner: S) -> Self {
        FlushOnWrite {
            inner,
            dirty: false,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FlushOnWrite<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FlushOnWrite<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.dirty = true;
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.dirty {
            return std::task::Poll::Ready(Ok(()));
        }
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, std::task::Poll::Ready(Ok(()))) {
            self.dirty = false;
        }
        r
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_and_path() {
        let (a, p) = parse_url("http://10.0.0.1:8080/agent/callback/x").unwrap();
        assert_eq!(a, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(p, "/agent/callback/x");
        assert_eq!(parse_url("http://10.0.0.1:80").unwrap().1, "/");
        assert!(parse_url("https://10.0.0.1:80/").is_err());
        assert!(parse_url("http://host.example:80/").is_err());
    }
}
