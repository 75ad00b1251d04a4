//! Opening SQLite databases from `sqlite://` URLs.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::{DatabaseOptions, Result, StoreError, redact_url};

/// Opens (creating if missing) the database at `url` (`sqlite://PATH` or
/// `sqlite::memory:`) in WAL mode, and applies `migrator`.
pub async fn open_sqlite(
    url: &str,
    migrator: &sqlx::migrate::Migrator,
    opts: &DatabaseOptions,
) -> Result<SqlitePool> {
    let pool = connect(url, opts).await?;
    migrate(&pool, url, migrator).await?;
    Ok(pool)
}

/// [`open_sqlite`] for one of this crate's stores, whose migrations history
/// lives in `history_table`.
pub(crate) async fn open_store(
    url: &str,
    migrator: &sqlx::migrate::Migrator,
    history_table: &str,
    opts: &DatabaseOptions,
) -> Result<SqlitePool> {
    let pool = connect(url, opts).await?;
    adopt_legacy_history(&pool, history_table).await?;
    migrate(&pool, url, migrator).await?;
    Ok(pool)
}

async fn connect(url: &str, opts: &DatabaseOptions) -> Result<SqlitePool> {
    if !url.starts_with("sqlite:") {
        return Err(StoreError::InvalidUrl {
            url: redact_url(url),
            message: "expected sqlite://PATH".to_string(),
        });
    }
    let connect = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::InvalidUrl {
            url: redact_url(url),
            message: e.to_string(),
        })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        // Writers queue on the file lock rather than fail at once.
        .busy_timeout(opts.acquire_timeout.max(Duration::from_secs(1)))
        .foreign_keys(true);
    let in_memory = url.contains(":memory:");
    SqlitePoolOptions::new()
        // One connection for in-memory databases: each connection would see its own.
        .max_connections(if in_memory {
            1
        } else {
            opts.max_connections.max(1)
        })
        .acquire_timeout(opts.acquire_timeout)
        .connect_with(connect)
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", redact_url(url))))
}

async fn migrate(pool: &SqlitePool, url: &str, migrator: &sqlx::migrate::Migrator) -> Result<()> {
    migrator
        .run(pool)
        .await
        .map_err(|e| StoreError::Unavailable(format!("migrating {}: {e}", redact_url(url))))
}

/// Databases created before each store had its own history table recorded
/// their migrations in `_sqlx_migrations`; renaming it keeps them from being
/// applied twice. Only the jobs and clients stores used the shared name, and
/// each had its own database file, so the old table belongs to whichever
/// store's tables the file holds.
async fn adopt_legacy_history(pool: &SqlitePool, table: &str) -> Result<()> {
    let owned = match table {
        "_sqlx_migrations_jobs" => "jobs",
        "_sqlx_migrations_clients" => "clients",
        _ => return Ok(()),
    };
    let present: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN (?1, ?2, '_sqlx_migrations')",
    )
    .bind(table)
    .bind(owned)
    .fetch_all(pool)
    .await?;
    let has = |n: &str| present.iter().any(|p| p == n);
    if has("_sqlx_migrations") && has(owned) && !has(table) {
        tracing::info!(table, "adopting the legacy _sqlx_migrations history");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE _sqlx_migrations RENAME TO {table}"
        )))
        .execute(pool)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clients::{ClientStore, SqliteClientStore};
    use crate::jobs::{JobStore, SqliteJobStore};
    use crate::models::{ModelStore, SqliteModelStore};
    use crate::tokens::TokenStore;

    fn temp_url() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
        (dir, url)
    }

    #[tokio::test]
    async fn databases_with_the_shared_history_table_are_adopted() {
        let (_dir, url) = temp_url();
        // The layout before each store had its own history table.
        let legacy = sqlx::migrate!("./migrations/sqlite/jobs");
        let pool = open_sqlite(&url, &legacy, &DatabaseOptions::default())
            .await
            .unwrap();
        let job = crate::conformance::jobs::job("old", "default");
        sqlx::query(
            "INSERT INTO jobs (id, name, namespace, spec_json, state, rounds_total, \
             created_at_ms, updated_at_ms) VALUES (?1, 'old', 'default', '{}', 'QUEUED', 3, 1, 1)",
        )
        .bind(job.id.as_str())
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = SqliteJobStore::open(&url).await.unwrap();
        assert_eq!(store.get_job(&job.id).await.unwrap().name, "old");
        drop(store);
        // And again, now from the store's own table.
        let store = SqliteJobStore::open(&url).await.unwrap();
        assert_eq!(store.get_job(&job.id).await.unwrap().name, "old");
    }

    #[tokio::test]
    async fn upgrades_keep_existing_rows() {
        let (_dir, url) = temp_url();
        let opts = DatabaseOptions::default();
        let old = [
            crate::conformance::first_release(
                sqlx::migrate!("./migrations/sqlite/jobs"),
                "_sqlx_migrations_jobs",
            ),
            crate::conformance::first_release(
                sqlx::migrate!("./migrations/sqlite/models"),
                "_sqlx_migrations_models",
            ),
            crate::conformance::first_release(
                sqlx::migrate!("./migrations/sqlite/clients"),
                "_sqlx_migrations_clients",
            ),
        ];
        for m in &old {
            assert_eq!(m.migrations.len(), 1);
            open_sqlite(&url, m, &opts).await.unwrap().close().await;
        }
        let pool = connect(&url, &opts).await.unwrap();
        for stmt in [
            "INSERT INTO models (name, created_at_ms) VALUES ('old', 1)",
            "INSERT INTO model_versions (name, version, digest, size_bytes, job_id, round, \
             parent_version, loss, accuracy, samples, created_at_ms) \
             VALUES ('old', 1, 'ab', 1, 'j', 1, 0, 0.5, 0.5, 1, 1)",
            "INSERT INTO clients (party, datasets_json, resources_json, first_seen_ms, \
             last_seen_ms) VALUES ('p', '[]', '{\"cpus\":1,\"memory_bytes\":2,\"gpus\":0,\"max_tasks\":1}', 1, 2)",
            "INSERT INTO client_stats (party, tasks_offered) VALUES ('p', 3)",
        ] {
            sqlx::query(stmt).execute(&pool).await.unwrap();
        }
        pool.close().await;

        let models = SqliteModelStore::open_with(&url, &opts).await.unwrap();
        let v1 = models.get_version("default", "old", 1).await.unwrap();
        assert_eq!(v1.namespace, "default", "existing models are in default");
        // Round 1 of job j is stored: a retry finds it; round 3 is new.
        let old_round = crate::conformance::models::in_round(
            crate::conformance::models::new_version("old", "j"),
            1,
        );
        let again = models.insert_version(old_round, 2).await.unwrap();
        assert_eq!((again.record, again.created), (v1.clone(), false));
        let v2 = crate::conformance::models::insert_new(
            &models,
            crate::conformance::models::new_version("old", "j"),
            2,
        )
        .await;
        assert_eq!((v2.version, v2.namespace.as_str()), (2, "default"));
        // Another namespace's model of the same name is a model of its own.
        let elsewhere = crate::conformance::models::new_version_in("old", "j", "team-a");
        let other = crate::conformance::models::insert_new(&models, elsewhere, 3).await;
        assert_eq!((other.version, other.namespace.as_str()), (1, "team-a"));
        assert_eq!(
            models
                .list_versions(None, None, Some("default"))
                .await
                .unwrap(),
            vec![v1, v2]
        );

        let clients = SqliteClientStore::open_with(&url, &opts).await.unwrap();
        let party = cohort_core::PartyId::parse("p").unwrap();
        let rec = clients.get_client(&party).await.unwrap();
        assert_eq!(
            (rec.revoked_at_ms, rec.last_seen_ms, rec.stats.tasks_offered),
            (None, 2, 3)
        );
        let revoked = clients.revoke_client(&party, 9).await.unwrap();
        assert_eq!(
            (revoked.revoked_at_ms, revoked.resources.cpus),
            (Some(9), 1)
        );

        let jobs = SqliteJobStore::open_with(&url, &opts).await.unwrap();
        let t = crate::conformance::jobs::new_token("t", 1, "*", "admin");
        let stored = jobs.insert_token(t, 5).await.unwrap();
        assert_eq!(jobs.token_by_sha256(&stored.sha256).await.unwrap(), stored);
    }

    #[tokio::test]
    async fn three_stores_share_one_file() {
        let (_dir, url) = temp_url();
        let opts = DatabaseOptions::default();
        let jobs = SqliteJobStore::open_with(&url, &opts).await.unwrap();
        let models = SqliteModelStore::open_with(&url, &opts).await.unwrap();
        let clients = SqliteClientStore::open_with(&url, &opts).await.unwrap();
        let job = crate::conformance::jobs::job("a", "default");
        jobs.insert_job(&job, "created").await.unwrap();
        models
            .insert_version(crate::conformance::models::new_version("m", "j"), 1)
            .await
            .unwrap();
        let party = cohort_core::PartyId::parse("p").unwrap();
        clients
            .upsert_client(&party, &[], &Default::default(), 1)
            .await
            .unwrap();
        // Reopening applies nothing twice.
        SqliteJobStore::open_with(&url, &opts).await.unwrap();
        SqliteModelStore::open_with(&url, &opts).await.unwrap();
        SqliteClientStore::open_with(&url, &opts).await.unwrap();
        assert_eq!(jobs.get_job(&job.id).await.unwrap().id, job.id);
    }
}
