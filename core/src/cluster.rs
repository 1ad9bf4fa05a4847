//! Management nodes talking to each other: the bus's remote delivery over HTTP, the same HTTP
//! layer (`stratus-rt`) the agents use, so it runs on both wires (real TCP, and madsim's).
//!
//! - `POST /cluster/bus/{name}`: a message for a resource this node owns; the body is the
//!   message as JSON, the answer its reply as JSON (or the coded error). The sender's job id
//!   travels in [`H_JOB`], so work done here is the job's as it would be on the sender.
//! - `POST /cluster/event`: an event published on another node, for the subscribers here.
//!
//! Both are authenticated with the cluster's shared secret ([`H_CLUSTER`]); a request without
//! it is refused, and user or agent tokens open nothing here.

use crate::bus::{Bus, Event, Transport};
use crate::error::{Error, ErrorCode};
use crate::hashring::NodeId;
use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use stratus_rt::http::{header, HttpClient, HttpError, TakeHeaders};
use uuid::Uuid;

/// The cluster's shared secret.
pub const H_CLUSTER: &str = "x-stratus-cluster";
/// The job a message works for.
pub const H_JOB: &str = "x-stratus-job";
/// How long the sender waits for the reply (milliseconds): the handler gets as long.
pub const H_TIMEOUT: &str = "x-stratus-timeout-ms";

/// The HTTP transport of one node: where its peers listen, and the secret they share.
pub struct HttpTransport {
    client: HttpClient,
    secret: String,
    peers: RwLock<HashMap<NodeId, SocketAddr>>,
}

impl HttpTransport {
    pub fn new(secret: impl Into<String>) -> Self {
        HttpTransport {
            client: HttpClient::new(8),
            secret: secret.into(),
            peers: RwLock::default(),
        }
    }

    /// Where `node` listens (its API address).
    pub fn set_peer(&self, node: NodeId, addr: SocketAddr) {
        self.peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, addr);
    }

    pub fn forget_peer(&self, node: NodeId) {
        self.peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node);
    }

    fn peer(&self, node: NodeId) -> Result<SocketAddr, Error> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .copied()
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::NodeUnavailable,
                    format!("no address for node {node}"),
                )
            })
    }
}

/// The answer of a peer that is not a reply: its coded error, or one saying what came back.
fn peer_error(status: u16, body: &[u8]) -> Error {
    serde_json::from_slice::<Error>(body).unwrap_or_else(|_| {
        Error::new(
            ErrorCode::NodeUnavailable,
            format!(
                "a peer answered {status}: {}",
                String::from_utf8_lossy(body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        )
    })
}

#[async_trait]
impl Transport for HttpTransport {
    async fn call(
        &self,
        node: NodeId,
        name: &str,
        body: Vec<u8>,
        job: Option<Uuid>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        let addr = self.peer(node)?;
        let job = job.map(|j| j.to_string());
        let ms = timeout.as_millis().to_string();
        let mut headers = vec![(H_CLUSTER, self.secret.as_str()), (H_TIMEOUT, ms.as_str())];
        if let Some(j) = &job {
            headers.push((H_JOB, j.as_str()));
        }
        // The peer answers within `timeout`; the wire gets a second more.
        let r = self
            .client
            .post(
                addr,
                &format!("/cluster/bus/{name}"),
                &headers,
                body,
                timeout + Duration::from_secs(1),
            )
            .await
            .map_err(|e| match e {
                HttpError::Timeout(..) => Error::timeout(format!("node {node}: {e}")),
                other => Error::new(ErrorCode::NodeUnavailable, format!("node {node}: {other}")),
            })?;
        if r.is_success() {
            Ok(r.body.to_vec())
        } else {
            Err(peer_error(r.status, &r.body))
        }
    }

    async fn forward_event(&self, node: NodeId, event: Arc<Event>) {
        let Ok(addr) = self.peer(node) else { return };
        let Ok(body) = serde_json::to_vec(&*event) else {
            return;
        };
        let headers = [(H_CLUSTER, self.secret.as_str())];
        if let Err(e) = self
            .client
            .post(
                addr,
                "/cluster/event",
                &headers,
                body,
                Duration::from_secs(5),
            )
            .await
        {
            tracing::debug!(%node, error = %e, path = %event.path, "an event did not reach a peer");
        }
    }
}

#[derive(Clone)]
struct Server {
    bus: Bus,
    secret_hash: Arc<[u8; 32]>,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Server {
    /// Compared as digests: equal length, no early exit on the secret's bytes.
    fn admits(&self, headers: &axum::http::HeaderMap) -> Result<(), Error> {
        match header(headers, H_CLUSTER) {
            Some(s) if digest(s) == *self.secret_hash => Ok(()),
            _ => Err(Error::new(
                ErrorCode::Unauthorized,
                "missing or wrong cluster secret",
            )),
        }
    }
}

/// The routes a node serves its peers, on its API listener.
pub fn routes(bus: Bus, secret: &str) -> Router {
    let server = Server {
        bus,
        secret_hash: Arc::new(digest(secret)),
    };
    Router::new()
        .route("/cluster/bus/{name}", post(bus_call))
        .route("/cluster/event", post(event))
        .with_state(server)
}

async fn bus_call(
    State(s): State<Server>,
    Path(name): Path<String>,
    TakeHeaders(headers): TakeHeaders,
    body: Bytes,
) -> Response {
    if let Err(e) = s.admits(&headers) {
        return crate::api::error(&e);
    }
    let job = header(&headers, H_JOB).and_then(|j| Uuid::parse_str(j).ok());
    let timeout = header(&headers, H_TIMEOUT)
        .and_then(|t| t.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(30));
    match s.bus.handle_remote(&name, &body, job, timeout).await {
        Ok(reply) => (
            axum::http::StatusCode::OK,
            [("content-type", "application/json")],
            reply,
        )
            .into_response(),
        Err(e) => crate::api::error(&e),
    }
}

async fn event(
    State(s): State<Server>,
    TakeHeaders(headers): TakeHeaders,
    body: Bytes,
) -> Response {
    if let Err(e) = s.admits(&headers) {
        return crate::api::error(&e);
    }
    match serde_json::from_slice::<Event>(&body) {
        Ok(ev) => {
            s.bus.deliver_event(Arc::new(ev));
            axum::http::StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => crate::api::error(&Error::invalid(format!("bad event: {e}"))),
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;
    use crate::bus::Message;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct WhoHandles {
        key: Uuid,
    }
    impl Message for WhoHandles {
        type Reply = (NodeId, Option<Uuid>);
        const NAME: &'static str = "test.who_handles";
        fn routing_key(&self) -> Option<Uuid> {
            Some(self.key)
        }
    }

    async fn node(id: u128, secret: &str) -> (Bus, Arc<HttpTransport>, SocketAddr) {
        let node = Uuid::from_u128(id);
        let bus = Bus::new(node, Duration::from_secs(5));
        bus.register(move |_: WhoHandles| async move { Ok((node, crate::job::current())) })
            .unwrap();
        let t = Arc::new(HttpTransport::new(secret));
        bus.set_transport(t.clone());
        let addr = stratus_rt::http::spawn_server(
            "127.0.0.1:0".parse().unwrap(),
            routes(bus.clone(), secret),
        )
        .await
        .unwrap();
        (bus, t, addr)
    }

    #[tokio::test]
    async fn a_message_reaches_its_owner_with_its_job_and_events_reach_every_node() {
        let (a, ta, addr_a) = node(1, "s3cret").await;
        let (b, tb, addr_b) = node(2, "s3cret").await;
        let (ids_a, ids_b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for (bus, t) in [(&a, &ta), (&b, &tb)] {
            bus.set_members([ids_a, ids_b]);
            t.set_peer(ids_a, addr_a);
            t.set_peer(ids_b, addr_b);
        }
        // A key the ring gives to b, sent from a, under a job.
        let key = (0u128..)
            .map(Uuid::from_u128)
            .find(|k| a.owner(k) == ids_b)
            .unwrap();
        let job = Uuid::from_u128(77);
        let (handler, seen_job) = crate::job::scoped(Some(job), a.send(WhoHandles { key }))
            .await
            .expect("delivered");
        assert_eq!(handler, ids_b, "the owner handled it");
        assert_eq!(seen_job, Some(job), "the job went with it");
        assert!(a.stats().remote.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        // A message nobody handles comes back as the owner's coded error.
        #[derive(Serialize, Deserialize)]
        struct Nobody {
            key: Uuid,
        }
        impl Message for Nobody {
            type Reply = ();
            const NAME: &'static str = "test.nobody";
            fn routing_key(&self) -> Option<Uuid> {
                Some(self.key)
            }
        }
        let e = a.send(Nobody { key }).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NoHandler, "{e}");
        // Events published on a reach b's subscribers.
        let mut sub = b.subscribe("/test/**").unwrap();
        a.publish("/test/ping", || serde_json::json!({"n": 1}));
        let ev = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("in time")
            .expect("an event");
        assert_eq!((ev.path.as_str(), ev.node), ("/test/ping", ids_a));
    }

    #[tokio::test]
    async fn a_wrong_secret_opens_nothing() {
        let (a, ta, _) = node(1, "right").await;
        let (_b, _, addr_b) = node(2, "other").await;
        let ids_b = Uuid::from_u128(2);
        a.set_members([ids_b]);
        ta.set_peer(ids_b, addr_b);
        let key = (0u128..)
            .map(Uuid::from_u128)
            .find(|k| a.owner(k) == ids_b)
            .unwrap();
        let e = a.send(WhoHandles { key }).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized, "{e}");
    }
}
