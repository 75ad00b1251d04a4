//! `ClientStore` on PostgreSQL.

use async_trait::async_trait;
use cohort_core::PartyId;
use sqlx::postgres::{PgPool, PgRow};

use super::{column, open_pool, unsigned, with_history_table};
use crate::clients::{
    ClientRecord, ClientStats, ClientStore, DatasetEntry, ResourcesEntry, TaskOutcome,
};
use crate::{DatabaseOptions, Result, StoreError};

pub struct PgClientStore {
    pool: PgPool,
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

const SELECT: &str = "SELECT c.party, c.datasets_json, c.resources_json, c.first_seen_ms, \
    c.last_seen_ms, s.tasks_offered, s.tasks_accepted, s.tasks_succeeded, s.tasks_failed \
    FROM clients c JOIN client_stats s ON s.party = c.party";

fn client_from_row(row: &PgRow) -> Result<ClientRecord> {
    let party: String = column(row, "party", WHAT, "?")?;
    let corrupt = |field: &str, m: String| StoreError::Corrupt {
        what: WHAT,
        id: party.clone(),
        message: format!("{field}: {m}"),
    };
    let datasets: String = column(row, "datasets_json", WHAT, &party)?;
    let resources: String = column(row, "resources_json", WHAT, &party)?;
    Ok(ClientRecord {
        party: PartyId::parse(&party).map_err(|e| corrupt("party", e.to_string()))?,
        datasets: serde_json::from_str(&datasets)
            .map_err(|e| corrupt("datasets_json", e.to_string()))?,
        resources: serde_json::from_str(&resources)
            .map_err(|e| corrupt("resources_json", e.to_string()))?,
        first_seen_ms: column(row, "first_seen_ms", WHAT, &party)?,
        last_seen_ms: column(row, "last_seen_ms", WHAT, &party)?,
        stats: ClientStats {
            tasks_offered: unsigned(row, "tasks_offered", WHAT, &party)?,
            tasks_accepted: unsigned(row, "tasks_accepted", WHAT, &party)?,
            tasks_succeeded: unsigned(row, "tasks_succeeded", WHAT, &party)?,
            tasks_failed: unsigned(row, "tasks_failed", WHAT, &party)?,
        },
    })
}

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
        let mut tx = self.pool.begin().await?;
        // ON CONFLICT makes concurrent first registrations of one party safe.
        sqlx::query(
            "INSERT INTO clients (party, datasets_json, resources_json, first_seen_ms, last_seen_ms) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (party) DO UPDATE SET \
             datasets_json = excluded.datasets_json, resources_json = excluded.resources_json, \
             last_seen_ms = excluded.last_seen_ms",
        )
        .bind(party.as_str())
        .bind(&datasets)
        .bind(&resources)
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
        let record = client_from_row(&row)?;
        tx.commit().await?;
        Ok(record)
    }

    async fn get_client(&self, party: &PartyId) -> Result<ClientRecord> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE c.party = $1")))
            .bind(party.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| not_found(party))?;
        client_from_row(&row)
    }

    async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} ORDER BY c.party")))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(client_from_row).collect()
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
}
