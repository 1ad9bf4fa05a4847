//! The one error type that crosses the bus and reaches the API.
//!
//! Library crates and modules have their own `thiserror` types (`StoreError`, ...); each maps
//! into [`Error`] with a stable [`ErrorCode`] here. The code is what clients match on; the message is
//! for people.

use serde::{Deserialize, Serialize};
use std::fmt;
use stratus_store::{ErrorClass, StoreError, UnknownVariant};

/// Stable error codes. The string form (`as_str`) is part of the API and never changes meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is malformed or a value is out of range.
    InvalidArgument,
    /// The named resource does not exist.
    NotFound,
    /// A resource with the same identity already exists.
    AlreadyExists,
    /// The resource is in a state that does not allow the operation.
    InvalidState,
    /// An optimistic version check failed: somebody else changed the resource first.
    Conflict,
    /// A guarded write found its condition false (for example, capacity would go negative).
    ConditionFailed,
    /// Not enough capacity (hosts, IP addresses, storage) to satisfy the request.
    CapacityExhausted,
    /// The account's quota has no room for the request.
    QuotaExceeded,
    /// The resource is used by others and cannot be deleted without force.
    InUse,
    /// The operation did not finish in time.
    Timeout,
    /// The management node that owns the resource is gone or unreachable.
    NodeUnavailable,
    /// No handler is registered for a message.
    NoHandler,
    /// A host agent refused or failed a command.
    AgentError,
    /// The host is unreachable.
    HostUnreachable,
    /// The request carries no valid credentials (no token, an unknown or expired one, a wrong
    /// password or agent token).
    Unauthorized,
    /// The request is larger than the API takes.
    TooLarge,
    /// The caller is known but not allowed to do this (an admin-only kind or operation).
    Forbidden,
    /// The storage backend failed.
    StoreFailure,
    /// An internal invariant broke (a bug); never expected.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::InvalidState,
        ErrorCode::Conflict,
        ErrorCode::ConditionFailed,
        ErrorCode::CapacityExhausted,
        ErrorCode::QuotaExceeded,
        ErrorCode::InUse,
        ErrorCode::Timeout,
        ErrorCode::NodeUnavailable,
        ErrorCode::NoHandler,
        ErrorCode::AgentError,
        ErrorCode::HostUnreachable,
        ErrorCode::Unauthorized,
        ErrorCode::TooLarge,
        ErrorCode::Forbidden,
        ErrorCode::StoreFailure,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::Conflict => "conflict",
            ErrorCode::ConditionFailed => "condition_failed",
            ErrorCode::CapacityExhausted => "capacity_exhausted",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::InUse => "in_use",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NodeUnavailable => "node_unavailable",
            ErrorCode::NoHandler => "no_handler",
            ErrorCode::AgentError => "agent_error",
            ErrorCode::HostUnreachable => "host_unreachable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::StoreFailure => "store_failure",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status the API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::TooLarge => 413,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists
            | ErrorCode::InvalidState
            | ErrorCode::Conflict
            | ErrorCode::ConditionFailed
            | ErrorCode::InUse
            | ErrorCode::CapacityExhausted
            | ErrorCode::QuotaExceeded => 409,
            ErrorCode::Timeout => 504,
            ErrorCode::NodeUnavailable
            | ErrorCode::HostUnreachable
            | ErrorCode::AgentError
            | ErrorCode::StoreFailure => 503,
            ErrorCode::NoHandler | ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with a stable code and a human message. Serializable, so it crosses the bus and the
/// REST API unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidArgument, message)
    }
    pub fn not_found(kind: &str, uuid: impl fmt::Display) -> Self {
        Error::new(ErrorCode::NotFound, format!("{kind} {uuid} does not exist"))
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }
    /// A broken invariant: a bug, never an expected state. Tests (debug builds) panic here, so
    /// the bug is loud where it is found; a release build logs it and hands back an `internal`
    /// error naming the invariant, which the caller returns: the operation fails instead of
    /// going on over unsound state.
    #[track_caller]
    pub fn invariant(what: impl fmt::Display) -> Self {
        let message = format!("invariant broken: {what}");
        broken_invariant(&message);
        Error::internal(message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Timeout, message)
    }
    /// Prefix the message with context, keeping the code.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A broken invariant where no operation can be failed (a drop, a counter's bookkeeping):
/// panics in debug builds (unless the thread is already unwinding, which would abort), logs
/// in release. Code that can return an error uses [`Error::invariant`].
#[track_caller]
pub fn broken_invariant(what: impl fmt::Display) {
    if cfg!(debug_assertions) && !std::thread::panicking() {
        panic!("{what}");
    }
    tracing::error!("{what}");
}

impl From<ErrorClass> for ErrorCode {
    fn from(class: ErrorClass) -> Self {
        match class {
            ErrorClass::InvalidArgument => ErrorCode::InvalidArgument,
            ErrorClass::NotFound => ErrorCode::NotFound,
            ErrorClass::AlreadyExists => ErrorCode::AlreadyExists,
            ErrorClass::Conflict => ErrorCode::Conflict,
            ErrorClass::ConditionFailed => ErrorCode::ConditionFailed,
            ErrorClass::Backend => ErrorCode::StoreFailure,
            ErrorClass::Corrupt => ErrorCode::Internal,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::new(e.class().into(), e.to_string())
    }
}

impl From<UnknownVariant> for Error {
    fn from(e: UnknownVariant) -> Self {
        Error::invalid(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_distinct_stable_names() {
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn error_round_trips_through_json() {
        let e = Error::new(ErrorCode::InUse, "zone z1 has 3 clusters").context("delete zone");
        let back: Error = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(
            back.to_string(),
            "in_use: delete zone: zone z1 has 3 clusters"
        );
    }
}
