//! Data volumes: create (placed on a host when first attached — local storage), attach, detach,
//! delete. Attach and detach run in the VM's queue; the rest in the volume's.

use super::{agent, vm_queue};
use crate::bus::{Bus, Message};
use crate::cascade::CascadeParticipant;
use crate::error::{Error, ErrorCode};
use crate::flow::{ChainTarget, Flow, FlowChain};
use crate::model::*;
use crate::services::quota::{self, Charge};
use crate::services::{check_name, give_back_err, Cloud};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Weak};
use stratus_agent_protocol::{
    AttachVolumeCmd, CreateVolumeCmd, DeleteVolumeCmd, DetachVolumeCmd, DiskSpec,
};
use stratus_store::ErrorClass;
use stratus_store::{Batch, Db, Expect, Json, Query, Row, Update, Value};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDataVolume {
    #[serde(default)]
    pub uuid: Option<Uuid>,
    pub name: String,
    #[serde(default)]
    pub disk_offering_uuid: Option<Uuid>,
    #[serde(default)]
    pub size_mib: Option<i64>,
    /// Attach to this VM right away (placing the volume on the VM's host).
    #[serde(default)]
    pub vm_uuid: Option<Uuid>,
    /// The account it belongs to, set by the API from the caller (none: the cloud's own).
    #[serde(default)]
    pub account_uuid: Option<Uuid>,
}
impl Message for CreateDataVolume {
    type Reply = Row<Volume>;
    const NAME: &'static str = "volume.create";
    fn routing_key(&self) -> Option<Uuid> {
        self.vm_uuid.or(self.uuid)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachVolume {
    pub volume_uuid: Uuid,
    pub vm_uuid: Uuid,
}
impl Message for AttachVolume {
    type Reply = Row<Volume>;
    const NAME: &'static str = "volume.attach";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.vm_uuid)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachVolume {
    pub volume_uuid: Uuid,
    /// The VM it is attached to (filled in by the API so the message reaches the VM's owner).
    pub vm_uuid: Uuid,
}
impl Message for DetachVolume {
    type Reply = Row<Volume>;
    const NAME: &'static str = "volume.detach";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.vm_uuid)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteVolume {
    pub uuid: Uuid,
    /// Detach first if attached; skip an unreachable host (state sync cleans up later).
    #[serde(default)]
    pub force: bool,
}
impl Message for DeleteVolume {
    type Reply = ();
    const NAME: &'static str = "volume.delete";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

pub(super) fn volume_queue(v: Uuid) -> String {
    format!("volume-{v}")
}

/// Delete a volume row and return its local storage (idempotent; a missing row is fine).
pub(crate) async fn forget_volume_row(c: &Cloud, volume: Uuid) -> Result<(), Error> {
    let Some(v) = c.db().get::<Volume>(volume).await? else {
        return Ok(());
    };
    let mut b = Batch::new().delete::<Volume>(volume, Expect::Version(v.version));
    if let (Some(ps), Some(host)) = (v.ps_uuid, v.host_uuid) {
        b = b.update(local_storage_give_back(ps, host, v.size_mib));
    }
    if let Some(u) = quota::give_back(v.account_uuid, &Charge::volumes(1, v.size_mib)) {
        b = b.update(u);
    }
    match c.db().commit(b).await {
        Ok(_) => {
            if let (Some(ps), Some(host)) = (v.ps_uuid, v.host_uuid) {
                c.allocator.disk_changed(host, ps, -v.size_mib);
            }
            Ok(())
        }
        Err(e) if matches!(e.class(), ErrorClass::NotFound | ErrorClass::Conflict) => Ok(()),
        Err(e) => Err(give_back_err(e, format!("deleting volume {volume}'s row"))),
    }
}

/// Place `v` on no host again (`NotInstantiated`), its local storage given back; refused when
/// the row changed since `v` was read.
pub(crate) async fn unplace_volume(c: &Cloud, v: &Row<Volume>) -> Result<(), Error> {
    let (Some(host), Some(ps)) = (v.host_uuid, v.ps_uuid) else {
        return Ok(());
    };
    let b = Batch::new()
        .update(local_storage_give_back(ps, host, v.size_mib))
        .update(
            Update::of::<Volume>(v.uuid)
                .version(v.version)
                .set("host_uuid", Value::Null)
                .set("ps_uuid", Value::Null)
                .set("state", VolumeState::NotInstantiated.as_str()),
        );
    (c.db().commit(b).await)
        .map_err(|e| give_back_err(e, format!("unplacing volume {}", v.uuid)))?;
    c.allocator.disk_changed(host, ps, -v.size_mib);
    Ok(())
}

/// Delete a volume on its host, then its row. With `force`, an unreachable host is skipped (the
/// host's next ping reports the orphan and state sync deletes it).
pub(crate) async fn delete_volume_everywhere(
    c: &Cloud,
    v: &Row<Volume>,
    force: bool,
) -> Result<(), Error> {
    delete_on_host(c, v, force).await?;
    super::must(c, "forget-volume", || forget_volume_row(c, v.uuid)).await
}

/// Delete `v` on its host, if it has one: done when the host no longer has it.
async fn delete_on_host(c: &Cloud, v: &Row<Volume>, force: bool) -> Result<(), Error> {
    if let Some(host) = v.host_uuid {
        let r = async {
            let target = c.host_target(host).await?;
            agent(c, &target, &DeleteVolumeCmd { volume: v.uuid }).await
        }
        .await;
        // A failure may be reported after the host deleted it (found by the model sweep, which
        // then had a Ready volume no host held): ask.
        let gone = match &r {
            Err(e) if e.code != ErrorCode::NotFound => {
                super::sync::gone_from(c, host, v.uuid).await
            }
            _ => false,
        };
        match r {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::NotFound => {}
            Err(_) if gone => {}
            Err(e) if force => {
                tracing::warn!(volume = %v.uuid, error = %e, "forced delete could not reach the host")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DeleteCtx {
    volume: Uuid,
    force: bool,
    /// Its state before this deletion (what the undo of `deleting` puts back).
    was: Option<VolumeState>,
}

/// Delete a detached volume: marked `Deleting` first, so that a node that dies after the host
/// deleted it leaves a record of what was under way — recovery finishes the chain — and not a
/// `Ready` volume no host holds (found by the swarm, once state sync said `Lost`).
pub(super) fn delete_chain(w: &Weak<Cloud>) -> FlowChain<DeleteCtx> {
    use super::chain::{step, step_fn};
    FlowChain::new("volume.delete")
        .then(step(w, "deleting", step_fn!(deleting)).undo(step_fn!(deleting_undo)))
        // Past the point of no return: once the command went, the data may be gone, and
        // going back to the state before would be a lie. Retried instead.
        .then(step(w, "delete-on-host", step_fn!(delete_on_its_host)).forward())
        .then(step(w, "forget-volume", step_fn!(forget_volume)).forward())
        .on_interrupt(crate::flow::OnInterrupt::Finish)
}

async fn deleting(c: Arc<Cloud>, ctx: &mut DeleteCtx) -> Result<(), Error> {
    let v = c.get::<Volume>(ctx.volume).await?;
    if v.state == VolumeState::Deleting {
        // Run again (a retry, a recovery): its own earlier run set it, in the volume's queue,
        // perhaps without journaling what it was (then: what a volume with its placement is).
        ctx.was.get_or_insert(if v.host_uuid.is_some() {
            VolumeState::Ready
        } else {
            VolumeState::NotInstantiated
        });
        return Ok(());
    }
    if v.state.is_transitional() {
        return Err(Error::new(
            ErrorCode::InvalidState,
            format!("volume {} is {}", v.uuid, v.state),
        ));
    }
    if let Some(vm) = v.vm_uuid {
        return Err(Error::new(
            ErrorCode::InUse,
            format!("volume {} is attached to vm {vm}; detach it first", v.uuid),
        ));
    }
    // Recorded first: the commit may apply though it reports a failure, and the undo must
    // then know what to put back.
    ctx.was = Some(v.state);
    let u = Update::of::<Volume>(v.uuid)
        .version(v.version)
        .set("state", VolumeState::Deleting.as_str());
    c.db().commit(Batch::new().update(u)).await?;
    Ok(())
}

/// Put back the state before the deletion — unless the host says the volume is gone (the
/// deletion ran there, though every answer was lost): then the row goes too.
async fn deleting_undo(c: Arc<Cloud>, ctx: &mut DeleteCtx) -> Result<(), Error> {
    let Some(was) = ctx.was else { return Ok(()) };
    let v = match c.db().get::<Volume>(ctx.volume).await? {
        Some(v) if v.state == VolumeState::Deleting => v,
        _ => return Ok(()),
    };
    if let Some(host) = v.host_uuid {
        if super::sync::gone_from(&c, host, v.uuid).await {
            return forget_volume_row(&c, v.uuid).await;
        }
    }
    let back = Update::of::<Volume>(ctx.volume)
        .when_eq("state", VolumeState::Deleting.as_str())
        .set("state", was.as_str());
    super::guarded(&c, back).await.map(drop)
}

async fn delete_on_its_host(c: Arc<Cloud>, ctx: &mut DeleteCtx) -> Result<(), Error> {
    let v = c.get::<Volume>(ctx.volume).await?;
    delete_on_host(&c, &v, ctx.force).await
}

async fn forget_volume(c: Arc<Cloud>, ctx: &mut DeleteCtx) -> Result<(), Error> {
    forget_volume_row(&c, ctx.volume).await
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct AttachCtx {
    volume: Uuid,
    vm: Uuid,
    host: Option<Uuid>,
    /// Placed on a host by this attach (so undo un-places it).
    placed: bool,
    running: bool,
    device: i64,
}

struct AttachStep {
    name: &'static str,
    cloud: Weak<Cloud>,
}

/// The database side of detaching `volume` from its VM.
pub(super) fn detachment(volume: Uuid) -> Update {
    Update::of::<Volume>(volume)
        .set("vm_uuid", Value::Null)
        .set("device_index", Value::Null)
}

fn gone() -> Error {
    Error::new(
        ErrorCode::NodeUnavailable,
        "the management node is shutting down",
    )
}

#[async_trait]
impl Flow<AttachCtx> for AttachStep {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn run(&self, ctx: &mut AttachCtx) -> Result<(), Error> {
        let c = self.cloud.upgrade().ok_or_else(gone)?;
        match self.name {
            "check" => {
                let vm = c.get::<Vm>(ctx.vm).await?;
                vm.state.check(vm.uuid, VmAction::AttachVolume)?;
                let v = c.get::<Volume>(ctx.volume).await?;
                if v.kind != VolumeType::Data {
                    return Err(Error::invalid(format!(
                        "volume {} is a root volume",
                        v.uuid
                    )));
                }
                if let Some(other) = v.vm_uuid {
                    return Err(Error::new(
                        ErrorCode::InUse,
                        format!("volume {} is attached to vm {other}", v.uuid),
                    ));
                }
                let home = vm
                    .host_uuid
                    .or(vm.last_host_uuid)
                    .ok_or_else(|| Error::internal("vm without a host"))?;
                if let Some(h) = v.host_uuid {
                    if h != home {
                        return Err(Error::invalid(format!(
                            "volume {} is on host {h}'s local storage; vm {} is on host {home}",
                            v.uuid, vm.uuid
                        )));
                    }
                }
                if v.state != VolumeState::Ready && v.state != VolumeState::NotInstantiated {
                    return Err(Error::new(
                        ErrorCode::InvalidState,
                        format!("volume {} is {}", v.uuid, v.state),
                    ));
                }
                ctx.host = Some(home);
                ctx.running = vm.state == VmState::Running;
                ctx.placed = v.state == VolumeState::NotInstantiated;
                let used = c
                    .db()
                    .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", ctx.vm))
                    .await?;
                ctx.device = used
                    .iter()
                    .filter_map(|u| u.device_index)
                    .max()
                    .unwrap_or(0)
                    + 1;
                Ok(())
            }
            "reserve-storage" if ctx.placed => {
                let host = ctx.host.expect("checked");
                let v = c.get::<Volume>(ctx.volume).await?;
                if v.host_uuid.is_some() {
                    return Ok(());
                }
                let shares = c
                    .db()
                    .select::<LocalStorage>(&Query::of::<LocalStorage>().eq("host_uuid", host))
                    .await?;
                let share = shares
                    .iter()
                    .find(|s| s.total_mib - s.used_mib >= v.size_mib)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorCode::CapacityExhausted,
                            format!(
                                "host {host} has no local storage room for {} MiB",
                                v.size_mib
                            ),
                        )
                    })?;
                let b = Batch::new()
                    .update(local_storage_take(share.ps_uuid, host, v.size_mib))
                    .update(
                        Update::of::<Volume>(v.uuid)
                            .version(v.version)
                            .set("host_uuid", host)
                            .set("ps_uuid", share.ps_uuid)
                            .set("state", VolumeState::Creating.as_str()),
                    );
                c.db().commit(b).await.map_err(|e| match e.class() {
                    ErrorClass::ConditionFailed => Error::new(
                        ErrorCode::CapacityExhausted,
                        format!("host {host} has no local storage room"),
                    ),
                    _ => e.into(),
                })?;
                c.allocator.disk_changed(host, share.ps_uuid, v.size_mib);
                Ok(())
            }
            "create-on-host" if ctx.placed => {
                let v = c.get::<Volume>(ctx.volume).await?;
                let target = c.host_target(ctx.host.expect("checked")).await?;
                agent(
                    &c,
                    &target,
                    &CreateVolumeCmd {
                        volume: v.uuid,
                        size_mib: v.size_mib as u64,
                        image: None,
                    },
                )
                .await?;
                c.db()
                    .commit(Batch::new().update(
                        Update::of::<Volume>(v.uuid).set("state", VolumeState::Ready.as_str()),
                    ))
                    .await?;
                Ok(())
            }
            "attach-on-hypervisor" if ctx.running => {
                let v = c.get::<Volume>(ctx.volume).await?;
                let target = c.host_target(ctx.host.expect("checked")).await?;
                let disk = DiskSpec {
                    volume: v.uuid,
                    device: ctx.device as u32,
                    size_mib: v.size_mib as u64,
                };
                agent(&c, &target, &AttachVolumeCmd { vm: ctx.vm, disk }).await
            }
            "record-attachment" => {
                let record = Update::of::<Volume>(ctx.volume)
                    .when(stratus_store::Cond::new(
                        "vm_uuid",
                        stratus_store::Op::IsNull,
                    ))
                    .set("vm_uuid", ctx.vm)
                    .set("device_index", ctx.device);
                match c.db().commit(Batch::new().update(record)).await {
                    Ok(_) => Ok(()),
                    // Run again (a retry, a recovery): recorded already, as this attachment.
                    Err(e) if e.class() == ErrorClass::ConditionFailed => {
                        let v = c.get::<Volume>(ctx.volume).await?;
                        if v.vm_uuid == Some(ctx.vm) && v.device_index == Some(ctx.device) {
                            Ok(())
                        } else {
                            Err(e.into())
                        }
                    }
                    Err(e) => Err(e.into()),
                }
            }
            _ => Ok(()),
        }
    }

    async fn rollback(&self, ctx: &mut AttachCtx) -> Result<(), Error> {
        let c = self.cloud.upgrade().ok_or_else(gone)?;
        match self.name {
            "record-attachment" => {
                // The record may have been written before the step failed: take back this
                // attachment's, never another's.
                let undo = detachment(ctx.volume)
                    .if_exists()
                    .when_eq("vm_uuid", ctx.vm)
                    .when_eq("device_index", ctx.device);
                // Its guard is what the step wrote: not holding, there is nothing to undo.
                super::guarded(&c, undo).await.map(drop)
            }
            "reserve-storage" if ctx.placed => {
                let Some(v) = c.db().get::<Volume>(ctx.volume).await? else {
                    return Ok(());
                };
                unplace_volume(&c, &v).await
            }
            "create-on-host" if ctx.placed => {
                let target = c.host_target(ctx.host.expect("checked")).await?;
                agent(&c, &target, &DeleteVolumeCmd { volume: ctx.volume }).await
            }
            "attach-on-hypervisor" if ctx.running => {
                let target = c.host_target(ctx.host.expect("checked")).await?;
                agent(
                    &c,
                    &target,
                    &DetachVolumeCmd {
                        vm: ctx.vm,
                        volume: ctx.volume,
                    },
                )
                .await
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DetachCtx {
    volume: Uuid,
    vm: Uuid,
    host: Option<Uuid>,
    running: bool,
    device: i64,
}

struct DetachStep {
    name: &'static str,
    cloud: Weak<Cloud>,
}

#[async_trait]
impl Flow<DetachCtx> for DetachStep {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn run(&self, ctx: &mut DetachCtx) -> Result<(), Error> {
        let c = self.cloud.upgrade().ok_or_else(gone)?;
        match self.name {
            "check" => {
                let vm = c.get::<Vm>(ctx.vm).await?;
                vm.state.check(vm.uuid, VmAction::DetachVolume)?;
                let v = c.get::<Volume>(ctx.volume).await?;
                if v.kind != VolumeType::Data {
                    return Err(Error::invalid(format!(
                        "volume {} is a root volume and cannot be detached",
                        v.uuid
                    )));
                }
                if v.vm_uuid != Some(ctx.vm) {
                    return Err(Error::invalid(format!(
                        "volume {} is not attached to vm {}",
                        v.uuid, ctx.vm
                    )));
                }
                ctx.host = vm.host_uuid;
                ctx.running = vm.state == VmState::Running;
                // Attached, so it has its device index (set and cleared with its VM).
                let Some(device) = v.device_index else {
                    return Err(Error::invariant(format!(
                        "volume {} is attached to vm {} without a device index",
                        v.uuid, ctx.vm
                    )));
                };
                ctx.device = device;
                Ok(())
            }
            "detach-on-hypervisor" if ctx.running => {
                let target = c
                    .host_target(ctx.host.expect("running vm has a host"))
                    .await?;
                agent(
                    &c,
                    &target,
                    &DetachVolumeCmd {
                        vm: ctx.vm,
                        volume: ctx.volume,
                    },
                )
                .await
            }
            "record-detachment" => {
                c.db()
                    .commit(Batch::new().update(detachment(ctx.volume)))
                    .await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn rollback(&self, ctx: &mut DetachCtx) -> Result<(), Error> {
        let c = self.cloud.upgrade().ok_or_else(gone)?;
        if self.name == "record-detachment" {
            // The record may have been cleared before the step failed: put this attachment
            // back, unless the volume is recorded elsewhere by now.
            let back = Update::of::<Volume>(ctx.volume)
                .if_exists()
                .when(stratus_store::Cond::new(
                    "vm_uuid",
                    stratus_store::Op::IsNull,
                ))
                .set("vm_uuid", ctx.vm)
                .set("device_index", ctx.device);
            return super::guarded(&c, back).await.map(drop);
        }
        if self.name == "detach-on-hypervisor" && ctx.running {
            let v = c.get::<Volume>(ctx.volume).await?;
            let target = c
                .host_target(ctx.host.expect("running vm has a host"))
                .await?;
            let disk = DiskSpec {
                volume: v.uuid,
                device: ctx.device as u32,
                size_mib: v.size_mib as u64,
            };
            agent(&c, &target, &AttachVolumeCmd { vm: ctx.vm, disk }).await?;
        }
        Ok(())
    }
}

/// Detached volumes on a host or primary storage being deleted refuse; forced, they go.
struct VolumeParticipant {
    db: Db,
    bus: Bus,
}

#[async_trait]
impl CascadeParticipant for VolumeParticipant {
    fn kind(&self) -> &'static str {
        "volume"
    }
    fn parents(&self) -> &'static [&'static str] {
        &["host", "primary_storage"]
    }
    async fn children(&self, parent_kind: &str, parent: Uuid) -> Result<Vec<Uuid>, Error> {
        let field = if parent_kind == "host" {
            "host_uuid"
        } else {
            "ps_uuid"
        };
        Ok(self
            .db
            .select::<Volume>(&Query::of::<Volume>().eq(field, parent).is_null("vm_uuid"))
            .await?
            .iter()
            .map(|v| v.uuid)
            .collect())
    }
    async fn check(&self, uuid: Uuid) -> Result<(), Error> {
        Err(Error::new(
            ErrorCode::InUse,
            format!("data volume {uuid} is on it"),
        ))
    }
    async fn delete(&self, uuid: Uuid) -> Result<(), Error> {
        match self.bus.send(DeleteVolume { uuid, force: true }).await {
            Err(e) if e.code == ErrorCode::NotFound => Ok(()),
            other => other,
        }
    }
}

pub(crate) fn participant(db: &Db, bus: &Bus) -> Arc<dyn CascadeParticipant> {
    Arc::new(VolumeParticipant {
        db: db.clone(),
        bus: bus.clone(),
    })
}

async fn attach(
    c: &Arc<Cloud>,
    chain: &Arc<FlowChain<AttachCtx>>,
    volume: Uuid,
    vm: Uuid,
) -> Result<Row<Volume>, Error> {
    let ctx = AttachCtx {
        volume,
        vm,
        host: None,
        placed: false,
        running: false,
        device: 0,
    };
    let target = ChainTarget {
        resource: vm,
        queue: vm_queue(vm),
        job: None,
    };
    // In the volume's queue too: state sync deletes the copy of a volume placed on no host
    // there (`unplaced_copy`), and must not meet an attach between placing the volume and
    // creating it on the host.
    let q = &c.engine.queues;
    let attach = async {
        (chain.run(&c.engine.journal, target, ctx).await).map_err(|f| f.into_error(volume))
    };
    q.run(&vm_queue(vm), 1, q.run(&volume_queue(volume), 1, attach))
        .await?;
    c.get::<Volume>(volume).await
}

pub(super) fn attach_chain(w: &Weak<Cloud>) -> FlowChain<AttachCtx> {
    let a = |name| AttachStep {
        name,
        cloud: w.clone(),
    };
    FlowChain::new("volume.attach")
        .then(a("check"))
        .then(a("reserve-storage"))
        .then(a("create-on-host"))
        .then(a("attach-on-hypervisor"))
        .then(a("record-attachment"))
}

pub(super) fn detach_chain(w: &Weak<Cloud>) -> FlowChain<DetachCtx> {
    let d = |name| DetachStep {
        name,
        cloud: w.clone(),
    };
    FlowChain::new("volume.detach")
        .then(d("check"))
        .then(d("detach-on-hypervisor"))
        .then(d("record-detachment"))
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    let w = Arc::downgrade(cloud);
    let attach_chain = Arc::new(attach_chain(&w));
    let detach_chain = Arc::new(detach_chain(&w));
    let delete_chain = Arc::new(delete_chain(&w));
    cloud.engine.chains.register(attach_chain.clone());
    cloud.engine.chains.register(detach_chain.clone());
    cloud.engine.chains.register(delete_chain.clone());

    let ch = attach_chain.clone();
    cloud.handle(move |c: Arc<Cloud>, m: CreateDataVolume| {
        let ch = ch.clone();
        async move {
            check_name("volume", &m.name)?;
            let (size, offering) = match (m.disk_offering_uuid, m.size_mib) {
                (Some(o), None) => (c.get::<DiskOffering>(o).await?.size_mib, Some(o)),
                (None, Some(s)) if s > 0 => (s, None),
                (None, Some(s)) => {
                    return Err(Error::invalid(format!(
                        "size_mib must be positive; got {s}"
                    )))
                }
                _ => {
                    return Err(Error::invalid(
                        "give exactly one of disk_offering_uuid and size_mib",
                    ))
                }
            };
            if let Some(vm) = m.vm_uuid {
                c.must_exist::<Vm>(vm).await?;
            }
            let uuid = m.uuid.unwrap_or_else(|| c.engine.ids.uuid());
            let row = Row::new(
                uuid,
                Volume {
                    name: m.name,
                    kind: VolumeType::Data,
                    vm_uuid: None,
                    ps_uuid: None,
                    host_uuid: None,
                    size_mib: size,
                    state: VolumeState::NotInstantiated,
                    device_index: None,
                    disk_offering_uuid: offering,
                    image_uuid: None,
                    tags: Json(vec![]),
                    account_uuid: m.account_uuid,
                },
            );
            // The volume and its owner's quota together.
            let charge = Charge::volumes(1, size);
            let mut b = Batch::new().insert(&row);
            if let Some(u) = quota::take(c.db(), m.account_uuid, &charge).await? {
                b = b.update(u);
            }
            if let Err(e) = c.db().commit(b).await {
                let quota = match e.class() {
                    ErrorClass::ConditionFailed => {
                        quota::exceeded(c.db(), m.account_uuid, &charge).await?
                    }
                    _ => None,
                };
                return Err(quota.unwrap_or_else(|| e.into()));
            }
            match m.vm_uuid {
                None => c.get::<Volume>(uuid).await,
                Some(vm) => match attach(&c, &ch, uuid, vm).await {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        // Create-and-attach failed: the volume goes too.
                        forget_volume_row(&c, uuid).await?;
                        Err(e)
                    }
                },
            }
        }
    })?;
    let ch = attach_chain.clone();
    cloud.handle(move |c: Arc<Cloud>, m: AttachVolume| {
        let ch = ch.clone();
        async move {
            let _ = c.get::<Volume>(m.volume_uuid).await?;
            attach(&c, &ch, m.volume_uuid, m.vm_uuid).await
        }
    })?;
    let ch = detach_chain.clone();
    cloud.handle(move |c: Arc<Cloud>, m: DetachVolume| {
        let ch = ch.clone();
        async move {
            let _ = c.get::<Volume>(m.volume_uuid).await?;
            let ctx = DetachCtx {
                volume: m.volume_uuid,
                vm: m.vm_uuid,
                host: None,
                running: false,
                device: 0,
            };
            let target = ChainTarget {
                resource: m.vm_uuid,
                queue: vm_queue(m.vm_uuid),
                job: None,
            };
            let detach = async {
                (ch.run(&c.engine.journal, target, ctx).await)
                    .map_err(|f| f.into_error(m.volume_uuid))
            };
            c.engine.queues.run(&vm_queue(m.vm_uuid), 1, detach).await?;
            c.get::<Volume>(m.volume_uuid).await
        }
    })?;
    let ch = delete_chain.clone();
    cloud.handle(move |c: Arc<Cloud>, m: DeleteVolume| {
        let ch = ch.clone();
        async move {
            let v = c.get::<Volume>(m.uuid).await?;
            if let Some(vm) = v.vm_uuid {
                if v.kind == VolumeType::Root {
                    return Err(Error::invalid(format!(
                        "volume {} is vm {vm}'s root volume; expunge the vm",
                        v.uuid
                    )));
                }
                if !m.force {
                    return Err(Error::new(
                        ErrorCode::InUse,
                        format!("volume {} is attached to vm {vm}; detach it first", v.uuid),
                    ));
                }
                c.bus()
                    .send(DetachVolume {
                        volume_uuid: v.uuid,
                        vm_uuid: vm,
                    })
                    .await?;
            }
            let ctx = DeleteCtx {
                volume: m.uuid,
                force: m.force,
                was: None,
            };
            let target = ChainTarget {
                resource: m.uuid,
                queue: volume_queue(m.uuid),
                job: None,
            };
            let delete = async {
                (ch.run(&c.engine.journal, target, ctx).await).map_err(|f| f.into_error(m.uuid))?;
                Ok(())
            };
            c.engine.queues.run(&volume_queue(m.uuid), 1, delete).await
        }
    })?;
    Ok(())
}
