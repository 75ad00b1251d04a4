//! The Pod of one executor task, for a Kubernetes executor launcher in task-manager.
//!
//! A pure function of the task and the party's config: no client, no I/O, so the whole
//! object is checked in unit tests.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvVar, Pod, PodSpec, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::launcher::{LABEL_COMPONENT, LABEL_NAME};

/// The extended resource GPUs are requested under unless configured otherwise.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";
/// `cohort.dev/task`: the task id (made a valid label value) on executor Pods.
const LABEL_TASK: &str = "cohort.dev/task";
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// The party's placement settings for every executor Pod (from its Helm values).
#[derive(Debug, Clone)]
pub struct ExecutorPodConfig {
    /// Namespace the executor Pods go in.
    pub namespace: String,
    /// The extended resource GPUs are counted in (`nvidia.com/gpu`, `amd.com/gpu`, ...).
    pub gpu_resource: String,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub affinity: Option<Affinity>,
    pub image_pull_policy: Option<String>,
    pub service_account: Option<String>,
    /// Owner of the Pods (task-manager's Pod or Deployment), for garbage collection.
    pub owner: Option<OwnerReference>,
}

impl ExecutorPodConfig {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            gpu_resource: DEFAULT_GPU_RESOURCE.to_string(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            image_pull_policy: None,
            service_account: None,
            owner: None,
        }
    }
}

/// One task's executor.
#[derive(Debug, Clone, Default)]
pub struct ExecutorPodSpec {
    pub task_id: String,
    pub image: String,
    /// The container's arguments (the image's entrypoint runs the executor).
    pub args: Vec<String>,
    /// Environment, in order.
    pub env: Vec<(String, String)>,
    /// CPU request, e.g. `"2"` or `"500m"`.
    pub cpu: Option<String>,
    /// Memory request, e.g. `"4Gi"`.
    pub memory: Option<String>,
    /// GPUs, requested and limited under [`ExecutorPodConfig::gpu_resource`] (extended
    /// resources need limit = request).
    pub gpus: u32,
    /// Run on this node only (an edge party's own node, e.g. under KubeEdge): a
    /// `kubernetes.io/hostname` node selector, so the scheduler still checks resources
    /// and taints.
    pub pin_to_node: Option<String>,
}

/// `executor-<task id>`, lower-cased, other characters as `-`, at most 63 characters.
pub fn executor_pod_name(task_id: &str) -> String {
    let name = format!("executor-{}", label_value(task_id));
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// A label value: `[a-z0-9-]`, at most 63, alphanumeric at both ends.
fn label_value(s: &str) -> String {
    let v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    v.trim_matches('-').to_string()
}

/// The executor Pod for `spec` placed by `config`.
pub fn executor_pod(spec: &ExecutorPodSpec, config: &ExecutorPodConfig) -> Pod {
    let labels = BTreeMap::from([
        (LABEL_NAME.to_string(), "cohort".to_string()),
        (LABEL_COMPONENT.to_string(), "executor".to_string()),
        (LABEL_TASK.to_string(), label_value(&spec.task_id)),
    ]);
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &spec.cpu {
        requests.insert("cpu".to_string(), Quantity(cpu.clone()));
    }
    if let Some(memory) = &spec.memory {
        requests.insert("memory".to_string(), Quantity(memory.clone()));
    }
    if spec.gpus > 0 {
        let n = Quantity(spec.gpus.to_string());
        requests.insert(config.gpu_resource.clone(), n.clone());
        limits.insert(config.gpu_resource.clone(), n);
    }
    let resources = (!requests.is_empty()).then(|| ResourceRequirements {
        requests: Some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    });
    let mut node_selector = config.node_selector.clone();
    if let Some(node) = &spec.pin_to_node {
        node_selector.insert(HOSTNAME_LABEL.to_string(), node.clone());
    }
    let env: Vec<EnvVar> = spec
        .env
        .iter()
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            ..Default::default()
        })
        .collect();
    Pod {
        metadata: ObjectMeta {
            name: Some(executor_pod_name(&spec.task_id)),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels),
            owner_references: config.owner.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_string()),
            service_account_name: config.service_account.clone(),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!config.tolerations.is_empty()).then(|| config.tolerations.clone()),
            affinity: config.affinity.clone(),
            containers: vec![Container {
                name: "executor".to_string(),
                image: Some(spec.image.clone()),
                image_pull_policy: config.image_pull_policy.clone(),
                args: (!spec.args.is_empty()).then(|| spec.args.clone()),
                env: (!env.is_empty()).then_some(env),
                resources,
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    };
    use serde_json::json;

    fn config() -> ExecutorPodConfig {
        let mut c = ExecutorPodConfig::new("party-a");
        c.node_selector = BTreeMap::from([("pool".to_string(), "gpu".to_string())]);
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
                            key: "zone".to_string(),
                            operator: "In".to_string(),
                            values: Some(vec!["eu-1".to_string()]),
                        }]),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        c
    }

    #[test]
    fn gpu_task_pinned_to_an_edge_node() {
        let spec = ExecutorPodSpec {
            task_id: "Task_42".to_string(),
            image: "ghcr.io/cohort/executor:1".to_string(),
            args: vec!["--task".to_string(), "Task_42".to_string()],
            env: vec![("COHORT_PROXY".to_string(), "proxy:443".to_string())],
            cpu: Some("2".to_string()),
            memory: Some("4Gi".to_string()),
            gpus: 1,
            pin_to_node: Some("edge-node-7".to_string()),
        };
        let pod = serde_json::to_value(executor_pod(&spec, &config())).expect("json");
        assert_eq!(
            pod,
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "executor-task-42",
                    "namespace": "party-a",
                    "labels": {
                        "app.kubernetes.io/name": "cohort",
                        "app.kubernetes.io/component": "executor",
                        "cohort.dev/task": "task-42"
                    }
                },
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"pool": "gpu", "kubernetes.io/hostname": "edge-node-7"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "zone", "operator": "In", "values": ["eu-1"]}
                        ]}]
                    }}},
                    "containers": [{
                        "name": "executor",
                        "image": "ghcr.io/cohort/executor:1",
                        "args": ["--task", "Task_42"],
                        "env": [{"name": "COHORT_PROXY", "value": "proxy:443"}],
                        "resources": {
                            "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
                            "limits": {"nvidia.com/gpu": "1"}
                        }
                    }]
                }
            })
        );
    }

    #[test]
    fn cpu_only_task_with_another_gpu_key_and_no_placement() {
        let mut c = ExecutorPodConfig::new("p");
        c.gpu_resource = "amd.com/gpu".to_string();
        let spec = ExecutorPodSpec {
            task_id: "t1".to_string(),
            image: "img".to_string(),
            ..Default::default()
        };
        let pod = serde_json::to_value(executor_pod(&spec, &c)).expect("json");
        assert_eq!(
            pod["spec"],
            json!({
                "restartPolicy": "Never",
                "containers": [{"name": "executor", "image": "img"}]
            })
        );
        let spec = ExecutorPodSpec { gpus: 2, ..spec };
        let pod = serde_json::to_value(executor_pod(&spec, &c)).expect("json");
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"requests": {"amd.com/gpu": "2"}, "limits": {"amd.com/gpu": "2"}})
        );
    }

    #[test]
    fn names_are_valid_whatever_the_task_id() {
        assert_eq!(executor_pod_name("abc"), "executor-abc");
        let long = executor_pod_name(&"x".repeat(100));
        assert_eq!(long.len(), 63);
        assert_eq!(executor_pod_name("a/b__"), "executor-a-b");
    }
}
