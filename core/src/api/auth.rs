//! Authentication at the API: every request but health, login and the agents' own endpoints
//! carries `Authorization: Bearer <token>`; the token becomes the request's [`Caller`].
//! Agents authenticate with their host's token on `/agent/*` (checked there), which is never
//! a user token, and a user token opens nothing on `/agent/*`.

use super::routes::parse_body;
use super::{error, json, RawBody};
use crate::auth::{Caller, TOKEN_TTL};
use crate::error::{Error, ErrorCode};
use crate::services::Cloud;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Paths open without a token.
fn open(path: &str) -> bool {
    path == "/v1/health" || path == "/v1/auth/login" || path.starts_with("/agent/")
}

/// The bearer token of a request, if it has one.
fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware: authenticate, then let through what the caller may reach.
pub(super) async fn authenticate(
    State(c): State<Arc<Cloud>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if open(path) {
        return next.run(req).await;
    }
    let caller = match bearer(&req) {
        None => Err(Error::new(
            ErrorCode::Unauthorized,
            "send `Authorization: Bearer <token>`; POST /v1/auth/login gives one",
        )),
        Some(t) => c.auth.authenticate(t).await,
    };
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return error(&e),
    };
    // Configuration and metrics are the operator's; what else a plain account may reach, the
    // routes decide per kind (`scope`).
    let mut resp = if !caller.admin && (path == "/metrics" || path.starts_with("/v1/config")) {
        error(&Error::new(
            ErrorCode::Forbidden,
            "only an admin account's users may use this",
        ))
    } else {
        req.extensions_mut().insert(caller);
        next.run(req).await
    };
    // For the layers outside (the audit log): who was answered.
    resp.extensions_mut().insert(caller);
    resp
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginBody {
    user: String,
    password: String,
}

/// `POST /v1/auth/login {user, password}`: a token valid for `auth.token.ttl`.
pub(super) async fn login(State(c): State<Arc<Cloud>>, RawBody(body): RawBody) -> Response {
    let b: LoginBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let ttl: Duration = c.engine.config.get(&TOKEN_TTL.key());
    match c.auth.login(&b.user, &b.password, ttl).await {
        Ok(issued) => json(200, &issued),
        Err(e) => error(&e),
    }
}

/// `POST /v1/auth/logout`: the request's token ends.
pub(super) async fn logout(
    State(c): State<Arc<Cloud>>,
    Extension(me): Extension<Caller>,
) -> Response {
    match c.auth.revoke(me.token).await {
        Ok(()) => json(200, &serde_json::json!({})),
        Err(e) => error(&e),
    }
}

/// `GET /v1/auth/whoami`.
pub(super) async fn whoami(Extension(me): Extension<Caller>) -> Response {
    json(
        200,
        &serde_json::json!({"user_uuid": me.user, "account_uuid": me.account, "admin": me.admin}),
    )
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenBody {
    #[serde(default)]
    note: Option<String>,
    /// Seconds (default `auth.token.ttl`).
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// `POST /v1/auth/tokens {note, ttl_s}`: another token for the caller (for a program).
pub(super) async fn new_token(
    State(c): State<Arc<Cloud>>,
    Extension(me): Extension<Caller>,
    RawBody(body): RawBody,
) -> Response {
    let b: TokenBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    // Within the bounds of `auth.token.ttl`, checked as that setting is.
    let ttl = match b.ttl_s.map(|s| TOKEN_TTL.parse(&format!("{s}s"))) {
        Some(Ok(crate::config::ConfigValue::Duration(d))) => d,
        Some(Ok(other)) => {
            return error(&Error::internal(format!(
                "a duration setting parsed as {other:?}"
            )))
        }
        Some(Err(e)) => return error(&Error::invalid(format!("ttl_s: {}", e.message))),
        None => c.engine.config.get(&TOKEN_TTL.key()),
    };
    let note = b.note.unwrap_or_else(|| "api".into());
    if note.len() > 255 {
        return error(&Error::invalid("note is longer than 255 characters"));
    }
    let user = match c.get::<crate::model::User>(me.user).await {
        Ok(u) => u,
        Err(e) => return error(&e),
    };
    match c.auth.issue(&user, ttl, &note).await {
        Ok(issued) => json(200, &issued),
        Err(e) => error(&e),
    }
}
