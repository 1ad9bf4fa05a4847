//! The event log and webhooks at the API of a real node (std build, TCP on loopback,
//! MemStore): events numbered without gaps, scoped to the caller's account, delivered to a
//! webhook receiver signed and again after the receiver failed.
#![cfg(not(madsim))]

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_core::services::webhook::{signature, H_EVENT, H_SEQ, H_SIGNATURE};
use support::Api;

const SECRET: &str = "a-webhook-secret-of-some-length";

/// (seq, topic, signature, body) of a POST answered 2xx.
type Delivery = (i64, String, String, Vec<u8>);

struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
    failing: Arc<AtomicBool>,
}

/// An endpoint that records what it is sent, or answers 503 while `failing`.
async fn receiver() -> Receiver {
    let got = Arc::new(Mutex::new(Vec::new()));
    let failing = Arc::new(AtomicBool::new(false));
    let (g, f) = (got.clone(), failing.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: axum::http::HeaderMap, body: axum::body::Bytes| {
            let (g, f) = (g.clone(), f.clone());
            async move {
                if f.load(Ordering::SeqCst) {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                let hv = |k: &str| {
                    h.get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let seq = hv(H_SEQ).parse().unwrap_or(-1);
                g.lock()
                    .unwrap()
                    .push((seq, hv(H_EVENT), hv(H_SIGNATURE), body.to_vec()));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = stratus_rt::http::Listener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}/hook", l.addr());
    l.serve(app);
    Receiver { url, got, failing }
}

async fn start() -> (Api, String) {
    let api = Api::with_admin("correct horse").await;
    let token = api.token("admin", "correct horse").await;
    (api, token)
}

/// Poll `check` every 100 ms, at most `tries` times.
async fn eventually(tries: usize, mut check: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..tries {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_numbered_without_gaps_scoped_and_delivered_to_webhooks_again_after_failures() {
    let (api, admin) = start().await;
    let r = receiver().await;
    let call = |t: &str, m: &'static str, p: String, b: Value| {
        let (t, api) = (t.to_string(), &api);
        async move { api.as_bearer(&t, m, &p, b.to_string()).await }
    };

    // A webhook for zone events; the receiver fails at first.
    let body = json!({"url": r.url, "filter": "zone.*", "secret": SECRET});
    let (s, hook) = call(&admin, "POST", "/v1/webhooks?wait=30".into(), body).await;
    assert_eq!(s, 200, "{hook}");
    let hook = hook["result"]["uuid"].as_str().unwrap().to_string();
    r.failing.store(true, Ordering::SeqCst);
    let zone = |n: &str| json!({"name": n});
    for n in ["z1", "z2"] {
        let (s, v) = call(&admin, "POST", "/v1/zones?wait=30".into(), zone(n)).await;
        assert_eq!(s, 200, "{v}");
    }
    let failed = eventually(100, async || {
        let (_, w) = call(&admin, "GET", format!("/v1/webhooks/{hook}"), json!(null)).await;
        w["attempts"].as_i64().unwrap_or(0) >= 1 && w["last_status"] == 503
    })
    .await;
    assert!(failed, "the failing receiver was not retried");
    r.failing.store(false, Ordering::SeqCst);
    let (s, v) = call(&admin, "POST", "/v1/zones?wait=30".into(), zone("z3")).await;
    assert_eq!(s, 200, "{v}");

    // Every zone event arrives (at least once), signed, in order.
    let all = eventually(150, async || {
        let got = r.got.lock().unwrap();
        got.iter().map(|g| g.0).collect::<BTreeSet<_>>().len() == 3
    })
    .await;
    assert!(all, "the webhook did not get the three zone events");
    {
        let got = r.got.lock().unwrap();
        let mut last = 0;
        for (seq, topic, sig, body) in got.iter() {
            assert_eq!(topic, "zone.created");
            assert_eq!(*sig, signature(SECRET, body), "bad signature");
            let e: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(e["seq"], *seq);
            assert!(*seq >= last, "out of order: {seq} after {last}");
            last = *seq;
        }
    }
    let (_, w) = call(&admin, "GET", format!("/v1/webhooks/{hook}"), json!(null)).await;
    assert!(w.get("secret").is_none(), "the secret is shown: {w}");
    assert_eq!(w["attempts"], 0, "{w}");

    // The log: 1, 2, 3, … without gaps; each zone created once; jobs started and finished.
    let (s, v) = call(&admin, "GET", "/v1/events?sort=seq".into(), json!(null)).await;
    assert_eq!(s, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    for (i, e) in items.iter().enumerate() {
        assert_eq!(e["seq"], i as i64 + 1, "a gap at {e}");
    }
    let topics: Vec<&str> = items.iter().map(|e| e["topic"].as_str().unwrap()).collect();
    let n = |t: &str| topics.iter().filter(|x| **x == t).count();
    assert_eq!(n("zone.created"), 3);
    let zone_seqs: BTreeSet<i64> = items
        .iter()
        .filter(|e| e["topic"] == "zone.created")
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    let delivered: BTreeSet<i64> = r.got.lock().unwrap().iter().map(|g| g.0).collect();
    assert_eq!(
        delivered, zone_seqs,
        "the webhook got other events than the zones'"
    );
    assert_eq!(n("webhook.created"), 1);
    assert_eq!(n("job.started"), 4);
    assert_eq!(n("job.finished"), 4);

    // The log's position and the webhooks' backlog are metrics.
    let h = format!("Bearer {admin}");
    let m = api
        .http
        .get(
            api.node.addr,
            "/metrics",
            &[("authorization", &h)],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&m.body);
    let seq_line = format!("stratus_event_seq {}", items.len());
    assert!(
        text.lines().any(|l| l == seq_line),
        "{seq_line} not in\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("stratus_webhook_backlog ")),
        "{text}"
    );

    // Another account sees its own events only; an admin's is not found.
    let (s, acc) = call(
        &admin,
        "POST",
        "/v1/accounts?wait=30".into(),
        json!({"name": "t"}),
    )
    .await;
    assert_eq!(s, 200, "{acc}");
    let acc = acc["result"]["uuid"].as_str().unwrap().to_string();
    let user = json!({"name": "tu", "account_uuid": acc, "password": "tenant password"});
    let (s, v) = call(&admin, "POST", "/v1/users?wait=30".into(), user).await;
    assert_eq!(s, 200, "{v}");
    let tenant = api.token("tu", "tenant password").await;
    let body = json!({"url": r.url, "secret": SECRET});
    let (s, v) = call(&tenant, "POST", "/v1/webhooks?wait=30".into(), body).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(&tenant, "GET", "/v1/events".into(), json!(null)).await;
    assert_eq!(s, 200, "{v}");
    let mine = v["items"].as_array().unwrap();
    assert!(!mine.is_empty());
    assert!(
        mine.iter().all(|e| e["account_uuid"] == acc.as_str()),
        "{v}"
    );
    let foreign = items[0]["uuid"].as_str().unwrap();
    let (s, _) = call(&tenant, "GET", format!("/v1/events/{foreign}"), json!(null)).await;
    assert_eq!(s, 404);

    // Bad input is a 4xx with a code.
    let sse = |q: &'static str| {
        let h = format!("Bearer {admin}");
        let api = &api;
        async move {
            let hs = [
                ("authorization", h.as_str()),
                ("accept", "text/event-stream"),
            ];
            api.call("GET", q, &hs, "").await
        }
    };
    for q in [
        "/v1/events?after=-1",
        "/v1/events?filter=a%20b",
        "/v1/events?x=1",
    ] {
        let (s, v) = sse(q).await;
        assert_eq!(s, 400, "{q}: {v}");
        assert_eq!(v["code"], "invalid_argument", "{q}: {v}");
    }
    let (s, v) = call(&admin, "POST", "/v1/events".into(), json!({})).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_argument")));
    for bad in [
        json!({"url": "ftp://x", "secret": SECRET}),
        json!({"url": r.url, "secret": "short"}),
        json!({"url": r.url, "secret": SECRET, "filter": "a b"}),
        json!({"url": r.url, "secret": SECRET, "colour": "red"}),
    ] {
        let (s, v) = call(&admin, "POST", "/v1/webhooks?wait=30".into(), bad.clone()).await;
        assert_eq!(s, 400, "{bad}: {v}");
    }
}
