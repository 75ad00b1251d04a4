//! `TokenStore` on PostgreSQL, part of the job store (table `api_tokens`).

use async_trait::async_trait;

use super::jobs::PgJobStore;
use crate::tokens::{
    COLUMNS, ENSURE_ATTEMPTS, NewToken, TokenRecord, TokenStore, conflict, not_found,
    not_found_by_hash,
};
use crate::{Result, StoreError};

impl PgJobStore {
    async fn token_where(&self, column: &str, value: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_tokens WHERE {column} = $1"
        )))
        .bind(value)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(crate::rows::token).transpose()
    }

    /// Inserts `t`, doing nothing on a token with the same hash when
    /// `on_hash_conflict` says so; the stored row, or None if nothing was
    /// inserted.
    async fn insert_token_row(
        &self,
        t: &NewToken,
        now_ms: i64,
        on_hash_conflict: &str,
    ) -> std::result::Result<Option<sqlx::postgres::PgRow>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO api_tokens ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) \
             {on_hash_conflict} RETURNING {COLUMNS}"
        )))
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.sha256)
        .bind(&t.namespace)
        .bind(&t.role)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await
    }
}

#[async_trait]
impl TokenStore for PgJobStore {
    async fn insert_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord> {
        match self.insert_token_row(&t, now_ms, "").await {
            Ok(Some(row)) => crate::rows::token(&row),
            Ok(None) => Err(StoreError::Unavailable(format!(
                "token {:?}: the insert returned no row",
                t.id
            ))),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                let id_taken = self.token_where("id", &t.id).await?.is_some();
                Err(conflict(id_taken, &t))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn ensure_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord> {
        // ON CONFLICT waits for a concurrent insert of the hash to commit,
        // then does nothing; the read after it sees that token. Only a
        // delete in between makes it try again.
        for _ in 0..ENSURE_ATTEMPTS {
            match self
                .insert_token_row(&t, now_ms, "ON CONFLICT (sha256) DO NOTHING")
                .await
            {
                Ok(Some(row)) => return crate::rows::token(&row),
                Ok(None) => {
                    if let Some(found) = self.token_where("sha256", &t.sha256).await? {
                        return Ok(found);
                    }
                }
                // Only the id can clash now.
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                    return Err(conflict(true, &t));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(format!(
            "token {:?}: deleted as often as it was ensured; retry",
            t.id
        )))
    }

    async fn token_by_sha256(&self, sha256: &str) -> Result<TokenRecord> {
        self.token_where("sha256", sha256)
            .await?
            .ok_or_else(|| not_found_by_hash(sha256))
    }

    async fn get_token(&self, id: &str) -> Result<TokenRecord> {
        self.token_where("id", id)
            .await?
            .ok_or_else(|| crate::tokens::not_found(id))
    }

    async fn list_tokens(&self, namespace: Option<&str>) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_tokens WHERE ($1::text IS NULL OR namespace = $1) \
             ORDER BY created_at_ms, id"
        )))
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(crate::rows::token).collect()
    }

    async fn delete_token(&self, id: &str) -> Result<()> {
        let n = sqlx::query("DELETE FROM api_tokens WHERE id = $1")
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
