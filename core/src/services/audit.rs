//! The built-in audit sink: each record as an `audit` row, queried with the ordinary API by an
//! admin; rows older than the retention are pruned as new ones come.

use crate::extension::{AuditRecord, AuditSink};
use crate::ids::Ids;
use crate::model::Audit;
use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use stratus_store::{Batch, Db, Expect, Millis, Query, Row, Value};

/// Old rows are looked for once per this many records.
const PRUNE_EVERY: u64 = 512;
/// Old rows deleted at most at a time.
const PRUNE_BATCH: u64 = 1_000;

/// Keeps audit records in the store.
pub struct StoreAudit {
    db: Db,
    ids: Arc<Ids>,
    retention: Duration,
    recorded: AtomicU64,
}

impl StoreAudit {
    pub fn new(db: Db, retention: Duration) -> Self {
        StoreAudit {
            db,
            ids: Arc::new(Ids::new()),
            retention,
            recorded: AtomicU64::new(0),
        }
    }

    async fn prune(&self, now: i64) {
        let cutoff = now - self.retention.as_millis() as i64;
        let q = Query::of::<Audit>()
            .lt("at_ms", Value::Time(cutoff))
            .limit(PRUNE_BATCH);
        let old = match self.db.select::<Audit>(&q).await {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!(error = %e, "cannot read old audit records"),
        };
        if old.is_empty() {
            return;
        }
        let b = old.iter().fold(Batch::new(), |b, r| {
            b.delete::<Audit>(r.uuid, Expect::Maybe)
        });
        if let Err(e) = self.db.commit(b).await {
            tracing::warn!(error = %e, "cannot prune old audit records");
        }
    }
}

#[async_trait]
impl AuditSink for StoreAudit {
    async fn record(&self, r: &AuditRecord) {
        let row = Row::new(
            self.ids.uuid(),
            Audit {
                at_ms: Millis(r.at_ms),
                account_uuid: r.account,
                user_uuid: r.user,
                method: r.method.clone(),
                path: r.path.clone(),
                resource_uuid: r.resource,
                job_uuid: r.job,
                status: r.status.into(),
                code: r.code.clone(),
                client: r.client.clone(),
            },
        );
        // Patiently: a change without its record is what an audit log must not have.
        let b = Batch::new().insert(&row);
        if let Err(e) = self
            .db
            .commit_patiently(b, crate::flow::BOOKKEEPING_PATIENCE)
            .await
        {
            tracing::error!(error = %e, method = %r.method, path = %r.path, "cannot keep an audit record");
        }
        if self.recorded.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune(r.at_ms).await;
        }
    }
}
