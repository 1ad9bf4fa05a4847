//! Store faults: a [`Store`] in front of the datacenter's `MemStore` whose commits fail at a
//! chosen rate — before they apply (nothing written), after (written, but the caller is told
//! it failed: a lost answer), or after a long wait (a timeout). Reads go through untouched.
//! The management node sees this store; the oracle reads the `MemStore` behind it.

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_store::{Batch, Query, ReadRecord, Record, Schema, Store, StoreError};
use uuid::Uuid;

/// Per-commit fault rates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoreFaultRates {
    /// The commit fails without applying.
    pub fail: f64,
    /// The commit applies, then reports failure.
    pub fail_after: f64,
    /// The commit waits `slow`, then fails without applying (a timeout).
    pub timeout: f64,
    pub slow: Duration,
}

#[derive(Default)]
struct State {
    rates: StoreFaultRates,
    fired: BTreeMap<&'static str, u64>,
}

pub struct FaultyStore {
    inner: Arc<dyn Store>,
    state: Mutex<State>,
    rng: Mutex<ChaCha8Rng>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>, seed: u64) -> Self {
        FaultyStore {
            inner,
            state: Mutex::default(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    pub fn set_rates(&self, rates: StoreFaultRates) {
        self.lock().rates = rates;
    }

    /// Faults that fired, by name (`store_fail`, `store_fail_after`, `store_timeout`).
    pub fn fired(&self) -> BTreeMap<&'static str, u64> {
        self.lock().fired.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Which fault, if any, this commit gets. No draw while every rate is 0, so a run without
    /// store faults draws the same numbers as before they existed.
    fn draw(&self) -> Option<&'static str> {
        let r = self.lock().rates;
        if r.fail <= 0.0 && r.fail_after <= 0.0 && r.timeout <= 0.0 {
            return None;
        }
        let x: f64 = self.rng.lock().unwrap_or_else(|e| e.into_inner()).gen();
        let pick = if x < r.fail {
            "store_fail"
        } else if x < r.fail + r.fail_after {
            "store_fail_after"
        } else if x < r.fail + r.fail_after + r.timeout {
            "store_timeout"
        } else {
            return None;
        };
        *self.lock().fired.entry(pick).or_default() += 1;
        Some(pick)
    }
}

fn injected(what: &str) -> StoreError {
    StoreError::Backend(format!("{what} (injected)"))
}

#[async_trait]
impl Store for FaultyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
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
        match self.draw() {
            None => self.inner.commit(batch).await,
            Some("store_fail") => Err(injected("commit failed before applying")),
            Some("store_fail_after") => {
                self.inner.commit(batch).await?;
                Err(injected("commit applied, its answer lost"))
            }
            Some(_) => {
                let slow = self.lock().rates.slow;
                tokio::time::sleep(slow).await;
                Err(injected("commit timed out"))
            }
        }
    }
    async fn get_with(
        &self,
        kind: &str,
        uuid: Uuid,
        read: &mut ReadRecord<'_>,
    ) -> Result<bool, StoreError> {
        self.inner.get_with(kind, uuid, read).await
    }
    async fn query_with(&self, q: &Query, read: &mut ReadRecord<'_>) -> Result<(), StoreError> {
        self.inner.query_with(q, read).await
    }
}
