//! Instance and disk offerings. An offering in use cannot be deleted without force (force
//! deletes only the offering; VMs and volumes keep their sizes).

use super::cascade::SimpleParticipant;
use super::{check_name, Cloud};
use crate::bus::Message;
use crate::cascade::CascadeParticipant;
use crate::error::{Error, ErrorCode};
use crate::model::{DiskOffering, EnableState, InstanceOffering, Vm, VmState, Volume};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use stratus_store::{Batch, Db, Query, Resource, Row, Update};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstanceOffering {
    pub name: String,
    pub cpu: i64,
    pub memory_mib: i64,
}
impl Message for CreateInstanceOffering {
    type Reply = Row<InstanceOffering>;
    const NAME: &'static str = "instance-offering.create";
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDiskOffering {
    pub name: String,
    pub size_mib: i64,
}
impl Message for CreateDiskOffering {
    type Reply = Row<DiskOffering>;
    const NAME: &'static str = "disk-offering.create";
}

/// Enable or disable an instance or disk offering.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetOfferingState {
    pub uuid: Uuid,
    pub state: EnableState,
}
impl Message for SetOfferingState {
    type Reply = ();
    const NAME: &'static str = "offering.set-state";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

async fn vms_using(db: Db, offering: Uuid) -> Result<(), Error> {
    let n = db
        .count(
            &Query::of::<Vm>()
                .eq("instance_offering_uuid", offering)
                .ne("state", VmState::Destroyed.as_str()),
        )
        .await?;
    if n > 0 {
        return Err(Error::new(
            ErrorCode::InUse,
            format!("{n} VMs use instance offering {offering}"),
        ));
    }
    Ok(())
}

async fn volumes_using(db: Db, offering: Uuid) -> Result<(), Error> {
    let n = db
        .count(&Query::of::<Volume>().eq("disk_offering_uuid", offering))
        .await?;
    if n > 0 {
        return Err(Error::new(
            ErrorCode::InUse,
            format!("{n} volumes use disk offering {offering}"),
        ));
    }
    Ok(())
}

pub fn participants(db: &Db) -> Vec<Arc<dyn CascadeParticipant>> {
    vec![
        SimpleParticipant::new(db, "instance_offering", &[], &[])
            .with_check(vms_using)
            .arc(),
        SimpleParticipant::new(db, "disk_offering", &[], &[])
            .with_check(volumes_using)
            .arc(),
    ]
}

fn positive(what: &str, v: i64, max: i64) -> Result<(), Error> {
    if v <= 0 || v > max {
        return Err(Error::invalid(format!(
            "{what} must be between 1 and {max}; got {v}"
        )));
    }
    Ok(())
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: CreateInstanceOffering| async move {
        check_name("instance offering", &m.name)?;
        positive("cpu", m.cpu, 1024)?;
        positive("memory_mib", m.memory_mib, 64 << 20)?;
        let row = Row::new(
            c.engine.ids.uuid(),
            InstanceOffering {
                name: m.name,
                cpu: m.cpu,
                memory_mib: m.memory_mib,
                state: EnableState::Enabled,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: CreateDiskOffering| async move {
        check_name("disk offering", &m.name)?;
        positive("size_mib", m.size_mib, 64 << 20)?;
        let row = Row::new(
            c.engine.ids.uuid(),
            DiskOffering {
                name: m.name,
                size_mib: m.size_mib,
                state: EnableState::Enabled,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: SetOfferingState| async move {
        let kind = if c.db().get::<InstanceOffering>(m.uuid).await?.is_some() {
            InstanceOffering::META.name
        } else if c.db().get::<DiskOffering>(m.uuid).await?.is_some() {
            DiskOffering::META.name
        } else {
            return Err(Error::not_found("offering", m.uuid));
        };
        c.db()
            .commit(Batch::new().update(Update::new(kind, m.uuid).set("state", m.state.as_str())))
            .await?;
        Ok(())
    })?;
    Ok(())
}
