//! The job state machine: every transition goes through here, is checked
//! against `JobState::can_become`, persisted with an event, and announced to
//! watchers. Also what a job may be (its model's size) and hold (its log's
//! length).
//!
//! Coordinators are supervised level-triggered ([`JobManager::supervise`]): one
//! task launches queued jobs, handles the exits the launcher reports (keeping
//! those the store could not take, to try again), and every reconcile interval
//! compares each job that needs a coordinator with what the launcher runs, so a
//! lost exit cannot strand a job. The launch budget counts launches since the
//! job's last completed round, relaunches back off exponentially, and a
//! coordinator stopped because job-scheduler shuts down is neither relaunched
//! nor counted ([`JobManager::shut_down`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_core::HasKind;
use cohort_core::spec::Arch;
use cohort_core::{ErrorKind, JobId, JobSpec, JobState, SpecError};
use cohort_runtime::launcher::{CoordinatorExit, Launcher};
use cohort_runtime::now_ms;
use cohort_store::StoreError;
use cohort_store::jobs::{JobNote, JobRecord, JobStore, RoundRecord};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;

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
    /// Coordinator launches in a row without a completed round before the job is failed.
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

/// How coordinators are supervised (see the module docs).
#[derive(Debug, Clone)]
pub struct SupervisionConfig {
    /// How often every job that needs a coordinator is checked against what the launcher
    /// runs: the longest a missed exit strands a job.
    pub reconcile_interval: Duration,
    /// The wait before the second launch in a row without a completed round; it doubles
    /// with each further one. The first launch after progress is immediate.
    pub relaunch_backoff: Duration,
    /// The longest wait before a relaunch.
    pub relaunch_backoff_max: Duration,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            reconcile_interval: Duration::from_secs(5),
            relaunch_backoff: Duration::from_secs(1),
            relaunch_backoff_max: Duration::from_secs(60),
        }
    }
}

impl SupervisionConfig {
    /// The wait before launch number `attempt` since the last completed round.
    pub fn backoff(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(attempt - 2).unwrap_or(u32::MAX);
        self.relaunch_backoff
            .saturating_mul(factor)
            .min(self.relaunch_backoff_max)
    }
}

/// What the supervisor has decided but not done yet. Locked briefly, never across an await.
#[derive(Default)]
struct Pending {
    /// Relaunches waiting out their backoff (already counted): when each is due.
    relaunches: BTreeMap<JobId, Instant>,
    /// Coordinator exits not handled yet (the store or the launcher did not answer):
    /// how each ended, and how often handling it failed.
    exits: BTreeMap<JobId, (String, u32)>,
}

/// Refuses a spec whose model has more than `max` parameters even on the
/// smallest data it could meet (1 feature, or a 2×2 image for cnn, and 2
/// classes). The coordinator checks the exact count once it knows the data.
pub fn check_model_size(spec: &JobSpec, max: u64) -> std::result::Result<(), SpecError> {
    let (field, features, shape) = match spec.model.arch {
        Arch::Logreg => ("model.arch", 1, Some("1 feature")),
        Arch::Mlp => ("model.hidden", 1, Some("1 feature")),
        Arch::Cnn => ("model.arch", 4, Some("a 2×2 image")),
        // Its size is its own, whatever the data.
        Arch::Synthetic => ("model.params", 1, None),
    };
    let count = spec.model.parameter_count(features, 2);
    if count > max {
        let size = match shape {
            Some(shape) => format!(
                "at least {count} parameters (with the smallest data: {shape} and 2 classes)"
            ),
            None => format!("{count} parameters"),
        };
        return Err(SpecError::new(
            field,
            format!("the model has {size}; this server allows at most {max}"),
        ));
    }
    Ok(())
}

pub struct JobManager {
    store: Arc<dyn JobStore>,
    launcher: Arc<dyn Launcher>,
    config: ManagerConfig,
    supervision: SupervisionConfig,
    changes: broadcast::Sender<JobId>,
    wake: Notify,
    pending: Mutex<Pending>,
    /// Held by whoever launches or handles exits (the supervisor, recovery, shutdown), so
    /// no two of them act on a job at once.
    acting: tokio::sync::Mutex<()>,
    /// Set when job-scheduler shuts down: nothing is launched or relaunched after.
    shutting_down: AtomicBool,
}

impl JobManager {
    pub fn new(
        store: Arc<dyn JobStore>,
        launcher: Arc<dyn Launcher>,
        config: ManagerConfig,
    ) -> Arc<Self> {
        Self::with_supervision(store, launcher, config, SupervisionConfig::default())
    }

    pub fn with_supervision(
        store: Arc<dyn JobStore>,
        launcher: Arc<dyn Launcher>,
        config: ManagerConfig,
        supervision: SupervisionConfig,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Self {
            store,
            launcher,
            config,
            supervision,
            changes,
            wake: Notify::new(),
            pending: Mutex::default(),
            acting: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
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

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Nothing panics while holding it; a poisoned lock still holds sound maps.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Supervises coordinators until job-scheduler shuts down: launches queued jobs,
    /// handles the exits `exits` reports, relaunches what has waited out its backoff, and
    /// every reconcile interval compares the jobs with the coordinators that run.
    pub async fn supervise(self: Arc<Self>, mut exits: mpsc::UnboundedReceiver<CoordinatorExit>) {
        let interval = self.supervision.reconcile_interval;
        let mut next_reconcile = Instant::now() + interval;
        let mut exits_open = true;
        loop {
            // Queued jobs and exits not handled yet are looked at every second.
            let mut wake_at = next_reconcile.min(Instant::now() + Duration::from_secs(1));
            if let Some(due) = self.pending().relaunches.values().min() {
                wake_at = wake_at.min(*due);
            }
            tokio::select! {
                exit = exits.recv(), if exits_open => match exit {
                    Some(exit) => self.note_exit(exit),
                    None => exits_open = false,
                },
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            while let Ok(exit) = exits.try_recv() {
                self.note_exit(exit);
            }
            if self.is_shutting_down() {
                return;
            }
            let _acting = self.acting.lock().await;
            if self.is_shutting_down() {
                return;
            }
            if let Err(e) = self.launch_queued().await {
                tracing::error!(error = %e, "scheduling pass failed");
            }
            self.handle_exits().await;
            self.relaunch_due().await;
            if Instant::now() >= next_reconcile {
                self.reconcile(
                    "is gone (found by job-scheduler's periodic check)",
                    Some(&mut exits),
                )
                .await;
                next_reconcile = Instant::now() + interval;
            }
        }
    }

    fn note_exit(&self, exit: CoordinatorExit) {
        self.pending()
            .exits
            .insert(exit.job_id, (exit.description, 0));
    }

    /// Launches coordinators for queued jobs.
    async fn launch_queued(&self) -> Result<()> {
        for job in self.store.jobs_in_states(&[JobState::Queued]).await? {
            if self.is_shutting_down() {
                break;
            }
            self.relaunch(&job.id, "launching coordinator").await?;
        }
        Ok(())
    }

    /// Handles the exits reported (or left from earlier passes); keeps those that cannot
    /// be handled now, to try again.
    async fn handle_exits(&self) {
        let exits: Vec<(JobId, String)> = self
            .pending()
            .exits
            .iter()
            .map(|(id, (how, _))| (id.clone(), how.clone()))
            .collect();
        for (id, how) in exits {
            if self.is_shutting_down() {
                return;
            }
            let outcome = self.handle_exit(&id, &how).await;
            let mut pending = self.pending();
            // A newer report of the same job waits for the next pass.
            if pending.exits.get(&id).is_none_or(|(h, _)| h != &how) {
                continue;
            }
            match outcome {
                Ok(true) => {
                    pending.exits.remove(&id);
                }
                Ok(false) => {}
                Err(e) => {
                    if let Some((_, failures)) = pending.exits.get_mut(&id) {
                        *failures += 1;
                        // The first failure, then one in 30: an outage is not a flood.
                        if *failures % 30 == 1 {
                            tracing::warn!(job = %id, how = %how, failures = *failures, error = %e,
                                "cannot handle coordinator exit yet; trying again");
                        }
                    }
                }
            }
        }
    }

    /// One coordinator exit. Ok(false): cannot tell yet whether the job still has a
    /// coordinator; try again later.
    async fn handle_exit(&self, id: &JobId, how: &str) -> Result<bool> {
        if self.pending().relaunches.contains_key(id) {
            return Ok(true); // its relaunch is decided already
        }
        match self.launcher.alive(id).await {
            // A later coordinator of the job runs: this exit is old news.
            Some(true) => return Ok(true),
            None => return Ok(false),
            Some(false) => {}
        }
        let job = match self.store.get_job(id).await {
            Ok(j) => j,
            Err(StoreError::NotFound { .. }) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        self.coordinator_gone(&job, how).await?;
        Ok(true)
    }

    /// The job's coordinator is gone (`how` says how it ended): a stopping job is
    /// stopped, a starting or running one relaunched.
    async fn coordinator_gone(&self, job: &JobRecord, how: &str) -> Result<()> {
        match job.state {
            JobState::Stopping => {
                self.pending().relaunches.remove(&job.id);
                self.modify(&job.id, |j| {
                    let mut n = j.clone();
                    n.state = JobState::Stopped;
                    n.reason = format!("stopped ({how})");
                    n.coordinator_endpoint = None;
                    Ok((j.state == JobState::Stopping).then_some(n))
                })
                .await?;
            }
            JobState::Starting | JobState::Running => {
                tracing::warn!(job = %job.id, how = %how, "coordinator died");
                let why = format!(
                    "coordinator {how}; relaunching from round {}",
                    job.rounds_completed + 1
                );
                self.relaunch(&job.id, &why).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Counts a launch of the job's coordinator and starts it now or, when launches
    /// without progress repeat, once its backoff has passed; past the budget the job
    /// fails instead. Every launch is in the job's log with its number.
    async fn relaunch(&self, id: &JobId, why: &str) -> Result<()> {
        let max = self.config.max_launch_attempts;
        let mut from = JobState::Queued;
        let mut delay = Duration::ZERO;
        let job = self
            .modify(id, |j| {
                if !matches!(
                    j.state,
                    JobState::Queued | JobState::Starting | JobState::Running
                ) {
                    return Ok(None);
                }
                from = j.state;
                let mut n = j.clone();
                n.launch_attempts = j.launch_attempts.saturating_add(1);
                n.coordinator_endpoint = None;
                n.coordinator_pid = None;
                if n.launch_attempts > max {
                    n.state = JobState::Failed;
                    n.reason = format!(
                        "{why}: gave up after {max} coordinator launches without a completed round"
                    );
                } else {
                    delay = self.supervision.backoff(n.launch_attempts);
                    n.state = JobState::Starting;
                    let after = if delay.is_zero() {
                        String::new()
                    } else {
                        format!(" in {}", humantime::format_duration(delay))
                    };
                    n.reason = format!("{why}{after} (attempt {} of {max})", n.launch_attempts);
                }
                Ok(Some(n))
            })
            .await?;
        if job.state != JobState::Starting {
            return Ok(());
        }
        if from == JobState::Starting {
            // No state change, so no event of its own: the relaunch goes in the log.
            let note = JobNote {
                kind: "note".to_string(),
                round: 0,
                party: String::new(),
                task_id: String::new(),
                message: job.reason.clone(),
            };
            if let Err(e) = self.record_notes(id, &[note]).await {
                tracing::warn!(job = %id, error = %e, "cannot log the relaunch");
            }
        }
        // Pending until started: a launch counted but not started is retried, never
        // counted again.
        self.pending()
            .relaunches
            .insert(id.clone(), Instant::now() + delay);
        if delay.is_zero() {
            self.start_pending(id).await;
        } else {
            tracing::info!(job = %id, delay = %humantime::format_duration(delay), "relaunch backs off");
        }
        Ok(())
    }

    /// Starts the relaunches whose backoff has passed.
    async fn relaunch_due(&self) {
        let now = Instant::now();
        let due: Vec<JobId> = self
            .pending()
            .relaunches
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if self.is_shutting_down() {
                return;
            }
            self.start_pending(&id).await;
        }
    }

    /// Starts the pending launch of the job; one that fails on the store stays pending
    /// for the next pass.
    async fn start_pending(&self, id: &JobId) {
        match self.start_coordinator(id).await {
            Ok(()) => {
                self.pending().relaunches.remove(id);
            }
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot launch coordinator yet; trying again")
            }
        }
    }

    /// Launches the coordinator of a job whose launch was counted (STARTING, none yet).
    async fn start_coordinator(&self, id: &JobId) -> Result<()> {
        let job = match self.store.get_job(id).await {
            Ok(j) => j,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if job.state != JobState::Starting || job.coordinator_pid.is_some() {
            return Ok(()); // stopped meanwhile, or launched already
        }
        if self.is_shutting_down() {
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

    /// Compares every job that needs a coordinator with what the launcher runs: adopts a
    /// coordinator of an earlier job-scheduler, and handles a missing one as an exit
    /// (`gone` says how, unless an exit reported earlier does). Also finishes interrupted
    /// deletes.
    async fn reconcile(
        &self,
        gone: &str,
        mut exits: Option<&mut mpsc::UnboundedReceiver<CoordinatorExit>>,
    ) {
        let jobs = match self
            .store
            .jobs_in_states(&[
                JobState::Starting,
                JobState::Running,
                JobState::Stopping,
                JobState::Deleting,
            ])
            .await
        {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, "reconcile pass: cannot list the jobs; trying again later");
                return;
            }
        };
        for job in jobs {
            if self.is_shutting_down() {
                return;
            }
            if job.state == JobState::Deleting {
                match self.store.delete_job(&job.id).await {
                    Ok(()) | Err(StoreError::NotFound { .. }) => self.announce(&job.id),
                    Err(e) => tracing::warn!(job = %job.id, error = %e, "cannot finish a delete"),
                }
                continue;
            }
            // A relaunch waiting out its backoff has no coordinator yet, by design.
            if job.state != JobState::Stopping && self.pending().relaunches.contains_key(&job.id) {
                continue;
            }
            match self.launcher.alive(&job.id).await {
                Some(true) | None => continue,
                Some(false) => {}
            }
            if self.launcher.adopt(&job.id, job.coordinator_pid).await {
                continue;
            }
            // A launcher reports an exit before it forgets the coordinator: one found not
            // alive has its exit, with its cause, in the channel by now.
            if let Some(exits) = exits.as_deref_mut() {
                while let Ok(exit) = exits.try_recv() {
                    self.note_exit(exit);
                }
            }
            let reported = self.pending().exits.remove(&job.id);
            let how = reported
                .as_ref()
                .map_or(gone.to_string(), |(how, _)| how.clone());
            if reported.is_none() {
                tracing::warn!(job = %job.id, state = %job.state, "reconcile pass: the job's coordinator is gone");
            }
            if let Err(e) = self.coordinator_gone(&job, &how).await {
                tracing::warn!(job = %job.id, error = %e, "cannot handle a gone coordinator yet; trying again");
                self.pending()
                    .exits
                    .insert(job.id.clone(), reported.unwrap_or((how, 1)));
            }
        }
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
        // A round completed since the launch proves the coordinator works: the budget
        // counts launches from here. Written before the round, so whoever sees the round
        // sees the reset; a report retried after a failure resets again.
        if round.round > job.rounds_completed && job.launch_attempts > 0 {
            self.modify(id, |j| {
                if j.launch_attempts == 0 || !j.state.has_coordinator() {
                    return Ok(None);
                }
                let mut n = j.clone();
                n.launch_attempts = 0;
                Ok(Some(n))
            })
            .await?;
        }
        let before = job.rounds_completed;
        let job = self.store.record_round(id, round, now_ms()).await?;
        // A retried report is stored once, and counted once.
        if job.rounds_completed > before {
            crate::metrics::round_completed(Duration::from_millis(round.duration_ms));
        }
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
        match self.store.delete_job(id).await {
            // The reconcile pass finishes deletes too; it may have been first.
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.announce(id);
        Ok(())
    }

    /// After a restart: adopts coordinators that still run, relaunches the rest,
    /// finishes interrupted deletes. The supervisor keeps doing this every
    /// reconcile interval.
    pub async fn recover(&self) {
        let _acting = self.acting.lock().await;
        self.reconcile("was gone when job-scheduler restarted", None)
            .await;
    }

    /// job-scheduler shuts down: stops supervising, stops the coordinators the launcher
    /// runs (waiting `grace` for them) and gives their launches back to their jobs'
    /// budgets, as it does the relaunches still waiting out a backoff: a planned stop is
    /// no failure. The jobs stay as they are; the next start relaunches (or adopts) their
    /// coordinators. Bounded in time even while the database is down.
    pub async fn shut_down(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        // Let a pass in progress finish its step; it launches nothing from now on.
        let _acting = tokio::time::timeout(Duration::from_secs(2), self.acting.lock())
            .await
            .ok();
        let stopped = self.launcher.stop_all(grace).await;
        let mut planned: BTreeSet<JobId> = stopped.into_iter().collect();
        planned.extend(self.pending().relaunches.keys().cloned());
        let refunds = async {
            for id in &planned {
                let refunded = self
                    .modify(id, |j| {
                        if !matches!(j.state, JobState::Starting | JobState::Running)
                            || j.launch_attempts == 0
                        {
                            return Ok(None);
                        }
                        let mut n = j.clone();
                        n.launch_attempts -= 1;
                        Ok(Some(n))
                    })
                    .await;
                if let Err(e) = refunded {
                    tracing::warn!(job = %id, error = %e, "cannot give the stopped launch back to the job's budget");
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(3), refunds)
            .await
            .is_err()
        {
            tracing::warn!(
                "the store did not answer in time: stopped launches may count at the next start"
            );
        }
        tracing::info!(
            coordinators = planned.len(),
            "coordinators stopped for shutdown; they resume at the next start"
        );
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(model: &str) -> JobSpec {
        JobSpec::parse(&format!(
            "name: j\nmodel: {model}\ndata: {{dataset: d}}\nclients: {{per_round: 2, min: 2}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_model_over_the_limit_is_refused_naming_what_sizes_it() {
        let synthetic = spec("{arch: synthetic, params: 200000000}");
        assert!(check_model_size(&synthetic, 200_000_000).is_ok());
        let e = check_model_size(&synthetic, 100_000_000).unwrap_err();
        assert_eq!(e.field, "model.params");
        assert!(
            e.message.contains(
                "the model has 200000000 parameters; this server allows at most 100000000"
            ),
            "{e}"
        );
        let mlp = spec("{arch: mlp, hidden: [65536, 65536]}");
        let e = check_model_size(&mlp, 1_000_000).unwrap_err();
        assert_eq!(e.field, "model.hidden");
        assert!(e.message.contains("at least"), "{e}");
    }
}
