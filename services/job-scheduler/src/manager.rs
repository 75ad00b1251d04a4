//! The job state machine: every transition goes through here, is checked
//! against `JobState::can_become`, persisted with an event, and announced to
//! watchers. Also what a job may be (its model's size) and hold (its log's
//! length).

use std::sync::Arc;
use std::time::Duration;

use cohort_core::HasKind;
use cohort_core::spec::Arch;
use cohort_core::{ErrorKind, JobId, JobSpec, JobState, SpecError};
use cohort_runtime::launcher::{CoordinatorExit, Launcher};
use cohort_runtime::now_ms;
use cohort_store::StoreError;
use cohort_store::jobs::{JobNote, JobRecord, JobStore, RoundRecord};
use tokio::sync::{Notify, broadcast};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("job {id} is {state}: {message}")]
    WrongState {
        id: JobId,
        state: JobState,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl HasKind for JobError {
    fn kind(&self) -> ErrorKind {
        match self {
            JobError::Spec(_) | JobError::Invalid(_) => ErrorKind::InvalidArgument,
            JobError::Store(e) => e.kind(),
            JobError::WrongState { .. } => ErrorKind::FailedPrecondition,
        }
    }
}

pub type Result<T> = std::result::Result<T, JobError>;

/// Settings of the state machine.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Coordinator launches per job before it is failed.
    pub max_launch_attempts: u32,
    /// How long a stopping coordinator gets before it is killed.
    pub stop_grace: Duration,
    /// Mutual TLS for calls to coordinators.
    pub tls: Option<cohort_runtime::Tls>,
    /// Log entries (not state changes) a job keeps; later ones are dropped.
    pub max_job_log_entries: u64,
    /// The most parameters a job's model may have.
    pub max_model_parameters: u64,
}

/// Refuses a spec whose model has more than `max` parameters even on the
/// smallest data it could meet (1 feature, or a 2×2 image for cnn, and 2
/// classes). The coordinator checks the exact count once it knows the data.
pub fn check_model_size(spec: &JobSpec, max: u64) -> std::result::Result<(), SpecError> {
    let (field, features, shape) = match spec.model.arch {
        Arch::Logreg => ("model.arch", 1, "1 feature"),
        Arch::Mlp => ("model.hidden", 1, "1 feature"),
        Arch::Cnn => ("model.arch", 4, "a 2×2 image"),
    };
    let count = spec.model.parameter_count(features, 2);
    if count > max {
        return Err(SpecError::new(
            field,
            format!(
                "the model has at least {count} parameters (with the smallest data: {shape} \
                 and 2 classes); this server allows at most {max}"
            ),
        ));
    }
    Ok(())
}

pub struct JobManager {
    store: Arc<dyn JobStore>,
    launcher: Arc<dyn Launcher>,
    config: ManagerConfig,
    changes: broadcast::Sender<JobId>,
    wake: Notify,
}

impl JobManager {
    pub fn new(
        store: Arc<dyn JobStore>,
        launcher: Arc<dyn Launcher>,
        config: ManagerConfig,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Self {
            store,
            launcher,
            config,
            changes,
            wake: Notify::new(),
        })
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobId> {
        self.changes.subscribe()
    }

    fn announce(&self, id: &JobId) {
        let _ = self.changes.send(id.clone());
    }

    /// Stores a new job (QUEUED). The spec is checked again here: callers may
    /// have built it rather than parsed it.
    pub async fn create(&self, spec: JobSpec) -> Result<JobRecord> {
        let id = JobId::generate(&spec.name);
        self.insert(spec, id).await
    }

    /// Creates the job under `id` (from [`JobId::derived`]) unless it exists: a create
    /// retried after a crash finds the job the first try made. Returns the job and whether
    /// this call created it. A job of that id with another name or namespace is a conflict.
    pub async fn create_once(&self, spec: JobSpec, id: JobId) -> Result<(JobRecord, bool)> {
        let (name, namespace) = (spec.name.clone(), spec.namespace.clone());
        match self.insert(spec, id.clone()).await {
            Ok(job) => Ok((job, true)),
            Err(JobError::Store(StoreError::Conflict(e))) => {
                let job = self.store.get_job(&id).await?;
                if job.name == name && job.namespace == namespace {
                    Ok((job, false))
                } else {
                    Err(JobError::Store(StoreError::Conflict(e)))
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn insert(&self, spec: JobSpec, id: JobId) -> Result<JobRecord> {
        spec.validate()?;
        check_model_size(&spec, self.config.max_model_parameters)?;
        let now = now_ms();
        let job = JobRecord {
            id,
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            spec_json: spec.to_json(),
            state: JobState::Queued,
            reason: "created".to_string(),
            rounds_total: spec.rounds,
            rounds_completed: 0,
            coordinator_endpoint: None,
            coordinator_pid: None,
            launch_attempts: 0,
            created_at_ms: now,
            updated_at_ms: now,
            version: 1,
        };
        self.store.insert_job(&job, "created").await?;
        tracing::info!(job = %job.id, "job created");
        self.announce(&job.id);
        self.wake.notify_one();
        Ok(job)
    }

    /// Read-modify-write with retries on concurrent change. `change` returns
    /// Ok(None) to leave the job as it is.
    async fn modify<F>(&self, id: &JobId, mut change: F) -> Result<JobRecord>
    where
        F: FnMut(&JobRecord) -> Result<Option<JobRecord>>,
    {
        for _ in 0..16 {
            let job = self.store.get_job(id).await?;
            let Some(next) = change(&job)? else {
                return Ok(job);
            };
            if next.state != job.state && !job.state.can_become(next.state) {
                return Err(JobError::WrongState {
                    id: id.clone(),
                    state: job.state,
                    message: format!("cannot become {}", next.state),
                });
            }
            match self.store.update_job(&next, now_ms()).await {
                Ok(stored) => {
                    if stored.state != job.state {
                        tracing::info!(job = %id, from = %job.state, to = %stored.state, reason = %stored.reason, "job transition");
                    }
                    self.announce(id);
                    return Ok(stored);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(JobError::Store(StoreError::Conflict(format!(
            "job {id} kept changing; try again"
        ))))
    }

    /// Launches coordinators for queued jobs. Called by the scheduling loop.
    pub async fn launch_queued(&self) -> Result<()> {
        for job in self.store.jobs_in_states(&[JobState::Queued]).await? {
            self.launch(&job.id, "launching coordinator").await?;
        }
        Ok(())
    }

    async fn launch(&self, id: &JobId, why: &str) -> Result<()> {
        let max = self.config.max_launch_attempts;
        let job = self
            .modify(id, |j| {
                if !matches!(
                    j.state,
                    JobState::Queued | JobState::Starting | JobState::Running
                ) {
                    return Ok(None);
                }
                let mut n = j.clone();
                n.launch_attempts += 1;
                if n.launch_attempts > max {
                    n.state = JobState::Failed;
                    n.reason = format!("{why}: gave up after {max} coordinator launches");
                } else {
                    n.state = JobState::Starting;
                    n.reason = format!("{why} (attempt {} of {max})", n.launch_attempts);
                }
                n.coordinator_endpoint = None;
                n.coordinator_pid = None;
                Ok(Some(n))
            })
            .await?;
        if job.state != JobState::Starting {
            return Ok(());
        }
        match self.launcher.launch(id, &job.spec_json).await {
            Ok(pid) => {
                self.modify(id, |j| {
                    if j.state != JobState::Starting || j.coordinator_pid.is_some() {
                        return Ok(None);
                    }
                    let mut n = j.clone();
                    n.coordinator_pid = pid;
                    Ok(Some(n))
                })
                .await?;
            }
            Err(e) => {
                tracing::error!(job = %id, error = %e, "cannot launch coordinator");
                let reason = format!("cannot launch coordinator: {e}");
                self.modify(id, |j| {
                    let mut n = j.clone();
                    n.state = JobState::Failed;
                    n.reason = reason.clone();
                    Ok(j.state.can_become(JobState::Failed).then_some(n))
                })
                .await?;
            }
        }
        Ok(())
    }

    /// A coordinator process ended; relaunch it if its job still needs one.
    pub async fn coordinator_exited(&self, exit: CoordinatorExit) -> Result<()> {
        let job = match self.store.get_job(&exit.job_id).await {
            Ok(j) => j,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match job.state {
            JobState::Stopping => {
                self.modify(&job.id, |j| {
                    let mut n = j.clone();
                    n.state = JobState::Stopped;
                    n.reason = format!("stopped ({})", exit.description);
                    n.coordinator_endpoint = None;
                    Ok((j.state == JobState::Stopping).then_some(n))
                })
                .await?;
            }
            JobState::Starting | JobState::Running => {
                tracing::warn!(job = %job.id, how = %exit.description, "coordinator died");
                let why = format!(
                    "coordinator {}; relaunching from round {}",
                    exit.description,
                    job.rounds_completed + 1
                );
                self.launch(&job.id, &why).await?;
            }
            _ => {}
        }
        Ok(())
    }

    pub async fn coordinator_ready(
        &self,
        id: &JobId,
        endpoint: &str,
        pid: u32,
    ) -> Result<JobRecord> {
        let job = self
            .modify(id, |j| {
                if j.state != JobState::Starting {
                    return Err(JobError::WrongState {
                        id: id.clone(),
                        state: j.state,
                        message: "no coordinator is expected".to_string(),
                    });
                }
                let mut n = j.clone();
                n.state = JobState::Running;
                n.reason = if j.rounds_completed == 0 {
                    "coordinator ready".to_string()
                } else {
                    format!(
                        "coordinator ready; resuming at round {}",
                        j.rounds_completed + 1
                    )
                };
                n.coordinator_endpoint = Some(endpoint.to_string());
                n.coordinator_pid = Some(pid).filter(|p| *p > 0).or(j.coordinator_pid);
                Ok(Some(n))
            })
            .await?;
        Ok(job)
    }

    pub async fn report_round(&self, id: &JobId, round: &RoundRecord) -> Result<JobRecord> {
        let job = self.store.get_job(id).await?;
        if !job.state.has_coordinator() {
            return Err(JobError::WrongState {
                id: id.clone(),
                state: job.state,
                message: "rounds can no longer be reported".to_string(),
            });
        }
        if round.round == 0 || round.round > job.rounds_total {
            return Err(JobError::Invalid(format!(
                "round.round {} is outside 1..={}",
                round.round, job.rounds_total
            )));
        }
        let job = self.store.record_round(id, round, now_ms()).await?;
        self.announce(id);
        Ok(job)
    }

    /// Appends `notes` to the job's log, as many as its bound leaves room
    /// for; returns how many were kept.
    pub async fn record_notes(&self, id: &JobId, notes: &[JobNote]) -> Result<u32> {
        let kept = self
            .store
            .append_notes(id, notes, self.config.max_job_log_entries, now_ms())
            .await?;
        let (offered, max) = (notes.len(), self.config.max_job_log_entries);
        // Once per job (the call that fills the log), not on every call after.
        if kept > 0 && (kept as usize) < offered {
            tracing::warn!(job = %id, max, "the job's log is full; further entries are dropped");
        } else if kept == 0 && offered > 0 {
            tracing::debug!(job = %id, offered, "the job's log is full; entries dropped");
        }
        Ok(kept)
    }

    pub fn max_model_parameters(&self) -> u64 {
        self.config.max_model_parameters
    }

    pub async fn finish(&self, id: &JobId, state: JobState, reason: &str) -> Result<JobRecord> {
        if !state.is_terminal() {
            return Err(JobError::Invalid(format!(
                "state {state} is not a final state"
            )));
        }
        self.modify(id, |j| {
            if j.state == state {
                return Ok(None);
            }
            let mut n = j.clone();
            // A job being stopped that completes anyway keeps its real outcome;
            // one that was asked to stop ends STOPPED.
            n.state = state;
            n.reason = reason.to_string();
            n.coordinator_endpoint = None;
            Ok(Some(n))
        })
        .await
    }

    pub async fn stop(self: &Arc<Self>, id: &JobId, reason: &str) -> Result<JobRecord> {
        let reason = if reason.is_empty() {
            "stopped by user"
        } else {
            reason
        };
        let job = self
            .modify(id, |j| {
                let mut n = j.clone();
                n.reason = reason.to_string();
                n.state = match j.state {
                    JobState::Queued => JobState::Stopped,
                    JobState::Starting | JobState::Running => JobState::Stopping,
                    _ => return Ok(None),
                };
                Ok(Some(n))
            })
            .await?;
        if job.state == JobState::Stopping {
            let this = self.clone();
            let id = id.clone();
            let endpoint = job.coordinator_endpoint.clone();
            let reason = reason.to_string();
            tokio::spawn(async move { this.drive_stop(id, endpoint, reason).await });
        }
        Ok(job)
    }

    /// Asks the coordinator to stop; kills it if it does not end in time.
    async fn drive_stop(&self, id: JobId, endpoint: Option<String>, reason: String) {
        if let Some(endpoint) = endpoint
            && let Err(e) =
                ask_coordinator_to_stop(&endpoint, &reason, self.config.tls.as_ref()).await
        {
            tracing::warn!(job = %id, error = %e, "coordinator did not take the stop request");
        }
        let deadline = tokio::time::Instant::now() + self.config.stop_grace;
        while tokio::time::Instant::now() < deadline {
            match self.store.get_job(&id).await {
                Ok(j) if j.state != JobState::Stopping => return,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tracing::warn!(job = %id, "coordinator did not stop in time; terminating it");
        self.launcher.stop(&id, Duration::from_secs(2)).await;
        // The launcher reports the exit; if the process was already gone, finish here.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = self
            .modify(&id, |j| {
                let mut n = j.clone();
                n.state = JobState::Stopped;
                n.reason = format!("{reason} (coordinator terminated)");
                n.coordinator_endpoint = None;
                Ok((j.state == JobState::Stopping).then_some(n))
            })
            .await;
    }

    pub async fn delete(&self, id: &JobId) -> Result<()> {
        self.modify(id, |j| {
            if !j.state.is_terminal() && j.state != JobState::Deleting {
                return Err(JobError::WrongState {
                    id: id.clone(),
                    state: j.state,
                    message: "stop it before deleting it".to_string(),
                });
            }
            let mut n = j.clone();
            n.state = JobState::Deleting;
            n.reason = "deleted by user".to_string();
            Ok((j.state != JobState::Deleting).then_some(n))
        })
        .await?;
        self.store.delete_job(id).await?;
        self.announce(id);
        Ok(())
    }

    /// After a restart: adopt coordinators that still run, relaunch the rest,
    /// finish interrupted deletes.
    pub async fn recover(&self) -> Result<()> {
        let jobs = self
            .store
            .jobs_in_states(&[
                JobState::Starting,
                JobState::Running,
                JobState::Stopping,
                JobState::Deleting,
            ])
            .await?;
        for job in jobs {
            if job.state == JobState::Deleting {
                self.store.delete_job(&job.id).await?;
                continue;
            }
            if self.launcher.adopt(&job.id, job.coordinator_pid).await {
                continue;
            }
            self.coordinator_exited(CoordinatorExit {
                job_id: job.id.clone(),
                description: "was gone when job-scheduler restarted".to_string(),
            })
            .await?;
        }
        Ok(())
    }

    /// Launches queued jobs as they come; also sweeps periodically so nothing
    /// is missed after a store hiccup.
    pub async fn run_scheduling_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.launch_queued().await {
                tracing::error!(error = %e, "scheduling pass failed");
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
        }
    }
}

async fn ask_coordinator_to_stop(
    endpoint: &str,
    reason: &str,
    tls: Option<&cohort_runtime::Tls>,
) -> std::result::Result<(), String> {
    use cohort_proto::v1::{
        StopCoordinatorRequest, coordinator_control_client::CoordinatorControlClient,
    };
    let channel = cohort_runtime::channel(endpoint, tls).map_err(|e| e.to_string())?;
    let mut client = CoordinatorControlClient::new(channel);
    let mut req = tonic::Request::new(StopCoordinatorRequest {
        reason: reason.to_string(),
    });
    req.set_timeout(Duration::from_secs(5));
    client
        .stop(req)
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}
