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

/// A jobs database as the first release left it reads and takes log entries after the upgrade.
#[tokio::test]
async fn job_upgrades_keep_events_and_rounds() {
    let (_dir, url) = temp_url();
    let opts = DatabaseOptions::default();
    let first = cohort_store::conformance::first_release(
        sqlx::migrate!("./migrations/sqlite/jobs"),
        "_sqlx_migrations_jobs",
    );
    let pool = cohort_store::open_sqlite(&url, &first, &opts)
        .await
        .unwrap();
    for stmt in cohort_store::conformance::jobs::FIRST_RELEASE_JOB_ROWS {
        sqlx::query(stmt).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let jobs = cohort_store::open_job_store(&url, &opts).await.unwrap();
    cohort_store::conformance::jobs::check_first_release_job(jobs.as_ref()).await;
}
