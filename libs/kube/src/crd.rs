//! The `FederatedJob` custom resource.

use cohort_core::JobSpec;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A federated learning job as a Kubernetes object (`kubectl get fj`).
///
/// The spec is exactly the job spec of `cohort job create -f` (DESIGN §3, snake_case fields),
/// so the CRD's schema is generated from [`JobSpec`] and cannot drift from it. Validation the
/// types cannot express (ranges, combinations) stays in [`JobSpec::validate`].
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cohort.dev",
    version = "v1alpha1",
    kind = "FederatedJob",
    namespaced,
    shortname = "fj",
    status = "FederatedJobStatus",
    schema = "derived",
    doc = "A Cohort federated learning job; `spec` is the job spec of `cohort job create -f`.",
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Round", type_ = "integer", json_path = ".status.round"),
    printcolumn(name = "Accuracy", type_ = "number", json_path = ".status.accuracy"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(transparent)]
pub struct FederatedJobSpec(pub JobSpec);

impl From<JobSpec> for FederatedJobSpec {
    fn from(spec: JobSpec) -> Self {
        Self(spec)
    }
}

impl std::ops::Deref for FederatedJobSpec {
    type Target = JobSpec;
    fn deref(&self) -> &JobSpec {
        &self.0
    }
}

/// What job-scheduler reports back on the object (camelCase on the wire).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedJobStatus {
    /// The Cohort job id (the job name plus a suffix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// QUEUED, STARTING, RUNNING, STOPPING, SUCCEEDED, FAILED, STOPPED or DELETING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Rounds completed.
    #[serde(default)]
    pub round: u32,
    /// Rounds the job runs in all.
    #[serde(default)]
    pub rounds_total: u32,
    /// Accuracy of the global model at the last evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Why the job is in its state (the reason of the last job event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
