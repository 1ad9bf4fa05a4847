use super::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicUsize;

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}
impl Message for Add {
    type Reply = i64;
    const NAME: &'static str = "test.add";
}

#[derive(Debug, Serialize, Deserialize)]
struct Slow {
    ms: u64,
}
impl Message for Slow {
    type Reply = ();
    const NAME: &'static str = "test.slow";
}

#[derive(Debug, Serialize, Deserialize)]
struct Boom;
impl Message for Boom {
    type Reply = ();
    const NAME: &'static str = "test.boom";
}

#[derive(Debug, Serialize, Deserialize)]
struct Routed(Uuid);
impl Message for Routed {
    type Reply = NodeId;
    const NAME: &'static str = "test.routed";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.0)
    }
}

fn bus() -> Bus {
    Bus::new(Uuid::from_u128(1), Duration::from_secs(5))
}

#[tokio::test]
async fn reply_reaches_the_caller() {
    let b = bus();
    b.register(|m: Add| async move { Ok(m.a + m.b) }).unwrap();
    assert_eq!(b.send(Add { a: 2, b: 3 }).await.unwrap(), 5);
    assert!(
        b.register(|m: Add| async move { Ok(m.a) }).is_err(),
        "double registration refused"
    );
}

#[tokio::test]
async fn missing_handler_is_a_coded_error() {
    let err = bus().send(Add { a: 1, b: 1 }).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoHandler);
}

#[tokio::test]
async fn timeout_is_reported_and_the_handler_still_finishes() {
    let b = bus();
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    b.register(move |m: Slow| {
        let d = d.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(m.ms)).await;
            d.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
    .unwrap();
    let err = b
        .send_timeout(Slow { ms: 200 }, Duration::from_millis(20))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Timeout);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(done.load(Ordering::SeqCst), 1, "handler ran to completion");
    assert_eq!(b.stats().timeouts.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn panicking_handler_answers_with_an_internal_error() {
    let b = bus();
    b.register(|_: Boom| async move {
        if true {
            panic!("kaboom");
        }
        Ok(())
    })
    .unwrap();
    let err = b.send(Boom).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Internal);
    assert!(err.message.contains("kaboom"), "{}", err.message);
    // The bus still works afterwards.
    b.register(|m: Add| async move { Ok(m.a * m.b) }).unwrap();
    assert_eq!(b.send(Add { a: 4, b: 5 }).await.unwrap(), 20);
}

#[tokio::test]
async fn routed_messages_go_to_the_owner_and_fail_cleanly_without_a_transport() {
    let b = bus();
    let me = b.node();
    b.register(move |_: Routed| async move { Ok(me) }).unwrap();
    let key = Uuid::from_u128(99);
    assert_eq!(b.send(Routed(key)).await.unwrap(), me);
    // A second node joins; keys it owns cannot be delivered without a transport.
    let other = Uuid::from_u128(2);
    b.set_members([other]);
    let theirs = (0..1000u128)
        .map(Uuid::from_u128)
        .find(|k| b.owner(k) == other)
        .unwrap();
    let err = b.send(Routed(theirs)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NodeUnavailable);
    let mine = (0..1000u128)
        .map(Uuid::from_u128)
        .find(|k| b.owns(k))
        .unwrap();
    assert_eq!(b.send(Routed(mine)).await.unwrap(), me);
}

struct Loopback(Bus);

#[async_trait]
impl Transport for Loopback {
    async fn call(
        &self,
        _node: NodeId,
        name: &str,
        body: Vec<u8>,
        job: Option<Uuid>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        self.0.handle_remote(name, &body, job, timeout).await
    }
    async fn forward_event(&self, _node: NodeId, event: Arc<Event>) {
        self.0.deliver_event(event);
    }
}

#[tokio::test]
async fn remote_delivery_serializes_through_the_transport() {
    let a = bus();
    let b = Bus::new(Uuid::from_u128(2), Duration::from_secs(5));
    let bn = b.node();
    b.register(move |_: Routed| async move { Ok(bn) }).unwrap();
    a.set_members([bn]);
    a.set_transport(Arc::new(Loopback(b.clone())));
    let theirs = (0..1000u128)
        .map(Uuid::from_u128)
        .find(|k| a.owner(k) == bn)
        .unwrap();
    assert_eq!(a.send(Routed(theirs)).await.unwrap(), bn);
    assert_eq!(a.stats().remote.load(Ordering::Relaxed), 1);
    // Events published on a reach b's subscribers too.
    let mut sub = b.subscribe("/vm/**").unwrap();
    a.publish("/vm/state/change", || serde_json::json!({"x": 1}));
    let e = tokio::time::timeout(Duration::from_secs(1), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.path, "/vm/state/change");
    assert_eq!(e.node, a.node());
}

#[tokio::test]
async fn events_reach_matching_subscribers_only() {
    let b = bus();
    let mut vm = b.subscribe("/vm/state/*").unwrap();
    let mut all = b.subscribe("/**").unwrap();
    let mut host = b.subscribe("/host/**").unwrap();
    assert!(b.subscribe("vm").is_err());
    b.publish(
        "/vm/state/change",
        || serde_json::json!({"state": "Running"}),
    );
    b.publish("/host/status/change", || serde_json::json!({}));
    assert_eq!(vm.try_recv().unwrap().data["state"], "Running");
    assert!(vm.try_recv().is_none());
    assert_eq!(all.try_recv().unwrap().path, "/vm/state/change");
    assert_eq!(all.try_recv().unwrap().path, "/host/status/change");
    assert_eq!(host.try_recv().unwrap().path, "/host/status/change");
    drop(host);
    assert_eq!(b.subscriptions(), 2);
    // Nobody hears a volume event: it is counted but never built.
    drop(all);
    let before = b.stats().events.load(Ordering::Relaxed);
    b.publish("/volume/stray", || {
        panic!("an event nobody hears was built")
    });
    assert_eq!(b.stats().events.load(Ordering::Relaxed), before + 1);
    assert!(vm.try_recv().is_none());
}
