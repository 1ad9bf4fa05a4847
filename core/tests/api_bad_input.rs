//! Bad input at every endpoint of a real node (std build, TCP on loopback, MemStore): malformed
//! JSON, unknown fields, wrong types, a body over the limit, a bad uuid, a bad condition, an
//! unknown parameter, SQL-looking text — each a 4xx with `{code, message}`, never a 5xx, and
//! nothing written.
#![cfg(not(madsim))]

use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use stratus_core::api::RESOURCE_PATHS;
use stratus_core::auth::ADMIN;
use stratus_core::node::{ManagementNode, NodeConfig};
use stratus_rt::http::HttpClient;
use stratus_store::{MemStore, Query, Store};
use uuid::Uuid;

struct Api {
    http: HttpClient,
    node: ManagementNode,
    store: Arc<dyn Store>,
    auth: String,
}

impl Api {
    async fn start() -> Api {
        let store: Arc<dyn Store> = Arc::new(MemStore::new(stratus_core::model::schema()));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let cfg = NodeConfig::new(Uuid::from_u128(1), ([127, 0, 0, 1], port).into());
        let node = ManagementNode::start(store.clone(), cfg).await.unwrap();
        let auth = &node.cloud.auth;
        auth.bootstrap_admin(None).await.unwrap();
        let t = auth
            .issue_for(ADMIN, Duration::from_secs(600), "test")
            .await
            .unwrap();
        Api {
            http: HttpClient::new(4),
            node,
            store,
            auth: format!("Bearer {}", t.token),
        }
    }

    async fn call(&self, method: &str, path: &str, body: impl Into<bytes::Bytes>) -> (u16, Value) {
        let h = [("authorization", self.auth.as_str())];
        let r = self
            .http
            .request(
                method,
                self.node.addr,
                path,
                &h,
                body,
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    /// Rows of every kind.
    async fn rows(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (_, kind) in RESOURCE_PATHS {
            let n = self.store.count(&Query::new(*kind)).await.unwrap();
            out.push((kind.to_string(), n));
        }
        out
    }
}

/// A refusal: a 4xx with a code and a message.
fn refused(what: &str, (status, v): (u16, Value)) -> String {
    assert!((400..500).contains(&status), "{what}: HTTP {status} {v}");
    let code = v["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no code in {v}"));
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    code.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refuses_bad_input_with_a_code_and_writes_nothing() {
    let api = Api::start().await;
    let before = api.rows().await;
    let big = vec![b' '; stratus_core::api::BODY_LIMIT + 1];
    for (path, _) in RESOURCE_PATHS {
        let create = format!("/v1/{path}");
        for (what, body) in [
            ("malformed JSON", &b"{\"name\": "[..]),
            ("not an object", b"[1, 2]"),
            (
                "an unknown field",
                b"{\"name\": \"x\", \"colour\": \"red\"}",
            ),
            ("a wrong type", b"{\"name\": 7}"),
        ] {
            let code = refused(
                &format!("POST {create}: {what}"),
                api.call("POST", &create, body).await,
            );
            assert!(
                matches!(code.as_str(), "invalid_argument" | "not_found"),
                "POST {create}: {what}: {code}"
            );
        }
        let code = refused(
            &format!("POST {create} too large"),
            api.call("POST", &create, big.clone()).await,
        );
        assert_eq!(code, "too_large");
        for bad in [
            "not-a-uuid",
            "' OR 1=1 --",
            "00000000-0000-0000-0000-00000000000g",
        ] {
            let enc = stratus_core::client::encode(bad);
            for method in ["GET", "PUT", "DELETE"] {
                let r = api.call(method, &format!("/v1/{path}/{enc}"), "{}").await;
                assert_eq!(
                    refused(&format!("{method} {path}/{bad}"), r),
                    "invalid_argument"
                );
            }
            let r = api
                .call("POST", &format!("/v1/{path}/{enc}/actions/start"), "{}")
                .await;
            refused(&format!("action on {path}/{bad}"), r);
        }
        for q in [
            "q=name",
            "q=%3Dx",
            "q=nosuchfield%3D1",
            "q=",
            "limit=-1",
            "limit=x",
            "colour=red",
            "sort=nosuchfield",
        ] {
            let r = api.call("GET", &format!("/v1/{path}?{q}"), "").await;
            assert_eq!(refused(&format!("GET {path}?{q}"), r), "invalid_argument");
        }
    }
    // Actions with bodies they do not take.
    let vm = Uuid::from_u128(77);
    for body in ["{\"force\": \"yes\"}", "{\"colour\": 1}", "{"] {
        let r = api
            .call("POST", &format!("/v1/vms/{vm}/actions/stop"), body)
            .await;
        assert_eq!(refused(body, r), "invalid_argument");
    }
    let r = api
        .call(
            "PUT",
            "/v1/config/host.ping.interval",
            "{\"value\": \"30s\", \"x\": 1}",
        )
        .await;
    assert_eq!(
        refused("config with an unknown field", r),
        "invalid_argument"
    );
    assert_eq!(
        api.rows().await,
        before,
        "a refused request wrote something"
    );

    // SQL-looking text is text: a name is kept as given, a condition matches nothing.
    let name = "z'; DROP TABLE r_zone; --";
    let body = serde_json::json!({ "name": name }).to_string();
    let (s, v) = api.call("POST", "/v1/zones?wait=30", body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["result"]["name"], name);
    let q = stratus_core::client::encode(&format!("name={name}"));
    let (s, v) = api.call("GET", &format!("/v1/zones?q={q}"), "").await;
    assert_eq!((s, v["items"].as_array().map(Vec::len)), (200, Some(1)));
    let q = stratus_core::client::encode("name=' OR '1'='1");
    let (s, v) = api.call("GET", &format!("/v1/zones?q={q}"), "").await;
    assert_eq!((s, v["items"].as_array().map(Vec::len)), (200, Some(0)));
}
