//! `AuditStore` on PostgreSQL, part of the job store (table `audit_log`).

use async_trait::async_trait;

use super::jobs::PgJobStore;
use crate::audit::{
    AuditFilter, AuditRecord, AuditStore, COLUMNS, NewAuditEntry, page_of, page_size,
    parse_page_token,
};
use crate::{Page, Result};

#[async_trait]
impl AuditStore for PgJobStore {
    async fn append_audit(&self, entry: NewAuditEntry, now_ms: i64) -> Result<AuditRecord> {
        let e = entry.bounded();
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO audit_log (time_ms, actor_kind, actor_id, actor_name, action, \
             object_kind, object_id, namespace, outcome, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
        )))
        .bind(now_ms)
        .bind(&e.actor_kind)
        .bind(&e.actor_id)
        .bind(&e.actor_name)
        .bind(&e.action)
        .bind(&e.object_kind)
        .bind(&e.object_id)
        .bind(&e.namespace)
        .bind(&e.outcome)
        .bind(&e.reason)
        .fetch_one(&self.pool)
        .await?;
        crate::rows::audit(&row)
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<Page<AuditRecord>> {
        let after = parse_page_token(page_token)?;
        let size = self::page_size(page_size);
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM audit_log WHERE seq > $1 \
             AND ($2::text IS NULL OR namespace = $2) \
             AND ($3::bigint IS NULL OR time_ms >= $3) \
             ORDER BY seq LIMIT $4"
        )))
        .bind(after)
        .bind(filter.namespace.as_deref())
        .bind(filter.since_ms)
        .bind(size + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(crate::rows::audit)
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, size))
    }
}
