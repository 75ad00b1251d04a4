//! `JobStore` on PostgreSQL.

use async_trait::async_trait;
use cohort_core::{JobId, JobState};
use sqlx::postgres::{PgConnection, PgPool};

use super::{column, open_pool, with_history_table};
use crate::jobs::{
    JobEventRecord, JobFilter, JobNote, JobRecord, JobStore, RoundRecord, notes_that_fit,
};
use crate::{DatabaseOptions, Page, Result, StoreError};

pub struct PgJobStore {
    pub(crate) pool: PgPool,
}

impl PgJobStore {
    /// Connects to `url` (`postgres://...`) and applies the jobs migrations.
    pub async fn open(url: &str, opts: &DatabaseOptions) -> Result<Self> {
        let migrator = with_history_table(
            sqlx::migrate!("./migrations/postgres/jobs"),
            "_sqlx_migrations_jobs",
        );
        Ok(Self {
            pool: open_pool(url, &migrator, opts).await?,
        })
    }
}

const JOB_COLUMNS: &str = "seq, id, name, namespace, spec_json, state, reason, rounds_total, \
    rounds_completed, coordinator_endpoint, coordinator_pid, launch_attempts, created_at_ms, \
    updated_at_ms, version";

const WHAT: &str = "job";

fn corrupt(id: &str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: WHAT,
        id: id.to_string(),
        message: message.into(),
    }
}

fn not_found(id: &JobId) -> StoreError {
    StoreError::NotFound {
        what: WHAT,
        id: id.to_string(),
    }
}

fn parse_state(id: &str, field: &str, s: &str) -> Result<JobState> {
    s.parse()
        .map_err(|_| corrupt(id, format!("{field} {s:?} is not a job state")))
}

/// Appends the job's next event. Callers hold the job's row lock, which
/// serialises the `MAX(seq) + 1`.
async fn insert_event(
    conn: &mut PgConnection,
    id: &JobId,
    time_ms: i64,
    from: Option<JobState>,
    to: JobState,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, time_ms, from_state, to_state, reason) \
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $1), \
         $2, $3, $4, $5)",
    )
    .bind(id.as_str())
    .bind(time_ms)
    .bind(from.map(|s| s.as_str()))
    .bind(to.as_str())
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl JobStore for PgJobStore {
    async fn insert_job(&self, job: &JobRecord, reason: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, name, namespace, spec_json, state, reason, rounds_total, \
             rounds_completed, coordinator_endpoint, coordinator_pid, launch_attempts, \
             created_at_ms, updated_at_ms, version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 1) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(job.id.as_str())
        .bind(&job.name)
        .bind(&job.namespace)
        .bind(&job.spec_json)
        .bind(job.state.as_str())
        .bind(&job.reason)
        .bind(i64::from(job.rounds_total))
        .bind(i64::from(job.rounds_completed))
        .bind(&job.coordinator_endpoint)
        .bind(job.coordinator_pid.map(i64::from))
        .bind(i64::from(job.launch_attempts))
        .bind(job.created_at_ms)
        .bind(job.updated_at_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("job {} exists", job.id)));
        }
        insert_event(&mut tx, &job.id, job.created_at_ms, None, job.state, reason).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, id: &JobId) -> Result<JobRecord> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
        )))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| not_found(id))?;
        crate::rows::job(&row)
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
        let size = i64::from(page_size.clamp(1, 500));
        // Keyset pagination on seq: a page never repeats or skips a job that
        // existed when listing began, however many are inserted meanwhile.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE seq > $1 \
             AND ($2::text IS NULL OR namespace = $2) AND ($3::text IS NULL OR state = $3) \
             ORDER BY seq LIMIT $4"
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
            let job = crate::rows::job(row)?;
            last_seq = column(row, "seq", WHAT, job.id.as_str())?;
            items.push(job);
        }
        let next_token = (rows.len() as i64 > size).then(|| last_seq.to_string());
        Ok(Page { items, next_token })
    }

    async fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<JobRecord>> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = ANY($1) ORDER BY seq"
        )))
        .bind(&states)
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
        let mut tx = self.pool.begin().await?;
        // The row lock orders concurrent writers: the later one then sees the
        // new version and loses.
        let current = sqlx::query_as::<_, (String, i64)>(
            "SELECT state, version FROM jobs WHERE id = $1 FOR UPDATE",
        )
        .bind(job.id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((current, version)) = current else {
            return Err(not_found(&job.id));
        };
        if version != job.version {
            return Err(StoreError::Conflict(format!(
                "job {} changed (version {version}, update based on {})",
                job.id, job.version
            )));
        }
        let from = parse_state(job.id.as_str(), "state", &current)?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET state = $2, reason = $3, rounds_completed = $4, \
             coordinator_endpoint = $5, coordinator_pid = $6, launch_attempts = $7, \
             updated_at_ms = $8, version = version + 1, spec_json = $9 WHERE id = $1 \
             RETURNING {JOB_COLUMNS}"
        )))
        .bind(job.id.as_str())
        .bind(job.state.as_str())
        .bind(&job.reason)
        .bind(i64::from(job.rounds_completed))
        .bind(&job.coordinator_endpoint)
        .bind(job.coordinator_pid.map(i64::from))
        .bind(i64::from(job.launch_attempts))
        .bind(now_ms)
        .bind(&job.spec_json)
        .fetch_one(&mut *tx)
        .await?;
        let stored = crate::rows::job(&row)?;
        if from != job.state {
            insert_event(&mut tx, &job.id, now_ms, Some(from), job.state, &job.reason).await?;
        }
        tx.commit().await?;
        Ok(stored)
    }

    async fn record_round(&self, id: &JobId, r: &RoundRecord, now_ms: i64) -> Result<JobRecord> {
        let mut tx = self.pool.begin().await?;
        // Locking the job first makes a repeated report wait for the first
        // one, then find its round and change nothing.
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT version FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Err(not_found(id));
        }
        let what = format!("{id} round {}", r.round);
        crate::jobs::check_privacy(r, &what)?;
        let bytes_to_parties = super::to_i64(r.bytes_to_parties, "bytes_to_parties", WHAT, &what)?;
        let bytes_from_parties =
            super::to_i64(r.bytes_from_parties, "bytes_from_parties", WHAT, &what)?;
        let bytes_from_parties_uncompressed = super::to_i64(
            r.bytes_from_parties_uncompressed,
            "bytes_from_parties_uncompressed",
            WHAT,
            &what,
        )?;
        let inserted = sqlx::query(
            "INSERT INTO job_rounds (job_id, round, eval_loss, eval_accuracy, \
             eval_samples, train_loss, updates, model_version, duration_ms, refused_updates, \
             dropped_updates, task_failures, robust_accuracy, eval_parties, \
             eval_parties_expected, bytes_to_parties, bytes_from_parties, \
             bytes_from_parties_uncompressed, selected_json, dp_epsilon, dp_sampling_rate) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20, $21) \
             ON CONFLICT (job_id, round) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(i64::from(r.round))
        .bind(r.eval_loss)
        .bind(r.eval_accuracy)
        .bind(super::to_i64(r.eval_samples, "eval_samples", WHAT, &what)?)
        .bind(r.train_loss)
        .bind(i64::from(r.updates))
        .bind(i64::from(r.model_version))
        .bind(super::to_i64(r.duration_ms, "duration_ms", WHAT, &what)?)
        .bind(i64::from(r.refused_updates))
        .bind(i64::from(r.dropped_updates))
        .bind(i64::from(r.task_failures))
        .bind(r.robust_accuracy)
        .bind(i64::from(r.eval_parties))
        .bind(i64::from(r.eval_parties_expected))
        .bind(bytes_to_parties)
        .bind(bytes_from_parties)
        .bind(bytes_from_parties_uncompressed)
        .bind(crate::jobs::selected_json(&r.selected, &what)?)
        .bind(r.dp_epsilon)
        .bind(r.dp_sampling_rate)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let row = if inserted > 0 {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE jobs SET rounds_completed = GREATEST(rounds_completed, $2), \
                 updated_at_ms = $3, version = version + 1 WHERE id = $1 RETURNING {JOB_COLUMNS}"
            )))
            .bind(id.as_str())
            .bind(i64::from(r.round))
            .bind(now_ms)
            .fetch_one(&mut *tx)
            .await?
        } else {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
            )))
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await?
        };
        let stored = crate::rows::job(&row)?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn list_rounds(&self, id: &JobId) -> Result<Vec<RoundRecord>> {
        let rows = sqlx::query("SELECT * FROM job_rounds WHERE job_id = $1 ORDER BY round")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| crate::rows::round(row, id)).collect()
    }

    async fn list_events(&self, id: &JobId, after_seq: u64) -> Result<Vec<JobEventRecord>> {
        let rows =
            sqlx::query("SELECT * FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq")
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
        let mut tx = self.pool.begin().await?;
        // The job's row lock orders this with every other event writer (see
        // insert_event) and with other appends counting against the bound.
        let current = sqlx::query_as::<_, (String, i64)>(
            "SELECT state, log_entries FROM jobs WHERE id = $1 FOR UPDATE",
        )
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, held)) = current else {
            return Err(not_found(id));
        };
        let state = parse_state(id.as_str(), "state", &state)?;
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
                 VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $1), \
                 $2, $3, $3, $4, $5, $6, $7, $8)",
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
        sqlx::query("UPDATE jobs SET log_entries = log_entries + $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(take as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(take as u32)
    }

    async fn delete_job(&self, id: &JobId) -> Result<()> {
        // Events and rounds go with it (ON DELETE CASCADE).
        let n = sqlx::query("DELETE FROM jobs WHERE id = $1")
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
