//! The audit log, kept in job-scheduler's database: every [`JobStore`] is
//! also an [`AuditStore`], so one `Arc<dyn JobStore>` serves both.
//!
//! One entry per state-changing API call: who (a token, a party or a
//! service), what (`job.create`, `token.delete`, `party.revoke`, ...), on
//! which object, in which namespace, when, and the outcome (`ok` or the
//! error's code name, with a short reason). Entries are append-only and
//! bounded in size: the store cuts every field to a fixed length, so a
//! caller cannot grow a row without bound. Listing is oldest first by
//! insertion order (keyset paging on `id`), so a page never repeats or
//! skips an entry that existed when paging began.
//!
//! [`JobStore`]: crate::jobs::JobStore

use async_trait::async_trait;

use crate::jobs::SqliteJobStore;
use crate::{Page, Result, StoreError};

/// A stored entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Insertion order, from 1; the page cursor.
    pub id: u64,
    pub time_ms: i64,
    /// "token", "party" or "service".
    pub actor_kind: String,
    /// The token's id, the party's name or the service's name.
    pub actor_id: String,
    /// The token's name; empty when the actor has none.
    pub actor_name: String,
    /// What was asked, e.g. "job.create".
    pub action: String,
    /// "job", "token", "party".
    pub object_kind: String,
    /// The object's id; empty when the call failed before it had one.
    pub object_id: String,
    /// The namespace the object belongs to ("*" for tokens of every
    /// namespace and for parties, which belong to none).
    pub namespace: String,
    /// "ok", or the error's code name ("permission_denied", "not_found", ...).
    pub outcome: String,
    /// Why it failed (or a detail of what was done); may be empty.
    pub reason: String,
}

/// An entry to append; the store adds its id and time and cuts long fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewAuditEntry {
    pub actor_kind: String,
    pub actor_id: String,
    pub actor_name: String,
    pub action: String,
    pub object_kind: String,
    pub object_id: String,
    pub namespace: String,
    pub outcome: String,
    pub reason: String,
}

/// The most characters a field other than `reason` keeps.
pub const MAX_FIELD_CHARS: usize = 200;
/// The most characters `reason` keeps.
pub const MAX_REASON_CHARS: usize = 1000;

fn cut(s: &mut String, max: usize) {
    if let Some((at, _)) = s.char_indices().nth(max) {
        s.truncate(at);
    }
}

impl NewAuditEntry {
    /// The entry with every field cut to its bound (on a character boundary).
    pub fn bounded(mut self) -> Self {
        for f in [
            &mut self.actor_kind,
            &mut self.actor_id,
            &mut self.actor_name,
            &mut self.action,
            &mut self.object_kind,
            &mut self.object_id,
            &mut self.namespace,
            &mut self.outcome,
        ] {
            cut(f, MAX_FIELD_CHARS);
        }
        cut(&mut self.reason, MAX_REASON_CHARS);
        self
    }

    pub(crate) fn record(self, id: u64, time_ms: i64) -> AuditRecord {
        AuditRecord {
            id,
            time_ms,
            actor_kind: self.actor_kind,
            actor_id: self.actor_id,
            actor_name: self.actor_name,
            action: self.action,
            object_kind: self.object_kind,
            object_id: self.object_id,
            namespace: self.namespace,
            outcome: self.outcome,
            reason: self.reason,
        }
    }
}

/// Which entries to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// None: every namespace; Some(ns): exactly `ns` (Some("*"): the entries
    /// about tokens of every namespace and about parties).
    pub namespace: Option<String>,
    /// Only entries at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
}

#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends `entry` (cut to its bounds, see [`NewAuditEntry::bounded`]) at
    /// `now_ms`; returns what was stored.
    async fn append_audit(&self, entry: NewAuditEntry, now_ms: i64) -> Result<AuditRecord>;
    /// Oldest first; `page_size` is clamped to 1..=500; `page_token` is the
    /// one a previous page returned (Conflict when it is not one).
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<Page<AuditRecord>>;
}

pub(crate) const WHAT: &str = "audit entry";

pub(crate) const COLUMNS: &str = "seq, time_ms, actor_kind, actor_id, actor_name, action, \
    object_kind, object_id, namespace, outcome, reason";

/// The id after which a page starts (0: the first page).
pub(crate) fn parse_page_token(token: Option<&str>) -> Result<i64> {
    match token {
        None | Some("") => Ok(0),
        Some(t) => t.parse::<i64>().ok().filter(|v| *v >= 0).ok_or_else(|| {
            StoreError::Conflict(format!(
                "invalid page token {:?}",
                t.chars().take(40).collect::<String>()
            ))
        }),
    }
}

pub(crate) fn page_size(page_size: u32) -> i64 {
    i64::from(page_size.clamp(1, 500))
}

/// `rows` (one more than `size` when a next page exists) as a page.
pub(crate) fn page_of(mut items: Vec<AuditRecord>, size: i64) -> Page<AuditRecord> {
    let more = items.len() as i64 > size;
    items.truncate(size as usize);
    let next_token = if more {
        items.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Page { items, next_token }
}

#[async_trait]
impl AuditStore for SqliteJobStore {
    async fn append_audit(&self, entry: NewAuditEntry, now_ms: i64) -> Result<AuditRecord> {
        let e = entry.bounded();
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO audit_log (time_ms, actor_kind, actor_id, actor_name, action, \
             object_kind, object_id, namespace, outcome, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) RETURNING {COLUMNS}"
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
            "SELECT {COLUMNS} FROM audit_log WHERE seq > ?1 \
             AND (?2 IS NULL OR namespace = ?2) AND (?3 IS NULL OR time_ms >= ?3) \
             ORDER BY seq LIMIT ?4"
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut_on_character_boundaries() {
        let e = NewAuditEntry {
            actor_name: "é".repeat(MAX_FIELD_CHARS + 5),
            reason: "x".repeat(MAX_REASON_CHARS * 2),
            action: "job.create".into(),
            ..Default::default()
        }
        .bounded();
        assert_eq!(e.actor_name.chars().count(), MAX_FIELD_CHARS);
        assert_eq!(e.reason.len(), MAX_REASON_CHARS);
        assert_eq!(e.action, "job.create");
    }

    #[test]
    fn page_tokens_are_checked() {
        assert_eq!(parse_page_token(None).unwrap(), 0);
        assert_eq!(parse_page_token(Some("")).unwrap(), 0);
        assert_eq!(parse_page_token(Some("42")).unwrap(), 42);
        for bad in ["-1", "x", "1.5"] {
            assert!(matches!(
                parse_page_token(Some(bad)),
                Err(StoreError::Conflict(_))
            ));
        }
    }
}
