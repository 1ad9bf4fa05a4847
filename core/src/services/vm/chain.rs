//! What the VM workflows share: the step type, helpers over VMs and hosts, running a chain in
//! the VM's queue.

use super::{agent, vm_queue};
use crate::error::{Error, ErrorCode};
use crate::flow::{ChainTarget, Context, Flow, FlowChain};
use crate::model::*;
use crate::services::Cloud;
use async_trait::async_trait;
use futures::future::BoxFuture;
use std::sync::{Arc, Weak};
use stratus_agent_protocol::{DiskSpec, L2Kind, NicSpec, PowerState, VmSpec, VmStatusCmd};
use stratus_store::Query;
use uuid::Uuid;

/// A step function: the cloud and the chain's context.
pub(super) type StepFn<C> = for<'a> fn(Arc<Cloud>, &'a mut C) -> BoxFuture<'a, Result<(), Error>>;

/// The [`StepFn`] of an `async fn(Arc<Cloud>, &mut C) -> Result<(), Error>`.
macro_rules! step_fn {
    ($f:path) => {
        |cloud, ctx| Box::pin($f(cloud, ctx))
    };
}
pub(super) use step_fn;

/// A flow made of plain functions: `run`, an optional `undo`, and whether it is past the
/// operation's point of no return (`forward`: retried instead of rolled back).
pub(super) struct Step<C> {
    name: &'static str,
    cloud: Weak<Cloud>,
    run: StepFn<C>,
    undo: Option<StepFn<C>>,
    forward_only: bool,
}

pub(super) fn step<C>(cloud: &Weak<Cloud>, name: &'static str, run: StepFn<C>) -> Step<C> {
    Step {
        name,
        cloud: cloud.clone(),
        run,
        undo: None,
        forward_only: false,
    }
}

impl<C> Step<C> {
    pub(super) fn undo(mut self, f: StepFn<C>) -> Self {
        self.undo = Some(f);
        self
    }

    pub(super) fn forward(mut self) -> Self {
        self.forward_only = true;
        self
    }
}

fn gone() -> Error {
    Error::new(
        ErrorCode::NodeUnavailable,
        "the management node is shutting down",
    )
}

#[async_trait]
impl<C: Context> Flow<C> for Step<C> {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn run(&self, ctx: &mut C) -> Result<(), Error> {
        let c = self.cloud.upgrade().ok_or_else(gone)?;
        (self.run)(c, ctx).await
    }
    async fn rollback(&self, ctx: &mut C) -> Result<(), Error> {
        match self.undo {
            Some(f) => f(self.cloud.upgrade().ok_or_else(gone)?, ctx).await,
            None => Ok(()),
        }
    }
    fn forward_only(&self) -> bool {
        self.forward_only
    }
    fn undoes(&self) -> bool {
        self.undo.is_some()
    }
}

/// The network a NIC on `l3` plugs into: its bridge, how the L2 reaches the host, the L2's
/// physical interface and the L3's DNS servers.
async fn network_of(c: &Cloud, l3: Uuid) -> Result<(String, L2Kind, String, Vec<String>), Error> {
    let l3 = c.get::<L3Network>(l3).await?;
    let l2 = c.get::<L2Network>(l3.l2_uuid).await?;
    let missing =
        |what: &str| Error::invariant(format!("{:?} network {} has no {what}", l2.kind, l2.uuid));
    let (bridge, kind) = match l2.kind {
        L2Type::NoVlan => (format!("br_{}", l2.physical_interface), L2Kind::NoVlan),
        L2Type::Vlan => {
            let v = l2.vlan.ok_or_else(|| missing("vlan"))?;
            (
                format!("br_{}_{v}", l2.physical_interface),
                L2Kind::Vlan { vlan: v as u32 },
            )
        }
        L2Type::Vxlan => {
            let vni = l2.vni.ok_or_else(|| missing("vni"))?;
            (format!("br_vx_{vni}"), L2Kind::Vxlan { vni: vni as u32 })
        }
    };
    Ok((
        bridge,
        kind,
        l2.physical_interface.clone(),
        l3.dns.0.clone(),
    ))
}

/// What the host needs to run a VM: its attached volumes and its NICs.
pub(super) async fn vm_spec(c: &Cloud, vm: Uuid) -> Result<VmSpec, Error> {
    let vm = c.get::<Vm>(vm).await?;
    let vols = c
        .db()
        .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", vm.uuid))
        .await?;
    // A volume's VM and its device index are set together and cleared together.
    let mut disks = Vec::with_capacity(vols.len());
    for v in &vols {
        let Some(device) = v.device_index else {
            return Err(Error::invariant(format!(
                "volume {} is attached to vm {} without a device index",
                v.uuid, vm.uuid
            )));
        };
        disks.push(DiskSpec {
            volume: v.uuid,
            device: device as u32,
            size_mib: v.size_mib as u64,
        });
    }
    disks.sort_by_key(|d| d.device);
    let mut nics = c
        .db()
        .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", vm.uuid))
        .await?;
    nics.sort_by_key(|n| n.device_index);
    let mut nic_specs = Vec::with_capacity(nics.len());
    for n in &nics {
        let (bridge, l2, physical_interface, dns) = network_of(c, n.l3_uuid).await?;
        nic_specs.push(NicSpec {
            uuid: n.uuid,
            mac: n.mac.clone(),
            ip: n.ip.clone(),
            gateway: n.gateway.clone(),
            netmask: n.netmask.clone(),
            bridge,
            l2,
            physical_interface,
            l3: n.l3_uuid,
            dns,
        });
    }
    Ok(VmSpec {
        uuid: vm.uuid,
        name: vm.name.clone(),
        cpu: vm.cpu as u32,
        memory_mib: vm.memory_mib as u64,
        disks,
        nics: nic_specs,
    })
}

/// Release every reservation `vm` holds (on every host, or every host but `keep`).
pub(super) async fn release_reservations(
    c: &Cloud,
    vm: Uuid,
    keep: Option<Uuid>,
) -> Result<(), Error> {
    let held = c
        .db()
        .select::<Reservation>(&Query::of::<Reservation>().eq("vm_uuid", vm))
        .await?;
    for r in held.iter().filter(|r| Some(r.host_uuid) != keep) {
        c.allocator.release(c, vm, r.host_uuid).await?;
    }
    Ok(())
}

/// The L2 networks under the given L3 networks.
pub(super) async fn l2s_of(c: &Cloud, l3s: &[Uuid]) -> Result<Vec<Uuid>, Error> {
    let mut out = Vec::new();
    for l3 in l3s {
        let l2 = c.get::<L3Network>(*l3).await?.l2_uuid;
        if !out.contains(&l2) {
            out.push(l2);
        }
    }
    Ok(out)
}

/// The L3 networks a VM's NICs are on.
pub(super) async fn l3s_of(c: &Cloud, vm: Uuid) -> Result<Vec<Uuid>, Error> {
    Ok(c.db()
        .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", vm))
        .await?
        .iter()
        .map(|n| n.l3_uuid)
        .collect())
}

/// What host `host` says about `vm` (None when unreachable or not there).
pub(super) async fn probe(c: &Cloud, host: Uuid, vm: Uuid) -> Option<PowerState> {
    let target = c.host_target(host).await.ok()?;
    agent(c, &target, &VmStatusCmd { vm })
        .await
        .ok()
        .flatten()
        .map(|s| s.state)
}

/// Run `chain` for `vm` (the caller holds the VM's queue); a failure becomes the error, with
/// rollback trouble noted.
pub(super) async fn run_chain<C: Context>(
    c: &Arc<Cloud>,
    chain: &Arc<FlowChain<C>>,
    vm: Uuid,
    ctx: C,
) -> Result<C, Error> {
    let target = ChainTarget {
        resource: vm,
        queue: vm_queue(vm),
        job: None,
    };
    chain
        .run(&c.engine.journal, target, ctx)
        .await
        .map_err(|f| f.into_error(vm))
}

/// Refuse unless `ok`, with a conflict error (the VM changed state under us).
pub(super) fn changed_meanwhile(ok: bool, vm: Uuid) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::Conflict,
            format!("vm {vm} changed state meanwhile"),
        ))
    }
}
