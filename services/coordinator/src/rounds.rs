//! The round loop: offer tasks, collect updates until quorum and completion or
//! the round timeout, aggregate, evaluate, checkpoint, report.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cohort_core::{JobId, JobSpec, NamedTensor, spec::parse_model_ref};
use cohort_fl::{FedAvg, from_safetensors, to_safetensors};
use cohort_proto::v1 as pb;
use cohort_runtime::retry_unavailable;
use futures::StreamExt;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::SCHEDULER_PATIENCE;
use crate::round_service::{EvalSum, RoundShared, Ticket, TicketState};

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
    pub model_name: String,
    pub spec: JobSpec,
    pub clients: Clients,
    pub shared: Arc<RoundShared>,
    pub endpoint: String,
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

/// Services the coordinator depends on may restart; keep trying for a while.
fn unavailable(what: &str, s: tonic::Status) -> Failure {
    Failure::Abandon(format!("{what}: {}", s.message()))
}

impl JobRun {
    fn stop_reason(&self) -> Option<String> {
        self.shared.stop.borrow().clone()
    }

    pub async fn run(&self, assignment: pb::Assignment) -> Outcome {
        match self.run_inner(assignment).await {
            Ok(outcome) => outcome,
            Err(f) => f.into(),
        }
    }

    async fn run_inner(&self, assignment: pb::Assignment) -> Result<Outcome, Failure> {
        let global = self.initial_model(&assignment).await?;
        self.shared.set_global(global);
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
        for round in assignment.next_round.max(1)..=rounds {
            if let Some(r) = self.stop_reason() {
                return Err(Failure::Stopped(r));
            }
            let started = Instant::now();
            let (updates, train_loss) = self.train_round(round).await?;
            let evaluate = round % self.spec.evaluation.every == 0 || round == rounds;
            let eval = if evaluate {
                self.evaluate_round(round).await?
            } else {
                EvalSum::default()
            };
            let metrics = eval.metrics();
            let version = self.checkpoint(round, parent_version, &metrics).await?;
            parent_version = version;
            let summary = pb::RoundSummary {
                round,
                evaluation: Some(metrics),
                train_loss,
                updates,
                model_version: version,
                duration_ms: started.elapsed().as_millis() as u64,
                refused_updates: u32::try_from(self.shared.lock_collect().refused)
                    .unwrap_or(u32::MAX),
            };
            tracing::info!(job = %self.job_id, round, updates, accuracy = metrics.accuracy, loss = metrics.loss, version, "round complete");
            retry_unavailable("report round", SCHEDULER_PATIENCE, || {
                let mut c = self.clients.scheduler.clone();
                let req = pb::ReportRoundRequest {
                    job_id: self.job_id.to_string(),
                    round: Some(summary),
                };
                async move { c.report_round(req).await }
            })
            .await
            .map_err(|s| unavailable("cannot report the round to job-scheduler", s))?;
            if metrics.samples > 0 {
                last_accuracy = Some(metrics.accuracy);
            }
            if let (Some(target), Some(acc)) = (self.spec.stop.target_accuracy, last_accuracy)
                && acc >= target
            {
                return Ok(Outcome::Finish(
                    pb::JobState::Succeeded,
                    format!("target accuracy {target} reached in round {round} ({acc:.4})"),
                ));
            }
        }
        let reason = match last_accuracy {
            Some(a) => format!("completed {rounds} rounds; accuracy {a:.4}"),
            None => format!("completed {rounds} rounds"),
        };
        Ok(Outcome::Finish(pb::JobState::Succeeded, reason))
    }

    /// Resume from the checkpoint, start from `model.init`, or initialise from
    /// the dataset's shape as the connected parties describe it.
    async fn initial_model(
        &self,
        assignment: &pb::Assignment,
    ) -> Result<Vec<NamedTensor>, Failure> {
        if assignment.resume_model_version > 0 {
            tracing::info!(
                version = assignment.resume_model_version,
                "resuming from checkpoint"
            );
            return self
                .download(&self.model_name, assignment.resume_model_version)
                .await;
        }
        if let Some(init) = &self.spec.model.init {
            let (name, version) = parse_model_ref(init).map_err(Failure::Fail)?;
            return self.download(&name, version).await;
        }
        let dataset = &self.spec.data.dataset;
        let deadline = Instant::now() + self.spec.clients.round_timeout;
        let summary = loop {
            let mut c = self.clients.selector.clone();
            match c
                .describe_dataset(pb::DescribeDatasetRequest {
                    name: dataset.clone(),
                })
                .await
            {
                Ok(s) => break s.into_inner(),
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    return Err(Failure::Fail(format!("data.dataset: {}", s.message())));
                }
                Err(s) if Instant::now() >= deadline => {
                    return Err(Failure::Fail(format!(
                        "cannot size the model: {} (waited {:?})",
                        s.message(),
                        self.spec.clients.round_timeout
                    )));
                }
                Err(_) => {
                    if let Some(r) = self.stop_reason() {
                        return Err(Failure::Stopped(r));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        cohort_train::init_model(
            &self.spec.model,
            summary.features as usize,
            summary.classes as usize,
            seed_of(self.job_id.as_str()),
        )
        .map_err(|e| Failure::Fail(format!("cannot initialise the model: {e}")))
    }

    async fn download(&self, name: &str, version: u32) -> Result<Vec<NamedTensor>, Failure> {
        let mut c = self.clients.models.clone();
        let mut stream = c
            .download(pb::GetVersionRequest {
                name: name.to_string(),
                version,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => {
                    Failure::Fail(format!("model {name}@{version}: {}", s.message()))
                }
                _ => unavailable("cannot download the model", s),
            })?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|s| Failure::Fail(format!("model {name}@{version}: {}", s.message())))?;
            bytes.extend_from_slice(&chunk.data);
        }
        from_safetensors(&bytes).map_err(|e| Failure::Fail(format!("model {name}@{version}: {e}")))
    }

    /// Offers training to the cohort and collects updates. Returns the number
    /// of updates and the sample-weighted mean training loss.
    async fn train_round(&self, round: u32) -> Result<(u32, f64), Failure> {
        let global = self.shared.global();
        {
            let mut c = self.shared.lock_collect();
            c.round = round;
            c.tickets.clear();
            c.aggregate = Some(FedAvg::new(&global));
            c.train_loss_sum = 0.0;
            c.train_samples = 0;
            c.refused = 0;
        }
        let clients = &self.spec.clients;
        let deadline = Instant::now() + clients.round_timeout;
        let mut accepted_total = 0usize;
        let mut missing: Vec<String>;
        // Tasks that fail early (an executor crash, a party gone) are offered
        // again, to other parties first, until quorum or the round timeout.
        loop {
            let (updates, delivered) = self.delivered(round);
            let accepted = self
                .offer_until(
                    round,
                    pb::TaskKind::Train,
                    clients.per_round.saturating_sub(updates),
                    clients.min.saturating_sub(updates),
                    deadline,
                    delivered.clone(),
                )
                .await?;
            accepted_total += accepted.len();
            if updates + (accepted.len() as u32) < clients.min {
                return Err(Failure::Fail(format!(
                    "round {round}: quorum not met: {} of the required {} parties (clients.min) accepted the task within clients.round_timeout {}",
                    updates as usize + accepted.len(),
                    clients.min,
                    humantime::format_duration(clients.round_timeout)
                )));
            }
            let done = self.wait_for(round, &accepted, deadline).await?;
            missing = accepted
                .iter()
                .filter(|a| !done.contains(&a.task_id))
                .map(|a| a.party.clone())
                .collect();
            let (updates, _) = self.delivered(round);
            if updates >= clients.min || Instant::now() + Duration::from_secs(1) >= deadline {
                break;
            }
            tracing::warn!(
                round,
                updates,
                "quorum not reached yet; offering the task again"
            );
            self.shared.forget_undelivered(round);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut c = self.shared.lock_collect();
        let agg = c.aggregate.take();
        let updates = agg.as_ref().map(|a| a.updates()).unwrap_or(0);
        if updates < clients.min {
            return Err(Failure::Fail(format!(
                "round {round}: quorum not met: {updates} update(s) received from {accepted_total} accepted task(s), clients.min is {}; no update from {} within clients.round_timeout {}",
                clients.min,
                missing.join(", "),
                humantime::format_duration(clients.round_timeout)
            )));
        }
        let train_loss = if c.train_samples > 0 {
            c.train_loss_sum / c.train_samples as f64
        } else {
            f64::NAN
        };
        drop(c);
        let new_global = agg
            .ok_or_else(|| Failure::Fail("aggregate vanished".into()))?
            .apply(&global)
            .map_err(|e| Failure::Fail(format!("round {round}: aggregation failed: {e}")))?;
        self.shared.set_global(new_global);
        Ok((updates, train_loss))
    }

    /// Federated evaluation of the new global model on the parties' held-out data.
    async fn evaluate_round(&self, round: u32) -> Result<EvalSum, Failure> {
        {
            let mut c = self.shared.lock_collect();
            c.tickets.clear();
            c.eval = EvalSum::default();
        }
        let deadline = Instant::now() + self.spec.clients.round_timeout;
        // Evaluate on every party that holds the dataset (up to a bound):
        // evaluation is cheap and covers the whole held-out data.
        let parties = {
            let mut c = self.clients.selector.clone();
            c.describe_dataset(pb::DescribeDatasetRequest {
                name: self.spec.data.dataset.clone(),
            })
            .await
            .map(|s| s.into_inner().parties)
            .unwrap_or(self.spec.clients.per_round)
        };
        let accepted = self
            .offer_until(
                round,
                pb::TaskKind::Evaluate,
                parties.clamp(1, 1000),
                1,
                deadline,
                Vec::new(),
            )
            .await?;
        if accepted.is_empty() {
            tracing::warn!(round, "no party accepted the evaluation");
            return Ok(EvalSum::default());
        }
        self.wait_for(round, &accepted, deadline).await?;
        Ok(self.shared.lock_collect().eval.clone())
    }

    /// Offers tasks until `want` parties accepted, or at least `min` did and no
    /// more are available, or the deadline passes.
    async fn offer_until(
        &self,
        round: u32,
        kind: pb::TaskKind,
        want: u32,
        min: u32,
        deadline: Instant,
        exclude: Vec<String>,
    ) -> Result<Vec<pb::AcceptedTask>, Failure> {
        let mut accepted: Vec<pb::AcceptedTask> = Vec::new();
        let mut last_refusals: HashMap<String, String> = HashMap::new();
        loop {
            if let Some(r) = self.stop_reason() {
                return Err(Failure::Stopped(r));
            }
            let need = want.saturating_sub(accepted.len() as u32);
            if need == 0 {
                break;
            }
            // Mint the tokens first, so a party that is quick to call finds them.
            let tokens: Vec<String> = (0..need).map(|_| cohort_core::random_token(32)).collect();
            self.shared.bind(tokens.iter().map(|t| {
                (
                    t.clone(),
                    Ticket {
                        party: String::new(),
                        task_id: String::new(),
                        kind,
                        round,
                        samples_cap: 0,
                        state: TicketState::Issued,
                    },
                )
            }));
            let template = pb::Task {
                spec_json: self.spec.to_json(),
                deadline_ms: cohort_runtime::now_ms()
                    + (deadline - Instant::now()).as_millis() as i64,
                ..Default::default()
            };
            let req = pb::OfferTasksRequest {
                job_id: self.job_id.to_string(),
                round,
                kind: kind as i32,
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
            };
            let mut c = self.clients.selector.clone();
            match c.offer_tasks(req).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    self.shared.forget_unbound(&tokens, &resp.accepted);
                    self.shared.bind(resp.accepted.iter().map(|a| {
                        (
                            a.task_token.clone(),
                            Ticket {
                                party: a.party.clone(),
                                task_id: a.task_id.clone(),
                                kind,
                                round,
                                samples_cap: a.samples,
                                state: TicketState::Issued,
                            },
                        )
                    }));
                    accepted.extend(resp.accepted);
                    last_refusals = resp.refused;
                }
                Err(s) => {
                    self.shared.forget_unbound(&tokens, &[]);
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

    /// Updates folded so far this round, and the parties that sent them.
    fn delivered(&self, round: u32) -> (u32, Vec<String>) {
        let c = self.shared.lock_collect();
        let parties: Vec<String> = c
            .tickets
            .values()
            .filter(|t| t.round == round && t.state == TicketState::Done)
            .map(|t| t.party.clone())
            .collect();
        (parties.len() as u32, parties)
    }

    /// Waits until every accepted task delivered or ended, or the deadline.
    /// Returns the ids of tasks that delivered.
    async fn wait_for(
        &self,
        round: u32,
        accepted: &[pb::AcceptedTask],
        deadline: Instant,
    ) -> Result<Vec<String>, Failure> {
        let ids: Vec<String> = accepted.iter().map(|a| a.task_id.clone()).collect();
        loop {
            if let Some(r) = self.stop_reason() {
                return Err(Failure::Stopped(r));
            }
            let delivered: Vec<String> = {
                let c = self.shared.lock_collect();
                c.tickets
                    .values()
                    .filter(|t| t.round == round && t.state == TicketState::Done)
                    .map(|t| t.task_id.clone())
                    .collect()
            };
            let pending: Vec<&String> = ids.iter().filter(|id| !delivered.contains(id)).collect();
            if pending.is_empty() || Instant::now() >= deadline {
                return Ok(delivered);
            }
            // Tasks whose party left or whose executor failed will not deliver.
            let mut c = self.clients.selector.clone();
            if let Ok(states) = c
                .task_states(pb::TaskStatesRequest {
                    task_ids: pending.iter().map(|s| s.to_string()).collect(),
                })
                .await
            {
                let phases = states.into_inner().phases;
                let in_flight: Vec<String> = {
                    let c = self.shared.lock_collect();
                    c.tickets
                        .values()
                        .filter(|t| t.state == TicketState::InFlight)
                        .map(|t| t.task_id.clone())
                        .collect()
                };
                let all_dead = pending.iter().all(|id| {
                    !in_flight.contains(id)
                        && matches!(
                            phases
                                .get(*id)
                                .and_then(|p| pb::TaskPhase::try_from(*p).ok()),
                            Some(
                                pb::TaskPhase::Failed
                                    | pb::TaskPhase::Cancelled
                                    | pb::TaskPhase::Succeeded
                            )
                        )
                });
                if all_dead {
                    // A task that reported success may still be uploading: give it a moment.
                    tokio::time::sleep(TASK_POLL).await;
                    let c = self.shared.lock_collect();
                    return Ok(c
                        .tickets
                        .values()
                        .filter(|t| t.round == round && t.state == TicketState::Done)
                        .map(|t| t.task_id.clone())
                        .collect());
                }
            }
            let wait = TASK_POLL.min(deadline.saturating_duration_since(Instant::now()));
            let _ = tokio::time::timeout(wait, self.shared.progress.notified()).await;
        }
    }

    /// Stores the round's global model as a new version of the job's model.
    async fn checkpoint(
        &self,
        round: u32,
        parent: u32,
        metrics: &pb::Metrics,
    ) -> Result<u32, Failure> {
        let global = self.shared.global();
        let bytes = to_safetensors(&global)
            .map_err(|e| Failure::Fail(format!("cannot encode the model: {e}")))?;
        let header = pb::UploadVersionRequest {
            part: Some(pb::upload_version_request::Part::Header(pb::UploadHeader {
                name: self.model_name.clone(),
                namespace: self.spec.namespace.clone(),
                lineage: Some(pb::Lineage {
                    job_id: self.job_id.to_string(),
                    round,
                    parent_version: parent,
                }),
                metrics: Some(*metrics),
            })),
        };
        let bytes = bytes::Bytes::from(bytes);
        let version = retry_unavailable("upload model", SCHEDULER_PATIENCE, || {
            let mut c = self.clients.models.clone();
            let mut parts = vec![header.clone()];
            let mut offset = 0;
            while offset < bytes.len() {
                let end = (offset + cohort_fl::CHUNK_BYTES).min(bytes.len());
                parts.push(pb::UploadVersionRequest {
                    part: Some(pb::upload_version_request::Part::Data(
                        bytes[offset..end].to_vec(),
                    )),
                });
                offset = end;
            }
            async move { c.upload_version(futures::stream::iter(parts)).await }
        })
        .await
        .map_err(|s| unavailable("cannot store the round's model", s))?
        .into_inner();
        Ok(version.version)
    }
}

/// A stable seed per job so a relaunched coordinator initialises identically.
fn seed_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
