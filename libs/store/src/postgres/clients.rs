//! `ClientStore` on PostgreSQL.

use async_trait::async_trait;
use cohort_core::PartyId;
use sqlx::postgres::PgPool;

use super::{open_pool, with_history_table};
use crate::clients::{
    ClientRecord, ClientStore, DatasetEntry, RELIABILITY_DECAY, ResourcesEntry, SELECT,
    TaskOutcome, TaskResult, result_column,
};
use crate::{DatabaseOptions, Result, StoreError};

pub struct PgClientStore {
    pub(crate) pool: PgPool,
}

impl PgClientStore {
    /// Connects to `url` (`postgres://...`) and applies the clients migrations.
    pub async fn open(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        let migrator = with_history_table(
            sqlx::migrate!("./migrations/postgres/clients"),
            "_sqlx_migrations_clients",
        );
        Ok(Self {
            pool: open_pool(url, &migrator, opts).await?,
        })
    }
}

const WHAT: &str = "client";

fn not_found(party: &PartyId) -> StoreError {
    StoreError::NotFound {
        what: WHAT,
        id: party.to_string(),
    }
}

#[async_trait]
impl ClientStore for PgClientStore {
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
        let tx = self.pool.begin().await?;
        // ON CONFLICT makes concurrent first registrations of one party safe.
        write_client(
            tx,
            "INSERT INTO clients (party, datasets_json, resources_json, first_seen_ms, last_seen_ms) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (party) DO UPDATE SET \
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
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE c.party = $1")))
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
        let rows = sqlx::query(crate::clients::REVOKED)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(crate::rows::party).collect()
    }

    async fn touch(&self, party: &PartyId, now_ms: i64) -> Result<()> {
        let n = sqlx::query(
            "UPDATE clients SET last_seen_ms = GREATEST(last_seen_ms, $2) WHERE party = $1",
        )
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
        // One UPDATE reads and writes under the row lock: no lost increments.
        let n = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE client_stats SET {column} = {column} + 1 WHERE party = $1"
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
        // One UPDATE reads and writes under the row lock: no lost update.
        let n = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE client_stats SET {column} = {column} + 1, \
             recent_finished = recent_finished * $2 + $3, \
             recent_unfinished = recent_unfinished * $2 + $4, \
             last_result_ms = GREATEST(last_result_ms, $5) WHERE party = $1"
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
        let (datasets, resources) = crate::clients::unregistered_json()?;
        let tx = self.pool.begin().await?;
        // One statement under the row lock: a known party keeps its first
        // revocation, an unknown one is created revoked (concurrent first
        // revocations included).
        write_client(
            tx,
            "INSERT INTO clients (party, datasets_json, resources_json, first_seen_ms, \
             last_seen_ms, revoked_at_ms) VALUES ($1, $2, $3, $4, $4, $4) \
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
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
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
    sqlx::query("INSERT INTO client_stats (party) VALUES ($1) ON CONFLICT (party) DO NOTHING")
        .bind(party.as_str())
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE c.party = $1")))
        .bind(party.as_str())
        .fetch_one(&mut *tx)
        .await?;
    let record = crate::rows::client(&row)?;
    tx.commit().await?;
    Ok(record)
}
