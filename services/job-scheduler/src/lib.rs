//! job-scheduler: the job API, the job state machine and the launcher of one
//! coordinator per running job.
//!
//! Owns the jobs store and nothing else; talks to other services only over
//! gRPC. The state machine (`manager`) knows no protobuf; `service` is the edge.

pub mod manager;
pub mod service;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cohort_proto::v1::{
    auth_server::AuthServer, job_control_server::JobControlServer, jobs_server::JobsServer,
    tokens_server::TokensServer,
};
use cohort_runtime::launcher::{CoordinatorConfig, Launcher, LocalLauncher};
use cohort_runtime::{Listener, ServiceArgs};
use tonic::service::Routes;

use crate::manager::{JobManager, ManagerConfig};

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
    /// Coordinator launches per job before the job fails.
    #[arg(long, env = "COHORT_MAX_LAUNCH_ATTEMPTS", default_value_t = 5)]
    pub max_launch_attempts: u32,
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
        if let Some(hash) = &self.admin_token_sha256
            && !tokens::is_sha256_hex(hash)
        {
            anyhow::bail!("--admin-token-sha256: must be 64 lowercase hex digits");
        }
        let tls = self.tls.load().context("TLS")?;
        let coordinator_bin = self
            .coordinator_bin
            .clone()
            .unwrap_or_else(|| cohort_runtime::process::sibling_binary("coordinator"));
        if !coordinator_bin.is_file() {
            anyhow::bail!(
                "--coordinator-bin: {} does not exist",
                coordinator_bin.display()
            );
        }
        let store = cohort_store::open::open_job_store(
            &self.database.database_url,
            &cohort_store::open::DatabaseOptions::new(
                self.database.database_max_connections,
                self.database.database_connect_timeout,
            ),
        )
        .await
        .context("--database-url: cannot open the jobs store")?;
        if let Some(hash) = &self.admin_token_sha256 {
            tokens::ensure_bootstrap_admin(store.as_ref(), hash)
                .await
                .context("--admin-token-sha256: cannot store the admin token")?;
        }
        let listener = Listener::bind_service(&self.service)
            .await?
            .with_tls(tls.clone());
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| cohort_runtime::advertised(listener.local_addr()));
        let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel();
        let log_format = match self.service.log_format {
            cohort_runtime::LogFormat::Text => "text",
            cohort_runtime::LogFormat::Json => "json",
        };
        let launcher: Arc<dyn Launcher> = Arc::new(LocalLauncher::new(
            coordinator_bin,
            CoordinatorConfig {
                job_scheduler: advertise,
                model_manager: self.model_manager.clone(),
                client_selector: self.client_selector.clone(),
            },
            self.work_dir.join("coordinators"),
            [
                vec!["--log-format".into(), log_format.into()],
                self.tls.to_args(),
            ]
            .concat(),
            exit_tx,
        )?);
        let manager = JobManager::new(
            store,
            launcher.clone(),
            ManagerConfig {
                max_launch_attempts: self.max_launch_attempts,
                stop_grace: Duration::from_secs(10),
                tls,
            },
        );
        manager.recover().await.context("recovering running jobs")?;
        let exits = manager.clone();
        tokio::spawn(async move {
            while let Some(exit) = exit_rx.recv().await {
                if let Err(e) = exits.coordinator_exited(exit).await {
                    tracing::error!(error = %e, "cannot handle coordinator exit");
                }
            }
        });
        tokio::spawn(manager.clone().run_scheduling_loop());
        let routes = Routes::new(JobsServer::new(service::JobsApi {
            manager: manager.clone(),
        }))
        .add_service(TokensServer::new(tokens::TokensApi {
            store: manager.store().clone(),
        }))
        .add_service(AuthServer::new(tokens::AuthApi {
            store: manager.store().clone(),
        }))
        .add_service(JobControlServer::new(service::ControlApi { manager }));
        listener
            .serve(
                "job-scheduler",
                routes,
                self.service.ready_file.as_deref(),
                cohort_runtime::shutdown_signal(),
            )
            .await?;
        // Local coordinators are our children: stop them; they resume from their
        // last checkpoint when job-scheduler comes back.
        launcher.stop_all(Duration::from_secs(5)).await;
        Ok(())
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
