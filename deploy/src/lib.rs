//! # stratus-deploy
//!
//! The programs a deployment runs, in the std build: `stratus` ([`serve`]: one management node
//! on SQLite or PostgreSQL; [`cli`]: the command line that drives a node through its API) and
//! `stratus-sim-agent` ([`sim_agent`]: simulated hosts over real HTTP), `stratus-kvm-agent`
//! ([`kvm_agent`]: a real host, QEMU), and `stratus-load`
//! ([`load`]: VM creation through the API, measured); [`sse`] follows a node's event stream. Under `--cfg madsim`
//! the crate is empty and the binaries say so.

#[cfg(not(madsim))]
pub mod cli;
#[cfg(not(madsim))]
pub mod files;
#[cfg(not(madsim))]
pub mod kvm_agent;
#[cfg(not(madsim))]
pub mod load;
#[cfg(not(madsim))]
pub mod logging;
#[cfg(not(madsim))]
pub mod serve;
#[cfg(not(madsim))]
pub mod signal;
#[cfg(not(madsim))]
pub mod sim_agent;
#[cfg(not(madsim))]
pub mod sse;
