//! # stratus-scenario
//!
//! Declarative, seeded scenarios over the simulated datacenter and their reports:
//! - [`spec`]: `scenarios/*.toml` — datacenter shape, workload phases, fault profile, seed,
//!   checks (a malformed file is an error naming the line and the key);
//! - [`draw`]: swarm scenarios — ranges and choices a seed draws, the drawn file replayable;
//!   [`swarm`]: many seeds of a template, failures grouped and reduced (`stratus-swarm`);
//! - [`run`] (simulation build): the runner — builds the world, runs the phases with faults,
//!   settles, checks invariants and latency objectives;
//! - [`stats`], [`report`], [`svg`]: latency histograms, `summary.json`, `report.md` and SVG
//!   plots under `reports/<scenario>/<seed>/`;
//! - [`wall`] (simulation build): the machine's clock, which the simulation hides, for the
//!   report's wall times.

pub mod draw;
pub mod report;
#[cfg(madsim)]
pub mod run;
pub mod spec;
pub mod stats;
pub mod svg;
pub mod swarm;
#[cfg(madsim)]
pub mod wall;
