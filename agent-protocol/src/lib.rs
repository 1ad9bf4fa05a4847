//! The agent protocol: what the management plane and a host agent say to each other.
//!
//! mgmt → agent: `POST http://<host>:7070<PATH>` with the host's token in `x-stratus-token`.
//! - Short commands (`/host/connect`, `/host/ping`, `/vm/status`) answer in the response body.
//! - Long commands carry a task id (`x-stratus-task`) and a callback URL (`x-stratus-callback`);
//!   the agent answers `202 Accepted` at once, works, and POSTs a [`TaskResult`] to the callback
//!   (retrying). A task id the agent has already seen is not run twice.
//!
//! agent → mgmt: [`TaskResult`]s to callback URLs, [`Report`]s (a VM changed state, crashed, the
//! host is going down) to the report URL the host's owner gave at connect time.
//!
//! Errors are JSON [`AgentError`]s with a stable code.

mod address;

pub use address::{AgentAddress, BadAgentAddress};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The port agents listen on.
pub const AGENT_PORT: u16 = 7070;

/// How long the connections between the management node and an agent stay open unused, in
/// both directions (commands and pings one way, callbacks and reports the other; an agent's
/// connections to another agent for a migration too). The client's reaper runs once per idle
/// timeout and closes what had been unused a whole period, so a connection goes between 90 and
/// 180 s after its last use. That is longer than the default ping interval (60 s): each host
/// keeps one connection each way, and its pings, commands and callbacks do not connect anew
/// every time (with `host.ping.interval` above 90 s, pings connect again). Keeping them trades
/// memory (two open connections per host) for the connects; a deployment needs a file limit
/// above twice its hosts on the management node.
pub const AGENT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

pub const H_TOKEN: &str = "x-stratus-token";
pub const H_TASK: &str = "x-stratus-task";
pub const H_CALLBACK: &str = "x-stratus-callback";
/// When the management plane stops waiting for the command to be handed over (milliseconds
/// since the Unix epoch): the agent refuses a command that arrives later (a partition held it
/// back), so that work the management side has given up on and rolled back does not run after
/// all. Clocks of the management nodes and hosts must agree to well within the hand-over
/// timeout (10 s), as NTP keeps them.
pub const H_DEADLINE: &str = "x-stratus-deadline";
/// When the management plane stops waiting for a long command's result (milliseconds since the
/// Unix epoch). The agent does not start the work after it — the sender has given up and rolled
/// back — and ends the task `expired` instead. (The model sweep found a migration held back on a
/// slow host that moved the VM after its rollback, onto a host deleted meanwhile.) A migration's
/// source passes it on as the receive's [`H_DEADLINE`] (or its own 60 s, when sooner). Work
/// already started runs to its end. Clocks must agree as for [`H_DEADLINE`].
pub const H_WAIT_UNTIL: &str = "x-stratus-wait-until";
/// The [`FenceToken`] of the workflow a command belongs to, as `<chain uuid>:<epoch>`. The agent
/// refuses ([`AgentErrorCode::Fenced`]) a command whose epoch is older than one a [`FenceCmd`]
/// set for its chain, on arrival and again before its work starts.
pub const H_FENCE: &str = "x-stratus-fence";

// The HTTP client takes header names as they are (`HeaderName::from_static`, which panics on a
// name that is not a valid lowercase one); here each is checked when the crate compiles.
const _: [hyper::header::HeaderName; 6] = [
    hyper::header::HeaderName::from_static(H_TOKEN),
    hyper::header::HeaderName::from_static(H_TASK),
    hyper::header::HeaderName::from_static(H_CALLBACK),
    hyper::header::HeaderName::from_static(H_DEADLINE),
    hyper::header::HeaderName::from_static(H_WAIT_UNTIL),
    hyper::header::HeaderName::from_static(H_FENCE),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentErrorCode {
    InvalidArgument,
    Unauthorized,
    NotFound,
    AlreadyExists,
    InsufficientCapacity,
    /// The operation was tried and failed on the host.
    Failed,
    /// Another host (migration peer) could not be reached.
    Unreachable,
    /// The command arrived after its deadline ([`H_DEADLINE`]), or its work would have started
    /// after its sender stopped waiting ([`H_WAIT_UNTIL`]), and was not run.
    Expired,
    /// The command's workflow was fenced ([`FenceCmd`]) at a later epoch than the command's:
    /// whoever sent it has been superseded (its rollback, a restarted node's recovery), and it
    /// is not run.
    Fenced,
}

impl AgentErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            AgentErrorCode::InvalidArgument => 400,
            AgentErrorCode::Unauthorized => 401,
            AgentErrorCode::NotFound => 404,
            AgentErrorCode::AlreadyExists => 409,
            AgentErrorCode::InsufficientCapacity => 409,
            AgentErrorCode::Failed => 500,
            AgentErrorCode::Unreachable => 502,
            AgentErrorCode::Expired => 408,
            AgentErrorCode::Fenced => 409,
        }
    }
}

/// An error reported by an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct AgentError {
    pub code: AgentErrorCode,
    pub message: String,
}

impl AgentError {
    pub fn new(code: AgentErrorCode, message: impl Into<String>) -> Self {
        AgentError {
            code,
            message: message.into(),
        }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        AgentError::new(AgentErrorCode::Failed, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        AgentError::new(AgentErrorCode::NotFound, message)
    }
}

/// Command kinds, for fault injection, latency profiles and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    Connect,
    Ping,
    VmStatus,
    VmConsole,
    VmStart,
    VmStop,
    VmReboot,
    VmDestroy,
    VmMigrate,
    VmReceive,
    VolumeCreate,
    VolumeDelete,
    VolumeAttach,
    VolumeDetach,
    Fence,
}

impl CommandKind {
    pub const ALL: [CommandKind; 15] = [
        CommandKind::Connect,
        CommandKind::Ping,
        CommandKind::VmStatus,
        CommandKind::VmConsole,
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
        CommandKind::Fence,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Connect => "connect",
            CommandKind::Ping => "ping",
            CommandKind::VmStatus => "vm_status",
            CommandKind::VmConsole => "vm_console",
            CommandKind::VmStart => "vm_start",
            CommandKind::VmStop => "vm_stop",
            CommandKind::VmReboot => "vm_reboot",
            CommandKind::VmDestroy => "vm_destroy",
            CommandKind::VmMigrate => "vm_migrate",
            CommandKind::VmReceive => "vm_receive",
            CommandKind::VolumeCreate => "volume_create",
            CommandKind::VolumeDelete => "volume_delete",
            CommandKind::VolumeAttach => "volume_attach",
            CommandKind::VolumeDetach => "volume_detach",
            CommandKind::Fence => "fence",
        }
    }

    pub fn parse(s: &str) -> Option<CommandKind> {
        CommandKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A command the management plane sends to an agent.
pub trait Command: Serialize + DeserializeOwned + Send + Sync + 'static {
    const PATH: &'static str;
    const KIND: CommandKind;
    /// Long commands answer 202 and report through the callback.
    const ASYNC: bool;
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

/// What a VM's power state is on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Stopped,
    Paused,
    Crashed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub uuid: Uuid,
    pub state: PowerState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub uuid: Uuid,
    pub size_mib: u64,
}

/// A disk as the hypervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub volume: Uuid,
    pub device: u32,
    pub size_mib: u64,
}

/// How an L2 network reaches the hosts' bridges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum L2Kind {
    /// The bridge holds the physical interface itself.
    NoVlan,
    /// The bridge holds an 802.1Q sub-interface of the physical interface.
    Vlan { vlan: u32 },
    /// The bridge holds a VXLAN device (over the physical interface).
    Vxlan { vni: u32 },
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub uuid: Uuid,
    pub mac: String,
    pub ip: Option<String>,
    pub gateway: Option<String>,
    pub netmask: Option<String>,
    /// Linux bridge to plug the tap into (one per L2 network on a host).
    pub bridge: String,
    pub l2: L2Kind,
    /// The L2's physical interface on the host.
    pub physical_interface: String,
    /// The L3 network the address is of: the host serves it DHCP on the bridge.
    pub l3: Uuid,
    /// DNS servers to hand out with the address.
    pub dns: Vec<String>,
}

/// Everything a host needs to run a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub uuid: Uuid,
    pub name: String,
    pub cpu: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
}

/// What a host is: reported at connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub host_uuid: Option<Uuid>,
    pub hypervisor: String,
    pub cpu_cores: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub vms: Vec<VmStatus>,
    pub volumes: Vec<VolumeStatus>,
}

/// `/host/connect`: bind the agent to a management plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectCmd {
    pub host_uuid: Uuid,
    /// Where the agent sends reports (the host's owning management node).
    pub report_url: String,
}
impl Command for ConnectCmd {
    const PATH: &'static str = "/host/connect";
    const KIND: CommandKind = CommandKind::Connect;
    const ASYNC: bool = false;
    type Reply = HostFacts;
}

/// `/host/ping`: alive? and what runs here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingCmd {
    pub host_uuid: Uuid,
    /// The owner's report URL (it may have changed since connect); empty leaves it as it is (a
    /// ping that only asks what the host holds, from a node that is not its owner).
    pub report_url: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    /// The host the agent believes it is (None: never connected, e.g. after a restart).
    pub host_uuid: Option<Uuid>,
    pub vms: Vec<VmStatus>,
    pub volumes: Vec<Uuid>,
}
impl Command for PingCmd {
    const PATH: &'static str = "/host/ping";
    const KIND: CommandKind = CommandKind::Ping;
    const ASYNC: bool = false;
    type Reply = PingReply;
}

/// `/vm/status`: one VM's state on this host (None: not here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatusCmd {
    pub vm: Uuid,
}
impl Command for VmStatusCmd {
    const PATH: &'static str = "/vm/status";
    const KIND: CommandKind = CommandKind::VmStatus;
    const ASYNC: bool = false;
    type Reply = Option<VmStatus>;
}

/// `/vm/start`: define and start a VM (running it twice is a no-op).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartVmCmd {
    pub spec: VmSpec,
}
impl Command for StartVmCmd {
    const PATH: &'static str = "/vm/start";
    const KIND: CommandKind = CommandKind::VmStart;
    const ASYNC: bool = true;
    type Reply = ();
}

/// `/vm/stop`: graceful shutdown, forced after `graceful_timeout_ms` (or at once with `force`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopVmCmd {
    pub vm: Uuid,
    pub graceful_timeout_ms: u64,
    pub force: bool,
}
impl Command for StopVmCmd {
    const PATH: &'static str = "/vm/stop";
    const KIND: CommandKind = CommandKind::VmStop;
    const ASYNC: bool = true;
    type Reply = ();
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootVmCmd {
    pub vm: Uuid,
}
impl Command for RebootVmCmd {
    const PATH: &'static str = "/vm/reboot";
    const KIND: CommandKind = CommandKind::VmReboot;
    const ASYNC: bool = true;
    type Reply = ();
}

/// `/vm/destroy`: remove the VM from the host (absent is fine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestroyVmCmd {
    pub vm: Uuid,
}
impl Command for DestroyVmCmd {
    const PATH: &'static str = "/vm/destroy";
    const KIND: CommandKind = CommandKind::VmDestroy;
    const ASYNC: bool = true;
    type Reply = ();
}

/// `/vm/migrate`: live-migrate a VM and its local disks to another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateVmCmd {
    pub vm: Uuid,
    /// The destination agent's [`AgentAddress`].
    pub dest_address: String,
    pub dest_token: String,
}
impl Command for MigrateVmCmd {
    const PATH: &'static str = "/vm/migrate";
    const KIND: CommandKind = CommandKind::VmMigrate;
    const ASYNC: bool = true;
    type Reply = ();
}

/// `/vm/receive`: agent → agent during migration; the destination makes ready to take the VM
/// and its disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveVmCmd {
    pub spec: VmSpec,
}
/// The answer to a [`ReceiveVmCmd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReceiveReply {
    /// `None`: the VM is here already (a backend that takes a VM whole). `Some(port)`: the
    /// destination waits for the running VM on this TCP port of its agent's address, and the
    /// source sends it there (QEMU to QEMU).
    pub migration_port: Option<u16>,
    /// Where the destination takes the VM's local disks (an NBD server the source mirrors
    /// them to before it sends the VM), on the same address.
    pub disk_port: Option<u16>,
}
impl Command for ReceiveVmCmd {
    const PATH: &'static str = "/vm/receive";
    const KIND: CommandKind = CommandKind::VmReceive;
    const ASYNC: bool = false;
    type Reply = ReceiveReply;
}

/// `/vm/console`: the end of a VM's serial console output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConsoleCmd {
    pub vm: Uuid,
    /// At most this many bytes, the last ones.
    pub max_bytes: u64,
}
/// The answer to a [`VmConsoleCmd`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleReply {
    /// The console's text (bytes that are not UTF-8 replaced).
    pub text: String,
    /// How many bytes the console has written in all (`text` is its end).
    pub total_bytes: u64,
}
impl Command for VmConsoleCmd {
    const PATH: &'static str = "/vm/console";
    const KIND: CommandKind = CommandKind::VmConsole;
    const ASYNC: bool = false;
    type Reply = ConsoleReply;
}

/// An image to clone a root volume from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub uuid: Uuid,
    pub url: String,
    pub size_mib: u64,
    pub checksum: Option<String>,
}

/// `/volume/create`: create a volume on local storage (from an image, or blank).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVolumeCmd {
    pub volume: Uuid,
    pub size_mib: u64,
    pub image: Option<ImageRef>,
}
impl Command for CreateVolumeCmd {
    const PATH: &'static str = "/volume/create";
    const KIND: CommandKind = CommandKind::VolumeCreate;
    const ASYNC: bool = true;
    type Reply = VolumeStatus;
}

/// `/volume/delete` (absent is fine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVolumeCmd {
    pub volume: Uuid,
}
impl Command for DeleteVolumeCmd {
    const PATH: &'static str = "/volume/delete";
    const KIND: CommandKind = CommandKind::VolumeDelete;
    const ASYNC: bool = true;
    type Reply = ();
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachVolumeCmd {
    pub vm: Uuid,
    pub disk: DiskSpec,
}
impl Command for AttachVolumeCmd {
    const PATH: &'static str = "/vm/attachvolume";
    const KIND: CommandKind = CommandKind::VolumeAttach;
    const ASYNC: bool = true;
    type Reply = ();
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachVolumeCmd {
    pub vm: Uuid,
    pub volume: Uuid,
}
impl Command for DetachVolumeCmd {
    const PATH: &'static str = "/vm/detachvolume";
    const KIND: CommandKind = CommandKind::VolumeDetach;
    const ASYNC: bool = true;
    type Reply = ();
}

/// Which workflow (chain) a command belongs to, and at which epoch. A chain's forward path runs
/// at the epoch its journal holds (0 when it starts); its rollback, and a restarted node's
/// recovery of it, each run at a later one. Carried in [`H_FENCE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FenceToken {
    pub chain: Uuid,
    pub epoch: u64,
}

impl FenceToken {
    /// The [`H_FENCE`] header's value.
    pub fn header(&self) -> String {
        format!("{}:{}", self.chain, self.epoch)
    }

    /// Read an [`H_FENCE`] header's value.
    pub fn parse(s: &str) -> Option<FenceToken> {
        let (chain, epoch) = s.split_once(':')?;
        Some(FenceToken {
            chain: Uuid::parse_str(chain).ok()?,
            epoch: epoch.parse().ok()?,
        })
    }
}

/// `/fence`: from now on refuse every command of `token.chain` at an epoch older than
/// `token.epoch` (a copy still on its way, a long command accepted but not yet started), and say
/// how many of its older tasks are still running here. Sent by a rollback or recovery before it
/// undoes anything on the host, and repeated until none runs: work that has started runs to its
/// end, so only then is the host's state final. The agent keeps the fence until `until_ms`
/// (the sender's clock, like [`H_DEADLINE`]): every older command was sent before the fence
/// with a hand-over deadline before that moment, and is refused as expired after it anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceCmd {
    pub token: FenceToken,
    pub until_ms: i64,
}
impl Command for FenceCmd {
    const PATH: &'static str = "/fence";
    const KIND: CommandKind = CommandKind::Fence;
    const ASYNC: bool = false;
    type Reply = FenceReply;
}

/// The answer to a [`FenceCmd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceReply {
    /// Tasks of the chain at an older epoch still running here.
    pub running: u32,
}

/// A long command's outcome, POSTed to the callback URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: Uuid,
    pub kind: CommandKind,
    pub outcome: Result<serde_json::Value, AgentError>,
}

/// Something the agent noticed on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ReportEvent {
    /// A VM changed state without being told to (crashed, shut down from inside, ...).
    VmState { vm: Uuid, state: PowerState },
    /// The host is shutting down.
    HostStopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub host_uuid: Uuid,
    #[serde(flatten)]
    pub event: ReportEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_tokens_round_trip_and_bad_ones_are_refused() {
        let t = FenceToken {
            chain: Uuid::from_u128(7),
            epoch: 3,
        };
        assert_eq!(FenceToken::parse(&t.header()), Some(t));
        for bad in [
            "",
            "x:1",
            &format!("{}", t.chain),
            &format!("{}:-1", t.chain),
        ] {
            assert_eq!(FenceToken::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for k in CommandKind::ALL {
            assert_eq!(CommandKind::parse(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
    }

    #[test]
    fn results_and_reports_have_a_stable_json_form() {
        let r = TaskResult {
            task: Uuid::nil(),
            kind: CommandKind::VmStart,
            outcome: Err(AgentError::failed("qemu died")),
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["outcome"]["Err"]["code"], "failed");
        let rep = Report {
            host_uuid: Uuid::nil(),
            event: ReportEvent::VmState {
                vm: Uuid::nil(),
                state: PowerState::Crashed,
            },
        };
        let j = serde_json::to_value(&rep).unwrap();
        assert_eq!(j["event"], "vm_state");
        assert_eq!(j["state"], "crashed");
        let back: Report = serde_json::from_value(j).unwrap();
        assert_eq!(back, rep);
    }
}
