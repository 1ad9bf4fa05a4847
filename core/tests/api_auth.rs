//! Authentication at the API of a real node (std build, TCP on loopback, MemStore): who may
//! reach what, and how a bad credential is answered.
#![cfg(not(madsim))]

mod support;

use serde_json::json;
use std::time::Duration;
use stratus_core::auth::ADMIN;
use support::{code, Api};
use uuid::Uuid;

async fn start() -> Api {
    Api::with_admin("correct horse").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_but_health_login_and_agents_needs_a_valid_token() {
    let api = start().await;
    assert_eq!(api.call("GET", "/v1/health", &[], "").await.0, 200);
    for path in [
        "/v1/zones",
        "/v1/config",
        "/metrics",
        "/v1/auth/whoami",
        "/nowhere",
    ] {
        let (s, v) = api.call("GET", path, &[], "").await;
        assert_eq!((s, code(&v)), (401, "unauthorized"), "{path}");
    }
    let forged = "ab".repeat(32);
    for t in [forged.as_str(), "short", "", "' OR 1=1 --"] {
        let (s, v) = api.as_bearer(t, "GET", "/v1/zones", "").await;
        assert_eq!((s, code(&v)), (401, "unauthorized"), "{t:?}");
    }
    // An agent's token is not a user's.
    let (s, _) = api
        .call(
            "GET",
            "/v1/zones",
            &[("x-stratus-token", "agent-secret")],
            "",
        )
        .await;
    assert_eq!(s, 401);

    let (s, v) = api.login(ADMIN, "wrong password").await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    let (s, v) = api.login("nobody", "correct horse").await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    for bad in [
        "{",
        "[]",
        r#"{"user": "admin"}"#,
        r#"{"user": "admin", "password": "correct horse", "admin": true}"#,
        r#"{"user": 7, "password": "correct horse"}"#,
    ] {
        let (s, v) = api.call("POST", "/v1/auth/login", &[], bad).await;
        assert_eq!((s, code(&v)), (400, "invalid_argument"), "{bad}");
    }

    let (s, v) = api.login(ADMIN, "correct horse").await;
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let (s, me) = api.as_bearer(&token, "GET", "/v1/auth/whoami", "").await;
    assert_eq!((s, me["admin"].as_bool()), (200, Some(true)));
    assert_eq!(api.as_bearer(&token, "GET", "/metrics", "").await.0, 200);
    // The store keeps only the token's hash, and the API shows neither.
    let rows = api
        .store
        .query(&stratus_store::Query::new("api_token"))
        .await
        .unwrap();
    let hashes: Vec<String> = rows
        .iter()
        .map(|r| r.decode("token_hash").unwrap())
        .collect();
    assert!(
        hashes.contains(&stratus_core::auth::token_hash(&token)),
        "{hashes:?}"
    );
    assert!(!hashes.contains(&token));
    let (s, list) = api.as_bearer(&token, "GET", "/v1/api-tokens", "").await;
    assert_eq!(s, 200);
    let text = list.to_string();
    assert!(
        !text.contains(&token) && !text.contains("token_hash"),
        "{text}"
    );
    let (_, users) = api.as_bearer(&token, "GET", "/v1/users", "").await;
    assert!(!users.to_string().contains("argon2"), "{users}");

    // A user's token opens nothing on the agents' endpoints; the host's own token does.
    use stratus_core::model::{Host, HostState, HostStatus};
    let host = Uuid::from_u128(9);
    let row = stratus_store::Row::new(
        host,
        Host {
            name: "h".into(),
            zone_uuid: Uuid::from_u128(10),
            cluster_uuid: Uuid::from_u128(11),
            address: "127.0.0.1:1".into(),
            token: "agent-secret".into(),
            state: HostState::Enabled,
            status: HostStatus::Connected,
            hypervisor: None,
            cpu_cores: 1,
            memory_mib: 1,
            disk_mib: 1,
            cpu_used: 0,
            memory_used_mib: 0,
            ping_failures: 0,
            last_seen_ms: None,
        },
    );
    stratus_store::Db::new(api.store.clone())
        .insert(row)
        .await
        .unwrap();
    let h = format!("Bearer {token}");
    let report = json!({"host_uuid": host, "event": "host_stopping"}).to_string();
    let (s, v) = api
        .call(
            "POST",
            "/agent/report",
            &[("x-stratus-token", "agent-secret")],
            &report,
        )
        .await;
    assert_eq!(s, 200, "the host's own token: {v}");
    let (s, v) = api
        .call(
            "POST",
            "/agent/report",
            &[("authorization", &h), ("x-stratus-token", &token)],
            &report,
        )
        .await;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "a user token: {v}");

    // Logged out: the token ends.
    assert_eq!(
        api.as_bearer(&token, "POST", "/v1/auth/logout", "").await.0,
        200
    );
    assert_eq!(api.as_bearer(&token, "GET", "/v1/zones", "").await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_and_a_plain_account_reaches_only_its_session() {
    let api = start().await;
    let auth = &api.node.cloud.auth;
    let expired = auth.issue_for(ADMIN, Duration::ZERO, "test").await.unwrap();
    let (s, v) = api.as_bearer(&expired.token, "GET", "/v1/zones", "").await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    // Expired tokens are deleted; live ones stay.
    let admin = auth
        .issue_for(ADMIN, Duration::from_secs(600), "test")
        .await
        .unwrap()
        .token;
    assert_eq!(auth.purge_expired().await.unwrap(), 1);
    assert_eq!(api.as_bearer(&admin, "GET", "/v1/zones", "").await.0, 200);

    let (s, acct) = api
        .as_bearer(
            &admin,
            "POST",
            "/v1/accounts?wait=30",
            r#"{"name": "tenant"}"#,
        )
        .await;
    assert_eq!(s, 200, "{acct}");
    let acct = acct["result"]["uuid"].as_str().unwrap().to_string();
    let short = json!({"name": "bob", "account_uuid": acct, "password": "short"}).to_string();
    let (s, v) = api
        .as_bearer(&admin, "POST", "/v1/users?wait=30", &short)
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_argument"));
    let user = json!({"name": "bob", "account_uuid": acct, "password": "bob's long password"});
    let (s, v) = api
        .as_bearer(&admin, "POST", "/v1/users?wait=30", &user.to_string())
        .await;
    assert_eq!(s, 200, "{v}");

    let (s, v) = api.login("bob", "bob's long password").await;
    assert_eq!(s, 200, "{v}");
    let bob = v["token"].as_str().unwrap();
    let (s, me) = api.as_bearer(bob, "GET", "/v1/auth/whoami", "").await;
    assert_eq!((s, me["admin"].as_bool()), (200, Some(false)));
    assert_eq!(me["account_uuid"], acct);
    for (method, path) in [
        ("GET", "/v1/zones"),
        ("GET", "/v1/users"),
        ("POST", "/v1/accounts"),
    ] {
        let (s, v) = api.as_bearer(bob, method, path, "{}").await;
        assert_eq!((s, code(&v)), (403, "forbidden"), "{method} {path}");
    }
}
