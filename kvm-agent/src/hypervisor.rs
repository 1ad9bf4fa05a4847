//! The backend an agent drives. The agent server is written once against this trait; the QEMU
//! backend (std build) and the simulated one (`stratus-sim-world`) implement it.
//!
//! Every method must be idempotent where the protocol says so: starting a running VM, destroying
//! an absent VM, deleting an absent volume all succeed.

use async_trait::async_trait;
use std::net::IpAddr;
use std::time::Duration;
use stratus_agent_protocol::{
    AgentError, ConsoleReply, CreateVolumeCmd, DiskSpec, HostFacts, ReceiveReply, ReportEvent,
    VmSpec, VmStatus, VolumeStatus,
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
    /// Take a migrating VM: its disks and the running VM, at once (the reply names no port), or
    /// by making ready to be sent it on a port ([`Hypervisor::send_vm`] on the source). A
    /// destination that is made ready but not sent the VM lets go of it by itself.
    async fn receive_vm(&self, spec: &VmSpec) -> Result<ReceiveReply, AgentError>;
    /// Send a running VM, with its local disks, to a destination at `dest` that made ready
    /// on the ports of `ready`. It has left this host when this returns Ok (release it with
    /// `release_migrated`); on an error it runs here still.
    async fn send_vm(&self, vm: Uuid, dest: IpAddr, ready: &ReceiveReply)
        -> Result<(), AgentError>;
    /// Forget a VM and its disks after it migrated away.
    async fn release_migrated(&self, vm: Uuid) -> Result<(), AgentError>;
    async fn create_volume(&self, cmd: &CreateVolumeCmd) -> Result<VolumeStatus, AgentError>;
    async fn delete_volume(&self, volume: Uuid) -> Result<(), AgentError>;
    async fn attach_volume(&self, vm: Uuid, disk: &DiskSpec) -> Result<(), AgentError>;
    async fn detach_volume(&self, vm: Uuid, volume: Uuid) -> Result<(), AgentError>;
    /// The end of a VM's serial console output (`max_bytes` at most).
    async fn console(&self, vm: Uuid, max_bytes: u64) -> Result<ConsoleReply, AgentError>;
    /// The management node's report URL, as its connect or ping gave it: a backend that
    /// fetches from the node (images) shows the host's token there and nowhere else.
    fn management_node(&self, _report_url: &str) {}
    /// Events the host notices by itself (VM crashed, ...). Taken once by the agent.
    fn take_events(&self) -> Option<mpsc::UnboundedReceiver<ReportEvent>>;
}
