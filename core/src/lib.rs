//! # stratus-core
//!
//! The Stratus management stack. This crate holds the engine every service stands on:
//!
//! - [`bus`]: typed request/reply messages and events, routed by service and by resource uuid
//!   over a consistent-hash ring of management nodes ([`hashring`]).
//! - [`queue`]: per-resource queues (signature + parallelism), the lock-free way to serialize
//!   operations on one resource.
//! - [`flow`]: workflows whose steps roll back in reverse on failure, journaled in the store so an
//!   interrupted chain is finished by recovery.
//! - [`extension`]: plugin registry (hooks the services call).
//! - [`cascade`]: parent/child deletion (check → delete | force-delete → cleanup).
//! - [`config`]: typed, validated global configuration with update hooks.
//! - [`job`]: every mutating operation as a job with progress and result.
//!
//! It stands on `stratus-store` (resources, queries, atomic batches), `stratus-rt` (clock,
//! deadlines, HTTP) and `stratus-agent-protocol` (what it says to host agents).

pub mod agent;
pub mod api;
pub mod auth;
pub mod bus;
pub mod cascade;
pub mod client;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod extension;
pub mod flow;
pub mod hashring;
pub mod ids;
pub mod job;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod node;
pub mod queue;
pub mod services;

pub use error::{Error, ErrorCode, Result};
