//! The simulation's wire: a request and its answer travel as values — not as HTTP/1.1 bytes —
//! over a connection opened with madsim (its connect is refused at once over a clogged link),
//! then carried by [`link`]s that keep madsim's per-message latency and its delay while a node is
//! cut off. The links are handed over in a round trip ([`Hello`], [`Welcome`]) before the first
//! request, as TCP's handshake comes before its first byte.
//!
//! Like an HTTP/1.1 connection, a connection carries one request at a time, and the server drops
//! the handler of a request whose client went away (hyper does so when it reads the end of the
//! stream while a request is in flight).

mod link;
pub use link::{clog_node, unclog_node};
pub use wire_faults::{set_wire_faults, wire_faults_fired, WireFaults};

mod wire_faults;

use super::TripError;
use axum::Router;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use hyper::Request;
use link::{link, Rx, Tx};
use madsim::net::{Endpoint, Receiver, Sender};
use madsim::task::NodeId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

/// What a server sends back for one request.
struct Answer {
    status: u16,
    body: Bytes,
}

/// The first message of a connection, from its client: where it is.
struct Hello {
    node: NodeId,
}

/// The server's answer to [`Hello`]: the connection's two links, made once both ends' nodes are
/// known (a message on a link waits while either is cut off).
struct Welcome {
    requests: Tx<Request<Bytes>>,
    answers: Rx<Answer>,
}

/// A bound endpoint, not yet accepting.
pub(super) type Bound = Endpoint;

/// Bind `addr`; returns the endpoint and its address.
pub(super) async fn bind(addr: SocketAddr) -> std::io::Result<(Bound, SocketAddr)> {
    let ep = Endpoint::bind(addr).await?;
    let local = ep.local_addr()?;
    Ok((ep, local))
}

/// Serve `app` on `ep` in a background task.
pub(super) fn serve<X: Clone + Send + Sync + 'static>(ep: Bound, app: Router, ext: X) {
    tokio::spawn(accept_loop(ep, app, ext));
}

/// Accepts a listener waits for at once. madsim's accept sleeps at least 1 ms (its shortest
/// sleep) before it takes a connection, so one accept at a time caps a listener at 1,000
/// connections a simulated second — a limit of the simulator, not of TCP.
const ACCEPTS: usize = 4;

async fn accept_loop<X: Clone + Send + Sync + 'static>(ep: Endpoint, app: Router, ext: X) {
    let mut accepts: FuturesUnordered<_> = (0..ACCEPTS).map(|_| accept(ep.clone())).collect();
    while let Some(accepted) = accepts.next().await {
        match accepted {
            Ok((tx, rx, peer)) => {
                tokio::spawn(serve_connection(tx, rx, app.clone(), ext.clone(), peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        accepts.push(accept(ep.clone()));
    }
}

async fn accept(ep: Endpoint) -> std::io::Result<(Sender, Receiver, SocketAddr)> {
    ep.accept1().await
}

async fn serve_connection<X: Clone + Send + Sync + 'static>(
    tx: Sender,
    mut rx: Receiver,
    app: Router,
    ext: X,
    peer: SocketAddr,
) {
    let Ok(hello) = rx.recv().await else { return };
    let Ok(hello) = hello.downcast::<Hello>() else {
        tracing::warn!("not a hello on an http connection");
        return;
    };
    let here = madsim::plugin::node();
    let (requests, mut incoming) = link(hello.node, here);
    let (answers, outgoing) = link(here, hello.node);
    let welcome = Welcome {
        requests,
        answers: outgoing,
    };
    if tx.send(Box::new(welcome)).await.is_err() {
        return;
    }
    // The rest goes over the links.
    drop((tx, rx));
    while let Some(req) = incoming.recv().await {
        let fate = wire_faults::fate(req.uri().path());
        if let Some(after) = fate.copy_after {
            // The wire delivers the request again later; nobody reads the copy's answer.
            let copy = wire_faults::copy(&req);
            let (app, ext) = (app.clone(), ext.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = super::route(app, ext, peer, copy.map(axum::body::Body::from)).await;
            });
        }
        if !fate.hold.is_zero() {
            // Held on the wire: requests on other connections overtake it.
            tokio::time::sleep(fate.hold).await;
        }
        let req = req.map(axum::body::Body::from);
        // The route's future is boxed: a connection spends most of its life waiting for its
        // next request, and inline the future made every waiting connection's task bigger,
        // which adds up in `datacenter-30k`, where each host keeps its connections
        // (docs/perf-log.md).
        // `biased`: without it `select!` draws from tokio's own thread-local generator, which
        // madsim does not seed (same seed, different runs, found by running `churn` twice).
        let resp = tokio::select! {
            biased;
            resp = Box::pin(super::route(app.clone(), ext.clone(), peer, req)) => resp,
            _ = answers.closed() => return,
        };
        let status = resp.status().as_u16();
        let body = match axum::body::to_bytes(resp.into_body(), usize::MAX).await {
            Ok(b) => b,
            Err(e) => {
                tracing::trace!(error = %e, "reading a response body failed");
                return;
            }
        };
        if answers.send(Answer { status, body }).is_err() {
            return;
        }
    }
}

/// Makes a client's connections: all of them from one local endpoint per node the client is
/// used on. madsim's `TcpStream::connect` binds an ephemeral port for every connection, which
/// costs a 1 ms sleep (madsim's shortest) and a linear search of the node's ports — measurable
/// in the 30,000-host run (docs/perf-log.md), where the management node holds a socket per
/// connection in flight. A connection's channels are its own, so connections need no port of
/// their own to be told apart.
#[derive(Default)]
pub(super) struct Connector {
    local: Mutex<HashMap<NodeId, Endpoint>>,
}

impl Connector {
    pub(super) async fn connect(&self, addr: SocketAddr) -> Result<Conn, String> {
        let node = madsim::plugin::node();
        let known = self.lock().get(&node).cloned();
        let ep = match known {
            Some(ep) => ep,
            None => {
                let ep = Endpoint::bind("0.0.0.0:0")
                    .await
                    .map_err(|e| e.to_string())?;
                self.lock().entry(node).or_insert(ep).clone()
            }
        };
        let (tx, mut rx) = ep.connect1(addr).await.map_err(|e| e.to_string())?;
        tx.send(Box::new(Hello { node }))
            .await
            .map_err(|e| e.to_string())?;
        let welcome = rx.recv().await.map_err(|e| e.to_string())?;
        let welcome = welcome
            .downcast::<Welcome>()
            .map_err(|_| "not a welcome on an http connection".to_string())?;
        Ok(Conn {
            tx: welcome.requests,
            rx: welcome.answers,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Endpoint>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One client connection.
pub(super) struct Conn {
    tx: Tx<Request<Bytes>>,
    rx: Rx<Answer>,
}

impl Conn {
    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether the connection can take a request now.
    pub(super) async fn ready(&mut self) -> bool {
        !self.tx.is_closed()
    }

    /// Send `req` and wait for the answer: status and body.
    pub(super) async fn round_trip(
        &mut self,
        req: Request<Bytes>,
    ) -> Result<(u16, Bytes), TripError> {
        // A link refuses a message only when its receiver is gone: the request never left.
        if let Err(req) = self.tx.send(req) {
            return Err(TripError::NotSent(
                Box::new(req),
                "connection closed".into(),
            ));
        }
        let answer = self
            .rx
            .recv()
            .await
            .ok_or_else(|| TripError::NoAnswer("connection closed".into()))?;
        Ok((answer.status, answer.body))
    }
}
