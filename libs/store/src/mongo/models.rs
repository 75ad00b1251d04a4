//! `ModelStore` on MongoDB.

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, IndexModel};

use super::{Db, Fields, is_duplicate_key, no_document, to_i64};
use crate::models::{
    ModelStore, ModelVersionRecord, NewModelVersion, StoredVersion, is_job_round, version_not_found,
};
use crate::open::DatabaseOptions;
use crate::{Result, StoreError};

const WHAT: &str = "model version";
const MODELS: &str = "models";
const VERSIONS: &str = "model_versions";

/// How often an insert may lose the race for a version number before giving
/// up: each round one of the racers wins, so this bounds the racers.
const MAX_ATTEMPTS: u32 = 200;

/// The namespace of models and versions stored before models had one (the
/// SQL backends' migrations give them the same).
const LEGACY_NAMESPACE: &str = "default";

/// Concurrent first inserts of one model can make its upsert fail on the
/// unique (namespace, name) index; the retry then finds the document.
const UPSERT_ATTEMPTS: u32 = 5;

/// The keys of indexes from before models were scoped by namespace: unique
/// names (and versions per name) across namespaces, and the listing index the
/// unique (namespace, name, version) index now serves. Dropped at open.
const OBSOLETE_MODEL_INDEXES: &[&[&str]] = &[&["name"]];
const OBSOLETE_VERSION_INDEXES: &[&[&str]] =
    &[&["name", "version"], &["namespace", "name", "version"]];

/// The unique index on a job's rounds: one version per (namespace, name,
/// job, round), for versions with a job and a round above 0 that are not a
/// later copy kept from before (`round_duplicate` true). Partial indexes
/// take no `$ne` or `$exists: false`, hence the flag every version carries.
const ROUND_INDEX: &str = "one_version_per_job_round";

/// The unique index's condition, as the partial filter.
fn round_index_filter() -> Document {
    doc! {"job_id": {"$gt": ""}, "round": {"$gt": 0i64}, "round_duplicate": false}
}

pub struct MongoModelStore {
    db: Db,
    models: Collection<Document>,
    versions: Collection<Document>,
}

impl MongoModelStore {
    /// Connects to `url` (`mongodb://...`) and creates the collections and
    /// indexes.
    pub async fn open(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        let db = Db::open(url, opts).await?;
        // The new unique indexes come before the old ones go, so numbering
        // is guarded throughout; newest first in the versions key, which
        // also serves the search for the latest version.
        db.ensure_collection(MODELS, &[(doc! {"namespace": 1, "name": 1}, true)])
            .await?;
        db.ensure_collection(
            VERSIONS,
            &[
                (doc! {"namespace": 1, "name": 1, "version": -1}, true),
                (doc! {"job_id": 1}, false),
            ],
        )
        .await?;
        let store = Self {
            models: db.collection(MODELS),
            versions: db.collection(VERSIONS),
            db,
        };
        store.adopt_legacy_documents().await?;
        store.ensure_round_index().await?;
        store.mark_legacy_round_duplicates().await?;
        store
            .drop_indexes(&store.models, MODELS, OBSOLETE_MODEL_INDEXES)
            .await?;
        store
            .drop_indexes(&store.versions, VERSIONS, OBSOLETE_VERSION_INDEXES)
            .await?;
        Ok(store)
    }

    /// Drops the indexes of `coll` whose keys are, in order and ascending,
    /// one of `obsolete`. Replicas opening together may race to drop one:
    /// an index already gone is fine.
    async fn drop_indexes(
        &self,
        coll: &Collection<Document>,
        coll_name: &str,
        obsolete: &[&[&str]],
    ) -> Result<()> {
        const INDEX_NOT_FOUND: i32 = 27;
        let indexes: Vec<IndexModel> = coll
            .list_indexes()
            .await
            .map_err(|e| self.db.error(e, "model", coll_name))?
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, "model", coll_name))?;
        for index in indexes {
            if !obsolete
                .iter()
                .any(|keys| has_ascending_keys(&index.keys, keys))
            {
                continue;
            }
            let Some(name) = index.options.as_ref().and_then(|o| o.name.clone()) else {
                continue;
            };
            match coll.drop_index(&name).await {
                Ok(()) => tracing::info!(collection = coll_name, index = %name, "dropped index"),
                Err(e) if matches!(&*e.kind, ErrorKind::Command(c) if c.code == INDEX_NOT_FOUND) => {
                }
                Err(e) => return Err(self.db.error(e, "model", coll_name)),
            }
        }
        Ok(())
    }

    /// Gives models and versions stored before namespaces the `default`
    /// namespace, as the SQL migrations do. Idempotent; until it has run,
    /// readers take a missing namespace for `default` too.
    async fn adopt_legacy_documents(&self) -> Result<()> {
        for (coll, name) in [(&self.models, MODELS), (&self.versions, VERSIONS)] {
            coll.update_many(
                doc! {"namespace": {"$exists": false}},
                doc! {"$set": {"namespace": LEGACY_NAMESPACE}},
            )
            .await
            .map_err(|e| self.db.error(e, "model", name))?;
        }
        Ok(())
    }

    /// Creates the unique index on a job's rounds. Versions without the
    /// `round_duplicate` flag (stored before it) are outside it until
    /// [`Self::mark_legacy_round_duplicates`] flags them.
    async fn ensure_round_index(&self) -> Result<()> {
        let model = IndexModel::builder()
            .keys(doc! {"namespace": 1, "name": 1, "job_id": 1, "round": 1})
            .options(
                IndexOptions::builder()
                    .name(ROUND_INDEX.to_string())
                    .unique(true)
                    .partial_filter_expression(round_index_filter())
                    .build(),
            )
            .build();
        self.versions.create_index(model).await.map_err(|e| {
            self.db
                .setup_error(e, &format!("creating index {ROUND_INDEX}"))
        })?;
        Ok(())
    }

    /// Gives versions stored before rounds were stored once their
    /// `round_duplicate` flag: true for a later copy of a (job, round) an
    /// earlier version holds, which stays but outside the unique index; false
    /// otherwise. Idempotent (flagged versions are not looked at again), so
    /// replicas may run it together.
    async fn mark_legacy_round_duplicates(&self) -> Result<()> {
        let legacy: Vec<Document> = self
            .versions
            .find(doc! {"round_duplicate": {"$exists": false}})
            .projection(doc! {"namespace": 1, "name": 1, "version": 1, "job_id": 1, "round": 1})
            .sort(doc! {"version": 1})
            .await
            .map_err(|e| self.db.error(e, WHAT, "*"))?
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, "*"))?;
        for d in legacy {
            let r = version_key(&d)?;
            let id = format!("{}@{}", r.name, r.version);
            let earlier = is_job_round(&r.job_id, r.round)
                && self
                    .versions
                    .find_one(doc! {
                        "namespace": namespace_filter(&r.namespace),
                        "name": &r.name,
                        "job_id": &r.job_id,
                        "round": i64::from(r.round),
                        "version": {"$lt": i64::from(r.version)},
                    })
                    .projection(doc! {"version": 1})
                    .await
                    .map_err(|e| self.db.error(e, WHAT, &id))?
                    .is_some();
            let this = doc! {"_id": d.get("_id").cloned().unwrap_or(Bson::Null)};
            let flag = |duplicate: bool| doc! {"$set": {"round_duplicate": duplicate}};
            match self.versions.update_one(this.clone(), flag(earlier)).await {
                Ok(_) => {}
                // A version of this round came in meanwhile (versions are
                // numbered upwards, so it is a later one): keep it out of the
                // index's way.
                Err(e) if is_duplicate_key(&e) => {
                    self.versions
                        .update_one(this, flag(true))
                        .await
                        .map_err(|e| self.db.error(e, WHAT, &id))?;
                }
                Err(e) => return Err(self.db.error(e, WHAT, &id)),
            }
        }
        Ok(())
    }

    /// The version of a job's round, as [`ModelStore::round_version`] says.
    async fn find_round_version(
        &self,
        namespace: &str,
        name: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<ModelVersionRecord>> {
        if !is_job_round(job_id, round) {
            return Ok(None);
        }
        // The earliest: in a database from before, later copies of the round
        // may be there, flagged or not yet.
        let d = self
            .versions
            .find_one(doc! {
                "namespace": namespace_filter(namespace),
                "name": name,
                "job_id": job_id,
                "round": i64::from(round),
            })
            .sort(doc! {"version": 1})
            .await
            .map_err(|e| self.db.error(e, WHAT, name))?;
        d.as_ref().map(version_from_doc).transpose()
    }

    /// Creates model `name` in `namespace` unless it exists.
    async fn ensure_model(&self, namespace: &str, name: &str, now_ms: i64) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .models
                .find_one_and_update(
                    doc! {"namespace": namespace, "name": name},
                    doc! {"$setOnInsert": {"created_at_ms": now_ms}},
                )
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await;
            match res {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => return Err(no_document("model", name)),
                // A concurrent first insert created it: read it now.
                Err(e) if is_duplicate_key(&e) && attempt < UPSERT_ATTEMPTS => {}
                Err(e) => return Err(self.db.error(e, "model", name)),
            }
        }
    }

    /// The highest stored version of `name` in `namespace`, 0 if none.
    async fn latest_number(&self, namespace: &str, name: &str) -> Result<i64> {
        let latest = self
            .versions
            .find_one(doc! {"namespace": namespace_filter(namespace), "name": name})
            .sort(doc! {"version": -1})
            .projection(doc! {"version": 1})
            .await
            .map_err(|e| self.db.error(e, "model", name))?;
        match latest {
            Some(d) => Fields::new(&d, WHAT, name).int("version"),
            None => Ok(0),
        }
    }

    async fn find_versions(&self, filter: Document, id: &str) -> Result<Vec<ModelVersionRecord>> {
        let cursor = self
            .versions
            .find(filter)
            .await
            .map_err(|e| self.db.error(e, WHAT, id))?;
        let docs: Vec<Document> = cursor
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, id))?;
        let mut versions = docs
            .iter()
            .map(version_from_doc)
            .collect::<Result<Vec<_>>>()?;
        // Bytewise, as SQLite, whatever collation the collection has.
        versions.sort_by(|a, b| {
            (a.namespace.as_str(), a.name.as_str(), a.version).cmp(&(
                b.namespace.as_str(),
                b.name.as_str(),
                b.version,
            ))
        });
        Ok(versions)
    }
}

/// Whether index `keys` are exactly `fields`, in order, each ascending.
fn has_ascending_keys(keys: &Document, fields: &[&str]) -> bool {
    keys.len() == fields.len()
        && keys.iter().zip(fields).all(|((k, v), f)| {
            k == f
                && match v {
                    Bson::Int32(n) => *n == 1,
                    Bson::Int64(n) => *n == 1,
                    Bson::Double(n) => *n == 1.0,
                    _ => false,
                }
        })
}

/// A document's namespace; missing (stored before namespaces) is `default`.
fn namespace_of(f: &Fields<'_>) -> Result<String> {
    Ok(f.opt_str("namespace")?
        .unwrap_or_else(|| LEGACY_NAMESPACE.to_string()))
}

/// The filter on versions of `namespace`, which for `default` also takes
/// documents stored before namespaces.
fn namespace_filter(namespace: &str) -> Bson {
    if namespace == LEGACY_NAMESPACE {
        Bson::Document(doc! {"$in": [namespace, Bson::Null]})
    } else {
        Bson::String(namespace.to_string())
    }
}

fn version_doc(r: &ModelVersionRecord) -> Result<Document> {
    let id = format!("{}@{}", r.name, r.version);
    Ok(doc! {
        "name": &r.name,
        "version": i64::from(r.version),
        "digest": &r.digest,
        "size_bytes": to_i64(r.size_bytes, "size_bytes", WHAT, &id)?,
        "job_id": &r.job_id,
        "round": i64::from(r.round),
        "parent_version": i64::from(r.parent_version),
        "loss": r.loss,
        "accuracy": r.accuracy,
        "samples": to_i64(r.samples, "samples", WHAT, &id)?,
        "created_at_ms": r.created_at_ms,
        "namespace": &r.namespace,
        "parties": &r.parties,
        // New versions are never a later copy of their round.
        "round_duplicate": false,
    })
}

/// What identifies a version and its round, from a document projected to
/// those fields.
struct VersionKey {
    namespace: String,
    name: String,
    version: u32,
    job_id: String,
    round: u32,
}

fn version_key(d: &Document) -> Result<VersionKey> {
    let name = d.get_str("name").unwrap_or("?");
    let f = Fields::new(d, WHAT, name);
    Ok(VersionKey {
        namespace: namespace_of(&f)?,
        name: f.str("name")?.to_string(),
        version: f.uint("version")?,
        job_id: f.str("job_id")?.to_string(),
        round: f.uint("round")?,
    })
}

fn version_from_doc(d: &Document) -> Result<ModelVersionRecord> {
    let name = d.get_str("name").unwrap_or("?");
    let id = match d.get("version") {
        Some(v) => format!("{name}@{v}"),
        None => name.to_string(),
    };
    let f = Fields::new(d, WHAT, &id);
    Ok(ModelVersionRecord {
        name: f.str("name")?.to_string(),
        version: f.uint("version")?,
        digest: f.str("digest")?.to_string(),
        size_bytes: f.uint("size_bytes")?,
        job_id: f.str("job_id")?.to_string(),
        round: f.uint("round")?,
        parent_version: f.uint("parent_version")?,
        loss: f.float("loss")?,
        accuracy: f.float("accuracy")?,
        samples: f.uint("samples")?,
        created_at_ms: f.int("created_at_ms")?,
        namespace: namespace_of(&f)?,
        // Missing in versions stored before parties were kept.
        parties: f.strs("parties")?,
    })
}

#[async_trait]
impl ModelStore for MongoModelStore {
    async fn insert_version(&self, v: NewModelVersion, now_ms: i64) -> Result<StoredVersion> {
        // Refuse unstorable values before the model is created.
        to_i64(v.size_bytes, "size_bytes", WHAT, &v.name)?;
        to_i64(v.samples, "samples", WHAT, &v.name)?;
        self.ensure_model(&v.namespace, &v.name, now_ms).await?;
        let mut record = ModelVersionRecord {
            name: v.name,
            version: 0,
            digest: v.digest,
            size_bytes: v.size_bytes,
            job_id: v.job_id,
            round: v.round,
            parent_version: v.parent_version,
            loss: v.loss,
            accuracy: v.accuracy,
            samples: v.samples,
            created_at_ms: now_ms,
            namespace: v.namespace,
            parties: v.parties,
        };
        let job_round = is_job_round(&record.job_id, record.round);
        // latest + 1, claimed by the unique (namespace, name, version) index:
        // no gaps even when an insert fails, unlike a counter bumped beforehand.
        // A job's round is also claimed by the unique round index: whoever
        // loses that race finds the winner's version on its next try.
        for _ in 0..MAX_ATTEMPTS {
            if job_round
                && let Some(stored) = self
                    .find_round_version(
                        &record.namespace,
                        &record.name,
                        &record.job_id,
                        record.round,
                    )
                    .await?
            {
                return Ok(StoredVersion {
                    record: stored,
                    created: false,
                });
            }
            let next = self.latest_number(&record.namespace, &record.name).await? + 1;
            record.version = u32::try_from(next).map_err(|_| StoreError::Corrupt {
                what: "model",
                id: record.name.clone(),
                message: format!("version {next} out of range"),
            })?;
            match self.versions.insert_one(version_doc(&record)?).await {
                Ok(_) => {
                    return Ok(StoredVersion {
                        record,
                        created: true,
                    });
                }
                // Another insert took this number (or this round): try again.
                Err(e) if is_duplicate_key(&e) => tokio::task::yield_now().await,
                Err(e) => {
                    let id = format!("{}@{}", record.name, record.version);
                    return Err(self.db.error(e, WHAT, &id));
                }
            }
        }
        Err(StoreError::Conflict(format!(
            "model {}: {MAX_ATTEMPTS} concurrent inserts took every version number tried; retry",
            record.name
        )))
    }

    async fn round_version(
        &self,
        namespace: &str,
        name: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<ModelVersionRecord>> {
        self.find_round_version(namespace, name, job_id, round)
            .await
    }

    async fn get_version(
        &self,
        namespace: &str,
        name: &str,
        version: u32,
    ) -> Result<ModelVersionRecord> {
        let filter = doc! {
            "namespace": namespace_filter(namespace),
            "name": name,
            "version": i64::from(version),
        };
        let d = self
            .versions
            .find_one(filter)
            .await
            .map_err(|e| self.db.error(e, WHAT, &format!("{name}@{version}")))?
            .ok_or_else(|| version_not_found(name, version))?;
        version_from_doc(&d)
    }

    async fn latest_version(&self, namespace: &str, name: &str) -> Result<ModelVersionRecord> {
        let d = self
            .versions
            .find_one(doc! {"namespace": namespace_filter(namespace), "name": name})
            .sort(doc! {"version": -1})
            .await
            .map_err(|e| self.db.error(e, "model", name))?
            .ok_or_else(|| version_not_found(name, 0))?;
        version_from_doc(&d)
    }

    async fn list_versions(
        &self,
        name: Option<&str>,
        job_id: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Vec<ModelVersionRecord>> {
        let mut filter = Document::new();
        if let Some(name) = name {
            filter.insert("name", name);
        }
        if let Some(job_id) = job_id {
            filter.insert("job_id", job_id);
        }
        if let Some(namespace) = namespace {
            filter.insert("namespace", namespace_filter(namespace));
        }
        self.find_versions(filter, name.unwrap_or("*")).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mongodb::bson::Bson;

    fn record() -> ModelVersionRecord {
        ModelVersionRecord {
            name: "mnist".into(),
            version: 3,
            digest: "ab".repeat(32),
            size_bytes: u64::from(u32::MAX) + 1,
            job_id: "job-a".into(),
            round: 4,
            parent_version: 2,
            loss: 0.5,
            accuracy: 0.75,
            samples: 100,
            created_at_ms: 1_700_000_000_000,
            namespace: "team-a".into(),
            parties: vec!["party-1".into(), "hospital.b".into()],
        }
    }

    #[test]
    fn versions_round_trip() {
        let r = record();
        assert_eq!(version_from_doc(&version_doc(&r).unwrap()).unwrap(), r);
        let nan = ModelVersionRecord {
            loss: f64::NAN,
            job_id: String::new(),
            ..record()
        };
        let back = version_from_doc(&version_doc(&nan).unwrap()).unwrap();
        assert!(back.loss.is_nan());
        assert_eq!(back.job_id, "");
        assert_eq!(back.accuracy, 0.75);
    }

    #[test]
    fn parties_round_trip_and_are_empty_in_versions_from_before() {
        let mut d = version_doc(&record()).unwrap();
        assert_eq!(version_from_doc(&d).unwrap(), record());
        d.remove("parties");
        assert!(version_from_doc(&d).unwrap().parties.is_empty());
        d.insert("parties", vec![Bson::Int64(1)]);
        let err = version_from_doc(&d).unwrap_err().to_string();
        assert!(err.contains("parties") && err.contains("mnist@3"), "{err}");
    }

    #[test]
    fn versions_from_before_namespaces_are_default() {
        let mut d = version_doc(&record()).unwrap();
        assert_eq!(d.get_str("namespace").unwrap(), "team-a");
        d.remove("namespace");
        assert_eq!(version_from_doc(&d).unwrap().namespace, "default");
        assert_eq!(
            namespace_filter("default"),
            Bson::Document(doc! {"$in": ["default", Bson::Null]})
        );
        assert_eq!(namespace_filter("team-a"), Bson::String("team-a".into()));
        d.insert("namespace", 3i64);
        let err = version_from_doc(&d).unwrap_err().to_string();
        assert!(err.contains("namespace"), "{err}");
    }

    #[test]
    fn unstorable_values_name_the_field() {
        for (field, r) in [
            (
                "size_bytes",
                ModelVersionRecord {
                    size_bytes: u64::MAX,
                    ..record()
                },
            ),
            (
                "samples",
                ModelVersionRecord {
                    samples: 1 << 63,
                    ..record()
                },
            ),
        ] {
            let err = version_doc(&r).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("mnist@3"), "{err}");
        }
    }

    #[test]
    fn corrupt_versions_name_the_version_and_field() {
        let mut d = version_doc(&record()).unwrap();
        d.insert("round", Bson::String("four".into()));
        match version_from_doc(&d) {
            Err(StoreError::Corrupt { id, message, .. }) => {
                assert_eq!(id, "mnist@3");
                assert!(message.contains("round"), "{message}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
