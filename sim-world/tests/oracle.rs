//! The oracle fails closed: a database it cannot read is a violation, never empty tables whose
//! books trivially balance.
#![cfg(madsim)]

use async_trait::async_trait;
use std::sync::Arc;
use stratus_sim_world::invariants::{census, check, check_books};
use stratus_sim_world::{World, WorldSpec};
use stratus_store::{Batch, Db, MemStore, Query, Record, Schema, Store, StoreError};
use uuid::Uuid;

/// The world's store with every read refused (writes go through).
struct UnreadableStore(Arc<MemStore>);

fn refused() -> StoreError {
    StoreError::Backend("read refused by the test".into())
}

#[async_trait]
impl Store for UnreadableStore {
    fn backend(&self) -> &'static str {
        "unreadable"
    }
    fn schema(&self) -> &Schema {
        self.0.schema()
    }
    async fn get(&self, _kind: &str, _uuid: Uuid) -> Result<Option<Record>, StoreError> {
        Err(refused())
    }
    async fn query(&self, _q: &Query) -> Result<Vec<Record>, StoreError> {
        Err(refused())
    }
    async fn count(&self, _q: &Query) -> Result<u64, StoreError> {
        Err(refused())
    }
    async fn commit(&self, batch: Batch) -> Result<Vec<u64>, StoreError> {
        self.0.commit(batch).await
    }
}

#[test]
fn the_oracle_fails_a_run_whose_store_cannot_be_read() {
    World::run(
        WorldSpec {
            seed: 5,
            ..Default::default()
        },
        |mut w| async move {
            w.create_vm("vm-1", "small").await.expect("create");
            assert!(check_books(&w).await.is_empty(), "the control run holds");
            assert!(census(&w).await.is_ok());

            w.db = Db::new(Arc::new(UnreadableStore(w.store.clone())));
            let books = check_books(&w).await;
            assert!(
                books.iter().any(|m| m.contains("the oracle cannot read")),
                "{books:?}"
            );
            let all = check(&w).await;
            assert!(!all.is_empty(), "the full check passed an unreadable store");
            let err = census(&w)
                .await
                .expect_err("a census of an unreadable store");
            assert!(err.contains("read refused by the test"), "{err}");
        },
    );
}
