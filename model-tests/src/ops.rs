//! The operations a model-based case is made of: API calls, faults, and "settle".
//!
//! Operations name resources by their place in the case (the `vm`-th VM the case created, the
//! `host`-th simulated host), never by uuid, so a shrunk or replayed case means the same thing.

use serde::{Deserialize, Serialize};
use std::fmt;
use stratus_agent_protocol::CommandKind;

/// An instance offering: two that fit and one that fits nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Offering {
    Small,
    Medium,
    Huge,
}

impl Offering {
    pub fn name(self) -> &'static str {
        match self {
            Offering::Small => "small",
            Offering::Medium => "medium",
            Offering::Huge => "huge",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    Start,
    Stop,
    Reboot,
    Migrate,
    Destroy,
    Recover,
    Expunge,
}

impl VmAction {
    pub const ALL: [VmAction; 7] = [
        VmAction::Start,
        VmAction::Stop,
        VmAction::Reboot,
        VmAction::Migrate,
        VmAction::Destroy,
        VmAction::Recover,
        VmAction::Expunge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VmAction::Start => "start",
            VmAction::Stop => "stop",
            VmAction::Reboot => "reboot",
            VmAction::Migrate => "migrate",
            VmAction::Destroy => "destroy",
            VmAction::Recover => "recover",
            VmAction::Expunge => "expunge",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostAction {
    Maintenance,
    Enable,
    Disable,
}

impl HostAction {
    pub fn state(self) -> &'static str {
        match self {
            HostAction::Maintenance => "Maintenance",
            HostAction::Enable => "Enabled",
            HostAction::Disable => "Disabled",
        }
    }
}

/// Agent commands a case may make fail (the ones operations issue; pings and connects are
/// exercised by the host faults instead).
pub const FAILABLE: [CommandKind; 10] = [
    CommandKind::VmStart,
    CommandKind::VmStop,
    CommandKind::VmReboot,
    CommandKind::VmDestroy,
    CommandKind::VmMigrate,
    CommandKind::VmReceive,
    CommandKind::VolumeCreate,
    CommandKind::VolumeDelete,
    CommandKind::VolumeAttach,
    CommandKind::VolumeDetach,
];

/// Agent faults beyond plain failure, armed for the next N commands of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentFault {
    /// The host does the work, then reports failure.
    FailAfter,
    /// The command takes longer than its timeout.
    Slow,
    /// The result callback never arrives.
    DropCallback,
    /// The result callback arrives twice.
    DuplicateCallback,
}

impl AgentFault {
    pub const ALL: [AgentFault; 4] = [
        AgentFault::FailAfter,
        AgentFault::Slow,
        AgentFault::DropCallback,
        AgentFault::DuplicateCallback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AgentFault::FailAfter => "fail_after",
            AgentFault::Slow => "slow",
            AgentFault::DropCallback => "drop_callback",
            AgentFault::DuplicateCallback => "duplicate_callback",
        }
    }
}

/// Who sends an API operation: the admin (the case's own client), or one of two accounts with
/// small quotas, which see and touch only their own VMs and volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tenant {
    #[default]
    Admin,
    A,
    B,
}

impl Tenant {
    pub fn is_admin(&self) -> bool {
        *self == Tenant::Admin
    }
}

/// One step of a case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Create a VM on zone 0's network; `static_ip` is an offset into the zone's first range.
    CreateVm {
        offering: Offering,
        static_ip: Option<u16>,
        #[serde(default, skip_serializing_if = "Tenant::is_admin")]
        tenant: Tenant,
    },
    /// An action on a VM, sent by its owner — or, `foreign`, by an account that does not own
    /// it, which must be answered `not_found`.
    Vm {
        vm: usize,
        action: VmAction,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        foreign: bool,
    },
    /// Create a data volume, attached to a VM of the case or detached.
    CreateVolume {
        attach: Option<usize>,
        #[serde(default, skip_serializing_if = "Tenant::is_admin")]
        tenant: Tenant,
    },
    AttachVolume {
        volume: usize,
        vm: usize,
    },
    DetachVolume {
        volume: usize,
    },
    DeleteVolume {
        volume: usize,
    },
    Host {
        host: usize,
        action: HostAction,
    },
    /// Add a simulated host (one not yet in the database) to the newest cluster.
    AddHost {
        host: usize,
    },
    DeleteHost {
        host: usize,
    },
    /// A cluster in zone 0 with the zone's network and storage attached.
    CreateCluster,
    /// Delete cluster `cluster` (0 is the one the datacenter was built with), cascading.
    DeleteCluster {
        cluster: usize,
    },
    CreateZone,
    /// Delete zone `zone` (0 is the datacenter's own), cascading.
    DeleteZone {
        zone: usize,
    },
    /// Another address range on zone 0's network.
    AddIpRange,
    CrashHost {
        host: usize,
    },
    RestartHost {
        host: usize,
    },
    PartitionHost {
        host: usize,
    },
    HealHost {
        host: usize,
    },
    /// The next `n` agent commands of `kind` fail (on any host).
    FailNext {
        kind: CommandKind,
        n: u32,
    },
    /// The next `n` agent commands of `kind` misbehave as `fault` says.
    AgentFault {
        fault: AgentFault,
        kind: CommandKind,
        n: u32,
    },
    KillMgmt,
    RestartMgmt,
    /// Let time pass until nothing is in flight.
    Settle,
    /// Several operations in flight at once, each started `after_ms` after the group: API
    /// operations on the same and on different resources, and at most one fault landing among
    /// them. Members name resources that existed before the group.
    Group {
        members: Vec<Member>,
    },
}

/// One operation of a [`Op::Group`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub after_ms: u32,
    pub op: Op,
}

/// Members a group may have at most.
pub const GROUP_MAX: usize = 5;

impl Op {
    /// API operations a group may run concurrently (and whose outcomes the runner can check
    /// against some order of the group).
    pub fn is_concurrent_api(&self) -> bool {
        matches!(
            self,
            Op::CreateVm { .. }
                | Op::Vm { .. }
                | Op::CreateVolume { .. }
                | Op::AttachVolume { .. }
                | Op::DetachVolume { .. }
                | Op::DeleteVolume { .. }
        )
    }

    /// Faults that may land among a group's operations.
    pub fn is_group_fault(&self) -> bool {
        matches!(
            self,
            Op::CrashHost { .. }
                | Op::PartitionHost { .. }
                | Op::FailNext { .. }
                | Op::AgentFault { .. }
                | Op::KillMgmt
        )
    }

    /// Faults, as opposed to API operations.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            Op::CrashHost { .. }
                | Op::RestartHost { .. }
                | Op::PartitionHost { .. }
                | Op::HealHost { .. }
                | Op::FailNext { .. }
                | Op::AgentFault { .. }
                | Op::KillMgmt
                | Op::RestartMgmt
        )
    }

    /// The kind name used in statistics ("fault kinds injected").
    pub fn kind(&self) -> String {
        match self {
            Op::CreateVm { .. } => "create_vm".into(),
            Op::Vm { action, .. } => format!("vm_{}", action.name()),
            Op::CreateVolume { .. } => "create_volume".into(),
            Op::AttachVolume { .. } => "attach_volume".into(),
            Op::DetachVolume { .. } => "detach_volume".into(),
            Op::DeleteVolume { .. } => "delete_volume".into(),
            Op::Host { action, .. } => format!("host_{}", action.state().to_lowercase()),
            Op::AddHost { .. } => "add_host".into(),
            Op::DeleteHost { .. } => "delete_host".into(),
            Op::CreateCluster => "create_cluster".into(),
            Op::DeleteCluster { .. } => "delete_cluster".into(),
            Op::CreateZone => "create_zone".into(),
            Op::DeleteZone { .. } => "delete_zone".into(),
            Op::AddIpRange => "add_ip_range".into(),
            Op::CrashHost { .. } => "crash_host".into(),
            Op::RestartHost { .. } => "restart_host".into(),
            Op::PartitionHost { .. } => "partition_host".into(),
            Op::HealHost { .. } => "heal_host".into(),
            Op::FailNext { kind, .. } => format!("fail_next:{}", kind.as_str()),
            Op::AgentFault { fault, kind, .. } => {
                format!("{}:{}", fault.name(), kind.as_str())
            }
            Op::KillMgmt => "kill_mgmt".into(),
            Op::RestartMgmt => "restart_mgmt".into(),
            Op::Settle => "settle".into(),
            Op::Group { .. } => "group".into(),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{self:?}"),
        }
    }
}
