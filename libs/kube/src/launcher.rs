//! `KubernetesLauncher`: one coordinator Pod, one Service and one ConfigMap per running job.
//!
//! All three are named `coordinator-<job id>` and carry the labels of [`coordinator_labels`].
//! The ConfigMap holds the job's spec (`spec.json`, immutable like the spec itself), mounted
//! into the Pod and passed as `--job-spec`. The Service selects the Pod by its job label, so
//! parties' traffic (routed by the proxy) reaches
//! `coordinator-<job id>.<namespace>.svc.<cluster domain>:7000`.
//!
//! Dead coordinators: a background task lists the coordinator Pods (by label) every
//! `poll_interval` and, for every job this launcher watches whose Pod has ended (phase
//! `Failed` or `Succeeded`) or is gone, deletes what is left of the Pod and sends a
//! [`CoordinatorExit`] on the exits channel, exactly as `LocalLauncher` does when a child
//! process ends; job-scheduler then relaunches the coordinator or, for a stopping job,
//! records it stopped. Polling rather than a watch: fewer moving parts, the same at-least-one
//! report per exit, and a delay of at most one interval. [`Launcher::alive`] reads the job's Pod
//! (its phase, or that it is gone or being deleted) for job-scheduler's reconcile pass, which
//! catches what a missed report would leave behind.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cohort_core::JobId;
use cohort_runtime::RuntimeError;
use cohort_runtime::launcher::{CoordinatorConfig, CoordinatorExit, Launcher};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, Pod, PodSpec,
    ResourceRequirements, Service, ServicePort, ServiceSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tokio::sync::mpsc;

use crate::objects::{TlsSecretMount, is_status, read_only_mount};

/// `app.kubernetes.io/name`: `cohort` on everything Cohort creates.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/component`: `coordinator` on coordinator Pods and Services.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// `cohort.dev/job`: the job id; the Service selects its Pod by it.
pub const LABEL_JOB: &str = "cohort.dev/job";
/// The coordinator's gRPC port, in the Pod and on the Service.
pub const COORDINATOR_PORT: u16 = 7000;

/// Where the TLS Secret is mounted in the coordinator container.
const TLS_MOUNT: &str = "/etc/cohort/tls";
/// Where the job's ConfigMap is mounted; the spec is `spec.json` there.
const JOB_MOUNT: &str = "/etc/cohort/job";
const SPEC_KEY: &str = "spec.json";
const CONTAINER: &str = "coordinator";

/// How job-scheduler runs coordinators on Kubernetes.
#[derive(Debug, Clone)]
pub struct KubernetesLauncherConfig {
    /// Namespace the coordinator Pods and Services go in.
    pub namespace: String,
    /// Coordinator image (the image holding the `coordinator` binary).
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// The command run in the image; its arguments are added by the launcher.
    pub command: Vec<String>,
    /// Where the coordinator finds job-scheduler, model-manager and client-selector
    /// (cluster addresses, e.g. `job-scheduler.cohort.svc:7001`).
    pub services: CoordinatorConfig,
    /// More arguments, after the launcher's own.
    pub extra_args: Vec<String>,
    /// More environment variables (e.g. `COHORT_LOG_FORMAT=json`).
    pub env: Vec<EnvVar>,
    /// Serve Prometheus metrics on this port of the Pod, with the `prometheus.io/*`
    /// annotations that annotation-based scrape configurations follow.
    pub metrics_port: Option<u16>,
    /// Resource requests (and limits) of the coordinator container.
    pub resources: Option<ResourceRequirements>,
    /// A `kubernetes.io/tls` Secret with `tls.crt`, `tls.key` and `ca.crt`: the coordinator's
    /// service certificate. Mounted read-only; `COHORT_TLS_CERT`/`KEY`/`CA` point at it.
    pub tls_secret: Option<String>,
    /// Owner of every Pod and Service created (job-scheduler's Deployment, or the
    /// `FederatedJob`), so Kubernetes garbage-collects them with it.
    pub owner: Option<OwnerReference>,
    pub service_account: Option<String>,
    /// For the advertised address `coordinator-<id>.<ns>.svc.<cluster_domain>:7000`.
    pub cluster_domain: String,
    /// How often the coordinator Pods are listed to notice dead ones.
    pub poll_interval: Duration,
    /// Delete the coordinators this launcher watches when job-scheduler shuts down
    /// (`stop_all`). Off by default: on Kubernetes coordinators outlive a job-scheduler
    /// restart and are adopted by the next one.
    pub stop_on_shutdown: bool,
}

impl KubernetesLauncherConfig {
    /// A config with the defaults: no extra args, env, resources, TLS or owner; command
    /// `coordinator`; `cluster.local`; a 5 s poll.
    pub fn new(
        namespace: impl Into<String>,
        image: impl Into<String>,
        services: CoordinatorConfig,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            image: image.into(),
            image_pull_policy: None,
            command: vec!["coordinator".to_string()],
            services,
            extra_args: Vec::new(),
            env: Vec::new(),
            metrics_port: None,
            resources: None,
            tls_secret: None,
            owner: None,
            service_account: None,
            cluster_domain: "cluster.local".to_string(),
            poll_interval: Duration::from_secs(5),
            stop_on_shutdown: false,
        }
    }

    /// The address parties' traffic reaches the job's coordinator at.
    pub fn advertise(&self, job_id: &JobId) -> String {
        format!(
            "{}.{}.svc.{}:{COORDINATOR_PORT}",
            coordinator_name(job_id),
            self.namespace,
            self.cluster_domain
        )
    }

    /// The ConfigMap `launch` creates: the job's spec, mounted into the coordinator Pod.
    pub fn coordinator_config_map(&self, job_id: &JobId, spec_json: &str) -> ConfigMap {
        ConfigMap {
            metadata: self.metadata(job_id),
            immutable: Some(true),
            data: Some(BTreeMap::from([(
                SPEC_KEY.to_string(),
                spec_json.to_string(),
            )])),
            ..Default::default()
        }
    }

    /// The coordinator Pod `launch` creates.
    pub fn coordinator_pod(&self, job_id: &JobId) -> Pod {
        let mut args = vec![
            "--job-spec".to_string(),
            format!("{JOB_MOUNT}/{SPEC_KEY}"),
            "--job-id".to_string(),
            job_id.to_string(),
            "--job-scheduler".to_string(),
            self.services.job_scheduler.clone(),
            "--model-manager".to_string(),
            self.services.model_manager.clone(),
            "--client-selector".to_string(),
            self.services.client_selector.clone(),
            "--listen".to_string(),
            format!("0.0.0.0:{COORDINATOR_PORT}"),
            "--advertise".to_string(),
            self.advertise(job_id),
        ];
        let mut ports = vec![ContainerPort {
            name: Some("grpc".to_string()),
            container_port: i32::from(COORDINATOR_PORT),
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }];
        let mut metadata = self.metadata(job_id);
        if let Some(port) = self.metrics_port {
            args.extend(["--metrics-listen".to_string(), format!("0.0.0.0:{port}")]);
            ports.push(ContainerPort {
                name: Some("metrics".to_string()),
                container_port: i32::from(port),
                protocol: Some("TCP".to_string()),
                ..Default::default()
            });
            metadata.annotations = Some(BTreeMap::from([
                ("prometheus.io/scrape".to_string(), "true".to_string()),
                ("prometheus.io/port".to_string(), port.to_string()),
                ("prometheus.io/path".to_string(), "/metrics".to_string()),
            ]));
        }
        args.extend(self.extra_args.iter().cloned());
        let mut env = self.env.clone();
        let mut volume_mounts = vec![read_only_mount("job", JOB_MOUNT)];
        let mut volumes = vec![Volume {
            name: "job".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: coordinator_name(job_id),
                ..Default::default()
            }),
            ..Default::default()
        }];
        if let Some(secret) = &self.tls_secret {
            let tls = TlsSecretMount::new(secret, TLS_MOUNT, None);
            env.extend(tls.env);
            volumes.push(tls.volume);
            volume_mounts.push(tls.mount);
        }
        Pod {
            metadata,
            spec: Some(PodSpec {
                restart_policy: Some("Never".to_string()),
                service_account_name: self.service_account.clone(),
                containers: vec![Container {
                    name: CONTAINER.to_string(),
                    image: Some(self.image.clone()),
                    image_pull_policy: self.image_pull_policy.clone(),
                    command: (!self.command.is_empty()).then(|| self.command.clone()),
                    args: Some(args),
                    env: (!env.is_empty()).then_some(env),
                    ports: Some(ports),
                    resources: self.resources.clone(),
                    volume_mounts: Some(volume_mounts),
                    ..Default::default()
                }],
                volumes: Some(volumes),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// The Service `launch` creates: port 7000 to the Pod with the job's label.
    pub fn coordinator_service(&self, job_id: &JobId) -> Service {
        Service {
            metadata: self.metadata(job_id),
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([(
                    LABEL_JOB.to_string(),
                    job_id.to_string(),
                )])),
                ports: Some(vec![ServicePort {
                    name: Some("grpc".to_string()),
                    port: i32::from(COORDINATOR_PORT),
                    target_port: Some(IntOrString::Int(i32::from(COORDINATOR_PORT))),
                    protocol: Some("TCP".to_string()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn metadata(&self, job_id: &JobId) -> ObjectMeta {
        ObjectMeta {
            name: Some(coordinator_name(job_id)),
            namespace: Some(self.namespace.clone()),
            labels: Some(coordinator_labels(job_id)),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..Default::default()
        }
    }
}

/// An owner reference to the Deployment `name` (job-scheduler's own), read from the API for its
/// uid: coordinators owned by it are garbage-collected when the release is uninstalled, and
/// survive job-scheduler's Pod being replaced (they are adopted by the next one).
pub async fn deployment_owner(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<OwnerReference, kube::Error> {
    let deployment = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client, namespace)
        .get(name)
        .await?;
    Ok(OwnerReference {
        api_version: "apps/v1".to_string(),
        kind: "Deployment".to_string(),
        name: name.to_string(),
        uid: deployment.metadata.uid.unwrap_or_default(),
        // The Deployment does not manage these Pods; it only outlives them.
        controller: None,
        block_owner_deletion: None,
    })
}

/// `coordinator-<job id>`: the Pod's and the Service's name (a job id is a DNS label of at
/// most 47 characters, so this stays a valid Service name).
pub fn coordinator_name(job_id: &JobId) -> String {
    format!("coordinator-{job_id}")
}

/// The labels on a job's coordinator Pod and Service.
pub fn coordinator_labels(job_id: &JobId) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "cohort".to_string()),
        (LABEL_COMPONENT.to_string(), "coordinator".to_string()),
        (LABEL_JOB.to_string(), job_id.to_string()),
    ])
}

fn coordinator_selector() -> String {
    format!("{LABEL_NAME}=cohort,{LABEL_COMPONENT}=coordinator")
}

/// A job whose coordinator this launcher watches.
struct Watched {
    /// The poll that may judge it: a list started before the launch could miss its Pod.
    since_poll: u64,
    stopping: bool,
}

#[derive(Default)]
struct Watching {
    jobs: HashMap<JobId, Watched>,
    /// Number of polls started so far.
    polls: u64,
}

struct Shared {
    pods: Api<Pod>,
    services: Api<Service>,
    config_maps: Api<ConfigMap>,
    watching: Mutex<Watching>,
    exits: mpsc::UnboundedSender<CoordinatorExit>,
}

/// Coordinators as Pods (DESIGN §1). See the module docs.
pub struct KubernetesLauncher {
    config: KubernetesLauncherConfig,
    shared: Arc<Shared>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for KubernetesLauncher {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

fn launch_error(what: String, e: kube::Error) -> RuntimeError {
    RuntimeError::Spawn {
        program: what,
        source: std::io::Error::other(e),
    }
}

/// `what`, then how the container ended (exit status and reason) or, without one, the Pod's
/// reason and message.
pub(crate) fn describe_end(
    what: String,
    terminated: Option<&k8s_openapi::api::core::v1::ContainerStateTerminated>,
    status: &k8s_openapi::api::core::v1::PodStatus,
) -> String {
    let mut how = what;
    if let Some(t) = terminated {
        how.push_str(&format!(": exit status {}", t.exit_code));
        if let Some(reason) = &t.reason {
            how.push_str(&format!(" ({reason})"));
        }
    } else if let Some(reason) = &status.reason {
        how.push_str(&format!(": {reason}"));
        if let Some(message) = &status.message {
            how.push_str(&format!(" ({message})"));
        }
    }
    how
}

/// Why a Pod is over, or None while it runs (or may still run).
fn pod_ended(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let phase = status.phase.as_deref()?;
    if phase != "Failed" && phase != "Succeeded" {
        return None;
    }
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER)
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    Some(describe_end(format!("pod {phase}"), terminated, status))
}

impl Shared {
    /// Deletes the job's Service and ConfigMap; gone already is fine.
    async fn delete_service_and_config(&self, job_id: &JobId) {
        let name = coordinator_name(job_id);
        let dp = DeleteParams::default();
        if let Err(e) = self.services.delete(&name, &dp).await
            && !is_status(&e, 404)
        {
            tracing::warn!(job = %job_id, error = %e, "cannot delete coordinator service");
        }
        if let Err(e) = self.config_maps.delete(&name, &dp).await
            && !is_status(&e, 404)
        {
            tracing::warn!(job = %job_id, error = %e, "cannot delete coordinator config map");
        }
    }

    fn watch(&self, job_id: &JobId) {
        if let Ok(mut w) = self.watching.lock() {
            let since_poll = w.polls + 1;
            w.jobs.insert(
                job_id.clone(),
                Watched {
                    since_poll,
                    stopping: false,
                },
            );
        }
    }

    /// One look at the coordinator Pods; reports every watched coordinator that ended.
    async fn poll(&self) {
        let poll = match self.watching.lock() {
            Ok(mut w) if !w.jobs.is_empty() => {
                w.polls += 1;
                w.polls
            }
            _ => return,
        };
        let lp = ListParams::default().labels(&coordinator_selector());
        let pods = match self.pods.list(&lp).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list coordinator pods");
                return;
            }
        };
        let by_job: HashMap<String, &Pod> = pods
            .iter()
            .filter_map(|p| {
                let job = p.metadata.labels.as_ref()?.get(LABEL_JOB)?;
                Some((job.clone(), p))
            })
            .collect();
        let mut ended = Vec::new();
        if let Ok(w) = self.watching.lock() {
            for (job, watched) in &w.jobs {
                if watched.since_poll > poll {
                    continue;
                }
                let how = match by_job.get(job.as_str()) {
                    None => Some("pod deleted".to_string()),
                    Some(pod) => pod_ended(pod),
                };
                if let Some(how) = how {
                    let how = if watched.stopping {
                        format!("stopped ({how})")
                    } else {
                        how
                    };
                    ended.push((job.clone(), how, by_job.contains_key(job.as_str())));
                }
            }
        }
        for (job, how, pod_left) in ended {
            // Clear the names for a relaunch (which recreates both); the exit description
            // keeps what the pod's status said.
            let name = coordinator_name(&job);
            if pod_left
                && let Err(e) = self
                    .pods
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await
                && !is_status(&e, 404)
            {
                tracing::warn!(job = %job, error = %e, "cannot delete ended coordinator pod");
            }
            self.delete_service_and_config(&job).await;
            let still_watched = self
                .watching
                .lock()
                .map(|mut w| w.jobs.remove(&job).is_some())
                .unwrap_or(false);
            if still_watched {
                tracing::info!(job = %job, how = %how, "coordinator ended");
                let _ = self.exits.send(CoordinatorExit {
                    job_id: job,
                    description: how,
                });
            }
        }
    }
}

impl KubernetesLauncher {
    /// A launcher using `client` (in-cluster config in job-scheduler). Starts the poller, so
    /// it must be called inside a Tokio runtime.
    pub fn new(
        client: kube::Client,
        config: KubernetesLauncherConfig,
        exits: mpsc::UnboundedSender<CoordinatorExit>,
    ) -> Self {
        let shared = Arc::new(Shared {
            pods: Api::namespaced(client.clone(), &config.namespace),
            services: Api::namespaced(client.clone(), &config.namespace),
            config_maps: Api::namespaced(client, &config.namespace),
            watching: Mutex::default(),
            exits,
        });
        let weak = Arc::downgrade(&shared);
        let interval = config.poll_interval;
        let poller = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                shared.poll().await;
            }
        });
        Self {
            config,
            shared,
            poller,
        }
    }

    pub fn config(&self) -> &KubernetesLauncherConfig {
        &self.config
    }

    /// Jobs whose coordinators are watched now.
    pub fn watched(&self) -> Vec<JobId> {
        self.shared
            .watching
            .lock()
            .map(|w| w.jobs.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Creates the Pod; a leftover Pod of the same name that has ended (or is being
    /// deleted) is removed first, one that still runs is adopted.
    async fn create_pod(&self, job_id: &JobId) -> Result<(), RuntimeError> {
        let pod = self.config.coordinator_pod(job_id);
        let name = coordinator_name(job_id);
        let what = || format!("coordinator pod {name}");
        let pp = PostParams::default();
        // A deleted pod may take its grace period to go; give it a little more.
        for attempt in 0..60u32 {
            match self.shared.pods.create(&pp, &pod).await {
                Ok(_) => return Ok(()),
                Err(e) if is_status(&e, 409) => {
                    let existing = self
                        .shared
                        .pods
                        .get_opt(&name)
                        .await
                        .map_err(|e| launch_error(what(), e))?;
                    match existing {
                        Some(p)
                            if p.metadata.deletion_timestamp.is_none()
                                && pod_ended(&p).is_none() =>
                        {
                            tracing::info!(job = %job_id, "coordinator pod already exists; adopting it");
                            return Ok(());
                        }
                        Some(p) if p.metadata.deletion_timestamp.is_none() => {
                            let _ = self
                                .shared
                                .pods
                                .delete(&name, &DeleteParams::default().grace_period(0))
                                .await;
                        }
                        _ => {}
                    }
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Err(e) => return Err(launch_error(what(), e)),
            }
        }
        Err(RuntimeError::Spawn {
            program: what(),
            source: std::io::Error::other("an older pod of that name is still being deleted"),
        })
    }
}

#[async_trait]
impl Launcher for KubernetesLauncher {
    async fn launch(&self, job_id: &JobId, spec_json: &str) -> Result<Option<u32>, RuntimeError> {
        let config_map = self.config.coordinator_config_map(job_id, spec_json);
        match self
            .shared
            .config_maps
            .create(&PostParams::default(), &config_map)
            .await
        {
            Ok(_) => {}
            // Left from an earlier launch of the same job: a job's spec never changes.
            Err(e) if is_status(&e, 409) => {}
            Err(e) => {
                return Err(launch_error(
                    format!("coordinator config map {}", coordinator_name(job_id)),
                    e,
                ));
            }
        }
        self.create_pod(job_id).await?;
        let service = self.config.coordinator_service(job_id);
        match self
            .shared
            .services
            .create(&PostParams::default(), &service)
            .await
        {
            Ok(_) => {}
            // Left from an earlier launch: it selects by the job label, so it still fits.
            Err(e) if is_status(&e, 409) => {}
            Err(e) => {
                return Err(launch_error(
                    format!("coordinator service {}", coordinator_name(job_id)),
                    e,
                ));
            }
        }
        self.shared.watch(job_id);
        tracing::info!(
            job = %job_id,
            namespace = %self.config.namespace,
            advertise = %self.config.advertise(job_id),
            "coordinator pod launched"
        );
        Ok(None)
    }

    async fn adopt(&self, job_id: &JobId, _pid: Option<u32>) -> bool {
        match self.shared.pods.get_opt(&coordinator_name(job_id)).await {
            Ok(Some(pod))
                if pod.metadata.deletion_timestamp.is_none() && pod_ended(&pod).is_none() =>
            {
                self.shared.watch(job_id);
                tracing::info!(job = %job_id, "adopted running coordinator pod");
                true
            }
            Ok(_) => false,
            Err(e) => {
                // Unknown: say gone, so job-scheduler relaunches; launch adopts a live pod.
                tracing::warn!(job = %job_id, error = %e, "cannot look up coordinator pod");
                false
            }
        }
    }

    async fn alive(&self, job_id: &JobId) -> Option<bool> {
        match self.shared.pods.get_opt(&coordinator_name(job_id)).await {
            Ok(None) => Some(false),
            Ok(Some(pod)) if pod.metadata.deletion_timestamp.is_some() => Some(false),
            Ok(Some(pod)) if pod_ended(&pod).is_some() => Some(false),
            // "Unknown": the node stopped reporting; the Pod may still run.
            Ok(Some(pod))
                if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Unknown") =>
            {
                None
            }
            Ok(Some(_)) => Some(true),
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e, "cannot look up coordinator pod");
                None
            }
        }
    }

    async fn stop(&self, job_id: &JobId, grace: Duration) {
        if let Ok(mut w) = self.shared.watching.lock()
            && let Some(watched) = w.jobs.get_mut(job_id)
        {
            watched.stopping = true;
        }
        let name = coordinator_name(job_id);
        let grace = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX);
        match self
            .shared
            .pods
            .delete(&name, &DeleteParams::default().grace_period(grace))
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => tracing::warn!(job = %job_id, error = %e, "cannot delete coordinator pod"),
        }
        self.shared.delete_service_and_config(job_id).await;
        // The poller reports the exit once the pod has gone, as LocalLauncher does.
    }

    async fn stop_all(&self, grace: Duration) -> Vec<JobId> {
        let jobs = self.watched();
        if !self.config.stop_on_shutdown {
            tracing::info!(
                coordinators = jobs.len(),
                "leaving coordinator pods running for the next job-scheduler to adopt"
            );
            return Vec::new();
        }
        for job in &jobs {
            self.stop(job, grace).await;
        }
        jobs
    }
}
