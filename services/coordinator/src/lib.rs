//! coordinator: runs one job's rounds. Selects a cohort through
//! client-selector, serves the global model, folds updates into a streaming
//! FedAvg aggregate with bounded weights and norms, runs federated evaluation,
//! stores each round's model in model-manager (as a member of the job's
//! namespace) and reports progress, failures and their reasons to job-scheduler.
//!
//! Owns no store: its checkpoint is the last round job-scheduler recorded with
//! the model version model-manager holds. Talks to other services over gRPC only.
//! `round_state` holds the round's rules and knows no gRPC; `round_service` is the
//! edge parties call; `rounds` drives the job.

mod metrics;
mod privacy;
pub mod round_service;
pub mod round_state;
mod rounds;
pub mod secagg;
mod secagg_service;
mod selection;
mod staging;

use std::time::Duration;

use anyhow::Context;
use cohort_core::{JobId, JobSpec};
use cohort_proto::v1 as pb;
use cohort_runtime::Services;
use cohort_runtime::{Listener, ServiceArgs, channel, retry_unavailable};

use crate::round_service::{ControlApi, RoundApi};
use crate::round_state::RoundState;
use crate::rounds::{Clients, JobRun, Outcome};
use crate::secagg::SecAgg;
use crate::secagg_service::SecAggApi;

#[derive(Debug, clap::Parser)]
#[command(name = "coordinator", about = "Cohort coordinator for one job")]
pub struct Args {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The job to run.
    #[arg(long, env = "COHORT_JOB_ID")]
    pub job_id: String,
    /// The job's spec as job-scheduler stored it (JSON; the launcher writes it, on
    /// Kubernetes into the job's ConfigMap). Read before anything is contacted and checked
    /// against job-scheduler's copy: a coordinator never runs another spec than the stored one.
    #[arg(long, env = "COHORT_JOB_SPEC")]
    pub job_spec: Option<std::path::PathBuf>,
    #[arg(long, env = "COHORT_JOB_SCHEDULER")]
    pub job_scheduler: String,
    #[arg(long, env = "COHORT_MODEL_MANAGER")]
    pub model_manager: String,
    #[arg(long, env = "COHORT_CLIENT_SELECTOR")]
    pub client_selector: String,
    /// Address parties' traffic reaches this coordinator at (default: the bound address).
    #[arg(long, env = "COHORT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Updates received at once; each holds one model's worth of memory.
    #[arg(long, env = "COHORT_MAX_CONCURRENT_UPLOADS", default_value_t = 4)]
    pub max_concurrent_uploads: usize,
    /// An update upload or model fetch that moves nothing for this long is dropped (the
    /// party may try again, a few times per task).
    #[arg(long, env = "COHORT_UPLOAD_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upload_idle_timeout: Duration,
    /// How long model-manager may refuse a round's model as unavailable before the job fails
    /// with that cause.
    #[arg(long, env = "COHORT_STORAGE_PATIENCE", default_value = "2m", value_parser = humantime::parse_duration)]
    pub storage_patience: Duration,
    /// For tests only: copy every masked update received under secure aggregation into this
    /// directory (`round-R-PARTY.ring32`), to show what the coordinator sees. Off by default.
    #[arg(long, env = "COHORT_SECAGG_TAP_DIR")]
    pub secagg_tap_dir: Option<std::path::PathBuf>,
    /// Mutual TLS with the other services. With it, every round call must
    /// name its party (the proxy sets it from the party's certificate).
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
}

/// How long to keep retrying job-scheduler while it restarts.
const SCHEDULER_PATIENCE: Duration = Duration::from_secs(120);

/// Cancels the job's tasks on the parties and reports its end to job-scheduler.
async fn finish(clients: &Clients, job_id: &JobId, state: pb::JobState, reason: &str) {
    let mut c = clients.selector.clone();
    let _ = c
        .cancel_job_tasks(pb::CancelJobTasksRequest {
            job_id: job_id.to_string(),
            reason: reason.to_string(),
        })
        .await;
    let res = retry_unavailable("finish job", SCHEDULER_PATIENCE, || {
        let mut c = clients.scheduler.clone();
        let req = pb::FinishJobRequest {
            job_id: job_id.to_string(),
            state: state as i32,
            reason: reason.to_string(),
        };
        async move { c.finish_job(req).await }
    })
    .await;
    if let Err(s) = res {
        tracing::error!(job = %job_id, status = %s.message(), "cannot report the job's end");
    }
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let job_id = JobId::parse(&self.job_id).context("--job-id")?;
        let given_spec = match &self.job_spec {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--job-spec: {}", path.display()))?;
                Some(
                    JobSpec::from_json(&text)
                        .with_context(|| format!("--job-spec: {}", path.display()))?,
                )
            }
            None => None,
        };
        let tls = self.tls.load().context("TLS")?;
        let scheduler = pb::job_control_client::JobControlClient::new(
            channel(&self.job_scheduler, tls.as_ref()).context("--job-scheduler")?,
        );
        let clients = Clients {
            scheduler,
            models: pb::models_client::ModelsClient::new(
                channel(&self.model_manager, tls.as_ref()).context("--model-manager")?,
            ),
            selector: pb::client_selector_client::ClientSelectorClient::new(
                channel(&self.client_selector, tls.as_ref()).context("--client-selector")?,
            ),
        };
        let assignment = retry_unavailable("get assignment", SCHEDULER_PATIENCE, || {
            let mut c = clients.scheduler.clone();
            let id = job_id.to_string();
            async move {
                c.get_assignment(pb::GetAssignmentRequest { job_id: id })
                    .await
            }
        })
        .await
        .context("cannot get the job's assignment from job-scheduler")?
        .into_inner();
        if self.upload_idle_timeout < Duration::from_secs(1) {
            anyhow::bail!("--upload-idle-timeout: must be at least 1s");
        }
        let job = assignment.job.clone().context("assignment without a job")?;
        let spec = match JobSpec::from_json(&job.spec_json) {
            Ok(spec) => spec,
            Err(e) => {
                // Deterministic: a relaunch would fail the same way.
                let reason = format!("the stored job spec is invalid: {e}");
                finish(&clients, &job_id, pb::JobState::Failed, &reason).await;
                anyhow::bail!(reason);
            }
        };
        if given_spec.as_ref().is_some_and(|given| given != &spec) {
            anyhow::bail!(
                "--job-spec: the spec differs from job-scheduler's for job {job_id} (a stale file?)"
            );
        }

        let require_party = tls.is_some();
        metrics::set_job(&job_id.to_string());
        let listener = Listener::bind_service(&self.service).await?.with_tls(tls);
        let endpoint = self
            .advertise
            .clone()
            .unwrap_or_else(|| cohort_runtime::advertised(listener.local_addr()));
        let state = RoundState::new(self.max_concurrent_uploads);
        let secagg = spec.secure_aggregation().map(|settings| {
            SecAgg::new(
                job_id.as_str(),
                settings,
                state.clone(),
                std::env::temp_dir(),
                self.secagg_tap_dir.clone(),
            )
        });
        let mut routes = Services::new(pb::round_server::RoundServer::new(RoundApi {
            state: state.clone(),
            require_party,
            idle_timeout: self.upload_idle_timeout,
            staging_dir: std::env::temp_dir(),
            compression: spec.wire_compression(),
        }))
        .add_service(
            pb::coordinator_control_server::CoordinatorControlServer::new(ControlApi {
                state: state.clone(),
            }),
        );
        if let Some(secagg) = &secagg {
            routes = routes.add_service(
                pb::secure_aggregation_server::SecureAggregationServer::new(SecAggApi {
                    secagg: secagg.clone(),
                    state: state.clone(),
                    require_party,
                    idle_timeout: self.upload_idle_timeout,
                })
                .max_decoding_message_size(cohort_fl::CHUNK_BYTES * 4),
            );
        }
        let (server_stop_tx, server_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ready_file = self.service.ready_file.clone();
        let server = tokio::spawn(async move {
            listener
                .serve("coordinator", routes, ready_file.as_deref(), async {
                    let _ = server_stop_rx.await;
                })
                .await
        });

        let run = JobRun {
            job_id: job_id.clone(),
            spec,
            clients: clients.clone(),
            state: state.clone(),
            endpoint: endpoint.clone(),
            max_model_parameters: assignment.max_model_parameters,
            storage_patience: self.storage_patience,
            strategy: Default::default(),
            secagg,
        };
        let outcome = tokio::select! {
            outcome = run.run(assignment) => Some(outcome),
            _ = cohort_runtime::shutdown_signal() => None,
        };
        match outcome {
            // Terminated: the job stays as it is; job-scheduler relaunches a
            // coordinator that resumes from the last recorded round.
            None => {
                tracing::info!(job = %job_id, "terminated; the job resumes from its last round")
            }
            Some(Outcome::Abandon(why)) => {
                tracing::warn!(job = %job_id, %why, "giving up the job without finishing it")
            }
            Some(Outcome::Finish(state, reason)) => {
                tracing::info!(job = %job_id, state = ?state, %reason, "job finished");
                finish(&clients, &job_id, state, &reason).await;
            }
        }
        let _ = server_stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every setting a coordinator reads from its environment is accounted for: given as a
    /// flag by the launchers, one of the tunables a local coordinator takes from
    /// job-scheduler's environment, or one it must not take from there. A new setting has to
    /// be placed in one of these before this passes.
    #[test]
    fn every_environment_setting_is_a_flag_a_tunable_or_withheld() {
        let by_flags = [
            "COHORT_JOB_ID",
            "COHORT_JOB_SPEC",
            "COHORT_JOB_SCHEDULER",
            "COHORT_MODEL_MANAGER",
            "COHORT_CLIENT_SELECTOR",
            "COHORT_LOG_FORMAT",
            "COHORT_TLS_CERT",
            "COHORT_TLS_KEY",
            "COHORT_TLS_CA",
            // The local launcher's, with --coordinator-metrics-dir.
            "COHORT_METRICS_LISTEN",
            "COHORT_METRICS_TARGET_FILE",
        ];
        // job-scheduler's own: its port, files and database are not the coordinator's.
        let withheld = [
            "COHORT_LISTEN",
            "COHORT_READY_FILE",
            "COHORT_HEALTH_LISTEN",
            "COHORT_ADVERTISE",
        ];
        let tunables = cohort_runtime::launcher::COORDINATOR_TUNABLES;
        for arg in super::Args::command().get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let env = env.to_string_lossy();
            assert!(
                by_flags.contains(&env.as_ref())
                    || withheld.contains(&env.as_ref())
                    || tunables.contains(&env.as_ref()),
                "--{}: {env} is neither given as a flag, a tunable nor withheld",
                arg.get_id()
            );
        }
        for tunable in tunables {
            assert!(
                super::Args::command()
                    .get_arguments()
                    .any(|a| a.get_env().is_some_and(|e| e == tunable)),
                "{tunable} is no coordinator setting"
            );
        }
    }
}
