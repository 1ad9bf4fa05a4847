//! Deleting any resource: the cascade over its children, run in the resource's queue, and the
//! simple participant most kinds use.

use super::Cloud;
use crate::bus::Message;
use crate::cascade::{children_by_field, CascadeParticipant, DeleteMode};
use crate::error::Error;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use stratus_store::{Batch, Db, Expect};
use uuid::Uuid;

/// Delete a resource and everything below it. Without `force`, any resource in the tree that is
/// in use refuses and nothing is deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteResource {
    pub kind: String,
    pub uuid: Uuid,
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteReport {
    /// `kind uuid` of everything deleted, deepest first.
    pub deleted: Vec<String>,
    /// Errors met while force-deleting.
    pub errors: Vec<String>,
}

impl Message for DeleteResource {
    type Reply = DeleteReport;
    const NAME: &'static str = "resource.delete";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: DeleteResource| async move {
        let kind = c.db().schema().kind(&m.kind)?.name;
        if c.db().store().get(kind, m.uuid).await?.is_none() {
            return Err(Error::not_found(kind, m.uuid));
        }
        let mode = if m.force {
            DeleteMode::Force
        } else {
            DeleteMode::Check
        };
        let queue = format!("{kind}-{}", m.uuid);
        let report = c
            .engine
            .queues
            .run(&queue, 1, c.cascade.delete(kind, m.uuid, mode))
            .await?;
        c.bus().publish(
            &format!("/{kind}/deleted"),
            || serde_json::json!({"uuid": m.uuid}),
        );
        Ok(DeleteReport {
            deleted: report
                .deleted
                .iter()
                .map(|(k, u)| format!("{k} {u}"))
                .collect(),
            errors: report.errors.iter().map(|e| e.to_string()).collect(),
        })
    })
}

type CheckFn =
    Arc<dyn Fn(Db, Uuid) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> + Send + Sync>;

/// A kind whose deletion is: check (optional), then delete its row. Children are found by a
/// field naming the parent.
pub struct SimpleParticipant {
    pub kind: &'static str,
    /// (parent kind, field of this kind naming the parent).
    pub parent_fields: &'static [(&'static str, &'static str)],
    pub parents: &'static [&'static str],
    pub db: Db,
    pub check: Option<CheckFn>,
}

impl SimpleParticipant {
    pub fn new(
        db: &Db,
        kind: &'static str,
        parents: &'static [&'static str],
        parent_fields: &'static [(&'static str, &'static str)],
    ) -> Self {
        SimpleParticipant {
            kind,
            parent_fields,
            parents,
            db: db.clone(),
            check: None,
        }
    }

    /// Refuse deletion (without force) when `check` fails.
    pub fn with_check<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Db, Uuid) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.check = Some(Arc::new(move |db, u| Box::pin(f(db, u))));
        self
    }

    pub fn arc(self) -> Arc<dyn CascadeParticipant> {
        Arc::new(self)
    }
}

#[async_trait]
impl CascadeParticipant for SimpleParticipant {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn parents(&self) -> &'static [&'static str] {
        self.parents
    }
    async fn children(&self, parent_kind: &str, parent: Uuid) -> Result<Vec<Uuid>, Error> {
        let mut out = Vec::new();
        for (pk, field) in self.parent_fields {
            if *pk == parent_kind {
                out.extend(children_by_field(&self.db, self.kind, field, parent).await?);
            }
        }
        Ok(out)
    }
    async fn check(&self, uuid: Uuid) -> Result<(), Error> {
        match &self.check {
            Some(f) => f(self.db.clone(), uuid).await,
            None => Ok(()),
        }
    }
    async fn delete(&self, uuid: Uuid) -> Result<(), Error> {
        self.db
            .commit(Batch::new().delete_kind(self.kind, uuid, Expect::Maybe))
            .await?;
        Ok(())
    }
}
