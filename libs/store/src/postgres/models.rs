//! `ModelStore` on PostgreSQL.

use async_trait::async_trait;
use sqlx::postgres::PgPool;

use super::{open_pool, to_i64, with_history_table};
use crate::models::{
    ModelStore, ModelVersionRecord, NewModelVersion, StoredVersion, is_job_round, version_not_found,
};
use crate::{DatabaseOptions, Result};

pub struct PgModelStore {
    pub(crate) pool: PgPool,
}

impl PgModelStore {
    /// Connects to `url` (`postgres://...`) and applies the models migrations.
    pub async fn open(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        let migrator = with_history_table(
            sqlx::migrate!("./migrations/postgres/models"),
            "_sqlx_migrations_models",
        );
        Ok(Self {
            pool: open_pool(url, &migrator, opts).await?,
        })
    }
}

macro_rules! columns {
    () => {
        "namespace, name, version, digest, size_bytes, job_id, round, parent_version, \
         loss, accuracy, samples, created_at_ms, parties_json"
    };
}

const WHAT: &str = "model version";

/// The version of (`job_id`, `round`), a job's round; the terms repeat the
/// unique index's condition so that the index serves the lookup. Versions
/// marked `round_duplicate` are later copies, never the one to return.
async fn fetch_round_version(
    conn: &mut sqlx::PgConnection,
    namespace: &str,
    name: &str,
    job_id: &str,
    round: u32,
) -> Result<Option<ModelVersionRecord>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM model_versions WHERE namespace = $1 AND name = $2 AND job_id = $3 \
         AND round = $4 AND job_id <> '' AND round > 0 AND NOT round_duplicate"
    ))
    .bind(namespace)
    .bind(name)
    .bind(job_id)
    .bind(i64::from(round))
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(crate::rows::model_version).transpose()
}

#[async_trait]
impl ModelStore for PgModelStore {
    async fn insert_version(&self, v: NewModelVersion, now_ms: i64) -> Result<StoredVersion> {
        let size_bytes = to_i64(v.size_bytes, "size_bytes", WHAT, &v.name)?;
        let samples = to_i64(v.samples, "samples", WHAT, &v.name)?;
        let mut tx = self.pool.begin().await?;
        // One statement creates the model or bumps its counter, holding the
        // model's row lock until commit: concurrent inserts queue there and
        // each gets the next number (a rolled-back insert leaves no gap).
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO models (namespace, name, created_at_ms, last_version) \
             VALUES ($1, $2, $3, 1) \
             ON CONFLICT (namespace, name) DO UPDATE SET last_version = models.last_version + 1 \
             RETURNING last_version",
        )
        .bind(&v.namespace)
        .bind(&v.name)
        .bind(now_ms)
        .fetch_one(&mut *tx)
        .await?;
        // Under the model's row lock, so a racing insert of the same round
        // waits above and then finds this one's version (each statement reads
        // what committed before it began).
        if v.is_job_round()
            && let Some(stored) =
                fetch_round_version(&mut tx, &v.namespace, &v.name, &v.job_id, v.round).await?
        {
            // Rolling back returns the number taken above.
            tx.rollback().await?;
            return Ok(StoredVersion {
                record: stored,
                created: false,
            });
        }
        let row = sqlx::query(concat!(
            "INSERT INTO model_versions (",
            columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING ",
            columns!()
        ))
        .bind(&v.namespace)
        .bind(&v.name)
        .bind(version)
        .bind(&v.digest)
        .bind(size_bytes)
        .bind(&v.job_id)
        .bind(i64::from(v.round))
        .bind(i64::from(v.parent_version))
        .bind(v.loss)
        .bind(v.accuracy)
        .bind(samples)
        .bind(now_ms)
        .bind(crate::models::parties_json(&v.parties, &v.name)?)
        .fetch_one(&mut *tx)
        .await?;
        let record = crate::rows::model_version(&row)?;
        tx.commit().await?;
        Ok(StoredVersion {
            record,
            created: true,
        })
    }

    async fn round_version(
        &self,
        namespace: &str,
        name: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<ModelVersionRecord>> {
        if !is_job_round(job_id, round) {
            return Ok(None);
        }
        let mut conn = self.pool.acquire().await?;
        fetch_round_version(&mut conn, namespace, name, job_id, round).await
    }

    async fn get_version(
        &self,
        namespace: &str,
        name: &str,
        version: u32,
    ) -> Result<ModelVersionRecord> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM model_versions WHERE namespace = $1 AND name = $2 AND version = $3"
        ))
        .bind(namespace)
        .bind(name)
        .bind(i64::from(version))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => crate::rows::model_version(&row),
            None => Err(version_not_found(name, version)),
        }
    }

    async fn latest_version(&self, namespace: &str, name: &str) -> Result<ModelVersionRecord> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM model_versions WHERE namespace = $1 AND name = $2 \
             ORDER BY version DESC LIMIT 1"
        ))
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => crate::rows::model_version(&row),
            None => Err(version_not_found(name, 0)),
        }
    }

    async fn list_versions(
        &self,
        name: Option<&str>,
        job_id: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Vec<ModelVersionRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM model_versions \
             WHERE ($1::text IS NULL OR name = $1) AND ($2::text IS NULL OR job_id = $2) \
             AND ($3::text IS NULL OR namespace = $3) \
             ORDER BY namespace, name, version"
        ))
        .bind(name)
        .bind(job_id)
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(crate::rows::model_version).collect()
    }
}
