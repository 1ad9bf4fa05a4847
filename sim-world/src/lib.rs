//! # stratus-sim-world
//!
//! The simulated datacenter Stratus is tested against. It will hold:
//! - a simulated hypervisor and hosts (each host a madsim node running the real agent server),
//! - a datacenter builder from a spec (zones × clusters × hosts, capacity profiles, networks),
//! - the fault injector (host crash/restart, partitions, packet loss, failing or slow agent
//!   commands, lost callbacks, management-node kill/restart), drawing every fault from the seed,
//! - the madsim harness and the invariant checkers,
//! - [`trace`]: the trace hash every run reports (same seed ⇒ same hash).

pub mod trace;

pub use trace::Trace;
pub mod hypervisor;

pub use hypervisor::{HostProfile, LatencyProfile, SimHostState, SimHypervisor};
