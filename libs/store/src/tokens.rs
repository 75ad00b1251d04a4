//! API tokens, kept in job-scheduler's database: every [`JobStore`] is also
//! a [`TokenStore`], so one `Arc<dyn JobStore>` serves both.
//!
//! Only the sha256 of a token is stored, never the token. The store keeps
//! what it is given: callers check the hash (64 lowercase hex digits), the
//! namespace and the role before they insert.
//!
//! [`JobStore`]: crate::jobs::JobStore

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnection, SqliteRow};

use crate::jobs::SqliteJobStore;
use crate::{Result, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    /// Lowercase hex sha256 of the token.
    pub sha256: String,
    /// A namespace, or "*" for all.
    pub namespace: String,
    /// "admin", "member" or "viewer".
    pub role: String,
    pub created_at_ms: i64,
}

/// A token to store; the store adds its creation time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewToken {
    pub id: String,
    pub name: String,
    /// Lowercase hex sha256 of the token.
    pub sha256: String,
    /// A namespace, or "*" for all.
    pub namespace: String,
    /// "admin", "member" or "viewer".
    pub role: String,
}

impl NewToken {
    pub(crate) fn record(self, created_at_ms: i64) -> TokenRecord {
        TokenRecord {
            id: self.id,
            name: self.name,
            sha256: self.sha256,
            namespace: self.namespace,
            role: self.role,
            created_at_ms,
        }
    }
}

#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Conflict if the id or the sha256 exists already.
    async fn insert_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord>;
    /// Stores the token unless one with this sha256 exists (then returns that
    /// one unchanged). For the bootstrap admin token, inserted on every start.
    /// Conflict if another token (another sha256) has this id.
    async fn ensure_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord>;
    /// NotFound (what: "token") if no token has this hash.
    async fn token_by_sha256(&self, sha256: &str) -> Result<TokenRecord>;
    /// NotFound (what: "token") if no token has this id.
    async fn get_token(&self, id: &str) -> Result<TokenRecord>;
    /// `namespace` None = all tokens; Some(ns) = the tokens whose namespace is
    /// exactly `ns` (Some("*"): those for all namespaces). Ordered by
    /// created_at_ms, id.
    async fn list_tokens(&self, namespace: Option<&str>) -> Result<Vec<TokenRecord>>;
    /// NotFound (what: "token") if missing.
    async fn delete_token(&self, id: &str) -> Result<()>;
}

pub(crate) const WHAT: &str = "token";

/// How a hash is named in errors: a prefix, enough to tell tokens apart.
pub(crate) fn hash_label(sha256: &str) -> String {
    let prefix: String = sha256.chars().take(12).collect();
    format!("sha256:{prefix}...")
}

pub(crate) fn not_found_by_hash(sha256: &str) -> StoreError {
    StoreError::NotFound {
        what: WHAT,
        id: hash_label(sha256),
    }
}

pub(crate) fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        what: WHAT,
        id: id.to_string(),
    }
}

/// The conflict of an insert refused by a unique index: the id when a token
/// has it, else the hash (never printed whole).
pub(crate) fn conflict(id_taken: bool, t: &NewToken) -> StoreError {
    if id_taken {
        StoreError::Conflict(format!("token {:?} exists", t.id))
    } else {
        StoreError::Conflict(format!(
            "a token with hash {} exists",
            hash_label(&t.sha256)
        ))
    }
}

/// A deleted token can make `ensure_token`'s read after its insert find
/// nothing; it then tries again, at most this often.
pub(crate) const ENSURE_ATTEMPTS: u32 = 5;

pub(crate) const COLUMNS: &str = "id, name, sha256, namespace, role, created_at_ms";

async fn sqlite_insert(
    conn: &mut SqliteConnection,
    t: &NewToken,
    now_ms: i64,
    on_hash_conflict: &str,
) -> std::result::Result<Option<SqliteRow>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO api_tokens ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
         {on_hash_conflict} RETURNING {COLUMNS}"
    )))
    .bind(&t.id)
    .bind(&t.name)
    .bind(&t.sha256)
    .bind(&t.namespace)
    .bind(&t.role)
    .bind(now_ms)
    .fetch_optional(&mut *conn)
    .await
}

/// The token whose `column` (id or sha256) is `value`.
async fn sqlite_token_where(
    conn: &mut SqliteConnection,
    column: &'static str,
    value: &str,
) -> Result<Option<TokenRecord>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM api_tokens WHERE {column} = ?1"
    )))
    .bind(value)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(crate::rows::token).transpose()
}

async fn sqlite_id_taken(conn: &mut SqliteConnection, id: &str) -> Result<bool> {
    let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM api_tokens WHERE id = ?1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(found.is_some())
}

#[async_trait]
impl TokenStore for SqliteJobStore {
    async fn insert_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord> {
        let mut tx = self.pool.begin_with(crate::jobs::IMMEDIATE).await?;
        match sqlite_insert(&mut tx, &t, now_ms, "").await {
            Ok(Some(row)) => {
                let record = crate::rows::token(&row)?;
                tx.commit().await?;
                Ok(record)
            }
            Ok(None) => Err(StoreError::Unavailable(format!(
                "token {:?}: the insert returned no row",
                t.id
            ))),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                Err(conflict(sqlite_id_taken(&mut tx, &t.id).await?, &t))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn ensure_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord> {
        // The write lock makes the insert and the read one step.
        let mut tx = self.pool.begin_with(crate::jobs::IMMEDIATE).await?;
        let inserted = sqlite_insert(&mut tx, &t, now_ms, "ON CONFLICT (sha256) DO NOTHING").await;
        let record = match inserted {
            Ok(Some(row)) => crate::rows::token(&row)?,
            Ok(None) => sqlite_token_where(&mut tx, "sha256", &t.sha256)
                .await?
                .ok_or_else(|| not_found_by_hash(&t.sha256))?,
            // Only the id can clash now.
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                return Err(conflict(true, &t));
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        Ok(record)
    }

    async fn token_by_sha256(&self, sha256: &str) -> Result<TokenRecord> {
        let mut conn = self.pool.acquire().await?;
        sqlite_token_where(&mut conn, "sha256", sha256)
            .await?
            .ok_or_else(|| not_found_by_hash(sha256))
    }

    async fn get_token(&self, id: &str) -> Result<TokenRecord> {
        let mut conn = self.pool.acquire().await?;
        sqlite_token_where(&mut conn, "id", id)
            .await?
            .ok_or_else(|| not_found(id))
    }

    async fn list_tokens(&self, namespace: Option<&str>) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_tokens WHERE (?1 IS NULL OR namespace = ?1) \
             ORDER BY created_at_ms, id"
        )))
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(crate::rows::token).collect()
    }

    async fn delete_token(&self, id: &str) -> Result<()> {
        let n = sqlx::query("DELETE FROM api_tokens WHERE id = ?1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}
