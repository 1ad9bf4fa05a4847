//! # stratus-model-tests
//!
//! Model-based tests: random operation sequences with faults, generated from a reference model
//! ([`model`]) with proptest-state-machine, run against the full management stack in the
//! simulated datacenter (one madsim seed per case), checked after every step ([`runner`]), and
//! shrunk to a short failing sequence when something breaks ([`sweep`]). A failing case is
//! written as JSON ([`case`]) and `ci/model --replay FILE` reruns exactly that case.
//!
//! The runner and the sweep drive madsim, so they exist only in the simulation build
//! (`RUSTFLAGS="--cfg madsim"`; `ci/model` and `ci/test` build it).

pub mod case;
pub mod model;
pub mod ops;
#[cfg(madsim)]
pub mod runner;
#[cfg(madsim)]
pub mod sweep;

pub use case::Case;
pub use model::{Model, ModelState};
pub use ops::Op;
