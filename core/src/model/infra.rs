//! Zones, clusters, hosts and the capacity reservations VMs hold on hosts.

use super::EnableState;
use stratus_store::Millis;
use uuid::Uuid;

stratus_store::resource! {
    /// A zone: the top of the resource tree (think: a datacenter or an availability zone).
    pub struct Zone: "zone" {
        name: String [index, column],
        description: Option<String>,
        state: EnableState [column],
    }
    relations {
        clusters: "cluster" (uuid = zone_uuid),
        hosts: "host" (uuid = zone_uuid),
        vms: "vm" (uuid = zone_uuid),
        l2_networks: "l2_network" (uuid = zone_uuid),
        primary_storages: "primary_storage" (uuid = zone_uuid),
    }
}

stratus_store::resource! {
    /// A cluster of hosts of one hypervisor type; L2 networks and primary storage attach to it.
    pub struct Cluster: "cluster" {
        name: String [index, column],
        zone_uuid: Uuid [index, column],
        hypervisor: String [column],
        description: Option<String>,
        state: EnableState [column],
    }
    relations {
        zone: "zone" (zone_uuid = uuid),
        hosts: "host" (uuid = cluster_uuid),
        vms: "vm" (uuid = cluster_uuid),
    }
}

stratus_store::text_enum! {
    /// What the operator wants of a host.
    pub enum HostState {
        Enabled = "Enabled",
        Disabled = "Disabled",
        /// VMs are being moved away before maintenance.
        PreMaintenance = "PreMaintenance",
        Maintenance = "Maintenance",
    }
}

stratus_store::text_enum! {
    /// Whether the management plane can talk to the host's agent.
    pub enum HostStatus {
        Connecting = "Connecting",
        Connected = "Connected",
        Disconnected = "Disconnected",
    }
}

stratus_store::resource! {
    /// A hypervisor host. Capacity totals come from the agent at connect; `cpu_used` and
    /// `memory_used_mib` are the sums of the reservations held on it.
    pub struct Host: "host" {
        name: String [index, column],
        zone_uuid: Uuid [index],
        cluster_uuid: Uuid [index, column],
        /// `IP:PORT` of the agent.
        address: String [unique, column],
        /// Presented to the agent with every command.
        token: String [secret],
        state: HostState [index, column],
        status: HostStatus [index, column],
        hypervisor: Option<String>,
        cpu_cores: i64 [column],
        memory_mib: i64 [column],
        /// Local disk for volumes.
        disk_mib: i64,
        cpu_used: i64 [column],
        memory_used_mib: i64 [column],
        ping_failures: i64 [quiet],
        last_seen_ms: Option<Millis> [quiet],
    }
    relations {
        zone: "zone" (zone_uuid = uuid),
        cluster: "cluster" (cluster_uuid = uuid),
        vms: "vm" (uuid = host_uuid),
        reservations: "reservation" (uuid = host_uuid),
        local_storage: "local_storage" (uuid = host_uuid),
    }
}

stratus_store::resource! {
    /// CPU and memory a VM holds on a host. The host's `cpu_used` / `memory_used_mib` change in
    /// the same batch as these rows, so the sum of a host's reservations always equals its
    /// counters. The uuid is derived from (vm, host): reserving twice is refused, releasing twice
    /// is a no-op.
    pub struct Reservation: "reservation" {
        vm_uuid: Uuid [index, column],
        host_uuid: Uuid [index, column],
        cpu: i64 [column],
        memory_mib: i64 [column],
        /// Local storage held ahead of volumes arriving (a migration's destination); 0 otherwise.
        disk_mib: i64,
        ps_uuid: Option<Uuid>,
    }
    relations {
        vm: "vm" (vm_uuid = uuid),
        host: "host" (host_uuid = uuid),
    }
}

/// The uuid of the reservation of `vm` on `host`.
pub fn reservation_uuid(vm: Uuid, host: Uuid) -> Uuid {
    crate::ids::name_uuid(&vm.to_string(), &format!("reservation/{host}"))
}
