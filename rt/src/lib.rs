//! # stratus-rt
//!
//! The one place where the simulation and the real world meet. Everything above this crate is
//! written once and runs unchanged in both builds: the std build (real clock, real sockets) and
//! the simulation (`RUSTFLAGS="--cfg madsim"`: madsim's seeded clock, network and scheduler).
//!
//! - [`clock`]: `now_ms`, the one reading of the wall clock;
//! - [`deadline`]: the one timeout (timer entries shared under madsim);
//! - [`http`]: an axum `Router` served by our own accept loop, and a keep-alive client pool;
//!   the wire is HTTP/1.1 over TCP in the std build and request values over madsim connections
//!   (with links of our own that keep madsim's latency, order and partitions) in the simulation.

pub mod clock;
pub mod deadline;
pub mod http;
#[cfg(madsim)]
mod runtime_local;
