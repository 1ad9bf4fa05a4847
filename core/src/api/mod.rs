//! The REST API of a management node, and the endpoints agents and peers talk to.
//!
//! - `GET /v1/<resources>` lists any kind with conditions (`?q=state=Running&q=nics.ip=10.0.0.5`,
//!   operators `= != > >= < <= ?= !?= ~= !~=`, `=null`, `!=null`), `sort=field` / `sort=-field`,
//!   `limit` (default 1000), `offset`, `count=true`; `GET /v1/<resources>/<uuid>` reads one.
//!   Both are driven by the kinds' metadata; secret fields never appear.
//! - Mutations (`POST`, `PUT`, `DELETE`, `POST .../actions/<action>`) are jobs: answered
//!   `202 {job_uuid, resource_uuid}` at once; `?wait=SECONDS` waits for the outcome and answers
//!   like the job ended (200 with the result, or the error's status with its code). `GET
//!   /v1/jobs/<uuid>` shows a job.
//! - `GET /v1/events` with `Accept: text/event-stream`: the event log as Server-Sent Events,
//!   resumed after `Last-Event-ID`, narrowed by `?filter=GLOBS` (without that header, the
//!   ordinary list of the `event` kind). `POST /v1/webhooks` delivers it out of process.
//! - `GET/PUT /v1/config[/<name>]`: global configuration.
//! - `POST /agent/callback/<task>`, `POST /agent/report`: from agents (token-checked).
//! - `POST /v1/auth/login` (a bearer token), `/v1/auth/logout`, `/v1/auth/tokens`,
//!   `GET /v1/auth/whoami`; every other path but `/v1/health` and `/agent/*` needs the token.
//! - `GET /metrics`: Prometheus text.
//!
//! A bad request is a 4xx with `{code, message}`; nothing here panics on input.

mod audit;
mod auth;
mod events;
mod image_files;
pub mod openapi;
mod routes;
mod scope;

pub use routes::{kind_of_path, router, RESOURCE_PATHS, UNDELETABLE};

use crate::error::{Error, ErrorCode};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A JSON response with a status.
pub fn json<T: Serialize>(status: u16, body: &T) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match serde_json::to_vec(body) {
        Ok(b) => (status, [("content-type", "application/json")], b).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// An error as `{code, message}` with the code's status.
pub fn error(e: &Error) -> Response {
    json(e.code.http_status(), e)
}

/// The error for a path that names no resource or action.
pub fn not_found_path(path: &str) -> Response {
    error(&Error::new(
        ErrorCode::NotFound,
        format!("no such API path: {path}"),
    ))
}

/// The largest request body the API reads.
pub const BODY_LIMIT: usize = 1 << 20;

/// A request's body, at most [`BODY_LIMIT`] bytes; a body refused is a coded error like any
/// other (`too_large`, 413), not the framework's plain text.
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for RawBody {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(RawBody(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(error(&Error::new(
                ErrorCode::TooLarge,
                format!("the request body is over {BODY_LIMIT} bytes"),
            ))),
            Err(e) => Err(error(&Error::invalid(format!(
                "cannot read the request body: {}",
                e.body_text()
            )))),
        }
    }
}
