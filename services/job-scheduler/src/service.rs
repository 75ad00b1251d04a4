//! gRPC edge of job-scheduler: converts protobuf to domain types and back,
//! and bounds what callers send (log entries, round counts) before it is stored.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cohort_core::{Action, AuthError, JobId, JobSpec, JobState, PartyId, Principal};
use cohort_proto::v1 as pb;
use cohort_runtime::{ToStatus, calling_principal};
use cohort_store::jobs::{
    JobEventRecord, JobFilter, JobNote, JobRecord, RoundRecord, SelectedParty,
};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::audit::Call;

use crate::manager::{JobError, JobManager};

pub fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Starting => pb::JobState::Starting,
        JobState::Running => pb::JobState::Running,
        JobState::Stopping => pb::JobState::Stopping,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Stopped => pb::JobState::Stopped,
        JobState::Deleting => pb::JobState::Deleting,
    }
}

fn state_from_pb(field: &str, v: i32) -> Result<Option<JobState>, Status> {
    let s = pb::JobState::try_from(v)
        .map_err(|_| Status::invalid_argument(format!("{field}: unknown job state {v}")))?;
    Ok(match s {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Starting => Some(JobState::Starting),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Stopping => Some(JobState::Stopping),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Stopped => Some(JobState::Stopped),
        pb::JobState::Deleting => Some(JobState::Deleting),
    })
}

fn job_id(field: &str, s: &str) -> Result<JobId, Status> {
    JobId::parse(s).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// Entries one RecordEvents call may carry.
pub const MAX_NOTES_PER_CALL: usize = 100;
/// Characters of an entry's message that are kept.
pub const MAX_NOTE_MESSAGE_CHARS: usize = 1000;
/// Kinds of entries a coordinator may add to a job's log.
pub const NOTE_KINDS: [&str; 6] = [
    "task_failed",
    "party_left_out",
    "update_refused",
    "update_dropped",
    "round_failed",
    "note",
];
/// Longest task id an entry may name.
const MAX_TASK_ID_LEN: usize = 128;
/// Events one ListJobEvents answer holds (a few MB at most); callers page on
/// with `after_seq` = the last seq they got.
pub const MAX_EVENTS_PER_ANSWER: usize = 500;
/// The largest count a round may report (updates, refusals, failures).
pub const MAX_ROUND_COUNT: u32 = 1_000_000;
/// The most parties a round's evaluation may be offered to.
pub const MAX_EVAL_PARTIES: u32 = 100_000;
/// The most tensor bytes a round may report moving each way (1 PiB: far
/// beyond any real round, well inside the stores' 63-bit range).
pub const MAX_ROUND_BYTES: u64 = 1 << 50;
/// The most drawn parties a round record keeps (the first ones reported).
pub const MAX_SELECTED_PARTIES: usize = 1000;
/// What a drawn party's task may have become.
const SELECTED_OUTCOMES: &[&str] = &["finished", "failed", "timed_out", "refused", "pending"];

fn round_to_pb(r: &RoundRecord) -> pb::RoundSummary {
    pb::RoundSummary {
        round: r.round,
        evaluation: Some(pb::Metrics {
            loss: r.eval_loss,
            accuracy: r.eval_accuracy,
            samples: r.eval_samples,
        }),
        train_loss: r.train_loss,
        updates: r.updates,
        model_version: r.model_version,
        duration_ms: r.duration_ms,
        refused_updates: r.refused_updates,
        dropped_updates: r.dropped_updates,
        task_failures: r.task_failures,
        robust_accuracy: r.robust_accuracy,
        eval_parties: r.eval_parties,
        eval_parties_expected: r.eval_parties_expected,
        bytes_to_parties: r.bytes_to_parties,
        bytes_from_parties: r.bytes_from_parties,
        bytes_from_parties_uncompressed: r.bytes_from_parties_uncompressed,
        selected: r
            .selected
            .iter()
            .map(|p| pb::SelectedParty {
                party: p.party.clone(),
                score: p.score,
                outcome: p.outcome.clone(),
            })
            .collect(),
        dp_epsilon: r.dp_epsilon,
        dp_sampling_rate: r.dp_sampling_rate,
    }
}

/// A round's drawn parties, checked: party names, finite non-negative scores and known
/// outcomes; more than [`MAX_SELECTED_PARTIES`] are cut to the first ones.
fn selected_from_pb(selected: Vec<pb::SelectedParty>) -> Result<Vec<SelectedParty>, Status> {
    selected
        .into_iter()
        .take(MAX_SELECTED_PARTIES)
        .enumerate()
        .map(|(i, p)| {
            let field = |name: &str| format!("round.selected[{i}].{name}");
            cohort_core::PartyId::parse(&p.party)
                .map_err(|e| Status::invalid_argument(format!("{}: {e}", field("party"))))?;
            if !(p.score.is_finite() && p.score >= 0.0) {
                return Err(Status::invalid_argument(format!(
                    "{}: must be finite and not negative, got {}",
                    field("score"),
                    p.score
                )));
            }
            if !SELECTED_OUTCOMES.contains(&p.outcome.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "{}: {:?} is not one of {}",
                    field("outcome"),
                    &p.outcome[..p.outcome.floor_char_boundary(32)],
                    SELECTED_OUTCOMES.join(", ")
                )));
            }
            Ok(SelectedParty {
                party: p.party,
                score: p.score,
                outcome: p.outcome,
            })
        })
        .collect()
}

/// A reported round, checked: its counts and bytes bounded, its robust
/// accuracy in [0, 1], its evaluating parties no more than were offered the
/// evaluation.
fn round_from_pb(round: pb::RoundSummary) -> Result<RoundRecord, Status> {
    for (field, v) in [
        ("updates", round.updates),
        ("refused_updates", round.refused_updates),
        ("dropped_updates", round.dropped_updates),
        ("task_failures", round.task_failures),
    ] {
        if v > MAX_ROUND_COUNT {
            return Err(Status::invalid_argument(format!(
                "round.{field}: {v} is more than {MAX_ROUND_COUNT}"
            )));
        }
    }
    for (field, v) in [
        ("bytes_to_parties", round.bytes_to_parties),
        ("bytes_from_parties", round.bytes_from_parties),
        (
            "bytes_from_parties_uncompressed",
            round.bytes_from_parties_uncompressed,
        ),
    ] {
        if v > MAX_ROUND_BYTES {
            return Err(Status::invalid_argument(format!(
                "round.{field}: {v} is more than {MAX_ROUND_BYTES}"
            )));
        }
    }
    if round.eval_parties_expected > MAX_EVAL_PARTIES {
        return Err(Status::invalid_argument(format!(
            "round.eval_parties_expected: {} is more than {MAX_EVAL_PARTIES}",
            round.eval_parties_expected
        )));
    }
    if round.eval_parties > round.eval_parties_expected {
        return Err(Status::invalid_argument(format!(
            "round.eval_parties: {} is more than round.eval_parties_expected ({})",
            round.eval_parties, round.eval_parties_expected
        )));
    }
    let robust = round.robust_accuracy;
    if !(robust.is_finite() && (0.0..=1.0).contains(&robust)) {
        return Err(Status::invalid_argument(format!(
            "round.robust_accuracy: must be in [0, 1], got {robust}"
        )));
    }
    // ε is +inf without noise; NaN or negative means nothing.
    let epsilon = round.dp_epsilon;
    if epsilon.is_nan() || epsilon < 0.0 {
        return Err(Status::invalid_argument(format!(
            "round.dp_epsilon: must be at least 0, got {epsilon}"
        )));
    }
    let q = round.dp_sampling_rate;
    if !(0.0..=1.0).contains(&q) {
        return Err(Status::invalid_argument(format!(
            "round.dp_sampling_rate: must be in [0, 1], got {q}"
        )));
    }
    let eval = round.evaluation.unwrap_or_default();
    let selected = selected_from_pb(round.selected)?;
    Ok(RoundRecord {
        round: round.round,
        eval_loss: eval.loss,
        eval_accuracy: eval.accuracy,
        eval_samples: eval.samples,
        train_loss: round.train_loss,
        updates: round.updates,
        model_version: round.model_version,
        duration_ms: round.duration_ms,
        refused_updates: round.refused_updates,
        dropped_updates: round.dropped_updates,
        task_failures: round.task_failures,
        robust_accuracy: robust,
        eval_parties: round.eval_parties,
        eval_parties_expected: round.eval_parties_expected,
        bytes_to_parties: round.bytes_to_parties,
        bytes_from_parties: round.bytes_from_parties,
        bytes_from_parties_uncompressed: round.bytes_from_parties_uncompressed,
        selected,
        dp_epsilon: epsilon,
        dp_sampling_rate: q,
    })
}

/// The round whose evaluation scored highest (its robust accuracy where it
/// has one, else the evaluated accuracy), the earliest of equals; 0 if no
/// round was evaluated.
pub fn best_round(rounds: &[RoundRecord]) -> u32 {
    let mut best: Option<(f64, u32)> = None;
    for r in rounds {
        let score = if r.robust_accuracy > 0.0 {
            r.robust_accuracy
        } else if r.eval_samples > 0 {
            r.eval_accuracy
        } else {
            continue;
        };
        if score.is_finite() && best.is_none_or(|(top, _)| score > top) {
            best = Some((score, r.round));
        }
    }
    best.map_or(0, |(_, round)| round)
}

/// Where the job's model versions are stored: the spec's `model.name`, or the job id.
fn model_name(j: &JobRecord) -> String {
    JobSpec::from_json(&j.spec_json)
        .map(|spec| spec.model_name(&j.id))
        .unwrap_or_else(|_| j.id.to_string())
}

/// A coordinator's log entry, checked; `rounds_total` bounds its round.
fn note_from_pb(i: usize, n: pb::EventNote, rounds_total: u32) -> Result<JobNote, Status> {
    let bad = |field: &str, message: String| {
        Status::invalid_argument(format!("events[{i}].{field}: {message}"))
    };
    if !NOTE_KINDS.contains(&n.kind.as_str()) {
        return Err(bad(
            "kind",
            format!(
                "{:?} is not one of {}",
                n.kind.chars().take(40).collect::<String>(),
                NOTE_KINDS.join(", ")
            ),
        ));
    }
    if n.round > rounds_total {
        return Err(bad(
            "round",
            format!("{} is outside 0..={rounds_total}", n.round),
        ));
    }
    if !n.party.is_empty() {
        PartyId::parse(&n.party).map_err(|e| bad("party", e.to_string()))?;
    }
    if !(n.task_id.len() <= MAX_TASK_ID_LEN
        && n.task_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(bad(
            "task_id",
            format!("must be at most {MAX_TASK_ID_LEN} of [A-Za-z0-9._-]"),
        ));
    }
    Ok(JobNote {
        kind: n.kind,
        round: n.round,
        party: n.party,
        task_id: n.task_id,
        message: clip_message(&n.message),
    })
}

/// At most [`MAX_NOTE_MESSAGE_CHARS`] characters, cut on a character
/// boundary, with control characters other than newline and tab as spaces
/// (PostgreSQL text cannot hold NUL).
fn clip_message(message: &str) -> String {
    message
        .chars()
        .take(MAX_NOTE_MESSAGE_CHARS)
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

fn event_to_pb(e: JobEventRecord) -> pb::JobEvent {
    pb::JobEvent {
        seq: e.seq,
        time_ms: e.time_ms,
        from: e.from.map(|s| state_to_pb(s) as i32).unwrap_or(0),
        to: state_to_pb(e.to) as i32,
        reason: e.reason,
        kind: e.kind,
        round: e.round,
        party: e.party,
        task_id: e.task_id,
    }
}

/// The job for the API; `rounds` are the job's recorded rounds (empty where
/// the answer leaves them out).
pub fn job_to_pb(j: &JobRecord, rounds: &[RoundRecord]) -> pb::Job {
    pb::Job {
        id: j.id.to_string(),
        name: j.name.clone(),
        namespace: j.namespace.clone(),
        state: state_to_pb(j.state) as i32,
        spec_json: j.spec_json.clone(),
        rounds_total: j.rounds_total,
        rounds_completed: j.rounds_completed,
        rounds: rounds.iter().map(round_to_pb).collect(),
        reason: j.reason.clone(),
        created_at_ms: j.created_at_ms,
        updated_at_ms: j.updated_at_ms,
        model_name: model_name(j),
        best_round: best_round(rounds),
        last_round: j.rounds_completed,
    }
}

fn err(e: JobError) -> Status {
    e.to_status()
}

#[derive(Clone)]
pub struct JobsApi {
    pub manager: Arc<JobManager>,
}

/// Refuses `action` on a job unless the caller's token allows it. A job in
/// a namespace the token does not reach answers exactly like a missing one.
fn authorize(principal: Option<&Principal>, job: &JobRecord, action: Action) -> Result<(), Status> {
    let Some(p) = principal else {
        return Ok(()); // a server-internal caller
    };
    p.authorize(&job.namespace, action).map_err(|e| match e {
        AuthError::OutOfScope => err(cohort_store::StoreError::NotFound {
            what: "job",
            id: job.id.to_string(),
        }
        .into()),
        e => e.to_status(),
    })
}

impl JobsApi {
    async fn full_job(&self, id: &JobId) -> Result<pb::Job, Status> {
        let store = self.manager.store();
        let job = store.get_job(id).await.map_err(|e| err(e.into()))?;
        let rounds = store.list_rounds(id).await.map_err(|e| err(e.into()))?;
        Ok(job_to_pb(&job, &rounds))
    }

    async fn create_job_audited(
        &self,
        req: Request<pb::CreateJobRequest>,
        call: &mut Call,
    ) -> Result<Response<pb::Job>, Status> {
        let principal = calling_principal(&req)?;
        // Role first, so a viewer learns nothing from spec errors.
        if let Some(p) = &principal
            && p.role < cohort_core::Role::Member
        {
            return Err(AuthError::Forbidden {
                role: p.role,
                action: Action::Write,
            }
            .to_status());
        }
        // Parsed once, here at the edge.
        let spec = JobSpec::parse(&req.get_ref().spec).map_err(|e| err(e.into()))?;
        if let Some(p) = &principal
            && !p.scope.includes(&spec.namespace)
        {
            return Err(Status::permission_denied(format!(
                "namespace: the API token is for namespace {}; the spec names {:?}",
                p.scope, spec.namespace
            )));
        }
        call.in_namespace(&spec.namespace);
        let job = self.manager.create(spec).await.map_err(err)?;
        call.object_id = job.id.to_string();
        Ok(Response::new(job_to_pb(&job, &[])))
    }

    /// The job, if the caller may do `action` on it; `call` learns its
    /// namespace when the caller reaches it.
    async fn authorized_call<T>(
        &self,
        req: &Request<T>,
        id: &JobId,
        action: Action,
        call: &mut Call,
    ) -> Result<JobRecord, Status> {
        let principal = calling_principal(req)?;
        let job = self
            .manager
            .store()
            .get_job(id)
            .await
            .map_err(|e| err(e.into()))?;
        call.in_namespace(&job.namespace);
        authorize(principal.as_ref(), &job, action)?;
        Ok(job)
    }

    async fn stop_job_audited(
        &self,
        req: Request<pb::StopJobRequest>,
        call: &mut Call,
    ) -> Result<Response<pb::Job>, Status> {
        let id = job_id("id", &req.get_ref().id)?;
        self.authorized_call(&req, &id, Action::Write, call).await?;
        let r = req.into_inner();
        self.manager.stop(&id, &r.reason).await.map_err(err)?;
        Ok(Response::new(self.full_job(&id).await?))
    }

    async fn delete_job_audited(
        &self,
        req: Request<pb::GetJobRequest>,
        call: &mut Call,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let id = job_id("id", &req.get_ref().id)?;
        self.authorized_call(&req, &id, Action::Write, call).await?;
        self.manager.delete(&id).await.map_err(err)?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    /// The job, if the caller may do `action` on it.
    async fn authorized<T>(
        &self,
        req: &Request<T>,
        id: &JobId,
        action: Action,
    ) -> Result<JobRecord, Status> {
        let principal = calling_principal(req)?;
        let job = self
            .manager
            .store()
            .get_job(id)
            .await
            .map_err(|e| err(e.into()))?;
        authorize(principal.as_ref(), &job, action)?;
        Ok(job)
    }
}

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send>>;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsApi {
    async fn create_job(
        &self,
        req: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let mut call = Call::begin(self.manager.store(), &req, "job.create", "job", "").await;
        let result = self.create_job_audited(req, &mut call).await;
        call.finish(&result).await;
        result
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = job_id("id", &req.get_ref().id)?;
        self.authorized(&req, &id, Action::Read).await?;
        Ok(Response::new(self.full_job(&id).await?))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let principal = calling_principal(&req)?;
        let r = req.into_inner();
        if r.page_size > 500 {
            return Err(Status::invalid_argument("page_size: at most 500"));
        }
        let mut namespace = Some(r.namespace).filter(|n| !n.is_empty());
        if let Some(p) = &principal {
            p.authorize_scope(&p.scope, Action::Read)
                .map_err(|e| e.to_status())?;
            if let Some(own) = p.scope.namespace() {
                match &namespace {
                    // Another tenant's namespace looks empty.
                    Some(asked) if asked != own => {
                        return Ok(Response::new(pb::ListJobsResponse::default()));
                    }
                    _ => namespace = Some(own.to_string()),
                }
            }
        }
        let filter = JobFilter {
            namespace,
            state: state_from_pb("state", r.state)?,
        };
        let size = if r.page_size == 0 { 50 } else { r.page_size };
        let token = Some(r.page_token.as_str()).filter(|t| !t.is_empty());
        let page = self
            .manager
            .store()
            .list_jobs(&filter, size, token)
            .await
            .map_err(|e| match e {
                cohort_store::StoreError::Conflict(m) => {
                    Status::invalid_argument(format!("page_token: {m}"))
                }
                e => err(e.into()),
            })?;
        let store = self.manager.store();
        let mut jobs = Vec::with_capacity(page.items.len());
        for j in &page.items {
            // The rounds give best_round; the listing leaves them out.
            let rounds = store.list_rounds(&j.id).await.map_err(|e| err(e.into()))?;
            jobs.push(pb::Job {
                rounds: Vec::new(),
                ..job_to_pb(j, &rounds)
            });
        }
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<JobStream>, Status> {
        let id = job_id("id", &req.get_ref().id)?;
        self.authorized(&req, &id, Action::Read).await?;
        // Subscribe before the first read so no change falls in between.
        let mut changes = self.manager.subscribe();
        let first = self.full_job(&id).await?;
        let api = self.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = first;
            let mut terminal = is_terminal(&last);
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while !terminal {
                // Poll now and then too: a lagged channel must not stall a watcher.
                let changed = tokio::time::timeout(Duration::from_secs(2), changes.recv()).await;
                match changed {
                    Ok(Ok(changed_id)) if changed_id != id => continue,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return,
                    _ => {}
                }
                let job = match api.full_job(&id).await {
                    Ok(j) => j,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                if job != last {
                    terminal = is_terminal(&job);
                    last = job;
                    if tx.send(Ok(last.clone())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn stop_job(
        &self,
        req: Request<pb::StopJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let id = req.get_ref().id.clone();
        let mut call = Call::begin(self.manager.store(), &req, "job.stop", "job", &id).await;
        let result = self.stop_job_audited(req, &mut call).await;
        call.finish(&result).await;
        result
    }

    async fn delete_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let id = req.get_ref().id.clone();
        let mut call = Call::begin(self.manager.store(), &req, "job.delete", "job", &id).await;
        let result = self.delete_job_audited(req, &mut call).await;
        call.finish(&result).await;
        result
    }

    async fn list_job_events(
        &self,
        req: Request<pb::ListJobEventsRequest>,
    ) -> Result<Response<pb::ListJobEventsResponse>, Status> {
        let id = job_id("id", &req.get_ref().id)?;
        self.authorized(&req, &id, Action::Read).await?;
        let store = self.manager.store();
        let events = store
            .list_events(&id, req.get_ref().after_seq)
            .await
            .map_err(|e| err(e.into()))?;
        Ok(Response::new(pb::ListJobEventsResponse {
            events: events
                .into_iter()
                .take(MAX_EVENTS_PER_ANSWER)
                .map(event_to_pb)
                .collect(),
        }))
    }

    async fn get_server_info(
        &self,
        req: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        // Any token the proxy accepted, or an internal caller; identity
        // metadata must still be well-formed.
        calling_principal(&req)?;
        Ok(Response::new(pb::ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}

fn is_terminal(j: &pb::Job) -> bool {
    matches!(
        pb::JobState::try_from(j.state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Stopped)
    )
}

/// A stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(f: F) -> JobStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Job, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[derive(Clone)]
pub struct ControlApi {
    pub manager: Arc<JobManager>,
}

#[tonic::async_trait]
impl pb::job_control_server::JobControl for ControlApi {
    async fn get_assignment(
        &self,
        req: Request<pb::GetAssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let id = job_id("job_id", &req.into_inner().job_id)?;
        let store = self.manager.store();
        let job = store.get_job(&id).await.map_err(|e| err(e.into()))?;
        if !job.state.has_coordinator() {
            return Err(Status::failed_precondition(format!(
                "job {id} is {}: it needs no coordinator",
                job.state
            )));
        }
        let rounds = store.list_rounds(&id).await.map_err(|e| err(e.into()))?;
        let resume_model_version = rounds
            .iter()
            .find(|r| r.round == job.rounds_completed)
            .map(|r| r.model_version)
            .unwrap_or(0);
        Ok(Response::new(pb::Assignment {
            next_round: job.rounds_completed + 1,
            resume_model_version,
            job: Some(job_to_pb(&job, &rounds)),
            max_model_parameters: self.manager.max_model_parameters(),
        }))
    }

    async fn coordinator_ready(
        &self,
        req: Request<pb::CoordinatorReadyRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = req.into_inner();
        let id = job_id("job_id", &r.job_id)?;
        if r.endpoint.is_empty() {
            return Err(Status::invalid_argument("endpoint: must not be empty"));
        }
        let job = self
            .manager
            .coordinator_ready(&id, &r.endpoint, r.pid)
            .await
            .map_err(err)?;
        Ok(Response::new(job_to_pb(&job, &[])))
    }

    async fn report_round(
        &self,
        req: Request<pb::ReportRoundRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = req.into_inner();
        let id = job_id("job_id", &r.job_id)?;
        let round = r
            .round
            .ok_or_else(|| Status::invalid_argument("round: missing"))?;
        let record = round_from_pb(round)?;
        let job = self.manager.report_round(&id, &record).await.map_err(err)?;
        Ok(Response::new(job_to_pb(&job, &[])))
    }

    async fn finish_job(
        &self,
        req: Request<pb::FinishJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = req.into_inner();
        let id = job_id("job_id", &r.job_id)?;
        let state = state_from_pb("state", r.state)?
            .ok_or_else(|| Status::invalid_argument("state: missing"))?;
        let job = self
            .manager
            .finish(&id, state, &r.reason)
            .await
            .map_err(err)?;
        Ok(Response::new(job_to_pb(&job, &[])))
    }

    async fn record_events(
        &self,
        req: Request<pb::RecordEventsRequest>,
    ) -> Result<Response<pb::RecordEventsResponse>, Status> {
        let r = req.into_inner();
        let id = job_id("job_id", &r.job_id)?;
        if r.events.len() > MAX_NOTES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "events: at most {MAX_NOTES_PER_CALL} per call, got {}",
                r.events.len()
            )));
        }
        let job = self
            .manager
            .store()
            .get_job(&id)
            .await
            .map_err(|e| err(e.into()))?;
        let notes = r
            .events
            .into_iter()
            .enumerate()
            .map(|(i, n)| note_from_pb(i, n, job.rounds_total))
            .collect::<Result<Vec<_>, _>>()?;
        let recorded = self.manager.record_notes(&id, &notes).await.map_err(err)?;
        Ok(Response::new(pb::RecordEventsResponse { recorded }))
    }

    async fn record_audit(
        &self,
        req: Request<pb::RecordAuditRequest>,
    ) -> Result<Response<pb::RecordAuditResponse>, Status> {
        crate::audit::record_for_service(self.manager.store().as_ref(), req).await
    }

    async fn list_routes(
        &self,
        _req: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let jobs = self
            .manager
            .store()
            .jobs_in_states(&[JobState::Running, JobState::Stopping])
            .await
            .map_err(|e| err(e.into()))?;
        Ok(Response::new(pb::ListRoutesResponse {
            routes: jobs
                .into_iter()
                .filter_map(|j| {
                    j.coordinator_endpoint.map(|endpoint| pb::Route {
                        job_id: j.id.to_string(),
                        endpoint,
                    })
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn summary(eval_parties: u32, eval_parties_expected: u32) -> pb::RoundSummary {
        pb::RoundSummary {
            round: 4,
            evaluation: Some(pb::Metrics {
                loss: 0.5,
                accuracy: 0.75,
                samples: 239,
            }),
            train_loss: 0.4,
            updates: 3,
            model_version: 4,
            duration_ms: 1200,
            refused_updates: 1,
            dropped_updates: 2,
            task_failures: 5,
            robust_accuracy: 0.7,
            eval_parties,
            eval_parties_expected,
            bytes_to_parties: 3_000_000_000,
            bytes_from_parties: 5_000_000_007,
            bytes_from_parties_uncompressed: 20_000_000_028,
            dp_epsilon: 3.25,
            dp_sampling_rate: 0.5,
            selected: vec![
                pb::SelectedParty {
                    party: "party-2".into(),
                    score: 0.75,
                    outcome: "finished".into(),
                },
                pb::SelectedParty {
                    party: "party-5".into(),
                    score: 1.0 / 12.0,
                    outcome: "timed_out".into(),
                },
            ],
        }
    }

    #[test]
    fn rounds_keep_their_selection_and_refuse_a_bad_one() {
        let reported = summary(2, 3);
        let record = round_from_pb(reported.clone()).unwrap();
        assert_eq!(record.selected.len(), 2);
        assert_eq!(round_to_pb(&record), reported, "every field comes back");
        for (party, score, outcome, message) in [
            ("Bad Party", 1.0, "finished", "round.selected[0].party"),
            ("p", f64::NAN, "finished", "round.selected[0].score"),
            ("p", -1.0, "finished", "round.selected[0].score"),
            ("p", 1.0, "won", "round.selected[0].outcome"),
        ] {
            let bad = pb::RoundSummary {
                selected: vec![pb::SelectedParty {
                    party: party.into(),
                    score,
                    outcome: outcome.into(),
                }],
                ..summary(2, 3)
            };
            let status = round_from_pb(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().starts_with(message),
                "{}",
                status.message()
            );
        }
        let many = pb::RoundSummary {
            selected: vec![
                pb::SelectedParty {
                    party: "p".into(),
                    score: 1.0,
                    outcome: "refused".into(),
                };
                MAX_SELECTED_PARTIES + 5
            ],
            ..summary(2, 3)
        };
        assert_eq!(
            round_from_pb(many).unwrap().selected.len(),
            MAX_SELECTED_PARTIES,
            "the first ones are kept"
        );
    }

    #[test]
    fn rounds_keep_their_evaluation_coverage_both_ways() {
        for (parties, expected) in [(0, 0), (0, 3), (2, 3), (MAX_EVAL_PARTIES, MAX_EVAL_PARTIES)] {
            let reported = summary(parties, expected);
            let record = round_from_pb(reported.clone()).unwrap();
            assert_eq!(
                (record.eval_parties, record.eval_parties_expected),
                (parties, expected)
            );
            assert_eq!(round_to_pb(&record), reported, "every field comes back");
        }
    }

    #[test]
    fn rounds_claiming_more_evaluating_parties_than_offered_are_refused() {
        for (parties, expected, field) in [
            (
                3,
                2,
                "round.eval_parties: 3 is more than round.eval_parties_expected (2)",
            ),
            (
                1,
                0,
                "round.eval_parties: 1 is more than round.eval_parties_expected (0)",
            ),
            (
                0,
                MAX_EVAL_PARTIES + 1,
                "round.eval_parties_expected: 100001 is more than 100000",
            ),
            (
                u32::MAX,
                u32::MAX,
                "round.eval_parties_expected: 4294967295 is more than 100000",
            ),
        ] {
            let status = round_from_pb(summary(parties, expected)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), field);
        }
    }

    #[test]
    fn rounds_keep_their_bytes_both_ways() {
        for (to, from) in [
            (0, 0),
            (3_000_000_000, 7),
            (MAX_ROUND_BYTES, MAX_ROUND_BYTES - 1),
        ] {
            let reported = pb::RoundSummary {
                bytes_to_parties: to,
                bytes_from_parties: from,
                ..summary(2, 3)
            };
            let record = round_from_pb(reported.clone()).unwrap();
            assert_eq!(
                (record.bytes_to_parties, record.bytes_from_parties),
                (to, from)
            );
            assert_eq!(round_to_pb(&record), reported, "every field comes back");
        }
    }

    #[test]
    fn rounds_claiming_more_bytes_than_the_bound_are_refused() {
        for (to, from, message) in [
            (
                MAX_ROUND_BYTES + 1,
                0,
                "round.bytes_to_parties: 1125899906842625 is more than 1125899906842624",
            ),
            (
                0,
                u64::MAX,
                "round.bytes_from_parties: 18446744073709551615 is more than 1125899906842624",
            ),
        ] {
            let reported = pb::RoundSummary {
                bytes_to_parties: to,
                bytes_from_parties: from,
                ..summary(2, 3)
            };
            let status = round_from_pb(reported).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), message);
        }
        let reported = pb::RoundSummary {
            bytes_from_parties_uncompressed: MAX_ROUND_BYTES + 1,
            ..summary(2, 3)
        };
        let status = round_from_pb(reported).unwrap_err();
        assert_eq!(
            status.message(),
            "round.bytes_from_parties_uncompressed: 1125899906842625 is more than \
             1125899906842624"
        );
    }

    #[test]
    fn privacy_figures_are_kept_or_refused_naming_the_field() {
        // ε is infinite without noise: kept as it is.
        let reported = pb::RoundSummary {
            dp_epsilon: f64::INFINITY,
            dp_sampling_rate: 1.0,
            ..summary(2, 3)
        };
        let record = round_from_pb(reported.clone()).unwrap();
        assert_eq!(
            (record.dp_epsilon, record.dp_sampling_rate),
            (f64::INFINITY, 1.0)
        );
        assert_eq!(round_to_pb(&record), reported);
        for (epsilon, q, field) in [
            (f64::NAN, 0.5, "round.dp_epsilon"),
            (-0.5, 0.5, "round.dp_epsilon"),
            (1.0, 1.01, "round.dp_sampling_rate"),
            (1.0, -0.1, "round.dp_sampling_rate"),
        ] {
            let reported = pb::RoundSummary {
                dp_epsilon: epsilon,
                dp_sampling_rate: q,
                ..summary(2, 3)
            };
            let status = round_from_pb(reported).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(field), "{}", status.message());
        }
    }
}
