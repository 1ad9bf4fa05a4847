//! Hosts: add (agent connect), the ping tracker (disconnect after repeated failures, automatic
//! reconnect, VM state sync on every ping), enable / disable / maintenance, delete.

use super::cascade::SimpleParticipant;
use super::storage::SyncLocalStorage;
use super::vm::{MigrateVm, StopVm, SyncHostVms};
use super::{check_name, Cloud};
use crate::agent::{AgentClient, HostTarget};
use crate::bus::{Bus, Message};
use crate::cascade::CascadeParticipant;
use crate::config::ConfigDef;
use crate::error::{Error, ErrorCode};
use crate::extension::HostInfo;
use crate::model::*;
use async_trait::async_trait;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_agent_protocol::{AgentAddress, CommandKind, ConnectCmd, HostFacts, PingCmd};
use stratus_store::ErrorClass;
use stratus_store::{Batch, Db, Expect, Millis, Query, Row, Update, Value};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub static PING_INTERVAL: ConfigDef = ConfigDef::duration(
    "host.ping.interval",
    "How often each connected host is pinged (and a disconnected one retried)",
    "60s",
    1_000,
    3_600_000,
);
pub static PING_TIMEOUT: ConfigDef = ConfigDef::duration(
    "host.ping.timeout",
    "How long a ping may take before it counts as failed",
    "10s",
    100,
    600_000,
);
pub static PING_FAILURES: ConfigDef = ConfigDef::int(
    "host.ping.max_failures",
    "Consecutive failed pings before a host is Disconnected",
    "3",
    1,
    100,
);

pub fn config_defs() -> Vec<&'static ConfigDef> {
    vec![&PING_INTERVAL, &PING_TIMEOUT, &PING_FAILURES]
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddHost {
    pub cluster_uuid: Uuid,
    pub name: String,
    /// `IP:PORT` of the host's agent (port 7070 when omitted).
    pub address: String,
    /// The token the agent was installed with.
    pub token: String,
    /// Filled in by the API so the message goes to the host's owner.
    #[serde(default)]
    pub uuid: Option<Uuid>,
}
impl Message for AddHost {
    type Reply = Row<Host>;
    const NAME: &'static str = "host.add";
    fn routing_key(&self) -> Option<Uuid> {
        self.uuid
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconnectHost {
    pub uuid: Uuid,
}
impl Message for ReconnectHost {
    type Reply = Row<Host>;
    const NAME: &'static str = "host.reconnect";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

stratus_store::text_enum! {
    pub enum HostAction {
        Enable = "enable",
        Disable = "disable",
        /// Move VMs away (or stop them when nowhere fits), then enter Maintenance.
        Maintenance = "maintenance",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeHostState {
    pub uuid: Uuid,
    pub action: HostAction,
}
impl Message for ChangeHostState {
    type Reply = Row<Host>;
    const NAME: &'static str = "host.change-state";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

/// Start tracking hosts this node owns (at start, and after membership changes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrackOwnedHosts;
impl Message for TrackOwnedHosts {
    type Reply = usize;
    const NAME: &'static str = "host.track-owned";
}

fn host_queue(host: Uuid) -> String {
    format!("host-{host}")
}

/// The ping loops of the hosts this node owns.
#[derive(Default)]
pub struct Tracker {
    loops: Mutex<HashMap<Uuid, JoinHandle<()>>>,
}

impl Tracker {
    pub fn new() -> Self {
        Tracker::default()
    }

    pub fn tracking(&self) -> usize {
        self.loops.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Start the ping loop of `host` (no-op when running).
    pub fn track(&self, cloud: &Arc<Cloud>, host: Uuid) {
        let mut loops = self.loops.lock().unwrap_or_else(|e| e.into_inner());
        if loops.get(&host).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let weak = Arc::downgrade(cloud);
        loops.insert(host, tokio::spawn(ping_loop(weak, host)));
    }

    pub fn untrack(&self, host: Uuid) {
        if let Some(h) = self
            .loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&host)
        {
            h.abort();
        }
    }
}

fn info(h: &Row<Host>) -> HostInfo {
    HostInfo {
        uuid: h.uuid,
        name: h.name.clone(),
        address: h.address.clone(),
        cluster: h.cluster_uuid,
    }
}

fn normalize_address(a: &str) -> Result<String, Error> {
    AgentAddress::parse(a)
        .map(|a| a.to_string())
        .map_err(|e| Error::invalid(e.to_string()))
}

async fn publish_status(c: &Cloud, h: &Row<Host>, old: HostStatus, new: HostStatus) {
    c.bus().publish(
        "/host/status/change",
        || serde_json::json!({"uuid": h.uuid, "old": old.as_str(), "new": new.as_str()}),
    );
}

/// Connect (or reconnect) to the agent and bring the host row, its local storage and its VMs in
/// line with what the agent reports. Runs in the host's queue.
async fn connect(c: &Arc<Cloud>, host: Uuid) -> Result<Row<Host>, Error> {
    let h = c.get::<Host>(host).await?;
    let target = HostTarget::new(h.uuid, &h.address, &h.token)?;
    let facts: HostFacts = c
        .agents
        .call(
            &target,
            &ConnectCmd {
                host_uuid: h.uuid,
                report_url: c.report_url(),
            },
            AgentClient::timeout(&c.engine.config, CommandKind::Connect),
        )
        .await?;
    c.engine.ext.host_connected(&info(&h)).await?;
    c.db()
        .commit(
            Batch::new().update(
                Update::of::<Host>(host)
                    .set("status", HostStatus::Connected.as_str())
                    .set("hypervisor", facts.hypervisor.clone())
                    .set("cpu_cores", facts.cpu_cores as i64)
                    .set("memory_mib", facts.memory_mib as i64)
                    .set("disk_mib", facts.disk_mib as i64)
                    .set("ping_failures", 0i64)
                    .set("last_seen_ms", Value::Time(stratus_rt::clock::now_ms())),
            ),
        )
        .await?;
    c.bus().send(SyncLocalStorage { host_uuid: host }).await?;
    let now = c.get::<Host>(host).await?;
    if h.status != HostStatus::Connected {
        publish_status(c, &now, h.status, HostStatus::Connected).await;
    }
    c.bus()
        .send(SyncHostVms {
            host,
            vms: facts.vms,
            volumes: facts.volumes.into_iter().map(|v| v.uuid).collect(),
            full: true,
        })
        .await?;
    Ok(now)
}

/// Mark a host Disconnected (its VMs become Unknown).
async fn disconnect(c: &Arc<Cloud>, host: Uuid, why: &str) -> Result<(), Error> {
    let h = c.get::<Host>(host).await?;
    if h.status == HostStatus::Disconnected {
        return Ok(());
    }
    c.db()
        .commit(
            Batch::new()
                .update(Update::of::<Host>(host).set("status", HostStatus::Disconnected.as_str())),
        )
        .await?;
    tracing::info!(%host, why, "host disconnected");
    c.engine.ext.host_disconnected(&info(&h)).await;
    publish_status(c, &h, h.status, HostStatus::Disconnected).await;
    c.bus()
        .send(SyncHostVms {
            host,
            vms: Vec::new(),
            volumes: Vec::new(),
            full: false,
        })
        .await?;
    Ok(())
}

/// One host's tracker: ping while connected, retry while not.
async fn ping_loop(weak: std::sync::Weak<Cloud>, host: Uuid) {
    // Spread the first ping over the interval so hosts do not ping in lockstep.
    let first = {
        let Some(c) = weak.upgrade() else { return };
        let every: Duration = c.engine.config.get(&PING_INTERVAL.key());
        let ms = every.as_millis().max(1) as u64;
        Duration::from_millis(c.engine.ids.with_rng(|r| r.gen_range(0..ms)))
    };
    tokio::time::sleep(first).await;
    loop {
        let Some(c) = weak.upgrade() else { return };
        let every: Duration = c.engine.config.get(&PING_INTERVAL.key());
        // Boxed: the loop lives as long as the host, a ping only while it runs (an unboxed
        // ping made every host's loop hold a whole ping's state for good; docs/perf-log.md).
        match Box::pin(ping_once(&c, host)).await {
            Ok(true) => {}
            Ok(false) => {
                c.tracker.untrack(host);
                return;
            }
            Err(e) => tracing::debug!(%host, error = %e, "ping round failed"),
        }
        drop(c);
        tokio::time::sleep(every).await;
    }
}

/// One ping (or reconnect attempt). Ok(false): the host is gone; stop tracking it.
async fn ping_once(c: &Arc<Cloud>, host: Uuid) -> Result<bool, Error> {
    // The fields a ping needs, not the whole row (every host's, every interval).
    let read = |r: &stratus_store::Record| {
        Ok((
            r.decode::<HostStatus>("status")?,
            r.decode::<i64>("ping_failures")?,
            super::agent_access(r)?,
        ))
    };
    let Some((status, ping_failures, (address, token))) =
        c.db().peek::<Host, _>(host, read).await?
    else {
        return Ok(false);
    };
    if !c.bus().owns(&host) {
        return Ok(false);
    }
    if status != HostStatus::Connected {
        let r = c
            .engine
            .queues
            .run(&host_queue(host), 1, connect(c, host))
            .await;
        if let Err(e) = r {
            tracing::debug!(%host, error = %e, "reconnect failed");
        }
        return Ok(true);
    }
    let target = HostTarget::new(host, &address, &token)?;
    let timeout: Duration = c.engine.config.get(&PING_TIMEOUT.key());
    let reply = c
        .agents
        .call(
            &target,
            &PingCmd {
                host_uuid: host,
                report_url: c.report_url(),
            },
            timeout,
        )
        .await;
    match reply {
        Ok(p) if p.host_uuid == Some(host) => {
            c.db()
                .commit(
                    Batch::new().update(
                        Update::of::<Host>(host)
                            .if_exists()
                            .set("ping_failures", 0i64)
                            .set("last_seen_ms", Value::Time(stratus_rt::clock::now_ms())),
                    ),
                )
                .await?;
            c.bus()
                .send(SyncHostVms {
                    host,
                    vms: p.vms,
                    volumes: p.volumes,
                    full: true,
                })
                .await?;
        }
        Ok(_) => {
            // The agent restarted (it no longer knows who it is): connect again.
            let r = c
                .engine
                .queues
                .run(&host_queue(host), 1, connect(c, host))
                .await;
            if let Err(e) = r {
                tracing::debug!(%host, error = %e, "reconnect after agent restart failed");
            }
        }
        Err(e) => {
            let max: i64 = c.engine.config.get(&PING_FAILURES.key());
            let failures = ping_failures + 1;
            c.db()
                .commit(
                    Batch::new().update(
                        Update::of::<Host>(host)
                            .if_exists()
                            .set("ping_failures", failures),
                    ),
                )
                .await?;
            if failures >= max {
                let why = format!("{failures} pings failed; last: {e}");
                c.engine
                    .queues
                    .run(&host_queue(host), 1, disconnect(c, host, &why))
                    .await?;
            }
        }
    }
    Ok(true)
}

/// Deleting a host: refused while VMs use it (without force); forced, its VMs go first (they are
/// its cascade children). The row, its local storage shares and its tracker go.
struct HostParticipant {
    db: Db,
    bus: Bus,
}

#[async_trait]
impl CascadeParticipant for HostParticipant {
    fn kind(&self) -> &'static str {
        "host"
    }
    fn parents(&self) -> &'static [&'static str] {
        &["cluster"]
    }
    async fn children(&self, _pk: &str, parent: Uuid) -> Result<Vec<Uuid>, Error> {
        crate::cascade::children_by_field(&self.db, "host", "cluster_uuid", parent).await
    }
    async fn delete(&self, uuid: Uuid) -> Result<(), Error> {
        // The host's storage shares go in the same commit: the cascade deleted them before, but
        // a host reconnecting meanwhile makes its share again (under the same uuid), and a share
        // is only made while its host exists (`ensure_local_storage`).
        let shares = self
            .db
            .select::<LocalStorage>(&Query::of::<LocalStorage>().eq("host_uuid", uuid))
            .await?;
        let batch = shares
            .iter()
            .fold(Batch::new().delete::<Host>(uuid, Expect::Maybe), |b, s| {
                b.delete::<LocalStorage>(s.uuid, Expect::Maybe)
            });
        self.db.commit(batch).await?;
        self.bus
            .publish("/host/deleted", || serde_json::json!({"uuid": uuid}));
        Ok(())
    }
}

pub fn participants(db: &Db, bus: &Bus) -> Vec<Arc<dyn CascadeParticipant>> {
    vec![
        Arc::new(HostParticipant {
            db: db.clone(),
            bus: bus.clone(),
        }),
        SimpleParticipant::new(db, "reservation", &["host"], &[("host", "host_uuid")]).arc(),
    ]
}

async fn add_host(c: &Arc<Cloud>, m: AddHost) -> Result<Row<Host>, Error> {
    check_name("host", &m.name)?;
    let cluster = c.get::<Cluster>(m.cluster_uuid).await?;
    let address = normalize_address(&m.address)?;
    if m.token.trim().is_empty() {
        return Err(Error::invalid(
            "token must not be empty (the agent's token)",
        ));
    }
    let uuid = m.uuid.unwrap_or_else(|| c.engine.ids.uuid());
    let row = Row::new(
        uuid,
        Host {
            name: m.name,
            zone_uuid: cluster.zone_uuid,
            cluster_uuid: cluster.uuid,
            address: address.clone(),
            token: m.token,
            state: HostState::Enabled,
            status: HostStatus::Connecting,
            hypervisor: None,
            cpu_cores: 0,
            memory_mib: 0,
            disk_mib: 0,
            cpu_used: 0,
            memory_used_mib: 0,
            ping_failures: 0,
            last_seen_ms: None::<Millis>,
        },
    );
    match c.db().insert(row).await {
        Ok(_) => {}
        Err(e) if e.class() == ErrorClass::AlreadyExists => {
            let other = c
                .db()
                .select::<Host>(&Query::of::<Host>().eq("address", address.as_str()))
                .await?;
            return Err(Error::new(
                ErrorCode::AlreadyExists,
                match other.first() {
                    Some(o) => format!("host {} already has address {address}", o.uuid),
                    None => format!("host {uuid} already exists"),
                },
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let connected = c
        .engine
        .queues
        .run(&host_queue(uuid), 1, connect(c, uuid))
        .await;
    match connected {
        Ok(h) => {
            c.tracker.track(c, uuid);
            Ok(h)
        }
        Err(e) => {
            // Adding failed: leave nothing behind.
            let cleanup = Batch::new().delete::<Host>(uuid, Expect::Maybe);
            let shares = c
                .db()
                .select::<LocalStorage>(&Query::of::<LocalStorage>().eq("host_uuid", uuid))
                .await?;
            let cleanup = shares.iter().fold(cleanup, |b, s| {
                b.delete::<LocalStorage>(s.uuid, Expect::Maybe)
            });
            c.db().commit(cleanup).await?;
            Err(e.context(format!("cannot add host at {address}")))
        }
    }
}

/// Maintenance: every running VM migrates away (or stops when nowhere fits), then the host is in
/// Maintenance. Runs in the host's queue.
async fn maintenance(c: &Arc<Cloud>, host: Uuid) -> Result<(), Error> {
    c.db()
        .commit(
            Batch::new()
                .update(Update::of::<Host>(host).set("state", HostState::PreMaintenance.as_str())),
        )
        .await?;
    c.bus().publish(
        "/host/state/change",
        || serde_json::json!({"uuid": host, "new": "PreMaintenance"}),
    );
    let vms = c
        .db()
        .select::<Vm>(
            &Query::of::<Vm>()
                .eq("host_uuid", host)
                .eq("state", VmState::Running.as_str()),
        )
        .await?;
    for vm in vms {
        let moved = c
            .bus()
            .send(MigrateVm {
                uuid: vm.uuid,
                host_uuid: None,
            })
            .await;
        if let Err(e) = moved {
            tracing::info!(vm = %vm.uuid, error = %e, "cannot migrate for maintenance; stopping");
            c.bus()
                .send(StopVm {
                    uuid: vm.uuid,
                    force: true,
                })
                .await
                .map_err(|e| e.context(format!("vm {} could neither migrate nor stop", vm.uuid)))?;
        }
    }
    c.db()
        .commit(
            Batch::new()
                .update(Update::of::<Host>(host).set("state", HostState::Maintenance.as_str())),
        )
        .await?;
    c.bus().publish(
        "/host/state/change",
        || serde_json::json!({"uuid": host, "new": "Maintenance"}),
    );
    Ok(())
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: AddHost| async move { add_host(&c, m).await })?;
    cloud.handle(|c: Arc<Cloud>, m: ReconnectHost| async move {
        let _ = c.get::<Host>(m.uuid).await?;
        let h = c
            .engine
            .queues
            .run(&host_queue(m.uuid), 1, connect(&c, m.uuid))
            .await?;
        c.tracker.track(&c, m.uuid);
        Ok(h)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: ChangeHostState| async move {
        let h = c.get::<Host>(m.uuid).await?;
        let queue = host_queue(m.uuid);
        match m.action {
            HostAction::Enable | HostAction::Disable => {
                let new = if m.action == HostAction::Enable {
                    HostState::Enabled
                } else {
                    HostState::Disabled
                };
                if h.state == HostState::PreMaintenance {
                    return Err(Error::new(
                        ErrorCode::InvalidState,
                        format!("host {} is entering maintenance", h.uuid),
                    ));
                }
                c.engine
                    .queues
                    .run(&queue, 1, async {
                        c.db()
                            .commit(
                                Batch::new()
                                    .update(Update::of::<Host>(m.uuid).set("state", new.as_str())),
                            )
                            .await
                            .map_err(Error::from)
                    })
                    .await?;
                c.bus().publish(
                    "/host/state/change",
                    || serde_json::json!({"uuid": m.uuid, "new": new.as_str()}),
                );
            }
            HostAction::Maintenance => {
                if h.state == HostState::Maintenance {
                    return c.get::<Host>(m.uuid).await;
                }
                if h.status != HostStatus::Connected {
                    return Err(Error::new(
                        ErrorCode::InvalidState,
                        format!(
                            "host {} is {}; connect it before maintenance",
                            h.uuid, h.status
                        ),
                    ));
                }
                c.engine
                    .queues
                    .run(&queue, 1, maintenance(&c, m.uuid))
                    .await?;
            }
        }
        c.get::<Host>(m.uuid).await
    })?;
    cloud.handle(|c: Arc<Cloud>, _m: TrackOwnedHosts| async move {
        let hosts = c.db().select::<Host>(&Query::of::<Host>()).await?;
        let mut n = 0;
        for h in hosts {
            if c.bus().owns(&h.uuid) {
                c.tracker.track(&c, h.uuid);
                n += 1;
            }
        }
        Ok(n)
    })?;
    // Deleted hosts stop being tracked on every node.
    let mut deleted = cloud.bus().subscribe("/host/deleted")?;
    let weak = Arc::downgrade(cloud);
    tokio::spawn(async move {
        while let Some(ev) = deleted.recv().await {
            let Some(c) = weak.upgrade() else { break };
            if let Some(h) = ev.data["uuid"]
                .as_str()
                .and_then(|u| Uuid::parse_str(u).ok())
            {
                c.tracker.untrack(h);
            }
        }
    });
    Ok(())
}
