//! The Kubernetes objects the launchers post, exactly as posted, validated against the
//! Kubernetes schemas: each is built through the launcher code against the mocked API server
//! (the coordinator's ConfigMap, Pod and Service on `launch`; an executor's Secret and Pod on
//! `start`; a FederatedJob's status as the reconciler's merge patches leave it), with settings
//! from the fewest to the most a deployment gives.
//!
//! The validator is `scripts/check-charts.sh --objects DIR` (kubernetes-validate, strict: a
//! field the API server would refuse or silently drop fails; the FederatedJob against the
//! chart's CRD schema). `COHORT_TEST_KUBE_VALIDATE` names that script; scripts/test.sh sets it.
//! Without it the objects are still built and checked here, and the test reports the schema
//! validation skipped (under CI it fails). Deliberately broken objects must be refused, so a
//! validator that accepts everything fails the test.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use cohort_core::{JobId, JobSpec};
use cohort_kube::reconciler::{BackendError, Context, JobBackend, JobView, reconcile};
use cohort_kube::{
    ExecutorOwner, ExecutorPodConfig, FederatedJob, KubernetesExecutors, KubernetesLauncher,
    KubernetesLauncherConfig, pod_owner_reference,
};
use cohort_runtime::launcher::{CoordinatorConfig, Launcher};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, PersistentVolumeClaimVolumeSource, PodSecurityContext, ResourceRequirements,
    SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::client::Body;
use serde_json::{Value, json};

mod support;
use support::{ApiHandle, next};

/// The validator: `scripts/check-charts.sh`, run with `--objects DIR`.
const VALIDATOR_VAR: &str = "COHORT_TEST_KUBE_VALIDATE";

fn mock_client() -> (kube::Client, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// The body of the next request, which must be `method` on a path starting with `path`;
/// answered as the API server does (the object back).
async fn posted(handle: &mut ApiHandle, method: Method, path: &str) -> Value {
    let seen = next(handle).await;
    assert_eq!(seen.method, method, "{}", seen.uri);
    assert!(
        seen.uri.starts_with(path),
        "{} is not under {path}",
        seen.uri
    );
    let body = seen.body.clone();
    seen.echo();
    body
}

fn quantities(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect(),
    )
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..Default::default()
    }
}

// ---- coordinators ---------------------------------------------------------------------------

fn services() -> CoordinatorConfig {
    CoordinatorConfig {
        job_scheduler: "job-scheduler.cohort.svc:7001".to_string(),
        model_manager: "model-manager.cohort.svc:7002".to_string(),
        client_selector: "client-selector.cohort.svc:7003".to_string(),
    }
}

/// What job-scheduler's `--launcher kubernetes` can set, all of it.
fn full_launcher_config() -> KubernetesLauncherConfig {
    let mut c = KubernetesLauncherConfig::new("cohort", "ghcr.io/cohort/cohort:0.1.0", services());
    c.image_pull_policy = Some("IfNotPresent".to_string());
    c.command = vec!["/usr/local/bin/coordinator".to_string()];
    c.extra_args = vec!["--log-format".to_string(), "json".to_string()];
    c.env = vec![env("RUST_LOG", "info")];
    c.resources = Some(ResourceRequirements {
        requests: quantities(&[("cpu", "500m"), ("memory", "1Gi")]),
        limits: quantities(&[("memory", "2Gi")]),
        ..Default::default()
    });
    c.tls_secret = Some("coordinator-tls".to_string());
    c.owner = Some(OwnerReference {
        api_version: "apps/v1".to_string(),
        kind: "Deployment".to_string(),
        name: "job-scheduler".to_string(),
        uid: "8d3c0b5e-0000-4000-8000-000000000001".to_string(),
        controller: None,
        block_owner_deletion: None,
    });
    c.service_account = Some("cohort-coordinator".to_string());
    c.metrics_port = Some(9464);
    c
}

/// The coordinator's ConfigMap, Pod and Service, as `launch` posts them.
async fn launched(config: KubernetesLauncherConfig, job: &str) -> Vec<Value> {
    let (client, mut handle) = mock_client();
    let (exits, _exits) = tokio::sync::mpsc::unbounded_channel();
    let namespace = config.namespace.clone();
    let launcher = KubernetesLauncher::new(client, config, exits);
    let job = JobId::parse(job).unwrap();
    let spec = JobSpec::from_json(&spec_json().to_string())
        .unwrap()
        .to_json();
    let base = format!("/api/v1/namespaces/{namespace}");
    let serve = async {
        vec![
            posted(&mut handle, Method::POST, &format!("{base}/configmaps?")).await,
            posted(&mut handle, Method::POST, &format!("{base}/pods?")).await,
            posted(&mut handle, Method::POST, &format!("{base}/services?")).await,
        ]
    };
    let (result, objects) = tokio::join!(launcher.launch(&job, &spec), serve);
    result.unwrap();
    objects
}

// ---- executors ------------------------------------------------------------------------------

/// Everything a party's `executor-pod.json` can say.
fn full_executor_config() -> ExecutorPodConfig {
    let mut c = ExecutorPodConfig::new("party-a", "ghcr.io/cohort/cohort:0.1.0");
    c.image_pull_policy = Some("Always".to_string());
    c.image_pull_secrets = vec![LocalObjectReference {
        name: "registry".to_string(),
    }];
    c.gpus = 1;
    c.resources = Some(ResourceRequirements {
        requests: quantities(&[("cpu", "1"), ("memory", "2Gi")]),
        limits: quantities(&[("memory", "4Gi")]),
        ..Default::default()
    });
    c.node_selector = BTreeMap::from([("cohort.dev/pool".to_string(), "gpu".to_string())]);
    c.tolerations = vec![Toleration {
        key: Some("nvidia.com/gpu".to_string()),
        operator: Some("Exists".to_string()),
        effect: Some("NoSchedule".to_string()),
        ..Default::default()
    }];
    c.affinity = Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "kubernetes.io/arch".to_string(),
                        operator: "In".to_string(),
                        values: Some(vec!["amd64".to_string()]),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    c.pin_to_node = true;
    c.host_network = true;
    c.tls_secret = Some("party-a-tls".to_string());
    c.volumes = vec![Volume {
        name: "data-digits".to_string(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: "digits".to_string(),
            read_only: Some(true),
        }),
        ..Default::default()
    }];
    c.volume_mounts = vec![VolumeMount {
        name: "data-digits".to_string(),
        mount_path: "/data/digits".to_string(),
        read_only: Some(true),
        ..Default::default()
    }];
    c.pod_security_context = Some(PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(10001),
        fs_group: Some(10001),
        ..Default::default()
    });
    c.security_context = Some(SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        ..Default::default()
    });
    c.env = vec![env("COHORT_LOG_FORMAT", "json")];
    c
}

/// An executor's Secret and Pod, as `start` posts them.
async fn started(config: ExecutorPodConfig, owner: ExecutorOwner, task: &str) -> Vec<Value> {
    let (client, mut handle) = mock_client();
    let base = format!("/api/v1/namespaces/{}", config.namespace);
    let executors = KubernetesExecutors::new(client, config, owner).unwrap();
    let serve = async {
        vec![
            posted(&mut handle, Method::POST, &format!("{base}/secrets?")).await,
            posted(&mut handle, Method::POST, &format!("{base}/pods?")).await,
        ]
    };
    let (result, objects) = tokio::join!(executors.start(task, b"\x0a\x04task bytes"), serve);
    result.unwrap();
    objects
}

// ---- FederatedJob status --------------------------------------------------------------------

fn spec_json() -> Value {
    json!({
        "name": "digits-fedavg",
        "model": {"arch": "mlp", "hidden": [128]},
        "data": {"dataset": "digits"},
        "training": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05}},
        "rounds": 10,
        "clients": {"per_round": 3, "min": 2, "round_timeout": "30s"}
    })
}

/// The object as `kubectl apply` leaves it, with the reconciler's finalizer.
fn federated_job(status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "cohort.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {
            "name": "digits", "namespace": "team-a",
            "uid": "6f1c2a9e-0000-4000-8000-00000000abcd",
            "generation": 1, "resourceVersion": "100",
            "finalizers": ["cohort.dev/job"]
        },
        "spec": spec_json()
    });
    if let Some(status) = status {
        obj["status"] = status;
    }
    obj
}

/// RFC 7386: what the API server makes of a merge patch (a null removes the field).
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (key, value) in p {
                if value.is_null() {
                    t.remove(key);
                } else {
                    merge_patch(t.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// One job, as the backend reports it; creating it fails with `refuse` when set.
struct OneJob {
    view: Option<JobView>,
    refuse: Option<BackendError>,
}

#[async_trait]
impl JobBackend for OneJob {
    async fn create(&self, _: &str, _: &JobSpec) -> Result<String, BackendError> {
        match &self.refuse {
            Some(e) => Err(e.clone()),
            None => Ok("digits-fedavg-x1y2z3".to_string()),
        }
    }
    async fn get(&self, _: &str) -> Result<Option<JobView>, BackendError> {
        Ok(self.view.clone())
    }
    async fn stop(&self, _: &str, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    async fn delete(&self, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The FederatedJob after the reconciler's status patch, from `status` before.
async fn reconciled(backend: OneJob, status: Option<Value>) -> Value {
    let (client, mut handle) = mock_client();
    let ctx = Arc::new(Context::new(client, Arc::new(backend)));
    let before = federated_job(status.clone());
    let obj: Arc<FederatedJob> = Arc::new(serde_json::from_value(before.clone()).unwrap());
    let serve = async {
        let patch = next(&mut handle).await;
        assert_eq!(patch.method, Method::PATCH);
        assert_eq!(
            patch.uri,
            "/apis/cohort.dev/v1alpha1/namespaces/team-a/federatedjobs/digits/status?"
        );
        assert_eq!(patch.content_type, "application/merge-patch+json");
        let mut after = before.clone();
        merge_patch(&mut after, &patch.body);
        patch.answer(StatusCode::OK, after.clone());
        after
    };
    let (result, after) = tokio::join!(reconcile(obj, ctx), serve);
    result.unwrap();
    after
}

fn view(state: &str, rounds: u32, accuracy: Option<f64>, reason: &str) -> JobView {
    JobView {
        state: state.to_string(),
        rounds_completed: rounds,
        rounds_total: 10,
        accuracy,
        reason: reason.to_string(),
    }
}

// ---- all of them ----------------------------------------------------------------------------

/// Every object, with a file name saying where it came from.
async fn every_posted_object() -> Vec<(String, Value)> {
    let mut objects = Vec::new();
    let mut add = |what: &str, list: Vec<Value>| {
        for obj in list {
            let kind = obj["kind"].as_str().unwrap().to_lowercase();
            objects.push((format!("{what}.{kind}"), obj));
        }
    };
    let minimal = KubernetesLauncherConfig::new("cohort", "cohort:dev", services());
    add(
        "coordinator-minimal",
        launched(minimal, "digits-fedavg-a1b2c3").await,
    );
    add(
        "coordinator-full",
        launched(full_launcher_config(), "digits-fedavg-x1y2z3").await,
    );

    let insecure = ExecutorOwner {
        party: "party-a".to_string(),
        insecure: true,
        ..Default::default()
    };
    add(
        "executor-minimal",
        started(
            ExecutorPodConfig::new("party-a", "cohort:dev"),
            insecure,
            "t-1",
        )
        .await,
    );
    let owner = ExecutorOwner {
        party: "party_A.example".to_string(),
        pod: Some(pod_owner_reference("task-manager-5d8f-x2", "uid-tm")),
        node: Some("edge-7".to_string()),
        insecure: false,
    };
    add(
        "executor-full",
        started(
            full_executor_config(),
            owner,
            "digits-fedavg-x1y2z3/r3/Train/party_A.example",
        )
        .await,
    );

    let running = OneJob {
        view: Some(view("RUNNING", 3, Some(0.8), "round 3 done")),
        refuse: None,
    };
    add(
        "federatedjob-created",
        vec![reconciled(running, None).await],
    );
    let queued = OneJob {
        view: Some(view("QUEUED", 0, None, "created")),
        refuse: None,
    };
    let was = json!({"jobId": "digits-fedavg-x1y2z3", "state": "RUNNING", "round": 3,
                     "roundsTotal": 10, "accuracy": 0.8, "reason": "round 3 done",
                     "observedGeneration": 1});
    add(
        "federatedjob-nulls-removed",
        vec![reconciled(queued, Some(was.clone())).await],
    );
    let refused = OneJob {
        view: None,
        refuse: Some(BackendError::Invalid(
            "model.hidden: must not be empty".to_string(),
        )),
    };
    add(
        "federatedjob-refused",
        vec![reconciled(refused, None).await],
    );
    let gone = OneJob {
        view: None,
        refuse: None,
    };
    add("federatedjob-gone", vec![reconciled(gone, Some(was)).await]);
    objects
}

#[tokio::test]
async fn every_posted_object_is_valid_against_the_kubernetes_schemas() {
    let objects = every_posted_object().await;
    let kinds: Vec<(&str, &str)> = objects
        .iter()
        .map(|(_, o)| {
            let component = o["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap_or("");
            (o["kind"].as_str().unwrap(), component)
        })
        .collect();
    for wanted in [
        ("ConfigMap", "coordinator"),
        ("Pod", "coordinator"),
        ("Service", "coordinator"),
        ("Secret", "executor"),
        ("Pod", "executor"),
        ("FederatedJob", ""),
    ] {
        assert!(kinds.contains(&wanted), "no {wanted:?} in {kinds:?}");
    }
    for (name, obj) in &objects {
        assert!(
            obj["metadata"]["name"].is_string() && obj["apiVersion"].is_string(),
            "{name}: {obj}"
        );
    }
    // The status patch with nulls leaves no nulls: the API server removes those fields.
    let (_, cleared) = objects
        .iter()
        .find(|(name, _)| name.starts_with("federatedjob-nulls-removed"))
        .unwrap();
    assert!(cleared["status"].get("accuracy").is_none(), "{cleared}");

    let Some(validator) = cohort_testkit::require_env(
        VALIDATOR_VAR,
        "scripts/check-charts.sh, which validates objects with --objects DIR",
    ) else {
        return;
    };
    let dir = write_objects(&objects);
    let (ok, report) = validate(&validator, dir.path());
    assert!(ok, "posted objects the API server would refuse:\n{report}");
    assert!(
        report.contains(&format!("{0} of {0} objects valid", objects.len())),
        "{report}"
    );

    // The validator refuses what the API server would: an unknown field in a Pod, a status
    // field of the wrong type, and one the CRD does not declare.
    let mut broken = Vec::new();
    let (_, pod) = objects
        .iter()
        .find(|(name, _)| name.starts_with("executor-full.pod"))
        .unwrap();
    let mut pod = pod.clone();
    pod["spec"]["containers"][0]["imagePullPolicey"] = json!("Always");
    broken.push(("pod-unknown-field".to_string(), pod));
    let mut job = federated_job(Some(json!({"state": "RUNNING", "round": 3})));
    job["status"]["round"] = json!("three");
    broken.push(("federatedjob-wrong-type".to_string(), job));
    let job = federated_job(Some(json!({"state": "RUNNING", "rounds": 3})));
    broken.push(("federatedjob-undeclared-field".to_string(), job));
    let dir = write_objects(&broken);
    let (ok, report) = validate(&validator, dir.path());
    assert!(!ok, "broken objects passed:\n{report}");
    for (name, _) in &broken {
        assert!(
            report.contains(&format!("ERROR {name}.json")),
            "{name} not refused:\n{report}"
        );
    }
}

/// Writes each object as `<name>.json` into a new directory.
fn write_objects(objects: &[(String, Value)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, obj) in objects {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(obj).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    dir
}

/// Runs the validator on `dir`: whether it passed, and what it said.
fn validate(validator: &str, dir: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new("bash")
        .arg(validator)
        .arg("--objects")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {validator}: {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    (out.status.success(), report)
}
