//! `TokenStore` on MongoDB, part of the job store: one document per token in
//! `api_tokens`, with unique indexes on `id` and `sha256`.

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::jobs::MongoJobStore;
use super::{Fields, is_duplicate_key, no_document};
use crate::Result;
use crate::tokens::{
    ENSURE_ATTEMPTS, NewToken, TokenRecord, TokenStore, WHAT, conflict, hash_label, not_found,
    not_found_by_hash,
};

fn token_doc(t: &TokenRecord) -> Document {
    doc! {
        "id": &t.id,
        "name": &t.name,
        "sha256": &t.sha256,
        "namespace": &t.namespace,
        "role": &t.role,
        "created_at_ms": t.created_at_ms,
    }
}

fn token_from_doc(d: &Document) -> Result<TokenRecord> {
    let id = d.get_str("id").unwrap_or("?");
    let f = Fields::new(d, WHAT, id);
    Ok(TokenRecord {
        id: f.str("id")?.to_string(),
        name: f.str("name")?.to_string(),
        sha256: f.str("sha256")?.to_string(),
        namespace: f.str("namespace")?.to_string(),
        role: f.str("role")?.to_string(),
        created_at_ms: f.int("created_at_ms")?,
    })
}

impl MongoJobStore {
    async fn find_token(&self, filter: Document, label: &str) -> Result<Option<TokenRecord>> {
        self.tokens
            .find_one(filter)
            .await
            .map_err(|e| self.db.error(e, WHAT, label))?
            .as_ref()
            .map(token_from_doc)
            .transpose()
    }

    /// Whether a token has `id`: which unique index refused an insert.
    async fn token_id_taken(&self, id: &str) -> Result<bool> {
        Ok(self.find_token(doc! {"id": id}, id).await?.is_some())
    }
}

#[async_trait]
impl TokenStore for MongoJobStore {
    async fn insert_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord> {
        let record = t.clone().record(now_ms);
        match self.tokens.insert_one(token_doc(&record)).await {
            Ok(_) => Ok(record),
            Err(e) if is_duplicate_key(&e) => Err(conflict(self.token_id_taken(&t.id).await?, &t)),
            Err(e) => Err(self.db.error(e, WHAT, &t.id)),
        }
    }

    async fn ensure_token(&self, t: NewToken, now_ms: i64) -> Result<TokenRecord> {
        let mut insert = token_doc(&t.clone().record(now_ms));
        // The filter gives the new document its hash.
        insert.remove("sha256");
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Keyed by the hash: an existing token is returned unchanged.
            let res = self
                .tokens
                .find_one_and_update(
                    doc! {"sha256": &t.sha256},
                    doc! {"$setOnInsert": insert.clone()},
                )
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await;
            match res {
                Ok(Some(d)) => return token_from_doc(&d),
                Ok(None) => return Err(no_document(WHAT, &t.id)),
                // A concurrent ensure of this hash won (the retry finds its
                // token), or another token has this id.
                Err(e) if is_duplicate_key(&e) => {
                    if let Some(found) = self.find_token(doc! {"sha256": &t.sha256}, &t.id).await? {
                        return Ok(found);
                    }
                    if self.token_id_taken(&t.id).await? {
                        return Err(conflict(true, &t));
                    }
                    if attempt >= ENSURE_ATTEMPTS {
                        return Err(self.db.error(e, WHAT, &t.id));
                    }
                }
                Err(e) => return Err(self.db.error(e, WHAT, &t.id)),
            }
        }
    }

    async fn token_by_sha256(&self, sha256: &str) -> Result<TokenRecord> {
        self.find_token(doc! {"sha256": sha256}, &hash_label(sha256))
            .await?
            .ok_or_else(|| not_found_by_hash(sha256))
    }

    async fn get_token(&self, id: &str) -> Result<TokenRecord> {
        self.find_token(doc! {"id": id}, id)
            .await?
            .ok_or_else(|| crate::tokens::not_found(id))
    }

    async fn list_tokens(&self, namespace: Option<&str>) -> Result<Vec<TokenRecord>> {
        let filter = match namespace {
            Some(ns) => doc! {"namespace": ns},
            None => doc! {},
        };
        let docs: Vec<Document> = self
            .tokens
            .find(filter)
            .await
            .map_err(|e| self.db.error(e, WHAT, "list"))?
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, "list"))?;
        let mut tokens = docs
            .iter()
            .map(token_from_doc)
            .collect::<Result<Vec<_>>>()?;
        // Ids bytewise, as SQLite, whatever collation the collection has.
        tokens.sort_by(|a, b| {
            (a.created_at_ms, a.id.as_str()).cmp(&(b.created_at_ms, b.id.as_str()))
        });
        Ok(tokens)
    }

    async fn delete_token(&self, id: &str) -> Result<()> {
        let res = self
            .tokens
            .delete_one(doc! {"id": id})
            .await
            .map_err(|e| self.db.error(e, WHAT, id))?;
        if res.deleted_count == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::StoreError;

    fn record() -> TokenRecord {
        TokenRecord {
            id: "tok-1".into(),
            name: "ci ✓".into(),
            sha256: "ab".repeat(32),
            namespace: "*".into(),
            role: "admin".into(),
            created_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn tokens_round_trip() {
        assert_eq!(token_from_doc(&token_doc(&record())).unwrap(), record());
    }

    #[test]
    fn corrupt_tokens_name_the_token_and_field() {
        let mut d = token_doc(&record());
        d.remove("role");
        match token_from_doc(&d) {
            Err(StoreError::Corrupt { what, id, message }) => {
                assert_eq!((what, id.as_str()), ("token", "tok-1"));
                assert!(message.contains("role"), "{message}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
