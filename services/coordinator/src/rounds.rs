//! The round loop: offer tasks, collect updates until quorum and completion or the round
//! timeout, aggregate, evaluate, checkpoint, report. Every failure ends as the job's reason
//! (or the round's log entries), not only as a line in this process's log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cohort_core::{
    JobId, JobSpec, NamedTensor, Role, TaskKind, spec::TrainingDevice, spec::parse_model_ref,
};
use cohort_fl::{
    AggregationRules, Combine, DpAggregation, RoundFacts, Strategy, capped_weights,
    from_safetensors, lower_median,
};
use cohort_proto::v1 as pb;
use cohort_runtime::retry_unavailable;

use crate::metrics::Phase;
use cohort_runtime::Channel;
use cohort_runtime::wire::{act_as, task_kind_to_wire};
use futures::StreamExt;
use sha2::Digest as _;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::SCHEDULER_PATIENCE;
use crate::privacy::RoundBudget;
use crate::round_state::{Accepted, EvalReport, Note, NoteKind, RoundState, TaskProgress};
use crate::selection::Outcome as DrawOutcome;

mod secure;

#[derive(Clone)]
pub struct Clients {
    pub scheduler: pb::job_control_client::JobControlClient<Channel>,
    pub models: pb::models_client::ModelsClient<Channel>,
    pub selector: pb::client_selector_client::ClientSelectorClient<Channel>,
}

pub enum Outcome {
    /// Report this final state to job-scheduler.
    Finish(pb::JobState, String),
    /// Exit without reporting (job-scheduler no longer wants this coordinator).
    Abandon(String),
}

pub struct JobRun {
    pub job_id: JobId,
    pub spec: JobSpec,
    pub clients: Clients,
    pub state: Arc<RoundState>,
    pub endpoint: String,
    /// Most parameters the model may have (from job-scheduler); 0: no limit.
    pub max_model_parameters: u64,
    /// How long model-manager may be away before a round's model counts as unstorable.
    pub storage_patience: Duration,
    /// The server side of the job's strategy (from `aggregation.strategy`), set when the
    /// job's model is known; its state (momentum, moments, control variates) is
    /// checkpointed with each round as the model `server_state_name`.
    pub strategy: std::sync::Mutex<Option<Box<dyn Strategy>>>,
    /// The job's secure aggregation (`privacy.secure_aggregation`): rounds train through
    /// its protocol (`rounds/secure.rs`) instead of folding updates.
    pub secagg: Option<Arc<crate::secagg::SecAgg>>,
}

/// How long client-selector may be away before a round's task results go unrecorded.
const RESULTS_PATIENCE: Duration = Duration::from_secs(10);

/// The parties an offer drew, with their weights and the tasks those that accepted took.
fn draws(resp: &pb::OfferTasksResponse) -> Vec<(String, f64, Option<String>)> {
    resp.selected
        .iter()
        .map(|s| {
            let task = resp
                .accepted
                .iter()
                .find(|a| a.party == s.party)
                .map(|a| a.task_id.clone());
            (s.party.clone(), s.score, task)
        })
        .collect()
}

/// The sampling rate each recorded round was accounted at, in order (for the DP budget).
/// A round recorded without a rate (none, or 0) counts as q = 1, the most it can have cost.
fn recorded_rates(assignment: &pb::Assignment) -> Vec<Option<f64>> {
    let rounds = assignment.job.as_ref().map_or(&[][..], |j| &j.rounds[..]);
    (1..assignment.next_round.max(1))
        .map(|n| {
            let q = rounds.iter().find(|r| r.round == n)?.dp_sampling_rate;
            (q > 0.0).then_some(q)
        })
        .collect()
}

/// How long parties get to answer an offer.
const OFFER_REPLY_TIMEOUT_MS: u32 = 5_000;
/// How often a waiting round re-checks its tasks' liveness.
const TASK_POLL: Duration = Duration::from_millis(500);

enum Failure {
    Fail(String),
    Stopped(String),
    Abandon(String),
}

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Outcome {
        match f {
            Failure::Fail(r) => Outcome::Finish(pb::JobState::Failed, r),
            Failure::Stopped(r) => Outcome::Finish(pb::JobState::Stopped, r),
            Failure::Abandon(r) => Outcome::Abandon(r),
        }
    }
}

/// The parties of the job's dataset as the coordinator sees them.
struct Cohort {
    /// The data shape the job's model is built for.
    features: u32,
    classes: u32,
    /// Samples each party registered when the job started (or when first seen): what its
    /// word weighs at most.
    registered: HashMap<String, u64>,
    /// Parties already logged as left out (data of another shape).
    left_out: HashSet<String>,
    /// Connected parties holding the dataset in the job's shape, as last seen: whom a
    /// round's evaluation should cover.
    holders: u32,
}

/// Free GPUs a party needs for a task of `kind`: one for training under
/// `training.device: cuda` (evaluation runs on the CPU).
fn gpus_needed(spec: &JobSpec, kind: TaskKind) -> u32 {
    u32::from(kind == TaskKind::Train && spec.training.device == TrainingDevice::Cuda)
}

/// What a quorum failure adds when only parties with a GPU could be offered the task.
fn gpu_hint(spec: &JobSpec) -> &'static str {
    if spec.training.device == TrainingDevice::Cuda {
        "; training.device is cuda: only parties reporting a free GPU are offered training"
    } else {
        ""
    }
}

/// A round's training, once collected.
struct Trained {
    updates: u32,
    train_loss: f64,
    dropped: u32,
    task_failures: u32,
}

/// A round's evaluation, bounded: weights capped like updates; `robust` is the lower median
/// of the parties' accuracies (None with fewer than two reports).
struct Evaluated {
    metrics: pb::Metrics,
    robust: Option<f64>,
    /// Parties that reported, of those holding the dataset.
    parties: u32,
    expected: u32,
}

/// Tasks of one offer that did not deliver, with their parties' reasons.
#[derive(Default)]
struct Waited {
    failures: Vec<(String, String, String)>,
}

impl JobRun {
    fn stop_reason(&self) -> Option<String> {
        self.state.stop_reason()
    }

    fn model_name(&self) -> String {
        self.spec.model_name(&self.job_id)
    }

    fn rules(&self) -> AggregationRules {
        let a = &self.spec.aggregation;
        let robust = match lock(&self.strategy).as_ref().map(|s| s.combine()) {
            Some(Combine::Robust(rule)) => Some(rule),
            Some(Combine::Mean) | None => None,
        };
        AggregationRules {
            max_weight_share: a.max_weight_share,
            max_update_norm: a.max_update_norm.map(|n| (n, a.norm_action)),
            robust,
            dp: (self.spec.privacy.dp.as_ref())
                .map(|dp| DpAggregation::for_spec(dp, self.spec.clients.per_round)),
        }
    }

    /// A model-manager request made for the job's namespace: the coordinator reads and
    /// writes models as a member of it, never as an all-powerful internal caller.
    fn for_job<T>(&self, msg: T) -> Result<tonic::Request<T>, Failure> {
        let mut req = tonic::Request::new(msg);
        act_as(&mut req, &self.spec.namespace, Role::Member)
            .map_err(|s| Failure::Fail(s.message().to_string()))?;
        Ok(req)
    }

    pub async fn run(&self, assignment: pb::Assignment) -> Outcome {
        let outcome = match self.run_inner(assignment).await {
            Ok(outcome) => outcome,
            Err(f) => f.into(),
        };
        if let Outcome::Finish(pb::JobState::Failed, reason) = &outcome {
            self.state.note(Note {
                kind: NoteKind::RoundFailed,
                round: 0,
                party: String::new(),
                task_id: String::new(),
                message: reason.clone(),
            });
        }
        self.flush_log().await;
        outcome
    }

    async fn run_inner(&self, assignment: pb::Assignment) -> Result<Outcome, Failure> {
        let (global, mut cohort) = self.initial_model(&assignment).await?;
        let extras = self.start_strategy(&global, &assignment).await?;
        self.state.set_model(global, extras);
        let ready = retry_unavailable("coordinator ready", SCHEDULER_PATIENCE, || {
            let mut c = self.clients.scheduler.clone();
            let req = pb::CoordinatorReadyRequest {
                job_id: self.job_id.to_string(),
                endpoint: self.endpoint.clone(),
                pid: std::process::id(),
            };
            async move { c.coordinator_ready(req).await }
        })
        .await;
        if let Err(s) = ready {
            return Ok(Outcome::Abandon(format!(
                "job-scheduler refused: {}",
                s.message()
            )));
        }
        tracing::info!(job = %self.job_id, endpoint = %self.endpoint, next_round = assignment.next_round, "coordinator ready");
        let mut parent_version = assignment.resume_model_version;
        let rounds = self.spec.rounds;
        let mut last_accuracy = None;
        let mut budget = RoundBudget::for_job(&self.spec, recorded_rates(&assignment));
        for round in assignment.next_round.max(1)..=rounds {
            // Each round is a trace of its own: where its time went, across every process.
            let span =
                cohort_telemetry::trace_span!(parent: None, "round", job_id = %self.job_id, round);
            let ended = self
                .run_round(
                    round,
                    &mut cohort,
                    &mut parent_version,
                    &mut last_accuracy,
                    &mut budget,
                )
                .instrument(span)
                .await?;
            if let Some(outcome) = ended {
                return Ok(outcome);
            }
        }
        let reason = match last_accuracy {
            Some(a) => format!("completed {rounds} rounds; accuracy {a:.4}"),
            None => format!("completed {rounds} rounds"),
        };
        Ok(Outcome::Finish(pb::JobState::Succeeded, reason))
    }

    /// One round from its offer to its report; `Some` when the job ends with it.
    async fn run_round(
        &self,
        round: u32,
        cohort: &mut Cohort,
        parent_version: &mut u32,
        last_accuracy: &mut Option<f64>,
        budget: &mut RoundBudget,
    ) -> Result<Option<Outcome>, Failure> {
        let rounds = self.spec.rounds;
        if let Some(r) = self.stop_reason() {
            return Err(Failure::Stopped(r));
        }
        self.refresh_cohort(cohort, round).await;
        let per_round = self.spec.clients.per_round;
        if let Err(end) = budget.before_round(round, per_round, cohort.holders) {
            let state = match end.failed {
                true => pb::JobState::Failed,
                false => pb::JobState::Succeeded,
            };
            return Ok(Some(Outcome::Finish(state, end.reason)));
        }
        // A round runs from its offer to its model stored.
        let started = Instant::now();
        let trained = self
            .train_round(round, cohort)
            .instrument(cohort_telemetry::trace_span!("train"))
            .await;
        // What the round's parties did goes on their records, also when it failed the round
        // (not when the job was stopped: that is no party's doing).
        if !matches!(trained, Err(Failure::Stopped(_) | Failure::Abandon(_))) {
            self.record_results(round).await;
        }
        let trained = trained?;
        crate::metrics::phase(Phase::Train, started.elapsed());
        // A synthetic model has nothing to evaluate.
        let evaluate = self.spec.model.synthetic().is_none()
            && (round.is_multiple_of(self.spec.evaluation.every) || round == rounds);
        let evaluated = if evaluate {
            let evaluating = Instant::now();
            let evaluated = self
                .evaluate_round(round, cohort)
                .instrument(cohort_telemetry::trace_span!("evaluate"))
                .await?;
            crate::metrics::phase(Phase::Evaluate, evaluating.elapsed());
            if evaluated.metrics.samples > 0 {
                crate::metrics::evaluated(evaluated.metrics.accuracy, evaluated.metrics.loss);
            }
            evaluated
        } else {
            Evaluated {
                metrics: pb::Metrics::default(),
                robust: None,
                parties: 0,
                expected: 0,
            }
        };
        let metrics = evaluated.metrics;
        let refused = self.state.take_refused();
        let checkpointing = Instant::now();
        let version = self
            .checkpoint(round, *parent_version, &metrics)
            .instrument(cohort_telemetry::trace_span!("checkpoint"))
            .await?;
        self.checkpoint_server_state(round).await?;
        crate::metrics::phase(Phase::Checkpoint, checkpointing.elapsed());
        let traffic = self.state.take_traffic();
        *parent_version = version;
        let privacy = budget.released();
        if let Some((epsilon, q)) = privacy {
            tracing::info!(job = %self.job_id, round, epsilon, sampling_rate = q, "privacy spent");
        }
        let summary = pb::RoundSummary {
            round,
            evaluation: Some(metrics),
            train_loss: trained.train_loss,
            updates: trained.updates,
            model_version: version,
            duration_ms: started.elapsed().as_millis() as u64,
            refused_updates: u32::try_from(refused).unwrap_or(u32::MAX),
            dropped_updates: trained.dropped,
            task_failures: trained.task_failures,
            robust_accuracy: evaluated.robust.unwrap_or(0.0),
            eval_parties: evaluated.parties,
            eval_parties_expected: evaluated.expected,
            bytes_to_parties: traffic.to_parties,
            bytes_from_parties: traffic.from_parties,
            bytes_from_parties_uncompressed: traffic.from_parties_uncompressed,
            selected: self
                .state
                .draws()
                .into_iter()
                .map(|d| pb::SelectedParty {
                    party: d.party,
                    score: d.score,
                    outcome: d.outcome.as_str().to_string(),
                })
                .collect(),
            dp_epsilon: privacy.map_or(0.0, |(epsilon, _)| epsilon),
            dp_sampling_rate: privacy.map_or(0.0, |(_, q)| q),
        };
        tracing::info!(job = %self.job_id, round, seconds = summary.duration_ms as f64 / 1e3, bytes_to_parties = traffic.to_parties, bytes_from_parties = traffic.from_parties, bytes_from_parties_uncompressed = traffic.from_parties_uncompressed, updates = trained.updates, accuracy = metrics.accuracy, robust_accuracy = ?evaluated.robust, loss = metrics.loss, version, "round complete");
        self.flush_log().await;
        retry_unavailable("report round", SCHEDULER_PATIENCE, || {
            let mut c = self.clients.scheduler.clone();
            let req = pb::ReportRoundRequest {
                job_id: self.job_id.to_string(),
                round: Some(summary.clone()),
            };
            async move { c.report_round(req).await }
        })
        .await
        .map_err(|s| {
            Failure::Abandon(format!(
                "cannot report the round to job-scheduler: {}",
                s.message()
            ))
        })?;
        if metrics.samples > 0 {
            *last_accuracy = Some(metrics.accuracy);
        }
        // One party's claim cannot end the job: the stop rule reads the lower median.
        if let (Some(target), Some(robust)) = (self.spec.stop.target_accuracy, evaluated.robust)
            && robust >= target
        {
            return Ok(Some(Outcome::Finish(
                pb::JobState::Succeeded,
                format!(
                    "target accuracy {target} reached in round {round} (median party \
                     accuracy {robust:.4})"
                ),
            )));
        }
        Ok(None)
    }

    /// Sends what became of the round's training tasks to client-selector, for the parties'
    /// reliability records (best effort: a record that cannot be written does not stop the
    /// job). Tasks still pending are left out.
    async fn record_results(&self, round: u32) {
        let results: Vec<pb::TaskResultReport> = self
            .state
            .draws()
            .into_iter()
            .filter_map(|d| {
                let result = match d.outcome {
                    DrawOutcome::Finished => pb::TaskResult::Finished,
                    DrawOutcome::Failed => pb::TaskResult::Failed,
                    DrawOutcome::TimedOut => pb::TaskResult::TimedOut,
                    DrawOutcome::Refused | DrawOutcome::Pending => return None,
                };
                Some(pb::TaskResultReport {
                    task_id: d.task_id?,
                    party: d.party,
                    result: result as i32,
                })
            })
            .collect();
        if results.is_empty() {
            return;
        }
        let sent = results.len();
        let res = retry_unavailable("record task results", RESULTS_PATIENCE, || {
            let mut c = self.clients.selector.clone();
            let req = pb::RecordTaskResultsRequest {
                job_id: self.job_id.to_string(),
                round,
                results: results.clone(),
            };
            async move { c.record_task_results(req).await }
        })
        .await;
        match res {
            Ok(r) => {
                let r = r.into_inner();
                tracing::debug!(
                    round,
                    sent,
                    recorded = r.recorded,
                    ignored = r.ignored,
                    "task results recorded"
                );
            }
            Err(s) => {
                tracing::warn!(round, sent, status = %s.message(), "cannot record the round's task results in the parties' reliability records")
            }
        }
    }

    /// Sends the job's pending log entries to job-scheduler (best effort: a log that cannot
    /// be written does not stop the job).
    async fn flush_log(&self) {
        let notes = self.state.take_notes();
        for batch in notes.chunks(100) {
            let events: Vec<pb::EventNote> = batch
                .iter()
                .map(|n| pb::EventNote {
                    kind: n.kind.as_str().to_string(),
                    round: n.round,
                    party: n.party.clone(),
                    task_id: n.task_id.clone(),
                    message: n.message.clone(),
                })
                .collect();
            let res = retry_unavailable("record events", Duration::from_secs(10), || {
                let mut c = self.clients.scheduler.clone();
                let req = pb::RecordEventsRequest {
                    job_id: self.job_id.to_string(),
                    events: events.clone(),
                };
                async move { c.record_events(req).await }
            })
            .await;
            if let Err(s) = res {
                tracing::warn!(job = %self.job_id, entries = events.len(), status = %s.message(), "cannot write the job's log");
                return;
            }
        }
    }

    /// Resumes from the checkpoint, starts from `model.init`, or initialises from the
    /// dataset's shape. The shape is the one most holders registered, or the one the given
    /// model fits; parties of another shape are left out of the job.
    async fn initial_model(
        &self,
        assignment: &pb::Assignment,
    ) -> Result<(Vec<NamedTensor>, Cohort), Failure> {
        let summary = self.describe_dataset().await?;
        let mut shapes: Vec<(u32, u32, usize, u64)> = Vec::new();
        for h in &summary.holders {
            match shapes
                .iter_mut()
                .find(|s| (s.0, s.1) == (h.features, h.classes))
            {
                Some(s) => {
                    s.2 += 1;
                    s.3 += h.samples;
                }
                None => shapes.push((h.features, h.classes, 1, h.samples)),
            }
        }
        shapes.sort_by(|a, b| {
            b.2.cmp(&a.2)
                .then(b.3.cmp(&a.3))
                .then((a.0, a.1).cmp(&(b.0, b.1)))
        });
        if shapes.is_empty() {
            shapes.push((summary.features, summary.classes, 0, 0));
        }
        let given = if assignment.resume_model_version > 0 {
            tracing::info!(
                version = assignment.resume_model_version,
                "resuming from checkpoint"
            );
            let name = self.model_name();
            Some((
                "the checkpoint",
                self.download(&name, assignment.resume_model_version)
                    .await
                    .map_err(|e| Failure::Fail(format!("cannot resume: {e}")))?,
            ))
        } else if let Some(init) = &self.spec.model.init {
            let (name, version) = parse_model_ref(init).map_err(Failure::Fail)?;
            let weights = self
                .download(&name, version)
                .await
                .map_err(|e| Failure::Fail(format!("model.init: {e}")))?;
            Some(("model.init", weights))
        } else {
            None
        };
        let synthetic = cohort_fl::SyntheticModel::of(&self.spec.model);
        let (weights, features, classes) = match given {
            Some((what, weights)) if let Some(model) = synthetic => {
                if !model.fits(&weights) {
                    return Err(Failure::Fail(format!(
                        "{what} is not the synthetic model of {} parameters in {} tensors \
                         (model.params, model.layers)",
                        model.params, model.layers
                    )));
                }
                (weights, shapes[0].0, shapes[0].1)
            }
            None if let Some(model) = synthetic => {
                self.check_size(shapes[0].0, shapes[0].1)?;
                (model.zeros(), shapes[0].0, shapes[0].1)
            }
            Some((what, weights)) => {
                let fits = |f: u32, c: u32| {
                    cohort_train::check_weights(&self.spec.model, &weights, f as usize, c as usize)
                };
                let Some(&(f, c, _, _)) = shapes.iter().find(|s| fits(s.0, s.1).is_ok()) else {
                    let (f, c) = (shapes[0].0, shapes[0].1);
                    let why = fits(f, c).err().map(|e| e.to_string()).unwrap_or_default();
                    return Err(Failure::Fail(format!(
                        "{what} does not fit dataset {:?} ({f} features, {c} classes): {why}",
                        self.spec.data.dataset
                    )));
                };
                self.check_size(f, c)?;
                (weights, f, c)
            }
            None => {
                let (f, c) = (shapes[0].0, shapes[0].1);
                self.check_size(f, c)?;
                let seed = self
                    .spec
                    .seed
                    .unwrap_or_else(|| seed_of(self.job_id.as_str()));
                let weights =
                    cohort_train::init_model(&self.spec.model, f as usize, c as usize, seed)
                        .map_err(|e| Failure::Fail(format!("cannot build the model: {e}")))?;
                (weights, f, c)
            }
        };
        tracing::info!(
            features,
            classes,
            tensors = weights.len(),
            "model ready for dataset {}",
            self.spec.data.dataset
        );
        let cohort = Cohort {
            features,
            classes,
            registered: HashMap::new(),
            left_out: HashSet::new(),
            holders: 0,
        };
        Ok((weights, cohort))
    }

    /// The model must fit the server's limit for this data shape.
    fn check_size(&self, features: u32, classes: u32) -> Result<(), Failure> {
        let count = self
            .spec
            .model
            .parameter_count(u64::from(features), u64::from(classes));
        if self.max_model_parameters > 0 && count > self.max_model_parameters {
            return Err(Failure::Fail(format!(
                "model.hidden: a {:?} model for {features} features and {classes} classes has \
                 {count} parameters; this server allows at most {}",
                self.spec.model.arch, self.max_model_parameters
            )));
        }
        Ok(())
    }

    /// What the connected parties hold of the job's dataset, waiting up to a round timeout
    /// for a first holder to connect.
    async fn describe_dataset(&self) -> Result<pb::DatasetSummary, Failure> {
        let dataset = &self.spec.data.dataset;
        let deadline = Instant::now() + self.spec.clients.round_timeout;
        loop {
            if let Some(r) = self.stop_reason() {
                return Err(Failure::Stopped(r));
            }
            let mut c = self.clients.selector.clone();
            let req = pb::DescribeDatasetRequest {
                name: dataset.clone(),
            };
            match c.describe_dataset(req).await {
                Ok(s) => return Ok(s.into_inner()),
                Err(s) if Instant::now() >= deadline => {
                    return Err(Failure::Fail(format!(
                        "data.dataset: no connected party holds {dataset:?} within \
                         clients.round_timeout {} ({})",
                        humantime::format_duration(self.spec.clients.round_timeout),
                        s.message()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Takes note of parties that joined (what they registered now is what they weigh at
    /// most from now on) and of parties whose data does not fit the job's model.
    async fn refresh_cohort(&self, cohort: &mut Cohort, round: u32) {
        let mut c = self.clients.selector.clone();
        let Ok(summary) = c
            .describe_dataset(pb::DescribeDatasetRequest {
                name: self.spec.data.dataset.clone(),
            })
            .await
        else {
            return;
        };
        let holders = summary.into_inner().holders;
        cohort.holders = holders
            .iter()
            .filter(|h| (h.features, h.classes) == (cohort.features, cohort.classes))
            .count() as u32;
        for h in holders {
            if (h.features, h.classes) != (cohort.features, cohort.classes) {
                if cohort.left_out.insert(h.party.clone()) {
                    self.state.note(Note {
                        kind: NoteKind::PartyLeftOut,
                        round,
                        party: h.party.clone(),
                        task_id: String::new(),
                        message: format!(
                            "dataset {:?} has {} features and {} classes at this party; the \
                             job's model needs {} features and {} classes",
                            self.spec.data.dataset,
                            h.features,
                            h.classes,
                            cohort.features,
                            cohort.classes
                        ),
                    });
                    tracing::warn!(party = %h.party, "party left out: its data does not fit the model");
                }
                continue;
            }
            cohort.registered.entry(h.party).or_insert(h.samples);
        }
    }

    /// Downloads `name@version` of the job's namespace. Another namespace's model answers
    /// exactly like a missing one.
    async fn download(&self, name: &str, version: u32) -> Result<Vec<NamedTensor>, String> {
        let mut bytes = Vec::new();
        let req = self
            .for_job(pb::GetVersionRequest {
                name: name.to_string(),
                version,
                namespace: self.spec.namespace.clone(),
            })
            .map_err(|_| "invalid namespace".to_string())?;
        let mut c = self.clients.models.clone();
        let mut stream = c
            .download(req)
            .await
            .map_err(|s| format!("model {name}@{version}: {}", s.message()))?
            .into_inner();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| format!("model {name}@{version}: {}", s.message()))?;
            bytes.extend_from_slice(&chunk.data);
        }
        from_safetensors(&bytes).map_err(|e| format!("model {name}@{version}: {e}"))
    }

    /// Offers training to the cohort and collects updates. Tasks that fail early (an
    /// executor crash, a party gone) are offered again, to other parties first, until quorum
    /// or the round timeout; the same failure from every party fails the round at once.
    async fn train_round(&self, round: u32, cohort: &Cohort) -> Result<Trained, Failure> {
        let clients = &self.spec.clients;
        let deadline = Instant::now() + clients.round_timeout;
        self.state.begin_training(round, self.rules(), deadline);
        if let Some(secagg) = &self.secagg {
            return self.train_secure(round, cohort, deadline, secagg).await;
        }
        let mut failures: Vec<(String, String, String)> = Vec::new();
        let mut accepted_total = 0usize;
        loop {
            let engaged = self.state.engaged_parties();
            let counted = self.state.delivered() + self.state.in_flight();
            let accepted = self
                .offer_until(
                    round,
                    TaskKind::Train,
                    clients.per_round.saturating_sub(counted),
                    clients.min.saturating_sub(counted),
                    deadline,
                    engaged,
                    cohort,
                )
                .await?;
            accepted_total += accepted.len();
            if counted + (accepted.len() as u32) < clients.min {
                return Err(self.round_failed(
                    round,
                    format!(
                        "quorum not met: {} of the required {} parties (clients.min) accepted the \
                         task within clients.round_timeout {}{}{}",
                        counted as usize + accepted.len(),
                        clients.min,
                        humantime::format_duration(clients.round_timeout),
                        gpu_hint(&self.spec),
                        failure_summary(&failures)
                    ),
                ));
            }
            let waited = self.wait_for(round, &accepted, deadline).await?;
            failures.extend(waited.failures);
            self.flush_log().await;
            let delivered = self.state.delivered();
            if delivered >= clients.min || Instant::now() + Duration::from_secs(1) >= deadline {
                break;
            }
            if delivered == 0
                && self.state.in_flight() == 0
                && failures.len() >= 2
                && let Some(reason) = common_reason(&failures)
            {
                return Err(self.round_failed(
                    round,
                    format!(
                        "every task failed the same way ({} failures): {reason}",
                        failures.len()
                    ),
                ));
            }
            tracing::warn!(
                round,
                delivered,
                "quorum not reached yet; offering the task again"
            );
            self.state.forget_undelivered();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let training = self
            .state
            .finish_training()
            .ok_or_else(|| Failure::Fail(format!("round {round}: no training was collected")))?;
        let updates = training.aggregate.updates();
        if updates < clients.min {
            return Err(self.round_failed(
                round,
                format!(
                    "quorum not met: {updates} update(s) received from {accepted_total} accepted \
                     task(s), clients.min is {} ({} dropped); within clients.round_timeout {}{}",
                    clients.min,
                    training.dropped,
                    humantime::format_duration(clients.round_timeout),
                    failure_summary(&failures)
                ),
            ));
        }
        let combined = training
            .aggregate
            .finish()
            .map_err(|e| self.round_failed(round, format!("aggregation failed: {e}")))?;
        let facts = RoundFacts {
            updates,
            population: cohort.holders.max(updates),
        };
        let (model, extras) = {
            let mut strategy = lock(&self.strategy);
            let strategy = strategy
                .as_mut()
                .ok_or_else(|| self.round_failed(round, "no strategy was started".into()))?;
            let model = strategy
                .step(&self.state.global(), combined, facts)
                .map_err(|e| {
                    self.round_failed(round, format!("the {} step failed: {e}", strategy.name()))
                })?;
            (model, strategy.extras())
        };
        self.state.set_model(model, extras);
        Ok(Trained {
            updates,
            train_loss: training.train_loss,
            dropped: training.dropped,
            task_failures: failures.len() as u32,
        })
    }

    /// Notes in the job's log that a task of `party` ended without delivering, with the
    /// reason its party gave (`messages`, by task id) or [`NO_REASON`]; returns the reason.
    fn note_task_failed(
        &self,
        round: u32,
        party: &str,
        task_id: &str,
        messages: &HashMap<String, String>,
    ) -> String {
        let reason = messages
            .get(task_id)
            .filter(|m| !m.is_empty())
            .cloned()
            .unwrap_or_else(|| NO_REASON.to_string());
        self.state.note(Note {
            kind: NoteKind::TaskFailed,
            round,
            party: party.to_string(),
            task_id: task_id.to_string(),
            message: reason.clone(),
        });
        reason
    }

    fn round_failed(&self, round: u32, why: String) -> Failure {
        Failure::Fail(format!("round {round}: {why}"))
    }

    /// Federated evaluation of the new global model on the parties' held-out data.
    async fn evaluate_round(&self, round: u32, cohort: &Cohort) -> Result<Evaluated, Failure> {
        let deadline = Instant::now() + self.spec.clients.round_timeout;
        self.state.begin_evaluation(round, deadline);
        // Evaluate on every party that holds the dataset (up to a bound): evaluation is
        // cheap and covers the whole held-out data.
        let parties = cohort.registered.len().clamp(1, 1000) as u32;
        let accepted = self
            .offer_until(
                round,
                TaskKind::Evaluate,
                parties,
                1,
                deadline,
                Vec::new(),
                cohort,
            )
            .await?;
        if accepted.is_empty() {
            tracing::warn!(round, "no party accepted the evaluation");
        } else {
            self.wait_for(round, &accepted, deadline).await?;
        }
        let reports = self.state.finish_evaluation();
        let mut evaluated = self.summarise(&reports);
        evaluated.expected = cohort.holders.max(evaluated.parties);
        if evaluated.parties < evaluated.expected {
            tracing::warn!(
                round,
                reported = evaluated.parties,
                holders = evaluated.expected,
                "the round's evaluation covers only part of the parties"
            );
        }
        Ok(evaluated)
    }

    /// The round's evaluation from the parties' reports, with their weights capped like
    /// updates.
    fn summarise(&self, reports: &[EvalReport]) -> Evaluated {
        if reports.is_empty() {
            return Evaluated {
                metrics: pb::Metrics::default(),
                robust: None,
                parties: 0,
                expected: 0,
            };
        }
        let raw: Vec<f64> = reports.iter().map(|r| r.weight).collect();
        let weights = capped_weights(&raw, self.spec.aggregation.max_weight_share);
        let total: f64 = weights.iter().sum();
        let (mut loss, mut accuracy) = (0.0, 0.0);
        for (r, w) in reports.iter().zip(&weights) {
            loss += r.loss * w / total;
            accuracy += r.accuracy * w / total;
        }
        let accuracies: Vec<f64> = reports.iter().map(|r| r.accuracy).collect();
        Evaluated {
            metrics: pb::Metrics {
                loss,
                accuracy,
                samples: raw.iter().sum::<f64>() as u64,
            },
            robust: (reports.len() >= 2)
                .then(|| lower_median(&accuracies))
                .flatten(),
            parties: reports.len() as u32,
            expected: 0,
        }
    }

    /// Offers tasks until `want` parties accepted, or at least `min` did and no more are
    /// available, or the deadline passes.
    #[allow(clippy::too_many_arguments)]
    async fn offer_until(
        &self,
        round: u32,
        kind: TaskKind,
        want: u32,
        min: u32,
        deadline: Instant,
        exclude: Vec<String>,
        cohort: &Cohort,
    ) -> Result<Vec<pb::AcceptedTask>, Failure> {
        let started = Instant::now();
        let offered = async {
        let mut accepted: Vec<pb::AcceptedTask> = Vec::new();
        let mut last_refusals: HashMap<String, String> = HashMap::new();
        // Every party's latest refusal of this phase, for the job's log.
        let mut refusals: HashMap<String, String> = HashMap::new();
        loop {
            if let Some(r) = self.stop_reason() {
                return Err(Failure::Stopped(r));
            }
            let need = want.saturating_sub(accepted.len() as u32);
            if need == 0 {
                break;
            }
            // Mint the tokens first, so a party that is quick to call finds them.
            let tokens = self.state.mint(kind, need);
            let template = pb::Task {
                spec_json: self.spec.to_json(),
                deadline_ms: cohort_runtime::now_ms()
                    + deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis() as i64,
                seed: self.task_seed(round),
                ..Default::default()
            };
            let req = pb::OfferTasksRequest {
                job_id: self.job_id.to_string(),
                round,
                kind: task_kind_to_wire(kind) as i32,
                dataset: self.spec.data.dataset.clone(),
                count: need,
                selection: self.spec.clients.selection.as_str().to_string(),
                template: Some(template),
                reply_timeout_ms: OFFER_REPLY_TIMEOUT_MS,
                exclude: exclude
                    .iter()
                    .cloned()
                    .chain(accepted.iter().map(|a| a.party.clone()))
                    .collect(),
                task_tokens: tokens.clone(),
                features: cohort.features,
                classes: cohort.classes,
                gpus: gpus_needed(&self.spec, kind),
            };
            let mut c = self.clients.selector.clone();
            match c.offer_tasks(req).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    // A party weighs at most what it registered when the job started.
                    let bound: Vec<Accepted> = resp
                        .accepted
                        .iter()
                        .map(|a| Accepted {
                            token: a.task_token.clone(),
                            party: a.party.clone(),
                            task_id: a.task_id.clone(),
                            samples_cap: cohort
                                .registered
                                .get(&a.party)
                                .map_or(a.samples, |r| (*r).min(a.samples))
                                .max(1),
                        })
                        .collect();
                    self.state.bind(&tokens, &bound);
                    if kind == TaskKind::Train {
                        self.state.record_draws(draws(&resp));
                    }
                    accepted.extend(resp.accepted);
                    refusals.extend(resp.refused.iter().map(|(p, r)| (p.clone(), r.clone())));
                    last_refusals = resp.refused;
                }
                Err(s) => {
                    self.state.bind(&tokens, &[]);
                    tracing::warn!(round, status = %s.message(), "client-selector did not take the offer")
                }
            }
            if accepted.len() as u32 >= min {
                // Quorum reached; more parties may still come, but do not hold the round for them.
                break;
            }
            if Instant::now() + Duration::from_secs(1) >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut refused: Vec<(String, String)> = refusals.into_iter().collect();
        refused.sort();
        for (party, reason) in refused {
            // The party's own words (a policy such as --allowed-commands), where the user looks.
            self.state.note(Note {
                kind: NoteKind::Note,
                round,
                party,
                task_id: String::new(),
                message: format!("did not take the {} offer: {reason}", kind.as_str()),
            });
        }
        if (accepted.len() as u32) < min && !last_refusals.is_empty() {
            let mut why: Vec<String> = last_refusals
                .into_iter()
                .map(|(p, r)| format!("{p}: {r}"))
                .collect();
            why.sort();
            tracing::warn!(round, refusals = %why.join("; "), "parties refused");
        }
        Ok(accepted)
        }
        .instrument(cohort_telemetry::trace_span!("offer", kind = ?kind))
        .await;
        crate::metrics::phase(Phase::Offer, started.elapsed());
        offered
    }

    /// The seed handed to this round's tasks: from the spec's `seed`, so a rerun repeats the
    /// parties' data order (client-selector mixes in the party); 0 (random) without one.
    fn task_seed(&self, round: u32) -> u64 {
        match self.spec.seed {
            Some(seed) => seed_of(&format!("{seed}/{round}")).max(1),
            None => 0,
        }
    }

    /// Waits until every accepted task delivered or ended, or the deadline. Failed tasks go
    /// to the job's log with their party's reason.
    async fn wait_for(
        &self,
        round: u32,
        accepted: &[pb::AcceptedTask],
        deadline: Instant,
    ) -> Result<Waited, Failure> {
        let ids: Vec<String> = accepted.iter().map(|a| a.task_id.clone()).collect();
        let party_of: HashMap<&str, &str> = accepted
            .iter()
            .map(|a| (a.task_id.as_str(), a.party.as_str()))
            .collect();
        let mut waited = Waited::default();
        let mut landings = self.state.watch_progress();
        // Landings wake the loop at once; client-selector is asked about tasks that may
        // have died at most every TASK_POLL, not once per landing.
        let mut next_poll = Instant::now();
        loop {
            if let Some(r) = self.stop_reason() {
                return Err(Failure::Stopped(r));
            }
            let progress = self.state.task_progress(&ids);
            let pending: Vec<String> = ids
                .iter()
                .filter(|id| {
                    matches!(
                        progress.get(*id),
                        Some(TaskProgress::Pending | TaskProgress::InFlight)
                    )
                })
                .cloned()
                .collect();
            if pending.is_empty() || Instant::now() >= deadline {
                return Ok(waited);
            }
            let poll = Instant::now() >= next_poll;
            if poll {
                next_poll = Instant::now() + TASK_POLL;
            }
            // Tasks whose party left or whose executor failed will not deliver.
            let mut c = self.clients.selector.clone();
            if poll
                && let Ok(states) = c
                    .task_states(pb::TaskStatesRequest {
                        task_ids: pending.clone(),
                    })
                    .await
            {
                let states = states.into_inner();
                let dead: Vec<&String> = pending
                    .iter()
                    .filter(|id| {
                        progress.get(*id) != Some(&TaskProgress::InFlight)
                            && matches!(
                                states
                                    .phases
                                    .get(*id)
                                    .and_then(|p| pb::TaskPhase::try_from(*p).ok()),
                                Some(
                                    pb::TaskPhase::Failed
                                        | pb::TaskPhase::Cancelled
                                        | pb::TaskPhase::Succeeded
                                )
                            )
                    })
                    .collect();
                if dead.len() == pending.len() {
                    // A task that reported success may still be uploading: give it a moment.
                    tokio::time::sleep(TASK_POLL).await;
                    let progress = self.state.task_progress(&ids);
                    for id in dead {
                        if matches!(
                            progress.get(id),
                            Some(TaskProgress::Delivered | TaskProgress::Dropped)
                        ) {
                            continue;
                        }
                        let party = party_of.get(id.as_str()).copied().unwrap_or_default();
                        let reason = self.note_task_failed(round, party, id, &states.messages);
                        tracing::warn!(round, %party, task = %id, %reason, "task failed");
                        waited
                            .failures
                            .push((party.to_string(), id.clone(), reason));
                    }
                    return Ok(waited);
                }
            }
            let wait = next_poll
                .min(deadline)
                .saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(wait, landings.changed()).await;
        }
    }

    /// Stores the round's global model as a new version of the job's model, as a member of
    /// the job's namespace. A model that cannot be stored fails the job with the reason.
    /// The model-manager name of the strategy's server state: beside the model's, a DNS
    /// label like it.
    fn server_state_name(&self) -> String {
        let model = self.model_name();
        let keep = model.len().min(63 - SERVER_STATE_SUFFIX.len());
        format!("{}{SERVER_STATE_SUFFIX}", &model[..keep])
    }

    /// Starts the server side of the job's strategy, with a fresh state or, when the job
    /// resumes, the one checkpointed with the round it resumes after. Returns the tensors
    /// it serves beside the model.
    async fn start_strategy(
        &self,
        global: &[NamedTensor],
        assignment: &pb::Assignment,
    ) -> Result<Vec<NamedTensor>, Failure> {
        let mut server = cohort_fl::strategy::for_spec(&self.spec.aggregation, global);
        let after = assignment.next_round.saturating_sub(1);
        if server.state().is_some() && assignment.resume_model_version > 0 && after > 0 {
            let name = self.server_state_name();
            let stored = self.find_version(&name, after).await?;
            match stored {
                Some(version) => {
                    let state = self
                        .download(&name, version.version)
                        .await
                        .map_err(|e| Failure::Fail(format!("cannot resume: {e}")))?;
                    server.restore(&state).map_err(|e| {
                        Failure::Fail(format!(
                            "cannot resume: the server state of round {after} ({name}@{}): {e}",
                            version.version
                        ))
                    })?;
                    // The state as it now is, encoded as it was stored: equal digests say
                    // the moments are the checkpointed ones, bit for bit.
                    let restored = encoded_digest(server.state().unwrap_or_default())
                        .map_err(|e| Failure::Fail(format!("cannot resume: {e}")))?;
                    tracing::info!(
                        round = after,
                        version = version.version,
                        digest = %restored,
                        stored = %version.digest,
                        "server optimiser state restored"
                    );
                }
                None => {
                    tracing::warn!(
                        round = after,
                        "no server state stored for the round resumed after; \
                         it starts again from zero"
                    );
                    self.state.note(Note {
                        round: after,
                        kind: NoteKind::Note,
                        party: String::new(),
                        task_id: String::new(),
                        message: format!(
                            "the strategy's server state of round {after} was not found; \
                             it starts again from zero"
                        ),
                    });
                }
            }
        }
        let extras = server.extras();
        *lock(&self.strategy) = Some(server);
        Ok(extras)
    }

    /// The version of model `name` this job stored for `round`, if any.
    async fn find_version(
        &self,
        name: &str,
        round: u32,
    ) -> Result<Option<pb::ModelVersion>, Failure> {
        let req = pb::ListVersionsRequest {
            name: name.to_string(),
            job_id: self.job_id.to_string(),
            namespace: self.spec.namespace.clone(),
        };
        let listed = retry_unavailable("list server states", self.storage_patience, || {
            let mut c = self.clients.models.clone();
            let req = self.for_job(req.clone());
            async move {
                let req = req.map_err(|_| tonic::Status::invalid_argument("namespace"))?;
                c.list_versions(req).await
            }
        })
        .await
        .map_err(|s| Failure::Fail(format!("cannot resume: listing {name}: {}", s.message())))?;
        Ok(listed
            .into_inner()
            .versions
            .into_iter()
            .find(|v| v.lineage.as_ref().is_some_and(|l| l.round == round)))
    }

    /// Stores the strategy's server state (momentum, moments, control variates) after round
    /// `round`'s model, as a version of
    /// their own model lineaged to the round.
    async fn checkpoint_server_state(&self, round: u32) -> Result<(), Failure> {
        let Some(state) = lock(&self.strategy).as_ref().and_then(|s| s.state()) else {
            return Ok(());
        };
        let name = self.server_state_name();
        let (version, _) = self
            .store(&name, Arc::new(state), round, 0, &pb::Metrics::default())
            .await
            .map_err(|s| {
                Failure::Fail(format!(
                    "round {round}: cannot store the strategy's server state ({name}): {}",
                    s.message()
                ))
            })?;
        tracing::debug!(round, version = version.version, digest = %version.digest, "server optimiser state stored");
        Ok(())
    }

    /// Uploads `tensors` as a version of model `name` for `round`; returns the version and
    /// the digest of what was sent (a version stored before for the round has another).
    async fn store(
        &self,
        name: &str,
        tensors: Arc<Vec<NamedTensor>>,
        round: u32,
        parent: u32,
        metrics: &pb::Metrics,
    ) -> Result<(pb::ModelVersion, String), tonic::Status> {
        let header = pb::UploadVersionRequest {
            part: Some(pb::upload_version_request::Part::Header(pb::UploadHeader {
                name: name.to_string(),
                namespace: self.spec.namespace.clone(),
                lineage: Some(pb::Lineage {
                    job_id: self.job_id.to_string(),
                    round,
                    parent_version: parent,
                    // Whose updates made it (the server state's too).
                    parties: self.state.round_parties(),
                }),
                metrics: Some(*metrics),
            })),
        };
        // Encoded piece by piece as it is sent, and hashed on the way: no second copy of
        // the model, no second pass over it. Each attempt starts the hash afresh.
        let sent = Arc::new(std::sync::Mutex::new(sha2::Sha256::new()));
        let version = retry_unavailable("upload model", self.storage_patience, || {
            let mut c = self.clients.models.clone();
            *lock(&sent) = sha2::Sha256::new();
            let hasher = sent.clone();
            let req = cohort_fl::safetensors_stream(tensors.clone(), cohort_fl::CHUNK_BYTES)
                .map_err(|e| tonic::Status::internal(format!("cannot encode the model: {e}")))
                .and_then(|(_, pieces)| {
                    let parts = std::iter::once(header.clone()).chain(pieces.map(move |data| {
                        lock(&hasher).update(&data);
                        pb::UploadVersionRequest {
                            part: Some(pb::upload_version_request::Part::Data(data)),
                        }
                    }));
                    self.for_job(futures::stream::iter(parts))
                        .map_err(|_| tonic::Status::invalid_argument("namespace"))
                });
            async move { c.upload_version(req?).await }
        })
        .await?
        .into_inner();
        let digest = hex::encode(lock(&sent).clone().finalize());
        Ok((version, digest))
    }

    async fn checkpoint(
        &self,
        round: u32,
        parent: u32,
        metrics: &pb::Metrics,
    ) -> Result<u32, Failure> {
        let name = self.model_name();
        let (version, digest) = self
            .store(&name, self.state.model(), round, parent, metrics)
            .await
            .map_err(|s| {
                Failure::Fail(format!(
                    "round {round}: cannot store the model in model-manager: {}",
                    s.message()
                ))
            })?;
        // Versions are idempotent per (job, round): a round an earlier coordinator of this job
        // already stored (its report to job-scheduler was lost) answers with that version.
        // Continue from the stored model, so the lineage and the next round agree.
        if version.digest != digest {
            tracing::info!(
                round,
                version = version.version,
                "round {round} was stored before; continuing from the stored model"
            );
            let stored = self
                .download(&self.model_name(), version.version)
                .await
                .map_err(|e| Failure::Fail(format!("round {round}: {e}")))?;
            let extras = lock(&self.strategy)
                .as_ref()
                .map(|s| s.extras())
                .unwrap_or_default();
            self.state.set_model(stored, extras);
        }
        Ok(version.version)
    }
}

/// Failures that say nothing about the job: the party's session broke, not its work.
const TRANSIENT_REASONS: [&str; 3] = [
    cohort_proto::TASK_PARTY_DISCONNECTED,
    cohort_proto::TASK_PARTY_RECONNECTED_WITHOUT_IT,
    NO_REASON,
];

/// What a task that ended without delivering and without a reason is noted with.
const NO_REASON: &str = "ended without delivering";

/// The reason every failure gave, when they all gave the same one and it is about the job's
/// work (a party's own name in its reason, e.g. in a path, does not make it another reason;
/// a lost session is no such reason).
fn common_reason(failures: &[(String, String, String)]) -> Option<String> {
    if failures
        .iter()
        .any(|(_, _, reason)| TRANSIENT_REASONS.contains(&reason.as_str()))
    {
        return None;
    }
    let general = |(party, _, reason): &(String, String, String)| without_word(reason, party);
    let first = general(failures.first()?);
    failures
        .iter()
        .all(|f| general(f) == first)
        .then(|| failures[0].2.clone())
}

/// `text` with every occurrence of `word` that stands alone (not inside a longer name)
/// replaced by a placeholder.
fn without_word(text: &str, word: &str) -> String {
    if word.is_empty() {
        return text.to_string();
    }
    let part_of_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + word.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(part_of_name) || after.is_some_and(part_of_name) {
            out.push_str(word);
        } else {
            out.push_str("<party>");
        }
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// The last few task failures, for a round's failure reason.
fn failure_summary(failures: &[(String, String, String)]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = failures
        .iter()
        .rev()
        .take(3)
        .map(|(party, _, reason)| format!("{party}: {reason}"))
        .collect();
    format!("; task failures: {}", shown.join("; "))
}

/// What the strategy's server-state model adds to the model's name.
const SERVER_STATE_SUFFIX: &str = "-server-state";

/// The sha256 of `tensors` encoded as they are stored (the safetensors stream).
fn encoded_digest(tensors: Vec<NamedTensor>) -> Result<String, String> {
    let (_, pieces) = cohort_fl::safetensors_stream(Arc::new(tensors), cohort_fl::CHUNK_BYTES)
        .map_err(|e| format!("cannot encode the server state: {e}"))?;
    let mut hash = sha2::Sha256::new();
    for piece in pieces {
        hash.update(&piece);
    }
    Ok(hex::encode(hash.finalize()))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stable seed per job so a relaunched coordinator initialises identically.
fn seed_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(party: &str, reason: &str) -> (String, String, String) {
        (party.into(), format!("{party}-task"), reason.into())
    }

    #[test]
    fn a_reason_is_common_only_when_every_failure_gave_it() {
        let same = [failure("a", "boom"), failure("b", "boom")];
        assert_eq!(common_reason(&same).as_deref(), Some("boom"));
        let paths = [
            failure("party-1", "cannot read /d/party-1/train.csv"),
            failure("party-2", "cannot read /d/party-2/train.csv"),
        ];
        assert_eq!(
            common_reason(&paths).as_deref(),
            Some("cannot read /d/party-1/train.csv")
        );
        let mixed = [failure("a", "boom"), failure("b", "other")];
        assert_eq!(common_reason(&mixed), None);
        assert_eq!(common_reason(&[]), None);
        assert!(failure_summary(&mixed).contains("b: other"));
        let gone = [
            failure("a", cohort_proto::TASK_PARTY_DISCONNECTED),
            failure("b", cohort_proto::TASK_PARTY_DISCONNECTED),
        ];
        assert_eq!(
            common_reason(&gone),
            None,
            "a lost session is not the job's fault"
        );
    }
}
