//! client-selector: the party registry, each party's long-lived session, and
//! cohort selection (offering tasks to parties on behalf of coordinators).
//!
//! Owns the clients store. Live sessions are in memory: a party that
//! reconnects after a restart registers again. Must not depend on other
//! services' stores. What a party claims when it registers is bounded by the
//! `--max-dataset-*` flags. A party whose session drops keeps its running
//! tasks for `--reconnect-grace`; sessions never wait on the store (heartbeat
//! times and task counters are written in the background).

pub mod bookkeeping;
mod metrics;
pub mod placement;
pub mod probes;
pub mod registry;
pub mod selection;
pub mod sessions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cohort_proto::v1::client_selector_server::ClientSelectorServer;
use cohort_proto::v1::party_session_server::PartySessionServer;
use cohort_runtime::Services;
use cohort_runtime::{Listener, RuntimeError, ServiceArgs};
use cohort_store::clients::ClientStore;
use tokio::sync::oneshot;

use crate::registry::Registry;
pub use crate::registry::{RegistrationLimits, Settings};
use crate::sessions::{SelectorApi, SessionApi};
use cohort_runtime::audit::AuditClient;

/// The longest `--reconnect-grace`: a task whose party is away is not
/// re-offered until the grace ends, so a long one stalls rounds.
const MAX_RECONNECT_GRACE: Duration = Duration::from_secs(3600);

#[derive(Debug, clap::Parser)]
#[command(
    name = "client-selector",
    about = "Cohort party registry and cohort selection"
)]
pub struct Args {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub database: cohort_runtime::DatabaseArgs,
    /// How often parties must send a heartbeat; three missed ones end the session.
    #[arg(long, env = "COHORT_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long a party whose session dropped keeps its running tasks: if it
    /// registers again within this time listing them, they go on; otherwise
    /// they fail with "party disconnected". Zero fails them when the session
    /// ends.
    #[arg(long, env = "COHORT_RECONNECT_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_grace: Duration,
    /// Most samples a party may register for one dataset (its weight in a job
    /// is capped by what it registered).
    #[arg(
        long,
        env = "COHORT_MAX_DATASET_SAMPLES",
        default_value_t = 1_000_000_000
    )]
    pub max_dataset_samples: u64,
    /// Most datasets one party may register.
    #[arg(long, env = "COHORT_MAX_DATASETS_PER_PARTY", default_value_t = 64)]
    pub max_datasets_per_party: u32,
    /// Most features a registered dataset may have.
    #[arg(long, env = "COHORT_MAX_DATASET_FEATURES", default_value_t = 1_000_000)]
    pub max_dataset_features: u32,
    /// Most classes a registered dataset may have.
    #[arg(long, env = "COHORT_MAX_DATASET_CLASSES", default_value_t = 100_000)]
    pub max_dataset_classes: u32,
    /// job-scheduler's gRPC endpoint (host:port), where revocations are
    /// recorded in the audit log. Without it they are not recorded (each one
    /// logs an error saying so).
    #[arg(long, env = "COHORT_JOB_SCHEDULER")]
    pub job_scheduler: Option<String>,
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
}

impl Args {
    /// The settings these flags give, checked.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        if self.heartbeat_interval < Duration::from_millis(100)
            || self.heartbeat_interval > Duration::from_secs(600)
        {
            anyhow::bail!("--heartbeat-interval: must be between 100ms and 10m");
        }
        if self.reconnect_grace > MAX_RECONNECT_GRACE {
            anyhow::bail!("--reconnect-grace: must be at most 1h");
        }
        if self.max_dataset_samples == 0 {
            anyhow::bail!("--max-dataset-samples: must be at least 1");
        }
        if self.max_datasets_per_party == 0 {
            anyhow::bail!("--max-datasets-per-party: must be at least 1");
        }
        if self.max_dataset_features == 0 {
            anyhow::bail!("--max-dataset-features: must be at least 1");
        }
        if self.max_dataset_classes < 2 {
            anyhow::bail!("--max-dataset-classes: must be at least 2");
        }
        Ok(Settings {
            heartbeat_interval: self.heartbeat_interval,
            reconnect_grace: self.reconnect_grace,
            limits: RegistrationLimits {
                max_datasets: self.max_datasets_per_party as usize,
                max_samples: self.max_dataset_samples,
                max_features: self.max_dataset_features,
                max_classes: self.max_dataset_classes,
                ..RegistrationLimits::default()
            },
        })
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let settings = self.settings()?;
        let tls = self.tls.load().context("TLS")?;
        let store = cohort_store::open::open_client_store(
            &self.database.database_url,
            &cohort_store::open::DatabaseOptions::new(
                self.database.database_max_connections,
                self.database.database_connect_timeout,
            ),
        )
        .await
        .context("--database-url: cannot open the clients store")?;
        let audit = AuditClient::from_flag(
            "client-selector",
            self.job_scheduler.as_deref(),
            tls.as_ref(),
        )
        .context("--job-scheduler")?;
        let listener = Listener::bind_service(&self.service).await?.with_tls(tls);
        listener
            .serve(
                "client-selector",
                routes(store, settings, audit),
                self.service.ready_file.as_deref(),
                cohort_runtime::shutdown_signal(),
            )
            .await?;
        Ok(())
    }
}

fn routes(store: Arc<dyn ClientStore>, settings: Settings, audit: AuditClient) -> Services {
    let registry = Registry::new(store, settings);
    Services::new(PartySessionServer::new(SessionApi {
        registry: registry.clone(),
    }))
    .add_service(ClientSelectorServer::new(SelectorApi { registry, audit }))
}

/// Serves client-selector on a loopback port of this process (plaintext) until
/// the returned sender is dropped or sent to: for tests.
pub async fn serve_in_process(
    store: Arc<dyn ClientStore>,
    settings: Settings,
) -> Result<(SocketAddr, oneshot::Sender<()>), RuntimeError> {
    let listener = Listener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let routes = routes(store, settings, AuditClient::none("client-selector"));
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = listener
            .serve("client-selector", routes, None, shutdown)
            .await
        {
            tracing::error!(error = %e, "in-process client-selector failed");
        }
    });
    Ok((addr, stop))
}
