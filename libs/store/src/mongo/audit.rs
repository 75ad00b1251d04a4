//! `AuditStore` on MongoDB, part of the job store: one document per entry in
//! `audit_log`, numbered by the `audit_log` counter document (unique `seq`).

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::jobs::MongoJobStore;
use super::{Fields, is_duplicate_key, no_document};
use crate::audit::{
    AuditFilter, AuditRecord, AuditStore, NewAuditEntry, WHAT, page_of, page_size, parse_page_token,
};
use crate::{Page, Result};

/// The name of the counter document that numbers audit entries.
const AUDIT_SEQ: &str = "audit_log";

fn audit_doc(r: &AuditRecord, seq: i64) -> Document {
    doc! {
        "seq": seq,
        "time_ms": r.time_ms,
        "actor_kind": &r.actor_kind,
        "actor_id": &r.actor_id,
        "actor_name": &r.actor_name,
        "action": &r.action,
        "object_kind": &r.object_kind,
        "object_id": &r.object_id,
        "namespace": &r.namespace,
        "outcome": &r.outcome,
        "reason": &r.reason,
    }
}

fn audit_from_doc(d: &Document) -> Result<AuditRecord> {
    let label = match d.get("seq") {
        Some(v) => v.to_string(),
        None => "?".to_string(),
    };
    let f = Fields::new(d, WHAT, &label);
    Ok(AuditRecord {
        id: f.uint("seq")?,
        time_ms: f.int("time_ms")?,
        actor_kind: f.str("actor_kind")?.to_string(),
        actor_id: f.str("actor_id")?.to_string(),
        actor_name: f.str("actor_name")?.to_string(),
        action: f.str("action")?.to_string(),
        object_kind: f.str("object_kind")?.to_string(),
        object_id: f.str("object_id")?.to_string(),
        namespace: f.str("namespace")?.to_string(),
        outcome: f.str("outcome")?.to_string(),
        reason: f.str("reason")?.to_string(),
    })
}

impl MongoJobStore {
    /// Never hands out a seq at or below an existing entry's (a counter lost in
    /// a restore would otherwise collide on the unique index).
    pub(super) async fn seed_audit_counter(&self) -> Result<()> {
        let last = self
            .audit
            .find_one(doc! {})
            .sort(doc! {"seq": -1})
            .projection(doc! {"seq": 1})
            .await
            .map_err(|e| self.db.error(e, "audit counter", AUDIT_SEQ))?;
        let max = match &last {
            Some(d) => Fields::new(d, WHAT, "last").int("seq")?,
            None => 0,
        };
        match self
            .counters
            .update_one(doc! {"name": AUDIT_SEQ}, doc! {"$max": {"seq": max}})
            .upsert(true)
            .await
        {
            // A replica opening at the same time created it.
            Err(e) if !is_duplicate_key(&e) => Err(self.db.error(e, "audit counter", AUDIT_SEQ)),
            _ => Ok(()),
        }
    }

    async fn next_audit_seq(&self) -> Result<i64> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .counters
                .find_one_and_update(doc! {"name": AUDIT_SEQ}, doc! {"$inc": {"seq": 1i64}})
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await;
            match res {
                Ok(Some(d)) => return Fields::new(&d, "audit counter", AUDIT_SEQ).int("seq"),
                Ok(None) => return Err(no_document("audit counter", AUDIT_SEQ)),
                // Two first upserts raced; the counter exists now.
                Err(e) if is_duplicate_key(&e) && attempt < 3 => {}
                Err(e) => return Err(self.db.error(e, "audit counter", AUDIT_SEQ)),
            }
        }
    }
}

#[async_trait]
impl AuditStore for MongoJobStore {
    async fn append_audit(&self, entry: NewAuditEntry, now_ms: i64) -> Result<AuditRecord> {
        let seq = self.next_audit_seq().await?;
        let id = u64::try_from(seq).map_err(|_| no_document("audit counter", AUDIT_SEQ))?;
        let record = entry.bounded().record(id, now_ms);
        self.audit
            .insert_one(audit_doc(&record, seq))
            .await
            .map_err(|e| self.db.error(e, WHAT, &seq.to_string()))?;
        Ok(record)
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<Page<AuditRecord>> {
        let after = parse_page_token(page_token)?;
        let size = self::page_size(page_size);
        let mut query = doc! {"seq": {"$gt": after}};
        if let Some(ns) = &filter.namespace {
            query.insert("namespace", ns.as_str());
        }
        if let Some(since) = filter.since_ms {
            query.insert("time_ms", doc! {"$gte": since});
        }
        // Keyset paging on seq, one extra to know whether a next page exists.
        let docs: Vec<Document> = self
            .audit
            .find(query)
            .sort(doc! {"seq": 1})
            .limit(size + 1)
            .await
            .map_err(|e| self.db.error(e, WHAT, "list"))?
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, "list"))?;
        let items = docs
            .iter()
            .map(audit_from_doc)
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, size))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::StoreError;

    fn record() -> AuditRecord {
        NewAuditEntry {
            actor_kind: "token".into(),
            actor_id: "tok-1".into(),
            actor_name: "ci ✓".into(),
            action: "job.create".into(),
            object_kind: "job".into(),
            object_id: "mnist-abc".into(),
            namespace: "team-a".into(),
            outcome: "ok".into(),
            reason: String::new(),
        }
        .record(7, 1_700_000_000_000)
    }

    #[test]
    fn entries_round_trip() {
        assert_eq!(audit_from_doc(&audit_doc(&record(), 7)).unwrap(), record());
    }

    #[test]
    fn corrupt_entries_name_the_entry_and_field() {
        let mut d = audit_doc(&record(), 7);
        d.remove("outcome");
        match audit_from_doc(&d) {
            Err(StoreError::Corrupt { what, id, message }) => {
                assert_eq!((what, id.as_str()), ("audit entry", "7"));
                assert!(message.contains("outcome"), "{message}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
