//! VM instances and volumes: every operation a workflow in the VM's own queue, with complete
//! rollback; state sync with what hosts report.
//!
//! - `create.rs`, `power.rs` (start, stop, reboot), `lifecycle.rs` (destroy, recover,
//!   expunge), `migrate.rs`: the workflows, over the helpers of `chain.rs`; `handlers.rs`
//!   registers them;
//! - `volume.rs`: data volumes (create, attach, detach, delete);
//! - `sync.rs`: reconciling the database with the VMs and volumes a host reports.

mod chain;
mod create;
mod handlers;
mod lifecycle;
mod migrate;
mod power;
mod sync;
mod volume;

pub use sync::{SyncHostVms, SyncRepairs, VmStateReport};
pub use volume::{AttachVolume, CreateDataVolume, DeleteVolume, DetachVolume};

use super::Cloud;
use crate::agent::{AgentClient, HostTarget};
use crate::bus::{Bus, Message};
use crate::cascade::CascadeParticipant;
use crate::config::ConfigDef;
use crate::error::{Error, ErrorCode};
use crate::extension::{VmInfo, VmOp};
use crate::model::*;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use stratus_agent_protocol::Command;
use stratus_store::ErrorClass;
use stratus_store::{Batch, Db, Query, Row, Update};
use uuid::Uuid;

pub static STOP_GRACE: ConfigDef = ConfigDef::duration(
    "vm.stop.graceful_timeout",
    "How long a VM may take to shut down by itself before it is forced off",
    "60s",
    0,
    3_600_000,
);
pub static ORPHAN_POLICY: ConfigDef = ConfigDef::choice(
    "vm.orphan.policy",
    "What to do with a VM or volume a host runs that the database does not know",
    "destroy",
    &["destroy", "report"],
);
pub static STORE_RETRIES: ConfigDef = ConfigDef::int(
    "vm.forward.retries",
    "Attempts of a step that must not fail once its operation passed the point of no return",
    "8",
    1,
    1000,
);
/// The planted bug of the model tests: the IP is not returned when VM creation rolls back.
/// Only with feature `planted-bug`, which the model tests enable in the simulation build: a
/// real deployment has no switch that plants a leak.
#[cfg(feature = "planted-bug")]
pub static BUG_LEAK_IP: ConfigDef = ConfigDef::boolean(
    "debug.bug.leak_ip_on_create_rollback",
    "TEST ONLY: plant a bug (a failed VM creation keeps its IP) to prove the model tests find it",
    "false",
);

pub fn config_defs() -> Vec<&'static ConfigDef> {
    #[cfg_attr(not(feature = "planted-bug"), allow(unused_mut))]
    let mut defs = vec![&STOP_GRACE, &ORPHAN_POLICY, &STORE_RETRIES];
    #[cfg(feature = "planted-bug")]
    defs.push(&BUG_LEAK_IP);
    defs
}

/// Whether the model tests' planted bug is switched on (never, without feature `planted-bug`).
fn planted_ip_leak(c: &Cloud) -> bool {
    #[cfg(feature = "planted-bug")]
    return c.engine.config.get(&BUG_LEAK_IP.key());
    #[cfg(not(feature = "planted-bug"))]
    {
        let _ = c;
        false
    }
}

/// Create a VM: host, volumes, NICs and IPs allocated, volumes created and the VM started on
/// the host; any failure rolls all of it back and the VM row disappears.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Chosen by the API so the message reaches the VM's owner.
    #[serde(default)]
    pub uuid: Option<Uuid>,
    pub name: String,
    pub instance_offering_uuid: Uuid,
    pub image_uuid: Uuid,
    /// The first is the default network.
    pub l3_network_uuids: Vec<Uuid>,
    /// L3 uuid → requested address.
    #[serde(default)]
    pub static_ips: BTreeMap<Uuid, String>,
    #[serde(default)]
    pub data_disk_offering_uuids: Vec<Uuid>,
    #[serde(default)]
    pub zone_uuid: Option<Uuid>,
    #[serde(default)]
    pub cluster_uuid: Option<Uuid>,
    #[serde(default)]
    pub host_uuid: Option<Uuid>,
    #[serde(default)]
    pub description: Option<String>,
    /// The account it belongs to, set by the API from the caller (none: the cloud's own).
    #[serde(default)]
    pub account_uuid: Option<Uuid>,
}

macro_rules! vm_message {
    ($name:ident, $wire:literal, { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, Serialize, Deserialize)]
        pub struct $name {
            pub uuid: Uuid,
            $( #[serde(default)] pub $field: $ty, )*
        }
        impl Message for $name {
            type Reply = Row<Vm>;
            const NAME: &'static str = $wire;
            fn routing_key(&self) -> Option<Uuid> {
                Some(self.uuid)
            }
        }
    };
}

impl Message for CreateVm {
    type Reply = Row<Vm>;
    const NAME: &'static str = "vm.create";
    fn routing_key(&self) -> Option<Uuid> {
        self.uuid
    }
}

vm_message!(StartVm, "vm.start", {});
vm_message!(StopVm, "vm.stop", { force: bool });
vm_message!(RebootVm, "vm.reboot", {});
vm_message!(DestroyVm, "vm.destroy", { force: bool });
vm_message!(RecoverVm, "vm.recover", {});
vm_message!(MigrateVm, "vm.migrate", { host_uuid: Option<Uuid> });

/// Remove a destroyed VM for good (with `force`, from any state: destroy first).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpungeVm {
    pub uuid: Uuid,
    #[serde(default)]
    pub force: bool,
}
impl Message for ExpungeVm {
    type Reply = ();
    const NAME: &'static str = "vm.expunge";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

pub(crate) fn vm_queue(vm: Uuid) -> String {
    format!("vm-{vm}")
}

/// Tell the VM hooks that `op` ended well on `vm`. The VM is read for them only when a plugin
/// listens: the read ended every operation, and a cloud without VM plugins had no use for it.
pub(crate) async fn after(c: &Cloud, op: VmOp, vm: Uuid) -> Result<(), Error> {
    if c.engine.ext.vm_hooks.is_empty() {
        return Ok(());
    }
    let vm = c.get::<Vm>(vm).await?;
    c.engine.ext.vm_after(op, &info(&vm), Ok(())).await;
    Ok(())
}

pub(crate) fn info(vm: &Row<Vm>) -> VmInfo {
    VmInfo {
        uuid: vm.uuid,
        name: vm.name.clone(),
        host: vm.host_uuid,
        state: vm.state.as_str().to_string(),
    }
}

/// Change a VM's state, but only if it is still `from` (when given). Publishes the change.
pub(crate) async fn set_state(
    c: &Cloud,
    vm: Uuid,
    from: Option<VmState>,
    to: VmState,
) -> Result<bool, Error> {
    let mut u = Update::of::<Vm>(vm).set("state", to.as_str());
    if let Some(f) = from {
        if f == to {
            return Ok(true);
        }
        u = u.when_eq("state", f.as_str());
    }
    let changed = guarded(c, u).await?;
    if changed {
        c.bus().publish(
            "/vm/state/change",
            || serde_json::json!({"uuid": vm, "old": from.map(|f| f.as_str()), "new": to.as_str()}),
        );
    }
    Ok(changed)
}

/// Commit `update`, whose guards say whether it still applies: false, with nothing written,
/// when a guard does not hold or the row is gone.
pub(crate) async fn guarded(c: &Cloud, update: Update) -> Result<bool, Error> {
    match c.db().commit(Batch::new().update(update)).await {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.class(),
                ErrorClass::ConditionFailed | ErrorClass::NotFound
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The queue a volume's operations run in: its VM's while attached (`vm`), else its own.
pub(crate) fn volume_owner_queue(volume: Uuid, vm: Option<Uuid>) -> String {
    match vm {
        Some(vm) => vm_queue(vm),
        None => volume::volume_queue(volume),
    }
}

/// The most of a VM's console one request returns.
pub const CONSOLE_MAX_BYTES: u64 = 1 << 20;

/// The end of `vm`'s serial console (`max_bytes` at most, up to [`CONSOLE_MAX_BYTES`]), as its
/// host has it. A read: it takes no queue.
pub async fn console(
    c: &Cloud,
    vm: Uuid,
    max_bytes: u64,
) -> Result<stratus_agent_protocol::ConsoleReply, Error> {
    if max_bytes == 0 || max_bytes > CONSOLE_MAX_BYTES {
        return Err(Error::invalid(format!(
            "bytes must be 1..={CONSOLE_MAX_BYTES}, not {max_bytes}"
        )));
    }
    let row = c.get::<Vm>(vm).await?;
    let Some(host) = row.host_uuid else {
        return Err(Error::new(
            crate::error::ErrorCode::Conflict,
            format!("VM {vm} is on no host ({:?}): it has no console", row.state),
        ));
    };
    let target = c.host_target(host).await?;
    agent(
        c,
        &target,
        &stratus_agent_protocol::VmConsoleCmd { vm, max_bytes },
    )
    .await
}

/// Send a command to a host's agent with the configured timeout for its kind.
pub(crate) async fn agent<C: Command>(
    c: &Cloud,
    target: &HostTarget,
    cmd: &C,
) -> Result<C::Reply, Error> {
    let timeout: Duration = AgentClient::timeout(&c.engine.config, C::KIND);
    c.agents.call(target, cmd, timeout).await
}

/// Retry a step that must not fail (past an operation's point of no return) on transient
/// errors, with backoff.
pub(crate) async fn must<T, F, Fut>(c: &Cloud, what: &str, mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let attempts: i64 = c.engine.config.get(&STORE_RETRIES.key());
    let mut delay = Duration::from_millis(100);
    let mut last = None;
    for _ in 0..attempts.max(1) {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::StoreFailure | ErrorCode::Timeout | ErrorCode::HostUnreachable
                ) =>
            {
                tracing::warn!(step = what, error = %e, "retrying a step that must succeed");
                last = Some(e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::internal(format!("{what} failed"))))
}

/// A VM in the way of a deletion refuses unless destroyed; forced, it is expunged.
struct VmParticipant {
    db: Db,
    bus: Bus,
}

#[async_trait]
impl CascadeParticipant for VmParticipant {
    fn kind(&self) -> &'static str {
        "vm"
    }
    fn parents(&self) -> &'static [&'static str] {
        &["host", "primary_storage"]
    }
    async fn children(&self, parent_kind: &str, parent: Uuid) -> Result<Vec<Uuid>, Error> {
        let mut out: Vec<Uuid> = Vec::new();
        match parent_kind {
            "host" => {
                for f in ["host_uuid", "last_host_uuid"] {
                    out.extend(crate::cascade::children_by_field(&self.db, "vm", f, parent).await?);
                }
            }
            "primary_storage" => {
                let vols = self
                    .db
                    .select::<Volume>(
                        &Query::of::<Volume>()
                            .eq("ps_uuid", parent)
                            .not_null("vm_uuid"),
                    )
                    .await?;
                out.extend(vols.iter().filter_map(|v| v.vm_uuid));
            }
            _ => {}
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
    async fn check(&self, uuid: Uuid) -> Result<(), Error> {
        match self.db.get::<Vm>(uuid).await? {
            Some(vm) if vm.state != VmState::Destroyed => Err(Error::new(
                ErrorCode::InUse,
                format!("vm {uuid} ({}) is {}", vm.name, vm.state),
            )),
            _ => Ok(()),
        }
    }
    async fn delete(&self, uuid: Uuid) -> Result<(), Error> {
        self.bus.send(ExpungeVm { uuid, force: false }).await
    }
    async fn force_delete(&self, uuid: Uuid) -> Result<(), Error> {
        match self.bus.send(ExpungeVm { uuid, force: true }).await {
            Err(e) if e.code == ErrorCode::NotFound => Ok(()),
            other => other,
        }
    }
}

/// A NIC on an L3 being deleted refuses; forced, its address is returned and the NIC removed.
struct NicParticipant {
    db: Db,
}

#[async_trait]
impl CascadeParticipant for NicParticipant {
    fn kind(&self) -> &'static str {
        "vm_nic"
    }
    fn parents(&self) -> &'static [&'static str] {
        &["l3_network"]
    }
    async fn children(&self, _pk: &str, parent: Uuid) -> Result<Vec<Uuid>, Error> {
        crate::cascade::children_by_field(&self.db, "vm_nic", "l3_uuid", parent).await
    }
    async fn check(&self, uuid: Uuid) -> Result<(), Error> {
        let n = self.db.must_get::<VmNic>(uuid).await?;
        Err(Error::new(
            ErrorCode::InUse,
            format!("NIC {} of vm {} is on it", n.mac, n.vm_uuid),
        ))
    }
    async fn delete(&self, uuid: Uuid) -> Result<(), Error> {
        if let Some(n) = self.db.get::<VmNic>(uuid).await? {
            super::network::release(&self.db, n.l3_uuid, uuid).await?;
            self.db
                .commit(Batch::new().delete::<VmNic>(uuid, stratus_store::Expect::Maybe))
                .await?;
        }
        Ok(())
    }
}

pub fn participants(db: &Db, bus: &Bus) -> Vec<Arc<dyn CascadeParticipant>> {
    vec![
        Arc::new(VmParticipant {
            db: db.clone(),
            bus: bus.clone(),
        }),
        Arc::new(NicParticipant { db: db.clone() }),
        volume::participant(db, bus),
    ]
}

/// Every workflow of the VM and volume services with its steps in order, built without a cloud
/// (nothing runs). Tests drive their fault injection from it, so a step added to a chain is
/// covered without editing them.
pub fn chain_catalogue() -> Vec<(&'static str, Vec<crate::flow::FlowInfo>)> {
    let w = std::sync::Weak::new();
    let mut all = handlers::Chains::new(&w).catalogue();
    let attach = volume::attach_chain(&w);
    let detach = volume::detach_chain(&w);
    let delete = volume::delete_chain(&w);
    all.push((attach.name(), attach.flows()));
    all.push((detach.name(), detach.flows()));
    all.push((delete.name(), delete.flows()));
    all
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    handlers::register(cloud)?;
    volume::register(cloud)?;
    sync::register(cloud)?;
    Ok(())
}
