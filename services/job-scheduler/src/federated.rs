//! FederatedJob objects drive the same jobs as the API: the reconciler's
//! backend is the job state machine itself, so a job applied with kubectl is
//! listed, watched and stopped like any other.

use std::sync::Arc;

use async_trait::async_trait;
use cohort_core::{JobId, JobSpec};
use cohort_kube::reconciler::{BackendError, JobBackend, JobView};
use cohort_store::StoreError;

use crate::manager::{JobError, JobManager};

/// The reconciler's backend. A FederatedJob's job id is derived from its origin
/// (namespace, name, uid), so a create retried after the status patch failed,
/// or after a crash between the two, finds the job the first try made.
pub struct ManagerBackend {
    manager: Arc<JobManager>,
}

impl ManagerBackend {
    pub fn new(manager: Arc<JobManager>) -> Arc<Self> {
        Arc::new(Self { manager })
    }
}

fn backend_error(e: JobError) -> BackendError {
    match e {
        JobError::Spec(e) => BackendError::Invalid(e.to_string()),
        JobError::Invalid(m) => BackendError::Invalid(m),
        e @ JobError::WrongState { .. } => BackendError::Conflict(e.to_string()),
        JobError::Store(StoreError::Unavailable(m)) => BackendError::Unavailable(m),
        JobError::Store(e @ StoreError::Conflict(_)) => BackendError::Conflict(e.to_string()),
        JobError::Store(e) => BackendError::Internal(e.to_string()),
    }
}

fn job_id(id: &str) -> Result<JobId, BackendError> {
    JobId::parse(id).map_err(|e| BackendError::Invalid(format!("job id: {e}")))
}

#[async_trait]
impl JobBackend for ManagerBackend {
    async fn create(&self, origin: &str, spec: &JobSpec) -> Result<String, BackendError> {
        let id = JobId::derived(&spec.name, origin);
        let (job, created) = self
            .manager
            .create_once(spec.clone(), id)
            .await
            .map_err(backend_error)?;
        if created {
            tracing::info!(job = %job.id, %origin, "job created from a FederatedJob");
        } else {
            tracing::info!(job = %job.id, %origin, "FederatedJob's job exists already");
        }
        Ok(job.id.to_string())
    }

    async fn get(&self, id: &str) -> Result<Option<JobView>, BackendError> {
        let id = job_id(id)?;
        let store = self.manager.store();
        let job = match store.get_job(&id).await {
            Ok(j) => j,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(backend_error(e.into())),
        };
        let rounds = store
            .list_rounds(&id)
            .await
            .map_err(|e| backend_error(e.into()))?;
        Ok(Some(JobView {
            state: job.state.as_str().to_string(),
            rounds_completed: job.rounds_completed,
            rounds_total: job.rounds_total,
            accuracy: rounds
                .iter()
                .rev()
                .find(|r| r.eval_samples > 0)
                .map(|r| r.eval_accuracy),
            reason: job.reason,
        }))
    }

    async fn stop(&self, id: &str, reason: &str) -> Result<(), BackendError> {
        match self.manager.stop(&job_id(id)?, reason).await {
            // Stopping or ended already: nothing to do.
            Ok(_) | Err(JobError::WrongState { .. }) => Ok(()),
            Err(e) => Err(backend_error(e)),
        }
    }

    async fn delete(&self, id: &str) -> Result<(), BackendError> {
        match self.manager.delete(&job_id(id)?).await {
            Ok(()) | Err(JobError::Store(StoreError::NotFound { .. })) => Ok(()),
            Err(e) => Err(backend_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cohort_runtime::launcher::{CoordinatorConfig, LocalLauncher};

    use super::*;
    use crate::manager::ManagerConfig;

    const SPEC: &str = "name: from-kubectl\nmodel: {arch: logreg}\ndata: {dataset: digits}\nrounds: 3\nclients: {per_round: 1, min: 1}\n";

    #[tokio::test]
    async fn federated_jobs_are_ordinary_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
        let store = cohort_store::open::open_job_store(&url, &Default::default())
            .await
            .unwrap();
        let (exits, _) = tokio::sync::mpsc::unbounded_channel();
        let launcher = LocalLauncher::new(
            dir.path().join("no-coordinator"),
            CoordinatorConfig {
                job_scheduler: "127.0.0.1:1".into(),
                model_manager: "127.0.0.1:2".into(),
                client_selector: "127.0.0.1:3".into(),
            },
            dir.path().join("logs"),
            Vec::new(),
            exits,
        )
        .unwrap();
        let manager = JobManager::new(
            store.clone(),
            Arc::new(launcher),
            ManagerConfig {
                max_launch_attempts: 1,
                stop_grace: Duration::from_secs(1),
                tls: None,
                max_job_log_entries: 10,
                max_model_parameters: 1_000_000,
            },
        );
        let backend = ManagerBackend::new(manager.clone());
        let spec = JobSpec::parse(SPEC).unwrap();

        let id = backend.create("k8s:ns/a/uid-1", &spec).await.unwrap();
        assert_eq!(
            backend.create("k8s:ns/a/uid-1", &spec).await.unwrap(),
            id,
            "a retried create returns the same job"
        );
        // Also after a crash between the create and the status patch: a new backend (a
        // restarted job-scheduler) has no memory of the first try and still finds the job.
        let restarted = ManagerBackend::new(manager.clone());
        assert_eq!(restarted.create("k8s:ns/a/uid-1", &spec).await.unwrap(), id);
        // An id taken by a job of another namespace is not adopted.
        let elsewhere = JobSpec {
            namespace: "other".to_string(),
            ..spec.clone()
        };
        assert!(matches!(
            manager
                .create_once(elsewhere, JobId::parse(&id).unwrap())
                .await,
            Err(JobError::Store(StoreError::Conflict(_)))
        ));
        // The same job the API lists.
        let listed = store
            .list_jobs(&Default::default(), 10, None)
            .await
            .unwrap()
            .items;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id.to_string(), id);
        let view = backend.get(&id).await.unwrap().unwrap();
        assert_eq!(view.state, "QUEUED");
        assert_eq!((view.rounds_completed, view.rounds_total), (0, 3));
        assert!(!view.is_terminal());

        backend.stop(&id, "FederatedJob deleted").await.unwrap();
        backend.stop(&id, "again").await.unwrap();
        let view = backend.get(&id).await.unwrap().unwrap();
        assert!(view.is_terminal(), "{}", view.state);
        backend.delete(&id).await.unwrap();
        assert!(backend.get(&id).await.unwrap().is_none());
        backend.delete(&id).await.unwrap();

        let invalid = JobSpec {
            rounds: 0,
            ..spec.clone()
        };
        assert!(matches!(
            backend.create("k8s:ns/b/uid-2", &invalid).await,
            Err(BackendError::Invalid(_))
        ));
        // The server's model size limit holds for FederatedJobs too.
        let mut huge = spec.clone();
        huge.model.arch = cohort_core::spec::Arch::Mlp;
        huge.model.hidden = vec![2_000, 2_000];
        match backend.create("k8s:ns/c/uid-3", &huge).await {
            Err(BackendError::Invalid(m)) => {
                assert!(
                    m.starts_with("model.hidden:") && m.contains("1000000"),
                    "{m}"
                )
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        huge.model.hidden = vec![128];
        backend.create("k8s:ns/c/uid-3", &huge).await.unwrap();
    }
}
