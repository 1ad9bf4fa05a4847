//! The engine of one management node: every shared mechanism, built once and handed to the
//! services.

use crate::bus::Bus;
use crate::config::{ConfigDef, GlobalConfig};
use crate::error::Error;
use crate::extension::Extensions;
use crate::flow::{
    recover_orphans, ChainRecord, ChainRegistry, FaultPoints, Journal, RecoveryReport,
};
use crate::hashring::NodeId;
use crate::ids::Ids;
use crate::job::{Job, Jobs};
use crate::queue::Queues;
use std::sync::Arc;
use std::time::Duration;
use stratus_store::{Db, KindMeta, Resource, Store};
use uuid::Uuid;

/// The store kinds the engine itself needs (services add theirs).
pub fn engine_kinds() -> Vec<&'static KindMeta> {
    vec![
        Job::META,
        ChainRecord::META,
        crate::config::ConfigEntry::META,
        crate::events::Event::META,
        crate::membership::MgmtNode::META,
    ]
}

/// Default bus timeout for a request without its own.
pub static BUS_TIMEOUT: ConfigDef = ConfigDef::duration(
    "bus.timeout",
    "How long a caller waits for a reply on the bus before giving up",
    "30m",
    100,
    24 * 3_600_000,
);

pub struct EngineOptions {
    pub node: NodeId,
    /// Seed for ids and randomness; `None` draws one (from the simulation under madsim).
    pub seed: Option<u64>,
    pub extensions: Arc<Extensions>,
    pub config: Vec<&'static ConfigDef>,
    /// Fault points to arm in tests (kept outside the node so they survive its restarts).
    pub faults: Option<Arc<FaultPoints>>,
    /// Keep the event log ([`crate::events`]): every change of an evented kind then commits
    /// with its events, in this node's turn.
    pub events: bool,
}

/// Everything a service needs from the engine.
pub struct Engine {
    pub node: NodeId,
    /// Changes on every start; journal and job records carry it to detect interrupted work.
    pub boot: Uuid,
    pub ids: Arc<Ids>,
    pub db: Db,
    pub bus: Bus,
    pub queues: Queues,
    pub journal: Journal,
    pub chains: ChainRegistry,
    pub jobs: Jobs,
    pub config: GlobalConfig,
    pub ext: Arc<Extensions>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The event log, when the node keeps one.
    pub events: Option<Arc<crate::events::EventLog>>,
}

impl Engine {
    /// Build the engine on `store` and load the persisted configuration.
    pub async fn start(store: Arc<dyn Store>, opts: EngineOptions) -> Result<Arc<Engine>, Error> {
        let ids = Arc::new(match opts.seed {
            Some(s) => Ids::from_seed(s),
            None => Ids::new(),
        });
        let boot = ids.uuid();
        let events = opts
            .events
            .then(|| crate::events::EventLog::new(Db::new(store.clone())));
        let db = match &events {
            Some(log) => Db::new(store).with_hook(log.clone()),
            None => Db::new(store),
        };
        let mut defs = opts.config;
        defs.push(&BUS_TIMEOUT);
        defs.push(&crate::job::RETENTION);
        defs.push(&crate::events::RETENTION);
        defs.extend(crate::membership::config_defs());
        let config = GlobalConfig::new(db.clone(), &defs);
        config.load().await?;
        let timeout: Duration = config.get(&BUS_TIMEOUT.key());
        let bus = Bus::new(opts.node, timeout);
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let engine = Arc::new(Engine {
            node: opts.node,
            boot,
            journal: Journal::new(db.clone(), ids.clone(), opts.node, boot)
                .with_faults(opts.faults.unwrap_or_default()),
            jobs: Jobs::new(db.clone(), ids.clone(), opts.node, boot).with_metrics(metrics.clone()),
            metrics,
            ext: opts.extensions,
            queues: Queues::new(),
            chains: ChainRegistry::new(),
            config,
            bus,
            ids,
            db,
            events,
        });
        tokio::spawn(purge_jobs(Arc::downgrade(&engine)));
        if engine.events.is_some() {
            tokio::spawn(prune_events(Arc::downgrade(&engine)));
        }
        Ok(engine)
    }

    /// Finish the work of node boots that are gone: resume their journaled chains (for
    /// resources this node owns) and close their jobs. `live_boots` are the boots of the other
    /// running management nodes; this node's own boot is always live.
    pub async fn recover(&self, live_boots: &[Uuid]) -> Result<RecoveryReport, Error> {
        let mut live = live_boots.to_vec();
        live.push(self.boot);
        let bus = self.bus.clone();
        let report = recover_orphans(
            &self.journal,
            &self.chains,
            &self.queues,
            &self.jobs,
            &live,
            |u| bus.owns(u),
        )
        .await?;
        // Jobs a chain of a live boot still works for are that chain's to close.
        let working: std::collections::HashSet<Uuid> = self
            .db
            .select::<ChainRecord>(
                &stratus_store::Query::of::<ChainRecord>().is_in("boot", live.iter().copied()),
            )
            .await?
            .into_iter()
            .filter_map(|r| r.job)
            .collect();
        let closed = self.jobs.fail_orphans(&live, &working).await?;
        if report.found > 0 || closed > 0 {
            tracing::info!(?report, jobs_closed = closed, "recovered interrupted work");
        }
        Ok(report)
    }
}

/// Every `PURGE_EVERY`, delete the jobs finished longer ago than `job.retention`; ends with the
/// engine.
async fn purge_jobs(engine: std::sync::Weak<Engine>) {
    loop {
        tokio::time::sleep(crate::job::PURGE_EVERY).await;
        let Some(e) = engine.upgrade() else { return };
        let keep: Duration = e.config.get(&crate::job::RETENTION.key());
        match e.jobs.purge_finished(keep).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "finished jobs purged"),
            Err(err) => tracing::warn!(error = %err, "cannot purge finished jobs"),
        }
    }
}

/// Every `PURGE_EVERY`, delete the events older than `event.retention`; ends with the engine.
async fn prune_events(engine: std::sync::Weak<Engine>) {
    loop {
        tokio::time::sleep(crate::job::PURGE_EVERY).await;
        let Some(e) = engine.upgrade() else { return };
        let Some(log) = &e.events else { return };
        let keep: Duration = e.config.get(&crate::events::RETENTION.key());
        match log.prune(keep).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "old events pruned"),
            Err(err) => tracing::warn!(error = %err, "cannot prune old events"),
        }
    }
}
