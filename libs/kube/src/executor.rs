//! Executors as Pods: task-manager's Kubernetes executor launcher.
//!
//! One task is one `Secret` plus one `Pod`, both named `executor-<task id>`:
//!
//! - the Secret holds the task file (`task.pb`: the task, its token, where to find the data) and
//!   is mounted read-only into the Pod, so the task token never sits on a disk of its own;
//! - the Pod runs the executor image with `--task-file` pointing at it, the party's TLS Secret
//!   mounted for mutual TLS with the proxy, the party's dataset volumes mounted at the paths the
//!   task-manager sees them at (the task file names dataset files by those paths), the CPU and
//!   memory requests of the party's config, GPUs under its resource key, and its placement
//!   (nodeSelector, tolerations, affinity; an edge party pins executors to its own node).
//!
//! Both carry an owner reference to the task-manager's Pod (when it says which it is), so they
//! are garbage-collected with it. [`KubernetesExecutors::wait`] polls the Pod until it ends;
//! [`KubernetesExecutors::remove`] deletes both. Pods left by an earlier task-manager of the
//! party are deleted at start ([`KubernetesExecutors::remove_leftovers`]): their sessions and
//! reports are gone, and the coordinator re-offers their tasks.
//!
//! The objects are pure functions of the config and the task ([`executor_pod`],
//! [`executor_secret`]); the tests check them whole.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Affinity, Container, EmptyDirVolumeSource, EnvVar, LocalObjectReference,
    NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, Secret, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use serde::{Deserialize, Serialize};

use crate::launcher::{LABEL_COMPONENT, LABEL_NAME, describe_end};
use crate::objects::{TlsSecretMount, is_status, read_only_mount, secret_volume};

/// The extended resource GPUs are requested under unless configured otherwise.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";
/// `cohort.dev/task`: the task id (made a valid label value) on executor Pods and Secrets.
pub const LABEL_TASK: &str = "cohort.dev/task";
/// `cohort.dev/party`: the party whose task-manager created the Pod.
pub const LABEL_PARTY: &str = "cohort.dev/party";
/// Where the task Secret is mounted; the executor reads [`TASK_FILE`] there.
pub const TASK_MOUNT: &str = "/var/run/cohort/task";
/// The executor's task file inside the Pod.
pub const TASK_FILE: &str = "/var/run/cohort/task/task.pb";
/// Where the party's TLS Secret is mounted.
pub const TLS_MOUNT: &str = "/var/run/cohort/tls";
const CONTAINER: &str = "executor";
/// The task Secret's key (the file name under [`TASK_MOUNT`]).
const TASK_KEY: &str = "task.pb";
/// Secret files readable by the owner and the Pod's fsGroup only.
const SECRET_MODE: i32 = 0o440;

/// The party's settings for every executor Pod: task-manager's `--executor-pod-config` file,
/// written by the client chart (JSON, camelCase; unknown keys are refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutorPodConfig {
    /// Namespace the executor Pods and Secrets go in.
    pub namespace: String,
    /// The image holding the `executor` binary.
    pub image: String,
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    #[serde(default)]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// The command run in the image; the launcher adds the arguments.
    #[serde(default = "default_command")]
    pub command: Vec<String>,
    /// The extended resource GPUs are counted in (`nvidia.com/gpu`, `amd.com/gpu`, ...).
    #[serde(default = "default_gpu_resource")]
    pub gpu_resource: String,
    /// GPUs per executor, requested and limited under `gpuResource` (extended resources need
    /// limit = request).
    #[serde(default)]
    pub gpus: u32,
    /// CPU and memory requests and limits of the executor container.
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// Run executors on the task-manager's own node (an edge party, e.g. under KubeEdge): a
    /// required node affinity on the node's name, so the scheduler still checks resources and
    /// taints.
    #[serde(default)]
    pub pin_to_node: bool,
    /// Use the node's network (an edge node without a pod network; with `pinToNode`, the
    /// task-manager's node). DNS then follows `ClusterFirstWithHostNet`.
    #[serde(default)]
    pub host_network: bool,
    /// A Secret with `tls.crt`, `tls.key` (the party's certificate) and `ca.crt`; mounted
    /// read-only, `COHORT_TLS_CERT`/`KEY`/`CA` point at it. Required unless task-manager
    /// runs `--insecure`.
    #[serde(default)]
    pub tls_secret: Option<String>,
    /// The party's data volumes; `volumeMounts` put them where task-manager sees them.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    pub pod_security_context: Option<PodSecurityContext>,
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
    /// More environment variables of the executor (e.g. `COHORT_LOG_FORMAT`).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// How often a running executor's Pod is looked at.
    #[serde(default = "default_poll_seconds")]
    pub poll_interval_seconds: u32,
}

fn default_command() -> Vec<String> {
    vec!["/usr/local/bin/executor".to_string()]
}
fn default_gpu_resource() -> String {
    DEFAULT_GPU_RESOURCE.to_string()
}
fn default_poll_seconds() -> u32 {
    2
}

/// A config file that cannot be used; names the file and the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorConfigError {
    #[error("{file}: {message}")]
    Read { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

impl ExecutorPodConfig {
    /// A config with the defaults: no resources, placement, TLS or volumes.
    pub fn new(namespace: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            image: image.into(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            command: default_command(),
            gpu_resource: default_gpu_resource(),
            gpus: 0,
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            pin_to_node: false,
            host_network: false,
            tls_secret: None,
            volumes: Vec::new(),
            volume_mounts: Vec::new(),
            pod_security_context: None,
            security_context: None,
            env: Vec::new(),
            poll_interval_seconds: default_poll_seconds(),
        }
    }

    /// Reads and checks the config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ExecutorConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ExecutorConfigError::Read {
            file: file.clone(),
            message: e.to_string(),
        })?;
        // Parsed once; the typed config is read from that document.
        let written: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ExecutorConfigError::Read {
                file: file.clone(),
                message: e.to_string(),
            })?;
        let config: Self = serde_path_to_error::deserialize(&written).map_err(|e| {
            ExecutorConfigError::Invalid {
                file: file.clone(),
                field: e.path().to_string(),
                message: e.inner().to_string(),
            }
        })?;
        // The Kubernetes types inside (volumes, tolerations, ...) ignore unknown keys; a
        // misspelt one would silently drop a setting, so compare with a round trip.
        let read = serde_json::to_value(&config).map_err(|e| ExecutorConfigError::Read {
            file: file.clone(),
            message: e.to_string(),
        })?;
        if let Some(field) = unknown_field(&written, &read, String::new()) {
            return Err(ExecutorConfigError::Invalid {
                file,
                field,
                message: "unknown field".to_string(),
            });
        }
        config
            .validate()
            .map_err(|(field, message)| ExecutorConfigError::Invalid {
                file,
                field: field.to_string(),
                message,
            })?;
        Ok(config)
    }

    /// Checks what the API server would refuse only when the first task comes.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !cohort_core::is_dns_label(&self.namespace) {
            return Err((
                "namespace",
                format!("{:?} is not a DNS-1123 label", self.namespace),
            ));
        }
        if self.image.trim().is_empty() {
            return Err(("image", "must not be empty".to_string()));
        }
        if self.command.is_empty() {
            return Err(("command", "must name the executor binary".to_string()));
        }
        if self.gpu_resource.is_empty() || !self.gpu_resource.contains('/') {
            return Err((
                "gpuResource",
                format!(
                    "{:?} is not an extended resource name (vendor/resource)",
                    self.gpu_resource
                ),
            ));
        }
        if self.poll_interval_seconds == 0 {
            return Err(("pollIntervalSeconds", "must be at least 1".to_string()));
        }
        if let Some(secret) = &self.tls_secret
            && secret.is_empty()
        {
            return Err(("tlsSecret", "must not be empty".to_string()));
        }
        const RESERVED: [&str; 3] = ["task", "tls", "tmp"];
        for v in &self.volumes {
            if RESERVED.contains(&v.name.as_str()) {
                return Err((
                    "volumes",
                    format!(
                        "the name {:?} is taken by the launcher's own volumes",
                        v.name
                    ),
                ));
            }
        }
        for m in &self.volume_mounts {
            if !self.volumes.iter().any(|v| v.name == m.name) {
                return Err((
                    "volumeMounts",
                    format!("{:?} names no entry of volumes", m.name),
                ));
            }
            if [TASK_MOUNT, TLS_MOUNT, "/tmp"].contains(&m.mount_path.as_str()) {
                return Err((
                    "volumeMounts",
                    format!("{} is taken by the launcher's own mounts", m.mount_path),
                ));
            }
        }
        Ok(())
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.poll_interval_seconds))
    }
}

/// The path of the first key of `written` that `read` (the same document parsed and written
/// back) lacks. Nulls count as absent.
fn unknown_field(
    written: &serde_json::Value,
    read: &serde_json::Value,
    path: String,
) -> Option<String> {
    use serde_json::Value;
    match (written, read) {
        (Value::Object(w), Value::Object(r)) => w.iter().find_map(|(key, value)| {
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match r.get(key) {
                _ if value.is_null() => None,
                None => Some(here),
                Some(read) => unknown_field(value, read, here),
            }
        }),
        (Value::Array(w), Value::Array(r)) => w
            .iter()
            .zip(r)
            .enumerate()
            .find_map(|(i, (w, r))| unknown_field(w, r, format!("{path}[{i}]"))),
        _ => None,
    }
}

/// Who created the executors: the party, its task-manager's Pod and node (downward API).
#[derive(Debug, Clone, Default)]
pub struct ExecutorOwner {
    pub party: String,
    /// The task-manager's Pod, for owner references.
    pub pod: Option<OwnerReference>,
    /// The node the task-manager runs on; required with `pinToNode`.
    pub node: Option<String>,
    /// Executors dial the proxy without TLS (task-manager `--insecure`): no `tlsSecret`
    /// needed.
    pub insecure: bool,
}

/// The owner reference of a Pod named `name` with `uid` (the task-manager's own).
pub fn pod_owner_reference(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_string(),
        kind: "Pod".to_string(),
        name: name.to_string(),
        uid: uid.to_string(),
        controller: Some(true),
        block_owner_deletion: None,
    }
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

fn executor_selector(party: &str) -> String {
    format!(
        "{LABEL_NAME}=cohort,{LABEL_COMPONENT}=executor,{LABEL_PARTY}={}",
        label_value(party)
    )
}

fn metadata(task_id: &str, config: &ExecutorPodConfig, owner: &ExecutorOwner) -> ObjectMeta {
    ObjectMeta {
        name: Some(executor_pod_name(task_id)),
        namespace: Some(config.namespace.clone()),
        labels: Some(BTreeMap::from([
            (LABEL_NAME.to_string(), "cohort".to_string()),
            (LABEL_COMPONENT.to_string(), "executor".to_string()),
            (LABEL_TASK.to_string(), label_value(task_id)),
            (LABEL_PARTY.to_string(), label_value(&owner.party)),
        ])),
        owner_references: owner.pod.clone().map(|o| vec![o]),
        ..Default::default()
    }
}

/// The Secret holding one task's file (immutable: a task never changes).
pub fn executor_secret(
    task_id: &str,
    task_file: &[u8],
    config: &ExecutorPodConfig,
    owner: &ExecutorOwner,
) -> Secret {
    Secret {
        metadata: metadata(task_id, config, owner),
        type_: Some("Opaque".to_string()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            TASK_KEY.to_string(),
            ByteString(task_file.to_vec()),
        )])),
        ..Default::default()
    }
}

/// The executor Pod of one task.
pub fn executor_pod(task_id: &str, config: &ExecutorPodConfig, owner: &ExecutorOwner) -> Pod {
    let mut resources = config.resources.clone().unwrap_or_default();
    if config.gpus > 0 {
        let n = Quantity(config.gpus.to_string());
        resources
            .requests
            .get_or_insert_with(BTreeMap::new)
            .insert(config.gpu_resource.clone(), n.clone());
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(config.gpu_resource.clone(), n);
    }
    let resources =
        (resources.requests.is_some() || resources.limits.is_some() || resources.claims.is_some())
            .then_some(resources);
    let node_selector = &config.node_selector;
    let mut affinity = config
        .affinity
        .clone()
        .filter(|a| a != &Affinity::default());
    if config.pin_to_node
        && let Some(node) = &owner.node
    {
        affinity = Some(pin_to_node(affinity.unwrap_or_default(), node));
    }
    let name = executor_pod_name(task_id);
    let args = vec!["--task-file".to_string(), TASK_FILE.to_string()];
    let mut env = Vec::new();
    let mut volumes = vec![
        secret_volume("task", &name, Some(SECRET_MODE)),
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("256Mi".to_string())),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        read_only_mount("task", TASK_MOUNT),
        VolumeMount {
            name: "tmp".to_string(),
            mount_path: "/tmp".to_string(),
            ..Default::default()
        },
    ];
    if let Some(secret) = &config.tls_secret {
        let tls = TlsSecretMount::new(secret, TLS_MOUNT, Some(SECRET_MODE));
        env.extend(tls.env);
        volumes.push(tls.volume);
        mounts.push(tls.mount);
    }
    env.extend(config.env.iter().cloned());
    volumes.extend(config.volumes.iter().cloned());
    mounts.extend(config.volume_mounts.iter().cloned());
    Pod {
        metadata: metadata(task_id, config, owner),
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_string()),
            // The executor never talks to the Kubernetes API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            host_network: config.host_network.then_some(true),
            dns_policy: config
                .host_network
                .then(|| "ClusterFirstWithHostNet".to_string()),
            image_pull_secrets: (!config.image_pull_secrets.is_empty())
                .then(|| config.image_pull_secrets.clone()),
            security_context: config.pod_security_context.clone(),
            node_selector: (!node_selector.is_empty()).then(|| node_selector.clone()),
            tolerations: (!config.tolerations.is_empty()).then(|| config.tolerations.clone()),
            affinity,
            containers: vec![Container {
                name: CONTAINER.to_string(),
                image: Some(config.image.clone()),
                image_pull_policy: config.image_pull_policy.clone(),
                command: Some(config.command.clone()),
                args: Some(args),
                env: (!env.is_empty()).then_some(env),
                resources,
                security_context: config.security_context.clone(),
                volume_mounts: Some(mounts),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

/// `affinity` plus "only on `node`": a required `metadata.name` field match (as the DaemonSet
/// controller pins Pods), added to every required term since terms are alternatives. Unlike
/// `spec.nodeName` it goes through the scheduler (resources, taints); unlike the
/// `kubernetes.io/hostname` label it holds where hostnames and node names differ.
fn pin_to_node(mut affinity: Affinity, node: &str) -> Affinity {
    let only_node = NodeSelectorRequirement {
        key: "metadata.name".to_string(),
        operator: "In".to_string(),
        values: Some(vec![node.to_string()]),
    };
    let node_affinity = affinity.node_affinity.get_or_insert_with(Default::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(Default::default);
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_fields
            .get_or_insert_with(Vec::new)
            .push(only_node.clone());
    }
    affinity
}

/// How an executor Pod ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorEnd {
    Succeeded,
    /// Why, for the task's status: the Pod's exit, reason and the log's last line.
    Failed(String),
}

/// Why an executor could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorPodError {
    #[error("cannot create {what}: {source}")]
    Create {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("pinToNode: task-manager's node is unknown (COHORT_NODE_NAME, from the downward API)")]
    NoNode,
    #[error(
        "tlsSecret: required, executors dial the proxy over mutual TLS (unless task-manager \
         runs --insecure)"
    )]
    NoTlsSecret,
}

/// Container waiting reasons that will not fix themselves.
const HOPELESS: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Whether the Pod has ended, and how.
fn pod_end(pod: &Pod) -> Option<ExecutorEnd> {
    let status = pod.status.as_ref()?;
    let container = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER);
    let state = container.and_then(|c| c.state.as_ref());
    if let Some(waiting) = state.and_then(|s| s.waiting.as_ref())
        && let Some(reason) = waiting.reason.as_deref()
        && HOPELESS.contains(&reason)
    {
        let message = waiting.message.as_deref().unwrap_or("");
        return Some(ExecutorEnd::Failed(
            format!("executor pod cannot start: {reason} {message}")
                .trim_end()
                .to_string(),
        ));
    }
    match status.phase.as_deref() {
        Some("Succeeded") => Some(ExecutorEnd::Succeeded),
        Some("Failed") => Some(ExecutorEnd::Failed(describe_end(
            "executor pod failed".to_string(),
            state.and_then(|s| s.terminated.as_ref()),
            status,
        ))),
        _ => None,
    }
}

/// Executor Pods of one party (see the module docs).
pub struct KubernetesExecutors {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    config: ExecutorPodConfig,
    owner: ExecutorOwner,
}

impl KubernetesExecutors {
    /// Executors of `owner.party` through `client`. Fails when the config pins executors to
    /// the task-manager's node and that node is unknown.
    pub fn new(
        client: kube::Client,
        config: ExecutorPodConfig,
        owner: ExecutorOwner,
    ) -> Result<Self, ExecutorPodError> {
        Self::check(&config, &owner)?;
        Ok(Self {
            pods: Api::namespaced(client.clone(), &config.namespace),
            secrets: Api::namespaced(client, &config.namespace),
            config,
            owner,
        })
    }

    /// What [`new`](Self::new) refuses, without a client: check it before connecting.
    pub fn check(
        config: &ExecutorPodConfig,
        owner: &ExecutorOwner,
    ) -> Result<(), ExecutorPodError> {
        if config.pin_to_node && owner.node.as_deref().is_none_or(str::is_empty) {
            return Err(ExecutorPodError::NoNode);
        }
        if config.tls_secret.is_none() && !owner.insecure {
            return Err(ExecutorPodError::NoTlsSecret);
        }
        Ok(())
    }

    pub fn config(&self) -> &ExecutorPodConfig {
        &self.config
    }

    /// Deletes the executor Pods (and their Secrets) an earlier task-manager of this party
    /// left. Returns how many Pods there were.
    pub async fn remove_leftovers(&self) -> Result<usize, kube::Error> {
        let lp = ListParams::default().labels(&executor_selector(&self.owner.party));
        let pods = self.pods.list(&lp).await?.items;
        for pod in &pods {
            if let Some(name) = &pod.metadata.name {
                self.remove_named(name, Duration::ZERO).await;
            }
        }
        Ok(pods.len())
    }

    /// Creates the task's Secret, then its Pod. A Secret or Pod of the same name (a task
    /// offered again after a task-manager restart) is replaced.
    pub async fn start(&self, task_id: &str, task_file: &[u8]) -> Result<(), ExecutorPodError> {
        let name = executor_pod_name(task_id);
        let secret = executor_secret(task_id, task_file, &self.config, &self.owner);
        let pod = executor_pod(task_id, &self.config, &self.owner);
        let pp = PostParams::default();
        let create_error = |what: &str, source| ExecutorPodError::Create {
            what: format!("{what} {name}"),
            source,
        };
        match self.secrets.create(&pp, &secret).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => {
                self.remove_named(&name, Duration::ZERO).await;
                self.secrets
                    .create(&pp, &secret)
                    .await
                    .map_err(|e| create_error("secret", e))?;
            }
            Err(e) => return Err(create_error("secret", e)),
        }
        match self.pods.create(&pp, &pod).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.secrets.delete(&name, &DeleteParams::default()).await;
                Err(create_error("pod", e))
            }
        }
    }

    /// Waits for the task's Pod to end, looking every `pollIntervalSeconds`; gives up at
    /// `deadline` (the task's own, from the coordinator). API errors are logged and retried.
    pub async fn wait(&self, task_id: &str, deadline: tokio::time::Instant) -> ExecutorEnd {
        let name = executor_pod_name(task_id);
        let interval = self.config.poll_interval();
        loop {
            match self.pods.get_opt(&name).await {
                Ok(None) => return ExecutorEnd::Failed("executor pod deleted".to_string()),
                Ok(Some(pod)) => match pod_end(&pod) {
                    Some(ExecutorEnd::Failed(how)) => {
                        let line = self.last_log_line(&name).await;
                        return ExecutorEnd::Failed(if line.is_empty() {
                            how
                        } else {
                            format!("{how}: {line}")
                        });
                    }
                    Some(end) => return end,
                    None => {}
                },
                Err(e) => tracing::warn!(pod = %name, error = %e, "cannot read executor pod"),
            }
            if tokio::time::Instant::now() + interval > deadline {
                return ExecutorEnd::Failed(
                    "executor pod did not end before the task's deadline".to_string(),
                );
            }
            tokio::time::sleep(interval).await;
        }
    }

    async fn last_log_line(&self, name: &str) -> String {
        let lp = LogParams {
            container: Some(CONTAINER.to_string()),
            tail_lines: Some(20),
            ..Default::default()
        };
        match self.pods.logs(name, &lp).await {
            Ok(log) => log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.chars().take(300).collect())
                .unwrap_or_default(),
            Err(e) => {
                tracing::debug!(pod = %name, error = %e, "no executor log");
                String::new()
            }
        }
    }

    /// Deletes the task's Pod (`grace` for the executor to exit) and Secret; gone is fine.
    pub async fn remove(&self, task_id: &str, grace: Duration) {
        self.remove_named(&executor_pod_name(task_id), grace).await;
    }

    async fn remove_named(&self, name: &str, grace: Duration) {
        let grace = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX);
        if let Err(e) = self
            .pods
            .delete(name, &DeleteParams::default().grace_period(grace))
            .await
            && !is_status(&e, 404)
        {
            tracing::warn!(pod = %name, error = %e, "cannot delete executor pod");
        }
        if let Err(e) = self.secrets.delete(name, &DeleteParams::default()).await
            && !is_status(&e, 404)
        {
            tracing::warn!(secret = %name, error = %e, "cannot delete executor task secret");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAffinity, NodeSelector};
    use serde_json::json;

    fn owner() -> ExecutorOwner {
        ExecutorOwner {
            party: "hospital_a".to_string(),
            pod: Some(pod_owner_reference("task-manager-7c9d", "uid-1")),
            node: Some("edge-node-7".to_string()),
            insecure: false,
        }
    }

    fn config() -> ExecutorPodConfig {
        let mut c = ExecutorPodConfig::new("party-a", "ghcr.io/cohort/cohort:1");
        c.gpus = 1;
        c.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("2".to_string())),
                ("memory".to_string(), Quantity("4Gi".to_string())),
            ])),
            ..Default::default()
        });
        c.pin_to_node = true;
        c.tls_secret = Some("hospital-a-tls".to_string());
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
        c.volumes = vec![Volume {
            name: "data-digits".to_string(),
            host_path: Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
                path: "/srv/digits".to_string(),
                type_: Some("Directory".to_string()),
            }),
            ..Default::default()
        }];
        c.volume_mounts = vec![read_only_mount("data-digits", "/data/digits")];
        c.env = vec![EnvVar {
            name: "COHORT_LOG_FORMAT".to_string(),
            value: Some("json".to_string()),
            ..Default::default()
        }];
        c
    }

    #[test]
    fn gpu_task_pinned_to_an_edge_node() {
        let pod = serde_json::to_value(executor_pod("Task_42", &config(), &owner())).unwrap();
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
                        "cohort.dev/task": "task-42",
                        "cohort.dev/party": "hospital-a"
                    },
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Pod",
                        "name": "task-manager-7c9d", "uid": "uid-1", "controller": true}]
                },
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "nodeSelector": {"pool": "gpu"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{
                            "matchExpressions": [
                                {"key": "zone", "operator": "In", "values": ["eu-1"]}
                            ],
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": ["edge-node-7"]}
                            ]
                        }]
                    }}},
                    "containers": [{
                        "name": "executor",
                        "image": "ghcr.io/cohort/cohort:1",
                        "command": ["/usr/local/bin/executor"],
                        "args": ["--task-file", "/var/run/cohort/task/task.pb"],
                        "env": [
                            {"name": "COHORT_TLS_CERT", "value": "/var/run/cohort/tls/tls.crt"},
                            {"name": "COHORT_TLS_KEY", "value": "/var/run/cohort/tls/tls.key"},
                            {"name": "COHORT_TLS_CA", "value": "/var/run/cohort/tls/ca.crt"},
                            {"name": "COHORT_LOG_FORMAT", "value": "json"}
                        ],
                        "resources": {
                            "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
                            "limits": {"nvidia.com/gpu": "1"}
                        },
                        "volumeMounts": [
                            {"name": "task", "mountPath": "/var/run/cohort/task", "readOnly": true},
                            {"name": "tmp", "mountPath": "/tmp"},
                            {"name": "tls", "mountPath": "/var/run/cohort/tls", "readOnly": true},
                            {"name": "data-digits", "mountPath": "/data/digits", "readOnly": true}
                        ]
                    }],
                    "volumes": [
                        {"name": "task", "secret": {"secretName": "executor-task-42", "defaultMode": 288}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                        {"name": "tls", "secret": {"secretName": "hospital-a-tls", "defaultMode": 288}},
                        {"name": "data-digits", "hostPath": {"path": "/srv/digits", "type": "Directory"}}
                    ]
                }
            })
        );
    }

    #[test]
    fn cpu_only_task_with_another_gpu_key_and_no_placement() {
        let mut c = ExecutorPodConfig::new("p", "img");
        c.gpu_resource = "amd.com/gpu".to_string();
        let insecure = ExecutorOwner {
            party: "p1".to_string(),
            insecure: true,
            ..Default::default()
        };
        let pod = serde_json::to_value(executor_pod("t1", &c, &insecure)).unwrap();
        let spec = &pod["spec"];
        assert!(spec.get("nodeSelector").is_none());
        assert!(spec.get("affinity").is_none());
        assert!(spec["containers"][0].get("resources").is_none());
        assert!(spec["containers"][0].get("env").is_none(), "no TLS env");
        assert!(spec.get("hostNetwork").is_none());
        c.host_network = true;
        let pod = serde_json::to_value(executor_pod("t1", &c, &insecure)).unwrap();
        assert_eq!(pod["spec"]["hostNetwork"], true);
        assert_eq!(pod["spec"]["dnsPolicy"], "ClusterFirstWithHostNet");
        c.gpus = 2;
        c.pin_to_node = true;
        let on_node = ExecutorOwner {
            node: Some("n1".to_string()),
            ..insecure
        };
        let pod = serde_json::to_value(executor_pod("t1", &c, &on_node)).unwrap();
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"requests": {"amd.com/gpu": "2"}, "limits": {"amd.com/gpu": "2"}})
        );
        assert_eq!(
            pod["spec"]["affinity"],
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": ["n1"]}
                ]}]
            }}})
        );
    }

    #[test]
    fn the_secret_holds_the_task_file() {
        let s =
            serde_json::to_value(executor_secret("t1", b"\x0a\x01x", &config(), &owner())).unwrap();
        assert_eq!(s["metadata"]["name"], "executor-t1");
        assert_eq!(s["immutable"], true);
        assert_eq!(s["type"], "Opaque");
        assert_eq!(s["data"], json!({"task.pb": "CgF4"}));
        assert_eq!(s["metadata"]["ownerReferences"][0]["kind"], "Pod");
    }

    #[test]
    fn names_are_valid_whatever_the_task_id() {
        assert_eq!(executor_pod_name("abc"), "executor-abc");
        let long = executor_pod_name(&"x".repeat(100));
        assert_eq!(long.len(), 63);
        assert_eq!(executor_pod_name("a/b__"), "executor-a-b");
    }

    fn load(text: &str) -> Result<ExecutorPodConfig, ExecutorConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executor-pod.json");
        std::fs::write(&path, text).unwrap();
        ExecutorPodConfig::load(&path)
    }

    #[test]
    fn config_files_are_checked_field_by_field() {
        let ok = load(
            r#"{"namespace": "party-a", "image": "cohort:1", "gpus": 1,
                "resources": {"requests": {"cpu": "1"}}, "pinToNode": true,
                "volumes": [{"name": "data", "hostPath": {"path": "/srv"}}],
                "volumeMounts": [{"name": "data", "mountPath": "/srv", "readOnly": true}]}"#,
        )
        .unwrap();
        assert_eq!(ok.gpu_resource, DEFAULT_GPU_RESOURCE);
        assert_eq!(ok.poll_interval(), Duration::from_secs(2));
        assert_eq!(ok.command, vec!["/usr/local/bin/executor"]);

        let cases = [
            (r#"{"image": "x"}"#, "missing field `namespace`"),
            (r#"{"namespace": "A_b", "image": "x"}"#, "namespace"),
            (r#"{"namespace": "a", "image": " "}"#, "image"),
            (
                r#"{"namespace": "a", "image": "x", "gpu": 1}"#,
                "unknown field `gpu`",
            ),
            (r#"{"namespace": "a", "image": "x", "gpus": -1}"#, "gpus"),
            (
                r#"{"namespace": "a", "image": "x", "tolerations": [{"efect": "x"}]}"#,
                "tolerations[0].efect: unknown field",
            ),
            (
                r#"{"namespace": "a", "image": "x", "gpuResource": "gpu"}"#,
                "gpuResource",
            ),
            (
                r#"{"namespace": "a", "image": "x", "volumeMounts": [{"name": "d", "mountPath": "/d"}]}"#,
                "volumeMounts: \"d\" names no entry",
            ),
            (
                r#"{"namespace": "a", "image": "x", "volumes": [{"name": "tls", "emptyDir": {}}]}"#,
                "volumes",
            ),
            (
                r#"{"namespace": "a", "image": "x", "pollIntervalSeconds": 0}"#,
                "pollIntervalSeconds",
            ),
            (
                r#"{"namespace": "a", "image": "x", "volumes": [{"name": "d", "hostpath": {"path": "/d"}}]}"#,
                "volumes[0].hostpath: unknown field",
            ),
            ("not json", "executor-pod.json"),
        ];
        for (text, expected) in cases {
            let err = load(text).expect_err(text).to_string();
            assert!(err.contains("executor-pod.json"), "{err}");
            assert!(err.contains(expected), "{text}: {err}");
        }
        let missing = ExecutorPodConfig::load(std::path::Path::new("/nonexistent/x.json"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/x.json"), "{missing}");
    }

    #[test]
    fn pod_ends_are_read_from_the_status() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {}, "status": status})).unwrap()
        };
        assert_eq!(pod_end(&pod(json!({"phase": "Running"}))), None);
        assert_eq!(pod_end(&pod(json!({"phase": "Pending"}))), None);
        assert_eq!(
            pod_end(&pod(json!({"phase": "Succeeded"}))),
            Some(ExecutorEnd::Succeeded)
        );
        assert_eq!(
            pod_end(&pod(json!({"phase": "Failed", "containerStatuses": [{
                "name": "executor", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}))),
            Some(ExecutorEnd::Failed(
                "executor pod failed: exit status 137 (OOMKilled)".to_string()
            ))
        );
        assert_eq!(
            pod_end(&pod(json!({"phase": "Pending", "containerStatuses": [{
                "name": "executor", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}))),
            Some(ExecutorEnd::Failed(
                "executor pod cannot start: ImagePullBackOff no such image".to_string()
            ))
        );
        assert_eq!(
            pod_end(&pod(json!({"phase": "Pending", "containerStatuses": [{
                "name": "executor", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}]}))),
            None
        );
    }
}
