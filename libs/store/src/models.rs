//! The model registry's metadata, owned by model-manager: named models and
//! their immutable, numbered versions with lineage and metrics. A model is
//! identified by its namespace and name: the same name in two namespaces is
//! two models, each numbering its own versions. A job stores one version per
//! round: inserting a (job, round) again returns the version already stored.
//! The bytes themselves live in the blob store, named by `digest`.

use async_trait::async_trait;
use sqlx::sqlite::SqlitePool;

use crate::{DatabaseOptions, Result, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct ModelVersionRecord {
    pub name: String,
    pub version: u32,
    /// Hex sha256 of the safetensors file.
    pub digest: String,
    pub size_bytes: u64,
    pub job_id: String,
    pub round: u32,
    /// 0 if none.
    pub parent_version: u32,
    pub loss: f64,
    pub accuracy: f64,
    pub samples: u64,
    pub created_at_ms: i64,
    /// With `name`, what identifies the model.
    pub namespace: String,
    /// The parties whose updates were aggregated into it (a job's round), in the order the
    /// coordinator gives; empty for uploads and for versions stored before they were kept.
    pub parties: Vec<String>,
}

/// A version to record; the store assigns its number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewModelVersion {
    pub name: String,
    pub digest: String,
    pub size_bytes: u64,
    pub job_id: String,
    pub round: u32,
    pub parent_version: u32,
    pub loss: f64,
    pub accuracy: f64,
    pub samples: u64,
    /// With `name`, what identifies the model.
    pub namespace: String,
    /// The parties whose updates made it (see [`ModelVersionRecord::parties`]).
    pub parties: Vec<String>,
}

/// `parties` as the SQL backends store them (a JSON array of names).
pub(crate) fn parties_json(parties: &[String], name: &str) -> Result<String> {
    serde_json::to_string(parties)
        .map_err(|e| StoreError::Conflict(format!("model {name} parties: {e}")))
}

impl NewModelVersion {
    /// Whether the version is a job's round (a job id and a round above 0),
    /// stored at most once per (namespace, name, job, round).
    pub fn is_job_round(&self) -> bool {
        is_job_round(&self.job_id, self.round)
    }
}

pub(crate) fn is_job_round(job_id: &str, round: u32) -> bool {
    !job_id.is_empty() && round > 0
}

/// What [`ModelStore::insert_version`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    /// The version stored: the new one, or the one stored earlier for the
    /// same (job, round).
    pub record: ModelVersionRecord,
    /// False when the (job, round) had a version already: nothing was written
    /// (a re-delivered upload).
    pub created: bool,
}

#[async_trait]
pub trait ModelStore: Send + Sync + 'static {
    /// Assigns the next version number of model (`v.namespace`, `v.name`)
    /// (1, 2, ...) atomically (two concurrent inserts never get the same
    /// version) and stores it; creates the model on first use. Models of the
    /// same name in other namespaces are neither seen nor touched.
    ///
    /// A job's round ([`NewModelVersion::is_job_round`]) is stored once: if
    /// the model has a version of that job and round, that version is returned
    /// (`created` false) and nothing changes, atomically (of racing inserts of
    /// one round, one stores it and the others get it). Other versions (user
    /// uploads) always append.
    async fn insert_version(&self, v: NewModelVersion, now_ms: i64) -> Result<StoredVersion>;
    /// The version model (`namespace`, `name`) stored for `round` of job
    /// `job_id` (the earliest, in databases from before versions were stored
    /// once per round); None if there is none, or if `job_id` is empty or
    /// `round` is 0 (such versions are not a job's round).
    async fn round_version(
        &self,
        namespace: &str,
        name: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<ModelVersionRecord>>;
    /// Version `version` of `name` in `namespace`; `NotFound` is
    /// [`version_not_found`], which does not name the namespace.
    async fn get_version(
        &self,
        namespace: &str,
        name: &str,
        version: u32,
    ) -> Result<ModelVersionRecord>;
    /// The highest version of `name` in `namespace`; `NotFound`
    /// ([`version_not_found`] with version 0) if it has none.
    async fn latest_version(&self, namespace: &str, name: &str) -> Result<ModelVersionRecord>;
    /// Filter by name, job id and/or namespace (None = any); ordered by
    /// namespace, name, version.
    async fn list_versions(
        &self,
        name: Option<&str>,
        job_id: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Vec<ModelVersionRecord>>;
}

/// The answer for a version that is not there: `model@version`, or the
/// model's name for its latest (`version` 0). It never names the namespace,
/// so a caller told "not found" for another tenant's model learns nothing.
pub fn version_not_found(name: &str, version: u32) -> StoreError {
    if version == 0 {
        StoreError::NotFound {
            what: "model",
            id: name.to_string(),
        }
    } else {
        StoreError::NotFound {
            what: "model version",
            id: format!("{name}@{version}"),
        }
    }
}

pub struct SqliteModelStore {
    pub(crate) pool: SqlitePool,
}

impl SqliteModelStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://PATH`)
    /// with default pool settings and applies the models migrations.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &DatabaseOptions::default()).await
    }

    pub async fn open_with(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        const HISTORY_TABLE: &str = "_sqlx_migrations_models";
        let mut migrator = sqlx::migrate!("./migrations/sqlite/models");
        // Own history table: the jobs and clients migrations also start at
        // version 1 and would clash if they shared a database file.
        migrator.dangerous_set_table_name(HISTORY_TABLE);
        let pool = crate::sqlite::open_store(url, &migrator, HISTORY_TABLE, opts).await?;
        Ok(Self { pool })
    }
}

macro_rules! columns {
    () => {
        "namespace, name, version, digest, size_bytes, job_id, round, parent_version, \
         loss, accuracy, samples, created_at_ms, parties_json"
    };
}

/// The version of (`job_id`, `round`), a job's round; the terms repeat the
/// unique index's condition so that the index serves the lookup. Versions
/// marked `round_duplicate` are later copies, never the one to return.
async fn fetch_round_version(
    conn: &mut sqlx::SqliteConnection,
    namespace: &str,
    name: &str,
    job_id: &str,
    round: u32,
) -> Result<Option<ModelVersionRecord>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM model_versions WHERE namespace = ?1 AND name = ?2 AND job_id = ?3 \
         AND round = ?4 AND job_id <> '' AND round > 0 AND round_duplicate = 0"
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
impl ModelStore for SqliteModelStore {
    async fn insert_version(&self, v: NewModelVersion, now_ms: i64) -> Result<StoredVersion> {
        let size_bytes = crate::to_i64(v.size_bytes, "size_bytes", "model version", &v.name)?;
        let samples = crate::to_i64(v.samples, "samples", "model version", &v.name)?;
        let parties = parties_json(&v.parties, &v.name)?;
        // IMMEDIATE takes the write lock up front, so MAX(version) + 1 cannot
        // race with another writer, nor can a second insert of one round.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if v.is_job_round()
            && let Some(stored) =
                fetch_round_version(&mut tx, &v.namespace, &v.name, &v.job_id, v.round).await?
        {
            tx.rollback().await?;
            return Ok(StoredVersion {
                record: stored,
                created: false,
            });
        }
        sqlx::query(
            "INSERT INTO models (namespace, name, created_at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (namespace, name) DO NOTHING",
        )
        .bind(&v.namespace)
        .bind(&v.name)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(concat!(
            "INSERT INTO model_versions (",
            columns!(),
            ") SELECT ?1, ?2, COALESCE(MAX(version), 0) + 1, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 \
             FROM model_versions WHERE namespace = ?1 AND name = ?2 RETURNING ",
            columns!()
        ))
        .bind(&v.namespace)
        .bind(&v.name)
        .bind(&v.digest)
        .bind(size_bytes)
        .bind(&v.job_id)
        .bind(i64::from(v.round))
        .bind(i64::from(v.parent_version))
        .bind(v.loss)
        .bind(v.accuracy)
        .bind(samples)
        .bind(now_ms)
        .bind(parties)
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
            " FROM model_versions WHERE namespace = ?1 AND name = ?2 AND version = ?3"
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
            " FROM model_versions WHERE namespace = ?1 AND name = ?2 \
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
             WHERE (?1 IS NULL OR name = ?1) AND (?2 IS NULL OR job_id = ?2) \
             AND (?3 IS NULL OR namespace = ?3) \
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

// Behaviour shared by every backend is checked in `conformance`; these are
// the SQLite-only parts.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn new_version(name: &str, round: u32) -> NewModelVersion {
        NewModelVersion {
            name: name.to_string(),
            digest: "ab".repeat(32),
            size_bytes: 1234,
            job_id: "job-a".to_string(),
            round,
            parent_version: 0,
            loss: 0.5,
            accuracy: 0.75,
            samples: 100,
            namespace: "default".to_string(),
            parties: vec!["party-1".to_string()],
        }
    }

    #[tokio::test]
    async fn versions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("models.db").display());
        let store = SqliteModelStore::open(&url).await.unwrap();
        store
            .insert_version(new_version("mnist", 1), 1)
            .await
            .unwrap();
        let v2 = store
            .insert_version(new_version("mnist", 2), 2)
            .await
            .unwrap()
            .record;
        drop(store);
        // Migrations are not re-applied, numbering goes on, and so does the
        // rule of one version per round.
        let store = SqliteModelStore::open(&url).await.unwrap();
        assert_eq!(store.get_version("default", "mnist", 2).await.unwrap(), v2);
        let again = store
            .insert_version(new_version("mnist", 2), 3)
            .await
            .unwrap();
        assert_eq!((again.record, again.created), (v2, false));
        let v3 = store
            .insert_version(new_version("mnist", 3), 3)
            .await
            .unwrap();
        assert_eq!((v3.record.version, v3.created), (3, true));
    }

    #[tokio::test]
    async fn models_from_before_scoped_names_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("models.db").display());
        let old = crate::conformance::models::before_scoped_names(sqlx::migrate!(
            "./migrations/sqlite/models"
        ));
        let pool = crate::sqlite::open_sqlite(&url, &old, &DatabaseOptions::default())
            .await
            .unwrap();
        for stmt in crate::conformance::models::rows_before_scoped_names(false) {
            sqlx::query(sqlx::AssertSqlSafe(stmt))
                .execute(&pool)
                .await
                .unwrap();
        }
        pool.close().await;

        let store = Arc::new(SqliteModelStore::open(&url).await.unwrap());
        crate::conformance::models::rows_from_before_scoped_names_survive(store.clone()).await;
        // The old tables are gone, the new keys hold.
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'model%' \
             ORDER BY name",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(tables, ["model_versions", "models"]);
        let duplicate = sqlx::query(
            "INSERT INTO model_versions (namespace, name, version, digest, size_bytes, job_id, \
             round, parent_version, samples, created_at_ms) \
             VALUES ('team-a', 'm', 1, 'x', 1, '', 0, 0, 0, 0)",
        )
        .execute(&store.pool)
        .await;
        assert!(duplicate.is_err(), "(namespace, name, version) is unique");
        let orphan = sqlx::query(
            "INSERT INTO model_versions (namespace, name, version, digest, size_bytes, job_id, \
             round, parent_version, samples, created_at_ms) \
             VALUES ('team-c', 'm', 1, 'x', 1, '', 0, 0, 0, 0)",
        )
        .execute(&store.pool)
        .await;
        assert!(
            orphan.is_err(),
            "versions belong to a model of their namespace"
        );
    }

    #[tokio::test]
    async fn models_with_repeated_rounds_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("models.db").display());
        let old = crate::conformance::models::before_rounds_stored_once(sqlx::migrate!(
            "./migrations/sqlite/models"
        ));
        let pool = crate::sqlite::open_sqlite(&url, &old, &DatabaseOptions::default())
            .await
            .unwrap();
        for stmt in crate::conformance::models::rows_with_repeated_rounds(false) {
            sqlx::query(sqlx::AssertSqlSafe(stmt))
                .execute(&pool)
                .await
                .unwrap();
        }
        pool.close().await;

        let store = Arc::new(SqliteModelStore::open(&url).await.unwrap());
        let flagged: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, version FROM model_versions WHERE round_duplicate = 1 \
             ORDER BY namespace, name, version",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(flagged, [("m".to_string(), 2), ("m".to_string(), 4)]);
        crate::conformance::models::repeated_rounds_survive(store.clone()).await;
        // The index holds a round to one version even for writers that
        // bypass the store.
        let duplicate = sqlx::query(
            "INSERT INTO model_versions (namespace, name, version, digest, size_bytes, job_id, \
             round, parent_version, samples, created_at_ms) \
             VALUES ('team-a', 'm', 99, 'x', 1, 'job-a', 2, 0, 0, 0)",
        )
        .execute(&store.pool)
        .await;
        assert!(
            matches!(&duplicate, Err(e) if e.to_string().contains("UNIQUE")),
            "{duplicate:?}"
        );
        // Versions outside jobs' rounds are not held by it.
        sqlx::query(
            "INSERT INTO model_versions (namespace, name, version, digest, size_bytes, job_id, \
             round, parent_version, samples, created_at_ms) \
             VALUES ('team-a', 'm', 99, 'x', 1, 'job-a', 0, 0, 0, 0)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn bad_url_is_refused() {
        assert!(matches!(
            SqliteModelStore::open("postgres://localhost/x").await,
            Err(StoreError::InvalidUrl { .. })
        ));
    }
}
