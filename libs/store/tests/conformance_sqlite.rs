//! The store conformance suite on SQLite: a fresh database file per test.

#![allow(clippy::unwrap_used)]

use cohort_store::DatabaseOptions;
use cohort_store::clients::ClientStore;
use cohort_store::conformance::Fresh;
use cohort_store::jobs::JobStore;
use cohort_store::models::ModelStore;

fn temp_url() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    (dir, url)
}

async fn fresh_jobs() -> Option<Fresh<dyn JobStore>> {
    let (dir, url) = temp_url();
    let store = cohort_store::open_job_store(&url, &DatabaseOptions::default())
        .await
        .unwrap();
    Some(Fresh::new(store, dir))
}

async fn fresh_models() -> Option<Fresh<dyn ModelStore>> {
    let (dir, url) = temp_url();
    let store = cohort_store::open_model_store(&url, &DatabaseOptions::default())
        .await
        .unwrap();
    Some(Fresh::new(store, dir))
}

async fn fresh_clients() -> Option<Fresh<dyn ClientStore>> {
    let (dir, url) = temp_url();
    let store = cohort_store::open_client_store(&url, &DatabaseOptions::default())
        .await
        .unwrap();
    Some(Fresh::new(store, dir))
}

cohort_store::job_store_conformance!(jobs, fresh_jobs());
cohort_store::model_store_conformance!(models, fresh_models());
cohort_store::client_store_conformance!(clients, fresh_clients());
