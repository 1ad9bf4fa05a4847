//! The VM workflows. Each runs in the VM's queue; each step's rollback can run from the context
//! as it was before the step (identifiers of NICs and volumes are chosen before the chain
//! starts, reservations are found by the VM's uuid), so a chain interrupted anywhere is rolled
//! back — or, for destroy and expunge, finished — by recovery.

use super::{
    agent, info, must, set_state, vm_queue, CreateVm, DestroyVm, ExpungeVm, MigrateVm, RebootVm,
    RecoverVm, StartVm, StopVm,
};
use super::{BUG_LEAK_IP, STOP_GRACE};
use crate::agent::HostTarget;
use crate::error::{Error, ErrorCode};
use crate::extension::{AllocationSpec, VmOp};
use crate::flow::{ChainTarget, Context, Flow, FlowChain, OnInterrupt};
use crate::model::*;
use crate::services::allocator::{AllocateHost, Allocation};
use crate::services::network::{AllocateIp, ReleaseIps};
use crate::services::{check_name, Cloud};
use crate::store::{Batch, Expect, Query, Row, Update, Value};
use async_trait::async_trait;
use futures::future::BoxFuture;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Weak};
use std::time::Duration;
use stratus_kvm_agent::protocol::{
    CreateVolumeCmd, DeleteVolumeCmd, DestroyVmCmd, DiskSpec, ImageRef, MigrateVmCmd, NicSpec,
    PowerState, RebootVmCmd, StartVmCmd, StopVmCmd, VmSpec, VmStatusCmd,
};
use uuid::Uuid;

type StepFn<C> = for<'a> fn(Arc<Cloud>, &'a mut C) -> BoxFuture<'a, Result<(), Error>>;

/// A flow made of two plain functions over the cloud and the context.
struct Step<C> {
    name: &'static str,
    cloud: Weak<Cloud>,
    run: StepFn<C>,
    undo: Option<StepFn<C>>,
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
}

macro_rules! step {
    ($cloud:expr, $name:literal, $ty:ty, |$c:ident, $ctx:ident| $run:block) => {{
        fn run<'a>($c: Arc<Cloud>, $ctx: &'a mut $ty) -> BoxFuture<'a, Result<(), Error>> {
            Box::pin(async move $run)
        }
        Step::<$ty> { name: $name, cloud: $cloud.clone(), run: run as StepFn<$ty>, undo: None }
    }};
    ($cloud:expr, $name:literal, $ty:ty, |$c:ident, $ctx:ident| $run:block, undo |$uc:ident, $uctx:ident| $undo:block) => {{
        fn run<'a>($c: Arc<Cloud>, $ctx: &'a mut $ty) -> BoxFuture<'a, Result<(), Error>> {
            Box::pin(async move $run)
        }
        fn undo<'a>($uc: Arc<Cloud>, $uctx: &'a mut $ty) -> BoxFuture<'a, Result<(), Error>> {
            Box::pin(async move $undo)
        }
        Step::<$ty> { name: $name, cloud: $cloud.clone(), run: run as StepFn<$ty>, undo: Some(undo as StepFn<$ty>) }
    }};
}

// ---------------------------------------------------------------- shared pieces

/// The bridge a NIC on `l3` plugs into.
async fn bridge_of(c: &Cloud, l3: Uuid) -> Result<(String, Option<u32>), Error> {
    let l3 = c.get::<L3Network>(l3).await?;
    let l2 = c.get::<L2Network>(l3.l2_uuid).await?;
    Ok(match l2.kind {
        L2Type::NoVlan => (format!("br_{}", l2.physical_interface), None),
        L2Type::Vlan => {
            let v = l2.vlan.unwrap_or(0) as u32;
            (format!("br_{}_{v}", l2.physical_interface), Some(v))
        }
        L2Type::Vxlan => (format!("br_vx_{}", l2.vni.unwrap_or(0)), None),
    })
}

/// What the host needs to run the VM: its attached volumes and its NICs.
async fn vm_spec(c: &Cloud, vm: &Row<Vm>) -> Result<VmSpec, Error> {
    let mut vols = c
        .db()
        .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", vm.uuid))
        .await?;
    vols.sort_by_key(|v| v.device_index.unwrap_or(i64::MAX));
    let mut nics = c
        .db()
        .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", vm.uuid))
        .await?;
    nics.sort_by_key(|n| n.device_index);
    let mut nic_specs = Vec::with_capacity(nics.len());
    for n in &nics {
        let (bridge, vlan) = bridge_of(c, n.l3_uuid).await?;
        nic_specs.push(NicSpec {
            uuid: n.uuid,
            mac: n.mac.clone(),
            ip: n.ip.clone(),
            gateway: n.gateway.clone(),
            netmask: n.netmask.clone(),
            bridge,
            vlan,
        });
    }
    Ok(VmSpec {
        uuid: vm.uuid,
        name: vm.name.clone(),
        cpu: vm.cpu as u32,
        memory_mb: vm.memory_mb as u64,
        disks: vols
            .iter()
            .map(|v| DiskSpec {
                volume: v.uuid,
                device: v.device_index.unwrap_or(0) as u32,
                size_mb: v.size_mb as u64,
            })
            .collect(),
        nics: nic_specs,
    })
}

/// Release every reservation `vm` holds (on any host, or on every host but `keep`).
async fn release_reservations(c: &Cloud, vm: Uuid, keep: Option<Uuid>) -> Result<(), Error> {
    let held = c
        .db()
        .select::<Reservation>(&Query::of::<Reservation>().eq("vm_uuid", vm))
        .await?;
    for r in held.iter().filter(|r| Some(r.host_uuid) != keep) {
        c.allocator.release(c, vm, r.host_uuid).await?;
    }
    Ok(())
}

async fn l2s_of(c: &Cloud, l3s: &[Uuid]) -> Result<Vec<Uuid>, Error> {
    let mut out = Vec::new();
    for l3 in l3s {
        let l2 = c.get::<L3Network>(*l3).await?.l2_uuid;
        if !out.contains(&l2) {
            out.push(l2);
        }
    }
    Ok(out)
}

/// A locally administered unicast MAC with 46 random bits.
fn random_mac(c: &Cloud) -> String {
    let mut b = [0u8; 6];
    c.engine.ids.with_rng(|r| r.fill_bytes(&mut b));
    b[0] = (b[0] & 0xfc) | 0x02;
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Run `chain` in the VM's queue; its failure becomes the error, with rollback trouble noted.
async fn run_chain<C: Context>(
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
    match chain.run(&c.engine.journal, target, ctx).await {
        Ok(ctx) => Ok(ctx),
        Err(f) => {
            let mut e = f.error;
            if !f.rollback_errors.is_empty() {
                let what: Vec<String> = f
                    .rollback_errors
                    .iter()
                    .map(|(n, e)| format!("{n}: {e}"))
                    .collect();
                tracing::warn!(%vm, rollback_errors = ?what, "rollback left work for state sync");
                e.message = format!("{} (rollback: {})", e.message, what.join("; "));
            }
            Err(e)
        }
    }
}

// ---------------------------------------------------------------- create

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NicPlan {
    uuid: Uuid,
    l3: Uuid,
    mac: String,
    ip: Option<String>,
    device: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VolPlan {
    uuid: Uuid,
    size_mb: i64,
    offering: Option<Uuid>,
    device: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CreateCtx {
    vm: Uuid,
    name: String,
    description: Option<String>,
    zone: Uuid,
    cluster_req: Option<Uuid>,
    host_req: Option<Uuid>,
    offering: Uuid,
    cpu: i64,
    memory_mb: i64,
    image: Uuid,
    root: VolPlan,
    data: Vec<VolPlan>,
    nics: Vec<NicPlan>,
    l2s: Vec<Uuid>,
    host: Option<Uuid>,
    ps: Option<Uuid>,
}

impl CreateCtx {
    fn volumes(&self) -> impl Iterator<Item = &VolPlan> {
        std::iter::once(&self.root).chain(self.data.iter())
    }
}

fn create_chain(w: &Weak<Cloud>) -> FlowChain<CreateCtx> {
    FlowChain::new("vm.create")
        .then(step!(
            w,
            "vm-record",
            CreateCtx,
            |c, x| {
                let row = Row::new(
                    x.vm,
                    Vm {
                        name: x.name.clone(),
                        zone_uuid: x.zone,
                        cluster_uuid: None,
                        host_uuid: None,
                        last_host_uuid: None,
                        instance_offering_uuid: x.offering,
                        image_uuid: x.image,
                        root_volume_uuid: None,
                        default_l3_uuid: x.nics.first().map(|n| n.l3),
                        state: VmState::Created,
                        cpu: x.cpu,
                        memory_mb: x.memory_mb,
                        description: x.description.clone(),
                    },
                );
                match c.db().insert(row).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == ErrorCode::AlreadyExists => Ok(()),
                    Err(e) => Err(e.into()),
                }
            },
            undo | c,
            x | {
                c.db()
                    .commit(Batch::new().delete::<Vm>(x.vm, Expect::Maybe))
                    .await?;
                Ok(())
            }
        ))
        .then(step!(w, "select-backup-storage", CreateCtx, |c, x| {
            let image = c.get::<Image>(x.image).await?;
            let linked = c
                .db()
                .count(
                    &Query::of::<BsZone>()
                        .eq("bs_uuid", image.bs_uuid)
                        .eq("zone_uuid", x.zone),
                )
                .await?;
            if linked == 0 {
                return Err(Error::invalid(format!(
                    "image {} is on backup storage {}, which is not attached to zone {}",
                    image.uuid, image.bs_uuid, x.zone
                )));
            }
            Ok(())
        }))
        .then(step!(
            w,
            "allocate-host",
            CreateCtx,
            |c, x| {
                let disk: i64 = x.volumes().map(|v| v.size_mb).sum();
                let spec = AllocationSpec {
                    cpu: x.cpu,
                    memory_mb: x.memory_mb,
                    disk_mb: disk,
                    l2_networks: x.l2s.clone(),
                    zone: Some(x.zone),
                    cluster: x.cluster_req,
                    host: x.host_req,
                    avoid_hosts: vec![],
                };
                let a: Allocation = c
                    .bus()
                    .send(AllocateHost {
                        vm: x.vm,
                        spec,
                        hold_disk: false,
                    })
                    .await?;
                let Some(ps) = a.primary_storage else {
                    return Err(Error::new(
                        ErrorCode::CapacityExhausted,
                        format!("host {} has no local primary storage attached", a.host),
                    ));
                };
                x.host = Some(a.host);
                x.ps = Some(ps);
                c.db()
                    .commit(
                        Batch::new().update(
                            Update::of::<Vm>(x.vm)
                                .set("host_uuid", a.host)
                                .set("last_host_uuid", a.host)
                                .set("cluster_uuid", a.cluster)
                                .set("state", VmState::Starting.as_str()),
                        ),
                    )
                    .await?;
                c.bus().publish(
                    "/vm/state/change",
                    serde_json::json!({"uuid": x.vm, "old": "Created", "new": "Starting"}),
                );
                Ok(())
            },
            undo | c,
            x | {
                release_reservations(&c, x.vm, None).await?;
                c.db()
                    .commit(
                        Batch::new().update(
                            Update::of::<Vm>(x.vm)
                                .expect(Expect::Maybe)
                                .set("host_uuid", Value::Null),
                        ),
                    )
                    .await?;
                Ok(())
            }
        ))
        .then(step!(
            w,
            "allocate-volumes",
            CreateCtx,
            |c, x| {
                let (host, ps) = (
                    x.host.expect("host allocated"),
                    x.ps.expect("storage chosen"),
                );
                let ls = local_storage_uuid(ps, host);
                let mut b = Batch::new();
                let mut total = 0;
                for v in x.volumes() {
                    let root = v.uuid == x.root.uuid;
                    b = b.insert(&Row::new(
                        v.uuid,
                        Volume {
                            name: if root {
                                format!("ROOT-for-{}", x.name)
                            } else {
                                format!("DATA-for-{}", x.name)
                            },
                            kind: if root {
                                VolumeType::Root
                            } else {
                                VolumeType::Data
                            },
                            vm_uuid: Some(x.vm),
                            ps_uuid: Some(ps),
                            host_uuid: Some(host),
                            size_mb: v.size_mb,
                            state: VolumeState::Creating,
                            device_index: Some(v.device),
                            disk_offering_uuid: v.offering,
                            image_uuid: root.then_some(x.image),
                            tags: crate::store::Json(vec![]),
                        },
                    ));
                    total += v.size_mb;
                }
                b = b.update(
                    Update::of::<LocalStorage>(ls)
                        .add("used_mb", total)
                        .max_field("used_mb", "total_mb"),
                );
                match c.db().commit(b).await {
                    Ok(_) => {
                        c.allocator.disk_changed(host, ps, total);
                        Ok(())
                    }
                    Err(e) if e.code() == ErrorCode::AlreadyExists => Ok(()),
                    Err(e) if e.code() == ErrorCode::ConditionFailed => Err(Error::new(
                        ErrorCode::CapacityExhausted,
                        format!("local storage of host {host} has no room for {total} MiB"),
                    )),
                    Err(e) => Err(e.into()),
                }
            },
            undo | c,
            x | {
                for v in x.volumes() {
                    super::volume::forget_volume_row(&c, v.uuid).await?;
                }
                Ok(())
            }
        ))
        .then(step!(
            w,
            "create-nics",
            CreateCtx,
            |c, x| {
                let mut b = Batch::new();
                for n in &x.nics {
                    b = b.insert(&Row::new(
                        n.uuid,
                        VmNic {
                            vm_uuid: x.vm,
                            l3_uuid: n.l3,
                            mac: n.mac.clone(),
                            ip: None,
                            gateway: None,
                            netmask: None,
                            device_index: n.device,
                        },
                    ));
                }
                match c.db().commit(b).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == ErrorCode::AlreadyExists => Ok(()),
                    Err(e) => Err(e.into()),
                }
            },
            undo | c,
            x | {
                let b = x.nics.iter().fold(Batch::new(), |b, n| {
                    b.delete::<VmNic>(n.uuid, Expect::Maybe)
                });
                c.db().commit(b).await?;
                Ok(())
            }
        ))
        .then(step!(
            w,
            "allocate-ips",
            CreateCtx,
            |c, x| {
                for n in &x.nics {
                    c.bus()
                        .send(AllocateIp {
                            l3_uuid: n.l3,
                            nic_uuid: n.uuid,
                            ip: n.ip.clone(),
                        })
                        .await?;
                }
                Ok(())
            },
            undo | c,
            x | {
                if c.engine.config.get(&BUG_LEAK_IP.key()) {
                    // The planted bug: addresses stay taken after a failed creation.
                    return Ok(());
                }
                for n in &x.nics {
                    c.bus()
                        .send(ReleaseIps {
                            l3_uuid: n.l3,
                            nic_uuid: n.uuid,
                        })
                        .await?;
                }
                Ok(())
            }
        ))
        .then(step!(
            w,
            "instantiate-volumes",
            CreateCtx,
            |c, x| {
                let target = c.host_target(x.host.expect("host allocated")).await?;
                let image = c.get::<Image>(x.image).await?;
                for v in x.volumes() {
                    let cmd = CreateVolumeCmd {
                        volume: v.uuid,
                        size_mb: v.size_mb as u64,
                        image: (v.uuid == x.root.uuid).then(|| ImageRef {
                            uuid: image.uuid,
                            url: image.url.clone(),
                            size_mb: image.size_mb as u64,
                            checksum: image.checksum.clone(),
                        }),
                    };
                    agent(&c, &target, &cmd).await?;
                }
                let b = x.volumes().fold(Batch::new(), |b, v| {
                    b.update(Update::of::<Volume>(v.uuid).set("state", VolumeState::Ready.as_str()))
                });
                c.db().commit(b).await?;
                Ok(())
            },
            undo | c,
            x | {
                let Some(host) = x.host else { return Ok(()) };
                let target = c.host_target(host).await?;
                for v in x.volumes() {
                    agent(&c, &target, &DeleteVolumeCmd { volume: v.uuid }).await?;
                }
                Ok(())
            }
        ))
        .then(step!(w, "network-services", CreateCtx, |c, x| {
            let vm = c.get::<Vm>(x.vm).await?;
            c.engine.ext.vm_before(VmOp::Create, &info(&vm)).await
        }))
        .then(step!(
            w,
            "start-on-hypervisor",
            CreateCtx,
            |c, x| {
                let target = c.host_target(x.host.expect("host allocated")).await?;
                let vm = c.get::<Vm>(x.vm).await?;
                let spec = vm_spec(&c, &vm).await?;
                agent(&c, &target, &StartVmCmd { spec }).await
            },
            undo | c,
            x | {
                let Some(host) = x.host else { return Ok(()) };
                let target = c.host_target(host).await?;
                agent(&c, &target, &DestroyVmCmd { vm: x.vm }).await
            }
        ))
        .then(step!(w, "mark-running", CreateCtx, |c, x| {
            c.db()
                .commit(
                    Batch::new().update(
                        Update::of::<Vm>(x.vm)
                            .set("root_volume_uuid", x.root.uuid)
                            .set("state", VmState::Running.as_str()),
                    ),
                )
                .await?;
            c.bus().publish(
                "/vm/state/change",
                serde_json::json!({"uuid": x.vm, "old": "Starting", "new": "Running"}),
            );
            let vm = c.get::<Vm>(x.vm).await?;
            c.engine
                .ext
                .vm_after(VmOp::Create, &info(&vm), Ok(()))
                .await;
            Ok(())
        }))
}

/// Check a create request and plan its identifiers.
async fn plan_create(c: &Cloud, m: &CreateVm, vm: Uuid) -> Result<CreateCtx, Error> {
    check_name("vm", &m.name)?;
    let offering = c.get::<InstanceOffering>(m.instance_offering_uuid).await?;
    if offering.state != EnableState::Enabled {
        return Err(Error::new(
            ErrorCode::InvalidState,
            format!("instance offering {} is disabled", offering.uuid),
        ));
    }
    let image = c.get::<Image>(m.image_uuid).await?;
    if image.state != EnableState::Enabled {
        return Err(Error::new(
            ErrorCode::InvalidState,
            format!("image {} is disabled", image.uuid),
        ));
    }
    if m.l3_network_uuids.is_empty() {
        return Err(Error::invalid("a VM needs at least one L3 network"));
    }
    let mut zone = None;
    for (i, l3) in m.l3_network_uuids.iter().enumerate() {
        if m.l3_network_uuids[..i].contains(l3) {
            return Err(Error::invalid(format!("L3 network {l3} is listed twice")));
        }
        let net = c.get::<L3Network>(*l3).await?;
        if net.state != EnableState::Enabled {
            return Err(Error::new(
                ErrorCode::InvalidState,
                format!("L3 network {l3} is disabled"),
            ));
        }
        match zone {
            None => zone = Some(net.zone_uuid),
            Some(z) if z != net.zone_uuid => {
                return Err(Error::invalid(
                    "all L3 networks of a VM must be in one zone",
                ))
            }
            _ => {}
        }
    }
    let zone = zone.expect("at least one L3");
    for l3 in m.static_ips.keys() {
        if !m.l3_network_uuids.contains(l3) {
            return Err(Error::invalid(format!(
                "a static IP is given for L3 network {l3}, which the VM is not on"
            )));
        }
    }
    if let Some(z) = m.zone_uuid {
        if z != zone {
            return Err(Error::invalid(format!(
                "the VM's networks are in zone {zone}, not {z}"
            )));
        }
    }
    if let Some(cl) = m.cluster_uuid {
        let cluster = c.get::<Cluster>(cl).await?;
        if cluster.zone_uuid != zone {
            return Err(Error::invalid(format!(
                "cluster {cl} is not in zone {zone}"
            )));
        }
    }
    if let Some(h) = m.host_uuid {
        let host = c.get::<Host>(h).await?;
        if host.zone_uuid != zone {
            return Err(Error::invalid(format!("host {h} is not in zone {zone}")));
        }
    }
    let mut data = Vec::new();
    for (i, d) in m.data_disk_offering_uuids.iter().enumerate() {
        let off = c.get::<DiskOffering>(*d).await?;
        data.push(VolPlan {
            uuid: c.engine.ids.uuid(),
            size_mb: off.size_mb,
            offering: Some(off.uuid),
            device: i as i64 + 1,
        });
    }
    let nics = m
        .l3_network_uuids
        .iter()
        .enumerate()
        .map(|(i, l3)| NicPlan {
            uuid: c.engine.ids.uuid(),
            l3: *l3,
            mac: random_mac(c),
            ip: m.static_ips.get(l3).cloned(),
            device: i as i64,
        })
        .collect();
    Ok(CreateCtx {
        vm,
        name: m.name.clone(),
        description: m.description.clone(),
        zone,
        cluster_req: m.cluster_uuid,
        host_req: m.host_uuid,
        offering: offering.uuid,
        cpu: offering.cpu,
        memory_mb: offering.memory_mb,
        image: image.uuid,
        root: VolPlan {
            uuid: c.engine.ids.uuid(),
            size_mb: image.size_mb,
            offering: None,
            device: 0,
        },
        data,
        nics,
        l2s: l2s_of(c, &m.l3_network_uuids).await?,
        host: None,
        ps: None,
    })
}

// ---------------------------------------------------------------- start / stop / reboot

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PowerCtx {
    vm: Uuid,
    prev: VmState,
    host: Option<Uuid>,
    force: bool,
}

fn start_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.start")
        .then(step!(
            w,
            "starting",
            PowerCtx,
            |c, x| {
                let vm = c.get::<Vm>(x.vm).await?;
                vm.state.check(vm.uuid, crate::model::VmAction::Start)?;
                c.engine.ext.vm_before(VmOp::Start, &info(&vm)).await?;
                if !set_state(&c, x.vm, Some(VmState::Stopped), VmState::Starting).await? {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!("vm {} changed state meanwhile", x.vm),
                    ));
                }
                Ok(())
            },
            undo | c,
            x | {
                set_state(&c, x.vm, Some(VmState::Starting), VmState::Stopped).await?;
                Ok(())
            }
        ))
        .then(step!(
            w,
            "allocate-host",
            PowerCtx,
            |c, x| {
                let vm = c.get::<Vm>(x.vm).await?;
                // Local storage: the VM starts where its root volume is.
                let root = match vm.root_volume_uuid {
                    Some(r) => c.get::<Volume>(r).await?,
                    None => {
                        return Err(Error::internal(format!(
                            "vm {} has no root volume",
                            vm.uuid
                        )))
                    }
                };
                let home = root.host_uuid.ok_or_else(|| {
                    Error::internal(format!("root volume {} is on no host", root.uuid))
                })?;
                let l3s: Vec<Uuid> = c
                    .db()
                    .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", vm.uuid))
                    .await?
                    .iter()
                    .map(|n| n.l3_uuid)
                    .collect();
                let spec = AllocationSpec {
                    cpu: vm.cpu,
                    memory_mb: vm.memory_mb,
                    disk_mb: 0,
                    l2_networks: l2s_of(&c, &l3s).await?,
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
                x.host = Some(a.host);
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
            },
            undo | c,
            x | {
                release_reservations(&c, x.vm, None).await?;
                c.db()
                    .commit(
                        Batch::new().update(
                            Update::of::<Vm>(x.vm)
                                .expect(Expect::Maybe)
                                .set("host_uuid", Value::Null),
                        ),
                    )
                    .await?;
                Ok(())
            }
        ))
        .then(step!(
            w,
            "start-on-hypervisor",
            PowerCtx,
            |c, x| {
                let target = c.host_target(x.host.expect("host allocated")).await?;
                let vm = c.get::<Vm>(x.vm).await?;
                let spec = vm_spec(&c, &vm).await?;
                agent(&c, &target, &StartVmCmd { spec }).await
            },
            undo | c,
            x | {
                let Some(host) = x.host else { return Ok(()) };
                let target = c.host_target(host).await?;
                agent(&c, &target, &DestroyVmCmd { vm: x.vm }).await
            }
        ))
        .then(step!(w, "mark-running", PowerCtx, |c, x| {
            set_state(&c, x.vm, Some(VmState::Starting), VmState::Running).await?;
            let vm = c.get::<Vm>(x.vm).await?;
            c.engine.ext.vm_after(VmOp::Start, &info(&vm), Ok(())).await;
            Ok(())
        }))
}

/// Stop on the host, then return the capacity. Past the host's stop the chain only goes forward.
fn stop_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.stop")
        .then(step!(
            w,
            "stopping",
            PowerCtx,
            |c, x| {
                let vm = c.get::<Vm>(x.vm).await?;
                vm.state.check(vm.uuid, crate::model::VmAction::Stop)?;
                c.engine.ext.vm_before(VmOp::Stop, &info(&vm)).await?;
                x.prev = vm.state;
                x.host = vm.host_uuid;
                if !set_state(&c, x.vm, Some(vm.state), VmState::Stopping).await? {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!("vm {} changed state meanwhile", x.vm),
                    ));
                }
                Ok(())
            },
            undo | c,
            x | {
                set_state(&c, x.vm, Some(VmState::Stopping), x.prev).await?;
                Ok(())
            }
        ))
        .then(step!(w, "stop-on-hypervisor", PowerCtx, |c, x| {
            let Some(host) = x.host else { return Ok(()) };
            let target = c.host_target(host).await?;
            let grace: Duration = c.engine.config.get(&STOP_GRACE.key());
            let cmd = StopVmCmd {
                vm: x.vm,
                graceful_timeout_ms: grace.as_millis() as u64,
                force: x.force,
            };
            agent(&c, &target, &cmd).await
        }))
        .then(step!(w, "release-host", PowerCtx, |c, x| {
            must(&c, "release-host", || async {
                release_reservations(&c, x.vm, None).await?;
                c.db()
                    .commit(
                        Batch::new().update(Update::of::<Vm>(x.vm).set("host_uuid", Value::Null)),
                    )
                    .await?;
                Ok(())
            })
            .await
        }))
        .then(step!(w, "mark-stopped", PowerCtx, |c, x| {
            must(&c, "mark-stopped", || {
                set_state(&c, x.vm, Some(VmState::Stopping), VmState::Stopped)
            })
            .await?;
            let vm = c.get::<Vm>(x.vm).await?;
            c.engine.ext.vm_after(VmOp::Stop, &info(&vm), Ok(())).await;
            Ok(())
        }))
}

fn reboot_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.reboot")
        .then(step!(
            w,
            "rebooting",
            PowerCtx,
            |c, x| {
                let vm = c.get::<Vm>(x.vm).await?;
                vm.state.check(vm.uuid, crate::model::VmAction::Reboot)?;
                c.engine.ext.vm_before(VmOp::Reboot, &info(&vm)).await?;
                x.host = vm.host_uuid;
                set_state(&c, x.vm, Some(VmState::Running), VmState::Rebooting).await?;
                Ok(())
            },
            undo | c,
            x | {
                set_state(&c, x.vm, Some(VmState::Rebooting), VmState::Running).await?;
                Ok(())
            }
        ))
        .then(step!(w, "reboot-on-hypervisor", PowerCtx, |c, x| {
            let target = c
                .host_target(
                    x.host
                        .ok_or_else(|| Error::internal("running VM without a host"))?,
                )
                .await?;
            agent(&c, &target, &RebootVmCmd { vm: x.vm }).await
        }))
        .then(step!(w, "mark-running", PowerCtx, |c, x| {
            set_state(&c, x.vm, Some(VmState::Rebooting), VmState::Running).await?;
            let vm = c.get::<Vm>(x.vm).await?;
            c.engine
                .ext
                .vm_after(VmOp::Reboot, &info(&vm), Ok(()))
                .await;
            Ok(())
        }))
}

// ---------------------------------------------------------------- destroy / recover / expunge

/// Destroy: once the host dropped the VM, the rest (capacity, addresses, volumes) only goes
/// forward; after a crash, recovery finishes it.
fn destroy_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.destroy")
        .on_interrupt(OnInterrupt::Finish)
        .then(step!(w, "destroying", PowerCtx, |c, x| {
            let vm = c.get::<Vm>(x.vm).await?;
            if vm.state == VmState::Destroying {
                // Resumed by recovery.
                return Ok(());
            }
            if !x.force {
                vm.state.check(vm.uuid, crate::model::VmAction::Destroy)?;
                c.engine.ext.vm_before(VmOp::Destroy, &info(&vm)).await?;
            }
            x.prev = vm.state;
            x.host = vm.host_uuid.or(vm.last_host_uuid);
            if !set_state(&c, x.vm, Some(vm.state), VmState::Destroying).await? {
                return Err(Error::new(ErrorCode::Conflict, format!("vm {} changed state meanwhile", x.vm)));
            }
            Ok(())
        }, undo |c, x| {
            set_state(&c, x.vm, Some(VmState::Destroying), x.prev).await?;
            Ok(())
        }))
        .then(step!(w, "destroy-on-hypervisor", PowerCtx, |c, x| {
            let Some(host) = x.host else { return Ok(()) };
            let r = async {
                let target = c.host_target(host).await?;
                agent(&c, &target, &DestroyVmCmd { vm: x.vm }).await
            }
            .await;
            match r {
                Ok(()) => Ok(()),
                // Forced (a cascade): an unreachable host is cleaned up by state sync later.
                Err(e) if x.force => {
                    tracing::warn!(vm = %x.vm, error = %e, "forced destroy could not reach the host");
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }))
        .then(step!(w, "release-host", PowerCtx, |c, x| {
            must(&c, "release-host", || async {
                release_reservations(&c, x.vm, None).await?;
                c.db()
                    .commit(Batch::new().update(Update::of::<Vm>(x.vm).set("host_uuid", Value::Null)))
                    .await?;
                Ok(())
            })
            .await
        }))
        .then(step!(w, "release-ips", PowerCtx, |c, x| {
            must(&c, "release-ips", || async {
                for n in c.db().select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", x.vm)).await? {
                    c.bus().send(ReleaseIps { l3_uuid: n.l3_uuid, nic_uuid: n.uuid }).await?;
                }
                Ok(())
            })
            .await
        }))
        .then(step!(w, "detach-data-volumes", PowerCtx, |c, x| {
            must(&c, "detach-data-volumes", || async {
                let data = c
                    .db()
                    .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", x.vm).eq("kind", VolumeType::Data.as_str()))
                    .await?;
                let b = data.iter().fold(Batch::new(), |b, v| {
                    b.update(Update::of::<Volume>(v.uuid).set("vm_uuid", Value::Null).set("device_index", Value::Null))
                });
                c.db().commit(b).await?;
                Ok(())
            })
            .await
        }))
        .then(step!(w, "mark-destroyed", PowerCtx, |c, x| {
            must(&c, "mark-destroyed", || set_state(&c, x.vm, Some(VmState::Destroying), VmState::Destroyed)).await?;
            let vm = c.get::<Vm>(x.vm).await?;
            c.engine.ext.vm_after(VmOp::Destroy, &info(&vm), Ok(())).await;
            Ok(())
        }))
}

fn recover_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.recover")
        .then(step!(w, "check-destroyed", PowerCtx, |c, x| {
            let vm = c.get::<Vm>(x.vm).await?;
            vm.state.check(vm.uuid, crate::model::VmAction::Recover)?;
            c.engine.ext.vm_before(VmOp::Recover, &info(&vm)).await
        }))
        .then(step!(
            w,
            "allocate-ips",
            PowerCtx,
            |c, x| {
                for n in c
                    .db()
                    .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", x.vm))
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
            },
            undo | c,
            x | {
                for n in c
                    .db()
                    .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", x.vm))
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
        ))
        .then(step!(w, "mark-stopped", PowerCtx, |c, x| {
            set_state(&c, x.vm, Some(VmState::Destroyed), VmState::Stopped).await?;
            let vm = c.get::<Vm>(x.vm).await?;
            c.engine
                .ext
                .vm_after(VmOp::Recover, &info(&vm), Ok(()))
                .await;
            Ok(())
        }))
}

/// Expunge: the root volume, the NICs and the VM row go for good; only forward.
fn expunge_chain(w: &Weak<Cloud>) -> FlowChain<PowerCtx> {
    FlowChain::new("vm.expunge")
        .on_interrupt(OnInterrupt::Finish)
        .then(step!(w, "expunging", PowerCtx, |c, x| {
            let vm = c.get::<Vm>(x.vm).await?;
            if vm.state != VmState::Expunging {
                vm.state.check(vm.uuid, crate::model::VmAction::Expunge)?;
                c.engine.ext.vm_before(VmOp::Expunge, &info(&vm)).await?;
                set_state(&c, x.vm, Some(VmState::Destroyed), VmState::Expunging).await?;
            }
            Ok(())
        }))
        .then(step!(w, "delete-root-volume", PowerCtx, |c, x| {
            let roots = c
                .db()
                .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", x.vm))
                .await?;
            for v in roots {
                super::volume::delete_volume_everywhere(&c, &v, x.force).await?;
            }
            Ok(())
        }))
        .then(step!(w, "delete-nics-and-vm", PowerCtx, |c, x| {
            must(&c, "delete-vm", || async {
                let nics = c
                    .db()
                    .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", x.vm))
                    .await?;
                for n in &nics {
                    crate::services::network::release(c.db(), n.l3_uuid, n.uuid).await?;
                }
                release_reservations(&c, x.vm, None).await?;
                let b = nics.iter().fold(Batch::new(), |b, n| {
                    b.delete::<VmNic>(n.uuid, Expect::Maybe)
                });
                c.db().commit(b.delete::<Vm>(x.vm, Expect::Maybe)).await?;
                Ok(())
            })
            .await?;
            c.bus().publish(
                "/vm/state/change",
                serde_json::json!({"uuid": x.vm, "old": "Expunging", "new": "Expunged"}),
            );
            Ok(())
        }))
}

// ---------------------------------------------------------------- migrate

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MigrateCtx {
    vm: Uuid,
    src: Uuid,
    dest_req: Option<Uuid>,
    dest: Option<Uuid>,
}

async fn probe(c: &Cloud, host: Uuid, vm: Uuid) -> Option<PowerState> {
    let target = c.host_target(host).await.ok()?;
    agent(c, &target, &VmStatusCmd { vm })
        .await
        .ok()
        .flatten()
        .map(|s| s.state)
}

fn migrate_chain(w: &Weak<Cloud>) -> FlowChain<MigrateCtx> {
    FlowChain::new("vm.migrate")
        .then(step!(w, "migrating", MigrateCtx, |c, x| {
            let vm = c.get::<Vm>(x.vm).await?;
            vm.state.check(vm.uuid, crate::model::VmAction::Migrate)?;
            c.engine.ext.vm_before(VmOp::Migrate, &info(&vm)).await?;
            if !set_state(&c, x.vm, Some(VmState::Running), VmState::Migrating).await? {
                return Err(Error::new(ErrorCode::Conflict, format!("vm {} changed state meanwhile", x.vm)));
            }
            Ok(())
        }, undo |c, x| {
            set_state(&c, x.vm, Some(VmState::Migrating), VmState::Running).await?;
            Ok(())
        }))
        .then(step!(w, "allocate-destination", MigrateCtx, |c, x| {
            let vm = c.get::<Vm>(x.vm).await?;
            let disk: i64 = c
                .db()
                .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", x.vm))
                .await?
                .iter()
                .map(|v| v.size_mb)
                .sum();
            let l3s: Vec<Uuid> = c
                .db()
                .select::<VmNic>(&Query::of::<VmNic>().eq("vm_uuid", vm.uuid))
                .await?
                .iter()
                .map(|n| n.l3_uuid)
                .collect();
            let spec = AllocationSpec {
                cpu: vm.cpu,
                memory_mb: vm.memory_mb,
                disk_mb: disk,
                l2_networks: l2s_of(&c, &l3s).await?,
                zone: Some(vm.zone_uuid),
                cluster: vm.cluster_uuid,
                host: x.dest_req,
                avoid_hosts: vec![x.src],
            };
            let a: Allocation = c.bus().send(AllocateHost { vm: x.vm, spec, hold_disk: true }).await?;
            x.dest = Some(a.host);
            Ok(())
        }, undo |c, x| {
            release_reservations(&c, x.vm, Some(x.src)).await
        }))
        .then(step!(w, "migrate-on-hypervisor", MigrateCtx, |c, x| {
            let dest = x.dest.expect("destination allocated");
            let src = c.host_target(x.src).await?;
            let d: HostTarget = c.host_target(dest).await?;
            let cmd = MigrateVmCmd { vm: x.vm, dest_address: d.address.to_string(), dest_token: d.token.clone() };
            match agent(&c, &src, &cmd).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // The answer may be lost while the VM did move: ask the destination.
                    if probe(&c, dest, x.vm).await == Some(PowerState::Running) {
                        tracing::info!(vm = %x.vm, error = %e, "migration reported failure but the VM runs on the destination");
                        Ok(())
                    } else {
                        Err(e)
                    }
                }
            }
        }))
        .then(step!(w, "switch-host", MigrateCtx, |c, x| {
            let dest = x.dest.expect("destination allocated");
            must(&c, "switch-host", || super::sync::relocate(&c, x.vm, x.src, dest, VmState::Migrating)).await?;
            let vm = c.get::<Vm>(x.vm).await?;
            c.engine.ext.vm_after(VmOp::Migrate, &info(&vm), Ok(())).await;
            Ok(())
        }))
}

// ---------------------------------------------------------------- registration

pub(crate) struct Chains {
    create: Arc<FlowChain<CreateCtx>>,
    start: Arc<FlowChain<PowerCtx>>,
    stop: Arc<FlowChain<PowerCtx>>,
    reboot: Arc<FlowChain<PowerCtx>>,
    destroy: Arc<FlowChain<PowerCtx>>,
    recover: Arc<FlowChain<PowerCtx>>,
    expunge: Arc<FlowChain<PowerCtx>>,
    migrate: Arc<FlowChain<MigrateCtx>>,
}

fn power(vm: Uuid, force: bool) -> PowerCtx {
    PowerCtx {
        vm,
        prev: VmState::Unknown,
        host: None,
        force,
    }
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    let w = Arc::downgrade(cloud);
    let chains = Arc::new(Chains {
        create: Arc::new(create_chain(&w)),
        start: Arc::new(start_chain(&w)),
        stop: Arc::new(stop_chain(&w)),
        reboot: Arc::new(reboot_chain(&w)),
        destroy: Arc::new(destroy_chain(&w)),
        recover: Arc::new(recover_chain(&w)),
        expunge: Arc::new(expunge_chain(&w)),
        migrate: Arc::new(migrate_chain(&w)),
    });
    let reg = &cloud.engine.chains;
    reg.register(chains.create.clone());
    reg.register(chains.start.clone());
    reg.register(chains.stop.clone());
    reg.register(chains.reboot.clone());
    reg.register(chains.destroy.clone());
    reg.register(chains.recover.clone());
    reg.register(chains.expunge.clone());
    reg.register(chains.migrate.clone());

    let ch = chains.clone();
    cloud.handle(move |c: Arc<Cloud>, m: CreateVm| {
        let ch = ch.clone();
        async move {
            let vm = m.uuid.unwrap_or_else(|| c.engine.ids.uuid());
            let ctx = plan_create(&c, &m, vm).await?;
            let q = vm_queue(vm);
            c.engine
                .queues
                .run(&q, 1, run_chain(&c, &ch.create, vm, ctx))
                .await?;
            c.get::<Vm>(vm).await
        }
    })?;
    macro_rules! power_op {
        ($msg:ty, $chain:ident, $force:expr) => {{
            let ch = chains.clone();
            cloud.handle(move |c: Arc<Cloud>, m: $msg| {
                let ch = ch.clone();
                async move {
                    let _ = c.get::<Vm>(m.uuid).await?;
                    let q = vm_queue(m.uuid);
                    #[allow(clippy::redundant_closure_call)]
                    let force = ($force)(&m);
                    c.engine
                        .queues
                        .run(
                            &q,
                            1,
                            run_chain(&c, &ch.$chain, m.uuid, power(m.uuid, force)),
                        )
                        .await?;
                    c.get::<Vm>(m.uuid).await
                }
            })?;
        }};
    }
    power_op!(StartVm, start, |_m: &StartVm| false);
    power_op!(StopVm, stop, |m: &StopVm| m.force);
    power_op!(RebootVm, reboot, |_m: &RebootVm| false);
    power_op!(DestroyVm, destroy, |m: &DestroyVm| m.force);
    power_op!(RecoverVm, recover, |_m: &RecoverVm| false);

    let ch = chains.clone();
    cloud.handle(move |c: Arc<Cloud>, m: ExpungeVm| {
        let ch = ch.clone();
        async move {
            let vm = c.get::<Vm>(m.uuid).await?;
            let q = vm_queue(m.uuid);
            c.engine
                .queues
                .run(&q, 1, async {
                    let state = c.get::<Vm>(m.uuid).await?.state;
                    if m.force && !matches!(state, VmState::Destroyed | VmState::Expunging) {
                        run_chain(&c, &ch.destroy, vm.uuid, power(vm.uuid, true)).await?;
                    }
                    run_chain(&c, &ch.expunge, vm.uuid, power(vm.uuid, m.force)).await
                })
                .await?;
            Ok(())
        }
    })?;

    let ch = chains.clone();
    cloud.handle(move |c: Arc<Cloud>, m: MigrateVm| {
        let ch = ch.clone();
        async move {
            let q = vm_queue(m.uuid);
            c.engine
                .queues
                .run(&q, 1, async {
                    let vm = c.get::<Vm>(m.uuid).await?;
                    vm.state.check(vm.uuid, crate::model::VmAction::Migrate)?;
                    let src = vm.host_uuid.ok_or_else(|| Error::internal(format!("running vm {} has no host", vm.uuid)))?;
                    if let Some(d) = m.host_uuid {
                        if d == src {
                            return Err(Error::invalid(format!("vm {} already runs on host {d}", vm.uuid)));
                        }
                        let dh = c.get::<Host>(d).await?;
                        if Some(dh.cluster_uuid) != vm.cluster_uuid {
                            return Err(Error::invalid(format!(
                                "host {d} is in another cluster; VMs on local storage migrate within their cluster"
                            )));
                        }
                    }
                    let ctx = MigrateCtx { vm: vm.uuid, src, dest_req: m.host_uuid, dest: None };
                    run_chain(&c, &ch.migrate, vm.uuid, ctx).await
                })
                .await?;
            c.get::<Vm>(m.uuid).await
        }
    })?;
    Ok(())
}
