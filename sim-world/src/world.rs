//! A simulated datacenter inside one seeded madsim runtime: the real management node (its own
//! madsim node; its database outside it, like a database server), one madsim node per host
//! running the real agent server on the simulated hypervisor, and a client node that drives
//! the REST API.
//!
//! [`World::run`] builds the runtime from the spec's seed, starts everything, builds the
//! resource tree through the API, then runs the test body on the client node.

use crate::faults::SimFaults;
use crate::hypervisor::{HostProfile, LatencyProfile, SimHostState, SimHypervisor};
use crate::store_faults::FaultyStore;
use madsim::runtime::{Handle, NodeHandle, Runtime};
use serde_json::{json, Value};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_core::auth::{Auth, ADMIN};
use stratus_core::client::StratusClient;
use stratus_core::error::Error;
use stratus_core::extension::Extensions;
use stratus_core::flow::FaultPoints;
use stratus_core::ids::Ids;
use stratus_core::model::{self, VmState, VolumeState};
use stratus_core::node::{ManagementNode, NodeConfig};
use stratus_core::services::vm::SyncRepairs;
use stratus_kvm_agent::{Agent, AgentConfig};
use stratus_store::{Db, MemStore, Query};
use uuid::Uuid;

pub const MGMT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const API_PORT: u16 = 8080;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

/// What the datacenter looks like.
#[derive(Debug, Clone)]
pub struct WorldSpec {
    pub seed: u64,
    pub zones: usize,
    pub clusters_per_zone: usize,
    pub hosts_per_cluster: usize,
    pub host: HostProfile,
    pub latency: LatencyProfile,
    /// Addresses in each zone's L3 range.
    pub ips_per_zone: u32,
    pub image_mib: i64,
    /// Instance offerings: (name, cpu, memory MiB).
    pub offerings: Vec<(String, i64, i64)>,
    pub disk_offering_mib: i64,
    /// Global config set before hosts are added (name, value).
    pub config: Vec<(String, String)>,
    /// Hosts added at once while building.
    pub add_concurrency: usize,
    /// Hosts that run (agent up) but are not added; [`World::add_host`] adds one.
    pub spare_hosts: usize,
    /// The management node's plugins (none by default).
    pub extensions: Arc<Extensions>,
    /// Hosts' clocks differ from the management node's by up to this much, each by its own
    /// amount drawn from the seed (ahead or behind).
    pub clock_skew_ms: u64,
}

impl WorldSpec {
    /// How often hosts are pinged (and their VMs and volumes reach state sync): the last
    /// `host.ping.interval` in [`WorldSpec::config`], else the product default.
    pub fn ping_interval(&self) -> Duration {
        self.duration(&stratus_core::services::host::PING_INTERVAL)
    }

    /// Two ping intervals plus a ping timeout: by then every connected host has been pinged
    /// and a host that stopped answering has had a failed ping counted.
    pub fn ping_cycle(&self) -> Duration {
        2 * self.ping_interval() + self.duration(&stratus_core::services::host::PING_TIMEOUT)
    }

    /// A duration setting: the last value for it in [`WorldSpec::config`], else its default.
    fn duration(&self, def: &stratus_core::config::ConfigDef) -> Duration {
        let v = self
            .config
            .iter()
            .rev()
            .find(|(k, _)| k == def.name)
            .map_or(def.default, |(_, v)| v.as_str());
        stratus_core::config::parse_duration(v)
            .or_else(|| stratus_core::config::parse_duration(def.default))
            .unwrap_or_default()
    }
}

impl Default for WorldSpec {
    fn default() -> Self {
        WorldSpec {
            seed: 1,
            zones: 1,
            clusters_per_zone: 1,
            hosts_per_cluster: 4,
            host: HostProfile {
                cpu_cores: 16,
                memory_mib: 65_536,
                disk_mib: 2_000_000,
            },
            latency: LatencyProfile::default(),
            ips_per_zone: 1000,
            image_mib: 10_240,
            offerings: vec![
                ("small".into(), 1, 1024),
                ("medium".into(), 2, 4096),
                ("huge".into(), 512, 1 << 24),
            ],
            disk_offering_mib: 20_480,
            config: vec![
                ("host.ping.interval".into(), "10s".into()),
                ("host.ping.timeout".into(), "5s".into()),
                ("agent.timeout.vm_start".into(), "60s".into()),
                ("agent.timeout.vm_stop".into(), "60s".into()),
                ("agent.timeout.vm_destroy".into(), "60s".into()),
                ("agent.timeout.vm_migrate".into(), "60s".into()),
                ("agent.timeout.vm_reboot".into(), "60s".into()),
                ("agent.timeout.vm_receive".into(), "60s".into()),
                ("agent.timeout.volume_attach".into(), "60s".into()),
                ("agent.timeout.volume_detach".into(), "60s".into()),
                ("agent.timeout.volume_create".into(), "60s".into()),
                ("agent.timeout.volume_delete".into(), "60s".into()),
            ],
            add_concurrency: 64,
            spare_hosts: 0,
            extensions: Extensions::builder().build(),
            clock_skew_ms: 0,
        }
    }
}

/// Uuids of what the builder created in one zone.
#[derive(Debug, Clone)]
pub struct ZoneRefs {
    pub zone: Uuid,
    pub clusters: Vec<Uuid>,
    pub l2: Uuid,
    pub l3: Uuid,
    pub ps: Uuid,
    /// First and last address of the L3's range.
    pub ip_range: (Ipv4Addr, Ipv4Addr),
}

#[derive(Debug, Clone)]
pub struct Datacenter {
    pub zones: Vec<ZoneRefs>,
    pub bs: Uuid,
    pub image: Uuid,
    /// Instance offerings by name.
    pub offerings: Vec<(String, Uuid)>,
    pub disk_offering: Uuid,
}

impl Datacenter {
    pub fn offering(&self, name: &str) -> Uuid {
        self.offerings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, u)| *u)
            .unwrap_or_else(|| panic!("no offering {name}"))
    }
}

/// One simulated host.
#[derive(Clone)]
pub struct SimHost {
    pub ip: Ipv4Addr,
    pub token: String,
    pub state: Arc<Mutex<SimHostState>>,
    pub hypervisor: Arc<Mutex<Option<SimHypervisor>>>,
    pub node: madsim::task::NodeId,
    pub cluster: Uuid,
    /// Set once added.
    pub uuid: Option<Uuid>,
}

impl SimHost {
    pub fn state(&self) -> std::sync::MutexGuard<'_, SimHostState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The simulated datacenter and the handles to drive it.
pub struct World {
    pub spec: WorldSpec,
    pub store: Arc<MemStore>,
    pub db: Db,
    pub client: StratusClient,
    /// Accounts made with [`World::tenant`] and a client acting as each.
    pub tenants: Vec<(Uuid, StratusClient)>,
    pub mgmt: madsim::task::NodeId,
    pub hosts: Vec<SimHost>,
    pub faults: Arc<SimFaults>,
    pub flow_faults: Arc<FaultPoints>,
    /// State sync's corrections, counted across restarts of the management node.
    pub repairs: Arc<SyncRepairs>,
    /// The management node's store, in front of [`World::store`]: its commits can be made to
    /// fail.
    pub store_faults: Arc<FaultyStore>,
    pub dc: Datacenter,
}

/// Host `i`'s clock offset, drawn from the seed within [`WorldSpec::clock_skew_ms`].
fn clock_offset(spec: &WorldSpec, i: usize) -> i64 {
    use rand::{Rng, SeedableRng};
    if spec.clock_skew_ms == 0 {
        return 0;
    }
    let skew = spec.clock_skew_ms as i64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed ^ 0xc10c_5eed ^ i as u64);
    rng.gen_range(-skew..=skew)
}

fn host_ip(i: usize) -> Ipv4Addr {
    let n = i as u32 + 1;
    Ipv4Addr::new(10, 1 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// What every simulated host node is started with.
#[derive(Clone)]
struct HostEnv {
    latency: LatencyProfile,
    faults: Arc<SimFaults>,
    /// Agents that started listening (each restart counts again).
    listening: Arc<AtomicUsize>,
}

fn start_host_node(
    h: &Handle,
    ip: Ipv4Addr,
    token: String,
    state: Arc<Mutex<SimHostState>>,
    env: HostEnv,
    slot: Arc<Mutex<Option<SimHypervisor>>>,
) -> NodeHandle {
    h.create_node()
        .name(ip.to_string())
        .ip(ip.into())
        .init(move || {
            let (token, state, env, slot) =
                (token.clone(), state.clone(), env.clone(), slot.clone());
            async move {
                let seed: u64 = madsim::rand::random();
                let offset = state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clock_offset_ms;
                let hv = SimHypervisor::new(state, env.latency, seed);
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(hv.clone());
                let mut config = AgentConfig::new(token);
                config.clock_offset_ms = offset;
                let agent = Agent::new(hv, config, env.faults);
                agent
                    .serve(SocketAddr::new(
                        ip.into(),
                        stratus_agent_protocol::AGENT_PORT,
                    ))
                    .await
                    .expect("agent listens");
                env.listening.fetch_add(1, Ordering::Relaxed);
                // A madsim node exits when its init task returns.
                std::future::pending::<()>().await;
            }
        })
        .build()
}

fn start_mgmt_node(
    h: &Handle,
    store: Arc<FaultyStore>,
    faults: Arc<FaultPoints>,
    repairs: Arc<SyncRepairs>,
    extensions: Arc<Extensions>,
) -> NodeHandle {
    h.create_node()
        .name("mgmt")
        .ip(MGMT_IP.into())
        .init(move || {
            let (store, faults, extensions) = (store.clone(), faults.clone(), extensions.clone());
            let repairs = repairs.clone();
            async move {
                let mut cfg = NodeConfig::new(
                    Uuid::from_u128(0x5157_7a75),
                    SocketAddr::new(MGMT_IP.into(), API_PORT),
                );
                cfg.faults = Some(faults);
                cfg.repairs = Some(repairs);
                cfg.extensions = extensions;
                // Without the event log: its rows would grow with every change of a
                // 30,000-host run held in memory, and it gives each commit with events a turn.
                // The std-build API tests and the end-to-end run cover it.
                cfg.events = false;
                match ManagementNode::start(store, cfg).await {
                    Ok(_node) => std::future::pending::<()>().await,
                    Err(e) => panic!("management node failed to start: {e}"),
                }
            }
        })
        .build()
}

impl World {
    /// Build the runtime from `spec.seed`, the datacenter, and run `body` on the client node.
    pub fn run<F, Fut>(spec: WorldSpec, body: F)
    where
        F: FnOnce(World) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let rt = Runtime::with_seed_and_config(spec.seed, madsim::Config::default());
        rt.block_on(async move {
            let h = Handle::current();
            let client_node = h.create_node().name("client").ip(CLIENT_IP.into()).build();
            client_node
                .spawn(async move {
                    let world = World::boot(spec).await.expect("the datacenter builds");
                    body(world).await;
                })
                .await
                .expect("the test body ran");
        });
    }

    /// Start the nodes and build the resource tree (call on a node with an IP).
    pub async fn boot(spec: WorldSpec) -> Result<World, Error> {
        let h = Handle::current();
        tokio::spawn(sweep_task_lists());
        let mut schema = model::schema();
        schema.validate()?;
        let store = Arc::new(MemStore::new(std::mem::take(&mut schema)));
        let flow_faults = Arc::new(FaultPoints::default());
        let faults = Arc::new(SimFaults::new(spec.seed ^ 0x5eed));
        let extensions = spec.extensions.clone();
        let repairs = Arc::new(SyncRepairs::default());
        let store_faults = Arc::new(FaultyStore::new(store.clone(), spec.seed ^ 0x5707e));
        let mgmt = start_mgmt_node(
            &h,
            store_faults.clone(),
            flow_faults.clone(),
            repairs.clone(),
            extensions,
        )
        .id();
        // The harness acts as the admin, with a token it makes in the store (no password).
        let auth = Auth::new(
            Db::new(store.clone()),
            Arc::new(Ids::from_seed(spec.seed ^ 0xa5)),
        );
        auth.bootstrap_admin(None).await?;
        let admin = auth
            .issue_for(ADMIN, Duration::from_secs(10 * 365 * 86_400), "harness")
            .await?;
        let mut client =
            StratusClient::new(SocketAddr::new(MGMT_IP.into(), API_PORT)).with_token(&admin.token);
        client.wait = Duration::from_secs(3600);
        // Wait for the API.
        for _ in 0..100 {
            if client.get("/v1/health").await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (k, v) in &spec.config {
            client.set_config(k, v).await?;
        }
        let dc = build_tree(&client, &spec).await?;
        let mut hosts = Vec::new();
        let mut i = 0;
        let placed: Vec<Uuid> = dc
            .zones
            .iter()
            .flat_map(|z| {
                z.clusters
                    .iter()
                    .flat_map(|c| std::iter::repeat_n(*c, spec.hosts_per_cluster))
            })
            .chain(std::iter::repeat_n(
                dc.zones
                    .first()
                    .and_then(|z| z.clusters.first())
                    .copied()
                    .unwrap_or_default(),
                spec.spare_hosts,
            ))
            .collect();
        let env = HostEnv {
            latency: spec.latency.clone(),
            faults: faults.clone(),
            listening: Arc::default(),
        };
        {
            {
                for cl in &placed {
                    let ip = host_ip(i);
                    let token = format!("token-{i}");
                    let mut host = SimHostState::new(spec.host);
                    host.clock_offset_ms = clock_offset(&spec, i);
                    let state = Arc::new(Mutex::new(host));
                    let slot = Arc::new(Mutex::new(None));
                    let node = start_host_node(
                        &h,
                        ip,
                        token.clone(),
                        state.clone(),
                        env.clone(),
                        slot.clone(),
                    )
                    .id();
                    hosts.push(SimHost {
                        ip,
                        token,
                        state,
                        hypervisor: slot,
                        node,
                        cluster: *cl,
                        uuid: None,
                    });
                    i += 1;
                }
            }
        }
        // Add hosts once their agents listen. A node's first task runs when the executor picks
        // it, in random order, and every task it runs moves the clock on: at 100,000 hosts an
        // add reached an agent that had not started yet ("connection refused").
        while env.listening.load(Ordering::Relaxed) < hosts.len() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let db = Db::new(store.clone());
        let mut world = World {
            spec,
            store,
            db,
            client,
            tenants: Vec::new(),
            mgmt,
            hosts,
            faults,
            flow_faults,
            repairs,
            store_faults,
            dc,
        };
        world.add_hosts().await?;
        Ok(world)
    }

    fn add_host_request(&self, i: usize, cluster: Uuid) -> Value {
        let h = &self.hosts[i];
        json!({
            "cluster_uuid": cluster,
            "name": format!("host-{i}"),
            "address": format!("{}:7070", h.ip),
            "token": h.token,
        })
    }

    /// An account named `name` with quota `limits` (`{"vm_limit": 3, ...}`), made through the
    /// API, and a client acting as its one user (the user and its token are made in the store:
    /// no password to hash).
    pub async fn tenant(&self, name: &str, limits: Value) -> Result<(Uuid, StratusClient), Error> {
        let Value::Object(mut body) = limits else {
            return Err(Error::invalid(format!(
                "limits must be an object; got {limits}"
            )));
        };
        body.insert("name".into(), name.into());
        let body = Value::Object(body);
        let account = self.client.create("accounts", body).await?;
        let account = uuid(&account["uuid"]).ok_or_else(|| Error::internal("no account uuid"))?;
        let auth = Auth::new(
            self.db.clone(),
            Arc::new(Ids::from_seed(self.spec.seed ^ 0x7e)),
        );
        auth.create_user(name, account, None).await?;
        let t = auth
            .issue_for(name, Duration::from_secs(10 * 365 * 86_400), "harness")
            .await?;
        let mut c = StratusClient::new(self.client.addr()).with_token(&t.token);
        c.wait = self.client.wait;
        Ok((account, c))
    }

    /// Add host `i` (a spare, or one a cascade deleted) to `cluster` through the API.
    pub async fn add_host(&mut self, i: usize, cluster: Uuid) -> Result<Value, Error> {
        let v = self
            .client
            .create("hosts", self.add_host_request(i, cluster))
            .await?;
        self.hosts[i].uuid = uuid(&v["uuid"]);
        self.hosts[i].cluster = cluster;
        Ok(v)
    }

    /// Add every host but the spares through the API, `add_concurrency` at a time.
    async fn add_hosts(&mut self) -> Result<(), Error> {
        let n = self.hosts.len() - self.spec.spare_hosts.min(self.hosts.len());
        let mut next = 0;
        while next < n {
            let end = (next + self.spec.add_concurrency.max(1)).min(n);
            let mut tasks = Vec::new();
            for i in next..end {
                let c = self.client.clone();
                let body = self.add_host_request(i, self.hosts[i].cluster);
                tasks.push(tokio::spawn(async move { c.create("hosts", body).await }));
            }
            for (i, t) in tasks.into_iter().enumerate() {
                let v = t.await.map_err(|e| Error::internal(e.to_string()))??;
                self.hosts[next + i].uuid = uuid(&v["uuid"]);
            }
            next = end;
        }
        Ok(())
    }

    pub fn host_by_uuid(&self, u: Uuid) -> Option<&SimHost> {
        self.hosts.iter().find(|h| h.uuid == Some(u))
    }

    /// Body of a create-VM request with the datacenter's defaults.
    pub fn vm_request(&self, name: &str, offering: &str) -> Value {
        json!({
            "name": name,
            "instance_offering_uuid": self.dc.offering(offering),
            "image_uuid": self.dc.image,
            "l3_network_uuids": [self.dc.zones[0].l3],
        })
    }

    /// Create a VM and wait for it.
    pub async fn create_vm(&self, name: &str, offering: &str) -> Result<Value, Error> {
        self.client
            .create("vms", self.vm_request(name, offering))
            .await
    }

    // ---- faults

    pub fn kill_mgmt(&self) {
        Handle::current().kill(self.mgmt);
    }

    /// The management node stops running (a long GC pause, a frozen VM) without dying: its
    /// timers and connections wait, and all it was doing goes on at [`World::resume_mgmt`].
    pub fn pause_mgmt(&self) {
        Handle::current().pause(self.mgmt);
    }

    pub fn resume_mgmt(&self) {
        Handle::current().resume(self.mgmt);
    }

    /// The host's agent process restarts: its task table and the commands it was running are
    /// gone; the host's VMs keep running and its disks stay.
    pub fn restart_agent(&self, i: usize) {
        // Killed first: a restart alone keeps the node's sockets bound.
        let h = Handle::current();
        h.kill(self.hosts[i].node);
        h.restart(self.hosts[i].node);
    }

    /// The host's local disk fills up, until [`World::free_disk`].
    pub fn fill_disk(&self, i: usize) {
        self.hosts[i].state().fill_disk();
    }

    pub fn free_disk(&self, i: usize) {
        self.hosts[i].state().free_disk();
    }

    pub fn restart_mgmt(&self) {
        Handle::current().restart(self.mgmt);
    }

    /// The host loses power: its node dies and its VMs stop; its disks stay.
    pub fn crash_host(&self, i: usize) {
        Handle::current().kill(self.hosts[i].node);
        self.hosts[i].state().power_loss();
    }

    pub fn restart_host(&self, i: usize) {
        Handle::current().restart(self.hosts[i].node);
    }

    pub fn partition_host(&self, i: usize) {
        stratus_rt::http::clog_node(self.hosts[i].node);
    }

    pub fn heal_host(&self, i: usize) {
        stratus_rt::http::unclog_node(self.hosts[i].node);
    }

    /// A running VM crashes on its host (the agent reports it).
    pub fn crash_vm(&self, host: usize, vm: Uuid) -> bool {
        let hv = self.hosts[host]
            .hypervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        hv.is_some_and(|hv| hv.crash_vm(vm))
    }

    /// Wait until nothing is in flight: no running job, no journaled chain, no VM or volume in
    /// a transitional state, for two checks in a row. Err with what is still busy after `max`.
    pub async fn settle(&self, max: Duration) -> Result<Duration, String> {
        let start = tokio::time::Instant::now();
        let mut quiet = 0;
        loop {
            let busy = self.busy().await;
            if busy.is_empty() {
                quiet += 1;
                if quiet >= 2 {
                    return Ok(start.elapsed());
                }
            } else {
                quiet = 0;
            }
            if start.elapsed() >= max {
                return Err(busy.join("; "));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// What is still in flight (empty when quiet).
    pub async fn busy(&self) -> Vec<String> {
        let mut out = Vec::new();
        let db = &self.db;
        let n = |q: Query| async move { db.count(&q).await.unwrap_or(u64::MAX) };
        let jobs = n(Query::new("job").eq("state", "Running")).await;
        if jobs > 0 {
            out.push(format!("{jobs} jobs running"));
        }
        let chains = n(Query::new("flow_chain")).await;
        if chains > 0 {
            out.push(format!("{chains} chains journaled"));
        }
        let transitional: Vec<&str> = VmState::ALL
            .iter()
            .filter(|s| s.is_transitional())
            .map(|s| s.as_str())
            .collect();
        let vms = n(Query::new("vm").is_in("state", transitional.iter().copied())).await;
        if vms > 0 {
            out.push(format!("{vms} VMs in a transitional state"));
        }
        let vols = n(Query::new("volume").is_in(
            "state",
            [
                VolumeState::Creating.as_str(),
                VolumeState::Deleting.as_str(),
            ],
        ))
        .await;
        if vols > 0 {
            out.push(format!("{vols} volumes in a transitional state"));
        }
        out
    }
}

fn uuid(v: &Value) -> Option<Uuid> {
    v.as_str().and_then(|s| Uuid::parse_str(s).ok())
}

fn need(v: &Value) -> Result<Uuid, Error> {
    uuid(&v["uuid"]).ok_or_else(|| Error::internal(format!("no uuid in {v}")))
}

/// How often [`sweep_task_lists`] runs. Each sweep reads every node's list, which showed in
/// `datacenter-30k`'s profiles when it ran every few seconds; between two sweeps the records of
/// the tasks that ended stay allocated, a small part of that run's peak (docs/perf-log.md).
pub const TASK_LIST_SWEEP: Duration = Duration::from_secs(30);

/// madsim (0.2.34) keeps a `Weak` of every task a node ever spawned in that node's task list,
/// and drops the dead ones only when it is asked how many tasks there are (or when the node is
/// killed). A `Weak` keeps its task's record (id, name, span, where it was spawned) allocated,
/// so a run grew with every operation, to its end: with finished jobs purged, what kept growing
/// in a long `churn` was all task records (docs/perf-log.md). Asking every [`TASK_LIST_SWEEP`]
/// lets them go.
pub async fn sweep_task_lists() {
    loop {
        tokio::time::sleep(TASK_LIST_SWEEP).await;
        Handle::current().metrics().num_tasks();
    }
}

/// Zones, clusters, networks, storage, images and offerings through the API.
async fn build_tree(c: &StratusClient, spec: &WorldSpec) -> Result<Datacenter, Error> {
    let bs = need(
        &c.create(
            "backup-storages",
            json!({"name": "bs", "url": "sftp://bs/images", "total_mib": 10_000_000}),
        )
        .await?,
    )?;
    let image = need(
        &c.create(
            "images",
            json!({"bs_uuid": bs, "name": "linux", "url": "http://images/linux.qcow2", "format": "qcow2", "size_mib": spec.image_mib}),
        )
        .await?,
    )?;
    let mut offerings = Vec::new();
    for (name, cpu, mem) in &spec.offerings {
        let o = c
            .create(
                "instance-offerings",
                json!({"name": name, "cpu": cpu, "memory_mib": mem}),
            )
            .await?;
        offerings.push((name.clone(), need(&o)?));
    }
    let disk_offering = need(
        &c.create(
            "disk-offerings",
            json!({"name": "data", "size_mib": spec.disk_offering_mib}),
        )
        .await?,
    )?;
    let mut zones = Vec::new();
    let prefix = 32
        - (spec.ips_per_zone as u64 + 4)
            .next_power_of_two()
            .trailing_zeros()
            .max(2);
    for z in 0..spec.zones {
        let zone = need(
            &c.create("zones", json!({"name": format!("zone-{z}")}))
                .await?,
        )?;
        c.action(
            "backup-storages",
            bs,
            "attach-zone",
            json!({"zone_uuid": zone}),
        )
        .await?;
        let l2 = need(&c.create("l2-networks", json!({"zone_uuid": zone, "name": format!("l2-{z}"), "kind": "NoVlan", "physical_interface": "eth0"})).await?)?;
        let l3 = need(
            &c.create(
                "l3-networks",
                json!({"l2_uuid": l2, "name": format!("l3-{z}"), "dns": ["8.8.8.8"]}),
            )
            .await?,
        )?;
        let base = u32::from(Ipv4Addr::new(100 + z as u8, 64, 0, 0));
        let first = Ipv4Addr::from(base + 2);
        let last = Ipv4Addr::from(base + 1 + spec.ips_per_zone);
        c.create(
            "ip-ranges",
            json!({"l3_uuid": l3, "start_ip": first.to_string(), "end_ip": last.to_string(),
                   "gateway": Ipv4Addr::from(base + 1).to_string(), "prefix_len": prefix}),
        )
        .await?;
        let ps = need(
            &c.create(
                "primary-storages",
                json!({"zone_uuid": zone, "name": format!("local-{z}"), "url": "/var/lib/stratus"}),
            )
            .await?,
        )?;
        let mut clusters = Vec::new();
        for k in 0..spec.clusters_per_zone {
            let cl = need(
                &c.create(
                    "clusters",
                    json!({"zone_uuid": zone, "name": format!("cluster-{z}-{k}")}),
                )
                .await?,
            )?;
            c.action(
                "l2-networks",
                l2,
                "attach-cluster",
                json!({"cluster_uuid": cl}),
            )
            .await?;
            c.action(
                "primary-storages",
                ps,
                "attach-cluster",
                json!({"cluster_uuid": cl}),
            )
            .await?;
            clusters.push(cl);
        }
        zones.push(ZoneRefs {
            zone,
            clusters,
            l2,
            l3,
            ps,
            ip_range: (first, last),
        });
    }
    Ok(Datacenter {
        zones,
        bs,
        image,
        offerings,
        disk_offering,
    })
}
