//! Decoding records from SQL rows, once for every SQL backend: SQLite and
//! PostgreSQL rows both implement [`Columns`], and the decoders check every
//! value (ids, states, ranges) so a bad row is `Corrupt`, never a panic.

use cohort_core::{JobId, JobState, PartyId};

use crate::audit::AuditRecord;
use crate::clients::{ClientRecord, ClientStats, Reliability};
use crate::jobs::{JobEventRecord, JobRecord, RoundRecord};
use crate::models::ModelVersionRecord;
use crate::tokens::TokenRecord;
use crate::{Result, StoreError};

/// The column types the stores read.
pub(crate) trait Columns {
    fn opt_text(&self, field: &str) -> std::result::Result<Option<String>, sqlx::Error>;
    fn opt_int(&self, field: &str) -> std::result::Result<Option<i64>, sqlx::Error>;
    fn opt_real(&self, field: &str) -> std::result::Result<Option<f64>, sqlx::Error>;
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn opt_text(&self, field: &str) -> std::result::Result<Option<String>, sqlx::Error> {
                sqlx::Row::try_get(self, field)
            }
            fn opt_int(&self, field: &str) -> std::result::Result<Option<i64>, sqlx::Error> {
                sqlx::Row::try_get(self, field)
            }
            fn opt_real(&self, field: &str) -> std::result::Result<Option<f64>, sqlx::Error> {
                sqlx::Row::try_get(self, field)
            }
        }
    };
}

columns_for!(sqlx::sqlite::SqliteRow);
columns_for!(sqlx::postgres::PgRow);

/// Reads the columns of one record, naming the record in every error.
struct Reader<'a, R> {
    row: &'a R,
    what: &'static str,
    id: String,
}

impl<'a, R: Columns> Reader<'a, R> {
    fn new(row: &'a R, what: &'static str) -> Self {
        Reader {
            row,
            what,
            id: "?".to_string(),
        }
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            what: self.what,
            id: self.id.clone(),
            message,
        }
    }

    fn required<T>(
        &self,
        field: &str,
        v: std::result::Result<Option<T>, sqlx::Error>,
    ) -> Result<T> {
        match v {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(self.corrupt(format!("column {field} is NULL"))),
            Err(e) => Err(self.corrupt(format!("column {field}: {e}"))),
        }
    }

    fn text(&self, field: &str) -> Result<String> {
        self.required(field, self.row.opt_text(field))
    }

    fn opt_text(&self, field: &str) -> Result<Option<String>> {
        self.row
            .opt_text(field)
            .map_err(|e| self.corrupt(format!("column {field}: {e}")))
    }

    fn int(&self, field: &str) -> Result<i64> {
        self.required(field, self.row.opt_int(field))
    }

    fn opt_int(&self, field: &str) -> Result<Option<i64>> {
        self.row
            .opt_int(field)
            .map_err(|e| self.corrupt(format!("column {field}: {e}")))
    }

    fn unsigned<T: TryFrom<i64>>(&self, field: &str) -> Result<T> {
        let v = self.int(field)?;
        T::try_from(v).map_err(|_| self.corrupt(format!("{field} out of range: {v}")))
    }

    /// NULL reads as NaN: SQLite stores NaN as NULL.
    fn real(&self, field: &str) -> Result<f64> {
        self.row
            .opt_real(field)
            .map(|v| v.unwrap_or(f64::NAN))
            .map_err(|e| self.corrupt(format!("column {field}: {e}")))
    }

    fn state(&self, field: &str) -> Result<JobState> {
        let s = self.text(field)?;
        s.parse()
            .map_err(|_| self.corrupt(format!("{field} {s:?} is not a job state")))
    }
}

/// Jobs per state, in SQL both SQL backends speak.
pub(crate) const COUNT_JOBS_BY_STATE: &str =
    "SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state";

/// A state and its job count as a backend's GROUP BY returns them.
pub(crate) fn state_count((state, count): (String, i64)) -> Result<(JobState, u64)> {
    let corrupt = |message: String| StoreError::Corrupt {
        what: "job count",
        id: state.clone(),
        message,
    };
    let parsed = state
        .parse()
        .map_err(|_| corrupt(format!("{state:?} is not a job state")))?;
    let count = u64::try_from(count).map_err(|_| corrupt(format!("count {count} < 0")))?;
    Ok((parsed, count))
}

pub(crate) fn job<R: Columns>(row: &R) -> Result<JobRecord> {
    let mut r = Reader::new(row, "job");
    r.id = r.text("id")?;
    Ok(JobRecord {
        id: JobId::parse(&r.id).map_err(|e| r.corrupt(e.to_string()))?,
        name: r.text("name")?,
        namespace: r.text("namespace")?,
        spec_json: r.text("spec_json")?,
        state: r.state("state")?,
        reason: r.text("reason")?,
        rounds_total: r.unsigned("rounds_total")?,
        rounds_completed: r.unsigned("rounds_completed")?,
        coordinator_endpoint: r.opt_text("coordinator_endpoint")?,
        coordinator_pid: match r.row.opt_int("coordinator_pid") {
            Ok(None) => None,
            _ => Some(r.unsigned("coordinator_pid")?),
        },
        launch_attempts: r.unsigned("launch_attempts")?,
        created_at_ms: r.int("created_at_ms")?,
        updated_at_ms: r.int("updated_at_ms")?,
        version: r.int("version")?,
    })
}

pub(crate) fn event<R: Columns>(row: &R, job: &JobId) -> Result<JobEventRecord> {
    let mut r = Reader::new(row, "job event");
    r.id = job.to_string();
    Ok(JobEventRecord {
        seq: r.unsigned("seq")?,
        time_ms: r.int("time_ms")?,
        from: match r.opt_text("from_state")? {
            Some(_) => Some(r.state("from_state")?),
            None => None,
        },
        to: r.state("to_state")?,
        reason: r.text("reason")?,
        kind: r.text("kind")?,
        round: r.unsigned("round")?,
        party: r.text("party")?,
        task_id: r.text("task_id")?,
    })
}

pub(crate) fn round<R: Columns>(row: &R, job: &JobId) -> Result<RoundRecord> {
    let mut r = Reader::new(row, "job round");
    r.id = job.to_string();
    Ok(RoundRecord {
        round: r.unsigned("round")?,
        eval_loss: r.real("eval_loss")?,
        eval_accuracy: r.real("eval_accuracy")?,
        eval_samples: r.unsigned("eval_samples")?,
        train_loss: r.real("train_loss")?,
        updates: r.unsigned("updates")?,
        model_version: r.unsigned("model_version")?,
        duration_ms: r.unsigned("duration_ms")?,
        refused_updates: r.unsigned("refused_updates")?,
        dropped_updates: r.unsigned("dropped_updates")?,
        task_failures: r.unsigned("task_failures")?,
        robust_accuracy: r.real("robust_accuracy")?,
        eval_parties: r.unsigned("eval_parties")?,
        eval_parties_expected: r.unsigned("eval_parties_expected")?,
        bytes_to_parties: r.unsigned("bytes_to_parties")?,
        bytes_from_parties: r.unsigned("bytes_from_parties")?,
        bytes_from_parties_uncompressed: r.unsigned("bytes_from_parties_uncompressed")?,
        selected: serde_json::from_str(&r.text("selected_json")?)
            .map_err(|e| r.corrupt(format!("selected_json: {e}")))?,
        dp_epsilon: r.real("dp_epsilon")?,
        dp_sampling_rate: r.real("dp_sampling_rate")?,
    })
}

pub(crate) fn model_version<R: Columns>(row: &R) -> Result<ModelVersionRecord> {
    let mut r = Reader::new(row, "model version");
    let name = r.text("name")?;
    r.id = format!("{name}@{}", r.int("version")?);
    Ok(ModelVersionRecord {
        version: r.unsigned("version")?,
        digest: r.text("digest")?,
        size_bytes: r.unsigned("size_bytes")?,
        job_id: r.text("job_id")?,
        round: r.unsigned("round")?,
        parent_version: r.unsigned("parent_version")?,
        loss: r.real("loss")?,
        accuracy: r.real("accuracy")?,
        samples: r.unsigned("samples")?,
        created_at_ms: r.int("created_at_ms")?,
        namespace: r.text("namespace")?,
        parties: serde_json::from_str(&r.text("parties_json")?)
            .map_err(|e| r.corrupt(format!("parties_json: {e}")))?,
        name,
    })
}

/// A row of one `party` column (a client's name).
pub(crate) fn party<R: Columns>(row: &R) -> Result<PartyId> {
    let mut r = Reader::new(row, "client");
    r.id = r.text("party")?;
    PartyId::parse(&r.id).map_err(|e| r.corrupt(e.to_string()))
}

pub(crate) fn client<R: Columns>(row: &R) -> Result<ClientRecord> {
    let mut r = Reader::new(row, "client");
    r.id = r.text("party")?;
    let json = |field: &str| -> Result<String> { r.text(field) };
    let datasets = json("datasets_json")?;
    let resources = json("resources_json")?;
    Ok(ClientRecord {
        party: PartyId::parse(&r.id).map_err(|e| r.corrupt(e.to_string()))?,
        datasets: serde_json::from_str(&datasets)
            .map_err(|e| r.corrupt(format!("datasets_json: {e}")))?,
        resources: serde_json::from_str(&resources)
            .map_err(|e| r.corrupt(format!("resources_json: {e}")))?,
        first_seen_ms: r.int("first_seen_ms")?,
        last_seen_ms: r.int("last_seen_ms")?,
        revoked_at_ms: r.opt_int("revoked_at_ms")?,
        stats: ClientStats {
            tasks_offered: r.unsigned("tasks_offered")?,
            tasks_accepted: r.unsigned("tasks_accepted")?,
            tasks_succeeded: r.unsigned("tasks_succeeded")?,
            tasks_failed: r.unsigned("tasks_failed")?,
        },
        reliability: Reliability {
            finished: r.unsigned("results_finished")?,
            failed: r.unsigned("results_failed")?,
            timed_out: r.unsigned("results_timed_out")?,
            recent_finished: r.real("recent_finished")?,
            recent_unfinished: r.real("recent_unfinished")?,
            last_result_ms: r.int("last_result_ms")?,
        },
    })
}

pub(crate) fn token<R: Columns>(row: &R) -> Result<TokenRecord> {
    let mut r = Reader::new(row, "token");
    r.id = r.text("id")?;
    Ok(TokenRecord {
        name: r.text("name")?,
        sha256: r.text("sha256")?,
        namespace: r.text("namespace")?,
        role: r.text("role")?,
        created_at_ms: r.int("created_at_ms")?,
        id: r.id.clone(),
    })
}

pub(crate) fn audit<R: Columns>(row: &R) -> Result<AuditRecord> {
    let mut r = Reader::new(row, crate::audit::WHAT);
    let id: u64 = r.unsigned("seq")?;
    r.id = id.to_string();
    Ok(AuditRecord {
        id,
        time_ms: r.int("time_ms")?,
        actor_kind: r.text("actor_kind")?,
        actor_id: r.text("actor_id")?,
        actor_name: r.text("actor_name")?,
        action: r.text("action")?,
        object_kind: r.text("object_kind")?,
        object_id: r.text("object_id")?,
        namespace: r.text("namespace")?,
        outcome: r.text("outcome")?,
        reason: r.text("reason")?,
    })
}
