//! The model registry's metadata, owned by model-manager: named models and
//! their immutable, numbered versions with lineage and metrics. Each model
//! belongs to one namespace, that of its first version. The bytes themselves
//! live in the blob store, named by `digest`.

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
    /// The model's namespace: that of its first version.
    pub namespace: String,
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
    /// Must be the model's namespace when the model exists already.
    pub namespace: String,
}

#[async_trait]
pub trait ModelStore: Send + Sync + 'static {
    /// Assigns the next version number of `name` (1, 2, ...) atomically (two
    /// concurrent inserts never get the same version) and stores it; creates
    /// the model on first use, in `v.namespace`. A model belongs to the
    /// namespace of its first version: a version for another namespace is a
    /// `Conflict` (which does not name the model's namespace) and uses no
    /// version number.
    async fn insert_version(&self, v: NewModelVersion, now_ms: i64) -> Result<ModelVersionRecord>;
    /// `NotFound` names `model@version`.
    async fn get_version(&self, name: &str, version: u32) -> Result<ModelVersionRecord>;
    /// The highest version of `name`; `NotFound` if it has none.
    async fn latest_version(&self, name: &str) -> Result<ModelVersionRecord>;
    /// Filter by name, job id and/or namespace (None = any); ordered by
    /// name, version.
    async fn list_versions(
        &self,
        name: Option<&str>,
        job_id: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Vec<ModelVersionRecord>>;
}

/// The refusal of a version for a model of another namespace. It names
/// neither that namespace nor whether the caller may see it.
pub(crate) fn other_namespace(name: &str) -> StoreError {
    StoreError::Conflict(format!("model name {name:?} belongs to another namespace"))
}

pub struct SqliteModelStore {
    pool: SqlitePool,
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
        "name, version, digest, size_bytes, job_id, round, parent_version, \
         loss, accuracy, samples, created_at_ms, namespace"
    };
}

fn to_i64(field: &str, value: u64, id: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt {
        what: "model version",
        id: id.to_string(),
        message: format!("{field} {value} exceeds the database's 63-bit range"),
    })
}

#[async_trait]
impl ModelStore for SqliteModelStore {
    async fn insert_version(&self, v: NewModelVersion, now_ms: i64) -> Result<ModelVersionRecord> {
        let size_bytes = to_i64("size_bytes", v.size_bytes, &v.name)?;
        let samples = to_i64("samples", v.samples, &v.name)?;
        // IMMEDIATE takes the write lock up front, so MAX(version) + 1 cannot
        // race with another writer.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO models (name, created_at_ms, namespace) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&v.name)
        .bind(now_ms)
        .bind(&v.namespace)
        .execute(&mut *tx)
        .await?;
        let owner: String = sqlx::query_scalar("SELECT namespace FROM models WHERE name = ?1")
            .bind(&v.name)
            .fetch_one(&mut *tx)
            .await?;
        if owner != v.namespace {
            return Err(other_namespace(&v.name));
        }
        let row = sqlx::query(concat!(
            "INSERT INTO model_versions (",
            columns!(),
            ") SELECT ?1, COALESCE(MAX(version), 0) + 1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 \
             FROM model_versions WHERE name = ?1 RETURNING ",
            columns!()
        ))
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
        .bind(&v.namespace)
        .fetch_one(&mut *tx)
        .await?;
        let record = crate::rows::model_version(&row)?;
        tx.commit().await?;
        Ok(record)
    }

    async fn get_version(&self, name: &str, version: u32) -> Result<ModelVersionRecord> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM model_versions WHERE name = ?1 AND version = ?2"
        ))
        .bind(name)
        .bind(i64::from(version))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => crate::rows::model_version(&row),
            None => Err(StoreError::NotFound {
                what: "model version",
                id: format!("{name}@{version}"),
            }),
        }
    }

    async fn latest_version(&self, name: &str) -> Result<ModelVersionRecord> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM model_versions WHERE name = ?1 ORDER BY version DESC LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => crate::rows::model_version(&row),
            None => Err(StoreError::NotFound {
                what: "model",
                id: name.to_string(),
            }),
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
             ORDER BY name, version"
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
    use super::*;

    fn new_version(name: &str) -> NewModelVersion {
        NewModelVersion {
            name: name.to_string(),
            digest: "ab".repeat(32),
            size_bytes: 1234,
            job_id: "job-a".to_string(),
            round: 3,
            parent_version: 0,
            loss: 0.5,
            accuracy: 0.75,
            samples: 100,
            namespace: "default".to_string(),
        }
    }

    #[tokio::test]
    async fn versions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("models.db").display());
        let store = SqliteModelStore::open(&url).await.unwrap();
        store.insert_version(new_version("mnist"), 1).await.unwrap();
        let v2 = store.insert_version(new_version("mnist"), 2).await.unwrap();
        drop(store);
        // Migrations are not re-applied, numbering goes on.
        let store = SqliteModelStore::open(&url).await.unwrap();
        assert_eq!(store.get_version("mnist", 2).await.unwrap(), v2);
        let v3 = store.insert_version(new_version("mnist"), 3).await.unwrap();
        assert_eq!(v3.version, 3);
    }

    #[tokio::test]
    async fn bad_url_is_refused() {
        assert!(matches!(
            SqliteModelStore::open("postgres://localhost/x").await,
            Err(StoreError::InvalidUrl { .. })
        ));
    }
}
