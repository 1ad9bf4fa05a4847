//! Every `/v1` request that asks for a change goes to the audit sinks once it is answered: who
//! (from the token, or for a login from its answer), what (method, path), the resource and job
//! the answer names, the status and error code, the client's address. Nothing else of a body
//! is kept (a login's answer holds its token).

use crate::auth::Caller;
use crate::extension::AuditRecord;
use crate::services::Cloud;
use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use serde_json::Value;
use std::sync::Arc;
use stratus_rt::http::PeerAddr;
use uuid::Uuid;

/// Answers of the API are small JSON documents; a larger one, or one of unknown length (a
/// stream), is passed on unread.
const READ_AT_MOST: usize = 4 << 20;

pub(super) async fn audit(State(c): State<Arc<Cloud>>, req: Request, next: Next) -> Response {
    let sinks = &c.engine.ext;
    let path = req.uri().path();
    if sinks.audit.is_empty() || req.method() == Method::GET || !path.starts_with("/v1/") {
        return next.run(req).await;
    }
    let (method, path) = (req.method().to_string(), path.to_string());
    let client = req.extensions().get::<PeerAddr>().map(|p| p.0.to_string());
    let (parts, body) = next.run(req).await.into_parts();
    // Authentication (inside this layer) leaves the caller on the answer; a refused token
    // leaves none, and the refusal is recorded without one.
    let caller = parts.extensions.get::<Caller>().copied();
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= READ_AT_MOST as u64);
    let (body, v) = if small {
        match axum::body::to_bytes(body, READ_AT_MOST).await {
            Ok(bytes) => {
                let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                (Body::from(bytes), v)
            }
            Err(e) => {
                // The answer broke while it was read: the client would have got it broken.
                tracing::warn!(error = %e, %path, "an answer failed while read for the audit log");
                (Body::empty(), Value::Null)
            }
        }
    } else {
        (body, Value::Null)
    };
    let id = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
    };
    let code = v
        .get("code")
        .or_else(|| v.get("error").and_then(|e| e.get("code")))
        .and_then(Value::as_str)
        .map(str::to_string);
    let record = AuditRecord {
        at_ms: stratus_rt::clock::now_ms(),
        account: caller.map(|c| c.account).or_else(|| id("account_uuid")),
        user: caller.map(|c| c.user).or_else(|| id("user_uuid")),
        method,
        path,
        resource: id("resource_uuid").or_else(|| id("uuid")),
        job: id("job_uuid"),
        status: parts.status.as_u16(),
        code,
        client,
    };
    sinks.audit(&record).await;
    Response::from_parts(parts, body)
}
