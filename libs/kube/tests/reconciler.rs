//! The FederatedJob reconciler against a mocked API server and an in-memory job backend.
//!
//! No Kubernetes API server can run here (none installs on these machines), so the API server
//! is mocked with `tower_test::mock::pair`: each test reads the exact HTTP requests the
//! reconciler makes (method, path, JSON body) and answers them as an API server would. The job
//! backend (job-scheduler in production) is a fake that records its calls.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cohort_core::JobSpec;
use cohort_kube::FederatedJob;
use cohort_kube::reconciler::{
    BackendError, Context, JobBackend, JobView, ReconcileError, SPEC_CHANGE_REASON, error_policy,
    reconcile,
};
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

mod support;
use support::{ApiHandle, next};

/// A backend call, as the fake recorded it.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Create { origin: String, spec: Box<JobSpec> },
    Get(String),
    Stop { job_id: String, reason: String },
    Delete(String),
}

/// An in-memory job backend: one job at most, with a scripted view.
#[derive(Default)]
struct FakeBackend {
    calls: Mutex<Vec<Call>>,
    /// The job's view; `None`: no job.
    job: Mutex<Option<JobView>>,
    /// The next call fails with this.
    fail: Mutex<Option<BackendError>>,
    /// `stop` ends the job at once (a QUEUED job does); otherwise it goes STOPPING.
    stop_ends_job: bool,
}

const JOB_ID: &str = "digits-fedavg-x1y2z3";

impl FakeBackend {
    fn with_job(view: JobView) -> Self {
        Self {
            job: Mutex::new(Some(view)),
            ..Default::default()
        }
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn record(&self, call: Call) -> Result<(), BackendError> {
        self.calls.lock().unwrap().push(call);
        match self.fail.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl JobBackend for FakeBackend {
    async fn create(&self, origin: &str, spec: &JobSpec) -> Result<String, BackendError> {
        self.record(Call::Create {
            origin: origin.to_string(),
            spec: Box::new(spec.clone()),
        })?;
        self.job.lock().unwrap().get_or_insert(JobView {
            state: "QUEUED".to_string(),
            rounds_completed: 0,
            rounds_total: spec.rounds,
            accuracy: None,
            reason: "created".to_string(),
        });
        Ok(JOB_ID.to_string())
    }
    async fn get(&self, job_id: &str) -> Result<Option<JobView>, BackendError> {
        self.record(Call::Get(job_id.to_string()))?;
        Ok(self.job.lock().unwrap().clone())
    }
    async fn stop(&self, job_id: &str, reason: &str) -> Result<(), BackendError> {
        self.record(Call::Stop {
            job_id: job_id.to_string(),
            reason: reason.to_string(),
        })?;
        if let Some(job) = self.job.lock().unwrap().as_mut() {
            job.state = if self.stop_ends_job {
                "STOPPED"
            } else {
                "STOPPING"
            }
            .to_string();
        }
        Ok(())
    }
    async fn delete(&self, job_id: &str) -> Result<(), BackendError> {
        self.record(Call::Delete(job_id.to_string()))?;
        *self.job.lock().unwrap() = None;
        Ok(())
    }
}

const UID: &str = "6f1c2a9e-0000-4000-8000-00000000abcd";
const OBJECT: &str = "/apis/cohort.dev/v1alpha1/namespaces/team-a/federatedjobs/digits";
const ORIGIN: &str = "k8s:team-a/digits/6f1c2a9e-0000-4000-8000-00000000abcd";

fn spec_json() -> Value {
    json!({
        "name": "digits-fedavg",
        "model": {"arch": "mlp", "hidden": [128]},
        "data": {"dataset": "digits"},
        "rounds": 10,
        "clients": {"per_round": 3, "min": 2, "round_timeout": "30s"}
    })
}

/// A FederatedJob as the API server would hand it to the controller.
fn object(finalizers: &[&str], generation: i64, status: Option<Value>) -> Arc<FederatedJob> {
    let mut obj = json!({
        "apiVersion": "cohort.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {
            "name": "digits", "namespace": "team-a", "uid": UID,
            "generation": generation, "resourceVersion": "100",
            "finalizers": finalizers
        },
        "spec": spec_json()
    });
    if let Some(status) = status {
        obj["status"] = status;
    }
    Arc::new(serde_json::from_value(obj).unwrap())
}

fn deleting(obj: Arc<FederatedJob>) -> Arc<FederatedJob> {
    let mut obj = (*obj).clone();
    obj.metadata.deletion_timestamp =
        Some(serde_json::from_value(json!("2026-12-01T23:00:00Z")).unwrap());
    Arc::new(obj)
}

fn context(backend: Arc<FakeBackend>) -> (Arc<Context>, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    (Arc::new(Context::new(client, backend)), handle)
}

/// The object with a new body, as the API server answers a patch.
fn echo_object(status: Value) -> Value {
    let obj = object(&["cohort.dev/job"], 1, Some(status));
    serde_json::to_value(&*obj).unwrap()
}

fn running_view() -> JobView {
    JobView {
        state: "RUNNING".to_string(),
        rounds_completed: 3,
        rounds_total: 10,
        accuracy: Some(0.8),
        reason: "round 3 done".to_string(),
    }
}

#[tokio::test]
async fn a_new_object_gets_the_finalizer_first() {
    let backend = Arc::new(FakeBackend::default());
    let (ctx, mut handle) = context(backend.clone());
    let serve = async {
        let patch = next(&mut handle).await;
        assert_eq!(patch.method, Method::PATCH);
        assert_eq!(patch.uri, format!("{OBJECT}?"));
        assert_eq!(patch.content_type, "application/json-patch+json");
        assert_eq!(
            patch.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["cohort.dev/job"]}
            ])
        );
        patch.answer(StatusCode::OK, echo_object(json!({})));
    };
    let (result, ()) = tokio::join!(reconcile(object(&[], 1, None), ctx), serve);
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(
        backend.calls().is_empty(),
        "nothing is created before the finalizer is on: {:?}",
        backend.calls()
    );
}

#[tokio::test]
async fn an_object_with_the_finalizer_creates_the_job_and_reports_it() {
    let backend = Arc::new(FakeBackend::default());
    let (ctx, mut handle) = context(backend.clone());
    let serve = async {
        let patch = next(&mut handle).await;
        assert_eq!(patch.method, Method::PATCH);
        assert_eq!(patch.uri, format!("{OBJECT}/status?"));
        assert_eq!(patch.content_type, "application/merge-patch+json");
        assert_eq!(
            patch.body,
            json!({"status": {
                "jobId": JOB_ID, "state": "QUEUED", "round": 0, "roundsTotal": 10,
                "accuracy": null, "reason": "created", "observedGeneration": 1
            }})
        );
        let status = patch.body["status"].clone();
        patch.answer(StatusCode::OK, echo_object(status));
    };
    let (result, ()) = tokio::join!(
        reconcile(object(&["cohort.dev/job"], 1, None), ctx.clone()),
        serve
    );
    assert_eq!(result.unwrap(), Action::requeue(ctx.active_requeue));
    let spec: JobSpec = serde_json::from_value(spec_json()).unwrap();
    assert_eq!(
        backend.calls(),
        vec![
            Call::Create {
                origin: ORIGIN.to_string(),
                spec: Box::new(spec)
            },
            Call::Get(JOB_ID.to_string()),
        ]
    );
}

#[tokio::test]
async fn a_known_job_is_reported_without_a_second_create() {
    let backend = Arc::new(FakeBackend::with_job(running_view()));
    let (ctx, mut handle) = context(backend.clone());
    let before = json!({"jobId": JOB_ID, "state": "QUEUED", "round": 0, "roundsTotal": 10,
                        "reason": "created", "observedGeneration": 1});
    let serve = async {
        let patch = next(&mut handle).await;
        assert_eq!(patch.method, Method::PATCH);
        assert_eq!(patch.uri, format!("{OBJECT}/status?"));
        assert_eq!(patch.content_type, "application/merge-patch+json");
        assert_eq!(
            patch.body,
            json!({"status": {
                "jobId": JOB_ID, "state": "RUNNING", "round": 3, "roundsTotal": 10,
                "accuracy": 0.8, "reason": "round 3 done", "observedGeneration": 1
            }})
        );
        let status = patch.body["status"].clone();
        patch.answer(StatusCode::OK, echo_object(status));
    };
    let (result, ()) = tokio::join!(
        reconcile(object(&["cohort.dev/job"], 1, Some(before)), ctx.clone()),
        serve
    );
    assert_eq!(result.unwrap(), Action::requeue(ctx.active_requeue));
    assert_eq!(backend.calls(), vec![Call::Get(JOB_ID.to_string())]);
}

#[tokio::test]
async fn an_unchanged_status_is_not_patched_and_a_terminal_job_requeues_slowly() {
    let mut view = running_view();
    view.state = "SUCCEEDED".to_string();
    view.rounds_completed = 10;
    let backend = Arc::new(FakeBackend::with_job(view));
    let (ctx, handle) = context(backend.clone());
    // Any request would fail: nobody answers the mocked API server.
    drop(handle);
    let status = json!({"jobId": JOB_ID, "state": "SUCCEEDED", "round": 10, "roundsTotal": 10,
                        "accuracy": 0.8, "reason": "round 3 done", "observedGeneration": 1});
    let result = reconcile(object(&["cohort.dev/job"], 1, Some(status)), ctx.clone()).await;
    assert_eq!(result.unwrap(), Action::requeue(ctx.terminal_requeue));
    assert_eq!(backend.calls(), vec![Call::Get(JOB_ID.to_string())]);
}

#[tokio::test]
async fn a_changed_spec_is_reported_and_not_applied() {
    let backend = Arc::new(FakeBackend::with_job(running_view()));
    let (ctx, mut handle) = context(backend.clone());
    let before = json!({"jobId": JOB_ID, "state": "RUNNING", "round": 3, "roundsTotal": 10,
                        "accuracy": 0.8, "reason": "round 3 done", "observedGeneration": 1});
    let serve = async {
        let patch = next(&mut handle).await;
        assert_eq!(patch.method, Method::PATCH);
        assert_eq!(patch.uri, format!("{OBJECT}/status?"));
        assert_eq!(patch.body["status"]["reason"], SPEC_CHANGE_REASON);
        assert_eq!(patch.body["status"]["jobId"], JOB_ID);
        // The status still describes the job as created from generation 1.
        assert_eq!(patch.body["status"]["observedGeneration"], 1);
        let status = patch.body["status"].clone();
        patch.answer(StatusCode::OK, echo_object(status));
    };
    let (result, ()) = tokio::join!(
        reconcile(object(&["cohort.dev/job"], 2, Some(before)), ctx.clone()),
        serve
    );
    assert_eq!(result.unwrap(), Action::requeue(ctx.active_requeue));
    assert_eq!(
        backend.calls(),
        vec![Call::Get(JOB_ID.to_string())],
        "no create, no stop"
    );
}

#[tokio::test]
async fn deletion_stops_and_deletes_the_job_then_removes_the_finalizer() {
    let backend = Arc::new(FakeBackend {
        job: Mutex::new(Some(running_view())),
        stop_ends_job: true,
        ..Default::default()
    });
    let (ctx, mut handle) = context(backend.clone());
    let status = json!({"jobId": JOB_ID, "state": "RUNNING", "round": 3, "roundsTotal": 10});
    let obj = deleting(object(
        &["other.example/keep", "cohort.dev/job"],
        1,
        Some(status),
    ));
    let serve = async {
        let patch = next(&mut handle).await;
        assert_eq!(patch.method, Method::PATCH);
        assert_eq!(patch.uri, format!("{OBJECT}?"));
        assert_eq!(patch.content_type, "application/json-patch+json");
        assert_eq!(
            patch.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": "cohort.dev/job"},
                {"op": "remove", "path": "/metadata/finalizers/1"}
            ])
        );
        patch.answer(StatusCode::OK, echo_object(json!({})));
    };
    let (result, ()) = tokio::join!(reconcile(obj, ctx), serve);
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(
        backend.calls(),
        vec![
            Call::Get(JOB_ID.to_string()),
            Call::Stop {
                job_id: JOB_ID.to_string(),
                reason: "FederatedJob team-a/digits deleted".to_string()
            },
            Call::Get(JOB_ID.to_string()),
            Call::Delete(JOB_ID.to_string()),
        ]
    );
}

#[tokio::test]
async fn deletion_keeps_the_finalizer_while_the_job_is_stopping() {
    let backend = Arc::new(FakeBackend::with_job(running_view()));
    let (ctx, handle) = context(backend.clone());
    drop(handle); // no request may be made: the finalizer stays
    let status = json!({"jobId": JOB_ID, "state": "RUNNING"});
    let obj = deleting(object(&["cohort.dev/job"], 1, Some(status)));
    let err = reconcile(obj.clone(), ctx.clone()).await.unwrap_err();
    assert!(
        matches!(&err, ReconcileError::StillStopping(id) if id == JOB_ID),
        "{err:?}"
    );
    assert_eq!(
        error_policy(obj, &err, ctx.clone()),
        Action::requeue(ctx.active_requeue)
    );
    assert!(!backend.calls().contains(&Call::Delete(JOB_ID.to_string())));
}

#[tokio::test]
async fn a_backend_error_fails_the_reconcile_for_a_retry_with_backoff() {
    let backend = Arc::new(FakeBackend::default());
    let (ctx, handle) = context(backend.clone());
    drop(handle); // no status is patched for a failed create
    let obj = object(&["cohort.dev/job"], 1, None);
    let mut delays = Vec::new();
    for _ in 0..3 {
        *backend.fail.lock().unwrap() =
            Some(BackendError::Unavailable("job-scheduler down".to_string()));
        let err = reconcile(obj.clone(), ctx.clone()).await.unwrap_err();
        assert!(
            matches!(&err, ReconcileError::Backend(BackendError::Unavailable(_))),
            "{err:?}"
        );
        delays.push(error_policy(obj.clone(), &err, ctx.clone()));
    }
    let base = ctx.error_backoff_base;
    assert_eq!(
        delays,
        vec![
            Action::requeue(base),
            Action::requeue(base * 2),
            Action::requeue(base * 4)
        ]
    );
    assert_eq!(backend.calls().len(), 3, "one create attempt per reconcile");
    assert!(
        backend
            .calls()
            .iter()
            .all(|c| matches!(c, Call::Create { origin, .. } if origin == ORIGIN))
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_waits_for_a_change() {
    let backend = Arc::new(FakeBackend::default());
    *backend.fail.lock().unwrap() = Some(BackendError::Invalid(
        "clients.per_round: must be at least 1".to_string(),
    ));
    let (ctx, mut handle) = context(backend.clone());
    let serve = async {
        let patch = next(&mut handle).await;
        assert_eq!(patch.method, Method::PATCH);
        assert_eq!(patch.uri, format!("{OBJECT}/status?"));
        assert_eq!(
            patch.body,
            json!({"status": {
                "reason": "job not created: rejected: clients.per_round: must be at least 1",
                "observedGeneration": 1
            }})
        );
        let status = patch.body["status"].clone();
        patch.answer(StatusCode::OK, echo_object(status));
    };
    let (result, ()) = tokio::join!(reconcile(object(&["cohort.dev/job"], 1, None), ctx), serve);
    assert_eq!(result.unwrap(), Action::await_change());
}
