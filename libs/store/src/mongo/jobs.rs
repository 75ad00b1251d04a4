//! `JobStore` on MongoDB. See the module docs of `mongo` for why a job's
//! events and rounds pass through its own document on their way to
//! `job_events` and `job_rounds`. Log entries a coordinator reports take the
//! same path: one write pushes them with their seqs, advances `event_seq` and
//! counts them in `log_entries`, matching only the `event_seq` it read, so
//! they never share a seq with a transition (which matches it too).

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use cohort_core::{JobId, JobState};
use futures::TryStreamExt;
use mongodb::Collection;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ReturnDocument;

use super::{Db, Fields, is_duplicate_key, no_document, to_i64};
use crate::jobs::{
    JobEventRecord, JobFilter, JobNote, JobRecord, JobStore, RoundRecord, SelectedParty,
    notes_that_fit,
};
use crate::open::DatabaseOptions;
use crate::{Page, Result, StoreError};

const WHAT: &str = "job";
const JOBS: &str = "jobs";
const EVENTS: &str = "job_events";
const ROUNDS: &str = "job_rounds";
const COUNTERS: &str = "counters";
const TOKENS: &str = "api_tokens";
const AUDIT: &str = "audit_log";
/// The name of the counter document that hands out job `seq`s.
const JOB_SEQ: &str = "jobs";
/// Tries of a write that lost its race to a concurrent append to the job's log.
const WRITE_ATTEMPTS: usize = 16;

pub struct MongoJobStore {
    pub(super) db: Db,
    /// API tokens (see `mongo::tokens`).
    pub(super) tokens: Collection<Document>,
    /// The audit log (see `mongo::audit`).
    pub(super) audit: Collection<Document>,
    jobs: Collection<Document>,
    events: Collection<Document>,
    rounds: Collection<Document>,
    pub(super) counters: Collection<Document>,
}

impl MongoJobStore {
    /// Connects to `url` (`mongodb://...`), creates the collections and
    /// indexes, and copies out history a crash left in job documents.
    pub async fn open(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        let db = Db::open(url, opts).await?;
        db.ensure_collection(
            JOBS,
            &[
                (doc! {"id": 1}, true),
                (doc! {"namespace": 1, "state": 1}, false),
                (doc! {"seq": 1}, false),
            ],
        )
        .await?;
        db.ensure_collection(EVENTS, &[(doc! {"job": 1, "seq": 1}, true)])
            .await?;
        db.ensure_collection(ROUNDS, &[(doc! {"job": 1, "round": 1}, true)])
            .await?;
        db.ensure_collection(COUNTERS, &[(doc! {"name": 1}, true)])
            .await?;
        db.ensure_collection(
            TOKENS,
            &[
                (doc! {"id": 1}, true),
                (doc! {"sha256": 1}, true),
                (doc! {"namespace": 1, "created_at_ms": 1, "id": 1}, false),
            ],
        )
        .await?;
        db.ensure_collection(
            AUDIT,
            &[
                (doc! {"seq": 1}, true),
                (doc! {"namespace": 1, "seq": 1}, false),
            ],
        )
        .await?;
        let store = Self {
            tokens: db.collection(TOKENS),
            audit: db.collection(AUDIT),
            jobs: db.collection(JOBS),
            events: db.collection(EVENTS),
            rounds: db.collection(ROUNDS),
            counters: db.collection(COUNTERS),
            db,
        };
        store.seed_counter().await?;
        store.seed_audit_counter().await?;
        store.flush_leftovers().await?;
        Ok(store)
    }

    /// Never hands out a seq below an existing job's (a counter lost in a
    /// restore would otherwise reorder the listing).
    async fn seed_counter(&self) -> Result<()> {
        let last = self
            .jobs
            .find_one(doc! {})
            .sort(doc! {"seq": -1})
            .projection(doc! {"seq": 1, "id": 1})
            .await
            .map_err(|e| self.db.error(e, "job counter", JOB_SEQ))?;
        let max = match &last {
            Some(d) => Fields::new(d, WHAT, d.get_str("id").unwrap_or("?")).int("seq")?,
            None => 0,
        };
        match self
            .counters
            .update_one(doc! {"name": JOB_SEQ}, doc! {"$max": {"seq": max}})
            .upsert(true)
            .await
        {
            // A replica opening at the same time created it.
            Err(e) if !is_duplicate_key(&e) => Err(self.db.error(e, "job counter", JOB_SEQ)),
            _ => Ok(()),
        }
    }

    /// Copies out history that a crash left pending in job documents.
    async fn flush_leftovers(&self) -> Result<()> {
        let filter = doc! {"$or": [
            {"pending_events.0": {"$exists": true}},
            {"pending_rounds.0": {"$exists": true}},
        ]};
        let pending: Vec<Document> = self
            .jobs
            .find(filter)
            .await
            .map_err(|e| self.db.error(e, WHAT, "with pending history"))?
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, "with pending history"))?;
        for job in &pending {
            self.flush(job).await;
        }
        Ok(())
    }

    async fn next_seq(&self) -> Result<i64> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .counters
                .find_one_and_update(doc! {"name": JOB_SEQ}, doc! {"$inc": {"seq": 1i64}})
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await;
            match res {
                Ok(Some(d)) => return Fields::new(&d, "job counter", JOB_SEQ).int("seq"),
                Ok(None) => return Err(no_document("job counter", JOB_SEQ)),
                // Two first upserts raced; the counter exists now.
                Err(e) if is_duplicate_key(&e) && attempt < 3 => {}
                Err(e) => return Err(self.db.error(e, "job counter", JOB_SEQ)),
            }
        }
    }

    /// Copies the job document's pending events and rounds to their
    /// collections and pulls them out. Failing is harmless: readers merge
    /// pending history, and the next write or open retries.
    async fn flush(&self, job: &Document) {
        if let Err(e) = self.try_flush(job).await {
            tracing::warn!(error = %e, "job history stays in the job document for now");
        }
    }

    async fn try_flush(&self, job: &Document) -> Result<()> {
        let id = job.get_str("id").unwrap_or("?");
        let f = Fields::new(job, WHAT, id);
        let events = f.docs("pending_events")?;
        let rounds = f.docs("pending_rounds")?;
        if events.is_empty() && rounds.is_empty() {
            return Ok(());
        }
        let oid = f.oid("_id")?;
        let mut seqs = Vec::new();
        for e in events {
            let seq = f.nested(e, "pending_events.").int("seq")?;
            self.copy_out(&self.events, e, oid, id).await?;
            seqs.push(seq);
        }
        let mut numbers = Vec::new();
        for r in rounds {
            let round = f.nested(r, "pending_rounds.").int("round")?;
            self.copy_out(&self.rounds, r, oid, id).await?;
            numbers.push(round);
        }
        let mut pull = Document::new();
        if !seqs.is_empty() {
            pull.insert("pending_events", doc! {"seq": {"$in": seqs}});
        }
        if !numbers.is_empty() {
            pull.insert("pending_rounds", doc! {"round": {"$in": numbers}});
        }
        self.jobs
            .update_one(doc! {"_id": oid}, doc! {"$pull": pull})
            .await
            .map_err(|e| self.db.error(e, WHAT, id))?;
        Ok(())
    }

    /// Inserts one history item; already there (an earlier flush) is fine.
    async fn copy_out(
        &self,
        coll: &Collection<Document>,
        item: &Document,
        oid: ObjectId,
        id: &str,
    ) -> Result<()> {
        let mut row = item.clone();
        row.insert("job", oid);
        row.insert("job_id", id);
        match coll.insert_one(row).await {
            Err(e) if !is_duplicate_key(&e) => Err(self.db.error(e, WHAT, id)),
            _ => Ok(()),
        }
    }

    async fn find_jobs(&self, filter: Document, limit: Option<i64>) -> Result<Vec<Document>> {
        let mut find = self
            .jobs
            .find(filter)
            .sort(doc! {"seq": 1})
            .projection(record_projection());
        if let Some(limit) = limit {
            find = find.limit(limit);
        }
        let cursor = find.await.map_err(|e| self.db.error(e, WHAT, "list"))?;
        cursor
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, "list"))
    }
}

/// A job's fields without its pending history.
fn record_projection() -> Document {
    doc! {"pending_events": 0, "pending_rounds": 0, "rounds_done": 0}
}

fn not_found(id: &JobId) -> StoreError {
    StoreError::NotFound {
        what: WHAT,
        id: id.to_string(),
    }
}

fn parse_state(f: &Fields<'_>, field: &str, s: &str) -> Result<JobState> {
    s.parse()
        .map_err(|_| f.corrupt(format!("{field} {s:?} is not a job state")))
}

/// A new job's document: version 1, its first event pending.
fn new_job_doc(job: &JobRecord, oid: ObjectId, seq: i64, reason: &str) -> Document {
    doc! {
        "_id": oid,
        "id": job.id.as_str(),
        "seq": seq,
        "name": &job.name,
        "namespace": &job.namespace,
        "spec_json": &job.spec_json,
        "state": job.state.as_str(),
        "reason": &job.reason,
        "rounds_total": i64::from(job.rounds_total),
        "rounds_completed": i64::from(job.rounds_completed),
        "coordinator_endpoint": job.coordinator_endpoint.as_deref(),
        "coordinator_pid": job.coordinator_pid.map(i64::from),
        "launch_attempts": i64::from(job.launch_attempts),
        "created_at_ms": job.created_at_ms,
        "updated_at_ms": job.updated_at_ms,
        "version": 1i64,
        "event_seq": 1i64,
        "log_entries": 0i64,
        "pending_events": [event_doc(1, job.created_at_ms, None, job.state, reason)],
        "rounds_done": [],
        "pending_rounds": [],
    }
}

fn job_from_doc(d: &Document) -> Result<JobRecord> {
    let id = match d.get("id") {
        Some(Bson::String(s)) => s.as_str(),
        _ => "?",
    };
    let f = Fields::new(d, WHAT, id);
    let id = f.str("id")?;
    Ok(JobRecord {
        id: JobId::parse(id).map_err(|e| f.corrupt(format!("id: {e}")))?,
        name: f.str("name")?.to_string(),
        namespace: f.str("namespace")?.to_string(),
        spec_json: f.str("spec_json")?.to_string(),
        state: parse_state(&f, "state", f.str("state")?)?,
        reason: f.str("reason")?.to_string(),
        rounds_total: f.uint("rounds_total")?,
        rounds_completed: f.uint("rounds_completed")?,
        coordinator_endpoint: f.opt_str("coordinator_endpoint")?,
        coordinator_pid: match f.opt_int("coordinator_pid")? {
            Some(p) => Some(f.fit("coordinator_pid", p)?),
            None => None,
        },
        launch_attempts: f.uint("launch_attempts")?,
        created_at_ms: f.int("created_at_ms")?,
        updated_at_ms: f.int("updated_at_ms")?,
        version: f.int("version")?,
    })
}

fn event_doc(
    seq: i64,
    time_ms: i64,
    from: Option<JobState>,
    to: JobState,
    reason: &str,
) -> Document {
    doc! {
        "seq": seq,
        "time_ms": time_ms,
        "from": from.map(|s| s.as_str()),
        "to": to.as_str(),
        "reason": reason,
    }
}

/// A reported log entry: from = to = the job's `state`.
fn note_doc(seq: i64, time_ms: i64, state: JobState, note: &JobNote) -> Document {
    doc! {
        "seq": seq,
        "time_ms": time_ms,
        "from": state.as_str(),
        "to": state.as_str(),
        "reason": &note.message,
        "kind": &note.kind,
        "round": i64::from(note.round),
        "party": &note.party,
        "task_id": &note.task_id,
    }
}

fn event_from_doc(d: &Document, job_id: &str) -> Result<JobEventRecord> {
    let f = Fields::new(d, WHAT, job_id);
    // State changes, and events from before the log had entries, have no
    // kind, round, party or task.
    Ok(JobEventRecord {
        seq: f.uint("seq")?,
        time_ms: f.int("time_ms")?,
        from: match f.opt_str("from")? {
            Some(s) => Some(parse_state(&f, "event from", &s)?),
            None => None,
        },
        to: parse_state(&f, "event to", f.str("to")?)?,
        reason: f.str("reason")?.to_string(),
        kind: f.opt_str("kind")?.unwrap_or_default(),
        round: match f.opt_int("round")? {
            None => 0,
            Some(v) => f.fit("round", v)?,
        },
        party: f.opt_str("party")?.unwrap_or_default(),
        task_id: f.opt_str("task_id")?.unwrap_or_default(),
    })
}

fn round_doc(r: &RoundRecord, job_id: &str) -> Result<Document> {
    let at = format!("{job_id} round {}", r.round);
    // The same refusal as the SQL backends (a score that is not finite).
    crate::jobs::selected_json(&r.selected, &at)?;
    crate::jobs::check_privacy(r, &at)?;
    Ok(doc! {
        "round": i64::from(r.round),
        "eval_loss": r.eval_loss,
        "eval_accuracy": r.eval_accuracy,
        "eval_samples": to_i64(r.eval_samples, "eval_samples", WHAT, &at)?,
        "train_loss": r.train_loss,
        "updates": i64::from(r.updates),
        "model_version": i64::from(r.model_version),
        "duration_ms": to_i64(r.duration_ms, "duration_ms", WHAT, &at)?,
        "refused_updates": i64::from(r.refused_updates),
        "dropped_updates": i64::from(r.dropped_updates),
        "task_failures": i64::from(r.task_failures),
        "robust_accuracy": r.robust_accuracy,
        "eval_parties": i64::from(r.eval_parties),
        "eval_parties_expected": i64::from(r.eval_parties_expected),
        "bytes_to_parties": to_i64(r.bytes_to_parties, "bytes_to_parties", WHAT, &at)?,
        "bytes_from_parties": to_i64(r.bytes_from_parties, "bytes_from_parties", WHAT, &at)?,
        "bytes_from_parties_uncompressed": to_i64(
            r.bytes_from_parties_uncompressed,
            "bytes_from_parties_uncompressed",
            WHAT,
            &at,
        )?,
        "selected": r.selected.iter().map(|p| doc! {
            "party": &p.party,
            "score": p.score,
            "outcome": &p.outcome,
        }).collect::<Vec<_>>(),
        "dp_epsilon": r.dp_epsilon,
        "dp_sampling_rate": r.dp_sampling_rate,
    })
}

/// A count a round recorded before it was counted lacks: 0.
fn count_or_zero<T: TryFrom<i64> + Default>(f: &Fields<'_>, field: &str) -> Result<T> {
    match f.opt_int(field)? {
        None => Ok(T::default()),
        Some(v) => f.fit(field, v),
    }
}

fn round_from_doc(d: &Document, job_id: &str) -> Result<RoundRecord> {
    let f = Fields::new(d, WHAT, job_id);
    Ok(RoundRecord {
        round: f.uint("round")?,
        eval_loss: f.float("eval_loss")?,
        eval_accuracy: f.float("eval_accuracy")?,
        eval_samples: f.uint("eval_samples")?,
        train_loss: f.float("train_loss")?,
        updates: f.uint("updates")?,
        model_version: f.uint("model_version")?,
        duration_ms: f.uint("duration_ms")?,
        // Rounds recorded before these were counted have none.
        refused_updates: count_or_zero(&f, "refused_updates")?,
        dropped_updates: count_or_zero(&f, "dropped_updates")?,
        task_failures: count_or_zero(&f, "task_failures")?,
        robust_accuracy: match d.get("robust_accuracy") {
            None => 0.0,
            Some(_) => f.float("robust_accuracy")?,
        },
        eval_parties: count_or_zero(&f, "eval_parties")?,
        eval_parties_expected: count_or_zero(&f, "eval_parties_expected")?,
        bytes_to_parties: count_or_zero(&f, "bytes_to_parties")?,
        bytes_from_parties: count_or_zero(&f, "bytes_from_parties")?,
        bytes_from_parties_uncompressed: count_or_zero(&f, "bytes_from_parties_uncompressed")?,
        // Missing in rounds recorded before selections were kept.
        selected: f
            .docs("selected")?
            .into_iter()
            .map(|p| {
                let g = f.nested(p, "selected.");
                Ok(SelectedParty {
                    party: g.str("party")?.to_string(),
                    score: g.float("score")?,
                    outcome: g.str("outcome")?.to_string(),
                })
            })
            .collect::<Result<Vec<_>>>()?,
        // Missing in rounds recorded before privacy was accounted.
        dp_epsilon: float_or_zero(&f, d, "dp_epsilon")?,
        dp_sampling_rate: float_or_zero(&f, d, "dp_sampling_rate")?,
    })
}

/// A figure a round recorded before it was kept lacks: 0.
fn float_or_zero(f: &Fields<'_>, d: &Document, field: &str) -> Result<f64> {
    match d.get(field) {
        None => Ok(0.0),
        Some(_) => f.float(field),
    }
}

fn parse_page_token(token: Option<&str>) -> Result<i64> {
    match token {
        None | Some("") => Ok(0),
        Some(t) => t.parse().map_err(|_| {
            StoreError::Conflict(format!(
                "invalid page token {:?}",
                t.chars().take(40).collect::<String>()
            ))
        }),
    }
}

#[async_trait]
impl JobStore for MongoJobStore {
    async fn insert_job(&self, job: &JobRecord, reason: &str) -> Result<()> {
        let seq = self.next_seq().await?;
        let doc = new_job_doc(job, ObjectId::new(), seq, reason);
        match self.jobs.insert_one(&doc).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {
                return Err(StoreError::Conflict(format!("job {} exists", job.id)));
            }
            Err(e) => return Err(self.db.error(e, WHAT, job.id.as_str())),
        }
        self.flush(&doc).await;
        Ok(())
    }

    async fn get_job(&self, id: &JobId) -> Result<JobRecord> {
        let d = self
            .jobs
            .find_one(doc! {"id": id.as_str()})
            .projection(record_projection())
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?
            .ok_or_else(|| not_found(id))?;
        job_from_doc(&d)
    }

    async fn list_jobs(
        &self,
        filter: &JobFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<Page<JobRecord>> {
        let after = parse_page_token(page_token)?;
        let size = i64::from(page_size.clamp(1, 500));
        let mut query = doc! {"seq": {"$gt": after}};
        if let Some(ns) = &filter.namespace {
            query.insert("namespace", ns.as_str());
        }
        if let Some(state) = filter.state {
            query.insert("state", state.as_str());
        }
        // Keyset paging on seq, one extra to know whether a next page exists.
        let docs = self.find_jobs(query, Some(size + 1)).await?;
        let mut items = Vec::with_capacity(docs.len());
        let mut last_seq = 0i64;
        for d in docs.iter().take(size as usize) {
            let job = job_from_doc(d)?;
            last_seq = Fields::new(d, WHAT, job.id.as_str()).int("seq")?;
            items.push(job);
        }
        let next_token = (docs.len() as i64 > size).then(|| last_seq.to_string());
        Ok(Page { items, next_token })
    }

    async fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<JobRecord>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let docs = self
            .find_jobs(doc! {"state": {"$in": states}}, None)
            .await?;
        docs.iter().map(job_from_doc).collect()
    }

    async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        let docs: Vec<Document> = self
            .jobs
            .aggregate(vec![
                doc! {"$group": {"_id": "$state", "count": {"$sum": 1}}},
                doc! {"$sort": {"_id": 1}},
            ])
            .await
            .map_err(|e| self.db.error(e, WHAT, "count by state"))?
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, "count by state"))?;
        docs.iter()
            .map(|d| {
                let state = d.get_str("_id").map_err(|e| StoreError::Corrupt {
                    what: "job count",
                    id: String::new(),
                    message: format!("a state counted is not a string: {e}"),
                })?;
                let count = match d.get("count") {
                    Some(Bson::Int32(n)) => i64::from(*n),
                    Some(Bson::Int64(n)) => *n,
                    other => {
                        return Err(StoreError::Corrupt {
                            what: "job count",
                            id: state.to_string(),
                            message: format!("the count is {other:?}"),
                        });
                    }
                };
                crate::rows::state_count((state.to_string(), count))
            })
            .collect()
    }

    async fn update_job(&self, job: &JobRecord, now_ms: i64) -> Result<JobRecord> {
        let id = job.id.as_str();
        // Log entries appended meanwhile move event_seq without changing the
        // version: then read again and retry. Anything else ends the loop.
        for _ in 0..WRITE_ATTEMPTS {
            let current = self
                .jobs
                .find_one(doc! {"id": id})
                .projection(doc! {"state": 1, "version": 1, "event_seq": 1})
                .await
                .map_err(|e| self.db.error(e, WHAT, id))?
                .ok_or_else(|| not_found(&job.id))?;
            let f = Fields::new(&current, WHAT, id);
            let version = f.int("version")?;
            if version != job.version {
                return Err(StoreError::Conflict(format!(
                    "job {id} changed (version {version}, update based on {})",
                    job.version
                )));
            }
            let from = parse_state(&f, "state", f.str("state")?)?;
            let event_seq = f.int("event_seq")?;
            let mut set = doc! {
                "state": job.state.as_str(),
                "reason": &job.reason,
                "rounds_completed": i64::from(job.rounds_completed),
                "coordinator_endpoint": job.coordinator_endpoint.as_deref(),
                "coordinator_pid": job.coordinator_pid.map(i64::from),
                "launch_attempts": i64::from(job.launch_attempts),
                "updated_at_ms": now_ms,
                "spec_json": &job.spec_json,
            };
            let mut update = doc! {"$inc": {"version": 1i64}};
            if from != job.state {
                // The event rides in the same single-document write as the
                // transition; the event_seq filter makes event_seq + 1 ours.
                let seq = event_seq + 1;
                set.insert("event_seq", seq);
                let event = event_doc(seq, now_ms, Some(from), job.state, &job.reason);
                update.insert("$push", doc! {"pending_events": event});
            }
            update.insert("$set", set);
            let filter =
                doc! {"_id": f.oid("_id")?, "version": job.version, "event_seq": event_seq};
            let stored = self
                .jobs
                .find_one_and_update(filter, update)
                .return_document(ReturnDocument::After)
                .await
                .map_err(|e| self.db.error(e, WHAT, id))?;
            if let Some(stored) = stored {
                self.flush(&stored).await;
                return job_from_doc(&stored);
            }
            // Changed, deleted or logged to since we read it: the next read says which.
        }
        Err(StoreError::Conflict(format!(
            "job {id}: its log kept growing during the update; try again"
        )))
    }

    async fn record_round(&self, id: &JobId, r: &RoundRecord, now_ms: i64) -> Result<JobRecord> {
        let round = i64::from(r.round);
        let row = round_doc(r, id.as_str())?;
        // One write records the round and advances the job, and only if the
        // round is new: a repeated report matches nothing.
        let stored = self
            .jobs
            .find_one_and_update(
                doc! {"id": id.as_str(), "rounds_done": {"$ne": round}},
                doc! {
                    "$push": {"rounds_done": round, "pending_rounds": row},
                    "$max": {"rounds_completed": round},
                    "$inc": {"version": 1i64},
                    "$set": {"updated_at_ms": now_ms},
                },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?;
        match stored {
            Some(stored) => {
                self.flush(&stored).await;
                job_from_doc(&stored)
            }
            None => self.get_job(id).await,
        }
    }

    async fn list_rounds(&self, id: &JobId) -> Result<Vec<RoundRecord>> {
        // The job document first: a round pulled out of it since is already
        // in the collection when that is read.
        let Some(job) = self
            .jobs
            .find_one(doc! {"id": id.as_str()})
            .projection(doc! {"rounds_done": 1, "pending_rounds": 1})
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?
        else {
            return Ok(Vec::new());
        };
        let f = Fields::new(&job, WHAT, id.as_str());
        let done: BTreeSet<i64> = f.ints("rounds_done")?.into_iter().collect();
        let mut rounds = BTreeMap::new();
        let cursor = self
            .rounds
            .find(doc! {"job": f.oid("_id")?})
            .sort(doc! {"round": 1})
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?;
        let stored: Vec<Document> = cursor
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?;
        for d in stored.iter().chain(f.docs("pending_rounds")?) {
            let r = round_from_doc(d, id.as_str())?;
            // Rounds recorded after the job document was read wait for the
            // next call, so the answer is one moment's.
            if done.contains(&i64::from(r.round)) {
                rounds.insert(r.round, r);
            }
        }
        Ok(rounds.into_values().collect())
    }

    async fn list_events(&self, id: &JobId, after_seq: u64) -> Result<Vec<JobEventRecord>> {
        // The job document first, as in list_rounds.
        let Some(job) = self
            .jobs
            .find_one(doc! {"id": id.as_str()})
            .projection(doc! {"event_seq": 1, "pending_events": 1})
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?
        else {
            return Ok(Vec::new());
        };
        let f = Fields::new(&job, WHAT, id.as_str());
        let last = f.int("event_seq")?;
        let last_seq: u64 = f.fit("event_seq", last)?;
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let cursor = self
            .events
            .find(doc! {"job": f.oid("_id")?, "seq": {"$gt": after, "$lte": last}})
            .sort(doc! {"seq": 1})
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?;
        let stored: Vec<Document> = cursor
            .try_collect()
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?;
        let mut events = BTreeMap::new();
        for d in stored.iter().chain(f.docs("pending_events")?) {
            let e = event_from_doc(d, id.as_str())?;
            if e.seq > after_seq && e.seq <= last_seq {
                events.insert(e.seq, e);
            }
        }
        Ok(events.into_values().collect())
    }

    async fn append_notes(
        &self,
        id: &JobId,
        notes: &[JobNote],
        max_per_job: u64,
        now_ms: i64,
    ) -> Result<u32> {
        for _ in 0..WRITE_ATTEMPTS {
            let current = self
                .jobs
                .find_one(doc! {"id": id.as_str()})
                .projection(doc! {"state": 1, "event_seq": 1, "log_entries": 1})
                .await
                .map_err(|e| self.db.error(e, WHAT, id.as_str()))?
                .ok_or_else(|| not_found(id))?;
            let f = Fields::new(&current, WHAT, id.as_str());
            let state = parse_state(&f, "state", f.str("state")?)?;
            let event_seq = f.int("event_seq")?;
            // Jobs from before the log had entries hold none.
            let held: u64 = match f.opt_int("log_entries")? {
                None => 0,
                Some(v) => f.fit("log_entries", v)?,
            };
            let take = notes_that_fit(notes.len(), held, max_per_job);
            if take == 0 {
                return Ok(0);
            }
            let entries: Vec<Document> = notes[..take]
                .iter()
                .zip(event_seq + 1..)
                .map(|(note, seq)| note_doc(seq, now_ms, state, note))
                .collect();
            // Matching the event_seq read: no transition or other append
            // came between, so the state and the seqs are still right.
            let stored = self
                .jobs
                .find_one_and_update(
                    doc! {"_id": f.oid("_id")?, "event_seq": event_seq},
                    doc! {
                        "$set": {"event_seq": event_seq + take as i64},
                        "$inc": {"log_entries": take as i64},
                        "$push": {"pending_events": {"$each": entries}},
                    },
                )
                .return_document(ReturnDocument::After)
                .await
                .map_err(|e| self.db.error(e, WHAT, id.as_str()))?;
            if let Some(stored) = stored {
                self.flush(&stored).await;
                return Ok(take as u32);
            }
        }
        Err(StoreError::Conflict(format!(
            "job {id}: its log kept growing; try again"
        )))
    }

    async fn delete_job(&self, id: &JobId) -> Result<()> {
        let deleted = self
            .jobs
            .find_one_and_delete(doc! {"id": id.as_str()})
            .projection(doc! {"_id": 1})
            .await
            .map_err(|e| self.db.error(e, WHAT, id.as_str()))?
            .ok_or_else(|| not_found(id))?;
        let oid = Fields::new(&deleted, WHAT, id.as_str()).oid("_id")?;
        // The job is gone; history left behind by a failure here points at
        // a document that no longer exists and is never read again.
        for coll in [&self.events, &self.rounds] {
            if let Err(e) = coll.delete_many(doc! {"job": oid}).await {
                tracing::warn!(job = %id, error = %self.db.error(e, WHAT, id.as_str()),
                    "deleted job left history behind");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::conformance::jobs::{job, round};

    #[test]
    fn job_documents_round_trip() {
        let mut j = job("a", "team-b");
        j.state = JobState::Running;
        j.reason = "it's \"running\" ✓".into();
        j.spec_json = r#"{"name":"ünïcode"}"#.into();
        j.rounds_completed = 2;
        j.coordinator_endpoint = Some("127.0.0.1:5000".into());
        j.coordinator_pid = Some(u32::MAX);
        j.launch_attempts = 4;
        j.created_at_ms = 1_700_000_000_000;
        j.updated_at_ms = 1_700_000_000_001;
        j.version = 42;
        let d = new_job_doc(&j, ObjectId::new(), 7, "adopted");
        assert_eq!(
            job_from_doc(&d).unwrap(),
            JobRecord {
                version: 1,
                ..j.clone()
            }
        );
        assert_eq!(d.get_i64("seq").unwrap(), 7);

        // The first event is pending, numbered 1, from nothing.
        let f = Fields::new(&d, WHAT, j.id.as_str());
        let pending = f.docs("pending_events").unwrap();
        assert_eq!(pending.len(), 1);
        let e = event_from_doc(pending[0], j.id.as_str()).unwrap();
        assert_eq!(
            e,
            JobEventRecord {
                seq: 1,
                time_ms: j.created_at_ms,
                from: None,
                to: JobState::Running,
                reason: "adopted".into(),
                kind: String::new(),
                round: 0,
                party: String::new(),
                task_id: String::new(),
            }
        );
        assert_eq!(f.int("log_entries").unwrap(), 0);
        assert_eq!(f.int("event_seq").unwrap(), 1);

        let mut none = job("b", "default");
        none.coordinator_endpoint = None;
        none.coordinator_pid = None;
        let d = new_job_doc(&none, ObjectId::new(), 1, "created");
        assert_eq!(d.get("coordinator_pid"), Some(&Bson::Null));
        assert_eq!(job_from_doc(&d).unwrap(), none);
    }

    #[test]
    fn events_round_trip() {
        let d = event_doc(3, 60, Some(JobState::Queued), JobState::Running, "ready");
        let e = event_from_doc(&d, "j").unwrap();
        assert_eq!(
            (e.seq, e.time_ms, e.from, e.to, e.reason.as_str()),
            (3, 60, Some(JobState::Queued), JobState::Running, "ready")
        );
        assert_eq!(
            (
                e.kind.as_str(),
                e.round,
                e.party.as_str(),
                e.task_id.as_str()
            ),
            ("", 0, "", ""),
            "a state change has no kind, round, party or task"
        );

        let note = JobNote {
            kind: "task_failed".into(),
            round: 4,
            party: "hospital-a".into(),
            task_id: "j-r4-0a1b2c3d".into(),
            message: "tensor \"fc0.weight\" has shape [64, 64] ✓".into(),
        };
        let d = note_doc(9, 70, JobState::Running, &note);
        assert_eq!(
            event_from_doc(&d, "j").unwrap(),
            JobEventRecord {
                seq: 9,
                time_ms: 70,
                from: Some(JobState::Running),
                to: JobState::Running,
                reason: note.message.clone(),
                kind: note.kind.clone(),
                round: 4,
                party: note.party.clone(),
                task_id: note.task_id.clone(),
            }
        );
        let mut bad = d.clone();
        bad.insert("round", -1i64);
        let err = event_from_doc(&bad, "j").unwrap_err().to_string();
        assert!(err.contains("round"), "{err}");
    }

    #[test]
    fn rounds_from_before_the_outcome_counts_coverage_and_bytes_read_as_zero() {
        let mut d = round_doc(&round(2), "j").unwrap();
        for field in [
            "refused_updates",
            "dropped_updates",
            "task_failures",
            "robust_accuracy",
            "eval_parties",
            "eval_parties_expected",
            "bytes_to_parties",
            "bytes_from_parties",
            "bytes_from_parties_uncompressed",
            "selected",
            "dp_epsilon",
            "dp_sampling_rate",
        ] {
            d.remove(field);
        }
        let r = round_from_doc(&d, "j").unwrap();
        assert_eq!(
            (
                r.refused_updates,
                r.dropped_updates,
                r.task_failures,
                r.robust_accuracy
            ),
            (0, 0, 0, 0.0)
        );
        assert_eq!((r.eval_parties, r.eval_parties_expected), (0, 0));
        assert_eq!((r.bytes_to_parties, r.bytes_from_parties), (0, 0));
        assert_eq!(r.bytes_from_parties_uncompressed, 0);
        assert!(r.selected.is_empty());
        assert_eq!((r.dp_epsilon, r.dp_sampling_rate), (0.0, 0.0));
    }

    #[test]
    fn notes_that_fit_the_bound() {
        assert_eq!(notes_that_fit(5, 0, 10), 5);
        assert_eq!(notes_that_fit(5, 8, 10), 2);
        assert_eq!(notes_that_fit(5, 10, 10), 0);
        assert_eq!(
            notes_that_fit(5, 12, 10),
            0,
            "over the bound (lowered since): none"
        );
        assert_eq!(notes_that_fit(5, 0, 0), 0);
        assert_eq!(notes_that_fit(5, 0, u64::MAX), 5);
    }

    #[test]
    fn rounds_round_trip_with_nan() {
        let mut r = round(4);
        r.train_loss = f64::NAN;
        r.eval_samples = u64::from(u32::MAX) + 1;
        let back = round_from_doc(&round_doc(&r, "j").unwrap(), "j").unwrap();
        assert!(back.train_loss.is_nan());
        assert_eq!(
            RoundRecord {
                train_loss: 0.0,
                ..back
            },
            RoundRecord {
                train_loss: 0.0,
                ..r
            }
        );
        let mut huge = round(1);
        huge.duration_ms = u64::MAX;
        let err = round_doc(&huge, "j").unwrap_err().to_string();
        assert!(
            err.contains("duration_ms") && err.contains("j round 1"),
            "{err}"
        );
        let mut huge = round(1);
        huge.bytes_from_parties = i64::MAX as u64 + 1;
        let err = round_doc(&huge, "j").unwrap_err().to_string();
        assert!(err.contains("bytes_from_parties"), "{err}");
    }

    #[test]
    fn corrupt_job_documents_name_the_job_and_field() {
        let j = job("a", "default");
        let mut d = new_job_doc(&j, ObjectId::new(), 1, "created");
        d.insert("state", "EXPLODED");
        match job_from_doc(&d) {
            Err(StoreError::Corrupt { what, id, message }) => {
                assert_eq!((what, id.as_str()), ("job", j.id.as_str()));
                assert!(message.contains("EXPLODED"), "{message}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        d.insert("state", "QUEUED");
        d.insert("rounds_total", -1i64);
        let err = job_from_doc(&d).unwrap_err().to_string();
        assert!(err.contains("rounds_total"), "{err}");
        d.remove("id");
        let err = job_from_doc(&d).unwrap_err().to_string();
        assert!(err.contains("id is missing"), "{err}");
    }

    #[test]
    fn page_tokens() {
        assert_eq!(parse_page_token(None).unwrap(), 0);
        assert_eq!(parse_page_token(Some("")).unwrap(), 0);
        assert_eq!(parse_page_token(Some("41")).unwrap(), 41);
        assert!(matches!(
            parse_page_token(Some("x")),
            Err(StoreError::Conflict(_))
        ));
    }
}
