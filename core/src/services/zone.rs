//! Zones and clusters.

use super::cascade::SimpleParticipant;
use super::{check_name, Cloud};
use crate::bus::Message;
use crate::cascade::CascadeParticipant;
use crate::error::Error;
use crate::model::{Cluster, EnableState, Zone};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use stratus_store::{Batch, Db, Row, Update};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateZone {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}
impl Message for CreateZone {
    type Reply = Row<Zone>;
    const NAME: &'static str = "zone.create";
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateZone {
    /// From the request's path, not its body.
    #[schemars(skip)]
    pub uuid: Uuid,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub state: Option<EnableState>,
}
impl Message for UpdateZone {
    type Reply = Row<Zone>;
    const NAME: &'static str = "zone.update";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCluster {
    pub zone_uuid: Uuid,
    pub name: String,
    #[serde(default = "kvm")]
    pub hypervisor: String,
    #[serde(default)]
    pub description: Option<String>,
}
fn kvm() -> String {
    "KVM".into()
}
impl Message for CreateCluster {
    type Reply = Row<Cluster>;
    const NAME: &'static str = "cluster.create";
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCluster {
    /// From the request's path, not its body.
    #[schemars(skip)]
    pub uuid: Uuid,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub state: Option<EnableState>,
}
impl Message for UpdateCluster {
    type Reply = Row<Cluster>;
    const NAME: &'static str = "cluster.update";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

pub fn participants(db: &Db) -> Vec<Arc<dyn CascadeParticipant>> {
    vec![
        SimpleParticipant::new(db, "zone", &[], &[]).arc(),
        SimpleParticipant::new(db, "cluster", &["zone"], &[("zone", "zone_uuid")]).arc(),
    ]
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: CreateZone| async move {
        check_name("zone", &m.name)?;
        let row = Row::new(
            c.engine.ids.uuid(),
            Zone {
                name: m.name,
                description: m.description,
                state: EnableState::Enabled,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: UpdateZone| async move {
        let _ = c.get::<Zone>(m.uuid).await?;
        let mut u = Update::of::<Zone>(m.uuid);
        if let Some(n) = m.name {
            check_name("zone", &n)?;
            u = u.set("name", n);
        }
        if let Some(d) = m.description {
            u = u.set("description", d);
        }
        if let Some(s) = m.state {
            u = u.set("state", s.as_str());
        }
        c.db().commit(Batch::new().update(u)).await?;
        c.get::<Zone>(m.uuid).await
    })?;
    cloud.handle(|c: Arc<Cloud>, m: CreateCluster| async move {
        check_name("cluster", &m.name)?;
        let zone = c.get::<Zone>(m.zone_uuid).await?;
        if m.hypervisor != "KVM" {
            return Err(Error::invalid(format!(
                "hypervisor {:?} is not supported; use KVM",
                m.hypervisor
            )));
        }
        let row = Row::new(
            c.engine.ids.uuid(),
            Cluster {
                name: m.name,
                zone_uuid: zone.uuid,
                hypervisor: m.hypervisor,
                description: m.description,
                state: EnableState::Enabled,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: UpdateCluster| async move {
        let _ = c.get::<Cluster>(m.uuid).await?;
        let mut u = Update::of::<Cluster>(m.uuid);
        if let Some(n) = m.name {
            check_name("cluster", &n)?;
            u = u.set("name", n);
        }
        if let Some(s) = m.state {
            u = u.set("state", s.as_str());
        }
        c.db().commit(Batch::new().update(u)).await?;
        // The allocator's cache holds clusters' states (on every node).
        c.bus()
            .publish("/cluster/updated", || serde_json::json!({"uuid": m.uuid}));
        c.get::<Cluster>(m.uuid).await
    })?;
    Ok(())
}
