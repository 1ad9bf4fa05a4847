//! Bad input at every endpoint of a real node (std build, TCP on loopback, MemStore): malformed
//! JSON, unknown fields, wrong types, a body over the limit, a bad uuid, a bad condition, an
//! unknown parameter, SQL-looking text — each a 4xx with `{code, message}`, never a 5xx, and
//! nothing written.
#![cfg(not(madsim))]

mod support;

use serde_json::Value;
use std::time::Duration;
use stratus_core::api::RESOURCE_PATHS;
use stratus_core::auth::ADMIN;
use stratus_store::Query;
use uuid::Uuid;

/// A node and an admin token.
struct Admin {
    api: support::Api,
    token: String,
}

impl Admin {
    async fn start() -> Admin {
        let api = support::Api::start().await;
        let auth = &api.node.cloud.auth;
        auth.bootstrap_admin(None).await.unwrap();
        let ttl = Duration::from_secs(600);
        let token = auth.issue_for(ADMIN, ttl, "test").await.unwrap().token;
        Admin { api, token }
    }

    async fn call(&self, method: &str, path: &str, body: impl AsRef<[u8]>) -> (u16, Value) {
        self.api.as_bearer(&self.token, method, path, body).await
    }

    /// Rows of every kind.
    async fn rows(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (_, kind) in RESOURCE_PATHS {
            let n = self.api.store.count(&Query::new(*kind)).await.unwrap();
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
    let api = Admin::start().await;
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
