//! Start, stop and reboot. A VM on local storage starts on the host that holds its volumes.
//! Stop and reboot pass their point of no return when the host acts; the steps after it are
//! retried rather than rolled back, and after a crash recovery finishes a stop.

use super::chain::{
    changed_meanwhile, l2s_of, l3s_of, release_reservations, step, step_fn, vm_spec, Step,
};
use super::{after, agent, info, set_state, STOP_GRACE};
use crate::error::Error;
use crate::extension::{AllocationSpec, VmOp};
use crate::flow::{FlowChain, OnInterrupt};
use crate::model::*;
use crate::services::allocator::{AllocateHost, Allocation};
use crate::services::Cloud;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Weak};
use std::time::Duration;
use stratus_agent_protocol::{RebootVmCmd, StartVmCmd, StopVmCmd};
use stratus_store::{Batch, Update, Value};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PowerCtx {
    pub(super) vm: Uuid,
    /// The state before the operation (restored on rollback); None until the first step ran.
    /// (Not `Unknown` for "unset": a VM on a disconnected host is Unknown, and a failed destroy
    /// of it must put it back to Unknown, not leave it Destroying.)
    #[serde(default)]
    pub(super) prev: Option<VmState>,
    pub(super) host: Option<Uuid>,
    pub(super) force: bool,
}

impl PowerCtx {
    pub(super) fn new(vm: Uuid, force: bool) -> Self {
        PowerCtx {
            vm,
            prev: None,
            host: None,
            force,
        }
    }
}

fn s(w: &Weak<Cloud>, name: &'static str, run: super::chain::StepFn<PowerCtx>) -> Step<PowerCtx> {
    step(w, name, run)
}

pub(super) fn start_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.start")
        .then(s(w, "starting", step_fn!(starting)).undo(step_fn!(starting_undo)))
        .then(s(w, "allocate-host", step_fn!(allocate_home)).undo(step_fn!(release_home)))
        .then(s(w, "start-on-hypervisor", step_fn!(start)).undo(step_fn!(force_off)))
        .then(s(w, "mark-running", step_fn!(started)).undo(step_fn!(started_undo)))
}

pub(super) fn stop_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.stop")
        .on_interrupt(OnInterrupt::Finish)
        .then(s(w, "stopping", step_fn!(stopping)).undo(step_fn!(restore_prev)))
        .then(s(w, "stop-on-hypervisor", step_fn!(stop)).undo(step_fn!(run_again)))
        .then(s(w, "release-host", step_fn!(release_host)).forward())
        .then(s(w, "mark-stopped", step_fn!(stopped)).forward())
}

pub(super) fn reboot_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.reboot")
        .then(s(w, "rebooting", step_fn!(rebooting)).undo(step_fn!(rebooting_undo)))
        .then(s(w, "reboot-on-hypervisor", step_fn!(reboot)))
        .then(s(w, "mark-running", step_fn!(rebooted)).forward())
}

async fn starting(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    if vm.state == VmState::Starting {
        // Run again (a retry, a recovery): its own earlier run set it, in the VM's queue.
        return Ok(());
    }
    vm.state.check(vm.uuid, VmAction::Start)?;
    c.engine.ext.vm_before(VmOp::Start, &info(&vm)).await?;
    changed_meanwhile(
        set_state(&c, ctx.vm, Some(VmState::Stopped), VmState::Starting).await?,
        ctx.vm,
    )
}

/// Back to Stopped from wherever the chain got (Starting, or Running when the last step failed).
async fn starting_undo(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Starting), VmState::Stopped).await?;
    Ok(())
}

/// Reserve capacity on the VM's home host: where its root volume is.
async fn allocate_home(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    let root = match vm.root_volume_uuid {
        Some(r) => c.get::<Volume>(r).await?,
        None => {
            return Err(Error::internal(format!(
                "vm {} has no root volume",
                vm.uuid
            )))
        }
    };
    let home = root
        .host_uuid
        .ok_or_else(|| Error::internal(format!("root volume {} is on no host", root.uuid)))?;
    let spec = AllocationSpec {
        cpu: vm.cpu,
        memory_mib: vm.memory_mib,
        disk_mib: 0,
        l2_networks: l2s_of(&c, &l3s_of(&c, vm.uuid).await?).await?,
        zone: Some(vm.zone_uuid),
        cluster: vm.cluster_uuid,
        host: Some(home),
        avoid_hosts: vec![],
    };
    let a: Allocation = c
        .bus()
        .send(AllocateHost {
            vm: vm.uuid,
            spec,
            hold_disk: false,
        })
        .await?;
    ctx.host = Some(a.host);
    c.db()
        .commit(
            Batch::new().update(
                Update::of::<Vm>(vm.uuid)
                    .set("host_uuid", a.host)
                    .set("last_host_uuid", a.host),
            ),
        )
        .await?;
    Ok(())
}

async fn release_home(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    release_reservations(&c, ctx.vm, None).await?;
    c.db()
        .commit(
            Batch::new().update(
                Update::of::<Vm>(ctx.vm)
                    .if_exists()
                    .set("host_uuid", Value::Null),
            ),
        )
        .await?;
    Ok(())
}

async fn start(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let target = c.host_target(ctx.host.expect("host allocated")).await?;
    let spec = vm_spec(&c, ctx.vm).await?;
    agent(&c, &target, &StartVmCmd { spec }).await
}

/// Undo a start: the VM is stopped (its definition stays on the host, as before).
async fn force_off(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let Some(host) = ctx.host else { return Ok(()) };
    let target = c.host_target(host).await?;
    let cmd = StopVmCmd {
        vm: ctx.vm,
        graceful_timeout_ms: 0,
        force: true,
    };
    agent(&c, &target, &cmd).await
}

async fn started(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Starting), VmState::Running).await?;
    after(&c, VmOp::Start, ctx.vm).await?;
    Ok(())
}

/// Only this step makes the VM Running, so only its undo takes that back.
async fn started_undo(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Running), VmState::Stopped).await?;
    Ok(())
}

async fn stopping(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    if vm.state == VmState::Stopping {
        // Resumed by recovery.
        ctx.host = vm.host_uuid;
        return Ok(());
    }
    vm.state.check(vm.uuid, VmAction::Stop)?;
    c.engine.ext.vm_before(VmOp::Stop, &info(&vm)).await?;
    ctx.prev = Some(vm.state);
    ctx.host = vm.host_uuid;
    changed_meanwhile(
        set_state(&c, ctx.vm, Some(vm.state), VmState::Stopping).await?,
        ctx.vm,
    )
}

/// Put the state back as it was before the operation.
pub(super) async fn restore_prev(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let now = c.get::<Vm>(ctx.vm).await?.state;
    if now.is_transitional() {
        // A step resumed by recovery found the state already set and cannot know the one
        // before: Unknown, which the host's next report settles (it stayed Stopping for good:
        // all-faults with wire faults, a stop resumed by recovery failing on the host).
        let prev = ctx.prev.unwrap_or(VmState::Unknown);
        set_state(&c, ctx.vm, Some(now), prev).await?;
    }
    Ok(())
}

async fn stop(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let Some(host) = ctx.host else { return Ok(()) };
    let target = c.host_target(host).await?;
    let grace: Duration = c.engine.config.get(&STOP_GRACE.key());
    let cmd = StopVmCmd {
        vm: ctx.vm,
        graceful_timeout_ms: grace.as_millis() as u64,
        force: ctx.force,
    };
    agent(&c, &target, &cmd).await
}

/// Undo a host action that may have stopped or removed the VM: run it again if it was running.
pub(super) async fn run_again(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    if ctx.prev != Some(VmState::Running) {
        return Ok(());
    }
    let Some(host) = ctx.host else { return Ok(()) };
    let target = c.host_target(host).await?;
    let spec = vm_spec(&c, ctx.vm).await?;
    agent(&c, &target, &StartVmCmd { spec }).await
}

/// Return the VM's capacity (past the point of no return: retried).
pub(super) async fn release_host(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    release_reservations(&c, ctx.vm, None).await?;
    c.db()
        .commit(Batch::new().update(Update::of::<Vm>(ctx.vm).set("host_uuid", Value::Null)))
        .await?;
    Ok(())
}

async fn stopped(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Stopping), VmState::Stopped).await?;
    after(&c, VmOp::Stop, ctx.vm).await?;
    Ok(())
}

async fn rebooting(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    if vm.state == VmState::Rebooting {
        // Run again (a retry, a recovery): its own earlier run set it, in the VM's queue.
        ctx.host = vm.host_uuid;
        return Ok(());
    }
    vm.state.check(vm.uuid, VmAction::Reboot)?;
    c.engine.ext.vm_before(VmOp::Reboot, &info(&vm)).await?;
    ctx.host = vm.host_uuid;
    changed_meanwhile(
        set_state(&c, ctx.vm, Some(VmState::Running), VmState::Rebooting).await?,
        ctx.vm,
    )
}

async fn rebooting_undo(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Rebooting), VmState::Running).await?;
    Ok(())
}

async fn reboot(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    let host = ctx
        .host
        .ok_or_else(|| Error::internal("running VM without a host"))?;
    let target = c.host_target(host).await?;
    agent(&c, &target, &RebootVmCmd { vm: ctx.vm }).await
}

async fn rebooted(c: Arc<Cloud>, ctx: &mut PowerCtx) -> Result<(), Error> {
    set_state(&c, ctx.vm, Some(VmState::Rebooting), VmState::Running).await?;
    after(&c, VmOp::Reboot, ctx.vm).await?;
    Ok(())
}
