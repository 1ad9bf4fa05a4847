//! The OpenAPI document: the checked-in `openapi.json` is the one the code makes (a golden
//! file), and every operation it documents is one the router takes — and none it leaves out.
#![cfg(not(madsim))]

mod support;

use serde_json::json;
use stratus_core::api::openapi::{document, document_text, ACTIONS, CREATES, UPDATES};
use stratus_core::api::{RESOURCE_PATHS, UNDELETABLE};
use support::Api;

#[test]
fn the_checked_in_document_is_the_one_the_code_makes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.json");
    let made = document_text();
    if std::env::var_os("STRATUS_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &made).unwrap();
    }
    let kept = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        kept == made,
        "openapi.json is stale: run `STRATUS_UPDATE_OPENAPI=1 cargo test -p stratus-core --test api_openapi` \
         (or `stratus openapi > openapi.json`) and commit it"
    );
}

#[test]
fn the_document_names_every_kind_error_code_and_action() {
    let d = document();
    let schemas = d["components"]["schemas"].as_object().unwrap();
    for (path, _) in RESOURCE_PATHS {
        assert!(
            d["paths"][format!("/v1/{path}")]["get"].is_object(),
            "{path}"
        );
    }
    assert!(schemas.contains_key("Vm") && schemas.contains_key("CreateVm"));
    assert!(!schemas["User"]["properties"]
        .as_object()
        .unwrap()
        .contains_key("password_hash"));
    let codes = schemas["Error"]["properties"]["code"]["enum"]
        .as_array()
        .unwrap();
    assert!(codes.contains(&json!("quota_exceeded")));
    for (p, a, _, _) in ACTIONS {
        assert!(d["paths"][format!("/v1/{p}/{{id}}/actions/{a}")]["post"].is_object());
    }
}

/// Whether the router answered as for a path it does not have.
fn unrouted(v: &serde_json::Value) -> bool {
    v["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("no such API path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_every_other_is_refused() {
    let api = Api::with_admin("pw for tests").await;
    let token = api.token("admin", "pw for tests").await;
    let nobody = uuid::Uuid::from_u128(7);
    let d = document();
    // An empty body: a create or update that exists answers about the body, never as an
    // unknown path; one that does not exist says it cannot.
    for (path, _) in RESOURCE_PATHS {
        let creates = CREATES.iter().any(|(p, _)| p == path);
        let (s, v) = api
            .as_bearer(&token, "POST", &format!("/v1/{path}"), "{}")
            .await;
        assert_eq!(s, 400, "POST /v1/{path}: {v}");
        let msg = v["message"].as_str().unwrap_or("");
        assert_eq!(
            creates,
            msg.contains("bad request body"),
            "POST /v1/{path} is {}documented but answers {v}",
            if creates { "" } else { "not " }
        );
        let updates = UPDATES.iter().any(|(p, _)| p == path);
        let (s, v) = api
            .as_bearer(&token, "PUT", &format!("/v1/{path}/{nobody}?wait=5"), "{}")
            .await;
        let refused = v["message"]
            .as_str()
            .unwrap_or("")
            .contains("cannot be updated");
        assert_eq!(updates, !refused, "PUT /v1/{path}: {s} {v}");
        assert!(
            !unrouted(&v) && (400..500).contains(&s),
            "PUT /v1/{path}: {s} {v}"
        );
        let documented = d["paths"][format!("/v1/{path}/{{id}}")]["delete"].is_object();
        let (s, v) = api
            .as_bearer(&token, "DELETE", &format!("/v1/{path}/{nobody}?wait=5"), "")
            .await;
        let refused = v["message"]
            .as_str()
            .unwrap_or("")
            .contains("cannot be deleted");
        assert_eq!(documented, !refused, "DELETE /v1/{path}: {s} {v}");
        assert!(
            !unrouted(&v) && (400..500).contains(&s),
            "DELETE /v1/{path}: {s} {v}"
        );
        assert_eq!(UNDELETABLE.contains(path), refused, "DELETE /v1/{path}");
    }
    for (path, action, _, _) in ACTIONS {
        let (s, v) = api
            .as_bearer(
                &token,
                "POST",
                &format!("/v1/{path}/{nobody}/actions/{action}?wait=5"),
                "{}",
            )
            .await;
        assert!(
            !unrouted(&v) && (400..500).contains(&s),
            "POST {path}/actions/{action}: {s} {v}"
        );
    }
    let (_, v) = api
        .as_bearer(
            &token,
            "POST",
            &format!("/v1/vms/{nobody}/actions/fly"),
            "{}",
        )
        .await;
    assert!(unrouted(&v), "{v}");
}
