//! Live migration within a cluster; the VM's local volumes move with it. The destination's CPU,
//! memory and disk are held by one reservation until the switch; a migration that failed, or
//! whose answer was lost, is undone: if the VM reached the destination it is migrated back.

use super::chain::{
    changed_meanwhile, l2s_of, l3s_of, probe, release_reservations, step, step_fn, Step,
};
use super::{after, agent, info, set_state};
use crate::error::{Error, ErrorCode};
use crate::extension::{AllocationSpec, VmOp};
use crate::flow::FlowChain;
use crate::model::*;
use crate::services::allocator::{AllocateHost, Allocation};
use crate::services::Cloud;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Weak};
use stratus_agent_protocol::{MigrateVmCmd, PowerState};
use stratus_store::Query;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct MigrateCtx {
    pub(super) vm: Uuid,
    pub(super) src: Uuid,
    pub(super) dest_req: Option<Uuid>,
    pub(super) dest: Option<Uuid>,
}

fn s(
    w: &Weak<Cloud>,
    name: &'static str,
    run: super::chain::StepFn<MigrateCtx>,
) -> Step<MigrateCtx> {
    step(w, name, run)
}

pub(super) fn chain(w: &Weak<Cloud>) -> FlowChain<MigrateCtx> {
    FlowChain::new("vm.migrate")
        .then(s(w, "migrating", step_fn!(migrating)).undo(step_fn!(migrating_undo)))
        .then(
            s(w, "allocate-destination", step_fn!(allocate_destination))
                .undo(step_fn!(release_destination)),
        )
        .then(s(w, "migrate-on-hypervisor", step_fn!(migrate)).undo(step_fn!(migrate_back)))
        .then(s(w, "switch-host", step_fn!(switch_host)).forward())
}

async fn migrating(c: Arc<Cloud>, ctx: &mut MigrateCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    if vm.state == VmState::Migrating {
        // Run again (a retry, a recovery): its own earlier run set it, in the VM's queue.
        return Ok(());
    }
    vm.state.check(vm.uuid, VmAction::Migrate)?;
    c.engine.ext.vm_before(VmOp::Migrate, &info(&vm)).await?;
    changed_meanwhile(
        set_state(&c, ctx.vm, Some(VmState::Running), VmState::Migrating).await?,
        ctx.vm,
    )
}

async fn migrating_undo(c: Arc<Cloud>, ctx: &mut MigrateCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Migrating), VmState::Running).await?;
    Ok(())
}

async fn allocate_destination(c: Arc<Cloud>, ctx: &mut MigrateCtx) -> Result<(), Error> {
    if let Some(dest) = ctx.dest {
        // Run again (a retry, a recovery): the destination its earlier run reserved stands;
        // another would hold capacity twice.
        let held = c
            .db()
            .get::<Reservation>(reservation_uuid(ctx.vm, dest))
            .await?;
        if held.is_some() {
            return Ok(());
        }
    }
    let vm = c.get::<Vm>(ctx.vm).await?;
    let disk: i64 = c
        .db()
        .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", ctx.vm))
        .await?
        .iter()
        .map(|v| v.size_mib)
        .sum();
    let spec = AllocationSpec {
        cpu: vm.cpu,
        memory_mib: vm.memory_mib,
        disk_mib: disk,
        l2_networks: l2s_of(&c, &l3s_of(&c, vm.uuid).await?).await?,
        zone: Some(vm.zone_uuid),
        cluster: vm.cluster_uuid,
        host: ctx.dest_req,
        avoid_hosts: vec![ctx.src],
    };
    let a: Allocation = c
        .bus()
        .send(AllocateHost {
            vm: ctx.vm,
            spec,
            hold_disk: true,
        })
        .await?;
    ctx.dest = Some(a.host);
    Ok(())
}

/// Release whatever the VM holds on hosts other than its source.
async fn release_destination(c: Arc<Cloud>, ctx: &mut MigrateCtx) -> Result<(), Error> {
    release_reservations(&c, ctx.vm, Some(ctx.src)).await
}

async fn migrate(c: Arc<Cloud>, ctx: &mut MigrateCtx) -> Result<(), Error> {
    let dest = ctx.dest.expect("destination allocated");
    let src = c.host_target(ctx.src).await?;
    let d = c.host_target(dest).await?;
    let cmd = MigrateVmCmd {
        vm: ctx.vm,
        dest_address: d.address.to_string(),
        dest_token: d.token.clone(),
    };
    // Run again (a retry, a recovery): the earlier run's migration may have happened. Its
    // command no longer runs (a taken-over chain is fenced on the source first), so the hosts'
    // word is final.
    c.agents.settle(&src).await?;
    if probe(&c, dest, ctx.vm).await == Some(PowerState::Running)
        && probe(&c, ctx.src, ctx.vm).await.is_none()
    {
        return Ok(());
    }
    // A failure, even one whose VM did reach the destination, is undone by `migrate_back`,
    // which first fences the source. Concluding here from what the destination says would act
    // while the migration may still run on the source: its late release there deleted the
    // disks that a migration back had just brought (swarm seed 8282).
    agent(&c, &src, &cmd).await
}

/// If the VM already reached the destination, bring it back — once the migration command can
/// no longer run: a migration still under way (its answer lost, or a restarted node's recovery
/// undoing it) and a migration back would each release a copy of the disks, and lose them both.
/// The source is fenced first (the destination is asked only then), since the migration runs
/// there.
async fn migrate_back(c: Arc<Cloud>, ctx: &mut MigrateCtx) -> Result<(), Error> {
    let Some(dest) = ctx.dest else { return Ok(()) };
    let s = c.host_target(ctx.src).await?;
    c.agents.settle(&s).await?;
    // Fenced here too, so that a fence that fails fails the undo (which is retried) instead of
    // reading as "not there".
    let d = c.host_target(dest).await?;
    c.agents.settle(&d).await?;
    if probe(&c, dest, ctx.vm).await != Some(PowerState::Running) {
        return Ok(());
    }
    let back = MigrateVmCmd {
        vm: ctx.vm,
        dest_address: s.address.to_string(),
        dest_token: s.token.clone(),
    };
    agent(&c, &d, &back).await
}

async fn switch_host(c: Arc<Cloud>, ctx: &mut MigrateCtx) -> Result<(), Error> {
    let dest = ctx.dest.expect("destination allocated");
    // The disks the destination holds, not those the database says moved (`Moving`).
    let Some(held) = super::sync::volumes_held(&c, dest).await? else {
        return Err(Error::new(
            ErrorCode::HostUnreachable,
            format!("host {dest} does not answer as itself"),
        ));
    };
    super::sync::relocate(
        &c,
        ctx.vm,
        ctx.src,
        dest,
        VmState::Migrating,
        super::sync::Moving::Migrated(held),
    )
    .await?;
    after(&c, VmOp::Migrate, ctx.vm).await?;
    Ok(())
}
