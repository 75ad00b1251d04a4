//! client-selector: the party registry, each party's long-lived session, and
//! cohort selection (offering tasks to parties on behalf of coordinators).
//!
//! Owns the clients store. Live sessions are in memory: a party that
//! reconnects after a restart registers again. Must not depend on other
//! services' stores.

pub mod sessions;

use std::time::Duration;

use anyhow::Context;
use cohort_proto::v1::client_selector_server::ClientSelectorServer;
use cohort_proto::v1::party_session_server::PartySessionServer;
use cohort_runtime::{Listener, ServiceArgs};
use tonic::service::Routes;

use crate::sessions::{Registry, SelectorApi, SessionApi};

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
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        if self.heartbeat_interval < Duration::from_millis(100)
            || self.heartbeat_interval > Duration::from_secs(600)
        {
            anyhow::bail!("--heartbeat-interval: must be between 100ms and 10m");
        }
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
        let listener = Listener::bind_service(&self.service).await?.with_tls(tls);
        let registry = Registry::new(store, self.heartbeat_interval);
        let routes = Routes::new(PartySessionServer::new(SessionApi {
            registry: registry.clone(),
        }))
        .add_service(ClientSelectorServer::new(SelectorApi { registry }));
        listener
            .serve(
                "client-selector",
                routes,
                self.service.ready_file.as_deref(),
                cohort_runtime::shutdown_signal(),
            )
            .await?;
        Ok(())
    }
}
