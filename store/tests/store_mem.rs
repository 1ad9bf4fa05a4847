//! The conformance suite on the in-memory backend (runs in both builds).

use std::sync::Arc;
use stratus_store::{conformance, MemStore, Store};

#[tokio::test]
async fn mem_store_passes_the_conformance_suite() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new(conformance::schema()));
    conformance::run_all(store).await;
}
