//! CloudBus: typed request/reply messages and published events.
//!
//! - [`Bus::send`] delivers a [`Message`] to the one handler registered for its name. A message
//!   about a resource (`routing_key`) goes to the management node that owns the resource on the
//!   consistent-hash ring; the others run on the local node. Local delivery hands the value over
//!   without serializing; remote delivery goes through a [`Transport`] as JSON.
//! - Exactly one of reply / timeout / error reaches the caller. The handler runs in its own task,
//!   so it finishes even when the caller has given up; a handler that panics or is dropped is
//!   answered with an `internal` error.
//! - [`Bus::publish`] sends an [`Event`] to every subscription whose path glob matches.

mod glob;

pub use glob::glob_match;

use crate::error::{Error, ErrorCode};
use crate::hashring::{HashRing, NodeId, DEFAULT_VNODES};
use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// A typed request with a typed reply.
pub trait Message: Serialize + DeserializeOwned + Send + 'static {
    type Reply: Serialize + DeserializeOwned + Send + 'static;
    /// Unique name, e.g. `vm.start`.
    const NAME: &'static str;
    /// The resource this message acts on; routes the message to the node that owns it.
    fn routing_key(&self) -> Option<Uuid> {
        None
    }
}

/// Delivery to another management node.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Deliver a serialized message to `node` for `job` (the sender's, which the handler
    /// works for there), wait at most `timeout` for the serialized reply.
    async fn call(
        &self,
        node: NodeId,
        name: &str,
        body: Vec<u8>,
        job: Option<Uuid>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Error>;
    /// Forward an event to `node` (best effort).
    async fn forward_event(&self, node: NodeId, event: Arc<Event>);
}

/// A published event: a path such as `/vm/state/change` and a JSON payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub path: String,
    pub data: serde_json::Value,
    /// The node that published it.
    pub node: NodeId,
    pub at_ms: i64,
}

type BoxAny = Box<dyn Any + Send>;

trait ErasedHandler: Send + Sync {
    fn call_local(&self, msg: BoxAny) -> BoxFuture<'static, Result<BoxAny, Error>>;
    fn call_json(&self, body: &[u8]) -> Result<BoxFuture<'static, Result<Vec<u8>, Error>>, Error>;
}

struct Typed<M, F> {
    f: F,
    _m: PhantomData<fn(M)>,
}

impl<M, F, Fut> ErasedHandler for Typed<M, F>
where
    M: Message,
    F: Fn(M) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<M::Reply, Error>> + Send + 'static,
{
    fn call_local(&self, msg: BoxAny) -> BoxFuture<'static, Result<BoxAny, Error>> {
        match msg.downcast::<M>() {
            Ok(m) => (self.f)(*m)
                .map(|r| r.map(|v| Box::new(v) as BoxAny))
                .boxed(),
            Err(_) => async move {
                Err(Error::internal(format!(
                    "message type mismatch for {}",
                    M::NAME
                )))
            }
            .boxed(),
        }
    }

    fn call_json(&self, body: &[u8]) -> Result<BoxFuture<'static, Result<Vec<u8>, Error>>, Error> {
        let m: M = serde_json::from_slice(body)
            .map_err(|e| Error::invalid(format!("cannot decode {}: {e}", M::NAME)))?;
        Ok((self.f)(m)
            .map(|r| {
                r.and_then(|v| {
                    serde_json::to_vec(&v)
                        .map_err(|e| Error::internal(format!("cannot encode reply: {e}")))
                })
            })
            .boxed())
    }
}

struct Subscription {
    pattern: String,
    tx: mpsc::UnboundedSender<Arc<Event>>,
}

/// Counters for `/metrics` and reports.
#[derive(Debug, Default)]
pub struct BusStats {
    pub sent: AtomicU64,
    pub remote: AtomicU64,
    pub timeouts: AtomicU64,
    pub panics: AtomicU64,
    pub events: AtomicU64,
}

struct Inner {
    node: NodeId,
    default_timeout: Duration,
    handlers: RwLock<HashMap<&'static str, Arc<dyn ErasedHandler>>>,
    ring: RwLock<HashRing>,
    transport: RwLock<Option<Arc<dyn Transport>>>,
    subs: RwLock<Vec<Subscription>>,
    stats: BusStats,
}

/// A management node's bus. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

/// A subscription's receiving end. Dropping it ends the subscription.
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Arc<Event>>,
}

impl EventStream {
    pub async fn recv(&mut self) -> Option<Arc<Event>> {
        self.rx.recv().await
    }
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        self.rx.try_recv().ok()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// The text of a panic payload.
pub fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl Bus {
    /// A bus for node `node`, alone on its ring until [`Bus::set_members`] says otherwise.
    pub fn new(node: NodeId, default_timeout: Duration) -> Self {
        Bus {
            inner: Arc::new(Inner {
                node,
                default_timeout,
                handlers: RwLock::new(HashMap::new()),
                ring: RwLock::new(HashRing::with_nodes(DEFAULT_VNODES, [node])),
                transport: RwLock::new(None),
                subs: RwLock::new(Vec::new()),
                stats: BusStats::default(),
            }),
        }
    }

    pub fn node(&self) -> NodeId {
        self.inner.node
    }

    pub fn stats(&self) -> &BusStats {
        &self.inner.stats
    }

    /// Register the handler for message type `M`. Registering twice is a bug and is refused.
    pub fn register<M, F, Fut>(&self, f: F) -> Result<(), Error>
    where
        M: Message,
        F: Fn(M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Reply, Error>> + Send + 'static,
    {
        let mut h = write(&self.inner.handlers);
        if h.contains_key(M::NAME) {
            return Err(Error::internal(format!(
                "a handler for {} is already registered",
                M::NAME
            )));
        }
        h.insert(M::NAME, Arc::new(Typed { f, _m: PhantomData }));
        Ok(())
    }

    pub fn set_transport(&self, t: Arc<dyn Transport>) {
        *write(&self.inner.transport) = Some(t);
    }

    /// Replace the ring's members (this node is always a member while it runs).
    pub fn set_members(&self, nodes: impl IntoIterator<Item = NodeId>) {
        let mut ring = HashRing::new(DEFAULT_VNODES);
        ring.add(self.inner.node);
        for n in nodes {
            ring.add(n);
        }
        *write(&self.inner.ring) = ring;
    }

    pub fn members(&self) -> Vec<NodeId> {
        read(&self.inner.ring).nodes()
    }

    /// The node that owns resource `uuid`.
    pub fn owner(&self, uuid: &Uuid) -> NodeId {
        read(&self.inner.ring)
            .owner(uuid)
            .unwrap_or(self.inner.node)
    }

    pub fn owns(&self, uuid: &Uuid) -> bool {
        self.owner(uuid) == self.inner.node
    }

    /// Send with the bus's default timeout.
    pub async fn send<M: Message>(&self, msg: M) -> Result<M::Reply, Error> {
        self.send_timeout(msg, self.inner.default_timeout).await
    }

    /// Send and wait at most `timeout` for the reply.
    pub async fn send_timeout<M: Message>(
        &self,
        msg: M,
        timeout: Duration,
    ) -> Result<M::Reply, Error> {
        self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
        let target = msg
            .routing_key()
            .map_or(self.inner.node, |k| self.owner(&k));
        let out = if target == self.inner.node {
            self.deliver_local(msg, timeout).await
        } else {
            self.deliver_remote(target, msg, timeout).await
        };
        if let Err(e) = &out {
            if e.code == ErrorCode::Timeout {
                self.inner.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            }
        }
        out
    }

    fn handler(&self, name: &str) -> Result<Arc<dyn ErasedHandler>, Error> {
        read(&self.inner.handlers)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::new(ErrorCode::NoHandler, format!("no handler for {name}")))
    }

    /// Run a handler future in its own task and return a receiver for its (panic-safe) result.
    fn spawn_handler<T: Send + 'static>(
        &self,
        name: &'static str,
        fut: BoxFuture<'static, Result<T, Error>>,
    ) -> oneshot::Receiver<Result<T, Error>> {
        let (tx, rx) = oneshot::channel();
        let bus = self.clone();
        tokio::spawn(async move {
            let res = match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(r) => r,
                Err(p) => {
                    bus.inner.stats.panics.fetch_add(1, Ordering::Relaxed);
                    let msg = panic_message(p.as_ref());
                    tracing::error!(message = name, panic = %msg, "bus handler panicked");
                    Err(Error::internal(format!(
                        "handler for {name} panicked: {msg}"
                    )))
                }
            };
            let _ = tx.send(res);
        });
        rx
    }

    async fn await_reply<T>(
        name: &str,
        rx: oneshot::Receiver<Result<T, Error>>,
        timeout: Duration,
    ) -> Result<T, Error> {
        match stratus_rt::deadline::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::internal(format!(
                "handler for {name} was dropped without replying"
            ))),
            Err(_) => Err(Error::timeout(format!(
                "{name}: no reply within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    async fn deliver_local<M: Message>(
        &self,
        msg: M,
        timeout: Duration,
    ) -> Result<M::Reply, Error> {
        let h = self.handler(M::NAME)?;
        // The handler works for the sender's job (the remote transport carries it too).
        let call = crate::job::scoped(crate::job::current(), h.call_local(Box::new(msg)));
        let rx = self.spawn_handler(M::NAME, Box::pin(call));
        let reply = Self::await_reply(M::NAME, rx, timeout).await?;
        reply
            .downcast::<M::Reply>()
            .map(|b| *b)
            .map_err(|_| Error::internal(format!("reply type mismatch for {}", M::NAME)))
    }

    async fn deliver_remote<M: Message>(
        &self,
        node: NodeId,
        msg: M,
        timeout: Duration,
    ) -> Result<M::Reply, Error> {
        self.inner.stats.remote.fetch_add(1, Ordering::Relaxed);
        let transport = read(&self.inner.transport).clone().ok_or_else(|| {
            Error::new(
                ErrorCode::NodeUnavailable,
                format!("no transport to reach node {node}"),
            )
        })?;
        let body = serde_json::to_vec(&msg)
            .map_err(|e| Error::internal(format!("cannot encode {}: {e}", M::NAME)))?;
        let reply = transport
            .call(node, M::NAME, body, crate::job::current(), timeout)
            .await?;
        serde_json::from_slice(&reply)
            .map_err(|e| Error::internal(format!("cannot decode reply to {}: {e}", M::NAME)))
    }

    /// Entry point for a message that arrived from another node (the transport's server
    /// side), worked on for the sender's `job`.
    pub async fn handle_remote(
        &self,
        name: &str,
        body: &[u8],
        job: Option<Uuid>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        let h = self.handler(name)?;
        let fut = Box::pin(crate::job::scoped(job, h.call_json(body)?));
        let name: &'static str = read(&self.inner.handlers)
            .get_key_value(name)
            .map(|(k, _)| *k)
            .unwrap_or("remote message");
        let rx = self.spawn_handler(name, fut);
        Self::await_reply(name, rx, timeout).await
    }

    /// Subscribe to events whose path matches `pattern` (`*` matches within one path segment,
    /// `**` matches any number of segments).
    pub fn subscribe(&self, pattern: &str) -> Result<EventStream, Error> {
        if !pattern.starts_with('/') {
            return Err(Error::invalid(format!(
                "event pattern {pattern:?} must start with '/'"
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        write(&self.inner.subs).push(Subscription {
            pattern: pattern.to_string(),
            tx,
        });
        Ok(EventStream { rx })
    }

    /// Publish an event to local subscribers (and, through the transport, to other nodes).
    /// `data` is called only when somebody hears the event.
    pub fn publish(&self, path: &str, data: impl FnOnce() -> serde_json::Value) {
        // The transport and the other nodes it reaches, if any (without a transport the ring
        // is not even read).
        let peers = read(&self.inner.transport).clone().and_then(|t| {
            let others: Vec<NodeId> = self
                .members()
                .into_iter()
                .filter(|n| *n != self.inner.node)
                .collect();
            (!others.is_empty()).then_some((t, others))
        });
        let heard = |s: &Subscription| !s.tx.is_closed() && glob_match(&s.pattern, path);
        if peers.is_none() && !read(&self.inner.subs).iter().any(heard) {
            // Nobody here or elsewhere hears it: count it, and skip building it (a VM's every
            // state change publishes one, and on one node nothing subscribes to those).
            self.inner.stats.events.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let event = Arc::new(Event {
            path: path.to_string(),
            data: data(),
            node: self.inner.node,
            at_ms: stratus_rt::clock::now_ms(),
        });
        self.deliver_event(event.clone());
        if let Some((t, others)) = peers {
            tokio::spawn(async move {
                for n in others {
                    t.forward_event(n, event.clone()).await;
                }
            });
        }
    }

    /// Hand an event to the local subscriptions (also used for events forwarded by peers).
    pub fn deliver_event(&self, event: Arc<Event>) {
        self.inner.stats.events.fetch_add(1, Ordering::Relaxed);
        let mut dead = false;
        for s in read(&self.inner.subs).iter() {
            if glob_match(&s.pattern, &event.path) && s.tx.send(event.clone()).is_err() {
                dead = true;
            }
        }
        if dead {
            write(&self.inner.subs).retain(|s| !s.tx.is_closed());
        }
    }

    /// Number of live subscriptions.
    pub fn subscriptions(&self) -> usize {
        let mut subs = write(&self.inner.subs);
        subs.retain(|s| !s.tx.is_closed());
        subs.len()
    }
}

#[cfg(test)]
mod tests;
