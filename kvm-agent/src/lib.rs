//! # stratus-kvm-agent
//!
//! The host agent of Stratus:
//! - [`protocol`]: what the management plane and an agent say to each other (commands, task
//!   results, reports, error codes), shared by both sides;
//! - [`server`]: the agent HTTP server, written once and generic over a [`Hypervisor`];
//! - [`hypervisor`]: the backend trait (the simulated backend lives in `stratus-sim-world`; the
//!   QEMU/QMP backend is still to come);
//! - [`http`]: HTTP/1.1 server loop and keep-alive client that run in both builds;
//! - [`deadline`]: the timeout every part of Stratus uses (timer entries shared under madsim).

pub mod deadline;
pub mod http;
pub mod hypervisor;
pub mod protocol;
#[cfg(madsim)]
mod runtime_local;
pub mod server;

pub use hypervisor::Hypervisor;
pub use server::{Agent, AgentConfig, CallbackFate, CommandFault, Faults, NoFaults};
