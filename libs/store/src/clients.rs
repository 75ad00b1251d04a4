//! The client store, owned by client-selector: registered parties, what they
//! hold, their reliability history, and whether they are revoked.

use async_trait::async_trait;
use cohort_core::PartyId;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::SqlitePool;

use crate::{DatabaseOptions, Result, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetEntry {
    pub name: String,
    pub samples: u64,
    pub features: u32,
    pub classes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ResourcesEntry {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
    pub max_tasks: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientStats {
    pub tasks_offered: u64,
    pub tasks_accepted: u64,
    pub tasks_succeeded: u64,
    pub tasks_failed: u64,
}

/// What became of one of a party's training tasks, as the coordinator that offered it judged
/// at its round's end (never the party's own word): its update was aggregated, it failed (the
/// party said so, its update was refused, or it left), or the round ended without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskResult {
    Finished,
    Failed,
    TimedOut,
}

/// How much an outcome's weight in the recent counts shrinks with each later outcome of the
/// same party: the recent counts weigh about the last ten (at most 1 / (1 − 0.9) = 10 in all).
pub const RELIABILITY_DECAY: f64 = 0.9;

/// A party's record of training tasks: what client-selector's `reliability` selection reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reliability {
    pub finished: u64,
    pub failed: u64,
    pub timed_out: u64,
    /// Recency-weighted counts of finished and of failed or timed-out tasks: each outcome
    /// first multiplies both by [`RELIABILITY_DECAY`], then adds one to its own.
    pub recent_finished: f64,
    pub recent_unfinished: f64,
    /// When the last outcome was recorded (0: never).
    pub last_result_ms: i64,
}

impl Reliability {
    /// This record after `result` at `now_ms`: what every backend stores (the conformance
    /// suite checks them against it).
    pub fn after(&self, result: TaskResult, now_ms: i64) -> Reliability {
        let mut r = self.clone();
        let finished = f64::from(u8::from(result == TaskResult::Finished));
        r.recent_finished = r.recent_finished * RELIABILITY_DECAY + finished;
        r.recent_unfinished = r.recent_unfinished * RELIABILITY_DECAY + (1.0 - finished);
        match result {
            TaskResult::Finished => r.finished += 1,
            TaskResult::Failed => r.failed += 1,
            TaskResult::TimedOut => r.timed_out += 1,
        }
        r.last_result_ms = r.last_result_ms.max(now_ms);
        r
    }
}

/// The SQL column of a result's counter (SQLite and PostgreSQL).
pub(crate) fn result_column(result: TaskResult) -> &'static str {
    match result {
        TaskResult::Finished => "results_finished",
        TaskResult::Failed => "results_failed",
        TaskResult::TimedOut => "results_timed_out",
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientRecord {
    pub party: PartyId,
    pub datasets: Vec<DatasetEntry>,
    pub resources: ResourcesEntry,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// When the party was revoked (None: it is not). Registering or being
    /// seen again never lifts a revocation.
    pub revoked_at_ms: Option<i64>,
    pub stats: ClientStats,
    /// Training tasks as their coordinators judged them (`record_task_result`).
    pub reliability: Reliability,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    Offered,
    Accepted,
    Succeeded,
    Failed,
}

#[async_trait]
pub trait ClientStore: Send + Sync + 'static {
    /// Records a registration: creates the party or replaces what it holds.
    /// Keeps first_seen, the counters and any revocation.
    async fn upsert_client(
        &self,
        party: &PartyId,
        datasets: &[DatasetEntry],
        resources: &ResourcesEntry,
        now_ms: i64,
    ) -> Result<ClientRecord>;
    async fn get_client(&self, party: &PartyId) -> Result<ClientRecord>;
    async fn list_clients(&self) -> Result<Vec<ClientRecord>>;
    /// Moves last_seen forward (never back). NotFound if the party is unknown.
    async fn touch(&self, party: &PartyId, now_ms: i64) -> Result<()>;
    /// Adds one to the counter of `outcome` (atomic: no lost increments).
    async fn count_task(&self, party: &PartyId, outcome: TaskOutcome) -> Result<()>;
    /// Records what became of one of the party's training tasks (atomic: concurrent results
    /// lose no count, and the recent counts' total is the same in any order). NotFound if
    /// the party is unknown.
    async fn record_task_result(
        &self,
        party: &PartyId,
        result: TaskResult,
        now_ms: i64,
    ) -> Result<()>;
    /// Revokes the party at `now_ms` and returns its record. A party that
    /// never registered gets a record (no datasets, default resources, first
    /// and last seen = `now_ms`), so it can be revoked before it connects.
    /// Idempotent: revoking again keeps the first `revoked_at_ms`.
    async fn revoke_client(&self, party: &PartyId, now_ms: i64) -> Result<ClientRecord>;
    /// The revoked parties' names, bytewise ordered. Reads only those (an index covers them):
    /// the proxy asks for this every few seconds.
    async fn list_revoked(&self) -> Result<Vec<PartyId>>;
}

/// The holdings a party revoked before it ever registered is recorded with,
/// as the SQL backends store them.
pub(crate) fn unregistered_json() -> Result<(String, String)> {
    let datasets: &[DatasetEntry] = &[];
    let datasets = serde_json::to_string(datasets)
        .map_err(|e| StoreError::Conflict(format!("client datasets: {e}")))?;
    let resources = serde_json::to_string(&ResourcesEntry::default())
        .map_err(|e| StoreError::Conflict(format!("client resources: {e}")))?;
    Ok((datasets, resources))
}

/// The revoked parties, in both SQL dialects (the partial index `clients_revoked` covers it;
/// `party` orders bytewise in both, as in `list_clients`).
pub(crate) const REVOKED: &str =
    "SELECT party FROM clients WHERE revoked_at_ms IS NOT NULL ORDER BY party";

pub struct SqliteClientStore {
    pub(crate) pool: SqlitePool,
}

const HISTORY_TABLE: &str = "_sqlx_migrations_clients";

impl SqliteClientStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://PATH`)
    /// with default pool settings and applies the clients migrations.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &DatabaseOptions::default()).await
    }

    pub async fn open_with(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        let mut migrator = sqlx::migrate!("./migrations/sqlite/clients");
        // Own history table, so the stores can share a database.
        migrator.dangerous_set_table_name(HISTORY_TABLE);
        Ok(Self {
            pool: crate::sqlite::open_store(url, &migrator, HISTORY_TABLE, opts).await?,
        })
    }
}

/// A client's columns, in both SQL dialects.
pub(crate) const SELECT: &str = "SELECT c.party, c.datasets_json, c.resources_json, \
    c.first_seen_ms, c.last_seen_ms, c.revoked_at_ms, s.tasks_offered, s.tasks_accepted, \
    s.tasks_succeeded, s.tasks_failed, s.results_finished, s.results_failed, \
    s.results_timed_out, s.recent_finished, s.recent_unfinished, s.last_result_ms \
    FROM clients c JOIN client_stats s ON s.party = c.party";

fn not_found(party: &PartyId) -> StoreError {
    StoreError::NotFound {
        what: "client",
        id: party.to_string(),
    }
}

#[async_trait]
impl ClientStore for SqliteClientStore {
    async fn upsert_client(
        &self,
        party: &PartyId,
        datasets: &[DatasetEntry],
        resources: &ResourcesEntry,
        now_ms: i64,
    ) -> Result<ClientRecord> {
        let datasets = serde_json::to_string(datasets)
            .map_err(|e| StoreError::Conflict(format!("client {party} datasets: {e}")))?;
        let resources = serde_json::to_string(resources)
            .map_err(|e| StoreError::Conflict(format!("client {party} resources: {e}")))?;
        // IMMEDIATE: take the write lock up front rather than fail to upgrade.
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        write_client(
            tx,
            "INSERT INTO clients (party, datasets_json, resources_json, first_seen_ms, last_seen_ms) \
             VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (party) DO UPDATE SET \
             datasets_json = excluded.datasets_json, resources_json = excluded.resources_json, \
             last_seen_ms = excluded.last_seen_ms",
            party,
            &datasets,
            &resources,
            now_ms,
        )
        .await
    }

    async fn get_client(&self, party: &PartyId) -> Result<ClientRecord> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE c.party = ?1")))
            .bind(party.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| not_found(party))?;
        crate::rows::client(&row)
    }

    async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} ORDER BY c.party")))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(crate::rows::client).collect()
    }

    async fn list_revoked(&self) -> Result<Vec<PartyId>> {
        let rows = sqlx::query(REVOKED).fetch_all(&self.pool).await?;
        rows.iter().map(crate::rows::party).collect()
    }

    async fn touch(&self, party: &PartyId, now_ms: i64) -> Result<()> {
        let n =
            sqlx::query("UPDATE clients SET last_seen_ms = MAX(last_seen_ms, ?2) WHERE party = ?1")
                .bind(party.as_str())
                .bind(now_ms)
                .execute(&self.pool)
                .await?
                .rows_affected();
        if n == 0 {
            return Err(not_found(party));
        }
        Ok(())
    }

    async fn count_task(&self, party: &PartyId, outcome: TaskOutcome) -> Result<()> {
        let column = match outcome {
            TaskOutcome::Offered => "tasks_offered",
            TaskOutcome::Accepted => "tasks_accepted",
            TaskOutcome::Succeeded => "tasks_succeeded",
            TaskOutcome::Failed => "tasks_failed",
        };
        let n = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE client_stats SET {column} = {column} + 1 WHERE party = ?1"
        )))
        .bind(party.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(not_found(party));
        }
        Ok(())
    }

    async fn record_task_result(
        &self,
        party: &PartyId,
        result: TaskResult,
        now_ms: i64,
    ) -> Result<()> {
        let column = result_column(result);
        let finished = f64::from(u8::from(result == TaskResult::Finished));
        // One statement reads and writes the row: no lost update.
        let n = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE client_stats SET {column} = {column} + 1, \
             recent_finished = recent_finished * ?2 + ?3, \
             recent_unfinished = recent_unfinished * ?2 + ?4, \
             last_result_ms = MAX(last_result_ms, ?5) WHERE party = ?1"
        )))
        .bind(party.as_str())
        .bind(RELIABILITY_DECAY)
        .bind(finished)
        .bind(1.0 - finished)
        .bind(now_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(not_found(party));
        }
        Ok(())
    }

    async fn revoke_client(&self, party: &PartyId, now_ms: i64) -> Result<ClientRecord> {
        let (datasets, resources) = unregistered_json()?;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // A known party keeps its first revocation; an unknown one is created revoked.
        write_client(
            tx,
            "INSERT INTO clients (party, datasets_json, resources_json, first_seen_ms, \
             last_seen_ms, revoked_at_ms) VALUES (?1, ?2, ?3, ?4, ?4, ?4) \
             ON CONFLICT (party) DO UPDATE SET \
             revoked_at_ms = COALESCE(clients.revoked_at_ms, excluded.revoked_at_ms)",
            party,
            &datasets,
            &resources,
            now_ms,
        )
        .await
    }
}

/// Runs `upsert` (binding party, datasets, resources, now), makes sure the
/// party has a stats row, reads the record back and commits.
async fn write_client(
    mut tx: sqlx::Transaction<'_, sqlx::Sqlite>,
    upsert: &'static str,
    party: &PartyId,
    datasets: &str,
    resources: &str,
    now_ms: i64,
) -> Result<ClientRecord> {
    sqlx::query(upsert)
        .bind(party.as_str())
        .bind(datasets)
        .bind(resources)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT OR IGNORE INTO client_stats (party) VALUES (?1)")
        .bind(party.as_str())
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE c.party = ?1")))
        .bind(party.as_str())
        .fetch_one(&mut *tx)
        .await?;
    let record = crate::rows::client(&row)?;
    tx.commit().await?;
    Ok(record)
}
