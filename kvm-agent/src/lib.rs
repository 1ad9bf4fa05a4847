//! # stratus-kvm-agent
//!
//! The host agent of Stratus:
//! - [`server`]: the agent HTTP server, written once and generic over a [`Hypervisor`];
//! - [`hypervisor`]: the backend trait (the simulated backend lives in `stratus-sim-world`; the
//!   QEMU/QMP backend is still to come).
//!
//! What the agent and the management plane say to each other is `stratus-agent-protocol`; the
//! clock, timeouts and HTTP wire it runs on are `stratus-rt`.

pub mod hypervisor;
pub mod server;

pub use hypervisor::Hypervisor;
pub use server::{Agent, AgentConfig, CallbackFate, CommandFault, Faults, NoFaults};
