//! `ClientStore` on MongoDB: one document per party, its counters included,
//! so every call is one atomic single-document operation.

use async_trait::async_trait;
use cohort_core::PartyId;
use futures::TryStreamExt;
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::{Db, Fields, is_duplicate_key, no_document, to_i64};
use crate::clients::{
    ClientRecord, ClientStats, ClientStore, DatasetEntry, RELIABILITY_DECAY, Reliability,
    ResourcesEntry, TaskOutcome, TaskResult,
};
use crate::open::DatabaseOptions;
use crate::{Result, StoreError};

const WHAT: &str = "client";
const CLIENTS: &str = "clients";

/// First registrations of one party racing each other can make an upsert
/// fail on the unique index; the retry then finds the document.
const UPSERT_ATTEMPTS: u32 = 5;

pub struct MongoClientStore {
    db: Db,
    clients: Collection<Document>,
}

impl MongoClientStore {
    /// Connects to `url` (`mongodb://...`) and creates the collection and
    /// its index.
    pub async fn open(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        let db = Db::open(url, opts).await?;
        db.ensure_collection(
            CLIENTS,
            &[
                (doc! {"party": 1}, true),
                (doc! {"revoked_at_ms": 1}, false),
            ],
        )
        .await?;
        Ok(Self {
            clients: db.collection(CLIENTS),
            db,
        })
    }

    /// Applies `update` to `party`'s document; NotFound if there is none.
    async fn update_existing(
        &self,
        party: &PartyId,
        update: impl Into<mongodb::options::UpdateModifications> + Send,
    ) -> Result<()> {
        let res = self
            .clients
            .update_one(doc! {"party": party.as_str()}, update)
            .await
            .map_err(|e| self.db.error(e, WHAT, party.as_str()))?;
        if res.matched_count == 0 {
            return Err(not_found(party));
        }
        Ok(())
    }
}

fn not_found(party: &PartyId) -> StoreError {
    StoreError::NotFound {
        what: WHAT,
        id: party.to_string(),
    }
}

fn stat_field(outcome: TaskOutcome) -> &'static str {
    match outcome {
        TaskOutcome::Offered => "tasks_offered",
        TaskOutcome::Accepted => "tasks_accepted",
        TaskOutcome::Succeeded => "tasks_succeeded",
        TaskOutcome::Failed => "tasks_failed",
    }
}

/// A result's counter; the recency-weighted counts are `recent_finished` and
/// `recent_unfinished`, the time `last_result_ms` (all missing in documents from before they
/// were kept: read as 0).
fn result_field(result: TaskResult) -> &'static str {
    match result {
        TaskResult::Finished => "results_finished",
        TaskResult::Failed => "results_failed",
        TaskResult::TimedOut => "results_timed_out",
    }
}

/// The update of a task result: a pipeline, so the decayed counts are computed from the
/// stored ones in the same single-document (atomic) write.
fn result_update(result: TaskResult, now_ms: i64) -> Vec<Document> {
    let finished = f64::from(u8::from(result == TaskResult::Finished));
    let field = result_field(result);
    let decayed = |name: &str, add: f64| {
        doc! {"$add": [{"$multiply": [{"$ifNull": [format!("${name}"), 0.0]}, RELIABILITY_DECAY]}, add]}
    };
    vec![doc! {"$set": {
        field: {"$add": [{"$ifNull": [format!("${field}"), 0i64]}, 1i64]},
        "recent_finished": decayed("recent_finished", finished),
        "recent_unfinished": decayed("recent_unfinished", 1.0 - finished),
        "last_result_ms": {"$max": [{"$ifNull": ["$last_result_ms", 0i64]}, now_ms]},
    }}]
}

fn datasets_docs(party: &str, datasets: &[DatasetEntry]) -> Result<Vec<Document>> {
    datasets
        .iter()
        .map(|d| {
            Ok(doc! {
                "name": &d.name,
                "samples": to_i64(d.samples, "datasets.samples", WHAT, party)?,
                "features": i64::from(d.features),
                "classes": i64::from(d.classes),
            })
        })
        .collect()
}

fn resources_doc(party: &str, r: &ResourcesEntry) -> Result<Document> {
    Ok(doc! {
        "cpus": i64::from(r.cpus),
        "memory_bytes": to_i64(r.memory_bytes, "resources.memory_bytes", WHAT, party)?,
        "gpus": i64::from(r.gpus),
        "max_tasks": i64::from(r.max_tasks),
    })
}

fn client_from_doc(d: &Document) -> Result<ClientRecord> {
    let party = d.get_str("party").unwrap_or("?");
    let f = Fields::new(d, WHAT, party);
    let datasets = f
        .docs("datasets")?
        .into_iter()
        .map(|ds| {
            let g = f.nested(ds, "datasets.");
            Ok(DatasetEntry {
                name: g.str("name")?.to_string(),
                samples: g.uint("samples")?,
                features: g.uint("features")?,
                classes: g.uint("classes")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let r = f.nested(f.doc("resources")?, "resources.");
    Ok(ClientRecord {
        party: PartyId::parse(f.str("party")?).map_err(|e| f.corrupt(format!("party: {e}")))?,
        datasets,
        resources: ResourcesEntry {
            cpus: r.uint("cpus")?,
            memory_bytes: r.uint("memory_bytes")?,
            gpus: r.uint("gpus")?,
            max_tasks: r.uint("max_tasks")?,
        },
        first_seen_ms: f.int("first_seen_ms")?,
        last_seen_ms: f.int("last_seen_ms")?,
        revoked_at_ms: f.opt_int("revoked_at_ms")?,
        stats: ClientStats {
            tasks_offered: f.uint("tasks_offered")?,
            tasks_accepted: f.uint("tasks_accepted")?,
            tasks_succeeded: f.uint("tasks_succeeded")?,
            tasks_failed: f.uint("tasks_failed")?,
        },
        reliability: Reliability {
            finished: f.fit(
                "results_finished",
                f.opt_int("results_finished")?.unwrap_or(0),
            )?,
            failed: f.fit("results_failed", f.opt_int("results_failed")?.unwrap_or(0))?,
            timed_out: f.fit(
                "results_timed_out",
                f.opt_int("results_timed_out")?.unwrap_or(0),
            )?,
            recent_finished: f.opt_float("recent_finished")?.unwrap_or(0.0),
            recent_unfinished: f.opt_float("recent_unfinished")?.unwrap_or(0.0),
            last_result_ms: f.opt_int("last_result_ms")?.unwrap_or(0),
        },
    })
}

/// The upsert of a registration: replaces holdings and last_seen, keeps
/// first_seen, the counters and the revocation of a known party.
fn registration_update(
    party: &str,
    datasets: &[DatasetEntry],
    resources: &ResourcesEntry,
    now_ms: i64,
) -> Result<Document> {
    Ok(doc! {
        "$set": {
            "datasets": datasets_docs(party, datasets)?,
            "resources": resources_doc(party, resources)?,
            "last_seen_ms": now_ms,
        },
        "$setOnInsert": {
            "first_seen_ms": now_ms,
            "tasks_offered": 0i64,
            "tasks_accepted": 0i64,
            "tasks_succeeded": 0i64,
            "tasks_failed": 0i64,
        },
    })
}

/// The upsert of a revocation, applied to the party's document only while it
/// is not revoked (`revocation_filter`): sets revoked_at_ms and, for a party
/// never seen, creates it with no holdings.
fn revocation_update(party: &str, now_ms: i64) -> Result<Document> {
    Ok(doc! {
        "$set": {"revoked_at_ms": now_ms},
        "$setOnInsert": {
            "datasets": datasets_docs(party, &[])?,
            "resources": resources_doc(party, &ResourcesEntry::default())?,
            "first_seen_ms": now_ms,
            "last_seen_ms": now_ms,
            "tasks_offered": 0i64,
            "tasks_accepted": 0i64,
            "tasks_succeeded": 0i64,
            "tasks_failed": 0i64,
        },
    })
}

/// The party's document while it is not revoked (null matches a missing
/// field too). On a revoked party the upsert's insert fails on the unique
/// party index instead: the first revocation stays.
fn revocation_filter(party: &str) -> Document {
    doc! {"party": party, "revoked_at_ms": null}
}

#[async_trait]
impl ClientStore for MongoClientStore {
    async fn upsert_client(
        &self,
        party: &PartyId,
        datasets: &[DatasetEntry],
        resources: &ResourcesEntry,
        now_ms: i64,
    ) -> Result<ClientRecord> {
        let id = party.as_str();
        let update = registration_update(id, datasets, resources, now_ms)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .clients
                .find_one_and_update(doc! {"party": id}, update.clone())
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await;
            match res {
                Ok(Some(d)) => return client_from_doc(&d),
                Ok(None) => return Err(no_document(WHAT, id)),
                Err(e) if is_duplicate_key(&e) && attempt < UPSERT_ATTEMPTS => {}
                Err(e) => return Err(self.db.error(e, WHAT, id)),
            }
        }
    }

    async fn get_client(&self, party: &PartyId) -> Result<ClientRecord> {
        let d = self
            .clients
            .find_one(doc! {"party": party.as_str()})
            .await
            .map_err(|e| self.db.error(e, WHAT, party.as_str()))?
            .ok_or_else(|| not_found(party))?;
        client_from_doc(&d)
    }

    async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        let cursor = self
            .clients
            .find(doc! {})
            .await
            .map_err(|e| self.db.error(e, WHAT, "list"))?;
        let docs: Vec<Document> = cursor
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, "list"))?;
        let mut clients = docs
            .iter()
            .map(client_from_doc)
            .collect::<Result<Vec<_>>>()?;
        // Bytewise, as SQLite ("B" before "a"), whatever collation the
        // collection was given.
        clients.sort_by(|a, b| a.party.as_str().cmp(b.party.as_str()));
        Ok(clients)
    }

    async fn list_revoked(&self) -> Result<Vec<PartyId>> {
        let docs: Vec<Document> = self
            .clients
            .find(doc! {"revoked_at_ms": {"$ne": null}})
            .projection(doc! {"party": 1, "_id": 0})
            .await
            .map_err(|e| self.db.error(e, WHAT, "list revoked"))?
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, "list revoked"))?;
        let mut parties = docs
            .iter()
            .map(|d| {
                let name = d.get_str("party").unwrap_or_default();
                PartyId::parse(name).map_err(|e| StoreError::Corrupt {
                    what: WHAT,
                    id: name.to_string(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Bytewise, as the SQL backends.
        parties.sort();
        Ok(parties)
    }

    async fn touch(&self, party: &PartyId, now_ms: i64) -> Result<()> {
        self.update_existing(party, doc! {"$max": {"last_seen_ms": now_ms}})
            .await
    }

    async fn count_task(&self, party: &PartyId, outcome: TaskOutcome) -> Result<()> {
        self.update_existing(party, doc! {"$inc": {stat_field(outcome): 1i64}})
            .await
    }

    async fn record_task_result(
        &self,
        party: &PartyId,
        result: TaskResult,
        now_ms: i64,
    ) -> Result<()> {
        self.update_existing(party, result_update(result, now_ms))
            .await
    }

    async fn revoke_client(&self, party: &PartyId, now_ms: i64) -> Result<ClientRecord> {
        let id = party.as_str();
        let update = revocation_update(id, now_ms)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .clients
                .find_one_and_update(revocation_filter(id), update.clone())
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await;
            match res {
                Ok(Some(d)) => return client_from_doc(&d),
                Ok(None) => return Err(no_document(WHAT, id)),
                // The party exists revoked (keep its time), or a first
                // registration or revocation won the race to create it.
                Err(e) if is_duplicate_key(&e) => {
                    let current = self.get_client(party).await?;
                    if current.revoked_at_ms.is_some() {
                        return Ok(current);
                    }
                    if attempt >= UPSERT_ATTEMPTS {
                        return Err(self.db.error(e, WHAT, id));
                    }
                }
                Err(e) => return Err(self.db.error(e, WHAT, id)),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mongodb::bson::Bson;

    fn datasets() -> Vec<DatasetEntry> {
        vec![
            DatasetEntry {
                name: "digits".into(),
                samples: 10,
                features: 64,
                classes: 10,
            },
            DatasetEntry {
                name: "mnist".into(),
                samples: u64::from(u32::MAX) + 7,
                features: 784,
                classes: 10,
            },
        ]
    }

    fn resources() -> ResourcesEntry {
        ResourcesEntry {
            cpus: 8,
            memory_bytes: 64 << 30,
            gpus: 1,
            max_tasks: 2,
        }
    }

    /// The document an upsert of a new party leaves: `$set` and
    /// `$setOnInsert` merged over the filter.
    fn inserted(party: &str, now_ms: i64) -> Document {
        let update = registration_update(party, &datasets(), &resources(), now_ms).unwrap();
        let mut d = doc! {"party": party};
        for op in ["$set", "$setOnInsert"] {
            d.extend(update.get_document(op).unwrap().clone());
        }
        d
    }

    #[test]
    fn clients_round_trip() {
        let rec = client_from_doc(&inserted("hospital-a", 5)).unwrap();
        assert_eq!(
            rec,
            ClientRecord {
                party: PartyId::parse("hospital-a").unwrap(),
                datasets: datasets(),
                resources: resources(),
                first_seen_ms: 5,
                last_seen_ms: 5,
                revoked_at_ms: None,
                stats: ClientStats::default(),
                reliability: Reliability::default(),
            }
        );
    }

    #[test]
    fn revocations_create_unseen_parties_revoked() {
        let update = revocation_update("late", 7).unwrap();
        let mut d = doc! {"party": "late"};
        for op in ["$set", "$setOnInsert"] {
            d.extend(update.get_document(op).unwrap().clone());
        }
        let rec = client_from_doc(&d).unwrap();
        assert_eq!(
            rec,
            ClientRecord {
                party: PartyId::parse("late").unwrap(),
                datasets: vec![],
                resources: ResourcesEntry::default(),
                first_seen_ms: 7,
                last_seen_ms: 7,
                revoked_at_ms: Some(7),
                stats: ClientStats::default(),
                reliability: Reliability::default(),
            }
        );
        // Registrations never touch the revocation.
        let reg = registration_update("late", &datasets(), &resources(), 9).unwrap();
        for op in ["$set", "$setOnInsert"] {
            assert!(!reg.get_document(op).unwrap().contains_key("revoked_at_ms"));
        }
        assert_eq!(
            revocation_filter("late").get("revoked_at_ms"),
            Some(&Bson::Null),
            "only an unrevoked party is updated"
        );
        d.insert("revoked_at_ms", Bson::Null);
        assert_eq!(client_from_doc(&d).unwrap().revoked_at_ms, None);
    }

    #[test]
    fn counters_have_one_field_each() {
        let fields = [
            TaskOutcome::Offered,
            TaskOutcome::Accepted,
            TaskOutcome::Succeeded,
            TaskOutcome::Failed,
        ]
        .map(stat_field);
        let d = inserted("p", 1);
        for f in fields {
            assert_eq!(d.get_i64(f).unwrap(), 0, "{f} starts at 0");
        }
        let mut unique = fields.to_vec();
        unique.dedup();
        assert_eq!(unique.len(), 4);
    }

    #[test]
    fn task_results_update_one_counter_and_decay_both_recent_counts() {
        let update = result_update(TaskResult::TimedOut, 42);
        assert_eq!(update.len(), 1, "one pipeline stage");
        let set = update[0].get_document("$set").unwrap();
        let mut keys: Vec<&str> = set.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "last_result_ms",
                "recent_finished",
                "recent_unfinished",
                "results_timed_out"
            ]
        );
        let fields = [
            TaskResult::Finished,
            TaskResult::Failed,
            TaskResult::TimedOut,
        ]
        .map(result_field);
        assert_eq!(
            fields,
            ["results_finished", "results_failed", "results_timed_out"]
        );
        // Documents from before results were kept read as no history.
        let rec = client_from_doc(&inserted("old", 1)).unwrap();
        assert_eq!(rec.reliability, Reliability::default());
        let mut d = inserted("p", 1);
        d.insert("results_failed", 3i64);
        d.insert("recent_unfinished", 2.71);
        d.insert("last_result_ms", 9i64);
        let r = client_from_doc(&d).unwrap().reliability;
        assert_eq!(
            (r.failed, r.recent_unfinished, r.last_result_ms),
            (3, 2.71, 9)
        );
        d.insert("results_failed", -1i64);
        let err = client_from_doc(&d).unwrap_err().to_string();
        assert!(err.contains("results_failed") && err.contains("p"), "{err}");
    }

    #[test]
    fn unstorable_and_corrupt_values_name_the_party_and_field() {
        let mut huge = resources();
        huge.memory_bytes = u64::MAX;
        let err = registration_update("p1", &[], &huge, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resources.memory_bytes") && err.contains("p1"),
            "{err}"
        );

        let mut d = inserted("p2", 1);
        d.insert("tasks_failed", -3i64);
        let err = client_from_doc(&d).unwrap_err().to_string();
        assert!(err.contains("tasks_failed") && err.contains("p2"), "{err}");

        let mut d = inserted("p3", 1);
        d.insert("datasets", vec![Bson::Document(doc! {"name": "x"})]);
        let err = client_from_doc(&d).unwrap_err().to_string();
        assert!(
            err.contains("datasets.samples") && err.contains("p3"),
            "{err}"
        );
    }
}
