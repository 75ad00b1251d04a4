//! task-manager: a party's daemon. Dials out to the proxy (never listens for
//! party traffic), registers its datasets and resources, keeps one long-lived
//! session for heartbeats and offers, and runs each accepted task on an executor: a
//! child process kept for the job's tasks on this party (`--executor-launcher local`,
//! `warm.rs`; one process per task with `--executor-idle-secs 0`) or a Pod per task
//! (`--executor-launcher kubernetes`, through `cohort-kube`).
//!
//! The party decides who uses its data: offers from namespaces it does not accept
//! (`--accept-namespaces`) and jobs whose rounds are too small to hide its update
//! (`--min-cohort`) are refused, with the reason in the reply. Its only listener
//! (`--listen`) serves grpc.health.v1 and nothing else.
//!
//! Nothing stale runs: an offer considered after its reply deadline is refused, and an
//! executor still running past its task's deadline (plus a grace) is stopped and the task
//! reported failed. A session that breaks does not stop the executors: the next session's
//! Register lists the tasks the server should keep, and task statuses wait in a bounded
//! queue until a session is registered to take them.
//!
//! Must not depend on server-side crates or stores: it only speaks the
//! PartySession protocol (and, for executor Pods, the Kubernetes API).

mod capacity;
pub mod datasets;
mod gpus;
mod metrics;
mod probe;
mod warm;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use cohort_core::JobSpec;
use cohort_kube::{ExecutorEnd, ExecutorOwner, ExecutorPodConfig, KubernetesExecutors};
use cohort_proto::v1 as pb;
use cohort_runtime::{LogFormat, Tls, channel};
use cohort_security::Identity;
use futures::StreamExt;
use futures::stream::PollNext;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::datasets::LocalDataset;

#[derive(Debug, clap::Parser)]
#[command(name = "task-manager", about = "Cohort party daemon")]
pub struct Args {
    /// This party's name.
    #[arg(long, env = "COHORT_PARTY")]
    pub party: String,
    /// The federation's proxy (host:port).
    #[arg(long, env = "COHORT_PROXY")]
    pub proxy: String,
    /// The party's datasets.json.
    #[arg(long, env = "COHORT_DATASETS")]
    pub datasets: PathBuf,
    /// Where task files and executor logs go.
    #[arg(long, env = "COHORT_WORKSPACE")]
    pub workspace: PathBuf,
    /// The executor binary (default: `executor` next to this one).
    #[arg(long, env = "COHORT_EXECUTOR_BIN")]
    pub executor_bin: Option<PathBuf>,
    /// How executors run: child processes of this daemon, or one Pod per task.
    #[arg(long, env = "COHORT_EXECUTOR_LAUNCHER", value_enum, default_value_t = ExecutorLauncher::Local)]
    pub executor_launcher: ExecutorLauncher,
    /// Executor Pod settings (image, resources, GPUs, placement, volumes, TLS Secret): a
    /// JSON file, written by the cohort-client chart. Required with `--executor-launcher
    /// kubernetes`.
    #[arg(long, env = "COHORT_EXECUTOR_POD_CONFIG")]
    pub executor_pod_config: Option<PathBuf>,
    /// This task-manager's Pod (downward API `metadata.name`); executor Pods and their
    /// Secrets are owned by it, so they go when it goes.
    #[arg(long, env = "COHORT_POD_NAME", requires = "pod_uid")]
    pub pod_name: Option<String>,
    /// This task-manager's Pod uid (downward API `metadata.uid`).
    #[arg(long, env = "COHORT_POD_UID", requires = "pod_name")]
    pub pod_uid: Option<String>,
    /// The node this task-manager runs on (downward API `spec.nodeName`), for executor
    /// Pods pinned to it (`pinToNode`).
    #[arg(long, env = "COHORT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Tasks run at once; further offers are refused.
    #[arg(long, env = "COHORT_MAX_TASKS", default_value_t = 2)]
    pub max_tasks: u32,
    /// CPUs this party offers to tasks (fractions allowed; default: every CPU of the
    /// machine), shared evenly by `--max-tasks`; what is free goes to client-selector with
    /// every heartbeat (`selection: resource`). 0 offers none: every offer is refused.
    #[arg(long, env = "COHORT_CPUS", value_parser = capacity::parse_cpus)]
    pub cpus: Option<f64>,
    /// Memory this party offers to tasks (e.g. 4GiB; default: the machine's), shared like
    /// `--cpus`; what it reports free is also at most what the kernel has available.
    #[arg(long, env = "COHORT_MEMORY", value_parser = capacity::parse_memory)]
    pub memory: Option<u64>,
    /// GPUs this party offers (local executors; default: those `nvidia-smi` lists, none
    /// without it). Reported with their model and memory; a `training.device: cuda` job's
    /// training goes only to parties with a free one. Executor Pods use their `gpus`.
    #[arg(long, env = "COHORT_GPUS")]
    pub gpus: Option<u32>,
    /// Local executors: how long an executor waits, idle, for its job's next task on this
    /// party before it is stopped (it serves one job only). 0: a new executor process for
    /// every task, given the task in a file.
    #[arg(long, env = "COHORT_EXECUTOR_IDLE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub executor_idle_secs: u64,
    /// Namespaces whose jobs may use this party's data, comma-separated; offers from
    /// others are refused. None given, or `*`: every namespace.
    #[arg(
        long,
        env = "COHORT_ACCEPT_NAMESPACES",
        value_name = "NS[,NS...]",
        value_delimiter = ','
    )]
    pub accept_namespaces: Vec<String>,
    /// Refuse jobs whose rounds have fewer parties than this (`clients.per_round`) or
    /// succeed with fewer (`clients.min`): with a cohort of one, this party's own update
    /// is published as the global model.
    #[arg(long, env = "COHORT_MIN_COHORT", value_name = "K", default_value_t = 2)]
    pub min_cohort: u32,
    /// The programs jobs may run here with `training.runtime: command`: a JSON list of argv
    /// prefixes, `[["python3", "/opt/train.py"]]` (a job's `training.command` must start
    /// with one, word for word). Empty (the default): no command runs; such offers are
    /// refused.
    #[arg(long, env = "COHORT_ALLOWED_COMMANDS", value_name = "JSON", default_value = "", value_parser = cohort_core::spec::AllowedCommands::parse)]
    pub allowed_commands: cohort_core::spec::AllowedCommands,
    /// For checking robust strategies only: this party corrupts every update it sends
    /// (`sign-flip`, `scale=K` or `noise=S`), or (`stall`, for checking reliability
    /// selection) accepts training tasks and never delivers them. Off by default; logged
    /// loudly. Local executors only.
    #[arg(long, env = "COHORT_ADVERSARY", value_name = "MODE", value_parser = cohort_fl::Corruption::parse)]
    pub adversary: Option<cohort_fl::Corruption>,
    /// Local address for health checks (liveness probes); party traffic only dials out.
    #[command(flatten)]
    pub service: cohort_runtime::ServiceArgs,
    /// The party's certificate (`cohort cert issue --party NAME`), its key and
    /// the federation CA: the proxy is dialled over mutual TLS with them.
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
    /// Dial the proxy in plaintext, without a certificate. For local debugging only.
    #[arg(long, env = "COHORT_INSECURE")]
    pub insecure: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorLauncher {
    /// Child processes of task-manager (their logs in the workspace).
    Local,
    /// One Pod (plus one Secret holding the task file) per task.
    Kubernetes,
}

/// Executors as child processes.
struct ProcessExecutors {
    bin: PathBuf,
    /// Robustness checks: how executors corrupt their updates (`--adversary`).
    adversary: Option<cohort_fl::Corruption>,
    /// The TLS options again, for executors.
    tls_args: Vec<String>,
    log_format: LogFormat,
    /// Executors kept between a job's tasks; None: one process per task.
    warm: Option<warm::WarmPool>,
    /// `--allowed-commands`, checked again by the executor.
    allowed_commands: cohort_core::spec::AllowedCommands,
}

impl ProcessExecutors {
    /// The executor's command, with the options every executor gets.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        // The executor is a service of its own in traces (it inherits the rest of the
        // trace settings with this daemon's environment).
        cmd.env_remove("OTEL_SERVICE_NAME");
        cmd.args(&self.tls_args);
        if let Some(mode) = self.adversary {
            cmd.arg("--adversary").arg(mode.to_string());
        }
        if self.log_format == LogFormat::Json {
            cmd.arg("--log-format").arg("json");
        }
        cmd.arg("--allowed-commands")
            .arg(self.allowed_commands.to_json());
        cmd
    }
}

/// Where executors run.
enum Executors {
    Processes(Arc<ProcessExecutors>),
    Pods(Arc<KubernetesExecutors>),
}

/// One accepted task's executor: a process given a file on this machine, a serving process
/// given the task's bytes on its stdin, or a Pod given them in a Secret.
enum Launch {
    Process(Arc<ProcessExecutors>, PathBuf),
    Warm(Arc<ProcessExecutors>, Vec<u8>),
    Pod(Arc<KubernetesExecutors>, Vec<u8>),
}

/// An accepted offer whose executor is not started yet: the acceptance goes out first, so
/// that the server knows the task before any status of it.
struct Accepted {
    task: pb::Task,
    launch: Launch,
    /// The task's span on this party: a child of the server's offer, the
    /// parent of the executor's work.
    span: tracing::Span,
}

impl Accepted {
    /// Nothing runs after all (the acceptance could not be sent).
    fn discard(self) {
        // The token is a credential: do not leave it on disk.
        if let Launch::Process(_, task_file) = &self.launch {
            let _ = std::fs::remove_file(task_file);
        }
    }
}

/// Most task statuses kept waiting for a session, and most remembered as sent; beyond it
/// the oldest go (RUNNING first).
const MAX_QUEUED_STATUSES: usize = 1000;

/// Final statuses handed to a session this long before it broke are sent again on the next:
/// a gRPC stream has no receipts, and a dead connection can go unnoticed for the HTTP/2
/// keepalive's interval and timeout (20 s each). The server ignores a status it already has.
const RESEND_WINDOW: Duration = Duration::from_secs(60);

/// Task statuses on their way to the server. They wait here rather than in one session's
/// stream, so that those produced while the session is down (or not yet registered) go out
/// on the next one.
#[derive(Default)]
struct StatusOutbox {
    inner: Mutex<OutboxInner>,
    queued: tokio::sync::Notify,
}

#[derive(Default)]
struct OutboxInner {
    queue: VecDeque<pb::TaskStatus>,
    /// Final statuses handed to the current session, and when.
    sent: VecDeque<(tokio::time::Instant, pb::TaskStatus)>,
}

fn is_final(status: &pb::TaskStatus) -> bool {
    status.phase != pb::TaskPhase::Running as i32
}

impl StatusOutbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, status: pb::TaskStatus) {
        let mut inner = self.lock();
        if is_final(&status) {
            // A task's end supersedes whatever of it still waits.
            inner.queue.retain(|s| s.task_id != status.task_id);
        }
        inner.queue.push_back(status);
        trim(&mut inner.queue);
        drop(inner);
        self.queued.notify_one();
    }

    /// The next status to send, waiting for one. Cancel-safe: a status is taken only when
    /// returned (and, if final, remembered as sent in the same step).
    async fn pop(&self) -> pb::TaskStatus {
        loop {
            {
                let mut inner = self.lock();
                if let Some(status) = inner.queue.pop_front() {
                    if is_final(&status) {
                        if inner.sent.len() >= MAX_QUEUED_STATUSES {
                            inner.sent.pop_front();
                        }
                        let now = tokio::time::Instant::now();
                        inner.sent.push_back((now, status.clone()));
                    }
                    return status;
                }
            }
            // notify_one keeps a permit when nobody waits: a push in between is not missed.
            self.queued.notified().await;
        }
    }

    /// Before a new session: final statuses handed to the last one at or after `since`
    /// (all, with None) go first again; older ones are taken as delivered.
    fn resend_sent_since(&self, since: Option<tokio::time::Instant>) {
        let mut inner = self.lock();
        let sent = std::mem::take(&mut inner.sent);
        let mut again = 0;
        for (at, status) in sent.into_iter().rev() {
            let waiting = inner.queue.iter().any(|s| s.task_id == status.task_id);
            if since.is_none_or(|since| at >= since) && !waiting {
                inner.queue.push_front(status);
                again += 1;
            }
        }
        trim(&mut inner.queue);
        drop(inner);
        if again > 0 {
            tracing::info!(
                statuses = again,
                "sending again the task statuses the broken session may have lost"
            );
            self.queued.notify_one();
        }
    }

    /// Tasks whose end waits here, untold to the server.
    fn unreported_ends(&self) -> Vec<String> {
        self.lock()
            .queue
            .iter()
            .filter(|s| is_final(s))
            .map(|s| s.task_id.clone())
            .collect()
    }
}

/// Keeps the queue within `MAX_QUEUED_STATUSES`, dropping RUNNING statuses first.
fn trim(queue: &mut VecDeque<pb::TaskStatus>) {
    while queue.len() > MAX_QUEUED_STATUSES {
        let oldest = queue.iter().position(|s| !is_final(s)).unwrap_or(0);
        if let Some(dropped) = queue.remove(oldest) {
            tracing::warn!(
                task = %dropped.task_id,
                "{MAX_QUEUED_STATUSES} task statuses wait for the server; dropping the oldest"
            );
        }
    }
}

/// Which jobs may use this party's data at all, whatever its datasets and capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AcceptPolicy {
    /// None: every namespace.
    namespaces: Option<BTreeSet<String>>,
    min_cohort: u32,
}

impl AcceptPolicy {
    /// From `--accept-namespaces` and `--min-cohort`; errors name the flag.
    fn from_flags(namespaces: &[String], min_cohort: u32) -> anyhow::Result<Self> {
        if min_cohort == 0 {
            anyhow::bail!("--min-cohort: must be at least 1");
        }
        let mut accepted = BTreeSet::new();
        let mut every = false;
        for ns in namespaces.iter().map(|ns| ns.trim()) {
            if ns == "*" {
                every = true;
            } else if ns.is_empty() {
                anyhow::bail!(
                    "--accept-namespaces: an empty namespace (give NS[,NS...], or \"*\" for \
                     every namespace)"
                );
            } else if cohort_core::is_dns_label(ns) {
                accepted.insert(ns.to_string());
            } else {
                anyhow::bail!(
                    "--accept-namespaces: {:?} is not a namespace (a DNS-1123 label: lowercase \
                     letters, digits, '-'), nor \"*\"",
                    ns.chars().take(80).collect::<String>()
                );
            }
        }
        if every && !accepted.is_empty() {
            anyhow::bail!(
                "--accept-namespaces: \"*\" already accepts every namespace; list no others with it"
            );
        }
        Ok(Self {
            namespaces: (!accepted.is_empty()).then_some(accepted),
            min_cohort,
        })
    }

    /// For the log at start.
    fn describe(&self) -> String {
        match &self.namespaces {
            None => "accepting tasks from every namespace".to_string(),
            Some(list) => format!(
                "accepting tasks from namespace(s) {}",
                list.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Why a job may not use this party's data, if it may not.
    fn refusal(&self, spec: &JobSpec) -> Option<String> {
        if let Some(list) = &self.namespaces
            && !list.contains(&spec.namespace)
        {
            return Some(format!(
                "this party does not accept tasks from namespace {:?}",
                spec.namespace
            ));
        }
        let k = self.min_cohort;
        let small = [
            ("clients.per_round", spec.clients.per_round),
            ("clients.min", spec.clients.min),
        ];
        small.into_iter().find(|(_, n)| *n < k).map(|(field, n)| {
            format!(
                "{field} is {n}, below this party's minimum cohort of {k}: in so small a round \
                 its own update could be published as the global model"
            )
        })
    }
}

struct Party {
    name: String,
    proxy: String,
    tls: Option<Tls>,
    workspace: PathBuf,
    executors: Executors,
    max_tasks: u32,
    /// What it offers to tasks, and reports free.
    budget: capacity::Budget,
    /// Its GPUs (model, memory), reported with the budget.
    gpu_devices: Vec<pb::GpuInfo>,
    policy: AcceptPolicy,
    /// `--allowed-commands`: what `training.runtime: command` may run here.
    allowed_commands: cohort_core::spec::AllowedCommands,
    datasets: Vec<LocalDataset>,
    /// Running executors by task id: the sender stops one.
    running: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// Task statuses not yet handed to a session.
    outbox: StatusOutbox,
    /// The tasks watching executors, awaited on shutdown so that stopped executors are
    /// cleaned up (processes reaped, Pods and their Secrets deleted) before the daemon exits.
    watchers: Mutex<tokio::task::JoinSet<()>>,
}

/// How long a stopping task-manager waits for its executors to be stopped and removed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long past its task's deadline an executor may run (an update submitted at the
/// deadline is still on its way) before it is stopped and the task reported failed.
const TASK_DEADLINE_GRACE: Duration = Duration::from_secs(10);

/// How long a cancelled task's Pod is looked at once more (did it succeed meanwhile?).
const POD_LAST_LOOK: Duration = Duration::from_secs(5);

/// Why a task past its deadline failed, or its offer was refused.
const DEADLINE_PASSED: &str = "the task's deadline passed";

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        cohort_core::PartyId::parse(&self.party).context("--party")?;
        if self.service.health_listen.is_some() {
            anyhow::bail!("--health-listen: task-manager serves only health, on --listen");
        }
        if self.max_tasks == 0 {
            anyhow::bail!("--max-tasks: must be at least 1");
        }
        let policy = AcceptPolicy::from_flags(&self.accept_namespaces, self.min_cohort)?;
        let tls = match (self.tls.load().context("TLS")?, self.insecure) {
            (Some(_), true) => anyhow::bail!("--insecure and --tls-cert exclude each other"),
            (None, false) => anyhow::bail!(
                "--tls-cert, --tls-key and --tls-ca are required: parties dial the proxy over \
                 mutual TLS (pass --insecure only to debug on a private machine)"
            ),
            (None, true) => {
                tracing::warn!(
                    "dialling the proxy in PLAINTEXT without a certificate (--insecure)"
                );
                None
            }
            (Some(tls), false) => {
                match tls.identity() {
                    Identity::Party(name) if name == &self.party => {}
                    other => anyhow::bail!(
                        "--tls-cert: the certificate is for {other}, not party {}",
                        self.party
                    ),
                }
                Some(tls)
            }
        };
        channel(&self.proxy, tls.as_ref()).context("--proxy")?;
        let datasets = datasets::load(&self.datasets).context("--datasets")?;
        if datasets.is_empty() {
            anyhow::bail!("--datasets: {} names no dataset", self.datasets.display());
        }
        let executors = self.executors().await?;
        let gpu_devices = match &executors {
            Executors::Processes(_) => gpus::detect(self.gpus).await,
            Executors::Pods(pods) => gpus::unknown(pods.config().gpus),
        };
        let gpus = u32::try_from(gpu_devices.len()).unwrap_or(u32::MAX);
        let budget = capacity::Budget::new(self.cpus, self.memory, gpus, self.max_tasks);
        let listen = self.service.listen;
        let health_listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen: cannot listen on {listen}"))?;
        let health_addr = health_listener.local_addr().context("--listen")?;
        let metrics = cohort_runtime::MetricsEndpoint::bind(&self.service)
            .await
            .context("--metrics-listen")?;
        for dir in [
            self.workspace.join("tasks"),
            warm::logs_dir(&self.workspace),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("--workspace: cannot create {}", dir.display()))?;
        }
        let party = Arc::new(Party {
            name: self.party.clone(),
            proxy: self.proxy.clone(),
            tls,
            workspace: self.workspace.clone(),
            executors,
            max_tasks: self.max_tasks,
            budget,
            gpu_devices,
            policy,
            allowed_commands: self.allowed_commands.clone(),
            datasets,
            running: Mutex::default(),
            outbox: StatusOutbox::default(),
            watchers: Mutex::default(),
        });
        tracing::info!(
            party = %party.name, proxy = %party.proxy, datasets = party.datasets.len(),
            min_cohort = party.policy.min_cohort,
            cpus = budget.cpu_millis as f64 / 1000.0,
            memory_bytes = budget.memory_bytes,
            "task-manager starting, {}", party.policy.describe()
        );
        // Health only: no reflection, no other service on the party's one listener.
        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let health = tokio::spawn(cohort_runtime::serve_health_only(
            health_listener,
            health_service,
        ));
        let metrics = match metrics {
            Some(m) => Some(m.start("task-manager").context("--metrics-target-file")?),
            None => None,
        };
        if let Some(path) = &self.service.ready_file {
            cohort_runtime::write_atomic(path, health_addr.to_string().as_bytes())
                .context("--ready-file")?;
        }
        let expiry = party.warm_pool().map(|pool| pool.keep()).map(|keep| {
            let party = party.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval((keep / 2).max(Duration::from_millis(100)));
                loop {
                    every.tick().await;
                    if let Some(pool) = party.warm_pool() {
                        pool.expire().await;
                    }
                }
            })
        });
        tokio::select! {
            _ = party.clone().run_sessions() => {}
            _ = cohort_runtime::shutdown_signal() => {}
        }
        health.abort();
        let _ = health.await;
        drop(metrics);
        if let Some(expiry) = expiry {
            expiry.abort();
        }
        party.stop_all();
        let mut watchers =
            std::mem::take(&mut *party.watchers.lock().unwrap_or_else(|e| e.into_inner()));
        if !watchers.is_empty() {
            tracing::info!(executors = watchers.len(), "stopping executors");
            let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
                while watchers.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    "executors not cleaned up within {SHUTDOWN_GRACE:?}; leaving the rest \
                     (their Pods go with this one, or at the next start)"
                );
            }
        }
        if let Some(pool) = party.warm_pool() {
            pool.stop_all().await;
        }
        Ok(())
    }
}

impl Args {
    /// The executor launcher, checked before any port is bound.
    async fn executors(&self) -> anyhow::Result<Executors> {
        match self.executor_launcher {
            ExecutorLauncher::Local => {
                if self.executor_pod_config.is_some() {
                    anyhow::bail!(
                        "--executor-pod-config: only with --executor-launcher kubernetes"
                    );
                }
                let bin = self
                    .executor_bin
                    .clone()
                    .unwrap_or_else(|| cohort_runtime::process::sibling_binary("executor"));
                if !bin.is_file() {
                    anyhow::bail!("--executor-bin: {} does not exist", bin.display());
                }
                let warm = (self.executor_idle_secs > 0).then(|| {
                    warm::WarmPool::new(
                        Duration::from_secs(self.executor_idle_secs),
                        self.max_tasks as usize,
                        warm::logs_dir(&self.workspace),
                    )
                });
                if let Some(mode) = self.adversary {
                    tracing::warn!(%mode, "ADVERSARY MODE: every update this party sends is corrupted (--adversary); for checking robust strategies only");
                }
                Ok(Executors::Processes(Arc::new(ProcessExecutors {
                    bin,
                    adversary: self.adversary,
                    tls_args: self.tls.to_args(),
                    log_format: self.service.log_format,
                    warm,
                    allowed_commands: self.allowed_commands.clone(),
                })))
            }
            ExecutorLauncher::Kubernetes => {
                if self.adversary.is_some() {
                    anyhow::bail!("--adversary: only with --executor-launcher local");
                }
                let Some(path) = &self.executor_pod_config else {
                    anyhow::bail!(
                        "--executor-pod-config: required with --executor-launcher kubernetes"
                    );
                };
                let mut config = ExecutorPodConfig::load(path).context("--executor-pod-config")?;
                // Executor Pods export their spans where this daemon does.
                for (name, value) in cohort_telemetry::child_environment() {
                    if !config.env.iter().any(|e| e.name == name) {
                        config.env.push(k8s_openapi::api::core::v1::EnvVar {
                            name: name.to_string(),
                            value: Some(value),
                            value_from: None,
                        });
                    }
                }
                let owner = ExecutorOwner {
                    party: self.party.clone(),
                    pod: self
                        .pod_name
                        .as_deref()
                        .zip(self.pod_uid.as_deref())
                        .map(|(name, uid)| cohort_kube::pod_owner_reference(name, uid)),
                    node: self.node_name.clone().filter(|n| !n.is_empty()),
                    insecure: self.insecure,
                };
                KubernetesExecutors::check(&config, &owner).context("--executor-pod-config")?;
                let client = kube::Client::try_default().await.context(
                    "--executor-launcher kubernetes: cannot configure a Kubernetes client \
                     (in-cluster service account or kubeconfig)",
                )?;
                let pods = KubernetesExecutors::new(client, config, owner)
                    .context("--executor-pod-config")?;
                let left = pods.remove_leftovers().await.context(
                    "--executor-launcher kubernetes: cannot list this party's executor pods \
                     (API server reachable? may the service account list pods?)",
                )?;
                if left > 0 {
                    tracing::info!(
                        pods = left,
                        "deleted executor pods an earlier task-manager left; their tasks are re-offered"
                    );
                }
                Ok(Executors::Pods(Arc::new(pods)))
            }
        }
    }
}

fn party_msg(kind: pb::party_message::Kind) -> pb::PartyMessage {
    pb::PartyMessage { kind: Some(kind) }
}

impl Party {
    /// What this party offers, and what of it is free now.
    fn resources(&self) -> pb::Resources {
        pb::Resources {
            gpu_devices: self.gpu_devices.clone(),
            ..self.budget.resources(self.running_count())
        }
    }

    /// The job's directory in this party's workspace, kept across tasks and restarts for
    /// the client state a job's strategy or compression carries from round to round.
    fn job_state_dir(&self, job_id: &str) -> Result<PathBuf, String> {
        let dir = self.workspace.join("jobs").join(sanitize(job_id));
        std::fs::create_dir_all(&dir).map_err(|e| {
            format!(
                "cannot create the job's state directory {}: {e}",
                dir.display()
            )
        })?;
        Ok(dir)
    }

    fn running_count(&self) -> u32 {
        self.running.lock().map(|m| m.len() as u32).unwrap_or(0)
    }

    /// The serving executors kept between tasks, when executors are local processes kept
    /// warm.
    fn warm_pool(&self) -> Option<&warm::WarmPool> {
        match &self.executors {
            Executors::Processes(processes) => processes.warm.as_ref(),
            Executors::Pods(_) => None,
        }
    }

    fn stop_all(&self) {
        if let Ok(mut map) = self.running.lock() {
            for (_, stop) in map.drain() {
                let _ = stop.send(());
            }
        }
    }

    /// Keeps a session open, reconnecting with backoff when it breaks.
    async fn run_sessions(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        let mut last_ended: Option<tokio::time::Instant> = None;
        loop {
            let started = tokio::time::Instant::now();
            // Done here, not when the session returns: the transport may still take a
            // status from the ended session's stream for a moment.
            self.outbox
                .resend_sent_since(last_ended.and_then(|at| at.checked_sub(RESEND_WINDOW)));
            match self.clone().session().await {
                Ok(()) => tracing::warn!("session closed by the server; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "session failed; reconnecting in {backoff:?}"),
            }
            last_ended = Some(tokio::time::Instant::now());
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(200);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Tasks the server should keep for this party: those running here and those whose end
    /// it has not heard yet (their status follows the registration).
    fn tasks_to_keep(&self) -> Vec<String> {
        let mut tasks: BTreeSet<String> = self
            .running
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        tasks.extend(self.outbox.unreported_ends());
        tasks.into_iter().collect()
    }

    async fn session(self: Arc<Self>) -> anyhow::Result<()> {
        let channel = channel(&self.proxy, self.tls.as_ref())?;
        let mut client = pb::party_session_client::PartySessionClient::new(channel);
        let (out_tx, out_rx) = mpsc::channel::<pb::PartyMessage>(64);
        let running_tasks = self.tasks_to_keep();
        if !running_tasks.is_empty() {
            tracing::info!(
                tasks = running_tasks.len(),
                "registering with tasks still running or unreported"
            );
        }
        out_tx
            .send(party_msg(pb::party_message::Kind::Register(pb::Register {
                party: self.name.clone(),
                datasets: self.datasets.iter().map(|d| d.info.clone()).collect(),
                resources: Some(self.resources()),
                running_tasks,
            })))
            .await?;
        // Task statuses are taken from the outbox only once the server has registered this
        // session, and only while it lasts: when this function returns, the stream ends
        // (even if the transport still polls it) and what was not taken waits for the next.
        let (registered_tx, registered_rx) = oneshot::channel::<()>();
        let mut registered_tx = Some(registered_tx);
        let (_session_over, session_over) = oneshot::channel::<()>();
        let statuses = futures::stream::unfold(
            (self.clone(), Some(registered_rx)),
            |(me, gate)| async move {
                if let Some(gate) = gate {
                    gate.await.ok()?;
                }
                let status = me.outbox.pop().await;
                Some((
                    party_msg(pb::party_message::Kind::TaskStatus(status)),
                    (me, None),
                ))
            },
        );
        // Replies and heartbeats first: an offer's deadline is short.
        let outbound = futures::stream::select_with_strategy(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
            statuses,
            |_: &mut ()| PollNext::Left,
        )
        .take_until(session_over);
        let mut inbound = client
            .open(outbound)
            .await
            .context("cannot open the party session")?
            .into_inner();
        let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
        let result = loop {
            let msg = match inbound.next().await {
                Some(Ok(m)) => m,
                Some(Err(s)) => break Err(anyhow::anyhow!("{}", s.message())),
                None => break Ok(()),
            };
            match msg.kind {
                Some(pb::server_message::Kind::Registered(r)) => {
                    tracing::info!(party = %r.party, "registered");
                    if let Some(tx) = registered_tx.take() {
                        let _ = tx.send(());
                    }
                    let interval = Duration::from_millis(
                        u64::from(r.heartbeat_interval_ms).clamp(100, 600_000),
                    );
                    let (tx, me) = (out_tx.clone(), self.clone());
                    if let Some(h) = heartbeat.take() {
                        h.abort();
                    }
                    heartbeat = Some(tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(interval).await;
                            let running = me.running_count();
                            let hb = pb::Heartbeat {
                                resources: Some(me.resources()),
                                running_tasks: running,
                            };
                            if tx
                                .send(party_msg(pb::party_message::Kind::Heartbeat(hb)))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }));
                }
                Some(pb::server_message::Kind::Offer(offer)) => {
                    let (reply, accepted) = match self.consider(&offer) {
                        Ok(accepted) => (
                            pb::OfferReply {
                                offer_id: offer.offer_id.clone(),
                                accepted: true,
                                reason: String::new(),
                            },
                            Some(accepted),
                        ),
                        Err(reason) => (refusal(&offer, reason), None),
                    };
                    metrics::offer(accepted.is_some());
                    let sent = out_tx
                        .send(party_msg(pb::party_message::Kind::OfferReply(reply)))
                        .await;
                    match (sent, accepted) {
                        (Ok(()), Some(accepted)) => self.start(accepted),
                        (Ok(()), None) => {}
                        (Err(e), accepted) => {
                            // The server will not hear of it: run nothing.
                            if let Some(accepted) = accepted {
                                accepted.discard();
                            }
                            break Err(e.into());
                        }
                    }
                }
                Some(pb::server_message::Kind::Cancel(c)) => {
                    let stop = self
                        .running
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&c.task_id));
                    if let Some(stop) = stop {
                        tracing::info!(task = %c.task_id, reason = %c.reason, "task cancelled");
                        let _ = stop.send(());
                    }
                }
                Some(pb::server_message::Kind::Revoked(r)) => {
                    break Err(anyhow::anyhow!("this party was revoked: {}", r.reason));
                }
                Some(pb::server_message::Kind::Probe(p)) => {
                    let (tx, me) = (out_tx.clone(), self.clone());
                    tokio::spawn(async move {
                        let reply = probe::answer(&me, p).await;
                        let msg = party_msg(pb::party_message::Kind::ProbeReply(reply));
                        let _ = tx.send(msg).await;
                    });
                }
                None => {}
            }
        };
        if let Some(h) = heartbeat {
            h.abort();
        }
        result
    }

    /// Whether to take an offer: its executor, ready to start, or why not.
    fn consider(&self, offer: &pb::Offer) -> Result<Accepted, String> {
        // Whoever offered it has stopped waiting (this party was slow, or stopped): what it
        // offered may have been given to another party or be long over.
        let now = cohort_runtime::now_ms();
        if offer.reply_by_ms > 0 && now > offer.reply_by_ms {
            return Err(format!(
                "the offer expired (reply by {} passed {:.1} s ago)",
                utc_time_of_day(offer.reply_by_ms),
                now.saturating_sub(offer.reply_by_ms) as f64 / 1000.0
            ));
        }
        let Some(task) = offer.task.clone() else {
            return Err("offer without a task".into());
        };
        if cohort_core::JobId::parse(&task.job_id).is_err()
            || task.task_id.is_empty()
            || task.task_token.is_empty()
        {
            return Err("malformed task".into());
        }
        if task.deadline_ms > 0 && now >= task.deadline_ms {
            return Err(DEADLINE_PASSED.into());
        }
        // Who asks and how many take part come from the job's own spec.
        let spec = JobSpec::from_json(&task.spec_json)
            .map_err(|e| format!("malformed task: spec_json: {e}"))?;
        if let Some(reason) = self.policy.refusal(&spec) {
            return Err(reason);
        }
        if let Some(reason) = self.command_refusal(&spec) {
            return Err(reason);
        }
        if let Some(reason) = gpus::refusal(&spec, task.kind, self.budget.gpus) {
            return Err(reason);
        }
        let Some(dataset) = self.datasets.iter().find(|d| d.name == task.dataset) else {
            return Err(format!("unknown dataset {:?}", task.dataset));
        };
        if let Some(reason) = self.budget.refusal() {
            return Err(reason);
        }
        if self.running_count() >= self.max_tasks {
            return Err(format!("no capacity: {} task(s) running", self.max_tasks));
        }
        let span = cohort_telemetry::trace_span!(
            "task",
            task_id = %task.task_id,
            kind = task.kind,
            round = task.round,
        );
        cohort_telemetry::set_parent_from_map(&span, &task.trace_context);
        let mut handed_on = task.clone();
        handed_on.trace_context = span.in_scope(cohort_telemetry::context_map);
        // A Pod does not see this machine's workspace: its executor keeps no job state (and
        // refuses a job that needs some).
        let state_dir = match &self.executors {
            Executors::Processes(_) => self.job_state_dir(&task.job_id)?.display().to_string(),
            Executors::Pods(_) => String::new(),
        };
        let exec = pb::ExecutorTask {
            task: Some(handed_on),
            endpoint: self.proxy.clone(),
            data: Some(dataset.to_pb()),
            state_dir,
        };
        let launch = match &self.executors {
            // The token goes down the executor's stdin, never onto this disk.
            Executors::Processes(processes) if processes.warm.is_some() => {
                Launch::Warm(processes.clone(), prost::Message::encode_to_vec(&exec))
            }
            Executors::Processes(processes) => {
                let dir = self.workspace.join("tasks").join(sanitize(&task.task_id));
                let file = write_task_file(&dir, &exec)
                    .map_err(|e| format!("cannot prepare the task: {e}"))?;
                Launch::Process(processes.clone(), file)
            }
            // The token goes into the task's Secret only, never onto this disk.
            Executors::Pods(pods) => {
                Launch::Pod(pods.clone(), prost::Message::encode_to_vec(&exec))
            }
        };
        Ok(Accepted { task, launch, span })
    }

    /// Why this party does not run the job's `training.command`, if it is a command job it
    /// does not run: not in `--allowed-commands`, or executors in Pods (which are not given
    /// the allow-list, so would refuse it).
    fn command_refusal(&self, spec: &JobSpec) -> Option<String> {
        let argv = spec.training.command.as_deref()?;
        if let Some(reason) = self.allowed_commands.refusal(argv) {
            return Some(reason);
        }
        matches!(self.executors, Executors::Pods(_)).then(|| {
            "training.runtime \"command\" runs only in local executors \
             (--executor-launcher local), not in executor Pods"
                .to_string()
        })
    }

    /// Starts an accepted task's executor and its watcher.
    fn start(self: &Arc<Self>, accepted: Accepted) {
        let Accepted { task, launch, span } = accepted;
        let (stop_tx, stop_rx) = oneshot::channel();
        if let Ok(mut m) = self.running.lock() {
            m.insert(task.task_id.clone(), stop_tx);
        }
        let watcher = self
            .clone()
            .run_executor(task, launch, stop_rx)
            .instrument(span);
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        // Forget the ones that are done.
        while watchers.try_join_next().is_some() {}
        watchers.spawn(watcher);
    }

    async fn run_executor(
        self: Arc<Self>,
        task: pb::Task,
        launch: Launch,
        stop: oneshot::Receiver<()>,
    ) {
        let status = |phase: pb::TaskPhase, message: String| pb::TaskStatus {
            task_id: task.task_id.clone(),
            phase: phase as i32,
            message,
        };
        let accepted_at = tokio::time::Instant::now();
        let running = || {
            self.outbox
                .push(status(pb::TaskPhase::Running, String::new()))
        };
        // Whatever the executor is doing then (hung on the network, stopped with this
        // daemon), its work can no longer count.
        let abandon_at = abandon_at(task.deadline_ms);
        let past_deadline = async {
            match abandon_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let (phase, message) = match &launch {
            Launch::Process(processes, task_file) => {
                let mut cmd = processes.command();
                cmd.arg("--task-file").arg(task_file);
                // Beside the task file, in the task's directory.
                let log = task_file.with_file_name("executor.log");
                let program = processes.bin.display().to_string();
                let spawning = tokio::time::Instant::now();
                match cohort_runtime::process::spawn_logged(cmd, &program, &log) {
                    Err(e) => (pb::TaskPhase::Failed, e.to_string()),
                    Ok(mut child) => {
                        metrics::executor_started(metrics::Launcher::Process, spawning.elapsed());
                        tracing::info!(task = %task.task_id, kind = task.kind, round = task.round, "executor started");
                        running();
                        let stopped = tokio::select! {
                            r = child.wait() => Err(match r {
                                Ok(s) if s.success() => (pb::TaskPhase::Succeeded, String::new()),
                                Ok(s) => (pb::TaskPhase::Failed, format!("executor {s}: {}", last_line(&log))),
                                Err(e) => (pb::TaskPhase::Failed, format!("executor could not be waited on: {e}")),
                            }),
                            _ = stop => Ok((pb::TaskPhase::Cancelled, "cancelled".to_string())),
                            _ = past_deadline => {
                                tracing::warn!(task = %task.task_id, "executor still running past the task's deadline; stopping it");
                                Ok((pb::TaskPhase::Failed, DEADLINE_PASSED.to_string()))
                            }
                        };
                        match stopped {
                            // Cancelled just after it succeeded: its outcome stands.
                            Ok((pb::TaskPhase::Cancelled, _))
                                if child.try_wait().ok().flatten().is_some_and(|s| s.success()) =>
                            {
                                (pb::TaskPhase::Succeeded, String::new())
                            }
                            Ok(end) => {
                                cohort_runtime::process::terminate(
                                    &mut child,
                                    Duration::from_secs(3),
                                )
                                .await;
                                end
                            }
                            Err(end) => end,
                        }
                    }
                }
            }
            Launch::Warm(processes, task_bytes) => {
                self.run_warm(&task, processes, task_bytes, stop, past_deadline, running)
                    .await
            }
            Launch::Pod(pods, task_file) => match pods.start(&task.task_id, task_file).await {
                Err(e) => (pb::TaskPhase::Failed, e.to_string()),
                Ok(()) => {
                    metrics::executor_started(metrics::Launcher::Pod, accepted_at.elapsed());
                    tracing::info!(task = %task.task_id, kind = task.kind, round = task.round, pod = %cohort_kube::executor_pod_name(&task.task_id), "executor pod created");
                    running();
                    let (phase, message, grace) = tokio::select! {
                        end = pods.wait(&task.task_id, wait_deadline(task.deadline_ms)) => match end {
                            ExecutorEnd::Succeeded => (pb::TaskPhase::Succeeded, String::new(), Duration::ZERO),
                            ExecutorEnd::Failed(why) => (pb::TaskPhase::Failed, why, Duration::ZERO),
                        },
                        // The Pod may have succeeded since the last poll: its outcome stands.
                        _ = stop => match tokio::time::timeout(
                            POD_LAST_LOOK,
                            pods.wait(&task.task_id, tokio::time::Instant::now()),
                        ).await {
                            Ok(ExecutorEnd::Succeeded) => (pb::TaskPhase::Succeeded, String::new(), Duration::ZERO),
                            _ => (pb::TaskPhase::Cancelled, "cancelled".to_string(), Duration::from_secs(3)),
                        },
                        _ = past_deadline => {
                            tracing::warn!(task = %task.task_id, "executor pod still running past the task's deadline; deleting it");
                            (pb::TaskPhase::Failed, DEADLINE_PASSED.to_string(), Duration::from_secs(3))
                        }
                    };
                    pods.remove(&task.task_id, grace).await;
                    (phase, message)
                }
            },
        };
        if let Ok(mut m) = self.running.lock() {
            m.remove(&task.task_id);
        }
        // The token is a credential: do not leave it on disk.
        if let Launch::Process(_, task_file) = &launch {
            let _ = std::fs::remove_file(task_file);
        }
        metrics::task_ended(&task, phase, accepted_at.elapsed());
        // Whatever produced it (this log, a Pod's status), the server gets one bounded line.
        let message = bounded(message);
        match phase {
            pb::TaskPhase::Failed => tracing::warn!(task = %task.task_id, %message, "task failed"),
            _ => tracing::info!(task = %task.task_id, phase = ?phase, "task ended"),
        }
        self.outbox.push(status(phase, message));
    }
}

impl Party {
    /// Runs a task on a serving executor of its job, reused or started for it; returns how
    /// the task ended. An executor that answered is kept for the job's next task; one that
    /// is stopped (cancelled, past the deadline) is ended with the task.
    async fn run_warm(
        &self,
        task: &pb::Task,
        processes: &ProcessExecutors,
        task_bytes: &[u8],
        stop: oneshot::Receiver<()>,
        past_deadline: impl std::future::Future<Output = ()>,
        running: impl Fn(),
    ) -> (pb::TaskPhase, String) {
        enum End {
            Answered(Result<(), String>),
            Ended,
            Stopped(pb::TaskPhase, String),
        }
        let Some(pool) = &processes.warm else {
            return (pb::TaskPhase::Failed, "no executor pool".into());
        };
        let handing = tokio::time::Instant::now();
        let handed = pool
            .hand(&task.job_id, task_bytes, || processes.command())
            .await;
        metrics::executor_started(metrics::Launcher::Warm, handing.elapsed());
        let (mut executor, reused) = match handed {
            Ok(handed) => handed,
            Err(why) => return (pb::TaskPhase::Failed, why),
        };
        tracing::info!(task = %task.task_id, kind = task.kind, round = task.round, pid = executor.child.id(), reused, "task handed to the job's executor");
        running();
        let end = tokio::select! {
            // An answer already there stands, whatever else happened meanwhile.
            biased;
            answer = executor.answer() => match answer {
                Some(answer) => End::Answered(answer),
                None => End::Ended,
            },
            _ = stop => End::Stopped(pb::TaskPhase::Cancelled, "cancelled".to_string()),
            _ = past_deadline => {
                tracing::warn!(task = %task.task_id, "executor still running past the task's deadline; stopping it");
                End::Stopped(pb::TaskPhase::Failed, DEADLINE_PASSED.to_string())
            }
        };
        match end {
            End::Answered(answer) => {
                pool.put_back(&task.job_id, executor);
                match answer {
                    Ok(()) => (pb::TaskPhase::Succeeded, String::new()),
                    Err(line) => (pb::TaskPhase::Failed, line),
                }
            }
            End::Ended => {
                let status = match executor.child.wait().await {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("could not be waited on ({e})"),
                };
                let log = last_line(&executor.log);
                (pb::TaskPhase::Failed, format!("executor {status}: {log}"))
            }
            End::Stopped(phase, message) => {
                cohort_runtime::process::terminate(&mut executor.child, Duration::from_secs(3))
                    .await;
                (phase, message)
            }
        }
    }
}

/// A refusal's reply, logged with its reason.
fn refusal(offer: &pb::Offer, reason: String) -> pb::OfferReply {
    let reason = bounded(reason);
    let job = offer.task.as_ref().map_or("", |t| t.job_id.as_str());
    tracing::info!(offer = %offer.offer_id, job = %bounded(job.to_string()), %reason, "offer refused");
    pb::OfferReply {
        offer_id: offer.offer_id.clone(),
        accepted: false,
        reason,
    }
}

/// When an executor still running is stopped: its task's deadline (ms since the epoch, set
/// by the coordinator) plus `TASK_DEADLINE_GRACE`; never when the task has none.
fn abandon_at(deadline_ms: i64) -> Option<tokio::time::Instant> {
    if deadline_ms <= 0 {
        return None;
    }
    let left = u64::try_from(deadline_ms.saturating_sub(cohort_runtime::now_ms())).unwrap_or(0);
    Some(tokio::time::Instant::now() + Duration::from_millis(left) + TASK_DEADLINE_GRACE)
}

/// How long an executor Pod's status is watched: a backstop a minute past the task's
/// deadline (the Pod is deleted at `abandon_at` before), or a day when the task has none.
fn wait_deadline(deadline_ms: i64) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    if deadline_ms <= 0 {
        return now + Duration::from_secs(24 * 3600);
    }
    let left = u64::try_from(deadline_ms.saturating_sub(cohort_runtime::now_ms())).unwrap_or(0);
    now + Duration::from_millis(left) + Duration::from_secs(60)
}

/// `ms` since the epoch as a UTC time of day, e.g. `14:03:07.250 UTC`.
fn utc_time_of_day(ms: i64) -> String {
    let ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes the task for the executor, readable only by this user (it holds the task token).
fn write_task_file(dir: &Path, task: &pb::ExecutorTask) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("task.pb");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(&prost::Message::encode_to_vec(task))?;
    Ok(path)
}

/// Longest task status message or refusal reason sent to the server, in characters.
const MAX_REASON_CHARS: usize = 1000;
/// How much of an executor log's end is read for its last line.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// `text` on one line (control characters become spaces), cut to `MAX_REASON_CHARS`.
fn bounded(text: String) -> String {
    let one_line = text.chars().map(|c| if c.is_control() { ' ' } else { c });
    if text.chars().count() <= MAX_REASON_CHARS {
        one_line.collect()
    } else {
        one_line
            .take(MAX_REASON_CHARS - 1)
            .chain(std::iter::once('…'))
            .collect()
    }
}

/// The executor log's last non-empty line (its fatal error, when it failed), read from the
/// log's end only: a long log is not loaded whole.
fn last_line(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(log) else {
        return String::new();
    };
    let start = file
        .metadata()
        .map_or(0, |m| m.len().saturating_sub(LOG_TAIL_BYTES));
    let mut tail = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err()
        || file.take(LOG_TAIL_BYTES).read_to_end(&mut tail).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&tail);
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .enumerate()
        .rev()
        .find(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            // The window's first line may have begun before it.
            let cut = if i == 0 && start > 0 { "…" } else { "" };
            format!("{cut}{}", l.trim())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(task: &str, phase: pb::TaskPhase) -> pb::TaskStatus {
        pb::TaskStatus {
            task_id: task.to_string(),
            phase: phase as i32,
            message: String::new(),
        }
    }

    fn queued(outbox: &StatusOutbox) -> Vec<(String, i32)> {
        let inner = outbox.lock();
        inner
            .queue
            .iter()
            .map(|s| (s.task_id.clone(), s.phase))
            .collect()
    }

    #[tokio::test]
    async fn a_tasks_end_supersedes_its_queued_start() {
        let outbox = StatusOutbox::default();
        outbox.push(status("a", pb::TaskPhase::Running));
        outbox.push(status("b", pb::TaskPhase::Running));
        outbox.push(status("a", pb::TaskPhase::Succeeded));
        assert_eq!(
            queued(&outbox),
            [
                ("b".to_string(), pb::TaskPhase::Running as i32),
                ("a".to_string(), pb::TaskPhase::Succeeded as i32)
            ]
        );
        assert_eq!(outbox.unreported_ends(), ["a"]);
    }

    #[tokio::test]
    async fn final_statuses_handed_to_a_broken_session_are_sent_again() {
        let outbox = StatusOutbox::default();
        outbox.push(status("a", pb::TaskPhase::Running));
        outbox.push(status("a", pb::TaskPhase::Failed));
        outbox.push(status("b", pb::TaskPhase::Cancelled));
        assert_eq!(outbox.pop().await.task_id, "a");
        assert_eq!(outbox.pop().await.task_id, "b");
        assert!(outbox.unreported_ends().is_empty());
        outbox.push(status("c", pb::TaskPhase::Succeeded));

        // The session broke: what it was handed goes first again, before what waited.
        outbox.resend_sent_since(None);
        assert_eq!(outbox.unreported_ends(), ["a", "b", "c"]);
        // Once: the next session starts with nothing remembered as sent.
        outbox.resend_sent_since(None);
        assert_eq!(outbox.unreported_ends(), ["a", "b", "c"]);

        // Handed long before the break: taken as delivered.
        for _ in 0..3 {
            outbox.pop().await;
        }
        let later = tokio::time::Instant::now() + Duration::from_secs(1);
        outbox.resend_sent_since(Some(later));
        assert!(queued(&outbox).is_empty());
    }

    #[tokio::test]
    async fn the_queue_is_bounded_dropping_starts_first() {
        let outbox = StatusOutbox::default();
        outbox.push(status("end-0", pb::TaskPhase::Failed));
        outbox.push(status("start-0", pb::TaskPhase::Running));
        for i in 1..MAX_QUEUED_STATUSES {
            outbox.push(status(&format!("end-{i}"), pb::TaskPhase::Failed));
        }
        let queue = queued(&outbox);
        assert_eq!(queue.len(), MAX_QUEUED_STATUSES);
        assert!(queue.iter().all(|(task, _)| task.starts_with("end-")));
        outbox.push(status("end-last", pb::TaskPhase::Failed));
        let queue = queued(&outbox);
        assert_eq!(queue.len(), MAX_QUEUED_STATUSES);
        assert_eq!(queue[0].0, "end-1");
    }

    #[test]
    fn times_of_day_are_utc() {
        assert_eq!(utc_time_of_day(0), "00:00:00.000 UTC");
        // 2024-05-06T14:03:07.250Z
        assert_eq!(utc_time_of_day(1_715_004_187_250), "14:03:07.250 UTC");
    }
}
