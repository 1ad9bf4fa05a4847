//! The built-in audit sink: each record as an `audit` row, queried with the ordinary API by an
//! admin; rows older than the retention are pruned every minute, off the requests' path.

use crate::extension::{AuditRecord, AuditSink};
use crate::ids::Ids;
use crate::model::Audit;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use stratus_store::{Batch, Db, Millis, Query, Row, Value};

/// Old rows deleted at most at a time.
const PRUNE_BATCH: usize = 1_000;

/// Keeps audit records in the store.
pub struct StoreAudit {
    db: Db,
    ids: Arc<Ids>,
    /// Its pruning task runs while this lives.
    _alive: Arc<()>,
}

impl StoreAudit {
    /// The sink, and its pruning task (on the current runtime) of rows older than `retention`.
    pub fn new(db: Db, retention: Duration) -> Self {
        let alive = Arc::new(());
        tokio::spawn(prune_forever(db.clone(), retention, Arc::downgrade(&alive)));
        StoreAudit {
            db,
            ids: Arc::new(Ids::new()),
            _alive: alive,
        }
    }
}

async fn prune_forever(db: Db, retention: Duration, alive: std::sync::Weak<()>) {
    loop {
        tokio::time::sleep(crate::job::PURGE_EVERY).await;
        if alive.upgrade().is_none() {
            return;
        }
        let cutoff = stratus_rt::clock::now_ms() - retention.as_millis() as i64;
        let q = Query::of::<Audit>().lt("at_ms", Value::Time(cutoff));
        match db.delete_matching(&q, PRUNE_BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "old audit records pruned"),
            Err(e) => tracing::warn!(error = %e, "cannot prune old audit records"),
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
    }
}
