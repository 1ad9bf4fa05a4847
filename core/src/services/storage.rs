//! Primary storage (local storage on each host), backup storage and images.

use super::cascade::SimpleParticipant;
use super::{check_name, Cloud};
use crate::bus::{Bus, Message};
use crate::cascade::CascadeParticipant;
use crate::error::{Error, ErrorCode};
use crate::ids::name_uuid;
use crate::model::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use stratus_store::ErrorClass;
use stratus_store::{Batch, Db, Query, Row, Update};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePrimaryStorage {
    pub zone_uuid: Uuid,
    pub name: String,
    #[serde(default = "local")]
    pub kind: PrimaryStorageType,
    /// Path on each host.
    #[serde(default = "default_path")]
    pub url: String,
}
fn local() -> PrimaryStorageType {
    PrimaryStorageType::LocalStorage
}
fn default_path() -> String {
    "/var/lib/stratus/volumes".into()
}
impl Message for CreatePrimaryStorage {
    type Reply = Row<PrimaryStorage>;
    const NAME: &'static str = "primary-storage.create";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachPrimaryStorage {
    pub ps_uuid: Uuid,
    pub cluster_uuid: Uuid,
}
impl Message for AttachPrimaryStorage {
    type Reply = ();
    const NAME: &'static str = "primary-storage.attach";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.ps_uuid)
    }
}

/// Make sure `host` has its share of every local primary storage attached to its cluster, with
/// the host's current disk size as the total. Sent by the host service after a connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncLocalStorage {
    pub host_uuid: Uuid,
}
impl Message for SyncLocalStorage {
    type Reply = ();
    const NAME: &'static str = "local-storage.sync";
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackupStorage {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub total_mib: i64,
}
impl Message for CreateBackupStorage {
    type Reply = Row<BackupStorage>;
    const NAME: &'static str = "backup-storage.create";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachBackupStorage {
    pub bs_uuid: Uuid,
    pub zone_uuid: Uuid,
}
impl Message for AttachBackupStorage {
    type Reply = ();
    const NAME: &'static str = "backup-storage.attach";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.bs_uuid)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddImage {
    pub bs_uuid: Uuid,
    pub name: String,
    pub url: String,
    #[serde(default = "qcow2")]
    pub format: ImageFormat,
    pub size_mib: i64,
    #[serde(default)]
    pub checksum: Option<String>,
    /// The account it belongs to, set by the API from the caller (none: the cloud's own).
    #[serde(default)]
    pub account_uuid: Option<Uuid>,
}
fn qcow2() -> ImageFormat {
    ImageFormat::Qcow2
}
impl Message for AddImage {
    type Reply = Row<Image>;
    const NAME: &'static str = "image.add";
}

async fn no_volumes_on_ps(db: Db, ps: Uuid) -> Result<(), Error> {
    let n = db.count(&Query::of::<Volume>().eq("ps_uuid", ps)).await?;
    if n > 0 {
        return Err(Error::new(
            ErrorCode::InUse,
            format!("{n} volumes are on primary storage {ps}"),
        ));
    }
    Ok(())
}

pub fn participants(db: &Db, _bus: &Bus) -> Vec<Arc<dyn CascadeParticipant>> {
    vec![
        SimpleParticipant::new(db, "primary_storage", &["zone"], &[("zone", "zone_uuid")])
            .with_check(no_volumes_on_ps)
            .arc(),
        SimpleParticipant::new(
            db,
            "ps_cluster",
            &["primary_storage", "cluster"],
            &[("primary_storage", "ps_uuid"), ("cluster", "cluster_uuid")],
        )
        .arc(),
        SimpleParticipant::new(
            db,
            "local_storage",
            &["primary_storage", "host"],
            &[("primary_storage", "ps_uuid"), ("host", "host_uuid")],
        )
        .arc(),
        SimpleParticipant::new(db, "backup_storage", &[], &[]).arc(),
        SimpleParticipant::new(
            db,
            "bs_zone",
            &["backup_storage", "zone"],
            &[("backup_storage", "bs_uuid"), ("zone", "zone_uuid")],
        )
        .arc(),
        SimpleParticipant::new(
            db,
            "image",
            &["backup_storage"],
            &[("backup_storage", "bs_uuid")],
        )
        .arc(),
    ]
}

/// What `host`'s volumes on primary storage `ps` and its reservations there hold, in MiB.
async fn local_storage_in_use(c: &Cloud, ps: Uuid, host: Uuid) -> Result<i64, Error> {
    let volumes = c
        .db()
        .select::<Volume>(
            &Query::of::<Volume>()
                .eq("host_uuid", host)
                .eq("ps_uuid", ps),
        )
        .await?;
    let held = c
        .db()
        .select::<Reservation>(&Query::of::<Reservation>().eq("host_uuid", host))
        .await?;
    Ok(volumes.iter().map(|v| v.size_mib).sum::<i64>()
        + held
            .iter()
            .filter(|r| r.ps_uuid == Some(ps))
            .map(|r| r.disk_mib)
            .sum::<i64>())
}

/// Create or resize `host`'s share of local primary storage `ps`.
async fn ensure_local_storage(c: &Cloud, ps: Uuid, host: &Row<Host>) -> Result<(), Error> {
    let id = local_storage_uuid(ps, host.uuid);
    match c.db().get::<LocalStorage>(id).await? {
        Some(ls) if ls.total_mib == host.disk_mib => Ok(()),
        Some(_) => {
            c.db()
                .commit(
                    Batch::new()
                        .update(Update::of::<LocalStorage>(id).set("total_mib", host.disk_mib)),
                )
                .await?;
            Ok(())
        }
        None => {
            // A new host has nothing on it, but a share can also be missing under data that is
            // there: a cluster's forced deletion removes the shares before the hosts, and a host
            // that reconnects in between gets its share back here (the cascade then deletes it
            // with the host). It counts what is on it.
            let used_mib = local_storage_in_use(c, ps, host.uuid).await?;
            let row = Row::new(
                id,
                LocalStorage {
                    ps_uuid: ps,
                    host_uuid: host.uuid,
                    total_mib: host.disk_mib,
                    used_mib,
                },
            );
            // Only while the host exists: a host deleted while it reconnected (its cluster
            // force-deleted) gets no share that would outlive it (found by the model sweep).
            let b = Batch::new()
                .insert(&row)
                .update(Update::of::<Host>(host.uuid));
            match c.db().commit(b).await {
                Ok(_) => Ok(()),
                // Created concurrently: fine.
                Err(e) if e.class() == ErrorClass::AlreadyExists => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    }
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: CreatePrimaryStorage| async move {
        check_name("primary storage", &m.name)?;
        let zone = c.get::<Zone>(m.zone_uuid).await?;
        if !m.url.starts_with('/') {
            return Err(Error::invalid(format!(
                "local storage url must be an absolute path; got {:?}",
                m.url
            )));
        }
        let row = Row::new(
            c.engine.ids.uuid(),
            PrimaryStorage {
                name: m.name,
                zone_uuid: zone.uuid,
                kind: m.kind,
                url: m.url,
                state: EnableState::Enabled,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: AttachPrimaryStorage| async move {
        let ps = c.get::<PrimaryStorage>(m.ps_uuid).await?;
        let cluster = c.get::<Cluster>(m.cluster_uuid).await?;
        if ps.zone_uuid != cluster.zone_uuid {
            return Err(Error::invalid(format!(
                "primary storage {} is in zone {}, cluster {} in zone {}",
                ps.uuid, ps.zone_uuid, cluster.uuid, cluster.zone_uuid
            )));
        }
        let id = name_uuid(&ps.uuid.to_string(), &format!("cluster/{}", cluster.uuid));
        let link = Row::new(
            id,
            PsCluster {
                ps_uuid: ps.uuid,
                cluster_uuid: cluster.uuid,
            },
        );
        match c.db().insert(link).await {
            Ok(_) => {}
            Err(e) if e.class() == ErrorClass::AlreadyExists => {
                return Err(Error::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "primary storage {} is already attached to cluster {}",
                        ps.uuid, cluster.uuid
                    ),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        let hosts = c
            .db()
            .select::<Host>(
                &Query::of::<Host>()
                    .eq("cluster_uuid", cluster.uuid)
                    .gt("disk_mib", 0i64),
            )
            .await?;
        for h in hosts {
            ensure_local_storage(&c, ps.uuid, &h).await?;
        }
        Ok(())
    })?;
    cloud.handle(|c: Arc<Cloud>, m: SyncLocalStorage| async move {
        let host = c.get::<Host>(m.host_uuid).await?;
        let links = c
            .db()
            .select::<PsCluster>(&Query::of::<PsCluster>().eq("cluster_uuid", host.cluster_uuid))
            .await?;
        for l in links {
            ensure_local_storage(&c, l.ps_uuid, &host).await?;
        }
        Ok(())
    })?;
    cloud.handle(|c: Arc<Cloud>, m: CreateBackupStorage| async move {
        check_name("backup storage", &m.name)?;
        if m.url.trim().is_empty() {
            return Err(Error::invalid("backup storage url must not be empty"));
        }
        let row = Row::new(
            c.engine.ids.uuid(),
            BackupStorage {
                name: m.name,
                url: m.url,
                total_mib: m.total_mib.max(0),
                state: EnableState::Enabled,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: AttachBackupStorage| async move {
        let bs = c.get::<BackupStorage>(m.bs_uuid).await?;
        let zone = c.get::<Zone>(m.zone_uuid).await?;
        let link = Row::new(
            name_uuid(&bs.uuid.to_string(), &format!("zone/{}", zone.uuid)),
            BsZone {
                bs_uuid: bs.uuid,
                zone_uuid: zone.uuid,
            },
        );
        match c.db().insert(link).await {
            Ok(_) => Ok(()),
            Err(e) if e.class() == ErrorClass::AlreadyExists => Err(Error::new(
                ErrorCode::AlreadyExists,
                format!(
                    "backup storage {} is already attached to zone {}",
                    bs.uuid, zone.uuid
                ),
            )),
            Err(e) => Err(e.into()),
        }
    })?;
    cloud.handle(|c: Arc<Cloud>, m: AddImage| async move {
        check_name("image", &m.name)?;
        let bs = c.get::<BackupStorage>(m.bs_uuid).await?;
        if m.size_mib <= 0 {
            return Err(Error::invalid(format!(
                "image size_mib must be positive; got {}",
                m.size_mib
            )));
        }
        if m.url.trim().is_empty() {
            return Err(Error::invalid("image url must not be empty"));
        }
        if let Some(sum) = &m.checksum {
            let hex = sum.strip_prefix("sha256:").unwrap_or(sum);
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(Error::invalid(format!(
                    "image checksum must be sha256:<64 hex digits>; got {sum:?}"
                )));
            }
        }
        let row = Row::new(
            c.engine.ids.uuid(),
            Image {
                name: m.name,
                bs_uuid: bs.uuid,
                format: m.format,
                size_mib: m.size_mib,
                url: m.url,
                checksum: m.checksum,
                state: EnableState::Enabled,
                account_uuid: m.account_uuid,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    Ok(())
}
