//! The host allocator: which host can take a VM, and the atomic reservation of its CPU and memory.
//!
//! Choosing uses a per-node cache of host capacity (refreshed from the store every
//! `allocator.cache.refresh`, on host and cluster events, and whenever it finds nothing); the
//! store stays the authority: a reservation is one batch — the [`Reservation`] row plus guarded
//! increments of the host's counters, bounded by `cores × allocator.cpu.overcommit` and
//! `memory × allocator.memory.overcommit − allocator.host.reserved_memory_mib` — so concurrent
//! allocations can never overcommit a host, whatever the cache believed. A refused reservation
//! refreshes that host's entry and tries the next candidate.
//!
//! Filters, in order: host Enabled and Connected; designated zone / cluster / host; cluster
//! enabled and attached to every L2 network the VM needs; avoid-hosts; CPU; memory; local storage
//! free space; then the plugins' allocator filters. Among the survivors the least loaded
//! (most free memory) of a random sample wins, which spreads concurrent allocations.

use super::Cloud;
use crate::bus::Message;
use crate::config::ConfigDef;
use crate::error::{Error, ErrorCode};
use crate::extension::{AllocationSpec, HostCandidate};
use crate::model::*;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_store::ErrorClass;
use stratus_store::{Batch, Expect, Query, Record, Row, StoreError, Update};
use uuid::Uuid;

pub static CPU_OVERCOMMIT: ConfigDef = ConfigDef::float(
    "allocator.cpu.overcommit",
    "vCPUs a host may carry per physical core",
    "10",
    1.0,
    100.0,
);
pub static MEMORY_OVERCOMMIT: ConfigDef = ConfigDef::float(
    "allocator.memory.overcommit",
    "Memory a host may promise per MiB it has",
    "1",
    1.0,
    10.0,
);
pub static RESERVED_MEMORY: ConfigDef = ConfigDef::int(
    "allocator.host.reserved_memory_mib",
    "Memory of each host kept for the host itself (MiB)",
    "1024",
    0,
    1 << 20,
);
pub static CACHE_REFRESH: ConfigDef = ConfigDef::duration(
    "allocator.cache.refresh",
    "How often the allocator reloads host capacity from the store",
    "30s",
    1_000,
    3_600_000,
);

pub fn config_defs() -> Vec<&'static ConfigDef> {
    vec![
        &CPU_OVERCOMMIT,
        &MEMORY_OVERCOMMIT,
        &RESERVED_MEMORY,
        &CACHE_REFRESH,
    ]
}

/// Find a host for VM `vm` and reserve `spec.cpu` / `spec.memory_mib` on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AllocateHost {
    pub vm: Uuid,
    pub spec: AllocationSpec,
    /// Also hold `spec.disk_mib` of the host's local storage in the reservation (for disks that
    /// will arrive later, as in a migration).
    #[serde(default)]
    pub hold_disk: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    pub host: Uuid,
    pub cluster: Uuid,
    pub zone: Uuid,
    /// The local primary storage on that host with room for the VM's disks (if it needs any).
    pub primary_storage: Option<Uuid>,
}

impl Message for AllocateHost {
    type Reply = Allocation;
    const NAME: &'static str = "allocator.allocate";
}

/// Return what VM `vm` holds on `host` (idempotent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseHost {
    pub vm: Uuid,
    pub host: Uuid,
}
impl Message for ReleaseHost {
    type Reply = ();
    const NAME: &'static str = "allocator.release";
}

#[derive(Debug, Clone)]
struct HostCap {
    uuid: Uuid,
    cluster: Uuid,
    zone: Uuid,
    usable: bool,
    cores: i64,
    memory_mib: i64,
    cpu_used: i64,
    memory_used: i64,
    /// (primary storage, free MiB). Inline: a host has one local storage as a rule, and an
    /// allocation checks a sample of hosts (one cache line each, not a second one per disk list).
    disks: SmallVec<[(Uuid, i64); 1]>,
}

#[derive(Debug, Clone, Default)]
struct ClusterInfo {
    zone: Uuid,
    enabled: bool,
    l2s: BTreeSet<Uuid>,
    /// The cluster's hosts, as slots of [`Cache::hosts`].
    hosts: Vec<usize>,
}

/// Host entries live in one vector, found by uuid through `slots`: an allocation checks a
/// random sample of the pool by position, and the entries of a hash map by uuid cost it a cache
/// miss more per host ([`Allocator::candidates`] stood out in profiles of the 30,000-host run,
/// docs/perf-log.md).
#[derive(Default)]
struct Cache {
    loaded: Option<tokio::time::Instant>,
    hosts: Vec<HostCap>,
    slots: HashMap<Uuid, usize>,
    clusters: BTreeMap<Uuid, ClusterInfo>,
}

impl Cache {
    fn host_mut(&mut self, uuid: &Uuid) -> Option<&mut HostCap> {
        let s = *self.slots.get(uuid)?;
        Some(&mut self.hosts[s])
    }

    /// Put `cap` in its host's slot (a new one for a host not cached); returns the slot.
    fn put(&mut self, cap: HostCap) -> usize {
        match self.slots.get(&cap.uuid) {
            Some(&s) => {
                self.hosts[s] = cap;
                s
            }
            None => {
                let s = self.hosts.len();
                self.slots.insert(cap.uuid, s);
                self.hosts.push(cap);
                s
            }
        }
    }

    /// Forget a host that is gone. Its slot stays (cluster lists name it), never usable again;
    /// the next reload drops it.
    fn forget(&mut self, uuid: &Uuid) {
        if let Some(s) = self.slots.remove(uuid) {
            self.hosts[s].usable = false;
        }
    }
}

/// Capacity limits from the current configuration.
#[derive(Debug, Clone, Copy)]
struct Limits {
    cpu_ratio: f64,
    mem_ratio: f64,
    reserved_mib: i64,
}

impl Limits {
    fn cpu(&self, cores: i64) -> i64 {
        (cores as f64 * self.cpu_ratio).floor() as i64
    }
    fn memory(&self, memory_mib: i64) -> i64 {
        ((memory_mib as f64 * self.mem_ratio).floor() as i64 - self.reserved_mib).max(0)
    }
}

/// The per-node allocator state.
#[derive(Default)]
pub struct Allocator {
    cache: Mutex<Cache>,
}

impl HostCap {
    /// A host's entry from its row, without its disks (only these fields are read: a reload
    /// reads every host of the datacenter).
    fn read(h: &Record) -> Result<HostCap, StoreError> {
        Ok(HostCap {
            uuid: h.uuid,
            cluster: h.decode("cluster_uuid")?,
            zone: h.decode("zone_uuid")?,
            usable: h.decode::<HostState>("state")? == HostState::Enabled
                && h.decode::<HostStatus>("status")? == HostStatus::Connected,
            cores: h.decode("cpu_cores")?,
            memory_mib: h.decode("memory_mib")?,
            cpu_used: h.decode("cpu_used")?,
            memory_used: h.decode("memory_used_mib")?,
            disks: SmallVec::new(),
        })
    }

    fn fits(&self, spec: &AllocationSpec, lim: &Limits) -> Option<Option<Uuid>> {
        if !self.usable
            || self.cpu_used + spec.cpu > lim.cpu(self.cores)
            || self.memory_used + spec.memory_mib > lim.memory(self.memory_mib)
        {
            return None;
        }
        if spec.disk_mib <= 0 {
            return Some(self.disks.first().map(|d| d.0));
        }
        self.disks
            .iter()
            .find(|(_, free)| *free >= spec.disk_mib)
            .map(|(ps, _)| Some(*ps))
    }

    fn memory_free(&self, lim: &Limits) -> i64 {
        lim.memory(self.memory_mib) - self.memory_used
    }
}

impl Allocator {
    pub fn new() -> Self {
        Allocator::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reload everything from the store.
    async fn reload(&self, c: &Cloud) -> Result<(), Error> {
        let db = c.db();
        let hosts = db.project(&Query::of::<Host>(), HostCap::read).await?;
        let storage = db
            .select::<LocalStorage>(&Query::of::<LocalStorage>())
            .await?;
        let ps_links = db.select::<PsCluster>(&Query::of::<PsCluster>()).await?;
        let clusters = db.select::<Cluster>(&Query::of::<Cluster>()).await?;
        let l2_links = db.select::<L2Cluster>(&Query::of::<L2Cluster>()).await?;
        let mut attached: BTreeMap<Uuid, BTreeSet<Uuid>> = BTreeMap::new();
        for l in &ps_links {
            attached
                .entry(l.cluster_uuid)
                .or_default()
                .insert(l.ps_uuid);
        }
        let mut disks: HashMap<Uuid, Vec<(Uuid, i64)>> = HashMap::new();
        for s in &storage {
            disks
                .entry(s.host_uuid)
                .or_default()
                .push((s.ps_uuid, s.total_mib - s.used_mib));
        }
        let mut cache = Cache {
            loaded: Some(tokio::time::Instant::now()),
            ..Default::default()
        };
        for cl in &clusters {
            cache.clusters.insert(
                cl.uuid,
                ClusterInfo {
                    zone: cl.zone_uuid,
                    enabled: cl.state == EnableState::Enabled,
                    ..Default::default()
                },
            );
        }
        for l in &l2_links {
            if let Some(ci) = cache.clusters.get_mut(&l.cluster_uuid) {
                ci.l2s.insert(l.l2_uuid);
            }
        }
        for mut h in hosts {
            let ps_ok = attached.get(&h.cluster);
            h.disks = disks
                .remove(&h.uuid)
                .unwrap_or_default()
                .into_iter()
                .filter(|(ps, _)| ps_ok.is_some_and(|s| s.contains(ps)))
                .collect();
            let cluster = h.cluster;
            let slot = cache.put(h);
            if let Some(ci) = cache.clusters.get_mut(&cluster) {
                ci.hosts.push(slot);
            }
        }
        *self.lock() = cache;
        Ok(())
    }

    /// Reload one host's entry from the store (after a refused reservation or a host event).
    pub async fn refresh_host(&self, c: &Cloud, host: Uuid) -> Result<(), Error> {
        let Some(mut cap) = c.db().peek::<Host, _>(host, HostCap::read).await? else {
            self.lock().forget(&host);
            return Ok(());
        };
        let attached: BTreeSet<Uuid> = c
            .db()
            .select::<PsCluster>(&Query::of::<PsCluster>().eq("cluster_uuid", cap.cluster))
            .await?
            .iter()
            .map(|l| l.ps_uuid)
            .collect();
        cap.disks = c
            .db()
            .select::<LocalStorage>(&Query::of::<LocalStorage>().eq("host_uuid", host))
            .await?
            .iter()
            .filter(|s| attached.contains(&s.ps_uuid))
            .map(|s| (s.ps_uuid, s.total_mib - s.used_mib))
            .collect();
        let mut cache = self.lock();
        let cluster = cap.cluster;
        let slot = cache.put(cap);
        let known = cache
            .clusters
            .get(&cluster)
            .is_some_and(|ci| ci.hosts.contains(&slot));
        if !known {
            // A host the cache has never seen (or a new cluster): reload all next time.
            cache.loaded = None;
        }
        Ok(())
    }

    /// Adjust the cached free disk of `host` on `ps` by `delta` MiB (volume services call this).
    pub fn disk_changed(&self, host: Uuid, ps: Uuid, delta_used: i64) {
        let mut cache = self.lock();
        let Some(h) = cache.host_mut(&host) else {
            return;
        };
        let mut stale = false;
        for d in &mut h.disks {
            if d.0 == ps {
                d.1 -= delta_used;
                // The store refuses a take past the share's total; free space below zero is a
                // cache that missed a give-back (see `release`): read it again.
                stale |= d.1 < 0;
            }
        }
        if stale {
            tracing::debug!(%host, %ps, "allocator cache below zero free disk; reloading");
            cache.loaded = None;
        }
    }

    fn limits(c: &Cloud) -> Limits {
        Limits {
            cpu_ratio: c.engine.config.get(&CPU_OVERCOMMIT.key()),
            mem_ratio: c.engine.config.get(&MEMORY_OVERCOMMIT.key()),
            reserved_mib: c.engine.config.get(&RESERVED_MEMORY.key()),
        }
    }

    /// Hosts that could take `spec`, best first: at least `want` when there are so many, at
    /// most four times `want` (a random sample of the pool, or of all of it if that is short).
    fn candidates(
        &self,
        c: &Cloud,
        spec: &AllocationSpec,
        lim: &Limits,
        want: usize,
    ) -> Vec<(HostCap, Option<Uuid>)> {
        let cache = self.lock();
        let takes = |cl: &Uuid, ci: &ClusterInfo| {
            ci.enabled
                && spec.zone.is_none_or(|z| z == ci.zone)
                && spec.cluster.is_none_or(|x| x == *cl)
                && spec.l2_networks.iter().all(|l2| ci.l2s.contains(l2))
        };
        let fits = |s: usize| -> Option<(&HostCap, Option<Uuid>)> {
            let h = &cache.hosts[s];
            if spec.avoid_hosts.contains(&h.uuid) {
                return None;
            }
            h.fits(spec, lim).map(|ps| (h, ps))
        };
        if let Some(host) = spec.host {
            // A designated host: its cluster must take the VM too.
            return (cache.slots.get(&host).and_then(|&s| fits(s)))
                .filter(|(h, _)| {
                    (cache.clusters.get(&h.cluster)).is_some_and(|ci| takes(&h.cluster, ci))
                })
                .map(|(h, ps)| (h.clone(), ps))
                .into_iter()
                .collect();
        }
        // The pool is the hosts of the eligible clusters, in cluster order; it is not copied
        // out (with tens of thousands of hosts every allocation copied a large pool): a host is
        // found by its position in it. Its hosts are in eligible clusters, so only the hosts
        // themselves are checked below.
        let eligible: Vec<&ClusterInfo> = cache
            .clusters
            .iter()
            .filter(|(cl, ci)| takes(cl, ci))
            .map(|(_, ci)| ci)
            .collect();
        // Where each eligible cluster's hosts end in the pool.
        let ends: Vec<usize> = eligible
            .iter()
            .scan(0, |end, ci| {
                *end += ci.hosts.len();
                Some(*end)
            })
            .collect();
        let pool_len = ends.last().copied().unwrap_or(0);
        let at = |i: usize| -> usize {
            let k = ends.partition_point(|&end| end <= i);
            let start = if k == 0 { 0 } else { ends[k - 1] };
            eligible[k].hosts[i - start]
        };
        let mut found: Vec<(&HostCap, Option<Uuid>)> = Vec::with_capacity(want * 4);
        // A random sample first; the whole pool (in random order) only if that finds too little.
        c.engine.ids.with_rng(|rng| {
            let amount = (want * 4).min(pool_len);
            for i in rand::seq::index::sample(rng, pool_len, amount) {
                found.extend(fits(at(i)));
            }
            if found.len() < want {
                let mut all: Vec<usize> = eligible
                    .iter()
                    .flat_map(|ci| ci.hosts.iter().copied())
                    .collect();
                all.shuffle(rng);
                for &s in &all {
                    if found.len() >= want * 4 {
                        break;
                    }
                    if found.iter().any(|(h, _)| h.uuid == cache.hosts[s].uuid) {
                        continue;
                    }
                    found.extend(fits(s));
                }
            }
        });
        // Best first; copied out once sorted.
        found.sort_by_key(|(h, _)| (std::cmp::Reverse(h.memory_free(lim)), h.uuid));
        found.into_iter().map(|(h, ps)| (h.clone(), ps)).collect()
    }

    /// Reserve `spec` on `host` for `vm`. Ok(false): the host refused (full, disabled, gone).
    async fn reserve(
        &self,
        c: &Cloud,
        vm: Uuid,
        cap: &HostCap,
        spec: &AllocationSpec,
        lim: &Limits,
        disk: Option<Uuid>,
    ) -> Result<bool, Error> {
        let res = Row::new(
            reservation_uuid(vm, cap.uuid),
            Reservation {
                vm_uuid: vm,
                host_uuid: cap.uuid,
                cpu: spec.cpu,
                memory_mib: spec.memory_mib,
                disk_mib: if disk.is_some() { spec.disk_mib } else { 0 },
                ps_uuid: disk,
            },
        );
        let mut b = Batch::new();
        if let Some(ps) = disk {
            b = b.update(local_storage_take(ps, cap.uuid, spec.disk_mib));
        }
        let b = b.insert(&res).update(
            Update::of::<Host>(cap.uuid)
                .when_eq("state", HostState::Enabled.as_str())
                .when_eq("status", HostStatus::Connected.as_str())
                .add("cpu_used", spec.cpu)
                .at_most("cpu_used", lim.cpu(cap.cores))
                .add("memory_used_mib", spec.memory_mib)
                .at_most("memory_used_mib", lim.memory(cap.memory_mib)),
        );
        match c.db().commit(b).await {
            Ok(_) => {
                if let Some(h) = self.lock().host_mut(&cap.uuid) {
                    h.cpu_used += spec.cpu;
                    h.memory_used += spec.memory_mib;
                }
                if let Some(ps) = disk {
                    self.disk_changed(cap.uuid, ps, spec.disk_mib);
                }
                Ok(true)
            }
            // Reserved already (a replayed step): the reservation stands.
            Err(e) if e.class() == ErrorClass::AlreadyExists => Ok(true),
            Err(e)
                if matches!(
                    e.class(),
                    ErrorClass::ConditionFailed | ErrorClass::NotFound
                ) =>
            {
                self.refresh_host(c, cap.uuid).await?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn allocate(
        &self,
        c: &Cloud,
        vm: Uuid,
        spec: &AllocationSpec,
        hold_disk: bool,
    ) -> Result<Allocation, Error> {
        if spec.cpu <= 0 || spec.memory_mib <= 0 {
            return Err(Error::invalid(
                "a VM needs at least one CPU and some memory",
            ));
        }
        let refresh: Duration = c.engine.config.get(&CACHE_REFRESH.key());
        let stale = self.lock().loaded.is_none_or(|t| t.elapsed() >= refresh);
        if stale {
            self.reload(c).await?;
        }
        let lim = Self::limits(c);
        if let Some(h) = spec.host {
            // A designated host: read it fresh, it is the only choice.
            self.refresh_host(c, h).await?;
        }
        let mut reloaded = stale;
        loop {
            let mut cands = self.candidates(c, spec, &lim, 8);
            // Described for the plugins only when one filters (as `vm::after` reads a VM only
            // when a plugin listens).
            if !cands.is_empty() && !c.engine.ext.allocator_filters.is_empty() {
                let hc: Vec<HostCandidate> = cands
                    .iter()
                    .map(|(h, _)| HostCandidate {
                        host: h.uuid,
                        cluster: h.cluster,
                        zone: h.zone,
                        cpu_free: lim.cpu(h.cores) - h.cpu_used,
                        memory_free_mib: h.memory_free(&lim),
                        disk_free_mib: h.disks.iter().map(|d| d.1).max().unwrap_or(0),
                        vms: 0,
                    })
                    .collect();
                let kept = c.engine.ext.filter_hosts(spec, hc).map_err(|f| {
                    Error::new(
                        ErrorCode::CapacityExhausted,
                        format!("allocator filter {f} left no host"),
                    )
                })?;
                cands.retain(|(h, _)| kept.iter().any(|k| k.host == h.uuid));
            }
            for (cap, ps) in &cands {
                let disk = if hold_disk && spec.disk_mib > 0 {
                    *ps
                } else {
                    None
                };
                if self.reserve(c, vm, cap, spec, &lim, disk).await? {
                    return Ok(Allocation {
                        host: cap.uuid,
                        cluster: cap.cluster,
                        zone: cap.zone,
                        primary_storage: *ps,
                    });
                }
            }
            if reloaded {
                return Err(self.why_none(spec));
            }
            // Nothing fit per the cache: reload once and look again.
            self.reload(c).await?;
            reloaded = true;
        }
    }

    fn why_none(&self, spec: &AllocationSpec) -> Error {
        let what = match spec.host {
            Some(h) => format!("host {h} cannot take"),
            None => "no host can take".to_string(),
        };
        Error::new(
            ErrorCode::CapacityExhausted,
            format!(
                "{what} a VM with {} CPU, {} MiB memory and {} MiB disk{}{} (hosts must be Enabled and Connected, with the L2 networks attached and enough capacity)",
                spec.cpu,
                spec.memory_mib,
                spec.disk_mib,
                spec.cluster.map(|c| format!(" in cluster {c}")).unwrap_or_default(),
                spec.zone.map(|z| format!(" in zone {z}")).unwrap_or_default(),
            ),
        )
    }

    /// Return what `vm` holds on `host` (no-op when it holds nothing).
    pub async fn release(&self, c: &Cloud, vm: Uuid, host: Uuid) -> Result<(), Error> {
        let id = reservation_uuid(vm, host);
        let Some(r) = c.db().get::<Reservation>(id).await? else {
            return Ok(());
        };
        let mut b = Batch::new();
        if let (Some(ps), true) = (r.ps_uuid, r.disk_mib > 0) {
            b = b.update(local_storage_give_back(ps, host, r.disk_mib));
        }
        let b = b
            .delete::<Reservation>(id, Expect::Version(r.version))
            .update(
                Update::of::<Host>(host)
                    .if_exists()
                    .add("cpu_used", -r.cpu)
                    .at_least("cpu_used", 0)
                    .add("memory_used_mib", -r.memory_mib)
                    .at_least("memory_used_mib", 0),
            );
        match c.db().commit(b).await {
            Ok(_) => {
                let mut cache = self.lock();
                if let Some(h) = cache.host_mut(&host) {
                    h.cpu_used -= r.cpu;
                    h.memory_used -= r.memory_mib;
                    if h.cpu_used < 0 || h.memory_used < 0 {
                        // The store's counters held the reservation (the batch's bounds say
                        // so); the cache's did not: a reload read the host before this
                        // reservation's commit and kept it since. The cache is a hint, and
                        // goes stale that way; read it again rather than go on from it.
                        tracing::debug!(%host, "allocator cache below a release; reloading");
                        cache.loaded = None;
                    }
                }
                drop(cache);
                if let (Some(ps), true) = (r.ps_uuid, r.disk_mib > 0) {
                    self.disk_changed(host, ps, -r.disk_mib);
                }
                Ok(())
            }
            Err(e) if matches!(e.class(), ErrorClass::NotFound | ErrorClass::Conflict) => Ok(()),
            Err(e) => Err(super::give_back_err(
                e,
                format!("releasing reservation {id} of vm {vm} on host {host}"),
            )),
        }
    }
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: AllocateHost| async move {
        c.allocator.allocate(&c, m.vm, &m.spec, m.hold_disk).await
    })?;
    cloud.handle(|c: Arc<Cloud>, m: ReleaseHost| async move {
        c.allocator.release(&c, m.vm, m.host).await
    })?;
    // Hosts that change (connect, disconnect, enable, ...) are reloaded on every node.
    let mut events = cloud.bus().subscribe("/host/**")?;
    let weak = Arc::downgrade(cloud);
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let Some(c) = weak.upgrade() else { break };
            if let Some(h) = ev
                .data
                .get("uuid")
                .and_then(|u| u.as_str())
                .and_then(|u| Uuid::parse_str(u).ok())
            {
                if let Err(e) = c.allocator.refresh_host(&c, h).await {
                    tracing::debug!(error = %e, "allocator cache refresh failed");
                }
            }
        }
    });
    // A cluster enabled or disabled: everything is reloaded at the next allocation.
    let mut events = cloud.bus().subscribe("/cluster/**")?;
    let weak = Arc::downgrade(cloud);
    tokio::spawn(async move {
        while events.recv().await.is_some() {
            let Some(c) = weak.upgrade() else { break };
            c.allocator.lock().loaded = None;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(n: u128, usable: bool) -> HostCap {
        HostCap {
            uuid: Uuid::from_u128(n),
            cluster: Uuid::from_u128(100),
            zone: Uuid::from_u128(200),
            usable,
            cores: 8,
            memory_mib: 16_384,
            cpu_used: 0,
            memory_used: 0,
            disks: SmallVec::new(),
        }
    }

    #[test]
    fn a_host_keeps_its_slot_and_a_forgotten_one_is_never_usable_again() {
        let mut c = Cache::default();
        assert_eq!(c.put(cap(1, true)), 0);
        assert_eq!(c.put(cap(2, true)), 1);
        // Refreshed: same slot, new figures.
        let mut busier = cap(1, true);
        busier.cpu_used = 5;
        assert_eq!(c.put(busier), 0);
        assert_eq!(c.host_mut(&Uuid::from_u128(1)).map(|h| h.cpu_used), Some(5));
        // Gone: its slot stays (clusters list it) but can take nothing.
        c.forget(&Uuid::from_u128(1));
        assert!(c.host_mut(&Uuid::from_u128(1)).is_none());
        assert!(!c.hosts[0].usable);
        assert!(c.hosts[1].usable, "the other host is untouched");
        // Back again (a new row with that uuid): a new slot.
        assert_eq!(c.put(cap(1, true)), 2);
        assert!(!c.hosts[0].usable);
    }
}
