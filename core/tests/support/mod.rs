//! A real node on loopback (MemStore, a port the system chooses) for the std-build API tests,
//! and a plain HTTP client to talk to it.
// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use stratus_core::node::{ManagementNode, NodeConfig};
use stratus_rt::http::HttpClient;
use stratus_store::{MemStore, Store};
use uuid::Uuid;

pub struct Api {
    pub http: HttpClient,
    pub node: ManagementNode,
    pub store: Arc<dyn Store>,
}

impl Api {
    pub async fn start() -> Api {
        let store: Arc<dyn Store> = Arc::new(MemStore::new(stratus_core::model::schema()));
        let cfg = NodeConfig::new(Uuid::from_u128(1), "127.0.0.1:0".parse().unwrap());
        let node = ManagementNode::start(store.clone(), cfg).await.unwrap();
        Api {
            http: HttpClient::new(4),
            node,
            store,
        }
    }

    /// One request; the status and the body as JSON (`null` when it is not).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&'static str, &str)],
        body: impl AsRef<[u8]>,
    ) -> (u16, Value) {
        let body = bytes::Bytes::copy_from_slice(body.as_ref());
        let r = self
            .http
            .request(
                method,
                self.node.addr,
                path,
                headers,
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

    /// [`Api::call`] with `token` as the bearer.
    pub async fn as_bearer(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: impl AsRef<[u8]>,
    ) -> (u16, Value) {
        let h = format!("Bearer {token}");
        self.call(method, path, &[("authorization", &h)], body)
            .await
    }

    /// A node whose admin has `password`.
    pub async fn with_admin(password: &str) -> Api {
        let api = Api::start().await;
        assert!(api
            .node
            .cloud
            .auth
            .bootstrap_admin(Some(password))
            .await
            .unwrap());
        api
    }

    /// `POST /v1/auth/login` as it answers.
    pub async fn login(&self, user: &str, password: &str) -> (u16, Value) {
        let body = serde_json::json!({"user": user, "password": password}).to_string();
        self.call("POST", "/v1/auth/login", &[], body).await
    }

    /// A token of `user`, or a panic with the answer.
    pub async fn token(&self, user: &str, password: &str) -> String {
        let (s, v) = self.login(user, password).await;
        assert_eq!(s, 200, "login of {user}: {v}");
        v["token"].as_str().unwrap().to_string()
    }
}

/// The error code of an answer (empty when it has none).
pub fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}
