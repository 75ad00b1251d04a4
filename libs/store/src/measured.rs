//! [`Measured`]: a store that forwards every call to another and records it in the
//! process's Prometheus registry. [`open`](crate::open) puts it on every store it opens, so
//! each service measures its store without a line of its own, whatever the backend.
//!
//! - `cohort_store_operation_duration_seconds{backend,store,operation}`: `operation` is the
//!   trait method's name (a `TokenStore` or `AuditStore` method is under `store="jobs"`)
//! - `cohort_store_errors_total{backend,store,operation,kind}`: `kind` is the error's
//!   [`ErrorKind`](cohort_core::ErrorKind) name (`unavailable`: the database is down)
//! - `cohort_store_pool_connections{backend,store,state=in_use|idle}`: read from the sqlx
//!   pools when `/metrics` is scraped. MongoDB has none: its driver keeps its pool to itself
//!   (only connection-pool events, which would need a listener of their own).
//!
//! Every label is a closed set: three backends, three stores, the traits' methods, the
//! error kinds.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use cohort_core::{HasKind, JobId, JobState, PartyId};
use cohort_metrics::{HistogramVec, IntCounterVec};
use sqlx::{PgPool, SqlitePool};

use crate::audit::{AuditFilter, AuditRecord, AuditStore, NewAuditEntry};
use crate::clients::{
    ClientRecord, ClientStore, DatasetEntry, ResourcesEntry, TaskOutcome, TaskResult,
};
use crate::jobs::{JobEventRecord, JobFilter, JobNote, JobRecord, JobStore, RoundRecord};
use crate::models::{ModelStore, ModelVersionRecord, NewModelVersion, StoredVersion};
use crate::tokens::{NewToken, TokenRecord, TokenStore};
use crate::{Page, Result};

static DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    cohort_metrics::histogram_vec(
        "store_operation_duration_seconds",
        "Time of a metadata store call, by backend, store and trait method.",
        &["backend", "store", "operation"],
        cohort_metrics::DURATION_BUCKETS,
    )
});

static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    cohort_metrics::counter_vec(
        "store_errors_total",
        "Metadata store calls that failed, by the error's kind (unavailable: the database).",
        &["backend", "store", "operation", "kind"],
    )
});

/// The pools of the stores open in this process, read at each scrape.
static POOLS: LazyLock<Mutex<Vec<PoolEntry>>> = LazyLock::new(|| {
    cohort_metrics::sampled_int_gauge_vec(
        "store_pool_connections",
        "Connections of the metadata store's pools (sqlx: SQLite, PostgreSQL), in use or idle.",
        &["backend", "store", "state"],
        |gauge| {
            for entry in lock(&POOLS).iter() {
                let (size, idle) = match &entry.pool {
                    Pool::Sqlite(p) => (p.size(), p.num_idle()),
                    Pool::Postgres(p) => (p.size(), p.num_idle()),
                };
                let idle = i64::try_from(idle).unwrap_or(i64::MAX);
                let in_use = (i64::from(size) - idle).max(0);
                // add, not set: two stores of one kind in a process (tests) sum up.
                gauge
                    .with_label_values(&[entry.backend, entry.store, "in_use"])
                    .add(in_use);
                gauge
                    .with_label_values(&[entry.backend, entry.store, "idle"])
                    .add(idle);
            }
        },
    );
    Mutex::new(Vec::new())
});

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A sqlx pool whose connections are shown (a clone: the same pool).
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

struct PoolEntry {
    id: u64,
    backend: &'static str,
    store: &'static str,
    pool: Pool,
}

/// Shows a pool on `/metrics` while it lives; dropped with its store.
struct PoolShown(u64);

impl PoolShown {
    fn new(backend: &'static str, store: &'static str, pool: Pool) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        lock(&POOLS).push(PoolEntry {
            id,
            backend,
            store,
            pool,
        });
        Self(id)
    }
}

impl Drop for PoolShown {
    fn drop(&mut self) {
        lock(&POOLS).retain(|e| e.id != self.0);
    }
}

/// A store that measures the one it wraps: `Measured<dyn JobStore>`,
/// `Measured<dyn ModelStore>`, `Measured<dyn ClientStore>`.
pub struct Measured<S: ?Sized> {
    inner: Arc<S>,
    backend: &'static str,
    store: &'static str,
    _pool: Option<PoolShown>,
}

impl<S: ?Sized> Measured<S> {
    /// `backend` is `sqlite`, `postgres` or `mongodb`; `store` is `jobs`, `models` or
    /// `clients`; `pool` (sqlx backends) is shown as `cohort_store_pool_connections`.
    pub fn new(
        inner: Arc<S>,
        backend: &'static str,
        store: &'static str,
        pool: Option<Pool>,
    ) -> Self {
        Self {
            inner,
            backend,
            store,
            _pool: pool.map(|p| PoolShown::new(backend, store, p)),
        }
    }

    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        let result = call.await;
        DURATION
            .with_label_values(&[self.backend, self.store, operation])
            .observe(start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            ERRORS
                .with_label_values(&[self.backend, self.store, operation, e.kind().name()])
                .inc();
        }
        result
    }
}

#[async_trait]
impl JobStore for Measured<dyn JobStore> {
    async fn insert_job(&self, job: &JobRecord, reason: &str) -> Result<()> {
        self.call("insert_job", self.inner.insert_job(job, reason))
            .await
    }
    async fn get_job(&self, id: &JobId) -> Result<JobRecord> {
        self.call("get_job", self.inner.get_job(id)).await
    }
    async fn list_jobs(
        &self,
        filter: &JobFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<Page<JobRecord>> {
        self.call(
            "list_jobs",
            self.inner.list_jobs(filter, page_size, page_token),
        )
        .await
    }
    async fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<JobRecord>> {
        self.call("jobs_in_states", self.inner.jobs_in_states(states))
            .await
    }
    async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        self.call("count_jobs_by_state", self.inner.count_jobs_by_state())
            .await
    }
    async fn update_job(&self, job: &JobRecord, now_ms: i64) -> Result<JobRecord> {
        self.call("update_job", self.inner.update_job(job, now_ms))
            .await
    }
    async fn record_round(
        &self,
        id: &JobId,
        round: &RoundRecord,
        now_ms: i64,
    ) -> Result<JobRecord> {
        self.call("record_round", self.inner.record_round(id, round, now_ms))
            .await
    }
    async fn list_rounds(&self, id: &JobId) -> Result<Vec<RoundRecord>> {
        self.call("list_rounds", self.inner.list_rounds(id)).await
    }
    async fn list_events(&self, id: &JobId, after_seq: u64) -> Result<Vec<JobEventRecord>> {
        self.call("list_events", self.inner.list_events(id, after_seq))
            .await
    }
    async fn append_notes(
        &self,
        id: &JobId,
        notes: &[JobNote],
        max_per_job: u64,
        now_ms: i64,
    ) -> Result<u32> {
        self.call(
            "append_notes",
            self.inner.append_notes(id, notes, max_per_job, now_ms),
        )
        .await
    }
    async fn delete_job(&self, id: &JobId) -> Result<()> {
        self.call("delete_job", self.inner.delete_job(id)).await
    }
}

#[async_trait]
impl TokenStore for Measured<dyn JobStore> {
    async fn insert_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord> {
        self.call("insert_token", self.inner.insert_token(t, now_ms))
            .await
    }
    async fn ensure_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord> {
        self.call("ensure_token", self.inner.ensure_token(t, now_ms))
            .await
    }
    async fn token_by_sha256(&self, sha256: &str) -> Result<TokenRecord> {
        self.call("token_by_sha256", self.inner.token_by_sha256(sha256))
            .await
    }
    async fn get_token(&self, id: &str) -> Result<TokenRecord> {
        self.call("get_token", self.inner.get_token(id)).await
    }
    async fn list_tokens(&self, namespace: Option<&str>) -> Result<Vec<TokenRecord>> {
        self.call("list_tokens", self.inner.list_tokens(namespace))
            .await
    }
    async fn delete_token(&self, id: &str) -> Result<()> {
        self.call("delete_token", self.inner.delete_token(id)).await
    }
}

#[async_trait]
impl AuditStore for Measured<dyn JobStore> {
    async fn append_audit(&self, entry: NewAuditEntry, now_ms: i64) -> Result<AuditRecord> {
        self.call("append_audit", self.inner.append_audit(entry, now_ms))
            .await
    }
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<Page<AuditRecord>> {
        self.call(
            "list_audit",
            self.inner.list_audit(filter, page_size, page_token),
        )
        .await
    }
}

#[async_trait]
impl ModelStore for Measured<dyn ModelStore> {
    async fn insert_version(&self, v: NewModelVersion, now_ms: i64) -> Result<StoredVersion> {
        self.call("insert_version", self.inner.insert_version(v, now_ms))
            .await
    }
    async fn round_version(
        &self,
        namespace: &str,
        name: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<ModelVersionRecord>> {
        self.call(
            "round_version",
            self.inner.round_version(namespace, name, job_id, round),
        )
        .await
    }
    async fn get_version(
        &self,
        namespace: &str,
        name: &str,
        version: u32,
    ) -> Result<ModelVersionRecord> {
        self.call(
            "get_version",
            self.inner.get_version(namespace, name, version),
        )
        .await
    }
    async fn latest_version(&self, namespace: &str, name: &str) -> Result<ModelVersionRecord> {
        self.call("latest_version", self.inner.latest_version(namespace, name))
            .await
    }
    async fn list_versions(
        &self,
        name: Option<&str>,
        job_id: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Vec<ModelVersionRecord>> {
        self.call(
            "list_versions",
            self.inner.list_versions(name, job_id, namespace),
        )
        .await
    }
}

#[async_trait]
impl ClientStore for Measured<dyn ClientStore> {
    async fn upsert_client(
        &self,
        party: &PartyId,
        datasets: &[DatasetEntry],
        resources: &ResourcesEntry,
        now_ms: i64,
    ) -> Result<ClientRecord> {
        self.call(
            "upsert_client",
            self.inner.upsert_client(party, datasets, resources, now_ms),
        )
        .await
    }
    async fn get_client(&self, party: &PartyId) -> Result<ClientRecord> {
        self.call("get_client", self.inner.get_client(party)).await
    }
    async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        self.call("list_clients", self.inner.list_clients()).await
    }
    async fn touch(&self, party: &PartyId, now_ms: i64) -> Result<()> {
        self.call("touch", self.inner.touch(party, now_ms)).await
    }
    async fn count_task(&self, party: &PartyId, outcome: TaskOutcome) -> Result<()> {
        self.call("count_task", self.inner.count_task(party, outcome))
            .await
    }
    async fn record_task_result(
        &self,
        party: &PartyId,
        result: TaskResult,
        now_ms: i64,
    ) -> Result<()> {
        self.call(
            "record_task_result",
            self.inner.record_task_result(party, result, now_ms),
        )
        .await
    }
    async fn revoke_client(&self, party: &PartyId, now_ms: i64) -> Result<ClientRecord> {
        self.call("revoke_client", self.inner.revoke_client(party, now_ms))
            .await
    }
    async fn list_revoked(&self) -> Result<Vec<PartyId>> {
        self.call("list_revoked", self.inner.list_revoked()).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::DatabaseOptions;
    use crate::clients::SqliteClientStore;

    fn calls(backend: &str, store: &str, operation: &str) -> u64 {
        DURATION
            .with_label_values(&[backend, store, operation])
            .get_sample_count()
    }

    fn errors(backend: &str, store: &str, operation: &str, kind: &str) -> u64 {
        ERRORS
            .with_label_values(&[backend, store, operation, kind])
            .get()
    }

    // The registry is the process's, shared by tests: this one uses its own backend label.
    #[tokio::test]
    async fn calls_are_counted_with_their_labels_and_the_pool_is_shown() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let sqlite = SqliteClientStore::open_with(&url, &DatabaseOptions::default())
            .await
            .unwrap();
        let pool = Pool::Sqlite(sqlite.pool.clone());
        let store = Measured::<dyn ClientStore>::new(
            Arc::new(sqlite),
            "test-sqlite",
            "clients",
            Some(pool),
        );
        let party = PartyId::parse("p1").unwrap();

        assert!(store.list_clients().await.unwrap().is_empty());
        assert_eq!(calls("test-sqlite", "clients", "list_clients"), 1);
        assert!(store.get_client(&party).await.is_err());
        assert_eq!(calls("test-sqlite", "clients", "get_client"), 1);
        assert_eq!(
            errors("test-sqlite", "clients", "get_client", "not_found"),
            1
        );
        assert_eq!(
            errors("test-sqlite", "clients", "list_clients", "not_found"),
            0
        );
        assert_eq!(calls("test-sqlite", "models", "list_clients"), 0);

        let text = cohort_metrics::render();
        let shown = |state: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("cohort_store_pool_connections{")
                        && l.contains("backend=\"test-sqlite\"")
                        && l.contains(&format!("state=\"{state}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
        };
        let (in_use, idle) = (shown("in_use").unwrap(), shown("idle").unwrap());
        assert!(in_use + idle >= 1, "the pool holds a connection: {text}");
        assert!(text.contains(
            "cohort_store_operation_duration_seconds_count{backend=\"test-sqlite\",operation=\"get_client\",store=\"clients\"} 1"
        ));

        drop(store);
        let text = cohort_metrics::render();
        assert!(
            !text.contains("backend=\"test-sqlite\",state="),
            "a closed store's pool is no longer shown: {text}"
        );
    }
}
