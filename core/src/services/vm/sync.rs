//! State sync: the database agrees with what hosts run.
//!
//! Every ping (and every connect) reports the host's VMs and volumes. The host's owner compares
//! them with the database and sends a [`VmStateReport`] for each VM that looks wrong; the VM's
//! owner handles it in the VM's queue — after any operation in flight — asks the host again
//! (the ping may be stale by then) and corrects the database:
//! - found stopped (or gone) while the database holds it running → Stopped, capacity returned;
//! - found running where the database says stopped → Running, capacity taken;
//! - found running on another host than recorded (a migration whose end was lost) → moved;
//! - running but destroyed in the database → destroyed on the host;
//! - unknown to the database → destroyed (or only reported, `vm.orphan.policy = report`);
//! - its host disconnected → Unknown.
//!
//! Volumes a host has that the database has never heard of are deleted the same way; a copy
//! on another host than the database's is deleted, or followed when it is the only one; a
//! volume `Ready` on its host in the database that the host no longer has is marked `Lost`
//! once no host of its cluster has it (and `Ready` again should it turn up).
//! VMs in a transitional state are left alone: their operation, or recovery, ends it.
//!
//! Every correction is counted by kind in [`SyncRepairs`].

use super::chain::{probe, release_reservations};
use super::{agent, set_state, vm_queue, ORPHAN_POLICY};
use crate::bus::Message;
use crate::error::{Error, ErrorCode};
use crate::extension::AllocationSpec;
use crate::model::*;
use crate::services::allocator::AllocateHost;
use crate::services::Cloud;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use stratus_agent_protocol::{
    DeleteVolumeCmd, DestroyVmCmd, DetachVolumeCmd, PingCmd, PowerState, VmStatus, VmStatusCmd,
};
use stratus_store::ErrorClass;
use stratus_store::{Batch, Query, Row, Update, Value};
use uuid::Uuid;

/// How many corrections state sync made, by kind (a VM's reconciliation by its outcome,
/// `volume.*` for volumes): what faults left behind, for the scenarios' reports and `/metrics`.
#[derive(Debug, Default)]
pub struct SyncRepairs(Mutex<BTreeMap<String, u64>>);

impl SyncRepairs {
    pub fn count(&self, what: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(what.to_string()).or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What a host reported (or that it disconnected: `full == false`, nothing known).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncHostVms {
    pub host: Uuid,
    pub vms: Vec<VmStatus>,
    pub volumes: Vec<Uuid>,
    pub full: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncSummary {
    /// VMs handed to their owner for a closer look.
    pub reported: u32,
    pub orphan_vms: u32,
    pub orphan_volumes: u32,
}

impl Message for SyncHostVms {
    type Reply = SyncSummary;
    const NAME: &'static str = "vm.sync-host";
}

/// One VM looks wrong on `host` (`state` None: not there; `disconnected`: the host is gone).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStateReport {
    pub vm: Uuid,
    pub host: Uuid,
    pub state: Option<PowerState>,
    #[serde(default)]
    pub disconnected: bool,
}

impl Message for VmStateReport {
    type Reply = String;
    const NAME: &'static str = "vm.state-report";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.vm)
    }
}

/// Whether the database's view of a VM (its state, on `vm_host`) disagrees with `seen` on host
/// `host`.
fn looks_wrong(
    state: VmState,
    vm_host: Option<Uuid>,
    host: Uuid,
    seen: Option<PowerState>,
) -> bool {
    if state.is_transitional() {
        return false;
    }
    let here = vm_host == Some(host);
    match (here, seen) {
        (true, Some(PowerState::Running)) => state != VmState::Running,
        (true, Some(PowerState::Paused)) => state != VmState::Paused,
        (true, Some(PowerState::Crashed)) => state != VmState::Crashed,
        (true, Some(PowerState::Stopped)) | (true, None) => true,
        (false, Some(PowerState::Running) | Some(PowerState::Paused)) => true,
        (false, _) => false,
    }
}

/// What a host's state sync reads of a VM the database places on the host.
struct OnHost {
    uuid: Uuid,
    state: VmState,
}

/// What it reads of a volume the database places on the host.
struct Placed {
    state: VolumeState,
    vm_uuid: Option<Uuid>,
}

async fn host_sync(c: &Arc<Cloud>, m: SyncHostVms) -> Result<SyncSummary, Error> {
    let mut sum = SyncSummary::default();
    let mut orphans = Orphans::default();
    // Only the fields looked at (every ping of every host reads these rows).
    let on_host = c
        .db()
        .project(&Query::of::<Vm>().eq("host_uuid", m.host), |r| {
            Ok(OnHost {
                uuid: r.uuid,
                state: r.decode("state")?,
            })
        })
        .await?;
    if !m.full {
        // Every VM on the host, whatever its state now: one in the middle of an operation is
        // looked at again when the operation ends (the report waits in its queue).
        for vm in on_host.iter() {
            let r = VmStateReport {
                vm: vm.uuid,
                host: m.host,
                state: None,
                disconnected: true,
            };
            spawn_report(c, r);
            sum.reported += 1;
        }
        return Ok(sum);
    }
    let seen: BTreeMap<Uuid, PowerState> = m.vms.iter().map(|s| (s.uuid, s.state)).collect();
    for vm in &on_host {
        let s = seen.get(&vm.uuid).copied();
        // Placed here by the query.
        if looks_wrong(vm.state, Some(m.host), m.host, s) {
            spawn_report(
                c,
                VmStateReport {
                    vm: vm.uuid,
                    host: m.host,
                    state: s,
                    disconnected: false,
                },
            );
            sum.reported += 1;
        }
    }
    for (uuid, state) in &seen {
        if on_host.iter().any(|v| v.uuid == *uuid) {
            continue;
        }
        match c.db().get::<Vm>(*uuid).await? {
            None => {
                if *state != PowerState::Stopped || c.db().get::<Vm>(*uuid).await?.is_none() {
                    orphans.vms.push(*uuid);
                    sum.orphan_vms += 1;
                }
            }
            Some(vm) => {
                let destroyed_but_defined = vm.state == VmState::Destroyed;
                if looks_wrong(vm.state, vm.host_uuid, m.host, Some(*state))
                    || destroyed_but_defined
                {
                    spawn_report(
                        c,
                        VmStateReport {
                            vm: *uuid,
                            host: m.host,
                            state: Some(*state),
                            disconnected: false,
                        },
                    );
                    sum.reported += 1;
                }
            }
        }
    }
    // The volumes the database places here, in one indexed read (a read per reported volume
    // made a ping as many reads as its host has volumes); a reported volume not among them is
    // read alone.
    let placed: BTreeMap<Uuid, Placed> = c
        .db()
        .project(&Query::of::<Volume>().eq("host_uuid", m.host), |r| {
            Ok((
                r.uuid,
                Placed {
                    state: r.decode("state")?,
                    vm_uuid: r.decode("vm_uuid")?,
                },
            ))
        })
        .await?
        .into_iter()
        .collect();
    for v in &m.volumes {
        if let Some(p) = placed.get(v) {
            if p.state == VolumeState::Lost {
                found_volume(c, m.host, *v, p.vm_uuid);
            }
            continue;
        }
        match c.db().get::<Volume>(*v).await? {
            None => {
                orphans.volumes.push(*v);
                sum.orphan_volumes += 1;
            }
            Some(vol) if vol.host_uuid.is_some_and(|h| h != m.host) => {
                // A copy on a host the database does not place it on: what a migration that
                // ended badly can leave behind (found by the 30,000-host scenario). Unless the
                // VM using it runs here (then its relocation, reported above, moves the rows);
                // a stopped copy of the VM here is stale too (found by partition-storm).
                let runs_here = vol.vm_uuid.is_some_and(|vm| {
                    matches!(
                        seen.get(&vm),
                        Some(PowerState::Running | PowerState::Paused)
                    )
                });
                if !runs_here {
                    stray_copy(c, m.host, vol.uuid, vol.vm_uuid);
                    sum.orphan_volumes += 1;
                }
            }
            Some(vol) if vol.host_uuid.is_none() => {
                unplaced_copy(c, m.host, vol.uuid);
                sum.orphan_volumes += 1;
            }
            // Placed here since the read above.
            Some(_) => {}
        }
    }
    // Volumes the database has Ready here that the host no longer has. Root volumes of
    // destroyed VMs: an expunge whose delete ran on the host while its answer was lost (a
    // partition) went back to Destroyed; the deletion is finished (found by the partition-storm
    // scenario). Any other: lost, unless another host of the cluster has it.
    let ready = placed.iter().filter(|(_, v)| v.state == VolumeState::Ready);
    for (&uuid, v) in ready {
        if m.volumes.contains(&uuid) {
            continue;
        }
        let destroyed = match v.vm_uuid {
            Some(vm) => {
                (c.db().get::<Vm>(vm).await?).is_some_and(|x| x.state == VmState::Destroyed)
            }
            None => false,
        };
        match v.vm_uuid {
            Some(vm) if destroyed => deleted_on_host(c, m.host, vm, uuid),
            vm => missing_volume(c, m.host, uuid, vm),
        }
        sum.orphan_volumes += 1;
    }
    orphans.clean_up(c, m.host);
    Ok(sum)
}

/// Forget `volume` of the destroyed `vm`, gone from `host` — decided again in the VM's queue.
fn deleted_on_host(c: &Arc<Cloud>, host: Uuid, vm: Uuid, volume: Uuid) {
    later_in_queue(
        c,
        vm_queue(vm),
        "forget a volume gone from its host",
        move |c| async move {
            let destroyed = c
                .db()
                .get::<Vm>(vm)
                .await?
                .is_some_and(|x| x.state == VmState::Destroyed);
            let Some(v) = c.db().get::<Volume>(volume).await? else {
                return Ok(());
            };
            if !destroyed || v.host_uuid != Some(host) || v.state != VolumeState::Ready {
                return Ok(());
            }
            tracing::info!(%vm, %volume, %host, "volume of a destroyed VM gone from its host: forgotten");
            super::volume::delete_volume_everywhere(&c, &v, false).await?;
            c.repairs.count("volume.forgotten");
            Ok(())
        },
    );
}

/// Delete the copy of `volume` on `host`, where the database does not place it — decided again
/// in the queue of the volume's VM (or of the volume when detached), so that a migration in
/// flight finishes first and a copy it is still moving is left alone.
fn stray_copy(c: &Arc<Cloud>, host: Uuid, volume: Uuid, vm: Option<Uuid>) {
    c.bus().publish(
        "/volume/stray",
        || serde_json::json!({"uuid": volume, "host": host}),
    );
    if !destroy_orphans(c) {
        return;
    }
    let q = super::volume_owner_queue(volume, vm);
    later_in_queue(c, q, "delete a stray volume copy", move |c| async move {
        let Some(vol) = c.db().get::<Volume>(volume).await? else {
            return Ok(());
        };
        if vol.state.is_transitional() || vol.host_uuid.is_none_or(|h| h == host) {
            return Ok(());
        }
        if let Some(vm) = vol.vm_uuid {
            let busy = c
                .db()
                .get::<Vm>(vm)
                .await?
                .is_none_or(|v| v.state.is_transitional() || v.host_uuid == Some(host));
            if busy {
                return Ok(());
            }
        }
        // Never the last copy: the host the database names must hold it.
        let Some(home) = vol.host_uuid else {
            return Ok(());
        };
        let Some(held) = volumes_held(&c, home).await? else {
            tracing::warn!(%volume, %host, %home, "the host the database names does not know itself; copy kept");
            return Ok(());
        };
        if !held.contains(&volume) {
            return adopt_only_copy(&c, &vol, home, host).await;
        }
        let target = c.host_target(host).await?;
        if let Some(vm) = vol.vm_uuid {
            // A stale, stopped definition of the VM here still holds the disk: it goes first.
            let here = agent(&c, &target, &VmStatusCmd { vm })
                .await?
                .map(|s| s.state);
            match here {
                Some(PowerState::Running | PowerState::Paused) => return Ok(()),
                Some(_) => agent(&c, &target, &DestroyVmCmd { vm }).await?,
                None => {}
            }
        }
        tracing::debug!(%volume, %host, %home, "stray volume copy deleted");
        agent(&c, &target, &DeleteVolumeCmd { volume }).await?;
        c.repairs.count("volume.stray-deleted");
        Ok(())
    });
}

/// `volume`, `Ready` on `host` in the database (of `vm`, or detached), is not there. Decided
/// again in the queue of its VM (or of the volume), where no operation on it runs: if the host
/// still lacks it and no other host of its cluster holds it (local volumes move only within
/// their cluster), it is marked `Lost` — its data is gone, and the database says so instead
/// of keeping it `Ready` or forgetting it. A copy on another host is the stray-copy repair's
/// (the database follows an only copy); a host that does not answer leaves the decision to a
/// later ping.
fn missing_volume(c: &Arc<Cloud>, host: Uuid, volume: Uuid, vm: Option<Uuid>) {
    let q = super::volume_owner_queue(volume, vm);
    later_in_queue(
        c,
        q,
        "decide on a volume gone from its host",
        move |c| async move {
            let Some(v) = c.db().get::<Volume>(volume).await? else {
                return Ok(());
            };
            if v.state != VolumeState::Ready || v.host_uuid != Some(host) || v.vm_uuid != vm {
                return Ok(());
            }
            if let Some(vm) = vm {
                let busy = (c.db().get::<Vm>(vm).await?)
                    .is_none_or(|x| x.state.is_transitional() || x.state == VmState::Destroyed);
                if busy {
                    return Ok(());
                }
            }
            let cluster = c.get::<Host>(host).await?.cluster_uuid;
            let hosts = c
                .db()
                .select::<Host>(&Query::of::<Host>().eq("cluster_uuid", cluster))
                .await?;
            // Fails closed: a read of the cluster without the volume's own host decides nothing.
            if !hosts.iter().any(|h| h.uuid == host) {
                return Ok(());
            }
            for h in hosts {
                if !gone_from(&c, h.uuid, volume).await {
                    // Held there, or not known: not lost (yet).
                    return Ok(());
                }
            }
            let lost = Update::of::<Volume>(volume)
                .version(v.version)
                .set("state", VolumeState::Lost.as_str());
            c.db().commit(Batch::new().update(lost)).await?;
            c.bus().publish(
                "/volume/lost",
                || serde_json::json!({"uuid": volume, "host": host, "vm": vm}),
            );
            tracing::error!(%volume, %host, ?vm, "volume gone from its host and from every host of its cluster: marked Lost, its data is gone");
            c.repairs.count("volume.lost");
            Ok(())
        },
    );
}

/// `volume`, `Lost` on `host` in the database, is there after all (its host came back with its
/// disks): `Ready` again, decided in its queue.
fn found_volume(c: &Arc<Cloud>, host: Uuid, volume: Uuid, vm: Option<Uuid>) {
    let q = super::volume_owner_queue(volume, vm);
    later_in_queue(c, q, "take back a lost volume", move |c| async move {
        let found = Update::of::<Volume>(volume)
            .when_eq("state", VolumeState::Lost.as_str())
            .when_eq("host_uuid", host)
            .set("state", VolumeState::Ready.as_str());
        if super::guarded(&c, found).await? {
            tracing::warn!(%volume, %host, "lost volume found on its host: Ready again");
            c.repairs.count("volume.found");
        }
        Ok(())
    });
}

/// Delete the copy of `volume` on `host` when the database places the volume on no host: an
/// attach whose creation on the host timed out was rolled back, and the creation finished later
/// (found by the model sweep). Decided again in the volume's queue, which an attach holds from
/// placing the volume to creating it on the host: there, a volume on no host has no copy that
/// anything still wants.
fn unplaced_copy(c: &Arc<Cloud>, host: Uuid, volume: Uuid) {
    c.bus().publish(
        "/volume/stray",
        || serde_json::json!({"uuid": volume, "host": host}),
    );
    if !destroy_orphans(c) {
        return;
    }
    let q = super::volume::volume_queue(volume);
    later_in_queue(
        c,
        q,
        "delete an unplaced volume's copy",
        move |c| async move {
            let Some(vol) = c.db().get::<Volume>(volume).await? else {
                return Ok(());
            };
            if vol.host_uuid.is_some() || vol.state != VolumeState::NotInstantiated {
                return Ok(());
            }
            delete_copy(&c, host, volume).await?;
            tracing::info!(%volume, %host, "copy of a volume placed on no host deleted");
            c.repairs.count("volume.unplaced-copy-deleted");
            Ok(())
        },
    );
}

/// The only copy of `vol` is on `host`, not on `home` where the database places it (a migration
/// that timed out and was rolled back in the database finished on the hosts later; found by the
/// model sweep). Unless its VM runs (or is paused), the database follows the copy: the volume
/// and its local-storage share move to `host`, where the VM will start next (a volume marked
/// `Lost` meanwhile is `Ready` again). Called in the VM's queue.
async fn adopt_only_copy(
    c: &Arc<Cloud>,
    vol: &stratus_store::Row<Volume>,
    home: Uuid,
    host: Uuid,
) -> Result<(), Error> {
    let vm = match vol.vm_uuid {
        Some(vm) => c.db().get::<Vm>(vm).await?,
        None => None,
    };
    if vm
        .as_ref()
        .is_some_and(|v| matches!(v.state, VmState::Running | VmState::Paused))
    {
        tracing::warn!(volume = %vol.uuid, %host, %home, "only copy is on another host than the running VM's; kept");
        return Ok(());
    }
    // Ask again: the report that found the copy may be old.
    if !volumes_held(c, host)
        .await?
        .is_some_and(|held| held.contains(&vol.uuid))
    {
        return Ok(());
    }
    let mut b = Batch::new().update(
        Update::of::<Volume>(vol.uuid)
            .when_eq("host_uuid", home)
            .set("host_uuid", host)
            .set("state", VolumeState::Ready.as_str()),
    );
    if let Some(ps) = vol.ps_uuid {
        b = b
            .update(local_storage_give_back(ps, home, vol.size_mib))
            .update(local_storage_count(ps, host, vol.size_mib));
    }
    match c.db().commit(b).await {
        Ok(_) => {
            tracing::info!(volume = %vol.uuid, %host, %home, "only copy is on another host than the database said: the database follows it");
            c.repairs.count("volume.adopted");
            Ok(())
        }
        // Moved meanwhile: the next report decides again.
        Err(e) if e.class() == ErrorClass::ConditionFailed => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether `host` answered that it does not hold `volume` (not when it did not answer, or does
/// not know itself yet).
pub(super) async fn gone_from(c: &Cloud, host: Uuid, volume: Uuid) -> bool {
    volumes_held(c, host)
        .await
        .is_ok_and(|held| held.is_some_and(|h| !h.contains(&volume)))
}

/// The volumes `host` says it holds; `None` when its agent does not know it is that host (it
/// restarted). Only asking: this node need not be the host's owner, so no report URL is given.
pub(super) async fn volumes_held(c: &Cloud, host: Uuid) -> Result<Option<Vec<Uuid>>, Error> {
    let p = agent(
        c,
        &c.host_target(host).await?,
        &PingCmd {
            host_uuid: host,
            report_url: String::new(),
        },
    )
    .await?;
    Ok((p.host_uuid == Some(host)).then_some(p.volumes))
}

/// Run `work` later, in queue `q`: state sync decides again there, after whatever operation
/// holds the queue now. A failure is logged; the next report tries again.
fn later_in_queue<F, Fut>(c: &Arc<Cloud>, q: String, what: &'static str, work: F)
where
    F: FnOnce(Arc<Cloud>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    let c = c.clone();
    tokio::spawn(async move { in_queue(&c, q, what, work).await });
}

/// Run `work` in queue `q` now; a failure is logged (the next report tries again).
async fn in_queue<F, Fut>(c: &Arc<Cloud>, q: String, what: &'static str, work: F)
where
    F: FnOnce(Arc<Cloud>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    let r = c.engine.queues.run(&q, 1, work(c.clone())).await;
    if let Err(e) = r {
        tracing::debug!(queue = %q, error = %e, "cannot {what}");
    }
}

fn spawn_report(c: &Arc<Cloud>, r: VmStateReport) {
    let bus = c.bus().clone();
    tokio::spawn(async move {
        if let Err(e) = bus.send(r.clone()).await {
            tracing::debug!(vm = %r.vm, error = %e, "state report not handled");
        }
    });
}

fn destroy_orphans(c: &Cloud) -> bool {
    let policy: String = c.engine.config.get(&ORPHAN_POLICY.key());
    policy == "destroy"
}

/// VMs and volumes a host has that the database has never heard of.
#[derive(Default)]
struct Orphans {
    vms: Vec<Uuid>,
    volumes: Vec<Uuid>,
}

impl Orphans {
    /// Report them; under the `destroy` policy destroy the VMs and then delete the volumes, in
    /// that order (the host refuses to delete a volume an orphan VM still uses), each decided
    /// again in its own queue: a create that inserts the row right now is not undone behind
    /// its back.
    fn clean_up(self, c: &Arc<Cloud>, host: Uuid) {
        for vm in &self.vms {
            c.bus().publish(
                "/vm/orphan",
                || serde_json::json!({"uuid": vm, "host": host}),
            );
        }
        for v in &self.volumes {
            c.bus().publish(
                "/volume/orphan",
                || serde_json::json!({"uuid": v, "host": host}),
            );
        }
        if !destroy_orphans(c) || (self.vms.is_empty() && self.volumes.is_empty()) {
            return;
        }
        let c = c.clone();
        tokio::spawn(async move {
            for vm in self.vms {
                in_queue(&c, vm_queue(vm), "destroy an orphan VM", |c| async move {
                    if c.db().get::<Vm>(vm).await?.is_some() {
                        return Ok(());
                    }
                    let target = c.host_target(host).await?;
                    agent(&c, &target, &DestroyVmCmd { vm }).await?;
                    c.repairs.count("vm.orphan-destroyed");
                    Ok(())
                })
                .await;
            }
            for volume in self.volumes {
                let q = super::volume::volume_queue(volume);
                in_queue(&c, q, "delete an orphan volume", |c| async move {
                    if c.db().get::<Volume>(volume).await?.is_some() {
                        return Ok(());
                    }
                    delete_copy(&c, host, volume).await?;
                    c.repairs.count("volume.orphan-deleted");
                    Ok(())
                })
                .await;
            }
        });
    }
}

/// Delete the copy of `volume` on `host`, which no VM should be using. If a VM there still
/// uses it (an attach whose rollback could not detach; found by the model sweep), detach it
/// from the VMs the database places there, running or stopped (a VM without it ignores or
/// refuses that), and delete again. The host names the VM only in its error message.
async fn delete_copy(c: &Cloud, host: Uuid, volume: Uuid) -> Result<(), Error> {
    let target = c.host_target(host).await?;
    if agent(c, &target, &DeleteVolumeCmd { volume }).await.is_ok() {
        return Ok(());
    }
    // Stopped VMs are defined on their last host and still hold their disks there.
    let mut here = c
        .db()
        .select::<Vm>(&Query::of::<Vm>().eq("host_uuid", host))
        .await?;
    here.extend(
        c.db()
            .select::<Vm>(
                &Query::of::<Vm>()
                    .eq("last_host_uuid", host)
                    .is_null("host_uuid"),
            )
            .await?,
    );
    for vm in here {
        let _ = agent(
            c,
            &target,
            &DetachVolumeCmd {
                vm: vm.uuid,
                volume,
            },
        )
        .await;
    }
    agent(c, &target, &DeleteVolumeCmd { volume }).await
}

/// Why a VM is relocated, with the volumes its new host holds: those go with it. A data volume
/// on `from` that the new host lacks stays on its host and is detached in the database, as the
/// running copy has no such disk: a VM found running elsewhere may be a copy from before that
/// volume was attached (found by a model case); a migration carries the disks the host's VM
/// had, which lack one whose detach the host did and the database could not record (swarm
/// seed 5038: moving it anyway placed it on a host that never had it).
pub(crate) enum Moving {
    /// A migration that just finished; the new host must hold the root volume.
    Migrated(Vec<Uuid>),
    /// A VM found running on another host than the database says.
    Found(Vec<Uuid>),
}

/// Record that `vm` now runs on `to` (not `from`): the VM row, its volumes (those `moving`
/// says) and their local storage, and its reservations. A reservation on `to` that holds disk
/// (a migration's) becomes the volumes' share; without one, capacity is taken on `to` now.
pub(crate) async fn relocate(
    c: &Cloud,
    vm: Uuid,
    from: Uuid,
    to: Uuid,
    expect: VmState,
    moving: Moving,
) -> Result<(), Error> {
    let row = c.get::<Vm>(vm).await?;
    let mut vols = c
        .db()
        .select::<Volume>(&Query::of::<Volume>().eq("vm_uuid", vm))
        .await?;
    let mut b = Batch::new().update(
        Update::of::<Vm>(vm)
            .when_eq("state", expect.as_str())
            .set("host_uuid", to)
            .set("last_host_uuid", to)
            .set("state", VmState::Running.as_str()),
    );
    let (Moving::Migrated(held) | Moving::Found(held)) = &moving;
    let lacking = vols
        .iter()
        .filter(|v| v.host_uuid == Some(from) && !held.contains(&v.uuid));
    for v in lacking {
        if v.kind != VolumeType::Data {
            // Its root disk is not there: not this VM's copy to follow (cannot happen while the
            // host runs it); a found VM is left for the next report, a migration fails.
            tracing::warn!(%vm, volume = %v.uuid, %from, %to, "VM on a host without its root volume; not relocated");
            return match moving {
                Moving::Found(_) => Ok(()),
                Moving::Migrated(_) => Err(Error::new(
                    ErrorCode::AgentError,
                    format!("host {to} does not hold VM {vm}'s root volume {}", v.uuid),
                )),
            };
        }
        tracing::warn!(%vm, volume = %v.uuid, %from, %to, "relocated VM's new host lacks this data volume: detached, it stays on its host");
        b = b.update(super::volume::detachment(v.uuid));
    }
    vols.retain(|v| held.contains(&v.uuid));
    let to_res = c.db().get::<Reservation>(reservation_uuid(vm, to)).await?;
    let mut moved = 0i64;
    let mut ps_used = None;
    for v in vols.iter().filter(|v| v.host_uuid == Some(from)) {
        b = b.update(Update::of::<Volume>(v.uuid).set("host_uuid", to));
        if let Some(ps) = v.ps_uuid {
            b = b.update(local_storage_give_back(ps, from, v.size_mib));
            moved += v.size_mib;
            ps_used = Some(ps);
        }
    }
    // Disk the reservation on `to` counted for volumes that stayed behind (`Moving`).
    let mut unused_on_to = None;
    let counted_on_to = match &to_res {
        Some(r) if r.disk_mib > 0 => {
            b = b.update(
                Update::of::<Reservation>(r.uuid)
                    .set("disk_mib", 0i64)
                    .set("ps_uuid", Value::Null),
            );
            if let (Some(ps), true) = (r.ps_uuid, r.disk_mib > moved) {
                b = b.update(local_storage_give_back(ps, to, r.disk_mib - moved));
                unused_on_to = Some((ps, r.disk_mib - moved));
            }
            false
        }
        _ => {
            if let Some(ps) = ps_used {
                b = b.update(local_storage_count(ps, to, moved));
            }
            true
        }
    };
    match c.db().commit(b).await {
        Ok(_) => {}
        // Already relocated (a replayed step).
        Err(e)
            if e.class() == ErrorClass::ConditionFailed
                && c.get::<Vm>(vm).await?.host_uuid == Some(to) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(ps) = ps_used {
        c.allocator.disk_changed(from, ps, -moved);
        if counted_on_to {
            c.allocator.disk_changed(to, ps, moved);
        }
    }
    if let Some((ps, unused)) = unused_on_to {
        c.allocator.disk_changed(to, ps, -unused);
    }
    c.allocator.release(c, vm, from).await?;
    if to_res.is_none() && !take_capacity(c, vm, &row, to).await {
        // Running where it cannot be accounted (the host is full or disabled): stop it there,
        // so that the books stay true (found by the model sweep: a migration that finished on
        // a host after it timed out, onto a host disabled meanwhile).
        tracing::warn!(%vm, host = %to, "relocated VM cannot hold capacity on its new host; stopping it");
        let target = c.host_target(to).await?;
        let stop = stratus_agent_protocol::StopVmCmd {
            vm,
            graceful_timeout_ms: 0,
            force: true,
        };
        let stopped = agent(c, &target, &stop).await;
        // Stopped in the database either way, as a stop leaves a VM (no host, `to` its last):
        // if the host did not stop it, its next report finds it running there, unaccounted,
        // and state sync stops it again (found by the model sweep: the stop failed, and the VM
        // stayed Running with no capacity held).
        record_stopped(c, vm, VmState::Running, Some(to)).await?;
        stopped?;
        return Ok(());
    }
    c.bus().publish(
        "/vm/state/change",
        || serde_json::json!({"uuid": vm, "old": expect.as_str(), "new": "Running", "host": to}),
    );
    Ok(())
}

/// Record `vm`, which was `prev`, as Stopped on no host (with `last` as its last host when
/// given), and say so.
async fn record_stopped(
    c: &Cloud,
    vm: Uuid,
    prev: VmState,
    last: Option<Uuid>,
) -> Result<(), Error> {
    let mut u = Update::of::<Vm>(vm)
        .when_eq("state", prev.as_str())
        .set("host_uuid", Value::Null)
        .set("state", VmState::Stopped.as_str());
    if let Some(h) = last {
        u = u.set("last_host_uuid", h);
    }
    c.db().commit(Batch::new().update(u)).await?;
    c.bus().publish(
        "/vm/state/change",
        || serde_json::json!({"uuid": vm, "old": prev.as_str(), "new": "Stopped"}),
    );
    Ok(())
}

/// Take capacity for VM `uuid` found running on `host`. False when the host has no room (the
/// caller then stops the VM there: the accounting must stay true).
async fn take_capacity(c: &Cloud, uuid: Uuid, vm: &Vm, host: Uuid) -> bool {
    let spec = AllocationSpec {
        cpu: vm.cpu,
        memory_mib: vm.memory_mib,
        host: Some(host),
        ..Default::default()
    };
    match c
        .bus()
        .send(AllocateHost {
            vm: uuid,
            spec,
            hold_disk: false,
        })
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(vm = %uuid, %host, error = %e, "VM found running where it cannot be accounted");
            false
        }
    }
}

/// `vm` was found running on `host`, not on `from` where the database has it: it moves there
/// with the volumes the host holds (once the host knows itself again, after an agent restart).
async fn relocate_found(c: &Cloud, vm: &Row<Vm>, from: Uuid, host: Uuid) -> Result<String, Error> {
    let Some(held) = volumes_held(c, host).await? else {
        return Ok("host does not know itself yet".into());
    };
    relocate(c, vm.uuid, from, host, vm.state, Moving::Found(held)).await?;
    Ok("relocated".into())
}

/// Decide and correct one VM (in its queue).
async fn reconcile(c: &Arc<Cloud>, r: VmStateReport) -> Result<String, Error> {
    let Some(vm) = c.db().get::<Vm>(r.vm).await? else {
        if r.state.is_some() {
            let orphans = Orphans {
                vms: vec![r.vm],
                volumes: Vec::new(),
            };
            orphans.clean_up(c, r.host);
            return Ok("orphan".into());
        }
        return Ok("gone".into());
    };
    if vm.state.is_transitional() {
        return Ok("busy".into());
    }
    if r.disconnected {
        if vm.host_uuid == Some(r.host)
            && matches!(
                vm.state,
                VmState::Running | VmState::Paused | VmState::Crashed
            )
        {
            set_state(c, vm.uuid, Some(vm.state), VmState::Unknown).await?;
            return Ok("unknown".into());
        }
        return Ok("unchanged".into());
    }
    // Ask again: the report may predate the last operation.
    let target = c.host_target(r.host).await?;
    let seen = agent(c, &target, &VmStatusCmd { vm: vm.uuid })
        .await?
        .map(|s| s.state);
    if !looks_wrong(vm.state, vm.host_uuid, r.host, seen) && vm.state != VmState::Destroyed {
        return Ok("unchanged".into());
    }
    let here = vm.host_uuid == Some(r.host);
    match (here, seen) {
        (_, Some(_)) if vm.state == VmState::Destroyed => {
            agent(c, &target, &DestroyVmCmd { vm: vm.uuid }).await?;
            Ok("destroyed on host".into())
        }
        (true, Some(PowerState::Running)) => {
            set_state(c, vm.uuid, Some(vm.state), VmState::Running).await?;
            Ok("running".into())
        }
        (true, Some(PowerState::Paused)) => {
            set_state(c, vm.uuid, Some(vm.state), VmState::Paused).await?;
            Ok("paused".into())
        }
        (true, Some(PowerState::Crashed)) => {
            set_state(c, vm.uuid, Some(vm.state), VmState::Crashed).await?;
            Ok("crashed".into())
        }
        (true, Some(PowerState::Stopped) | None) => {
            // Stopped behind our back (or the host lost it): return the capacity.
            release_reservations(c, vm.uuid, None).await?;
            record_stopped(c, vm.uuid, vm.state, None).await?;
            Ok("stopped".into())
        }
        (false, Some(PowerState::Running) | Some(PowerState::Paused)) => match vm.host_uuid {
            Some(other) => {
                // Perhaps running on the host the database names too (a migration that timed
                // out, finished later, and left the source running; found by partition-storm):
                // the copy the database knows stays, this one goes.
                let there = probe(c, other, vm.uuid).await;
                if matches!(there, Some(PowerState::Running | PowerState::Paused)) {
                    agent(c, &target, &DestroyVmCmd { vm: vm.uuid }).await?;
                    return Ok("second copy destroyed".into());
                }
                relocate_found(c, &vm, other, r.host).await
            }
            None if vm.last_host_uuid.is_some_and(|h| h != r.host) => {
                let from = vm.last_host_uuid.unwrap_or(r.host);
                if probe(c, from, vm.uuid).await.is_some() {
                    // Its last host still has it (stopped there): this is a stale copy, the
                    // source of a migration that reported failure after the VM had moved, whose
                    // destroy failed too (found by the model sweep).
                    agent(c, &target, &DestroyVmCmd { vm: vm.uuid }).await?;
                    return Ok("stale copy destroyed".into());
                }
                // Stopped in the database, found running on another host than its last one:
                // it moved there behind our back (a migration that finished after it timed
                // out), volumes and all. Found by the model sweep.
                relocate_found(c, &vm, from, r.host).await
            }
            None => {
                // Running on its home host while the database says stopped.
                if take_capacity(c, vm.uuid, &vm.data, r.host).await {
                    c.db()
                        .commit(
                            Batch::new().update(
                                Update::of::<Vm>(vm.uuid)
                                    .when_eq("state", vm.state.as_str())
                                    .set("host_uuid", r.host)
                                    .set("last_host_uuid", r.host)
                                    .set("state", VmState::Running.as_str()),
                            ),
                        )
                        .await?;
                    c.bus().publish(
                        "/vm/state/change",
                        || serde_json::json!({"uuid": vm.uuid, "old": vm.state.as_str(), "new": "Running"}),
                    );
                    Ok("running".into())
                } else {
                    agent(
                        c,
                        &target,
                        &stratus_agent_protocol::StopVmCmd {
                            vm: vm.uuid,
                            graceful_timeout_ms: 0,
                            force: true,
                        },
                    )
                    .await?;
                    Ok("stopped on host".into())
                }
            }
        },
        _ => Ok("unchanged".into()),
    }
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: SyncHostVms| async move { host_sync(&c, m).await })?;
    cloud.handle(|c: Arc<Cloud>, m: VmStateReport| async move {
        let q = vm_queue(m.vm);
        let (vm, host) = (m.vm, m.host);
        let r = c.engine.queues.run(&q, 1, reconcile(&c, m)).await;
        match &r {
            Ok(what) => {
                tracing::debug!(%vm, %host, what = what.as_str(), "state report reconciled");
                if !matches!(what.as_str(), "unchanged" | "busy" | "gone" | "orphan")
                    && !what.starts_with("host does not know")
                {
                    c.repairs.count(&format!("vm.{what}"));
                }
            }
            Err(e) => tracing::debug!(%vm, %host, error = %e, "state report not reconciled"),
        }
        r
    })?;
    Ok(())
}
