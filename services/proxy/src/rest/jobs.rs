//! `/api/v1/jobs`: job-scheduler's Jobs API as JSON.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header::CONTENT_TYPE};
use axum::response::sse::{Event, KeepAlive, Sse};
use cohort_proto::v1 as pb;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Caller, Problem, RestState, call, query};

/// A job as listed: its state and progress.
#[derive(Debug, Serialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub namespace: String,
    /// queued, starting, running, stopping, succeeded, failed, stopped, deleting.
    pub state: String,
    /// Why the job is in its state (a failure's cause, who stopped it).
    pub reason: String,
    /// Rounds finished.
    pub round: u32,
    /// Rounds the spec asks for.
    pub rounds: u32,
    /// The accuracy of the last evaluated round, if any.
    pub last_accuracy: Option<f64>,
    pub model_name: String,
    /// The round with the best evaluation (0: none yet).
    pub best_round: u32,
    pub last_round: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The validated spec with its defaults filled in.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

/// A job with its rounds.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: Job,
    pub rounds_summary: Vec<Round>,
}

/// One finished round.
#[derive(Debug, Serialize, ToSchema)]
pub struct Round {
    pub round: u32,
    pub duration_ms: u64,
    /// Evaluation accuracy and loss (absent when the round was not evaluated).
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub eval_samples: Option<u64>,
    pub train_loss: f64,
    pub updates: u32,
    pub refused_updates: u32,
    pub dropped_updates: u32,
    pub task_failures: u32,
    pub model_version: u32,
    pub eval_parties: u32,
    pub eval_parties_expected: u32,
    pub bytes_to_parties: u64,
    pub bytes_from_parties: u64,
    pub dp_epsilon: f64,
    /// The parties drawn for the round and what became of each.
    pub parties: Vec<DrawnParty>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DrawnParty {
    pub party: String,
    pub score: f64,
    pub outcome: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Empty on the last page.
    pub next_page_token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RoundList {
    pub rounds: Vec<Round>,
}

/// An entry of a job's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobEvent {
    pub seq: u64,
    pub time_ms: i64,
    pub from: String,
    pub to: String,
    pub kind: String,
    pub reason: String,
    pub round: u32,
    pub party: String,
    pub task_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<JobEvent>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListJobsQuery {
    /// Only this namespace (default: the token's own; all for a cluster admin).
    pub namespace: Option<String>,
    /// Only jobs in this state (queued, running, succeeded, ...).
    pub state: Option<String>,
    pub page_size: Option<u32>,
    pub page_token: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CreateJobQuery {
    /// The namespace to create the job in, when the spec names none.
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only entries after this sequence number.
    pub after_seq: Option<u64>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StopRequest {
    /// Recorded as the job's reason.
    pub reason: Option<String>,
}

pub(crate) fn state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unspecified".into())
}

fn state_from_name(name: &str) -> Result<i32, Problem> {
    pb::JobState::from_str_name(&format!("JOB_STATE_{}", name.to_ascii_uppercase()))
        .filter(|s| *s != pb::JobState::Unspecified)
        .map(|s| s as i32)
        .ok_or_else(|| {
            Problem::invalid(
                "state",
                format!(
                    "{name:?} is not a job state (queued, starting, running, stopping, \
                     succeeded, failed, stopped, deleting)"
                ),
            )
        })
}

fn job_view(job: &pb::Job) -> Job {
    let last_accuracy = job
        .rounds
        .iter()
        .rev()
        .find_map(|r| r.evaluation.as_ref().map(|m| m.accuracy));
    Job {
        id: job.id.clone(),
        name: job.name.clone(),
        namespace: job.namespace.clone(),
        state: state_name(job.state),
        reason: job.reason.clone(),
        round: job.rounds_completed,
        rounds: job.rounds_total,
        last_accuracy,
        model_name: job.model_name.clone(),
        best_round: job.best_round,
        last_round: job.last_round,
        created_at_ms: job.created_at_ms,
        updated_at_ms: job.updated_at_ms,
        spec: serde_json::from_str(&job.spec_json).unwrap_or(serde_json::Value::Null),
    }
}

fn round_view(r: &pb::RoundSummary) -> Round {
    Round {
        round: r.round,
        duration_ms: r.duration_ms,
        accuracy: r.evaluation.as_ref().map(|m| m.accuracy),
        loss: r.evaluation.as_ref().map(|m| m.loss),
        eval_samples: r.evaluation.as_ref().map(|m| m.samples),
        train_loss: r.train_loss,
        updates: r.updates,
        refused_updates: r.refused_updates,
        dropped_updates: r.dropped_updates,
        task_failures: r.task_failures,
        model_version: r.model_version,
        eval_parties: r.eval_parties,
        eval_parties_expected: r.eval_parties_expected,
        bytes_to_parties: r.bytes_to_parties,
        bytes_from_parties: r.bytes_from_parties,
        dp_epsilon: r.dp_epsilon,
        parties: r
            .selected
            .iter()
            .map(|p| DrawnParty {
                party: p.party.clone(),
                score: p.score,
                outcome: p.outcome.clone(),
            })
            .collect(),
    }
}

fn detail(job: &pb::Job) -> JobDetail {
    JobDetail {
        job: job_view(job),
        rounds_summary: job.rounds.iter().map(round_view).collect(),
    }
}

/// One job as the caller may see it, from job-scheduler.
async fn fetch_job(state: &RestState, caller: &Caller, id: String) -> Result<pb::Job, Problem> {
    let request = caller.request(pb::GetJobRequest { id });
    call("job-scheduler", state.jobs().get_job(request)).await
}

/// Lists jobs the token may see.
#[utoipa::path(get, path = "/api/v1/jobs", params(ListJobsQuery), tag = "jobs",
    responses((status = 200, body = JobList), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(
    State(state): State<RestState>,
    caller: Caller,
    q: Result<Query<ListJobsQuery>, QueryRejection>,
) -> Result<Json<JobList>, Problem> {
    let q = query(q)?;
    let state_filter = match q.state.as_deref().filter(|s| !s.is_empty()) {
        Some(name) => state_from_name(name)?,
        None => 0,
    };
    let request = caller.request(pb::ListJobsRequest {
        namespace: q.namespace.unwrap_or_default(),
        state: state_filter,
        page_size: q.page_size.unwrap_or(0),
        page_token: q.page_token.unwrap_or_default(),
    });
    let list = call("job-scheduler", state.jobs().list_jobs(request)).await?;
    Ok(Json(JobList {
        jobs: list.jobs.iter().map(job_view).collect(),
        next_page_token: list.next_page_token,
    }))
}

/// The spec text to send: the body as is (JSON is YAML), with `namespace` set
/// from the query when the spec names none.
fn spec_text(body: &[u8], namespace: Option<&str>) -> Result<String, Problem> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Problem::invalid("spec", "the request body is not UTF-8 text"))?;
    let Some(namespace) = namespace.filter(|n| !n.is_empty()) else {
        return Ok(text.to_string());
    };
    let mut value: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| Problem::invalid("spec", format!("not YAML or JSON: {e}")))?;
    let map = value
        .as_mapping_mut()
        .ok_or_else(|| Problem::invalid("spec", "must be a mapping"))?;
    match map.get("namespace").and_then(|v| v.as_str()) {
        Some(named) if named != namespace => {
            return Err(Problem::invalid(
                "namespace",
                format!("the spec names namespace {named:?}, the query {namespace:?}"),
            ));
        }
        _ => {
            map.insert("namespace".into(), namespace.into());
        }
    }
    serde_yaml::to_string(&value).map_err(|e| Problem::invalid("spec", e.to_string()))
}

/// Creates a job from a spec (YAML or JSON body).
#[utoipa::path(post, path = "/api/v1/jobs", params(CreateJobQuery), tag = "jobs",
    request_body(description = "The job spec, as in `cohort job create`",
        content((String = "application/yaml"), (Object = "application/json"))),
    responses((status = 201, body = JobDetail), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create(
    State(state): State<RestState>,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<CreateJobQuery>, QueryRejection>,
    body: Bytes,
) -> Result<(StatusCode, Json<JobDetail>), Problem> {
    let q = query(q)?;
    if let Some(kind) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let essence = kind.split(';').next().unwrap_or("").trim();
        if !matches!(
            essence,
            "application/yaml"
                | "application/x-yaml"
                | "text/yaml"
                | "application/json"
                | "text/plain"
        ) {
            return Err(Problem::invalid(
                "content-type",
                format!("{essence:?}: send the spec as application/yaml or application/json"),
            ));
        }
    }
    let spec = spec_text(&body, q.namespace.as_deref())?;
    let request = caller.request(pb::CreateJobRequest { spec: spec.clone() });
    match call("job-scheduler", state.jobs().create_job(request)).await {
        Ok(job) => Ok((StatusCode::CREATED, Json(detail(&job)))),
        // job-scheduler said why; the field comes from the same parser it uses.
        Err(problem) if problem.status == 400 => match cohort_core::JobSpec::parse(&spec) {
            Err(e) => Err(problem.with_field(e.field)),
            Ok(_) => Err(problem),
        },
        Err(problem) => Err(problem),
    }
}

/// One job with its rounds.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", params(("id" = String, Path)), tag = "jobs",
    responses((status = 200, body = JobDetail), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_job(
    State(state): State<RestState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobDetail>, Problem> {
    Ok(Json(detail(&fetch_job(&state, &caller, id).await?)))
}

/// A job's rounds, oldest first.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/rounds", params(("id" = String, Path)), tag = "jobs",
    responses((status = 200, body = RoundList), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn rounds(
    State(state): State<RestState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RoundList>, Problem> {
    let job = fetch_job(&state, &caller, id).await?;
    Ok(Json(RoundList {
        rounds: job.rounds.iter().map(round_view).collect(),
    }))
}

/// A job's log: state changes and what parties and the coordinator reported.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", params(("id" = String, Path), EventsQuery), tag = "jobs",
    responses((status = 200, body = EventList), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn events(
    State(state): State<RestState>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventList>, Problem> {
    let q = query(q)?;
    let request = caller.request(pb::ListJobEventsRequest {
        id,
        after_seq: q.after_seq.unwrap_or(0),
    });
    let list = call("job-scheduler", state.jobs().list_job_events(request)).await?;
    Ok(Json(EventList {
        events: list
            .events
            .iter()
            .map(|e| JobEvent {
                seq: e.seq,
                time_ms: e.time_ms,
                from: state_name(e.from),
                to: state_name(e.to),
                kind: e.kind.clone(),
                reason: e.reason.clone(),
                round: e.round,
                party: e.party.clone(),
                task_id: e.task_id.clone(),
            })
            .collect(),
    }))
}

/// Server-sent events: one `data:` line with the job (as `GET /api/v1/jobs/{id}`)
/// per change; the stream ends when the job does. Comment lines keep it alive.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/watch", params(("id" = String, Path)), tag = "jobs",
    responses((status = 200, description = "`text/event-stream` of JobDetail documents", content_type = "text/event-stream", body = String),
        (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn watch(
    State(state): State<RestState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    let updates = call(
        "job-scheduler",
        state
            .jobs()
            .watch_job(caller.request(pb::GetJobRequest { id })),
    )
    .await?;
    let events = updates.map(|update| {
        let event = match update {
            Ok(job) => Event::default().json_data(detail(&job)),
            Err(status) => Event::default()
                .event("error")
                .json_data(Problem::from(status)),
        };
        Ok(event.unwrap_or_else(|e| Event::default().event("error").data(e.to_string())))
    });
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(10))
            .text("heartbeat"),
    ))
}

/// Asks a running job to stop (members and admins).
#[utoipa::path(post, path = "/api/v1/jobs/{id}/stop", params(("id" = String, Path)), tag = "jobs",
    request_body(content = Option<StopRequest>, content_type = "application/json"),
    responses((status = 200, body = JobDetail), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn stop(
    State(state): State<RestState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<JobDetail>, Problem> {
    let stop: StopRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StopRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| Problem::invalid("reason", e.to_string()))?
    };
    let request = caller.request(pb::StopJobRequest {
        id,
        reason: stop.reason.unwrap_or_default(),
    });
    let job = call("job-scheduler", state.jobs().stop_job(request)).await?;
    Ok(Json(detail(&job)))
}

/// Deletes a finished job (members and admins).
#[utoipa::path(delete, path = "/api/v1/jobs/{id}", params(("id" = String, Path)), tag = "jobs",
    responses((status = 204, description = "deleted"), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn delete(
    State(state): State<RestState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    call(
        "job-scheduler",
        state
            .jobs()
            .delete_job(caller.request(pb::GetJobRequest { id })),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
