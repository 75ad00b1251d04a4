//! cohort-kube: Cohort on Kubernetes (DESIGN §1, "Launchers are pluggable").
//!
//! - [`FederatedJob`], the `cohort.dev/v1alpha1` custom resource whose spec is the job spec
//!   itself ([`cohort_core::JobSpec`]); `crdgen` writes its CRD into the Helm chart.
//! - [`KubernetesLauncher`], the [`Launcher`](cohort_runtime::launcher::Launcher) that runs each
//!   job's coordinator as a Pod plus a Service, and reports coordinators that die.
//! - [`KubernetesExecutors`], task-manager's executor launcher: one Secret (the task file) and
//!   one Pod per task, placed by the party's [`ExecutorPodConfig`].
//!
//! Layering: this crate sits beside `cohort-runtime` and may depend only on `cohort-core`,
//! `cohort-runtime` and the kube crates. It must not depend on the stores (`cohort-store`,
//! `cohort-blob`) or on any service crate; services depend on it, not the other way round.

mod crd;
mod executor;
mod launcher;
mod objects;
pub mod reconciler;
pub mod schema;

pub use crd::{FederatedJob, FederatedJobSpec, FederatedJobStatus};
pub use executor::{
    DEFAULT_GPU_RESOURCE, ExecutorConfigError, ExecutorEnd, ExecutorOwner, ExecutorPodConfig,
    ExecutorPodError, KubernetesExecutors, LABEL_PARTY, LABEL_TASK, TASK_FILE, executor_pod,
    executor_pod_name, executor_secret, pod_owner_reference,
};
/// Re-exported so callers can name the CRD helpers without their own kube dependency.
pub use kube::CustomResourceExt;
pub use launcher::{
    COORDINATOR_PORT, KubernetesLauncher, KubernetesLauncherConfig, LABEL_COMPONENT, LABEL_JOB,
    LABEL_NAME, coordinator_labels, coordinator_name, deployment_owner,
};
pub use reconciler::{BackendError, JobBackend, JobView};
