//! Creating a VM, in ZStack's order: VM row, backup storage, host (capacity reserved, host
//! written to the row at once), volumes (local storage taken), NICs, IPs, volumes on the host,
//! network services, the VM on the hypervisor, Running. Every step undoes itself; on failure
//! the VM row disappears last.

use super::chain::{l2s_of, release_reservations, step, step_fn, vm_spec, Step};
use super::{after, agent, info, planted_ip_leak, CreateVm};
use crate::error::{Error, ErrorCode};
use crate::extension::{AllocationSpec, VmOp};
use crate::flow::FlowChain;
use crate::model::*;
use crate::services::allocator::{AllocateHost, Allocation};
use crate::services::network::{AllocateIp, ReleaseIps};
use crate::services::quota::{self, Charge};
use crate::services::{check_name, Cloud};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Weak};
use stratus_agent_protocol::{
    CreateVolumeCmd, DeleteVolumeCmd, DestroyVmCmd, ImageRef, StartVmCmd,
};
use stratus_store::ErrorClass;
use stratus_store::{Batch, Expect, Json, Query, Row, Update, Value};
use uuid::Uuid;

/// A NIC to create, with its identity chosen before the chain starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct NicPlan {
    uuid: Uuid,
    l3: Uuid,
    mac: String,
    ip: Option<String>,
    device: i64,
}

/// A volume to create, with its identity chosen before the chain starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct VolPlan {
    uuid: Uuid,
    size_mib: i64,
    offering: Option<Uuid>,
    device: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CreateCtx {
    pub(super) vm: Uuid,
    name: String,
    description: Option<String>,
    zone: Uuid,
    cluster_req: Option<Uuid>,
    host_req: Option<Uuid>,
    offering: Uuid,
    cpu: i64,
    memory_mib: i64,
    image: Uuid,
    root: VolPlan,
    data: Vec<VolPlan>,
    nics: Vec<NicPlan>,
    l2s: Vec<Uuid>,
    host: Option<Uuid>,
    ps: Option<Uuid>,
    /// The owner, charged for the VM and its volumes.
    #[serde(default)]
    account: Option<Uuid>,
}

impl CreateCtx {
    fn volumes(&self) -> impl Iterator<Item = &VolPlan> {
        std::iter::once(&self.root).chain(self.data.iter())
    }
}

pub(super) fn chain(w: &Weak<Cloud>) -> FlowChain<CreateCtx> {
    let s = |name, run| -> Step<CreateCtx> { step(w, name, run) };
    FlowChain::new("vm.create")
        .then(s("vm-record", step_fn!(vm_record)).undo(step_fn!(vm_record_undo)))
        .then(s("select-backup-storage", step_fn!(select_backup_storage)))
        .then(s("allocate-host", step_fn!(allocate_host)).undo(step_fn!(allocate_host_undo)))
        .then(
            s("allocate-volumes", step_fn!(allocate_volumes)).undo(step_fn!(allocate_volumes_undo)),
        )
        .then(s("create-nics", step_fn!(create_nics)).undo(step_fn!(create_nics_undo)))
        .then(s("allocate-ips", step_fn!(allocate_ips)).undo(step_fn!(allocate_ips_undo)))
        .then(
            s("instantiate-volumes", step_fn!(instantiate_volumes))
                .undo(step_fn!(instantiate_volumes_undo)),
        )
        .then(s("network-services", step_fn!(network_services)))
        .then(s("start-on-hypervisor", step_fn!(start)).undo(step_fn!(start_undo)))
        .then(s("mark-running", step_fn!(mark_running)))
}

async fn vm_record(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let row = Row::new(
        ctx.vm,
        Vm {
            name: ctx.name.clone(),
            zone_uuid: ctx.zone,
            cluster_uuid: None,
            host_uuid: None,
            last_host_uuid: None,
            instance_offering_uuid: ctx.offering,
            image_uuid: ctx.image,
            root_volume_uuid: None,
            default_l3_uuid: ctx.nics.first().map(|n| n.l3),
            state: VmState::Created,
            cpu: ctx.cpu,
            memory_mib: ctx.memory_mib,
            description: ctx.description.clone(),
            account_uuid: ctx.account,
        },
    );
    // The VM and its owner's quota together: both or neither.
    let charge = Charge::vm(ctx.cpu, ctx.memory_mib);
    let mut b = Batch::new().insert(&row);
    if let Some(u) = quota::take(c.db(), ctx.account, &charge).await? {
        b = b.update(u);
    }
    match c.db().commit(b).await {
        Ok(_) => Ok(()),
        Err(e) if e.class() == ErrorClass::AlreadyExists => Ok(()),
        Err(e) if e.class() == ErrorClass::ConditionFailed => {
            Err(quota::exceeded(c.db(), ctx.account, &charge)
                .await?
                .unwrap_or_else(|| e.into()))
        }
        Err(e) => Err(e.into()),
    }
}

async fn vm_record_undo(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    super::lifecycle::forget_vm_row(&c, ctx.vm).await
}

async fn select_backup_storage(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let image = c.get::<Image>(ctx.image).await?;
    let linked = c
        .db()
        .count(
            &Query::of::<BsZone>()
                .eq("bs_uuid", image.bs_uuid)
                .eq("zone_uuid", ctx.zone),
        )
        .await?;
    if linked == 0 {
        return Err(Error::invalid(format!(
            "image {} is on backup storage {}, which is not attached to zone {}",
            image.uuid, image.bs_uuid, ctx.zone
        )));
    }
    Ok(())
}

async fn allocate_host(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    if let Some(host) = ctx.host {
        // Run again (a retry, a recovery): once its earlier run recorded the VM on the host it
        // reserved, that reservation stands; another would hold capacity twice.
        let vm = c.get::<Vm>(ctx.vm).await?;
        if vm.host_uuid == Some(host) && vm.state == VmState::Starting {
            return Ok(());
        }
    }
    let spec = AllocationSpec {
        cpu: ctx.cpu,
        memory_mib: ctx.memory_mib,
        disk_mib: ctx.volumes().map(|v| v.size_mib).sum(),
        l2_networks: ctx.l2s.clone(),
        zone: Some(ctx.zone),
        cluster: ctx.cluster_req,
        host: ctx.host_req,
        avoid_hosts: vec![],
    };
    let a: Allocation = c
        .bus()
        .send(AllocateHost {
            vm: ctx.vm,
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
    ctx.host = Some(a.host);
    ctx.ps = Some(ps);
    c.db()
        .commit(
            Batch::new().update(
                Update::of::<Vm>(ctx.vm)
                    .set("host_uuid", a.host)
                    .set("last_host_uuid", a.host)
                    .set("cluster_uuid", a.cluster)
                    .set("state", VmState::Starting.as_str()),
            ),
        )
        .await?;
    c.bus().publish(
        "/vm/state/change",
        || serde_json::json!({"uuid": ctx.vm, "old": "Created", "new": "Starting"}),
    );
    Ok(())
}

async fn allocate_host_undo(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
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

async fn allocate_volumes(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let (host, ps) = (
        ctx.host.expect("host allocated"),
        ctx.ps.expect("storage chosen"),
    );
    let mut b = Batch::new();
    let mut total = 0;
    for v in ctx.volumes() {
        let root = v.uuid == ctx.root.uuid;
        b = b.insert(&Row::new(
            v.uuid,
            Volume {
                name: format!("{}-for-{}", if root { "ROOT" } else { "DATA" }, ctx.name),
                kind: if root {
                    VolumeType::Root
                } else {
                    VolumeType::Data
                },
                vm_uuid: Some(ctx.vm),
                ps_uuid: Some(ps),
                host_uuid: Some(host),
                size_mib: v.size_mib,
                state: VolumeState::Creating,
                device_index: Some(v.device),
                disk_offering_uuid: v.offering,
                image_uuid: root.then_some(ctx.image),
                tags: Json(vec![]),
                account_uuid: ctx.account,
            },
        ));
        total += v.size_mib;
    }
    b = b.update(local_storage_take(ps, host, total));
    let charge = Charge::volumes(ctx.volumes().count() as i64, total);
    if let Some(u) = quota::take(c.db(), ctx.account, &charge).await? {
        b = b.update(u);
    }
    match c.db().commit(b).await {
        Ok(_) => {
            c.allocator.disk_changed(host, ps, total);
            Ok(())
        }
        Err(e) if e.class() == ErrorClass::AlreadyExists => Ok(()),
        Err(e) if e.class() == ErrorClass::ConditionFailed => {
            match quota::exceeded(c.db(), ctx.account, &charge).await? {
                Some(q) => Err(q),
                None => Err(Error::new(
                    ErrorCode::CapacityExhausted,
                    format!("local storage of host {host} has no room for {total} MiB"),
                )),
            }
        }
        Err(e) => Err(e.into()),
    }
}

async fn allocate_volumes_undo(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    for v in ctx.volumes() {
        super::volume::forget_volume_row(&c, v.uuid).await?;
    }
    Ok(())
}

async fn create_nics(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let mut b = Batch::new();
    for n in &ctx.nics {
        b = b.insert(&Row::new(
            n.uuid,
            VmNic {
                vm_uuid: ctx.vm,
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
        Err(e) if e.class() == ErrorClass::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn create_nics_undo(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let b = ctx.nics.iter().fold(Batch::new(), |b, n| {
        b.delete::<VmNic>(n.uuid, Expect::Maybe)
    });
    c.db().commit(b).await?;
    Ok(())
}

async fn allocate_ips(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    for n in &ctx.nics {
        let m = AllocateIp {
            l3_uuid: n.l3,
            nic_uuid: n.uuid,
            ip: n.ip.clone(),
        };
        c.bus().send(m).await?;
    }
    Ok(())
}

async fn allocate_ips_undo(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    if planted_ip_leak(&c) {
        // The planted bug: addresses stay taken after a failed creation.
        return Ok(());
    }
    for n in &ctx.nics {
        c.bus()
            .send(ReleaseIps {
                l3_uuid: n.l3,
                nic_uuid: n.uuid,
            })
            .await?;
    }
    Ok(())
}

async fn instantiate_volumes(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let target = c.host_target(ctx.host.expect("host allocated")).await?;
    let image = c.get::<Image>(ctx.image).await?;
    for v in ctx.volumes() {
        let cmd = CreateVolumeCmd {
            volume: v.uuid,
            size_mib: v.size_mib as u64,
            image: (v.uuid == ctx.root.uuid).then(|| ImageRef {
                uuid: image.uuid,
                url: image.url.clone(),
                size_mib: image.size_mib as u64,
                checksum: image.checksum.clone(),
            }),
        };
        agent(&c, &target, &cmd).await?;
    }
    let b = ctx.volumes().fold(Batch::new(), |b, v| {
        b.update(Update::of::<Volume>(v.uuid).set("state", VolumeState::Ready.as_str()))
    });
    c.db().commit(b).await?;
    Ok(())
}

async fn instantiate_volumes_undo(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let Some(host) = ctx.host else { return Ok(()) };
    let target = c.host_target(host).await?;
    for v in ctx.volumes() {
        agent(&c, &target, &DeleteVolumeCmd { volume: v.uuid }).await?;
    }
    Ok(())
}

async fn network_services(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let vm = c.get::<Vm>(ctx.vm).await?;
    c.engine.ext.vm_before(VmOp::Create, &info(&vm)).await
}

async fn start(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let target = c.host_target(ctx.host.expect("host allocated")).await?;
    let spec = vm_spec(&c, ctx.vm).await?;
    agent(&c, &target, &StartVmCmd { spec }).await
}

async fn start_undo(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    let Some(host) = ctx.host else { return Ok(()) };
    let target = c.host_target(host).await?;
    agent(&c, &target, &DestroyVmCmd { vm: ctx.vm }).await
}

async fn mark_running(c: Arc<Cloud>, ctx: &mut CreateCtx) -> Result<(), Error> {
    c.db()
        .commit(
            Batch::new().update(
                Update::of::<Vm>(ctx.vm)
                    .set("root_volume_uuid", ctx.root.uuid)
                    .set("state", VmState::Running.as_str()),
            ),
        )
        .await?;
    c.bus().publish(
        "/vm/state/change",
        || serde_json::json!({"uuid": ctx.vm, "old": "Starting", "new": "Running"}),
    );
    after(&c, VmOp::Create, ctx.vm).await?;
    Ok(())
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

/// Check a create request and choose the identities of everything it will create.
pub(super) async fn plan(c: &Cloud, m: &CreateVm, vm: Uuid) -> Result<CreateCtx, Error> {
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
        if c.get::<Cluster>(cl).await?.zone_uuid != zone {
            return Err(Error::invalid(format!(
                "cluster {cl} is not in zone {zone}"
            )));
        }
    }
    if let Some(h) = m.host_uuid {
        if c.get::<Host>(h).await?.zone_uuid != zone {
            return Err(Error::invalid(format!("host {h} is not in zone {zone}")));
        }
    }
    let mut data = Vec::new();
    for (i, d) in m.data_disk_offering_uuids.iter().enumerate() {
        let off = c.get::<DiskOffering>(*d).await?;
        data.push(VolPlan {
            uuid: c.engine.ids.uuid(),
            size_mib: off.size_mib,
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
        memory_mib: offering.memory_mib,
        image: image.uuid,
        root: VolPlan {
            uuid: c.engine.ids.uuid(),
            size_mib: image.size_mib,
            offering: None,
            device: 0,
        },
        data,
        nics,
        l2s: l2s_of(c, &m.l3_network_uuids).await?,
        host: None,
        ps: None,
        account: m.account_uuid,
    })
}
