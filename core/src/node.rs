//! A management node: the engine, the services, the API server, recovery and host tracking,
//! started together. The std binary (`stratus serve`) and the simulation both start nodes here.

use crate::engine::{Engine, EngineOptions};
use crate::error::Error;
use crate::extension::Extensions;
use crate::flow::{FaultPoints, RecoveryReport};
use crate::services::host::TrackOwnedHosts;
use crate::services::vm::SyncRepairs;
use crate::services::{self, Cloud};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use stratus_store::Store;
use uuid::Uuid;

pub struct NodeConfig {
    pub node_id: Uuid,
    /// Where the API listens.
    pub listen: SocketAddr,
    /// The URL agents and peers use to reach this node (`http://IP:PORT`); defaults to the
    /// listen address.
    pub advertise: Option<String>,
    /// Seed for ids and randomness (`None`: drawn; from the simulation under madsim).
    pub seed: Option<u64>,
    pub extensions: Arc<Extensions>,
    pub faults: Option<Arc<FaultPoints>>,
    /// Where state sync counts its corrections (the node's own when `None`).
    pub repairs: Option<Arc<SyncRepairs>>,
    /// Keep the event log (`/v1/events`, webhooks); on by default.
    pub events: bool,
}

impl NodeConfig {
    pub fn new(node_id: Uuid, listen: SocketAddr) -> Self {
        NodeConfig {
            node_id,
            listen,
            advertise: None,
            seed: None,
            extensions: Extensions::builder().build(),
            faults: None,
            repairs: None,
            events: true,
        }
    }
}

/// A running management node.
pub struct ManagementNode {
    pub cloud: Arc<Cloud>,
    pub addr: SocketAddr,
    /// What the start-up recovery did.
    pub recovery: RecoveryReport,
}

impl ManagementNode {
    /// Start a node on `store`: load config, start the services and the API, finish the work
    /// an earlier run of this (or a dead) node left in the journal, start tracking hosts.
    pub async fn start(store: Arc<dyn Store>, cfg: NodeConfig) -> Result<ManagementNode, Error> {
        // Bound first: with port 0 the system chooses, and agents are told the port it chose.
        let listener = stratus_rt::http::Listener::bind(cfg.listen)
            .await
            .map_err(|e| Error::internal(format!("cannot listen on {}: {e}", cfg.listen)))?;
        let addr = listener.addr();
        let url = cfg.advertise.unwrap_or_else(|| format!("http://{addr}"));
        let engine = Engine::start(
            store,
            EngineOptions {
                node: cfg.node_id,
                seed: cfg.seed,
                extensions: cfg.extensions,
                config: services::config_defs(),
                faults: cfg.faults,
                events: cfg.events,
            },
        )
        .await?;
        let cloud = services::start(engine, url, cfg.repairs).await?;
        // Config changed on a peer: apply it here too.
        let mut changes = cloud.bus().subscribe("/config/change")?;
        let weak = Arc::downgrade(&cloud);
        tokio::spawn(async move {
            while let Some(ev) = changes.recv().await {
                let Some(c) = weak.upgrade() else { break };
                if let (Some(n), Some(v)) = (ev.data["name"].as_str(), ev.data["value"].as_str()) {
                    if let Err(e) = c.engine.config.apply_remote(n, v) {
                        tracing::warn!(error = %e, "cannot apply a config change");
                    }
                }
            }
        });
        listener.serve(crate::api::router(cloud.clone()));
        let recovery = cloud.engine.recover(&[]).await?;
        cloud.bus().send(TrackOwnedHosts).await?;
        tracing::info!(node = %cloud.engine.node, %addr, ?recovery, "management node started");
        Ok(ManagementNode {
            cloud,
            addr,
            recovery,
        })
    }

    /// Stop taking new work and wait up to `grace` for this node's running jobs to end. Returns
    /// how many still run: their chains stay in the journal, and the next start of a node on
    /// the same store finishes or rolls them back (the journal contract).
    pub async fn drain(&self, grace: Duration) -> usize {
        self.cloud.draining.store(true, Ordering::SeqCst);
        let until = tokio::time::Instant::now() + grace;
        loop {
            let left = self.cloud.engine.jobs.in_flight();
            if left == 0 || tokio::time::Instant::now() >= until {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
