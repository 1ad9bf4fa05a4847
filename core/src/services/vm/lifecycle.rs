//! Destroy (recoverable), recover, expunge. Destroy's point of no return is the host dropping
//! the VM: after it, capacity, addresses and data volumes are returned with retries and a crash
//! is finished by recovery. Expunge only goes forward.

use super::chain::{changed_meanwhile, release_reservations, step, step_fn, Step};
use super::power::{release_host, restore_prev, run_again, PowerCtx};
use super::{after, agent, info, set_state};
use crate::error::Error;
use crate::extension::VmOp;
use crate::flow::{FlowChain, OnInterrupt};
use crate::model::*;
use crate::services::network::{AllocateIp, ReleaseIps};
use crate::services::quota::{self, Charge};
use crate::services::Cloud;
use std::sync::{Arc, Weak};
use stratus_agent_protocol::DestroyVmCmd;
use stratus_store::{Batch, ErrorClass, Expect, Query};
use uuid::Uuid;

fn s(w: &Weak<Cloud>, name: &'static str, run: super::chain::StepFn<PowerCtx>) -> Step<PowerCtx> {
    step(w, name, run)
}

pub(super) fn destroy_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.destroy")
        .on_interrupt(OnInterrupt::Finish)
        .then(s(w, "destroying", step_fn!(destroying)).undo(step_fn!(restore_prev)))
        .then(s(w, "destroy-on-hypervisor", step_fn!(destroy)).undo(step_fn!(run_again)))
        .then(s(w, "release-host", step_fn!(release_host)).forward())
        .then(s(w, "release-ips", step_fn!(release_ips)).forward())
        .then(s(w, "detach-data-volumes", step_fn!(detach_data_volumes)).forward())
        .then(s(w, "mark-destroyed", step_fn!(destroyed)).forward())
}

pub(super) fn recover_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.recover")
        .then(s(w, "check-destroyed", step_fn!(check_destroyed)))
        .then(s(w, "allocate-ips", step_fn!(allocate_ips)).undo(step_fn!(release_ips)))
        .then(s(w, "mark-stopped", step_fn!(recovered)).undo(step_fn!(recovered_undo)))
}

pub(super) fn expunge_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.expunge")
        .on_interrupt(OnInterrupt::Finish)
        .then(
            // A host that cannot be reached keeps the volumes: the VM goes back to Destroyed
            // and the expunge can be tried again (found by the model sweep: it stayed
            // Expunging for good).
            s(w, "expunging", step_fn!(expunging)).undo(step_fn!(restore_prev)),
        )
        .then(s(w, "delete-volumes", step_fn!(delete_volumes)).forward())
        .then(s(w, "delete-nics-and-vm", step_fn!(delete_vm)).forward())
}

async fn destroying(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    if vm.state == VmState::Destroying {
        // Resumed by recovery.
        ctx.host = vm.host_uuid.or(vm.last_host_uuid);
        return Ok(());
    }
    if !ctx.force {
        vm.state.check(vm.uuid, VmAction::Destroy)?;
        c.engine.ext.vm_before(VmOp::Destroy, &info(&vm)).await?;
    }
    ctx.prev = Some(vm.state);
    ctx.host = vm.host_uuid.or(vm.last_host_uuid);
    changed_meanwhile(
        set_state(&c, ctx.vm, Some(vm.state), VmState::Destroying).await?,
        ctx.vm,
    )
}

async fn destroy(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let Some(host) = ctx.host else { return Ok(()) };
    let r = async {
        let target = c.host_target(host).await?;
        agent(&c, &target, &DestroyVmCmd { vm: ctx.vm }).await
    }
    .await;
    match r {
        Ok(()) => Ok(()),
        // Forced (a cascade): an unreachable host is cleaned up by state sync later.
        Err(e) if ctx.force => {
            tracing::warn!(vm = %ctx.vm, error = %e, "forced destroy could not reach the host");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

async fn release_ips(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    for n in c
        .db()
        .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", ctx.vm))
        .await?
    {
        c.bus()
            .send(ReleaseIps {
                l3_uuid: n.l3_uuid,
                nic_uuid: n.uuid,
            })
            .await?;
    }
    Ok(())
}

async fn detach_data_volumes(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let data = c
        .db()
        .select::<Volume>(
            &Query::of::<Volume>()
                .eq("vm_uuid", ctx.vm)
                .eq("kind", VolumeType::Data.as_str()),
        )
        .await?;
    let b = data.iter().fold(Batch::new(), |b, v| {
        b.update(super::volume::detachment(v.uuid))
    });
    c.db().commit(b).await?;
    Ok(())
}

async fn destroyed(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Destroying), VmState::Destroyed).await?;
    after(&c, VmOp::Destroy, ctx.vm).await?;
    Ok(())
}

async fn check_destroyed(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    vm.state.check(vm.uuid, VmAction::Recover)?;
    c.engine.ext.vm_before(VmOp::Recover, &info(&vm)).await
}

async fn allocate_ips(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    for n in c
        .db()
        .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", ctx.vm))
        .await?
    {
        c.bus()
            .send(AllocateIp {
                l3_uuid: n.l3_uuid,
                nic_uuid: n.uuid,
                ip: None,
            })
            .await?;
    }
    Ok(())
}

async fn recovered(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Destroyed), VmState::Stopped).await?;
    after(&c, VmOp::Recover, ctx.vm).await?;
    Ok(())
}

async fn recovered_undo(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Stopped), VmState::Destroyed).await?;
    Ok(())
}

async fn expunging(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    // Set before the write: a write reported failed may have applied, and the undo restores
    // this (found by store faults: the VM stayed Expunging).
    ctx.prev = Some(VmState::Destroyed);
    if vm.state != VmState::Expunging {
        vm.state.check(vm.uuid, VmAction::Expunge)?;
        c.engine.ext.vm_before(VmOp::Expunge, &info(&vm)).await?;
        set_state(&c, ctx.vm, Some(VmState::Destroyed), VmState::Expunging).await?;
    }
    Ok(())
}

/// The VM's own volumes (its root; data volumes were detached at destroy) go, host and row.
async fn delete_volumes(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    for v in c
        .db()
        .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", ctx.vm))
        .await?
    {
        super::volume::delete_volume_everywhere(&c, &v, ctx.force).await?;
    }
    Ok(())
}

async fn delete_vm(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let nics = c
        .db()
        .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", ctx.vm))
        .await?;
    for n in &nics {
        c.bus()
            .send(ReleaseIps {
                l3_uuid: n.l3_uuid,
                nic_uuid: n.uuid,
            })
            .await?;
    }
    release_reservations(&c, ctx.vm, None).await?;
    let b = nics.iter().fold(Batch::new(), |b, n| {
        b.delete::<VmNic>(n.uuid, Expect::Maybe)
    });
    forget_vm_row_with(&c, ctx.vm, b).await?;
    c.bus().publish(
        "/vm/state/change",
        || serde_json::json!({"uuid": ctx.vm, "old": "Expunging", "new": "Expunged"}),
    );
    Ok(())
}

/// Delete a VM's row and give its owner's quota back, in one batch (idempotent: a VM already
/// gone is fine).
pub(super) async fn forget_vm_row(c: &Cloud, vm: Uuid) -> Result<(), Error> {
    forget_vm_row_with(c, vm, Batch::new()).await
}

/// [`forget_vm_row`] with other writes of `b` in the same batch.
async fn forget_vm_row_with(c: &Cloud, vm: Uuid, b: Batch) -> Result<(), Error> {
    let Some(v) = c.db().get::<Vm>(vm).await? else {
        if !b.is_empty() {
            c.db().commit(b).await?;
        }
        return Ok(());
    };
    let mut b = b.delete::<Vm>(vm, Expect::Exists);
    if let Some(u) = quota::give_back(v.account_uuid, &Charge::vm(v.cpu, v.memory_mib)) {
        b = b.update(u);
    }
    match c.db().commit(b).await {
        Ok(_) => Ok(()),
        Err(e) if e.class() == ErrorClass::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}
