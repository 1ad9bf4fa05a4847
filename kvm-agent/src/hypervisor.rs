//! The backend an agent drives. The agent server is written once against this trait; the QEMU
//! backend (std build) and the simulated one (`stratus-sim-world`) implement it.
//!
//! Every method must be idempotent where the protocol says so: starting a running VM, destroying
//! an absent VM, deleting an absent volume all succeed.

use async_trait::async_trait;
use std::time::Duration;
use stratus_agent_protocol::{
    AgentError, CreateVolumeCmd, DiskSpec, HostFacts, ReportEvent, VmSpec, VmStatus, VolumeStatus,
};
use tokio::sync::mpsc;
use uuid::Uuid;

#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Capacity and what exists (`host_uuid` is filled in by the agent).
    async fn facts(&self) -> Result<HostFacts, AgentError>;
    async fn vms(&self) -> Vec<VmStatus>;
    async fn volumes(&self) -> Vec<VolumeStatus>;
    async fn vm_status(&self, vm: Uuid) -> Option<VmStatus>;
    async fn start_vm(&self, spec: &VmSpec) -> Result<(), AgentError>;
    async fn stop_vm(&self, vm: Uuid, graceful: Duration, force: bool) -> Result<(), AgentError>;
    async fn reboot_vm(&self, vm: Uuid) -> Result<(), AgentError>;
    async fn destroy_vm(&self, vm: Uuid) -> Result<(), AgentError>;
    /// The spec of a VM, with its disks, to hand to a migration destination.
    async fn vm_spec(&self, vm: Uuid) -> Result<VmSpec, AgentError>;
    /// Take a migrating VM: its disks and the running VM.
    async fn receive_vm(&self, spec: &VmSpec) -> Result<(), AgentError>;
    /// Forget a VM and its disks after it migrated away.
    async fn release_migrated(&self, vm: Uuid) -> Result<(), AgentError>;
    async fn create_volume(&self, cmd: &CreateVolumeCmd) -> Result<VolumeStatus, AgentError>;
    async fn delete_volume(&self, volume: Uuid) -> Result<(), AgentError>;
    async fn attach_volume(&self, vm: Uuid, disk: &DiskSpec) -> Result<(), AgentError>;
    async fn detach_volume(&self, vm: Uuid, volume: Uuid) -> Result<(), AgentError>;
    /// Events the host notices by itself (VM crashed, ...). Taken once by the agent.
    fn take_events(&self) -> Option<mpsc::UnboundedReceiver<ReportEvent>>;
}
