//! The conformance suite on the SQL backends (std build only).
//!
//! SQLite runs on a fresh file. PostgreSQL runs when `STRATUS_TEST_PG_URL` is set (`ci/test`
//! starts its own server and sets it); under `CI=true` a missing URL is a failure, not a skip.
#![cfg(not(madsim))]

use std::sync::Arc;
use stratus_store::sql::SqlStore;
use stratus_store::{conformance, Store};

fn temp_db(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stratus-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_passes_the_conformance_suite() {
    let path = temp_db("conformance.db");
    let _ = std::fs::remove_file(&path);
    let store = SqlStore::open_sqlite(&path, conformance::schema())
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    conformance::run_all(store.clone()).await;
    // Reopening an existing database keeps the rows and re-runs nothing destructive.
    drop(store);
    let again = SqlStore::open(
        &format!("sqlite://{}", path.display()),
        conformance::schema(),
    )
    .await
    .unwrap();
    conformance::run_all(Arc::new(again)).await;
    // The directory is this process's own: it goes with the test.
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_passes_the_conformance_suite() {
    let Ok(url) = std::env::var("STRATUS_TEST_PG_URL") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI is set but STRATUS_TEST_PG_URL is not: ci/test must start PostgreSQL"
        );
        eprintln!("STRATUS_TEST_PG_URL not set; skipping the PostgreSQL conformance run");
        return;
    };
    let store = SqlStore::open(&url, conformance::schema()).await.unwrap();
    conformance::run_all(Arc::new(store)).await;
}

#[tokio::test]
async fn bad_database_urls_are_refused_with_a_clear_error() {
    let err = SqlStore::open("mysql://x", conformance::schema())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("unsupported database URL"),
        "{err}"
    );
}
