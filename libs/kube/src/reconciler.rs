//! The `FederatedJob` reconciler: turns FederatedJob objects into Cohort jobs and reports the
//! jobs back on the objects' status.
//!
//! It drives a [`JobBackend`] (implemented by job-scheduler over its job manager) and knows
//! nothing of stores or gRPC. In the kube-rs controller style:
//!
//! - [`reconcile`] runs under the [`finalizer`] helper with the finalizer [`FINALIZER`]:
//!   - *apply*: creates the job if the status has no `jobId` yet (idempotently, keyed by an
//!     origin made of namespace, name and uid), then merge-patches the status subresource with
//!     the job's state, rounds and accuracy; requeues every [`Context::active_requeue`] while the
//!     job can still change and every [`Context::terminal_requeue`] once it cannot.
//!   - *cleanup* (the object is being deleted): stops the job if it still runs, deletes it once it
//!     has ended, and only then lets the finalizer go.
//! - [`error_policy`] requeues failures with a per-object exponential backoff.
//! - [`run`] runs a [`Controller`] over FederatedJob objects until its stream ends.
//!
//! A created job's spec is immutable: when `metadata.generation` moves past the generation the
//! job was created from (kept in `status.observedGeneration`), the status says so in its
//! `reason` ([`SPEC_CHANGE_REASON`]) and the job is left as it is.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cohort_core::{JobSpec, JobState};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, Event, finalizer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::{FederatedJob, FederatedJobStatus};

/// The finalizer the reconciler puts on every FederatedJob it has seen.
pub const FINALIZER: &str = "cohort.dev/job";

/// The status `reason` while the object's spec differs from the one its job was created from.
pub const SPEC_CHANGE_REASON: &str =
    "spec changes are not applied to a created job; delete and re-apply";

/// A job backend's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The request can never succeed as it is (e.g. an invalid spec); not retried.
    #[error("rejected: {0}")]
    Invalid(String),
    /// The job is not in a state that allows this yet (e.g. delete while stopping); retried.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backend cannot be reached or is overloaded; retried.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else; retried with backoff.
    #[error("internal: {0}")]
    Internal(String),
}

impl BackendError {
    /// Whether trying the same call again later can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, BackendError::Invalid(_))
    }
}

/// What the reconciler reads of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// QUEUED .. DELETING, as [`JobState::as_str`].
    pub state: String,
    pub rounds_completed: u32,
    pub rounds_total: u32,
    pub accuracy: Option<f64>,
    /// The reason of the job's last event.
    pub reason: String,
}

impl JobView {
    /// SUCCEEDED, FAILED or STOPPED. An unknown state counts as not terminal.
    pub fn is_terminal(&self) -> bool {
        JobState::from_str(&self.state).is_ok_and(JobState::is_terminal)
    }
}

/// The jobs the reconciler drives; job-scheduler implements it over its job manager.
#[async_trait]
pub trait JobBackend: Send + Sync + 'static {
    /// Creates the job from a spec; returns its id. `origin` is a stable key
    /// (`k8s:<namespace>/<name>/<uid>`, see [`origin`]) so that a create retried after a crash
    /// does not create a second job: implementations return the existing job's id for a known
    /// origin.
    async fn create(&self, origin: &str, spec: &JobSpec) -> Result<String, BackendError>;
    /// The job, or `None` when there is no such job.
    async fn get(&self, job_id: &str) -> Result<Option<JobView>, BackendError>;
    /// Asks the job to stop (a no-op for a job that is stopping or has ended).
    async fn stop(&self, job_id: &str, reason: &str) -> Result<(), BackendError>;
    /// Deletes an ended job; deleting a missing job is Ok.
    async fn delete(&self, job_id: &str) -> Result<(), BackendError>;
}

/// Why a reconcile failed; every error is retried through [`error_policy`].
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("job backend: {0}")]
    Backend(#[from] BackendError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("could not {action} the finalizer {FINALIZER}: {source}")]
    Finalizer {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the FederatedJob has no {0}")]
    MissingField(&'static str),
    /// Cleanup waits for the job to end before deleting it.
    #[error("job {0} is still stopping")]
    StillStopping(String),
}

/// What the reconciler needs: the Kubernetes client, the backend and its timings.
pub struct Context {
    pub client: Client,
    pub backend: Arc<dyn JobBackend>,
    /// How often a job that can still change is looked at (default 5 s).
    pub active_requeue: Duration,
    /// How often an ended job is looked at (default 5 min).
    pub terminal_requeue: Duration,
    /// The first retry after a failure (default 1 s); doubled for each further failure.
    pub error_backoff_base: Duration,
    /// The longest wait between retries (default 5 min).
    pub error_backoff_max: Duration,
    /// Consecutive failures per object (`namespace/name`), reset by a successful reconcile.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, backend: Arc<dyn JobBackend>) -> Self {
        Self {
            client,
            backend,
            active_requeue: Duration::from_secs(5),
            terminal_requeue: Duration::from_secs(300),
            error_backoff_base: Duration::from_secs(1),
            error_backoff_max: Duration::from_secs(300),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The origin key a FederatedJob's job is created under.
pub fn origin(namespace: &str, name: &str, uid: &str) -> String {
    format!("k8s:{namespace}/{name}/{uid}")
}

fn object_key(obj: &FederatedJob) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Reconciles one FederatedJob (see the module docs).
pub async fn reconcile(
    obj: Arc<FederatedJob>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let namespace = obj
        .namespace()
        .ok_or(ReconcileError::MissingField("metadata.namespace"))?;
    let key = object_key(&obj);
    let api: Api<FederatedJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Event::Apply(obj) => apply(&api, &obj, &ctx).await,
            Event::Cleanup(obj) => cleanup(&obj, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(source) => ReconcileError::Finalizer {
            action: "add",
            source,
        },
        finalizer::Error::RemoveFinalizer(source) => ReconcileError::Finalizer {
            action: "remove",
            source,
        },
        finalizer::Error::UnnamedObject => ReconcileError::MissingField("metadata.name"),
        finalizer::Error::InvalidFinalizer => ReconcileError::MissingField("a valid finalizer"),
    })?;
    ctx.failures().remove(&key);
    Ok(action)
}

/// Requeues a failed reconcile: after [`Context::error_backoff_base`], doubled for each
/// consecutive failure of the same object up to [`Context::error_backoff_max`]. A job that is
/// still stopping during cleanup is simply looked at again after [`Context::active_requeue`].
pub fn error_policy(obj: Arc<FederatedJob>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    if let ReconcileError::StillStopping(job) = error {
        tracing::debug!(object = %object_key(&obj), %job, "waiting for the job to stop");
        return Action::requeue(ctx.active_requeue);
    }
    let failures = {
        let mut all = ctx.failures();
        let n = all.entry(object_key(&obj)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = ctx
        .error_backoff_base
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)))
        .min(ctx.error_backoff_max);
    tracing::warn!(object = %object_key(&obj), failures, ?delay, "reconcile failed: {error}");
    Action::requeue(delay)
}

async fn apply(
    api: &Api<FederatedJob>,
    obj: &FederatedJob,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let generation = obj.metadata.generation;
    let current = obj.status.clone().unwrap_or_default();

    let (job_id, created_from) = match &current.job_id {
        Some(id) => (
            id.clone(),
            current.observed_generation.or(generation), // adopted without a recorded generation
        ),
        None => {
            let uid = obj
                .uid()
                .ok_or(ReconcileError::MissingField("metadata.uid"))?;
            match ctx
                .backend
                .create(&origin(&namespace, &name, &uid), &obj.spec.0)
                .await
            {
                Ok(id) => {
                    tracing::info!(object = %object_key(obj), job = %id, "job created");
                    (id, generation)
                }
                Err(e) if !e.is_retryable() => {
                    // No job exists: report why, and try again when the spec changes.
                    let status = json!({
                        "reason": format!("job not created: {e}"),
                        "observedGeneration": generation,
                    });
                    patch_status(api, &name, &current, status).await?;
                    return Ok(Action::await_change());
                }
                Err(e) => return Err(e.into()),
            }
        }
    };

    let spec_changed = matches!((created_from, generation), (Some(c), Some(g)) if g != c);
    let Some(view) = ctx.backend.get(&job_id).await? else {
        // Deleted behind our back; not recreated (that would silently restart training).
        let status = json!({
            "jobId": job_id,
            "reason": format!("job {job_id} no longer exists; delete and re-apply"),
            "observedGeneration": created_from,
        });
        patch_status(api, &name, &current, status).await?;
        return Ok(Action::requeue(ctx.terminal_requeue));
    };
    let reason = if spec_changed {
        Some(SPEC_CHANGE_REASON.to_string())
    } else {
        Some(view.reason.clone()).filter(|r| !r.is_empty())
    };
    let status = json!({
        "jobId": job_id,
        "state": view.state,
        "round": view.rounds_completed,
        "roundsTotal": view.rounds_total,
        "accuracy": view.accuracy,
        "reason": reason,
        "observedGeneration": created_from,
    });
    patch_status(api, &name, &current, status).await?;
    Ok(Action::requeue(if view.is_terminal() {
        ctx.terminal_requeue
    } else {
        ctx.active_requeue
    }))
}

/// Merge-patches the status subresource with `status` (null fields are removed), unless the
/// object's status already says exactly that.
async fn patch_status(
    api: &Api<FederatedJob>,
    name: &str,
    current: &FederatedJobStatus,
    status: Value,
) -> Result<(), ReconcileError> {
    let mut merged = serde_json::to_value(current).map_err(kube::Error::SerdeError)?;
    if let (Value::Object(m), Value::Object(s)) = (&mut merged, &status) {
        for (k, v) in s {
            if v.is_null() {
                m.remove(k);
            } else {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    let unchanged =
        serde_json::from_value::<FederatedJobStatus>(merged).is_ok_and(|next| next == *current);
    if unchanged {
        return Ok(());
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

async fn cleanup(obj: &FederatedJob, ctx: &Context) -> Result<Action, ReconcileError> {
    let Some(job_id) = obj.status.as_ref().and_then(|s| s.job_id.clone()) else {
        // No job was recorded for the object.
        return Ok(Action::await_change());
    };
    let backend = &ctx.backend;
    let Some(mut view) = backend.get(&job_id).await? else {
        return Ok(Action::await_change());
    };
    if !view.is_terminal() && view.state != JobState::Deleting.as_str() {
        let reason = format!("FederatedJob {} deleted", object_key(obj));
        backend.stop(&job_id, &reason).await?;
        match backend.get(&job_id).await? {
            Some(v) => view = v,
            None => return Ok(Action::await_change()),
        }
        if !view.is_terminal() && view.state != JobState::Deleting.as_str() {
            return Err(ReconcileError::StillStopping(job_id));
        }
    }
    backend.delete(&job_id).await?;
    tracing::info!(object = %object_key(obj), job = %job_id, "job deleted");
    Ok(Action::await_change())
}

/// Runs the FederatedJob controller over one namespace (or all) until its stream ends.
pub async fn run(client: Client, namespace: Option<String>, backend: Arc<dyn JobBackend>) {
    let api: Api<FederatedJob> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let ctx = Arc::new(Context::new(client, backend));
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(?object, "reconciled"),
                Err(e) => tracing::warn!("FederatedJob controller: {e}"),
            }
        })
        .await;
}
