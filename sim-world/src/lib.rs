//! # stratus-sim-world
//!
//! The simulated datacenter Stratus is tested against, inside one seeded madsim runtime:
//! - [`hypervisor`]: the simulated hypervisor (capacity, VMs, volumes, per-command latency);
//!   hosts are madsim nodes running the real agent server on it;
//! - [`world`]: the harness — the real management node, the hosts, a client node driving the
//!   REST API, the datacenter built from a [`WorldSpec`], fault handles (host crash/restart,
//!   partition/heal, management-node kill/restart, VM crash) and `settle`;
//! - [`faults`]: agent-level faults drawn from the seed (failing, slow, lost and duplicated
//!   callbacks);
//! - [`invariants`]: what must hold after every operation and at quiescence;
//! - [`store_faults`]: a store whose commits fail at a chosen rate, before or after applying;
//! - [`WireFaults`]: requests between the management node and agents delivered twice or held
//!   back (the simulated wire's own faults);
//! - [`trace`]: the trace hash every run reports (same seed ⇒ same hash).
//!
//! The harness ([`world`], [`invariants`]) drives madsim's runtime, so it exists only in the
//! simulation build (`RUSTFLAGS="--cfg madsim"`); the std build compiles the hypervisor, the
//! fault injector and the trace so they stay checked by the std clippy run.

pub mod faults;
pub mod hypervisor;
#[cfg(madsim)]
pub mod invariants;
pub mod store_faults;
pub mod trace;
#[cfg(madsim)]
pub mod world;

pub use faults::{FaultRates, SimFaults};
pub use hypervisor::{HostProfile, LatencyProfile, SimHostState, SimHypervisor};
pub use store_faults::{FaultyStore, StoreFaultRates};
/// Faults of the wire between the management node and agents (duplicated and held-back
/// requests), kept by the simulation's HTTP layer.
#[cfg(madsim)]
pub use stratus_rt::http::{set_wire_faults, wire_faults_fired, WireFaults};
pub use trace::Trace;
#[cfg(madsim)]
pub use world::{Datacenter, SimHost, World, WorldSpec};
