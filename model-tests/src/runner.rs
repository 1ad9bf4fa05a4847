//! Runs a case against the real management stack in the simulated datacenter and checks the
//! invariants after every step (simulation build only).
//!
//! After each operation:
//! - the books (invariants 1–3: capacity, addresses, storage) must balance;
//! - while no host or management-node fault is in effect, the database must show exactly the
//!   expected state of every VM and data volume of the case (invariant 6): a successful
//!   operation changed its target as it says, a failed one changed nothing at all (the census
//!   of VMs, NICs, addresses, volumes, reservations and used capacity is as before).
//!
//! A `Settle` must reach quiescence (invariant 4) and, with no fault in effect, the database
//! and the simulated hosts must agree (invariant 5). At the end every fault is healed, the
//! world settles, every host that is up must be connected again, and all invariants hold.

use crate::case::Case;
use crate::model::{BASE_HOSTS, IPS, SPARE_HOSTS};
use crate::ops::{AgentFault, HostAction, Member, Op, Tenant, VmAction};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_core::client::StratusClient;
use stratus_core::error::{Error, ErrorCode};
use stratus_core::flow::ROLLBACK_FAILED_NOTE;
use stratus_core::model::{
    Host, HostStatus, Vm, VmAction as CoreAction, VmState, Volume, VolumeType,
};
use stratus_sim_world::invariants::{census, check, check_books, Census};
use stratus_sim_world::{HostProfile, Trace, World, WorldSpec};
use stratus_store::{Query, Resource, Row};
use uuid::Uuid;

/// Simulated time one `Settle` (and the final settle) may take.
const SETTLE_MAX: Duration = Duration::from_secs(900);
/// How much longer a slow agent command takes: past the world's agent timeouts (60 s).
const SLOW_BY: Duration = Duration::from_secs(90);
/// How long state sync may take, after a settle, to make the hosts and the database agree
/// (a few ping cycles, and two agent timeouts of 60 s).
const AGREE_MAX: Duration = Duration::from_secs(300);

/// What a case did and found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Operations run (all of them unless a violation stopped the case).
    pub ops_run: usize,
    /// By operation kind: (succeeded, failed with a coded error, skipped: target never created).
    pub by_kind: BTreeMap<String, (u64, u64, u64)>,
    /// Faults injected: fault operations by kind and agent faults that fired.
    pub faults: BTreeMap<String, u64>,
    pub sim_time: Duration,
    pub hash: u64,
    pub violation: Option<Violation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Index of the operation after which it was found (`ops.len()` for the final check).
    pub step: usize,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "after step {}: {}", self.step, self.message)
    }
}

/// The datacenter every case runs in: one zone, one cluster of small hosts (so capacity runs
/// out), two spare hosts, a small address range (so addresses run out).
pub fn world_spec(case: &Case) -> WorldSpec {
    let mut spec = WorldSpec {
        seed: case.seed,
        hosts_per_cluster: BASE_HOSTS,
        spare_hosts: SPARE_HOSTS,
        host: HostProfile {
            cpu_cores: 8,
            memory_mib: 16_384,
            disk_mib: 200_000,
        },
        ips_per_zone: IPS as u32,
        ..Default::default()
    };
    if case.planted_bug {
        let bug = stratus_core::services::vm::BUG_LEAK_IP.name;
        spec.config.push((bug.into(), "true".into()));
    }
    spec
}

/// Run `case` in its own simulation.
pub fn run_case(case: &Case) -> Outcome {
    run_case_logged(case, false)
}

/// Run `case`, printing every operation's outcome when `log` is set (replays do).
pub fn run_case_logged(case: &Case, log: bool) -> Outcome {
    let slot = Arc::new(Mutex::new(None));
    let out = slot.clone();
    let case2 = case.clone();
    World::run(world_spec(case), move |w| async move {
        let mut r = Runner::new(w);
        r.log = log;
        let o = r.run(&case2).await;
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
    });
    let o = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    o.unwrap_or_else(|| Outcome {
        violation: Some(Violation {
            step: 0,
            message: "the simulation ended without an outcome".into(),
        }),
        ..Default::default()
    })
}

enum Res {
    Ok,
    Failed(Error),
    /// The target was never created (its creation failed or was shrunk away).
    Skipped,
}

/// The expected state of what the case created.
#[derive(Default)]
struct Expect {
    /// VM uuid → state.
    vms: BTreeMap<Uuid, String>,
    /// Data volume uuid → the VM it is attached to.
    volumes: BTreeMap<Uuid, Option<Uuid>>,
}

struct Runner {
    w: World,
    vms: Vec<Option<Uuid>>,
    volumes: Vec<Option<Uuid>>,
    /// Clusters usable for new hosts: the datacenter's, then the case's.
    clusters: Vec<Option<Uuid>>,
    zones: Vec<Option<Uuid>>,
    ranges: u32,
    expect: Expect,
    /// A host or management-node fault happened since the last quiet settle: expectations
    /// are off until the next one.
    tainted: bool,
    /// A read of the database failed where the runner could not report it (it is the next
    /// check's violation).
    read_error: Option<String>,
    /// A slow command was armed in this case: one may still finish on its host after the
    /// management side gave up on it (what it leaves is state sync's to clean up), so every
    /// settle from then on waits past the slowness and a ping cycle.
    slow_armed: bool,
    /// A failed operation left something on a host (its clean-up failed too): state sync
    /// removes it at a later ping, so the next settle waits for pings.
    orphans: bool,
    mgmt_up: bool,
    /// The management node was killed while a group's operations ran: their chains are
    /// interrupted, and the books are mid-operation until recovery ends them (the next quiet
    /// settle).
    interrupted: bool,
    /// The last API operation succeeded where the expected state forbids it (checked while
    /// expectations hold).
    forbidden: Option<String>,
    /// An account reached a resource of another (always a violation).
    breach: Option<String>,
    crashed: BTreeSet<usize>,
    partitioned: BTreeSet<usize>,
    trace: Trace,
    t0: tokio::time::Instant,
    log: bool,
    out: Outcome,
}

async fn settle_or_say(w: &World, what: &str) -> Result<(), String> {
    w.settle(SETTLE_MAX).await.map(|_| ()).map_err(|busy| {
        format!(
            "{what}: not quiescent after {} s: {busy}",
            SETTLE_MAX.as_secs()
        )
    })
}

fn uuid_of(v: &Value) -> Option<Uuid> {
    stratus_core::client::uuid_of(v, "uuid")
}

impl Runner {
    fn new(w: World) -> Self {
        let zone = &w.dc.zones[0];
        let (clusters, zones) = (vec![zone.clusters.first().copied()], vec![Some(zone.zone)]);
        Runner {
            w,
            vms: Vec::new(),
            volumes: Vec::new(),
            clusters,
            zones,
            ranges: 0,
            expect: Expect::default(),
            tainted: false,
            read_error: None,
            slow_armed: false,
            orphans: false,
            mgmt_up: true,
            interrupted: false,
            forbidden: None,
            breach: None,
            crashed: BTreeSet::new(),
            partitioned: BTreeSet::new(),
            trace: Trace::new(),
            t0: tokio::time::Instant::now(),
            log: false,
            out: Outcome::default(),
        }
    }

    async fn run(&mut self, case: &Case) -> Outcome {
        self.t0 = tokio::time::Instant::now();
        // Two accounts with small quotas beside the admin (`Tenant`); invariant 8 keeps their
        // books.
        for (name, limits) in [
            ("tenant-a", json!({"vm_limit": 3, "vcpu_limit": 6})),
            (
                "tenant-b",
                json!({"memory_mib_limit": 6144, "volume_limit": 5}),
            ),
        ] {
            match self.w.tenant(name, limits).await {
                Ok(t) => self.w.tenants.push(t),
                Err(e) => return self.violated(0, format!("cannot make {name}: {e}")),
            }
        }
        for (i, op) in case.ops.iter().enumerate() {
            let before = match census(&self.w).await {
                Ok(c) => c,
                Err(message) => return self.violated(i, message),
            };
            let late_before = self.late_fired();
            let res = self.apply(op).await;
            if self.late_fired() > late_before {
                // A command finished on its host after the management side gave up on it (it
                // was slow, or its result was lost): the operation failed and rolled back, the
                // host did it anyway, and state sync takes the host's word, perhaps during a
                // later operation. Expectations are off until the next calm settle.
                self.tainted = true;
            }
            if matches!(&res, Res::Failed(e) if e.message.contains(ROLLBACK_FAILED_NOTE)) {
                // Its rollback failed too (a stop that ran on the host though it reported a
                // failure, then a failing start): the stack leaves the rest to state sync, which
                // takes the host's word. Expectations are off until the next calm settle.
                self.tainted = true;
            }
            self.out.ops_run = i + 1;
            let (tag, code) = match &res {
                Res::Ok => (0, "ok"),
                Res::Failed(e) => (1, e.code.as_str()),
                Res::Skipped => (2, "skipped"),
            };
            if self.log {
                let why = match &res {
                    Res::Failed(e) => format!(": {}", e.message),
                    _ => String::new(),
                };
                println!(
                    "  [{:>7.1} s] {i:>2}. {op} -> {code}{why}",
                    self.t0.elapsed().as_secs_f64()
                );
            }
            let e = self.out.by_kind.entry(op.kind()).or_default();
            match tag {
                0 => e.0 += 1,
                1 => e.1 += 1,
                _ => e.2 += 1,
            }
            if op.is_fault() {
                *self.out.faults.entry(op.kind()).or_default() += 1;
            }
            let after = match census(&self.w).await {
                Ok(c) => c,
                Err(message) => return self.violated(i, message),
            };
            self.trace.record(
                self.t0.elapsed().as_nanos(),
                &format!("{i} {} {code} {after:?}", op.kind()),
            );
            if let Err(message) = self.verify(op, &res, &before, &after).await {
                return self.violated(i, message);
            }
        }
        if let Err(message) = self.final_check().await {
            self.out.violation = Some(Violation {
                step: case.ops.len(),
                message,
            });
        }
        self.finish()
    }

    /// The case fails at step `step`.
    fn violated(&mut self, step: usize, message: String) -> Outcome {
        self.out.violation = Some(Violation { step, message });
        self.finish()
    }

    fn finish(&mut self) -> Outcome {
        for (k, n) in self.w.faults.fired() {
            *self.out.faults.entry(format!("agent:{k}")).or_default() += n;
        }
        self.out.sim_time = self.t0.elapsed();
        self.trace.record(
            self.out.sim_time.as_nanos(),
            &format!("end {:?}", self.out.violation),
        );
        self.out.hash = self.trace.hash();
        std::mem::take(&mut self.out)
    }

    // ---- operations

    async fn apply(&mut self, op: &Op) -> Res {
        let c = self.w.client.clone();
        let done = |r: Result<Value, Error>| match r {
            Ok(_) => Res::Ok,
            Err(e) => Res::Failed(e),
        };
        match op {
            Op::CreateVm { .. }
            | Op::Vm { .. }
            | Op::CreateVolume { .. }
            | Op::AttachVolume { .. }
            | Op::DetachVolume { .. }
            | Op::DeleteVolume { .. } => {
                let name = match op {
                    Op::CreateVolume { .. } => self.volumes.len(),
                    _ => self.vms.len(),
                };
                let (res, created) = call_api(&self.w, &self.vms, &self.volumes, op, name).await;
                if let Some(why) = breach(op, &res) {
                    self.breach = Some(why);
                }
                match op {
                    Op::CreateVm { .. } => self.vms.push(created),
                    Op::CreateVolume { .. } => self.volumes.push(created),
                    _ => {}
                }
                if matches!(res, Res::Ok) {
                    // A success the expected state forbids is a violation unless expectations
                    // are off (`verify` decides); the effect is recorded either way.
                    let allowed = effect(&mut self.expect, op, &self.vms, &self.volumes, created);
                    self.forbidden = allowed.err().map(|why| format!("{op} succeeded: {why}"));
                }
                res
            }
            Op::Host { host, action } => {
                let Some(id) = self.w.hosts[*host].uuid else {
                    return Res::Skipped;
                };
                let name = match action {
                    HostAction::Maintenance => "maintenance",
                    HostAction::Enable => "enable",
                    HostAction::Disable => "disable",
                };
                done(c.action("hosts", id, name, json!({})).await)
            }
            Op::AddHost { host } => {
                let Some(cluster) = self.clusters.iter().rev().flatten().next().copied() else {
                    return Res::Skipped;
                };
                // A host already in the database is refused (already_exists).
                done(self.w.add_host(*host, cluster).await)
            }
            Op::DeleteHost { host } => {
                let Some(id) = self.w.hosts[*host].uuid else {
                    return Res::Skipped;
                };
                let r = c.delete("hosts", id, true).await;
                if r.is_ok() {
                    self.w.hosts[*host].uuid = None;
                }
                done(r)
            }
            Op::CreateCluster => {
                let z = &self.w.dc.zones[0];
                let (zone, l2, ps) = (z.zone, z.l2, z.ps);
                let n = self.clusters.len();
                let r = async {
                    let cl = c
                        .create(
                            "clusters",
                            json!({"zone_uuid": zone, "name": format!("case-cluster-{n}")}),
                        )
                        .await?;
                    let id = uuid_of(&cl).ok_or_else(|| Error::internal("no uuid"))?;
                    c.action(
                        "l2-networks",
                        l2,
                        "attach-cluster",
                        json!({"cluster_uuid": id}),
                    )
                    .await?;
                    c.action(
                        "primary-storages",
                        ps,
                        "attach-cluster",
                        json!({"cluster_uuid": id}),
                    )
                    .await?;
                    Ok(cl)
                }
                .await;
                self.clusters.push(r.as_ref().ok().and_then(uuid_of));
                done(r)
            }
            Op::DeleteCluster { cluster } => {
                let Some(id) = self.clusters.get(*cluster).copied().flatten() else {
                    return Res::Skipped;
                };
                let r = c.delete("clusters", id, true).await;
                if r.is_ok() {
                    self.clusters[*cluster] = None;
                    self.forget_hosts().await;
                }
                done(r)
            }
            Op::CreateZone => {
                let n = self.zones.len();
                let r = c
                    .create("zones", json!({"name": format!("case-zone-{n}")}))
                    .await;
                self.zones.push(r.as_ref().ok().and_then(uuid_of));
                done(r)
            }
            Op::DeleteZone { zone } => {
                let Some(id) = self.zones.get(*zone).copied().flatten() else {
                    return Res::Skipped;
                };
                let r = c.delete("zones", id, true).await;
                if r.is_ok() {
                    self.zones[*zone] = None;
                    if *zone == 0 {
                        self.clusters.iter_mut().for_each(|c| *c = None);
                    }
                    self.forget_hosts().await;
                }
                done(r)
            }
            Op::AddIpRange => {
                self.ranges += 1;
                let k = self.ranges;
                let base = u32::from(self.w.dc.zones[0].ip_range.0) & 0xffff_0000 | (k << 8);
                let ip = |n: u32| Ipv4Addr::from(base + n).to_string();
                done(
                    c.create(
                        "ip-ranges",
                        json!({"l3_uuid": self.w.dc.zones[0].l3, "start_ip": ip(10), "end_ip": ip(17),
                               "gateway": ip(1), "prefix_len": 24}),
                    )
                    .await,
                )
            }
            Op::CrashHost { .. }
            | Op::PartitionHost { .. }
            | Op::FailNext { .. }
            | Op::AgentFault { .. }
            | Op::KillMgmt => {
                inject(&self.w, op);
                self.note_fault(op);
                Res::Ok
            }
            Op::RestartHost { host } => {
                self.w.restart_host(*host);
                self.crashed.remove(host);
                Res::Ok
            }
            Op::HealHost { host } => {
                self.w.heal_host(*host);
                self.partitioned.remove(host);
                Res::Ok
            }
            Op::RestartMgmt => {
                self.w.restart_mgmt();
                self.mgmt_up = true;
                self.wait_for_api().await;
                Res::Ok
            }
            Op::Group { members } => self.group(members).await,
            Op::Settle => {
                if !self.mgmt_up {
                    return Res::Skipped;
                }
                match self.quiesce().await {
                    Ok(()) => Res::Ok,
                    Err(busy) => Res::Failed(Error::timeout(busy)),
                }
            }
        }
    }

    /// What a fault injected by [`inject`] means for the runner's expectations.
    fn note_fault(&mut self, op: &Op) {
        match op {
            Op::CrashHost { host } => {
                self.crashed.insert(*host);
                self.tainted = true;
            }
            Op::PartitionHost { host } => {
                self.partitioned.insert(*host);
                self.tainted = true;
            }
            Op::AgentFault {
                fault: AgentFault::Slow,
                ..
            } => self.slow_armed = true,
            Op::KillMgmt => {
                self.mgmt_up = false;
                self.tainted = true;
            }
            _ => {}
        }
    }

    /// Run a group's members at once, each after its delay. Then: the books must balance (the
    /// caller checks), and unless a fault made the expectations moot, some order of the
    /// members must explain every outcome — each success allowed in the state its order puts
    /// it in, each failure changing nothing — and end in what the database holds.
    async fn group(&mut self, members: &[Member]) -> Res {
        let (mut next_vm, mut next_volume) = (self.vms.len(), self.volumes.len());
        let names: Vec<usize> = members
            .iter()
            .map(|m| match m.op {
                Op::CreateVm { .. } => (next_vm, next_vm += 1).0,
                Op::CreateVolume { .. } => (next_volume, next_volume += 1).0,
                _ => 0,
            })
            .collect();
        let late_before = self.late_fired();
        let (w, vms, volumes) = (&self.w, &self.vms, &self.volumes);
        let runs = members.iter().zip(&names).map(|(m, &name)| async move {
            tokio::time::sleep(Duration::from_millis(m.after_ms.into())).await;
            if m.op.is_concurrent_api() {
                call_api(w, vms, volumes, &m.op, name).await
            } else {
                inject(w, &m.op);
                (Res::Ok, None)
            }
        });
        let outs = futures::future::join_all(runs).await;
        let mut ok = Vec::new();
        let mut uncoded = None;
        for (m, (res, created)) in members.iter().zip(&outs) {
            if let Some(why) = breach(&m.op, res) {
                self.breach.get_or_insert(why);
            }
            match m.op {
                Op::CreateVm { .. } => self.vms.push(*created),
                Op::CreateVolume { .. } => self.volumes.push(*created),
                _ => {}
            }
            if m.op.is_group_fault() {
                self.interrupted |= m.op == Op::KillMgmt;
                self.note_fault(&m.op);
                *self.out.faults.entry(m.op.kind()).or_default() += 1;
            }
            let e = self
                .out
                .by_kind
                .entry(format!("group:{}", m.op.kind()))
                .or_default();
            match res {
                Res::Ok => e.0 += 1,
                Res::Failed(_) => e.1 += 1,
                Res::Skipped => e.2 += 1,
            }
            if self.log {
                let what = match res {
                    Res::Ok => "ok".to_string(),
                    Res::Failed(e) => format!("{}: {}", e.code.as_str(), e.message),
                    Res::Skipped => "skipped".to_string(),
                };
                println!("      +{:>5} ms {} -> {what}", m.after_ms, m.op);
            }
            if let Res::Failed(e) = res {
                if matches!(e.code, ErrorCode::Internal | ErrorCode::NoHandler) {
                    uncoded.get_or_insert(format!(
                        "{} in a group failed with an uncoded error: {}",
                        m.op, e.message
                    ));
                }
                if e.message.contains(ROLLBACK_FAILED_NOTE) {
                    self.tainted = true;
                }
            }
            if m.op.is_concurrent_api() && matches!(res, Res::Ok) {
                ok.push((&m.op, *created));
            }
        }
        if self.late_fired() > late_before {
            self.tainted = true;
        }
        // As for a single operation: when expectations are off, so is the coded-error check.
        if self.tainted {
            return Res::Ok;
        }
        if let Some(why) = uncoded {
            return Res::Failed(Error::internal(why));
        }
        let (db_vms, db_volumes) = match self.db_expect().await {
            Ok(db) => db,
            Err(e) => return Res::Failed(Error::internal(e)),
        };
        let mut order: Vec<usize> = (0..ok.len()).collect();
        let mut tried = 0;
        loop {
            tried += 1;
            let mut e = Expect {
                vms: self.expect.vms.clone(),
                volumes: self.expect.volumes.clone(),
            };
            let allowed = order.iter().all(|&k| {
                let (op, created) = ok[k];
                effect(&mut e, op, &self.vms, &self.volumes, created).is_ok()
            });
            if allowed && e.vms == db_vms && e.volumes == db_volumes {
                self.expect = e;
                return Res::Ok;
            }
            if !next_order(&mut order) {
                break;
            }
        }
        let ops: Vec<String> = ok.iter().map(|(op, _)| op.to_string()).collect();
        Res::Failed(Error::internal(format!(
            "no order of the group's {} successes ({}) explains the database ({tried} orders tried):\n  \
             VMs {db_vms:?}\n  volumes {db_volumes:?}\n  expected before the group: VMs {:?}, volumes {:?}",
            ok.len(),
            ops.join(", "),
            self.expect.vms,
            self.expect.volumes
        )))
    }

    /// The VMs' states and the data volumes' attachments, as the database holds them.
    async fn db_expect(
        &self,
    ) -> Result<(BTreeMap<Uuid, String>, BTreeMap<Uuid, Option<Uuid>>), String> {
        let vms = (self.db_vms().await?)
            .into_iter()
            .map(|v| (v.uuid, v.state.as_str().to_string()))
            .collect();
        let volumes = (self.db_data_volumes().await?)
            .into_iter()
            .map(|v| (v.uuid, v.vm_uuid))
            .collect();
        Ok((vms, volumes))
    }

    /// Settle; after a host fault also let the ping tracker look at every host (a host that
    /// crashed and came back between two pings is only found out by the next ping's VM list)
    /// and settle again.
    async fn quiesce(&mut self) -> Result<(), String> {
        settle_or_say(&self.w, "settle").await?;
        if self.tainted || self.slow_armed || self.orphans {
            let ping_cycle = self.w.spec.ping_cycle();
            let wait = if self.slow_armed {
                SLOW_BY + ping_cycle
            } else if self.orphans {
                // Armed failures may fail the first clean-up attempts too.
                3 * ping_cycle
            } else {
                ping_cycle
            };
            self.orphans = false;
            tokio::time::sleep(wait).await;
            settle_or_say(&self.w, "settle after a ping cycle").await?;
        }
        Ok(())
    }

    async fn wait_for_api(&self) {
        for _ in 0..600 {
            if self.w.client.get("/v1/health").await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Hosts the database no longer has (a cascade took them) are spare again.
    async fn forget_hosts(&mut self) {
        let known: BTreeSet<Uuid> = match self.w.db.select::<Host>(&Query::of::<Host>()).await {
            Ok(hosts) => hosts.into_iter().map(|h| h.uuid).collect(),
            Err(e) => {
                // Not "no hosts": the next check fails on it instead.
                self.read_error = Some(format!("cannot read the hosts: {e}"));
                return;
            }
        };
        for h in &mut self.w.hosts {
            if h.uuid.is_some_and(|u| !known.contains(&u)) {
                h.uuid = None;
            }
        }
    }

    /// Slow commands and lost results so far.
    fn late_fired(&self) -> u64 {
        self.w
            .faults
            .fired()
            .iter()
            .filter(|(k, _)| k.starts_with("agent_slow") || k.starts_with("callback_lost"))
            .map(|(_, n)| n)
            .sum()
    }

    fn calm(&self) -> bool {
        self.mgmt_up && self.crashed.is_empty() && self.partitioned.is_empty()
    }

    // ---- checks

    async fn verify(
        &mut self,
        op: &Op,
        res: &Res,
        before: &Census,
        after: &Census,
    ) -> Result<(), String> {
        if let Some(e) = self.read_error.take() {
            return Err(e);
        }
        if self.interrupted && matches!((op, res), (Op::Settle, Res::Ok)) {
            self.interrupted = false;
        }
        let books = if self.interrupted {
            Vec::new()
        } else {
            check_books(&self.w).await
        };
        if !books.is_empty() {
            return Err(books.join("\n"));
        }
        if let Op::Group { .. } = op {
            // Checked against every order of the group as it ended (`group`).
            return match res {
                Res::Failed(e) => Err(e.message.clone()),
                _ => Ok(()),
            };
        }
        match (op, res) {
            (Op::Settle, Res::Failed(e)) => return Err(e.message.clone()),
            (Op::Settle, Res::Ok) if self.calm() => {
                self.agreed().await?;
                if self.tainted {
                    self.resync().await?;
                    self.tainted = false;
                }
            }
            _ => {}
        }
        if let Some(why) = self.breach.take() {
            return Err(why);
        }
        let forbidden = self.forbidden.take();
        if self.tainted {
            return Ok(());
        }
        if let Some(why) = forbidden {
            return Err(why);
        }
        // Operations whose effects reach beyond their target: take the database's word for the
        // expectations after them (the books and the host agreement still hold them to account).
        let wide = matches!(
            op,
            Op::Host {
                action: HostAction::Maintenance,
                ..
            } | Op::DeleteHost { .. }
                | Op::DeleteCluster { .. }
                | Op::DeleteZone { .. }
        );
        if let Res::Failed(e) = res {
            // The database as before; what a failed clean-up left on a host is the state
            // sync's to remove, and invariant 5 checks that it did at the next settle.
            let books = |c: &Census| Census {
                host_vms: 0,
                host_volumes: 0,
                ..c.clone()
            };
            if (before.host_vms, before.host_volumes) != (after.host_vms, after.host_volumes) {
                self.orphans = true;
            }
            if !wide && books(before) != books(after) {
                return Err(format!(
                    "{op} failed ({}: {}) but changed the world:\n  before {before:?}\n  after  {after:?}",
                    e.code, e.message
                ));
            }
            if matches!(e.code, ErrorCode::Internal | ErrorCode::NoHandler) {
                return Err(format!("{op} failed with an uncoded error: {}", e.message));
            }
        }
        if wide {
            self.resync().await?;
        }
        if let (Op::Host { host, action }, Res::Ok) = (op, res) {
            self.check_host_state(*host, *action).await?;
        }
        self.compare().await
    }

    async fn check_host_state(&self, i: usize, action: HostAction) -> Result<(), String> {
        let Some(id) = self.w.hosts[i].uuid else {
            return Ok(());
        };
        let Ok(Some(h)) = self.w.db.get::<Host>(id).await else {
            return Err(format!("host {id} vanished"));
        };
        if h.state.as_str() != action.state() {
            return Err(format!(
                "host {id} is {} after {action:?} succeeded",
                h.state
            ));
        }
        if action == HostAction::Maintenance {
            let vms = self.db_vms().await?;
            if let Some(v) = vms
                .iter()
                .find(|v| v.host_uuid == Some(id) && v.state.holds_capacity())
            {
                return Err(format!(
                    "host {id} entered Maintenance with vm {} {} on it",
                    v.uuid, v.state
                ));
            }
        }
        Ok(())
    }

    async fn db_vms(&self) -> Result<Vec<Row<Vm>>, String> {
        (self.w.db.select::<Vm>(&Query::of::<Vm>()).await)
            .map_err(|e| format!("cannot read the VMs: {e}"))
    }

    async fn db_data_volumes(&self) -> Result<Vec<Row<Volume>>, String> {
        let all = (self.w.db.select::<Volume>(&Query::of::<Volume>()).await)
            .map_err(|e| format!("cannot read the volumes: {e}"))?;
        Ok(all
            .into_iter()
            .filter(|v| v.kind == VolumeType::Data)
            .collect())
    }

    /// Expectations := what the database holds.
    async fn resync(&mut self) -> Result<(), String> {
        (self.expect.vms, self.expect.volumes) = self.db_expect().await?;
        Ok(())
    }

    /// The database holds exactly the expected VMs and data volumes, in the expected states.
    async fn compare(&self) -> Result<(), String> {
        let (db, vols) = self.db_expect().await?;
        if db != self.expect.vms {
            return Err(format!(
                "VMs differ from the model:\n  model    {:?}\n  database {db:?}",
                self.expect.vms
            ));
        }
        if vols != self.expect.volumes {
            return Err(format!(
                "data volumes differ from the model:\n  model    {:?}\n  database {vols:?}",
                self.expect.volumes
            ));
        }
        Ok(())
    }

    /// Heal every fault, settle, wait for the hosts to reconnect, check everything.
    async fn final_check(&mut self) -> Result<(), String> {
        if !self.mgmt_up {
            self.w.restart_mgmt();
            self.mgmt_up = true;
            self.wait_for_api().await;
        }
        for h in std::mem::take(&mut self.crashed) {
            self.w.restart_host(h);
        }
        for h in std::mem::take(&mut self.partitioned) {
            self.w.heal_host(h);
        }
        self.w
            .settle(SETTLE_MAX)
            .await
            .map_err(|b| format!("final settle: not quiescent: {b}"))?;
        // Hosts reconnect on their own (ping failures → reconnect).
        let start = tokio::time::Instant::now();
        let registered = self.w.hosts.iter().filter(|h| h.uuid.is_some()).count();
        loop {
            let hosts = (self.w.db.select::<Host>(&Query::of::<Host>()).await)
                .map_err(|e| format!("final check: cannot read the hosts: {e}"))?;
            if hosts.is_empty() && registered > 0 {
                // "Every host connected" holds of no hosts; the model registered some.
                return Err(format!(
                    "final check: no hosts in the database, {registered} registered"
                ));
            }
            let stuck: Vec<String> = hosts
                .iter()
                .filter(|h| h.status != HostStatus::Connected)
                .map(|h| format!("{} {}", h.uuid, h.status))
                .collect();
            if stuck.is_empty() {
                break;
            }
            if start.elapsed() > SETTLE_MAX {
                return Err(format!("hosts not connected again: {}", stuck.join(", ")));
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        self.tainted = true;
        self.quiesce().await?;
        self.agreed().await
    }

    /// The invariants, with time for state sync to finish: a clean-up it could not do yet (an
    /// armed failure, a lost callback waited out for 60 s) is tried again at a later ping.
    /// Found by the model sweep: a stray VM copy whose destroy lost its callback twice was
    /// still there, with its volume, one ping cycle after the settle.
    async fn agreed(&self) -> Result<(), String> {
        let start = tokio::time::Instant::now();
        loop {
            let bad = check(&self.w).await;
            if bad.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= AGREE_MAX {
                return Err(bad.join("\n"));
            }
            tokio::time::sleep(self.w.spec.ping_cycle()).await;
            settle_or_say(&self.w, "settle while state sync catches up").await?;
        }
    }
}

/// Send API operation `op` (one that [`Op::is_concurrent_api`]), naming resources by the case's
/// indices into `vms` and `volumes`; `name` numbers what it creates. Returns the uuid it
/// created, if any.
async fn call_api(
    w: &World,
    vms: &[Option<Uuid>],
    volumes: &[Option<Uuid>],
    op: &Op,
    name: usize,
) -> (Res, Option<Uuid>) {
    let done = |r: Result<Value, Error>| match r {
        Ok(_) => Res::Ok,
        Err(e) => Res::Failed(e),
    };
    let created = |r: Result<Value, Error>| {
        let id = r.as_ref().ok().and_then(uuid_of);
        (done(r), id)
    };
    match op {
        Op::CreateVm {
            offering,
            static_ip,
            tenant,
        } => {
            let mut body = w.vm_request(&format!("vm-{name}"), offering.name());
            if let Some(o) = static_ip {
                let ip = u32::from(w.dc.zones[0].ip_range.0) + *o as u32;
                body["static_ips"] =
                    json!({ w.dc.zones[0].l3.to_string(): Ipv4Addr::from(ip).to_string() });
            }
            created(client_for(w, *tenant).create("vms", body).await)
        }
        Op::Vm {
            vm,
            action,
            foreign,
        } => match vms[*vm] {
            Some(id) => {
                let c = match owner_client::<Vm>(w, id, *foreign).await {
                    Ok(c) => c,
                    Err(e) => return (Res::Failed(e), None),
                };
                let r = c.action("vms", id, action.name(), json!({})).await;
                (done(r), None)
            }
            None => (Res::Skipped, None),
        },
        Op::CreateVolume { attach, tenant } => {
            let c = client_for(w, *tenant);
            let vm = match attach {
                Some(i) => match vms[*i] {
                    Some(u) => Some(u),
                    None => return (Res::Skipped, None),
                },
                None => None,
            };
            let body = json!({"name": format!("data-{name}"),
                              "disk_offering_uuid": w.dc.disk_offering, "vm_uuid": vm});
            created(c.create("volumes", body).await)
        }
        Op::AttachVolume { volume, vm } => match (volumes[*volume], vms[*vm]) {
            (Some(vol), Some(vm)) => {
                let c = match owner_client::<Volume>(w, vol, false).await {
                    Ok(c) => c,
                    Err(e) => return (Res::Failed(e), None),
                };
                let r = c.action("volumes", vol, "attach", json!({ "vm_uuid": vm }));
                (done(r.await), None)
            }
            _ => (Res::Skipped, None),
        },
        Op::DetachVolume { volume } => match volumes[*volume] {
            Some(vol) => {
                let c = match owner_client::<Volume>(w, vol, false).await {
                    Ok(c) => c,
                    Err(e) => return (Res::Failed(e), None),
                };
                (
                    done(c.action("volumes", vol, "detach", json!({})).await),
                    None,
                )
            }
            None => (Res::Skipped, None),
        },
        Op::DeleteVolume { volume } => match volumes[*volume] {
            Some(vol) => {
                let c = match owner_client::<Volume>(w, vol, false).await {
                    Ok(c) => c,
                    Err(e) => return (Res::Failed(e), None),
                };
                (done(c.delete("volumes", vol, false).await), None)
            }
            None => (Res::Skipped, None),
        },
        other => (
            Res::Failed(Error::internal(format!("{other} is not an API operation"))),
            None,
        ),
    }
}

/// Whether `res` of `op` shows a breach of the accounts' isolation: an operation sent by an
/// account that does not own its VM must be answered `not_found` (neither done nor refused
/// in a way that shows the VM exists), unless it could not be answered at all (the node or
/// the store was away).
fn breach(op: &Op, res: &Res) -> Option<String> {
    if !matches!(op, Op::Vm { foreign: true, .. }) {
        return None;
    }
    match res {
        Res::Ok => Some(format!(
            "{op} succeeded, sent by an account that does not own the VM"
        )),
        Res::Failed(e)
            if !matches!(
                e.code,
                ErrorCode::NotFound
                    | ErrorCode::NodeUnavailable
                    | ErrorCode::Timeout
                    | ErrorCode::StoreFailure
            ) =>
        {
            Some(format!(
                "{op}, sent by an account that does not own the VM, answered {} ({}), not not_found",
                e.code.as_str(),
                e.message
            ))
        }
        _ => None,
    }
}

/// The client that sends as `t` (the admin's until the tenants are made).
fn client_for(w: &World, t: Tenant) -> &StratusClient {
    let i = match t {
        Tenant::Admin => return &w.client,
        Tenant::A => 0,
        Tenant::B => 1,
    };
    w.tenants.get(i).map_or(&w.client, |(_, c)| c)
}

/// The client of the account that owns row `id` of `T` (the admin's for the cloud's own rows
/// and for rows gone); with `foreign`, one of an account that does not own it. A row the
/// runner cannot read is an `internal` failure of the operation (a violation), not "no owner".
async fn owner_client<T: Resource>(
    w: &World,
    id: Uuid,
    foreign: bool,
) -> Result<&StratusClient, Error> {
    let owner =
        w.db.peek::<T, _>(id, |r| r.decode::<Option<Uuid>>("account_uuid"))
            .await
            .map_err(|e| Error::internal(format!("the runner cannot read {id}'s owner: {e}")))?
            .flatten();
    let mine = owner.and_then(|o| w.tenants.iter().position(|(a, _)| *a == o));
    let pick = match (mine, foreign) {
        (Some(i), false) => Some(i),
        (None, false) => None,
        (Some(i), true) => Some(1 - i),
        (None, true) => Some(0),
    };
    Ok(pick
        .and_then(|i| w.tenants.get(i))
        .map_or(&w.client, |(_, c)| c))
}

/// Inject fault `op` (one that [`Op::is_group_fault`]) into the world.
fn inject(w: &World, op: &Op) {
    let f = &w.faults;
    match op {
        Op::CrashHost { host } => w.crash_host(*host),
        Op::PartitionHost { host } => w.partition_host(*host),
        Op::FailNext { kind, n } => f.fail_next(*kind, *n),
        Op::AgentFault { fault, kind, n } => match fault {
            AgentFault::FailAfter => f.fail_after_next(*kind, *n),
            // Longer than the world's agent timeouts (60 s).
            AgentFault::Slow => f.slow_next(*kind, *n, SLOW_BY),
            AgentFault::DropCallback => f.drop_callbacks(*kind, *n),
            AgentFault::DuplicateCallback => f.duplicate_callbacks(*kind, *n),
        },
        Op::KillMgmt => w.kill_mgmt(),
        _ => {}
    }
}

/// The effect of API operation `op`, which succeeded, on the expected state `e` (`created`: the
/// uuid it created). Applied whatever the state; an error says the state did not allow it.
fn effect(
    e: &mut Expect,
    op: &Op,
    vms: &[Option<Uuid>],
    volumes: &[Option<Uuid>],
    created: Option<Uuid>,
) -> Result<(), String> {
    let vm_allows = |e: &Expect, vm: Uuid, action: CoreAction| -> Result<(), String> {
        let state = e.vms.get(&vm).ok_or(format!("vm {vm} is not expected"))?;
        let state: VmState = state.parse().map_err(|_| format!("vm state {state}"))?;
        if state.allows(action) {
            Ok(())
        } else {
            Err(format!("vm {vm} is {state}: {action} not allowed"))
        }
    };
    match op {
        Op::CreateVm { .. } => {
            let id = created.ok_or("a created VM without its uuid")?;
            e.vms.insert(id, "Running".into());
            Ok(())
        }
        Op::Vm { vm, action, .. } => {
            let id = vms[*vm].ok_or("an action on a VM never created")?;
            let allowed = vm_allows(e, id, core_action(*action));
            match action {
                VmAction::Expunge => {
                    e.vms.remove(&id);
                }
                a => {
                    let s = match a {
                        VmAction::Stop | VmAction::Recover => "Stopped",
                        VmAction::Destroy => "Destroyed",
                        _ => "Running",
                    };
                    e.vms.insert(id, s.into());
                }
            }
            if matches!(action, VmAction::Destroy | VmAction::Expunge) {
                // Data volumes stay, detached (as in the reference design).
                for att in e.volumes.values_mut() {
                    if *att == Some(id) {
                        *att = None;
                    }
                }
            }
            allowed
        }
        Op::CreateVolume { attach, .. } => {
            let id = created.ok_or("a created volume without its uuid")?;
            let vm = attach.and_then(|i| vms[i]);
            let allowed = match vm {
                Some(vm) => vm_allows(e, vm, CoreAction::AttachVolume),
                None => Ok(()),
            };
            e.volumes.insert(id, vm);
            allowed
        }
        Op::AttachVolume { volume, vm } => {
            let (vol, vm) = (volumes[*volume], vms[*vm]);
            let (Some(vol), Some(vm)) = (vol, vm) else {
                return Err("an attach of what was never created".into());
            };
            let allowed = match e.volumes.get(&vol) {
                Some(None) => vm_allows(e, vm, CoreAction::AttachVolume),
                other => Err(format!("volume {vol} is {other:?}: attach not allowed")),
            };
            e.volumes.insert(vol, Some(vm));
            allowed
        }
        Op::DetachVolume { volume } => {
            let vol = volumes[*volume].ok_or("a detach of a volume never created")?;
            let allowed = match e.volumes.get(&vol) {
                Some(Some(vm)) => vm_allows(e, *vm, CoreAction::DetachVolume),
                other => Err(format!("volume {vol} is {other:?}: detach not allowed")),
            };
            e.volumes.insert(vol, None);
            allowed
        }
        Op::DeleteVolume { volume } => {
            let vol = volumes[*volume].ok_or("a delete of a volume never created")?;
            let allowed = match e.volumes.get(&vol) {
                Some(None) => Ok(()),
                other => Err(format!("volume {vol} is {other:?}: delete not allowed")),
            };
            e.volumes.remove(&vol);
            allowed
        }
        other => Err(format!("{other} is not an API operation")),
    }
}

/// The core's name of a case's VM action.
fn core_action(a: VmAction) -> CoreAction {
    match a {
        VmAction::Start => CoreAction::Start,
        VmAction::Stop => CoreAction::Stop,
        VmAction::Reboot => CoreAction::Reboot,
        VmAction::Migrate => CoreAction::Migrate,
        VmAction::Destroy => CoreAction::Destroy,
        VmAction::Recover => CoreAction::Recover,
        VmAction::Expunge => CoreAction::Expunge,
    }
}

/// The next permutation of `order` in lexicographic order; false after the last.
fn next_order(order: &mut [usize]) -> bool {
    let Some(i) = order.windows(2).rposition(|w| w[0] < w[1]) else {
        return false;
    };
    let j = order
        .iter()
        .rposition(|&x| x > order[i])
        .expect("a larger one after i");
    order.swap(i, j);
    order[i + 1..].reverse();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Offering;

    #[test]
    fn every_order_of_a_group_is_tried_once() {
        let mut order = vec![0, 1, 2, 3];
        let mut seen = BTreeSet::new();
        loop {
            assert!(seen.insert(order.clone()), "{order:?} twice");
            if !next_order(&mut order) {
                break;
            }
        }
        assert_eq!(seen.len(), 24);
        assert!(!next_order(&mut []), "nothing to order");
    }

    #[test]
    fn a_foreign_operation_answered_other_than_not_found_is_a_breach() {
        let op = |foreign| Op::Vm {
            vm: 0,
            action: VmAction::Stop,
            foreign,
        };
        let failed = |code| Res::Failed(Error::new(code, "x"));
        assert!(breach(&op(true), &Res::Ok).is_some());
        assert!(breach(&op(true), &failed(ErrorCode::InvalidState)).is_some());
        assert!(breach(&op(true), &failed(ErrorCode::Forbidden)).is_some());
        assert!(breach(&op(true), &failed(ErrorCode::NotFound)).is_none());
        assert!(breach(&op(true), &failed(ErrorCode::NodeUnavailable)).is_none());
        assert!(breach(&op(true), &Res::Skipped).is_none());
        assert!(breach(&op(false), &Res::Ok).is_none());
        assert!(breach(&op(false), &failed(ErrorCode::InvalidState)).is_none());
    }

    #[test]
    fn an_effect_says_when_the_expected_state_forbids_it() {
        let (a, v) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let (vms, volumes) = (vec![Some(a)], vec![Some(v)]);
        let mut e = Expect::default();
        let create = Op::CreateVm {
            offering: Offering::Small,
            static_ip: None,
            tenant: Tenant::A,
        };
        effect(&mut e, &create, &vms, &volumes, Some(a)).unwrap();
        let stop = Op::Vm {
            vm: 0,
            action: VmAction::Stop,
            foreign: false,
        };
        let destroy = Op::Vm {
            vm: 0,
            action: VmAction::Destroy,
            foreign: false,
        };
        // Destroy, then stop: the stop is not allowed from Destroyed.
        let mut first = Expect {
            vms: e.vms.clone(),
            volumes: e.volumes.clone(),
        };
        effect(&mut first, &destroy, &vms, &volumes, None).unwrap();
        assert!(effect(&mut first, &stop, &vms, &volumes, None).is_err());
        // Stop, then destroy: both allowed, and the VM ends Destroyed.
        effect(&mut e, &stop, &vms, &volumes, None).unwrap();
        effect(&mut e, &destroy, &vms, &volumes, None).unwrap();
        assert_eq!(e.vms[&a], "Destroyed");
        // A detached volume cannot be detached; attached to a destroyed VM it cannot be.
        e.volumes.insert(v, None);
        assert!(effect(
            &mut e,
            &Op::DetachVolume { volume: 0 },
            &vms,
            &volumes,
            None
        )
        .is_err());
        let attach = Op::AttachVolume { volume: 0, vm: 0 };
        assert!(effect(&mut e, &attach, &vms, &volumes, None).is_err());
    }
}
