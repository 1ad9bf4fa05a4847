//! The conformance suite on the in-memory backend (runs in both builds).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use stratus_store::conformance::{self, CsWidget};
use stratus_store::{Batch, Db, MemStore, Query, Record, Schema, Store, StoreError, Update};
use uuid::Uuid;

#[tokio::test]
async fn mem_store_passes_the_conformance_suite() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new(conformance::schema()));
    conformance::run_all(store).await;
}

/// A store whose next `lose` commits apply and then report a backend failure (an answer lost),
/// and whose next `refuse` commits fail without applying.
struct Unreliable {
    inner: MemStore,
    lose: AtomicU32,
    refuse: AtomicU32,
}

fn take(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait::async_trait]
impl Store for Unreliable {
    fn backend(&self) -> &'static str {
        "unreliable"
    }
    fn schema(&self) -> &Schema {
        self.inner.schema()
    }
    async fn get(&self, kind: &str, uuid: Uuid) -> Result<Option<Record>, StoreError> {
        self.inner.get(kind, uuid).await
    }
    async fn query(&self, q: &Query) -> Result<Vec<Record>, StoreError> {
        self.inner.query(q).await
    }
    async fn count(&self, q: &Query) -> Result<u64, StoreError> {
        self.inner.count(q).await
    }
    async fn commit(&self, batch: Batch) -> Result<Vec<u64>, StoreError> {
        if take(&self.refuse) {
            return Err(StoreError::Backend("refused".into()));
        }
        let out = self.inner.commit(batch).await?;
        if take(&self.lose) {
            return Err(StoreError::Backend("answer lost".into()));
        }
        Ok(out)
    }
}

#[tokio::test]
async fn a_commit_whose_answer_is_lost_is_retried_and_applies_once() {
    let store = Arc::new(Unreliable {
        inner: MemStore::new(conformance::schema()),
        lose: AtomicU32::new(2),
        refuse: AtomicU32::new(1),
    });
    let db = Db::new(store.clone());
    let uuid = Uuid::from_u128(7);
    let row = conformance::widget(uuid, "retry", "w", 1);
    // Refused once, then applied with its answer lost twice: the fourth attempt is answered
    // from the key, and the insert does not collide with itself.
    let v = db
        .commit(
            Batch::new()
                .insert(&row)
                .update(Update::of::<CsWidget>(uuid).add("counter", 1)),
        )
        .await
        .expect("applied once, answered");
    assert_eq!(v, vec![1, 2]);
    let got = db.must_get::<CsWidget>(uuid).await.unwrap();
    assert_eq!((got.counter, got.version), (1, 2));
    // Past the attempts, the backend's error reaches the caller, and nothing applied.
    store.refuse.store(4, Ordering::Relaxed);
    let e = db
        .commit(Batch::new().update(Update::of::<CsWidget>(uuid).add("counter", 1)))
        .await
        .unwrap_err();
    assert_eq!(e, StoreError::Backend("refused".into()));
    let got = db.must_get::<CsWidget>(uuid).await.unwrap();
    assert_eq!(got.counter, 1);
}
