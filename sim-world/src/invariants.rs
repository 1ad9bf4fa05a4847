//! The oracle: the invariants of a settled cloud, checked against the database and the
//! simulated hosts. The numbered list is in ARCHITECTURE.md ("Invariants the oracle checks"):
//! here are 1–3, the books ([`check_books`]), and 5, the database and the connected hosts agree
//! ([`check`]); 4, quiescence, is [`World::settle`](crate::World::settle). The oracle fails
//! closed: a table it cannot read is a violation.

use crate::world::World;
use std::collections::{BTreeMap, BTreeSet};
use stratus_agent_protocol::PowerState;
use stratus_core::model::*;
use stratus_core::services::allocator::{CPU_OVERCOMMIT, MEMORY_OVERCOMMIT, RESERVED_MEMORY};
use stratus_store::{Db, Query, Resource, Row};
use uuid::Uuid;

/// Every row of kind `T`. The oracle fails closed: a table it cannot read is a violation, never
/// an empty table whose books trivially balance.
async fn all<T: Resource>(db: &Db) -> Result<Vec<Row<T>>, String> {
    (db.select::<T>(&Query::of::<T>()).await)
        .map_err(|e| format!("the oracle cannot read {}: {e}", T::META.name))
}

/// Limits from the configuration the tests use (the defaults unless a test changed them).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub cpu_ratio: f64,
    pub mem_ratio: f64,
    pub reserved_mib: i64,
}

impl Default for Limits {
    fn default() -> Self {
        let f = |d: &stratus_core::config::ConfigDef| {
            (d.default.parse::<f64>()).expect("a ratio's default is a number")
        };
        Limits {
            cpu_ratio: f(&CPU_OVERCOMMIT),
            mem_ratio: f(&MEMORY_OVERCOMMIT),
            reserved_mib: (RESERVED_MEMORY.default.parse())
                .expect("the reserved memory's default is a number"),
        }
    }
}

/// Check invariants 1–3 and 5; returns the violations (empty when all hold).
pub async fn check(world: &World) -> Vec<String> {
    check_with(world, Limits::default()).await
}

/// Settle within `max`, then [`check`]: what a test reports when the world did not come to rest
/// or broke an invariant.
pub async fn settled_and_sound(world: &World, max: std::time::Duration) -> Result<(), String> {
    world
        .settle(max)
        .await
        .map_err(|busy| format!("not settled: {busy}"))?;
    let bad = check(world).await;
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("invariants broken:\n{}", bad.join("\n")))
    }
}

/// Check the books only (invariants 1–3): they balance at every moment, also while hosts are
/// down or the management node is dead.
pub async fn check_books(world: &World) -> Vec<String> {
    check_parts(world, Limits::default(), false).await
}

pub async fn check_with(world: &World, lim: Limits) -> Vec<String> {
    check_parts(world, lim, true).await
}

async fn check_parts(world: &World, lim: Limits, with_hosts: bool) -> Vec<String> {
    let db = &world.db;
    let mut bad = Vec::new();
    let tables = async {
        Ok::<_, String>((
            all::<Host>(db).await?,
            all::<Vm>(db).await?,
            all::<Reservation>(db).await?,
            all::<VmNic>(db).await?,
            all::<UsedIp>(db).await?,
            all::<IpRange>(db).await?,
            all::<Volume>(db).await?,
            all::<LocalStorage>(db).await?,
        ))
    };
    let (hosts, vms, reservations, nics, used_ips, ranges, volumes, shares) = match tables.await {
        Ok(t) => t,
        Err(e) => return vec![e],
    };
    let accounts = match all::<Account>(db).await {
        Ok(a) => a,
        Err(e) => return vec![e],
    };
    let vm_by: BTreeMap<Uuid, &Row<Vm>> = vms.iter().map(|v| (v.uuid, v)).collect();
    // Sums and counts grouped once: the scale runs check 30,000 hosts and 100,000 VMs.
    let mut host_sums: BTreeMap<Uuid, (i64, i64)> = BTreeMap::new();
    let mut vm_reservations: BTreeMap<Uuid, usize> = BTreeMap::new();
    let mut disk_held: BTreeMap<(Uuid, Option<Uuid>), i64> = BTreeMap::new();
    for r in &reservations {
        let e = host_sums.entry(r.host_uuid).or_default();
        e.0 += r.cpu;
        e.1 += r.memory_mib;
        *vm_reservations.entry(r.vm_uuid).or_default() += 1;
        *disk_held.entry((r.host_uuid, r.ps_uuid)).or_default() += r.disk_mib;
    }

    // 1. capacity
    for h in &hosts {
        let (cpu, mem) = host_sums.get(&h.uuid).copied().unwrap_or_default();
        if cpu != h.cpu_used || mem != h.memory_used_mib {
            bad.push(format!(
                "host {}: counters cpu {} / mem {} but reservations sum to {cpu} / {mem}",
                h.uuid, h.cpu_used, h.memory_used_mib
            ));
        }
        let cpu_limit = (h.cpu_cores as f64 * lim.cpu_ratio).floor() as i64;
        let mem_limit = (h.memory_mib as f64 * lim.mem_ratio).floor() as i64 - lim.reserved_mib;
        if h.cpu_used > cpu_limit || h.memory_used_mib > mem_limit.max(0) {
            bad.push(format!(
                "host {} over capacity: cpu {}/{cpu_limit}, memory {}/{mem_limit}",
                h.uuid, h.cpu_used, h.memory_used_mib
            ));
        }
    }
    for r in &reservations {
        match vm_by.get(&r.vm_uuid) {
            None => bad.push(format!(
                "reservation {} of vm {} that does not exist",
                r.uuid, r.vm_uuid
            )),
            Some(vm) if vm.host_uuid != Some(r.host_uuid) => bad.push(format!(
                "vm {} ({}) holds capacity on host {} but runs on {:?}",
                vm.uuid, vm.state, r.host_uuid, vm.host_uuid
            )),
            Some(vm) if !vm.state.holds_capacity() => bad.push(format!(
                "vm {} is {} but holds capacity on host {}",
                vm.uuid, vm.state, r.host_uuid
            )),
            _ => {}
        }
    }
    for vm in &vms {
        if vm.state.holds_capacity() {
            let n = vm_reservations.get(&vm.uuid).copied().unwrap_or(0);
            if n != 1 || vm.host_uuid.is_none() {
                bad.push(format!(
                    "vm {} is {} with host {:?} and {n} reservations",
                    vm.uuid, vm.state, vm.host_uuid
                ));
            }
        }
    }

    // 2. IPs
    let nic_by: BTreeMap<Uuid, &Row<VmNic>> = nics.iter().map(|n| (n.uuid, n)).collect();
    let mut ip_rows: BTreeMap<(Uuid, &str), usize> = BTreeMap::new();
    let mut range_used: BTreeMap<Uuid, i64> = BTreeMap::new();
    for u in &used_ips {
        *ip_rows.entry((u.nic_uuid, u.ip.as_str())).or_default() += 1;
        *range_used.entry(u.range_uuid).or_default() += 1;
    }
    for u in &used_ips {
        match nic_by.get(&u.nic_uuid) {
            None => bad.push(format!(
                "address {} on L3 {} is held by NIC {} that does not exist",
                u.ip, u.l3_uuid, u.nic_uuid
            )),
            Some(n) if n.ip.as_deref() != Some(u.ip.as_str()) || n.l3_uuid != u.l3_uuid => bad
                .push(format!(
                    "address {} is held by NIC {} whose address is {:?}",
                    u.ip, n.uuid, n.ip
                )),
            _ => {}
        }
    }
    for n in &nics {
        if !vm_by.contains_key(&n.vm_uuid) {
            bad.push(format!(
                "NIC {} of vm {} that does not exist",
                n.uuid, n.vm_uuid
            ));
        }
        if let Some(ip) = &n.ip {
            let holders = ip_rows.get(&(n.uuid, ip.as_str())).copied().unwrap_or(0);
            if holders != 1 {
                bad.push(format!(
                    "NIC {} has address {ip} with {holders} address rows",
                    n.uuid
                ));
            }
        }
    }
    let mut per_l3: BTreeSet<(Uuid, String)> = BTreeSet::new();
    for u in &used_ips {
        if !per_l3.insert((u.l3_uuid, u.ip.clone())) {
            bad.push(format!(
                "address {} handed out twice on L3 {}",
                u.ip, u.l3_uuid
            ));
        }
    }
    for r in &ranges {
        let n = range_used.get(&r.uuid).copied().unwrap_or(0);
        if n != r.used {
            bad.push(format!(
                "range {} counts {} used addresses, {n} are",
                r.uuid, r.used
            ));
        }
    }

    // 3. storage
    let mut vol_sums: BTreeMap<(Uuid, Uuid), i64> = BTreeMap::new();
    for v in &volumes {
        if let (Some(h), Some(ps)) = (v.host_uuid, v.ps_uuid) {
            *vol_sums.entry((h, ps)).or_default() += v.size_mib;
        }
    }
    let host_set: BTreeSet<Uuid> = hosts.iter().map(|h| h.uuid).collect();
    for s in &shares {
        if !host_set.contains(&s.host_uuid) {
            bad.push(format!(
                "local storage share {} of host {} that does not exist",
                s.uuid, s.host_uuid
            ));
        }
        let vols = vol_sums
            .get(&(s.host_uuid, s.ps_uuid))
            .copied()
            .unwrap_or(0);
        let held = disk_held
            .get(&(s.host_uuid, Some(s.ps_uuid)))
            .copied()
            .unwrap_or(0);
        if s.used_mib != vols + held {
            bad.push(format!(
                "local storage of host {}: used {} but volumes {vols} + held {held}",
                s.host_uuid, s.used_mib
            ));
        }
        if s.used_mib > s.total_mib {
            bad.push(format!(
                "local storage of host {} over its size: {}/{}",
                s.host_uuid, s.used_mib, s.total_mib
            ));
        }
    }
    for v in &volumes {
        // State sync's written decision that user data is gone: what the testbed hunts.
        if v.state == VolumeState::Lost {
            bad.push(format!("volume {} is Lost: its data is gone", v.uuid));
        }
        if let Some(h) = v.host_uuid.filter(|h| !host_set.contains(h)) {
            bad.push(format!("volume {} on host {h} that does not exist", v.uuid));
        }
        match v.vm_uuid {
            Some(vm) if !vm_by.contains_key(&vm) => {
                bad.push(format!("volume {} of vm {vm} that does not exist", v.uuid))
            }
            None if v.kind == VolumeType::Root => {
                bad.push(format!("root volume {} without a vm", v.uuid))
            }
            None if !matches!(
                v.state,
                VolumeState::Ready | VolumeState::NotInstantiated | VolumeState::Lost
            ) =>
            {
                bad.push(format!("detached volume {} is {}", v.uuid, v.state))
            }
            _ => {}
        }
    }

    quotas(&accounts, &vms, &volumes, &mut bad);
    if with_hosts {
        hosts_agree(world, &hosts, &vms, &volumes, &vm_by, &mut bad);
    }
    bad
}

/// Invariant 8, quotas: each account's use is the sum over the VMs and volumes it owns,
/// within its limits.
fn quotas(
    accounts: &[Row<Account>],
    vms: &[Row<Vm>],
    volumes: &[Row<Volume>],
    bad: &mut Vec<String>,
) {
    let mut sums: BTreeMap<Uuid, [i64; 5]> = BTreeMap::new();
    for v in vms {
        if let Some(a) = v.account_uuid {
            let e = sums.entry(a).or_default();
            e[0] += 1;
            e[1] += v.cpu;
            e[2] += v.memory_mib;
        }
    }
    for v in volumes {
        if let Some(a) = v.account_uuid {
            let e = sums.entry(a).or_default();
            e[3] += 1;
            e[4] += v.size_mib;
        }
    }
    for a in accounts {
        let used = [
            a.vms_used,
            a.vcpus_used,
            a.memory_mib_used,
            a.volumes_used,
            a.volume_mib_used,
        ];
        let owned = sums.remove(&a.uuid).unwrap_or_default();
        if used != owned {
            bad.push(format!(
                "account {}: in use (VMs, vCPUs, MiB, volumes, volume MiB) {used:?}, but it owns {owned:?}",
                a.name
            ));
        }
        let limits = [
            a.vm_limit,
            a.vcpu_limit,
            a.memory_mib_limit,
            a.volume_limit,
            a.volume_mib_limit,
        ];
        for (u, l) in used.iter().zip(limits) {
            if l.is_some_and(|l| *u > l) {
                bad.push(format!(
                    "account {}: {used:?} in use is over its limits {limits:?}",
                    a.name
                ));
                break;
            }
        }
    }
    for (a, owned) in sums {
        bad.push(format!("account {a} owns {owned:?} but does not exist"));
    }
}

/// 5. The database and the hosts agree.
fn hosts_agree(
    world: &World,
    hosts: &[Row<Host>],
    vms: &[Row<Vm>],
    volumes: &[Row<Volume>],
    vm_by: &BTreeMap<Uuid, &Row<Vm>>,
    bad: &mut Vec<String>,
) {
    let host_by: BTreeMap<Uuid, &Row<Host>> = hosts.iter().map(|h| (h.uuid, h)).collect();
    let volume_by: BTreeMap<Uuid, &Row<Volume>> = volumes.iter().map(|v| (v.uuid, v)).collect();
    let mut vms_on: BTreeMap<Uuid, Vec<&Row<Vm>>> = BTreeMap::new();
    for vm in vms {
        if let Some(h) = vm.host_uuid {
            vms_on.entry(h).or_default().push(vm);
        }
    }
    let mut ready_on: BTreeMap<Uuid, Vec<&Row<Volume>>> = BTreeMap::new();
    for v in volumes.iter().filter(|v| v.state == VolumeState::Ready) {
        if let Some(h) = v.host_uuid {
            ready_on.entry(h).or_default().push(v);
        }
    }
    for sim in &world.hosts {
        let Some(hu) = sim.uuid else { continue };
        let Some(h) = host_by.get(&hu) else {
            continue;
        };
        let state = sim.state();
        let down = h.status != HostStatus::Connected;
        for (vu, v) in &state.vms {
            match vm_by.get(vu) {
                None => bad.push(format!(
                    "host {hu} has VM {vu} ({:?}) the database does not know",
                    v.state
                )),
                Some(db_vm) => {
                    let running_here = v.state == PowerState::Running;
                    if running_here
                        && !down
                        && (db_vm.host_uuid != Some(hu) || db_vm.state != VmState::Running)
                    {
                        bad.push(format!(
                            "host {hu} runs VM {vu}; the database says {} on {:?}",
                            db_vm.state, db_vm.host_uuid
                        ));
                    }
                }
            }
        }
        for vu in state.volumes.keys() {
            match volume_by.get(vu) {
                None => bad.push(format!(
                    "host {hu} has volume {vu} the database does not know"
                )),
                Some(v) if v.host_uuid != Some(hu) => bad.push(format!(
                    "host {hu} has volume {vu}; the database places it on {:?}",
                    v.host_uuid
                )),
                _ => {}
            }
        }
        for vm in vms_on.get(&hu).into_iter().flatten() {
            if down {
                if vm.state == VmState::Running {
                    bad.push(format!(
                        "host {hu} is {} but vm {} is Running",
                        h.status, vm.uuid
                    ));
                }
                continue;
            }
            let on_host = state.vms.get(&vm.uuid).map(|v| v.state);
            if vm.state == VmState::Running && on_host != Some(PowerState::Running) {
                bad.push(format!(
                    "vm {} is Running on host {hu} in the database; the host says {on_host:?}",
                    vm.uuid
                ));
            }
        }
        if !down {
            for v in ready_on.get(&hu).into_iter().flatten() {
                if !state.volumes.contains_key(&v.uuid) {
                    bad.push(format!(
                        "volume {} is Ready on host {hu} in the database but not on the host",
                        v.uuid
                    ));
                }
            }
        }
    }
}

/// A summary of what exists, for "the world is as before" comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub vms: usize,
    pub nics: usize,
    pub used_ips: usize,
    pub volumes: usize,
    pub reservations: usize,
    pub cpu_used: i64,
    pub memory_used: i64,
    pub disk_used: i64,
    pub host_vms: usize,
    pub host_volumes: usize,
}

/// What exists now; an error when the database cannot be read (never a census of nothing).
pub async fn census(world: &World) -> Result<Census, String> {
    let db = &world.db;
    let count = |k: &'static str| async move {
        (db.count(&Query::new(k)).await)
            .map(|n| n as usize)
            .map_err(|e| format!("the census cannot count {k}: {e}"))
    };
    let hosts = all::<Host>(db).await?;
    let shares = all::<LocalStorage>(db).await?;
    Ok(Census {
        vms: count("vm").await?,
        nics: count("vm_nic").await?,
        used_ips: count("used_ip").await?,
        volumes: count("volume").await?,
        reservations: count("reservation").await?,
        cpu_used: hosts.iter().map(|h| h.cpu_used).sum(),
        memory_used: hosts.iter().map(|h| h.memory_used_mib).sum(),
        disk_used: shares.iter().map(|s| s.used_mib).sum(),
        host_vms: world.hosts.iter().map(|h| h.state().vms.len()).sum(),
        host_volumes: world.hosts.iter().map(|h| h.state().volumes.len()).sum(),
    })
}
