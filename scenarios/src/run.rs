//! Runs a scenario in the simulated datacenter (simulation build only): builds the world,
//! runs the phases with the fault profile active, settles, checks, and returns the figures.

use crate::report::{Check, PhaseFigures};
use crate::spec::{Phase, Scenario};
use crate::stats::Recorder;
use crate::wall;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::IgnoredAny;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_core::error::Error;
use stratus_sim_world::invariants::check;
use stratus_sim_world::WireFaults;
use stratus_sim_world::{FaultRates, HostProfile, StoreFaultRates, Trace, World, WorldSpec};
use stratus_store::Query;
use tokio::time::Instant;
use uuid::Uuid;

/// What a run produced. Its wall times are read from the machine's clock ([`wall::now_s`]),
/// as the caller reads the run's total; the caller measures peak memory.
pub struct RunOutput {
    pub recorder: Recorder,
    pub checks: Vec<Check>,
    pub faults: BTreeMap<String, u64>,
    /// State sync's corrections by kind.
    pub repairs: BTreeMap<String, u64>,
    pub sim_time: Duration,
    pub hosts: usize,
    pub vms_at_end: u64,
    pub trace_hash: u64,
    /// Wall seconds from the start of [`run`] to the first phase.
    pub build_wall_s: f64,
    pub phases: Vec<PhaseFigures>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn world_spec(sc: &Scenario) -> WorldSpec {
    let d = &sc.datacenter;
    let mut spec = WorldSpec {
        seed: sc.seed,
        zones: d.zones,
        clusters_per_zone: d.clusters_per_zone,
        hosts_per_cluster: d.hosts_per_cluster,
        host: HostProfile {
            cpu_cores: d.host.cpu_cores,
            memory_mib: d.host.memory_mib,
            disk_mib: d.host.disk_mib,
        },
        ips_per_zone: d.ips_per_zone,
        image_mib: d.image_mib,
        offerings: d
            .offerings
            .iter()
            .map(|o| (o.name.clone(), o.cpu, o.memory_mib))
            .collect(),
        add_concurrency: d.add_concurrency,
        clock_skew_ms: sc.faults.clock_skew_ms.max(0.0) as u64,
        ..WorldSpec::default()
    };
    for (k, v) in &sc.config {
        spec.config.retain(|(k2, _)| k2 != k);
        spec.config.push((k.clone(), v.clone()));
    }
    spec
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Power {
    Running,
    Stopped,
}

struct Shared {
    w: World,
    rec: Mutex<Recorder>,
    trace: Trace,
    t0: Instant,
    /// When the run started on the machine's clock ([`wall::now_s`]).
    started: f64,
    /// Idle VMs a worker may take: (uuid, power state, home zone index).
    pool: Mutex<Vec<(Uuid, Power, usize)>>,
    done: AtomicU64,
    failed: AtomicU64,
    phase: Mutex<String>,
    /// Fault events by kind (host crash, partition, manager kill).
    fault_events: Mutex<BTreeMap<String, u64>>,
    stop_faults: AtomicBool,
    next_name: AtomicUsize,
}

impl Shared {
    fn record<T>(&self, kind: &str, started: Instant, r: &Result<T, Error>) {
        let now = Instant::now();
        let code = r.as_ref().err().map(|e| e.code.as_str());
        lock(&self.rec).record(kind, now - self.t0, now - started, code);
        self.trace.record(
            (now - self.t0).as_nanos(),
            &format!("{kind} {}", code.unwrap_or("ok")),
        );
        self.done.fetch_add(1, Ordering::Relaxed);
        if code.is_some() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Record an operation of the workers; when the API is down (a manager killed), wait a
    /// second before the next one, as a real client backs off instead of spinning on errors.
    async fn recorded<T>(&self, kind: &str, started: Instant, r: &Result<T, Error>) {
        self.record(kind, started, r);
        if r.as_ref()
            .is_err_and(|e| e.code == stratus_core::error::ErrorCode::NodeUnavailable)
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn fault(&self, kind: &str) {
        *lock(&self.fault_events)
            .entry(kind.to_string())
            .or_default() += 1;
        self.trace.record(
            (Instant::now() - self.t0).as_nanos(),
            &format!("fault {kind}"),
        );
    }

    async fn create_vm(&self, rng: &mut ChaCha8Rng, offering: Option<&str>) {
        let offerings = &self.w.spec.offerings;
        let name = match offering {
            Some(o) => o.to_string(),
            None => offerings[rng.gen_range(0..offerings.len())].0.clone(),
        };
        let zone = rng.gen_range(0..self.w.dc.zones.len());
        let n = self.next_name.fetch_add(1, Ordering::Relaxed);
        let mut body = self.w.vm_request(&format!("vm-{n}"), &name);
        body["l3_network_uuids"] = json!([self.w.dc.zones[zone].l3]);
        let t = Instant::now();
        let r = self.w.client.create_as::<Created>("vms", body).await;
        self.recorded("create_vm", t, &r).await;
        if let Ok(Created { uuid }) = r {
            lock(&self.pool).push((uuid, Power::Running, zone));
        }
    }

    /// Take an idle VM at random.
    fn take(&self, rng: &mut ChaCha8Rng) -> Option<(Uuid, Power, usize)> {
        let mut p = lock(&self.pool);
        if p.is_empty() {
            return None;
        }
        let i = rng.gen_range(0..p.len());
        Some(p.swap_remove(i))
    }

    /// Put a VM back with its state as the API reports it (gone: not put back).
    async fn give_back(&self, vm: Uuid, zone: usize, known: Option<Power>) {
        let state = match known {
            Some(s) => Some(s),
            None => match self.w.client.one("vms", vm).await {
                Ok(v) => match v["state"].as_str() {
                    Some("Running") => Some(Power::Running),
                    Some("Stopped") => Some(Power::Stopped),
                    // Unknown, Crashed, Destroyed…: left alone by the churn.
                    _ => None,
                },
                Err(_) => None,
            },
        };
        if let Some(s) = state {
            lock(&self.pool).push((vm, s, zone));
        }
    }

    async fn action(&self, kind: &str, vm: Uuid, action: &str, body: Value) -> bool {
        let t = Instant::now();
        let r = self
            .w
            .client
            .action_as::<IgnoredAny>("vms", vm, action, body)
            .await;
        self.recorded(kind, t, &r).await;
        r.is_ok()
    }

    async fn churn_one(&self, rng: &mut ChaCha8Rng, weights: &[f64; 5]) {
        let Some((vm, power, zone)) = self.take(rng) else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        };
        let total: f64 = weights.iter().sum();
        let mut x = rng.gen_range(0.0..total);
        let mut pick = 0;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                pick = i;
                break;
            }
            x -= w;
        }
        let running = power == Power::Running;
        let after = match (pick, running) {
            (_, false) if pick != 3 => self
                .action("start_vm", vm, "start", json!({}))
                .await
                .then_some(Power::Running),
            (0, true) => self
                .action("stop_vm", vm, "stop", json!({}))
                .await
                .then_some(Power::Stopped),
            (1, true) => self
                .action("reboot_vm", vm, "reboot", json!({}))
                .await
                .then_some(Power::Running),
            (2, true) => self
                .action("migrate_vm", vm, "migrate", json!({}))
                .await
                .then_some(Power::Running),
            (3, _) => {
                if self.action("destroy_vm", vm, "destroy", json!({})).await
                    && self.action("expunge_vm", vm, "expunge", json!({})).await
                {
                    self.create_vm(rng, None).await;
                    return;
                }
                None
            }
            _ => {
                // A data volume's life: create attached, detach, delete.
                let t = Instant::now();
                let r = self
                    .w
                    .client
                    .create_as::<Created>(
                        "volumes",
                        json!({"name": "data", "disk_offering_uuid": self.w.dc.disk_offering, "vm_uuid": vm}),
                    )
                    .await;
                self.recorded("create_volume", t, &r).await;
                if let Ok(Created { uuid: vol }) = r {
                    let t = Instant::now();
                    let r = self
                        .w
                        .client
                        .action_as::<IgnoredAny>("volumes", vol, "detach", json!({}))
                        .await;
                    self.recorded("detach_volume", t, &r).await;
                    let t = Instant::now();
                    let r = self.w.client.delete("volumes", vol, true).await;
                    self.recorded("delete_volume", t, &r).await;
                }
                Some(power)
            }
        };
        self.give_back(vm, zone, after).await;
    }
}

/// What the driver reads of a created resource (the rest of the answer is skipped, not built).
#[derive(serde::Deserialize)]
struct Created {
    uuid: Uuid,
}

/// Exponential waiting time for `per_hour` events per hour.
fn next_in(rng: &mut ChaCha8Rng, per_hour: f64) -> Duration {
    let u: f64 = rng.gen_range(1e-9..1.0);
    Duration::from_secs_f64((-u.ln() * 3600.0 / per_hour).min(1e7))
}

/// The fault profile's host, rack and manager events, until told to stop.
async fn fault_driver(s: Arc<Shared>, sc: Scenario) {
    let f = sc.faults.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(sc.seed ^ 0xfa17);
    let n = s.w.hosts.len();
    let mut next_crash =
        (f.host_crash_per_hour > 0.0).then(|| next_in(&mut rng, f.host_crash_per_hour));
    let mut next_part =
        (f.partition_per_hour > 0.0).then(|| next_in(&mut rng, f.partition_per_hour));
    let mut next_kill =
        (f.manager_kill_per_hour > 0.0).then(|| next_in(&mut rng, f.manager_kill_per_hour));
    let mut next_pause =
        (f.manager_pause_per_hour > 0.0).then(|| next_in(&mut rng, f.manager_pause_per_hour));
    let mut next_restart =
        (f.agent_restart_per_hour > 0.0).then(|| next_in(&mut rng, f.agent_restart_per_hour));
    let mut next_fill =
        (f.disk_full_per_hour > 0.0).then(|| next_in(&mut rng, f.disk_full_per_hour));
    let start = Instant::now();
    let mut at = [Duration::ZERO; 6];
    // Pending repairs: (when, what, index).
    let mut repairs: Vec<(Duration, u8, usize)> = Vec::new();
    let mut down_hosts = std::collections::BTreeSet::new();
    let mut cut_hosts = std::collections::BTreeSet::new();
    let mut mgmt_down = false;
    let mut mgmt_paused = false;
    let mut full_disks = std::collections::BTreeSet::new();
    loop {
        if s.stop_faults.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = start.elapsed();
        repairs.sort();
        while let Some(&(when, what, i)) = repairs.first() {
            if when > now {
                break;
            }
            repairs.remove(0);
            match what {
                0 => {
                    s.w.restart_host(i);
                    down_hosts.remove(&i);
                }
                1 => {
                    s.w.heal_host(i);
                    cut_hosts.remove(&i);
                }
                3 => {
                    s.w.free_disk(i);
                    full_disks.remove(&i);
                }
                4 => {
                    s.w.resume_mgmt();
                    mgmt_paused = false;
                }
                _ => {
                    s.w.restart_mgmt();
                    mgmt_down = false;
                }
            }
        }
        if let Some(d) = next_crash {
            if now >= at[0] + d {
                at[0] = now;
                let i = rng.gen_range(0..n);
                if down_hosts.insert(i) {
                    s.w.crash_host(i);
                    s.fault("host_crash");
                    repairs.push((now + Duration::from_secs_f64(f.host_down_s), 0, i));
                }
                next_crash = Some(next_in(&mut rng, f.host_crash_per_hour));
            }
        }
        if let Some(d) = next_part {
            if now >= at[1] + d {
                at[1] = now;
                let first = rng.gen_range(0..n);
                for i in first..(first + f.partition_hosts).min(n) {
                    if cut_hosts.insert(i) {
                        s.w.partition_host(i);
                        repairs.push((now + Duration::from_secs_f64(f.partition_s), 1, i));
                    }
                }
                s.fault("partition");
                next_part = Some(next_in(&mut rng, f.partition_per_hour));
            }
        }
        if let Some(d) = next_kill {
            if now >= at[2] + d && !mgmt_down && !mgmt_paused {
                at[2] = now;
                s.w.kill_mgmt();
                mgmt_down = true;
                s.fault("manager_kill");
                repairs.push((now + Duration::from_secs_f64(f.manager_down_s), 2, 0));
                next_kill = Some(next_in(&mut rng, f.manager_kill_per_hour));
            }
        }
        if let Some(d) = next_pause {
            if now >= at[3] + d && !mgmt_down && !mgmt_paused {
                at[3] = now;
                s.w.pause_mgmt();
                mgmt_paused = true;
                s.fault("manager_pause");
                repairs.push((now + Duration::from_secs_f64(f.manager_pause_s), 4, 0));
                next_pause = Some(next_in(&mut rng, f.manager_pause_per_hour));
            }
        }
        if let Some(d) = next_restart {
            if now >= at[4] + d {
                at[4] = now;
                let i = rng.gen_range(0..n);
                if !down_hosts.contains(&i) {
                    s.w.restart_agent(i);
                    s.fault("agent_restart");
                }
                next_restart = Some(next_in(&mut rng, f.agent_restart_per_hour));
            }
        }
        if let Some(d) = next_fill {
            if now >= at[5] + d {
                at[5] = now;
                let i = rng.gen_range(0..n);
                if full_disks.insert(i) {
                    s.w.fill_disk(i);
                    s.fault("disk_full");
                    repairs.push((now + Duration::from_secs_f64(f.disk_full_s), 3, i));
                }
                next_fill = Some(next_in(&mut rng, f.disk_full_per_hour));
            }
        }
    }
    // Heal everything before the final settle.
    for i in down_hosts {
        s.w.restart_host(i);
    }
    for i in cut_hosts {
        s.w.heal_host(i);
    }
    for i in full_disks {
        s.w.free_disk(i);
    }
    if mgmt_paused {
        s.w.resume_mgmt();
    }
    if mgmt_down {
        s.w.restart_mgmt();
    }
}

/// Hosts connected, every 10 simulated seconds.
async fn sampler(s: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let n =
            s.w.db
                .count(&Query::new("host").eq("status", "Connected"))
                .await
                .unwrap_or(0);
        lock(&s.rec)
            .hosts_connected
            .push(((Instant::now() - s.t0).as_secs_f64(), n));
        // madsim keeps a record of every task until its metrics are read: reading them now and
        // then keeps a long run's memory flat (MADSIM-NOTES).
        let _ = madsim::runtime::Handle::current().metrics();
        tokio::time::sleep(crate::stats::BUCKET).await;
    }
}

/// A line of progress every 30 simulated seconds. (It runs also when quiet, so that printing
/// or not does not change the run.)
async fn progress(s: Arc<Shared>, stop: Arc<AtomicBool>, quiet: bool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(30)).await;
        if quiet {
            continue;
        }
        eprintln!(
            "  [{:>8.1} s sim {:>7.1} s wall] {:<18} {:>8} operations ({} failed)",
            (Instant::now() - s.t0).as_secs_f64(),
            wall::now_s() - s.started,
            lock(&s.phase).clone(),
            s.done.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed)
        );
    }
}

async fn run_phase(s: &Arc<Shared>, sc: &Scenario, i: usize, phase: &Phase) {
    *lock(&s.phase) = phase.name().to_string();
    match phase {
        Phase::CreateVms {
            count,
            concurrency,
            offering,
        } => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for k in 0..*concurrency {
                let (s, next, offering, count) =
                    (s.clone(), next.clone(), offering.clone(), *count);
                let mut rng = ChaCha8Rng::seed_from_u64(sc.seed ^ ((i as u64) << 32) ^ k as u64);
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        s.create_vm(&mut rng, offering.as_deref()).await;
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        Phase::Churn {
            minutes,
            concurrency,
            mix,
        } => {
            let until = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
            let weights = [
                mix.stop_start,
                mix.reboot,
                mix.migrate,
                mix.replace,
                mix.volume,
            ];
            let mut tasks = Vec::new();
            for k in 0..*concurrency {
                let s = s.clone();
                let mut rng =
                    ChaCha8Rng::seed_from_u64(sc.seed ^ ((i as u64) << 32) ^ (k as u64 + 7919));
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        s.churn_one(&mut rng, &weights).await;
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        Phase::MaintenanceWave { hosts } => {
            let n = s.w.hosts.len();
            let step = (n / (*hosts).max(1)).max(1);
            for k in 0..(*hosts).min(n) {
                let Some(h) = s.w.hosts[k * step % n].uuid else {
                    continue;
                };
                for (kind, action) in [
                    ("host_maintenance", "maintenance"),
                    ("host_enable", "enable"),
                ] {
                    let t = Instant::now();
                    let r = s.w.client.action("hosts", h, action, json!({})).await;
                    s.record(kind, t, &r);
                }
            }
            // Maintenance moved or stopped VMs: refresh the pool's states.
            let vms: Vec<(Uuid, Power, usize)> = std::mem::take(&mut *lock(&s.pool));
            for (vm, _, zone) in vms {
                s.give_back(vm, zone, None).await;
            }
        }
        Phase::Idle { minutes } => {
            tokio::time::sleep(Duration::from_secs_f64(minutes * 60.0)).await;
        }
    }
}

/// Run the scenario; `quiet` suppresses progress lines.
pub fn run(sc: &Scenario, quiet: bool) -> RunOutput {
    let slot = Arc::new(Mutex::new(None));
    let out = slot.clone();
    let sc2 = sc.clone();
    let started = wall::now_s();
    World::run(world_spec(sc), move |w| async move {
        let o = body(w, sc2, quiet, started).await;
        *lock(&out) = Some(o);
    });
    let o = lock(&slot).take();
    o.expect("the scenario body finished")
}

async fn body(w: World, sc: Scenario, quiet: bool, started: f64) -> RunOutput {
    let t0 = Instant::now();
    let built = wall::now_s();
    let hosts = w.hosts.len();
    if !quiet {
        eprintln!(
            "  [{:>8.1} s sim {:>7.1} s wall] datacenter built: {} hosts connected",
            0.0,
            built - started,
            hosts
        );
    }
    let f = &sc.faults;
    w.faults.set_rates(FaultRates {
        fail: f.agent_fail,
        fail_after: f.agent_fail_after,
        slow: f.agent_slow,
        slow_ms: f.slow_ms,
        drop_callback: f.drop_callback,
        duplicate_callback: f.duplicate_callback,
    });
    w.store_faults.set_rates(StoreFaultRates {
        fail: f.store_fail,
        fail_after: f.store_fail_after,
        timeout: f.store_timeout,
        slow: Duration::from_millis(f.store_slow_ms),
    });
    stratus_sim_world::set_wire_faults(WireFaults {
        duplicate: f.wire_duplicate,
        reorder: f.wire_reorder,
        max_delay: Duration::from_millis(f.wire_delay_ms),
        // The API's clients are the workload; the wire faults are the agent protocol's.
        spare: Some("/v1/"),
    });
    let s = Arc::new(Shared {
        w,
        rec: Mutex::new(Recorder::default()),
        trace: Trace::new(),
        t0,
        started,
        pool: Mutex::new(Vec::new()),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        phase: Mutex::new("start".into()),
        fault_events: Mutex::new(BTreeMap::new()),
        stop_faults: AtomicBool::new(false),
        next_name: AtomicUsize::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler_task = tokio::spawn(sampler(s.clone(), stop.clone()));
    let progress_task = tokio::spawn(progress(s.clone(), stop.clone(), quiet));
    let faults_task = tokio::spawn(fault_driver(s.clone(), sc.clone()));
    let mut phases = Vec::new();
    for (i, p) in sc.phases.iter().enumerate() {
        let (t, w0, n) = (
            Instant::now(),
            wall::now_s(),
            s.done.load(Ordering::Relaxed),
        );
        run_phase(&s, &sc, i, p).await;
        let took = (Instant::now() - t).as_secs_f64();
        let wall_s = wall::now_s() - w0;
        let ran = s.done.load(Ordering::Relaxed) - n;
        if !quiet {
            eprintln!(
                "  [{:>8.1} s sim {:>7.1} s wall] phase {} ({}) done: {ran} operations in \
                 {took:.1} s simulated, {wall_s:.1} s wall",
                (Instant::now() - t0).as_secs_f64(),
                wall::now_s() - started,
                i + 1,
                p.name()
            );
        }
        phases.push(PhaseFigures {
            name: p.name().to_string(),
            sim_s: took,
            wall_s,
            operations: ran,
        });
    }
    // Faults off, everything healed, then settle and check.
    *lock(&s.phase) = "settle".into();
    s.stop_faults.store(true, Ordering::Relaxed);
    let _ = faults_task.await;
    s.w.faults.set_rates(FaultRates::default());
    s.w.store_faults.set_rates(StoreFaultRates::default());
    let wire = stratus_sim_world::wire_faults_fired();
    stratus_sim_world::set_wire_faults(WireFaults::default());
    let mut checks = Vec::new();
    let settle_max = Duration::from_secs_f64(sc.checks.settle_s);
    let settled = settle_all(&s.w, settle_max).await;
    checks.push(Check {
        name: "settled".into(),
        ok: settled.is_ok(),
        detail: match &settled {
            Ok(d) => format!(
                "quiescent, hosts reconnected, after {:.1} s simulated",
                d.as_secs_f64()
            ),
            Err(e) => e.clone(),
        },
    });
    if sc.checks.invariants {
        // State sync repairs what faults left behind (a copy on the wrong host, an orphan) at
        // the hosts' pings; a repair that needs a host which was down or busy waits for the
        // next one. The invariants must hold within SYNC_ROUNDS ping cycles after settling.
        let mut bad = check(&s.w).await;
        let mut rounds = 0;
        while !bad.is_empty() && rounds < SYNC_ROUNDS {
            rounds += 1;
            sync_cycle(&s.w).await;
            let _ = s.w.settle(settle_max).await;
            bad = check(&s.w).await;
        }
        // A volume state sync marked Lost during the run lost its data, even if the churn
        // deleted it before this check could see it.
        let lost =
            s.w.repairs
                .snapshot()
                .get("volume.lost")
                .copied()
                .unwrap_or(0);
        if lost > 0 {
            bad.push(format!(
                "state sync marked {lost} volume(s) Lost during the run: their data is gone"
            ));
        }
        checks.push(Check {
            name: "invariants".into(),
            ok: bad.is_empty(),
            detail: if bad.is_empty() {
                format!(
                    "capacity, addresses, storage, database = hosts: all hold ({})",
                    match rounds {
                        0 => "at once".to_string(),
                        n => format!("after {n} more ping cycle(s) of state sync"),
                    }
                )
            } else {
                let mut d: Vec<String> = bad.iter().take(20).cloned().collect();
                if bad.len() > 20 {
                    d.push(format!("… {} more", bad.len() - 20));
                }
                d.join("\n")
            },
        });
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler_task.await;
    let _ = progress_task.await;
    let sim_time = Instant::now() - t0;
    let vms_at_end = s.w.db.count(&Query::new("vm")).await.unwrap_or(0);
    let rec = std::mem::take(&mut *lock(&s.rec));
    let summaries = rec.summaries();
    for (op, limit) in &sc.checks.p99_s {
        let (ok, detail) = match summaries.get(op) {
            Some(o) if o.ok > 0 => (
                o.p99_s <= *limit,
                format!(
                    "p99 {:.3} s (limit {limit} s) over {} operations",
                    o.p99_s, o.ok
                ),
            ),
            _ => (false, format!("no successful {op} operation to measure")),
        };
        checks.push(Check {
            name: format!("p99 {op}"),
            ok,
            detail,
        });
    }
    let (ok, failed) = rec.total();
    let frac = failed as f64 / (ok + failed).max(1) as f64;
    checks.push(Check {
        name: "failed operations".into(),
        ok: frac <= sc.checks.max_failed_fraction,
        detail: format!(
            "{failed} of {} ({:.2} %, limit {:.2} %)",
            ok + failed,
            frac * 100.0,
            sc.checks.max_failed_fraction * 100.0
        ),
    });
    let mut faults: BTreeMap<String, u64> = lock(&s.fault_events).clone();
    for (k, n) in s.w.faults.fired() {
        faults.insert(format!("agent:{k}"), n);
    }
    for (k, n) in s.w.store_faults.fired() {
        faults.insert(k.to_string(), n);
    }
    for (k, n) in [("wire_duplicated", wire.0), ("wire_held", wire.1)] {
        if n > 0 {
            faults.insert(k.to_string(), n);
        }
    }
    s.trace.record(
        sim_time.as_nanos(),
        &format!("end vms={vms_at_end} ok={ok} failed={failed}"),
    );
    RunOutput {
        recorder: rec,
        checks,
        faults,
        repairs: s.w.repairs.snapshot(),
        sim_time,
        hosts,
        vms_at_end,
        trace_hash: s.trace.hash(),
        build_wall_s: built - started,
        phases,
    }
}

/// Ping cycles after settling within which state sync must have repaired what faults left.
const SYNC_ROUNDS: u32 = 2;

/// Wait one ping interval (at least 25 s, for the hosts' reconnects to finish) and then some:
/// every host has reported its VMs and volumes to state sync once.
async fn sync_cycle(w: &World) {
    let ping = w.spec.ping_interval();
    tokio::time::sleep(ping.max(Duration::from_secs(25)) + Duration::from_secs(5)).await;
}

/// Settle, wait for every host to be connected again, a ping cycle, settle again.
async fn settle_all(w: &World, max: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    w.settle(max)
        .await
        .map_err(|b| format!("not quiescent: {b}"))?;
    loop {
        let down =
            w.db.count(&Query::new("host").ne("status", "Connected"))
                .await
                .unwrap_or(u64::MAX);
        if down == 0 {
            break;
        }
        if t.elapsed() > max {
            return Err(format!("{down} hosts not connected again"));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // A ping cycle for the hosts' VM lists to reach state sync, then quiet again.
    sync_cycle(w).await;
    w.settle(max)
        .await
        .map_err(|b| format!("not quiescent after reconnects: {b}"))?;
    Ok(t.elapsed())
}
