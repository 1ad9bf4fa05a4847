//! The in-process services of a management node. Each owns its resource kinds, registers its
//! bus handlers and workflows at start, and is reached only through the bus (reads of other
//! kinds' rows go to the store directly; changes to them go through their owner's messages).

pub mod allocator;
pub mod audit;
pub mod cascade;
pub mod host;
pub mod identity;
pub mod network;
pub mod offering;
pub mod quota;
pub mod storage;
pub mod vm;
pub mod webhook;
pub mod zone;

use crate::agent::{AgentClient, HostTarget};
use crate::bus::{Bus, Message};
use crate::cascade::{Cascade, CascadeParticipant};
use crate::config::ConfigDef;
use crate::engine::Engine;
use crate::error::{Error, ErrorCode};
use crate::model::Host;
use std::future::Future;
use std::sync::Arc;
use stratus_store::{Db, Record, Resource, Row, StoreError};
use uuid::Uuid;

/// Everything the services share on one management node.
pub struct Cloud {
    pub engine: Arc<Engine>,
    pub agents: AgentClient,
    /// Base URL of this node's API (`http://IP:PORT`), for callbacks and reports.
    pub api_url: String,
    pub cascade: Cascade,
    pub allocator: allocator::Allocator,
    pub tracker: host::Tracker,
    /// Who calls the API.
    pub auth: crate::auth::Auth,
    /// The corrections state sync made, by kind.
    pub repairs: Arc<vm::SyncRepairs>,
    /// Set when the node is stopping: the API takes no new work (`node_unavailable`), while the
    /// running work and the agents' callbacks it waits for go on.
    pub draining: std::sync::atomic::AtomicBool,
    /// Events after the cursors of the webhooks this node delivers (filtered out or not yet
    /// handled), as of its last delivery round.
    pub webhook_backlog: std::sync::atomic::AtomicI64,
}

impl Cloud {
    pub fn db(&self) -> &Db {
        &self.engine.db
    }

    pub fn bus(&self) -> &Bus {
        &self.engine.bus
    }

    /// Register a handler for `M` that gets the cloud (held weakly: the bus does not keep the
    /// node alive).
    pub fn handle<M, F, Fut>(self: &Arc<Self>, f: F) -> Result<(), Error>
    where
        M: Message,
        F: Fn(Arc<Cloud>, M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Reply, Error>> + Send + 'static,
    {
        let weak = Arc::downgrade(self);
        self.bus().register(move |m: M| {
            let cloud = weak.upgrade();
            let fut = cloud.map(|c| f(c, m));
            async move {
                match fut {
                    Some(fut) => fut.await,
                    None => Err(Error::new(
                        ErrorCode::NodeUnavailable,
                        "the management node is shutting down",
                    )),
                }
            }
        })
    }

    /// A row or a `not_found` error naming the kind.
    pub async fn get<T: Resource>(&self, uuid: Uuid) -> Result<Row<T>, Error> {
        self.db()
            .get::<T>(uuid)
            .await?
            .ok_or_else(|| Error::not_found(T::META.name, uuid))
    }

    /// A `not_found` error naming the kind unless row `uuid` of `T` exists (the row is not
    /// read).
    pub async fn must_exist<T: Resource>(&self, uuid: Uuid) -> Result<(), Error> {
        self.db()
            .peek::<T, _>(uuid, |_| Ok(()))
            .await?
            .ok_or_else(|| Error::not_found(T::META.name, uuid))
    }

    /// How to reach a host's agent (its address and token only are read: every command to an
    /// agent asks).
    pub async fn host_target(&self, host: Uuid) -> Result<HostTarget, Error> {
        let (address, token) = self
            .db()
            .peek::<Host, _>(host, agent_access)
            .await?
            .ok_or_else(|| Error::not_found(Host::META.name, host))?;
        HostTarget::new(host, &address, &token)
    }

    /// Where agents send reports.
    pub fn report_url(&self) -> String {
        format!("{}/agent/report", self.api_url)
    }
}

/// The address and token of a host's agent, from the host's row (for [`HostTarget::new`]).
pub(crate) fn agent_access(host: &Record) -> Result<(String, String), StoreError> {
    Ok((host.decode("address")?, host.decode("token")?))
}

/// All global config entries of the services.
pub fn config_defs() -> Vec<&'static ConfigDef> {
    let mut v = crate::agent::config_defs();
    v.extend(crate::auth::config_defs());
    v.extend(allocator::config_defs());
    v.extend(host::config_defs());
    v.extend(vm::config_defs());
    v
}

/// Start every service on `engine`. `api_url` is this node's API base URL.
/// Start the services. `repairs` counts state sync's corrections (a node's own when `None`; the
/// simulation keeps one across restarts of its node).
pub async fn start(
    engine: Arc<Engine>,
    api_url: String,
    repairs: Option<Arc<vm::SyncRepairs>>,
) -> Result<Arc<Cloud>, Error> {
    let db = engine.db.clone();
    let bus = engine.bus.clone();
    let mut participants: Vec<Arc<dyn CascadeParticipant>> = Vec::new();
    participants.extend(zone::participants(&db));
    participants.extend(storage::participants(&db, &bus));
    participants.extend(network::participants(&db, &bus));
    participants.extend(offering::participants(&db));
    participants.extend(host::participants(&db, &bus));
    participants.extend(vm::participants(&db, &bus));
    participants.extend(engine.ext.cascade.iter().cloned());
    let agents = AgentClient::new(engine.ids.clone(), format!("{api_url}/agent/callback"))
        .with_metrics(engine.metrics.clone());
    let cloud = Arc::new(Cloud {
        cascade: Cascade::new(&participants),
        allocator: allocator::Allocator::new(),
        tracker: host::Tracker::new(),
        auth: crate::auth::Auth::new(engine.db.clone(), engine.ids.clone()),
        agents,
        repairs: repairs.unwrap_or_default(),
        draining: Default::default(),
        webhook_backlog: Default::default(),
        api_url,
        engine,
    });
    zone::register(&cloud)?;
    identity::register(&cloud)?;
    cascade::register(&cloud)?;
    storage::register(&cloud)?;
    network::register(&cloud)?;
    offering::register(&cloud)?;
    allocator::register(&cloud)?;
    host::register(&cloud)?;
    vm::register(&cloud)?;
    webhook::register(&cloud)?;
    tokio::spawn(webhook::deliver_forever(Arc::downgrade(&cloud)));
    tokio::spawn(purge_tokens(Arc::downgrade(&cloud)));
    cloud
        .engine
        .metrics
        .register_collector(Readings(Arc::downgrade(&cloud)));
    Ok(cloud)
}

/// Every `PURGE_EVERY`, delete the expired API tokens; ends with the node.
async fn purge_tokens(cloud: std::sync::Weak<Cloud>) {
    loop {
        tokio::time::sleep(crate::job::PURGE_EVERY).await;
        let Some(c) = cloud.upgrade() else { return };
        match c.auth.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "expired tokens deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete expired tokens"),
        }
    }
}

/// What `/metrics` reads from the node at each scrape.
struct Readings(std::sync::Weak<Cloud>);

impl std::fmt::Debug for Readings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Readings")
    }
}

impl prometheus_client::collector::Collector for Readings {
    fn encode(
        &self,
        enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::Reading::*;
        use std::sync::atomic::Ordering::Relaxed;
        let Some(c) = self.0.upgrade() else {
            return Ok(());
        };
        let (b, q, a) = (c.bus().stats(), c.engine.queues.stats(), c.agents.stats());
        let n = |v: usize| v as i64;
        crate::metrics::encode_readings(
            enc,
            &[
                Counter(
                    "stratus_bus_messages",
                    "Bus messages sent",
                    b.sent.load(Relaxed),
                ),
                Counter(
                    "stratus_bus_remote",
                    "Bus messages sent to another node",
                    b.remote.load(Relaxed),
                ),
                Counter(
                    "stratus_bus_timeouts",
                    "Bus messages without a reply in time",
                    b.timeouts.load(Relaxed),
                ),
                Counter(
                    "stratus_bus_panics",
                    "Bus handlers that panicked",
                    b.panics.load(Relaxed),
                ),
                Gauge(
                    "stratus_event_seq",
                    "The last event number committed through this node",
                    c.engine.events.as_ref().map_or(0, |l| l.latest()),
                ),
                Gauge(
                    "stratus_webhook_backlog",
                    "Events after the cursors of this node's webhooks (at its last delivery round)",
                    c.webhook_backlog.load(Relaxed),
                ),
                Gauge(
                    "stratus_queue_running",
                    "Tasks running in resource queues",
                    n(q.running),
                ),
                Gauge(
                    "stratus_queue_waiting",
                    "Tasks waiting in resource queues",
                    n(q.waiting),
                ),
                Gauge(
                    "stratus_queues_active",
                    "Resource queues with work",
                    n(q.active_queues),
                ),
                Counter(
                    "stratus_queue_completed",
                    "Queued tasks finished",
                    q.completed,
                ),
                Counter(
                    "stratus_agent_late_callbacks",
                    "Agent callbacks for a task nobody waited for any more",
                    a.late_callbacks.load(Relaxed),
                ),
                Gauge(
                    "stratus_agent_waiting",
                    "Agent callbacks awaited",
                    n(c.agents.waiting()),
                ),
                Gauge(
                    "stratus_hosts_tracked",
                    "Hosts this node pings",
                    n(c.tracker.tracking()),
                ),
                Gauge(
                    "stratus_jobs_in_flight",
                    "Jobs of this node still running",
                    n(c.engine.jobs.in_flight()),
                ),
                Counters(
                    "stratus_sync_repairs",
                    "Corrections state sync made, by kind",
                    "repair",
                    c.repairs.snapshot().into_iter().collect(),
                ),
            ],
        )
    }
}

/// The error of a batch that gives back what was taken from a counter (capacity, local storage,
/// addresses), whose only guard is the counter's lower bound: when that guard fails, the
/// counter held less than was taken from it, and the books are broken.
pub(crate) fn give_back_err(e: StoreError, what: impl std::fmt::Display) -> Error {
    if e.class() == stratus_store::ErrorClass::ConditionFailed {
        Error::invariant(format!("{what}: a counter would go below zero ({e})"))
    } else {
        e.into()
    }
}

/// Map a store error on a named resource into a clear API error.
pub fn store_err(e: StoreError) -> Error {
    e.into()
}

/// Check that a name is usable (non-empty, not absurdly long).
pub fn check_name(what: &str, name: &str) -> Result<(), Error> {
    if name.trim().is_empty() {
        return Err(Error::invalid(format!("{what} name must not be empty")));
    }
    if name.len() > 255 {
        return Err(Error::invalid(format!(
            "{what} name is longer than 255 characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The model tests' planted bug is no configuration entry of a real deployment: nobody
    /// with API access can switch a leak on. (Only the model tests' simulation build enables
    /// feature `planted-bug`; the std build of the workspace never does.)
    #[cfg(not(feature = "planted-bug"))]
    #[test]
    fn the_planted_bug_is_not_a_configuration_entry() {
        let defs = super::config_defs();
        assert!(!defs.is_empty());
        let debug: Vec<&str> = defs
            .iter()
            .map(|d| d.name)
            .filter(|n| n.starts_with("debug."))
            .collect();
        assert!(debug.is_empty(), "{debug:?}");
    }

    /// With the feature it is there, for the model sweep to switch on.
    #[cfg(feature = "planted-bug")]
    #[test]
    fn the_simulation_has_the_planted_bug() {
        let defs = super::config_defs();
        assert!(defs.iter().any(|d| d.name == super::vm::BUG_LEAK_IP.name));
    }
}
