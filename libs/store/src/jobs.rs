//! The job store, owned by job-scheduler: jobs, their log (state changes and
//! the entries coordinators report), round history, and (through the
//! [`TokenStore`] and [`AuditStore`] supertraits) the API tokens and the
//! audit log.

use async_trait::async_trait;
use cohort_core::{JobId, JobState};
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use crate::audit::AuditStore;
use crate::tokens::TokenStore;
use crate::{DatabaseOptions, Page, Result, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub name: String,
    pub namespace: String,
    pub spec_json: String,
    pub state: JobState,
    pub reason: String,
    pub rounds_total: u32,
    pub rounds_completed: u32,
    pub coordinator_endpoint: Option<String>,
    pub coordinator_pid: Option<u32>,
    pub launch_attempts: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Optimistic concurrency: an update must carry the version it read.
    pub version: i64,
}

/// One entry of a job's log: a state change (`kind` empty, `from` → `to`) or
/// something that happened to the job's tasks, parties or updates (`kind` set,
/// `from` = `to` = the job's state then, `reason` the message).
#[derive(Debug, Clone, PartialEq)]
pub struct JobEventRecord {
    pub seq: u64,
    pub time_ms: i64,
    pub from: Option<JobState>,
    pub to: JobState,
    pub reason: String,
    /// Empty for a state change.
    pub kind: String,
    /// The round it concerns; 0 if none.
    pub round: u32,
    /// The party it concerns; empty if none.
    pub party: String,
    /// The task it concerns; empty if none.
    pub task_id: String,
}

/// A log entry to append (see [`JobStore::append_notes`]). The caller
/// validates it; `kind` must not be empty (empty means a state change).
#[derive(Debug, Clone, PartialEq)]
pub struct JobNote {
    pub kind: String,
    pub round: u32,
    pub party: String,
    pub task_id: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoundRecord {
    pub round: u32,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    pub eval_samples: u64,
    pub train_loss: f64,
    pub updates: u32,
    pub model_version: u32,
    pub duration_ms: u64,
    /// Round calls the coordinator refused in this round.
    pub refused_updates: u32,
    /// Updates received but left out of the aggregate.
    pub dropped_updates: u32,
    /// Tasks of this round that failed on their party.
    pub task_failures: u32,
    /// The accuracy the stop rule looks at (robust to one party's claim).
    pub robust_accuracy: f64,
    /// Parties whose evaluation the round's metrics rest on, of
    /// `eval_parties_expected` (those holding the dataset when evaluation
    /// was offered); 0 of 0 for rounds recorded before this was counted.
    pub eval_parties: u32,
    pub eval_parties_expected: u32,
    /// Tensor bytes of the global model served to the round's parties, and
    /// of the updates they uploaded; 0 for rounds recorded before these were
    /// counted. Stores refuse values above `i64::MAX` (their 63-bit range).
    pub bytes_to_parties: u64,
    pub bytes_from_parties: u64,
    /// The updates received as f32 (decoded): above `bytes_from_parties` when the job
    /// compresses its updates; 0 for rounds recorded before it was counted.
    pub bytes_from_parties_uncompressed: u64,
    /// The parties the round's selection drew for training, with their weights and what
    /// became of their tasks; empty for rounds recorded before they were kept.
    pub selected: Vec<SelectedParty>,
    /// Under differential privacy: ε spent (at the job's δ) once the round was released,
    /// +inf without noise; and the round's sampling rate. 0 without DP and for rounds
    /// recorded before they were kept. Stores refuse a NaN ε and a rate outside [0, 1].
    pub dp_epsilon: f64,
    pub dp_sampling_rate: f64,
}

/// Refuses privacy figures a store cannot keep faithfully (NaN) or that mean nothing.
pub(crate) fn check_privacy(r: &RoundRecord, at: &str) -> Result<()> {
    let bad = |field: &str, v: f64| StoreError::Corrupt {
        what: "job",
        id: at.to_string(),
        message: format!("{field}: {v} is not a privacy figure"),
    };
    if r.dp_epsilon.is_nan() || r.dp_epsilon < 0.0 {
        return Err(bad("dp_epsilon", r.dp_epsilon));
    }
    if !(0.0..=1.0).contains(&r.dp_sampling_rate) {
        return Err(bad("dp_sampling_rate", r.dp_sampling_rate));
    }
    Ok(())
}

/// A party a round's selection drew (see `RoundRecord::selected`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SelectedParty {
    pub party: String,
    /// Its score under the selection; stores refuse one that is not finite.
    pub score: f64,
    /// "finished", "failed", "timed_out", "refused" or "pending".
    pub outcome: String,
}

/// `selected` as the SQL backends store it (a JSON array), refusing scores JSON cannot
/// hold (NaN, infinities) and naming the round.
pub(crate) fn selected_json(selected: &[SelectedParty], at: &str) -> Result<String> {
    if let Some(p) = selected.iter().find(|p| !p.score.is_finite()) {
        return Err(StoreError::Corrupt {
            what: "job",
            id: at.to_string(),
            message: format!(
                "selected: party {}'s score {} is not finite",
                p.party, p.score
            ),
        });
    }
    serde_json::to_string(selected).map_err(|e| StoreError::Corrupt {
        what: "job",
        id: at.to_string(),
        message: format!("selected: {e}"),
    })
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub namespace: Option<String>,
    pub state: Option<JobState>,
}

/// Job-scheduler's store. It also holds the API tokens ([`TokenStore`]) and
/// the audit log ([`AuditStore`]), so one `Arc<dyn JobStore>` serves all three.
#[async_trait]
pub trait JobStore: TokenStore + AuditStore + Send + Sync + 'static {
    /// Stores a new job and its first event (→ its state). Conflict if the id exists.
    async fn insert_job(&self, job: &JobRecord, reason: &str) -> Result<()>;
    async fn get_job(&self, id: &JobId) -> Result<JobRecord>;
    /// Oldest first; `page_token` is the one a previous page returned. Paging
    /// is by insertion order (keyset), so jobs inserted while paging never make
    /// a page repeat or skip one that existed before.
    async fn list_jobs(
        &self,
        filter: &JobFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<Page<JobRecord>>;
    /// Jobs in any of `states`, oldest first (recovery after a restart).
    async fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<JobRecord>>;
    /// How many jobs are in each state, over every namespace; states without a job are
    /// absent. One query, counted by the database (the `cohort_jobs` metric).
    async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>>;
    /// Writes `job` if its version is still the stored one, recording an event when
    /// the state changed. Returns the stored record (version + 1). Conflict otherwise.
    async fn update_job(&self, job: &JobRecord, now_ms: i64) -> Result<JobRecord>;
    /// Records a completed round and advances `rounds_completed`, atomically.
    /// Idempotent: reporting the same round again changes nothing.
    async fn record_round(&self, id: &JobId, round: &RoundRecord, now_ms: i64)
    -> Result<JobRecord>;
    async fn list_rounds(&self, id: &JobId) -> Result<Vec<RoundRecord>>;
    /// The job's events with a seq above `after_seq` (0: all), oldest first.
    async fn list_events(&self, id: &JobId, after_seq: u64) -> Result<Vec<JobEventRecord>>;
    /// Appends `notes` to the job's log, in order after its existing events,
    /// each with `from` = `to` = the job's state. A job keeps at most
    /// `max_per_job` notes (state changes do not count): once it is full the
    /// rest are dropped. Returns how many were stored. NotFound for a missing job.
    async fn append_notes(
        &self,
        id: &JobId,
        notes: &[JobNote],
        max_per_job: u64,
        now_ms: i64,
    ) -> Result<u32>;
    /// Removes the job with its events and rounds.
    async fn delete_job(&self, id: &JobId) -> Result<()>;
}

pub struct SqliteJobStore {
    pub(crate) pool: SqlitePool,
}

const HISTORY_TABLE: &str = "_sqlx_migrations_jobs";

impl SqliteJobStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://PATH`)
    /// with default pool settings and applies the jobs migrations.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &DatabaseOptions::default()).await
    }

    pub async fn open_with(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        let mut migrator = sqlx::migrate!("./migrations/sqlite/jobs");
        // Own history table, so the stores can share a database.
        migrator.dangerous_set_table_name(HISTORY_TABLE);
        Ok(Self {
            pool: crate::sqlite::open_store(url, &migrator, HISTORY_TABLE, opts).await?,
        })
    }
}

const JOB_COLUMNS: &str = "seq, id, name, namespace, spec_json, state, reason, rounds_total, \
    rounds_completed, coordinator_endpoint, coordinator_pid, launch_attempts, created_at_ms, \
    updated_at_ms, version";

fn corrupt(id: &str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: "job",
        id: id.to_string(),
        message: message.into(),
    }
}

/// Write transactions take SQLite's write lock when they begin: a deferred one
/// that read first fails with "database is locked" if another writer committed
/// meanwhile, instead of waiting its turn.
pub(crate) const IMMEDIATE: &str = "BEGIN IMMEDIATE";

fn not_found(id: &JobId) -> StoreError {
    StoreError::NotFound {
        what: "job",
        id: id.to_string(),
    }
}

/// How many of `offered` notes a job holding `held` of at most `max` takes.
pub(crate) fn notes_that_fit(offered: usize, held: u64, max: u64) -> usize {
    let room = usize::try_from(max.saturating_sub(held)).unwrap_or(usize::MAX);
    offered.min(room).min(u32::MAX as usize)
}

async fn insert_event(
    tx: &mut sqlx::SqliteConnection,
    id: &JobId,
    time_ms: i64,
    from: Option<JobState>,
    to: JobState,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, time_ms, from_state, to_state, reason) \
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = ?1), ?2, ?3, ?4, ?5)",
    )
    .bind(id.as_str())
    .bind(time_ms)
    .bind(from.map(|s| s.as_str()))
    .bind(to.as_str())
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn fetch_job(conn: &mut sqlx::SqliteConnection, id: &JobId) -> Result<JobRecord> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"
    )))
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| not_found(id))?;
    crate::rows::job(&row)
}

#[async_trait]
impl JobStore for SqliteJobStore {
    async fn insert_job(&self, job: &JobRecord, reason: &str) -> Result<()> {
        let mut tx = self.pool.begin_with(IMMEDIATE).await?;
        let res = sqlx::query(
            "INSERT INTO jobs (id, name, namespace, spec_json, state, reason, rounds_total, \
             rounds_completed, coordinator_endpoint, coordinator_pid, launch_attempts, \
             created_at_ms, updated_at_ms, version) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 1)",
        )
        .bind(job.id.as_str())
        .bind(&job.name)
        .bind(&job.namespace)
        .bind(&job.spec_json)
        .bind(job.state.as_str())
        .bind(&job.reason)
        .bind(job.rounds_total as i64)
        .bind(job.rounds_completed as i64)
        .bind(&job.coordinator_endpoint)
        .bind(job.coordinator_pid.map(|p| p as i64))
        .bind(job.launch_attempts as i64)
        .bind(job.created_at_ms)
        .bind(job.updated_at_ms)
        .execute(&mut *tx)
        .await;
        match res {
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                return Err(StoreError::Conflict(format!("job {} exists", job.id)));
            }
            r => {
                r?;
            }
        }
        insert_event(&mut tx, &job.id, job.created_at_ms, None, job.state, reason).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, id: &JobId) -> Result<JobRecord> {
        let mut conn = self.pool.acquire().await?;
        fetch_job(&mut conn, id).await
    }

    async fn list_jobs(
        &self,
        filter: &JobFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<Page<JobRecord>> {
        let after: i64 = match page_token {
            None | Some("") => 0,
            Some(t) => t.parse().map_err(|_| {
                StoreError::Conflict(format!(
                    "invalid page token {:?}",
                    t.chars().take(40).collect::<String>()
                ))
            })?,
        };
        let size = page_size.clamp(1, 500) as i64;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE seq > ?1 \
             AND (?2 IS NULL OR namespace = ?2) AND (?3 IS NULL OR state = ?3) \
             ORDER BY seq LIMIT ?4"
        )))
        .bind(after)
        .bind(filter.namespace.as_deref())
        .bind(filter.state.map(|s| s.as_str()))
        .bind(size + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last_seq = 0i64;
        for row in rows.iter().take(size as usize) {
            items.push(crate::rows::job(row)?);
            last_seq = row.try_get("seq")?;
        }
        let next_token = (rows.len() as i64 > size).then(|| last_seq.to_string());
        Ok(Page { items, next_token })
    }

    async fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<JobRecord>> {
        // One query, oldest first, like the other backends.
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let states = serde_json::to_string(&states)
            .map_err(|e| StoreError::Conflict(format!("job states: {e}")))?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs \
             WHERE state IN (SELECT value FROM json_each(?1)) ORDER BY seq"
        )))
        .bind(states)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(crate::rows::job).collect()
    }

    async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        let rows = sqlx::query_as::<_, (String, i64)>(crate::rows::COUNT_JOBS_BY_STATE)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(crate::rows::state_count).collect()
    }

    async fn update_job(&self, job: &JobRecord, now_ms: i64) -> Result<JobRecord> {
        let mut tx = self.pool.begin_with(IMMEDIATE).await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?1 AND version = ?2")
                .bind(job.id.as_str())
                .bind(job.version)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(current) = current else {
            let exists: Option<i64> = sqlx::query_scalar("SELECT version FROM jobs WHERE id = ?1")
                .bind(job.id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            return Err(match exists {
                None => not_found(&job.id),
                Some(v) => StoreError::Conflict(format!(
                    "job {} changed (version {v}, update based on {})",
                    job.id, job.version
                )),
            });
        };
        let from: JobState = current
            .parse()
            .map_err(|_| corrupt(job.id.as_str(), format!("state {current:?}")))?;
        sqlx::query(
            "UPDATE jobs SET state = ?2, reason = ?3, rounds_completed = ?4, \
             coordinator_endpoint = ?5, coordinator_pid = ?6, launch_attempts = ?7, \
             updated_at_ms = ?8, version = version + 1, spec_json = ?9 WHERE id = ?1",
        )
        .bind(job.id.as_str())
        .bind(job.state.as_str())
        .bind(&job.reason)
        .bind(job.rounds_completed as i64)
        .bind(&job.coordinator_endpoint)
        .bind(job.coordinator_pid.map(|p| p as i64))
        .bind(job.launch_attempts as i64)
        .bind(now_ms)
        .bind(&job.spec_json)
        .execute(&mut *tx)
        .await?;
        if from != job.state {
            insert_event(&mut tx, &job.id, now_ms, Some(from), job.state, &job.reason).await?;
        }
        let stored = fetch_job(&mut tx, &job.id).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn record_round(&self, id: &JobId, r: &RoundRecord, now_ms: i64) -> Result<JobRecord> {
        // Checked before anything is written, like the other backends: a
        // wrapped `as i64` would store a negative count.
        let at = format!("{id} round {}", r.round);
        let eval_samples = crate::to_i64(r.eval_samples, "eval_samples", "job", &at)?;
        let duration_ms = crate::to_i64(r.duration_ms, "duration_ms", "job", &at)?;
        let bytes_to_parties = crate::to_i64(r.bytes_to_parties, "bytes_to_parties", "job", &at)?;
        let bytes_from_parties =
            crate::to_i64(r.bytes_from_parties, "bytes_from_parties", "job", &at)?;
        let bytes_from_parties_uncompressed = crate::to_i64(
            r.bytes_from_parties_uncompressed,
            "bytes_from_parties_uncompressed",
            "job",
            &at,
        )?;
        let selected = selected_json(&r.selected, &at)?;
        check_privacy(r, &at)?;
        let mut tx = self.pool.begin_with(IMMEDIATE).await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT version FROM jobs WHERE id = ?1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(not_found(id));
        }
        let inserted = sqlx::query(
            "INSERT OR IGNORE INTO job_rounds (job_id, round, eval_loss, eval_accuracy, \
             eval_samples, train_loss, updates, model_version, duration_ms, refused_updates, \
             dropped_updates, task_failures, robust_accuracy, eval_parties, \
             eval_parties_expected, bytes_to_parties, bytes_from_parties, \
             bytes_from_parties_uncompressed, selected_json, dp_epsilon, dp_sampling_rate) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
             ?18, ?19, ?20, ?21)",
        )
        .bind(id.as_str())
        .bind(r.round as i64)
        .bind(r.eval_loss)
        .bind(r.eval_accuracy)
        .bind(eval_samples)
        .bind(r.train_loss)
        .bind(r.updates as i64)
        .bind(r.model_version as i64)
        .bind(duration_ms)
        .bind(i64::from(r.refused_updates))
        .bind(i64::from(r.dropped_updates))
        .bind(i64::from(r.task_failures))
        .bind(r.robust_accuracy)
        .bind(i64::from(r.eval_parties))
        .bind(i64::from(r.eval_parties_expected))
        .bind(bytes_to_parties)
        .bind(bytes_from_parties)
        .bind(bytes_from_parties_uncompressed)
        .bind(selected)
        .bind(r.dp_epsilon)
        .bind(r.dp_sampling_rate)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted > 0 {
            sqlx::query(
                "UPDATE jobs SET rounds_completed = MAX(rounds_completed, ?2), \
                 updated_at_ms = ?3, version = version + 1 WHERE id = ?1",
            )
            .bind(id.as_str())
            .bind(r.round as i64)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        let stored = fetch_job(&mut tx, id).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn list_rounds(&self, id: &JobId) -> Result<Vec<RoundRecord>> {
        let rows = sqlx::query("SELECT * FROM job_rounds WHERE job_id = ?1 ORDER BY round")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| crate::rows::round(row, id)).collect()
    }

    async fn list_events(&self, id: &JobId, after_seq: u64) -> Result<Vec<JobEventRecord>> {
        let rows =
            sqlx::query("SELECT * FROM job_events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq")
                .bind(id.as_str())
                .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|row| crate::rows::event(row, id)).collect()
    }

    async fn append_notes(
        &self,
        id: &JobId,
        notes: &[JobNote],
        max_per_job: u64,
        now_ms: i64,
    ) -> Result<u32> {
        // The write lock taken at BEGIN orders this with every other event
        // writer, so the MAX(seq) + 1 below stays unique.
        let mut tx = self.pool.begin_with(IMMEDIATE).await?;
        let current: Option<(String, i64)> =
            sqlx::query_as("SELECT state, log_entries FROM jobs WHERE id = ?1")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some((state, held)) = current else {
            return Err(not_found(id));
        };
        let state: JobState = state
            .parse()
            .map_err(|_| corrupt(id.as_str(), format!("state {state:?}")))?;
        let held =
            u64::try_from(held).map_err(|_| corrupt(id.as_str(), format!("log_entries {held}")))?;
        let take = notes_that_fit(notes.len(), held, max_per_job);
        if take == 0 {
            return Ok(0);
        }
        for note in &notes[..take] {
            sqlx::query(
                "INSERT INTO job_events (job_id, seq, time_ms, from_state, to_state, reason, \
                 kind, round, party, task_id) \
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = ?1), \
                 ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .bind(id.as_str())
            .bind(now_ms)
            .bind(state.as_str())
            .bind(&note.message)
            .bind(&note.kind)
            .bind(i64::from(note.round))
            .bind(&note.party)
            .bind(&note.task_id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE jobs SET log_entries = log_entries + ?2 WHERE id = ?1")
            .bind(id.as_str())
            .bind(take as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(take as u32)
    }

    async fn delete_job(&self, id: &JobId) -> Result<()> {
        let n = sqlx::query("DELETE FROM jobs WHERE id = ?1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}
