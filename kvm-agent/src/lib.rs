//! # stratus-kvm-agent
//!
//! The host agent of Stratus:
//! - [`server`]: the agent HTTP server, written once and generic over a [`Hypervisor`];
//! - [`conformance`] (feature `testing`): what every backend must do, one suite for all;
//! - [`hypervisor`]: the backend trait (the simulated backend lives in `stratus-sim-world`);
//! - [`qemu`]: the real backend, QEMU over QMP with qcow2 volumes, bridges and dnsmasq (std
//!   build only).
//!
//! What the agent and the management plane say to each other is `stratus-agent-protocol`; the
//! clock, timeouts and HTTP wire it runs on are `stratus-rt`.

#[cfg(feature = "testing")]
pub mod conformance;
pub mod hypervisor;
#[cfg(not(madsim))]
pub mod qemu;
pub mod server;

pub use hypervisor::Hypervisor;
pub use server::{Agent, AgentConfig, CallbackFate, CommandFault, Faults, NoFaults};
