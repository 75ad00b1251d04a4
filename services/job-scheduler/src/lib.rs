//! job-scheduler: the job API, the job state machine and the launcher of one
//! coordinator per running job.
//!
//! Owns the jobs store and nothing else; talks to other services only over
//! gRPC. The state machine (`manager`) knows no protobuf; `service` is the edge.

pub mod audit;
pub mod federated;
pub mod manager;
pub mod metrics;
pub mod service;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cohort_proto::v1::{
    audit_server::AuditServer, auth_server::AuthServer, job_control_server::JobControlServer,
    jobs_server::JobsServer, tokens_server::TokensServer,
};
use cohort_runtime::Services;
use cohort_runtime::launcher::{CoordinatorConfig, Launcher, LocalLauncher};
use cohort_runtime::{Listener, ServiceArgs};

use crate::manager::{JobManager, ManagerConfig, SupervisionConfig};

#[derive(Debug, clap::Parser)]
#[command(
    name = "job-scheduler",
    about = "Cohort job API and coordinator launcher"
)]
pub struct Args {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub database: cohort_runtime::DatabaseArgs,
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
    /// The certificate local coordinators present (a service certificate for "coordinator":
    /// model-manager then lets them act only for their job's namespace). Default: this
    /// service's own --tls-cert.
    #[arg(
        long,
        env = "COHORT_COORDINATOR_TLS_CERT",
        requires = "coordinator_tls_key"
    )]
    pub coordinator_tls_cert: Option<PathBuf>,
    /// The key of --coordinator-tls-cert.
    #[arg(
        long,
        env = "COHORT_COORDINATOR_TLS_KEY",
        requires = "coordinator_tls_cert"
    )]
    pub coordinator_tls_key: Option<PathBuf>,
    /// SHA-256 (hex) of an API token to keep as an admin of every namespace:
    /// how the first admin gets in. Only the hash is given, never the token.
    #[arg(long, env = "COHORT_ADMIN_TOKEN_SHA256")]
    pub admin_token_sha256: Option<String>,
    /// model-manager endpoint handed to coordinators (host:port).
    #[arg(long, env = "COHORT_MODEL_MANAGER")]
    pub model_manager: String,
    /// client-selector endpoint handed to coordinators (host:port).
    #[arg(long, env = "COHORT_CLIENT_SELECTOR")]
    pub client_selector: String,
    /// Address coordinators use to reach this service (default: the bound address).
    #[arg(long, env = "COHORT_ADVERTISE")]
    pub advertise: Option<String>,
    /// The coordinator binary (default: `coordinator` next to this one).
    #[arg(long, env = "COHORT_COORDINATOR_BIN")]
    pub coordinator_bin: Option<PathBuf>,
    /// Where coordinator logs are written.
    #[arg(long, env = "COHORT_WORK_DIR", default_value = "cohort-work")]
    pub work_dir: PathBuf,
    /// Local coordinators serve Prometheus metrics on a loopback port and publish it as a
    /// file-based discovery target here (`coordinator-<job>.json`); off when unset. In
    /// Kubernetes, coordinator Pods carry the scrape annotations instead.
    #[arg(long, env = "COHORT_COORDINATOR_METRICS_DIR")]
    pub coordinator_metrics_dir: Option<PathBuf>,
    /// Coordinator launches in a row without a completed round before the job fails (a
    /// round completed resets the count; a coordinator stopped because job-scheduler shuts
    /// down does not count).
    #[arg(long, env = "COHORT_MAX_LAUNCH_ATTEMPTS", default_value_t = 5)]
    pub max_launch_attempts: u32,
    /// How often every job that needs a coordinator is checked against the coordinators
    /// that run; a missing one is relaunched. At least 100ms.
    #[arg(long, env = "COHORT_RECONCILE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,
    /// The wait before the second coordinator launch in a row without a completed round;
    /// it doubles with each further one, up to --relaunch-backoff-max.
    #[arg(long, env = "COHORT_RELAUNCH_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub relaunch_backoff: Duration,
    /// The longest wait before a coordinator is relaunched.
    #[arg(long, env = "COHORT_RELAUNCH_BACKOFF_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    pub relaunch_backoff_max: Duration,
    /// Entries (task failures, parties left out, refused updates; not state changes) a job's
    /// log keeps; later ones are dropped. At least 1.
    #[arg(long, env = "COHORT_MAX_JOB_LOG_ENTRIES", default_value_t = 10_000)]
    pub max_job_log_entries: u64,
    /// The most parameters a job's model may have. Jobs whose model exceeds it even on the
    /// smallest data are refused at create; coordinators check the exact count. At least 1:
    /// there is always a limit.
    #[arg(
        long,
        env = "COHORT_MAX_MODEL_PARAMETERS",
        default_value_t = 100_000_000
    )]
    pub max_model_parameters: u64,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LauncherKind {
    /// Coordinators as child processes.
    Local,
    /// Coordinators as Pods with a Service each, in --kube-namespace.
    Kubernetes,
}

/// Where and how coordinators run on Kubernetes (`--launcher kubernetes`).
#[derive(Debug, Clone, clap::Args)]
pub struct KubernetesArgs {
    #[arg(long, env = "COHORT_LAUNCHER", value_enum, default_value_t = LauncherKind::Local)]
    pub launcher: LauncherKind,
    /// Namespace of the coordinator Pods (default: this Pod's namespace).
    #[arg(long, env = "COHORT_KUBE_NAMESPACE")]
    pub kube_namespace: Option<String>,
    /// Image holding the `coordinator` binary.
    #[arg(long, env = "COHORT_COORDINATOR_IMAGE")]
    pub coordinator_image: Option<String>,
    /// Coordinator Pods serve Prometheus metrics on this port, with the prometheus.io/*
    /// annotations (off when unset).
    #[arg(long, env = "COHORT_COORDINATOR_METRICS_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub coordinator_metrics_port: Option<u16>,
    /// CPU request of a coordinator (e.g. 500m).
    #[arg(long, env = "COHORT_COORDINATOR_CPU")]
    pub coordinator_cpu: Option<String>,
    /// Memory request of a coordinator (e.g. 512Mi).
    #[arg(long, env = "COHORT_COORDINATOR_MEMORY")]
    pub coordinator_memory: Option<String>,
    /// `kubernetes.io/tls` Secret (tls.crt, tls.key, ca.crt) with the coordinators' certificate.
    #[arg(long, env = "COHORT_COORDINATOR_TLS_SECRET")]
    pub coordinator_tls_secret: Option<String>,
    /// job-scheduler's own Deployment: coordinator Pods, Services and ConfigMaps are owned by
    /// it, so uninstalling the release removes them. Read at start (needs `get` on it).
    #[arg(long, env = "COHORT_COORDINATOR_OWNER_DEPLOYMENT")]
    pub coordinator_owner_deployment: Option<String>,
}

impl KubernetesArgs {
    /// Where coordinators run and FederatedJobs are watched.
    fn namespace(&self) -> String {
        self.kube_namespace
            .clone()
            .or_else(pod_namespace)
            .unwrap_or_else(|| "default".to_string())
    }

    /// Checks the options (no cluster contacted).
    fn validate(&self) -> anyhow::Result<()> {
        if self.launcher == LauncherKind::Local {
            return Ok(());
        }
        match self.coordinator_image.as_deref().map(str::trim) {
            None | Some("") => {
                anyhow::bail!("--coordinator-image: required with --launcher kubernetes")
            }
            Some(_) => {}
        }
        for (flag, value) in [
            ("--coordinator-cpu", &self.coordinator_cpu),
            ("--coordinator-memory", &self.coordinator_memory),
        ] {
            if let Some(v) = value
                && !is_quantity(v)
            {
                anyhow::bail!("{flag}: {v:?} is not a Kubernetes quantity (e.g. 500m, 512Mi)");
            }
        }
        if let Some(ns) = &self.kube_namespace
            && !cohort_core::is_dns_label(ns)
        {
            anyhow::bail!("--kube-namespace: {ns:?} must be a DNS-1123 label");
        }
        if let Some(name) = &self.coordinator_owner_deployment
            && !cohort_core::is_dns_label(name)
        {
            anyhow::bail!("--coordinator-owner-deployment: {name:?} is not a Deployment name");
        }
        Ok(())
    }
}

/// Digits with an optional fraction, then an optional SI or binary suffix.
fn is_quantity(v: &str) -> bool {
    let number_end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, suffix) = v.split_at(number_end);
    !number.is_empty()
        && number.parse::<f64>().is_ok()
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix)
}

/// This Pod's namespace, from the service account mount.
fn pod_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        for (field, v) in [
            ("--model-manager", &self.model_manager),
            ("--client-selector", &self.client_selector),
        ] {
            validate_endpoint(field, v)?;
        }
        if self.max_launch_attempts == 0 {
            anyhow::bail!("--max-launch-attempts: must be at least 1");
        }
        if self.reconcile_interval < Duration::from_millis(100) {
            anyhow::bail!("--reconcile-interval: must be at least 100ms");
        }
        if self.relaunch_backoff_max < self.relaunch_backoff {
            anyhow::bail!("--relaunch-backoff-max: must be at least --relaunch-backoff");
        }
        if self.max_job_log_entries == 0 {
            anyhow::bail!("--max-job-log-entries: must be at least 1");
        }
        if self.max_model_parameters == 0 {
            anyhow::bail!("--max-model-parameters: must be at least 1 (there is always a limit)");
        }
        self.kubernetes.validate()?;
        if let Some(hash) = &self.admin_token_sha256
            && !tokens::is_sha256_hex(hash)
        {
            anyhow::bail!("--admin-token-sha256: must be 64 lowercase hex digits");
        }
        let tls = self.tls.load().context("TLS")?;
        let coordinator_tls = self.coordinator_tls()?;
        // What the launcher needs is checked before the port is bound.
        let (coordinator_bin, kube_client) = match self.kubernetes.launcher {
            LauncherKind::Local => {
                let bin = self
                    .coordinator_bin
                    .clone()
                    .unwrap_or_else(|| cohort_runtime::process::sibling_binary("coordinator"));
                if !bin.is_file() {
                    anyhow::bail!("--coordinator-bin: {} does not exist", bin.display());
                }
                (bin, None)
            }
            LauncherKind::Kubernetes => {
                let client = kube::Client::try_default().await.context(
                    "--launcher kubernetes: cannot configure a Kubernetes client \
                     (in-cluster service account or kubeconfig)",
                )?;
                let owner = match &self.kubernetes.coordinator_owner_deployment {
                    Some(name) => Some(
                        cohort_kube::deployment_owner(
                            client.clone(),
                            &self.kubernetes.namespace(),
                            name,
                        )
                        .await
                        .with_context(|| {
                            format!("--coordinator-owner-deployment: cannot read Deployment {name}")
                        })?,
                    ),
                    None => None,
                };
                (PathBuf::new(), Some((client, owner)))
            }
        };
        let store = tokio::select! {
            store = self.open_store() => store?,
            _ = cohort_runtime::shutdown_signal() => return Ok(()),
        };
        let listener = Listener::bind_service(&self.service)
            .await?
            .with_tls(tls.clone());
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| cohort_runtime::advertised(listener.local_addr()));
        let (exit_tx, exit_rx) = tokio::sync::mpsc::unbounded_channel();
        let log_format = match self.service.log_format {
            cohort_runtime::LogFormat::Text => "text",
            cohort_runtime::LogFormat::Json => "json",
        };
        let services = CoordinatorConfig {
            job_scheduler: advertise,
            model_manager: self.model_manager.clone(),
            client_selector: self.client_selector.clone(),
        };
        let extra_args = [
            vec!["--log-format".to_string(), log_format.to_string()],
            coordinator_tls.to_args(),
        ]
        .concat();
        let federated_jobs = kube_client.as_ref().map(|(client, _)| client.clone());
        let launcher: Arc<dyn Launcher> = match kube_client {
            None => Arc::new(
                LocalLauncher::new(
                    coordinator_bin,
                    services,
                    self.work_dir.join("coordinators"),
                    extra_args,
                    exit_tx,
                )
                .map(|l| match &self.coordinator_metrics_dir {
                    Some(dir) => l.with_metrics_dir(dir.clone()),
                    None => l,
                })?,
            ),
            Some((client, owner)) => self.kubernetes_launcher(client, owner, services, exit_tx),
        };
        let manager = JobManager::with_supervision(
            store,
            launcher,
            ManagerConfig {
                max_launch_attempts: self.max_launch_attempts,
                stop_grace: Duration::from_secs(10),
                tls,
                max_job_log_entries: self.max_job_log_entries,
                max_model_parameters: self.max_model_parameters,
            },
            SupervisionConfig {
                reconcile_interval: self.reconcile_interval,
                relaunch_backoff: self.relaunch_backoff,
                relaunch_backoff_max: self.relaunch_backoff_max,
            },
        );
        manager.recover().await;
        tokio::spawn(manager.clone().supervise(exit_rx));
        let job_counts = metrics::spawn_job_counts(manager.store().clone());
        if let Some(client) = federated_jobs {
            // kubectl-applied FederatedJobs become ordinary jobs of this manager.
            let backend = federated::ManagerBackend::new(manager.clone());
            tokio::spawn(cohort_kube::reconciler::run(
                client,
                Some(self.kubernetes.namespace()),
                backend,
            ));
        }
        let routes = Services::new(JobsServer::new(service::JobsApi {
            manager: manager.clone(),
        }))
        .add_service(TokensServer::new(tokens::TokensApi {
            store: manager.store().clone(),
        }))
        .add_service(AuditServer::new(audit::AuditApi {
            store: manager.store().clone(),
        }))
        .add_service(AuthServer::new(tokens::AuthApi {
            store: manager.store().clone(),
        }))
        .add_service(JobControlServer::new(service::ControlApi {
            manager: manager.clone(),
        }));
        // On a signal, supervision ends first (nothing is relaunched while the server
        // drains), then local coordinators, our children, are stopped; they resume from
        // their last checkpoint when job-scheduler comes back.
        let shutdown = async move {
            cohort_runtime::shutdown_signal().await;
            manager.shut_down(Duration::from_secs(5)).await;
        };
        listener
            .serve(
                "job-scheduler",
                routes,
                self.service.ready_file.as_deref(),
                shutdown,
            )
            .await?;
        job_counts.abort();
        Ok(())
    }

    /// Opens the jobs store (and keeps the bootstrap admin in it), waiting for its
    /// database: while it cannot be reached, each try is logged with its cause and retried
    /// with backoff. Any other error (a malformed URL, a corrupt record) ends the start.
    async fn open_store(&self) -> anyhow::Result<Arc<dyn cohort_store::jobs::JobStore>> {
        let options = cohort_store::open::DatabaseOptions::new(
            self.database.database_max_connections,
            self.database.database_connect_timeout,
        );
        let mut wait = Duration::from_millis(500);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let opened =
                match cohort_store::open::open_job_store(&self.database.database_url, &options)
                    .await
                {
                    Ok(store) => match &self.admin_token_sha256 {
                        Some(hash) => tokens::ensure_bootstrap_admin(store.as_ref(), hash)
                            .await
                            .map(|()| store)
                            .map_err(|e| ("--admin-token-sha256: cannot store the admin token", e)),
                        None => Ok(store),
                    },
                    Err(e) => Err(("--database-url: cannot open the jobs store", e)),
                };
            match opened {
                Ok(store) => {
                    if attempt > 1 {
                        tracing::info!(attempt, "the jobs store is open");
                    }
                    return Ok(store);
                }
                // Store errors name the database by its redacted URL only.
                Err((what, cohort_store::StoreError::Unavailable(cause))) => {
                    tracing::warn!(
                        attempt,
                        retry_in = %humantime::format_duration(wait),
                        error = %cause,
                        "{what}: database unavailable; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err((what, e)) => return Err(anyhow::Error::new(e).context(what)),
            }
        }
    }
}

impl Args {
    /// What local coordinators dial and serve with: their own service certificate when
    /// given (checked to be one), else this service's.
    fn coordinator_tls(&self) -> anyhow::Result<cohort_runtime::TlsArgs> {
        let (Some(cert), Some(key)) = (&self.coordinator_tls_cert, &self.coordinator_tls_key)
        else {
            return Ok(self.tls.clone());
        };
        let Some(ca) = &self.tls.tls_ca else {
            anyhow::bail!("--coordinator-tls-cert: needs --tls-ca (mutual TLS) as well");
        };
        let args = cohort_runtime::TlsArgs {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key.clone()),
            tls_ca: Some(ca.clone()),
        };
        let loaded = args.load().context("--coordinator-tls-cert")?;
        match loaded.as_ref().map(|t| t.identity()) {
            Some(cohort_security::Identity::Service(_)) => Ok(args),
            Some(other) => {
                anyhow::bail!("--coordinator-tls-cert: must be a service certificate, not {other}")
            }
            None => anyhow::bail!("--coordinator-tls-cert: no certificate loaded"),
        }
    }

    fn kubernetes_launcher(
        &self,
        client: kube::Client,
        owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
        services: CoordinatorConfig,
        exits: tokio::sync::mpsc::UnboundedSender<cohort_runtime::launcher::CoordinatorExit>,
    ) -> Arc<dyn Launcher> {
        use k8s_openapi::api::core::v1::ResourceRequirements;
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let k = &self.kubernetes;
        let namespace = k.namespace();
        let image = k.coordinator_image.clone().unwrap_or_default();
        let mut config = cohort_kube::KubernetesLauncherConfig::new(&namespace, image, services);
        let requests: std::collections::BTreeMap<String, Quantity> = [
            ("cpu", &k.coordinator_cpu),
            ("memory", &k.coordinator_memory),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.clone().map(|v| (name.to_string(), Quantity(v))))
        .collect();
        if !requests.is_empty() {
            config.resources = Some(ResourceRequirements {
                requests: Some(requests),
                ..Default::default()
            });
        }
        config.tls_secret = k.coordinator_tls_secret.clone();
        config.metrics_port = k.coordinator_metrics_port;
        // Coordinators export their spans where this process does.
        config
            .env
            .extend(
                cohort_telemetry::child_environment()
                    .into_iter()
                    .map(|(name, value)| k8s_openapi::api::core::v1::EnvVar {
                        name: name.to_string(),
                        value: Some(value),
                        value_from: None,
                    }),
            );
        config.owner = owner;
        config.extra_args = vec![
            "--log-format".to_string(),
            match self.service.log_format {
                cohort_runtime::LogFormat::Text => "text",
                cohort_runtime::LogFormat::Json => "json",
            }
            .to_string(),
        ];
        tracing::info!(%namespace, "coordinators run as Kubernetes Pods");
        Arc::new(cohort_kube::KubernetesLauncher::new(client, config, exits))
    }
}

fn validate_endpoint(field: &str, v: &str) -> anyhow::Result<()> {
    let url = cohort_runtime::endpoint_url(v);
    url.parse::<tonic::codegen::http::Uri>()
        .ok()
        .filter(|u| u.host().is_some() && u.port_u16().is_some())
        .map(|_| ())
        .ok_or_else(|| anyhow::anyhow!("{field}: {v:?} is not a host:port endpoint"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_checked() {
        for ok in ["500m", "1", "0.5", "512Mi", "2Gi", "1G"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "lots", "5 Gi", "Mi", "1.2.3", "-1"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
