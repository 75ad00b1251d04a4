//! cohort-proxy: the server side's one external entry point. A transparent
//! HTTP/2 (h2c) gRPC reverse proxy that routes each call by its `:path` (and,
//! for the round protocol, by `x-cohort-job` metadata) to the owning service,
//! streaming bodies and trailers both ways. Internal services are refused.
//!
//! Must not depend on any other service crate or on storage: it only knows
//! the wire (cohort-proto) and process plumbing (cohort-runtime). Its route
//! table lives in memory and is rebuilt from job-scheduler's `ListRoutes`.

mod endpoint;
mod forward;
mod route_table;
mod routing;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use endpoint::Endpoint;
pub use routing::{Destination, Refusal, destination};

use forward::Proxy;
use route_table::RouteTable;

/// Errors of the proxy library. Each names the option or the address at fault.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{field}: invalid endpoint {value:?}: {reason}")]
    Endpoint {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error(transparent)]
    Runtime(#[from] cohort_runtime::RuntimeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Command line of the `proxy` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "proxy",
    about = "Cohort's gRPC entry point: routes calls to the server-side services"
)]
pub struct Args {
    #[command(flatten)]
    pub service: cohort_runtime::ServiceArgs,
    /// job-scheduler's gRPC endpoint (host:port): Jobs, and the job route table.
    #[arg(long, env = "COHORT_JOB_SCHEDULER")]
    pub job_scheduler: String,
    /// model-manager's gRPC endpoint (host:port): Models.
    #[arg(long, env = "COHORT_MODEL_MANAGER")]
    pub model_manager: String,
    /// client-selector's gRPC endpoint (host:port): PartySession, ListClients.
    #[arg(long, env = "COHORT_CLIENT_SELECTOR")]
    pub client_selector: String,
}

impl Args {
    /// Validates the upstream endpoints; nothing is bound yet.
    pub fn config(&self) -> Result<Config, ProxyError> {
        Ok(Config::new(
            Endpoint::parse_field("--job-scheduler", &self.job_scheduler)?,
            Endpoint::parse_field("--model-manager", &self.model_manager)?,
            Endpoint::parse_field("--client-selector", &self.client_selector)?,
        ))
    }

    /// Validates, binds, writes the ready file and serves until SIGTERM/SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        let config = self.config()?;
        let addr = self.service.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind { addr, source })?;
        let local = listener.local_addr()?;
        if let Some(path) = &self.service.ready_file {
            cohort_runtime::write_atomic(path, local.to_string().as_bytes())?;
        }
        tracing::info!(service = "proxy", addr = %local, "serving gRPC");
        serve(config, listener, cohort_runtime::shutdown_signal()).await?;
        tracing::info!(service = "proxy", "stopped");
        Ok(())
    }
}

/// Where the proxy sends calls, and its timings.
#[derive(Debug, Clone)]
pub struct Config {
    pub job_scheduler: Endpoint,
    pub model_manager: Endpoint,
    pub client_selector: Endpoint,
    /// How often the job route table is reloaded from job-scheduler.
    pub refresh_interval: Duration,
    /// Bound on connecting to an upstream (and on one `ListRoutes` call), so
    /// a dead upstream answers UNAVAILABLE instead of hanging.
    pub connect_timeout: Duration,
    /// How long in-flight calls may run on after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Config {
    pub fn new(
        job_scheduler: Endpoint,
        model_manager: Endpoint,
        client_selector: Endpoint,
    ) -> Self {
        Self {
            job_scheduler,
            model_manager,
            client_selector,
            refresh_interval: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(3),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves, then stops
/// accepting, lets in-flight calls finish for `shutdown_grace` and returns.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ProxyError> {
    let routes = Arc::new(RouteTable::new(
        &config.job_scheduler,
        config.connect_timeout,
    )?);
    // The table loads in the background: the other routes serve meanwhile.
    let refresher = AbortOnDrop(tokio::spawn(
        routes.clone().refresh_loop(config.refresh_interval),
    ));
    let proxy = Arc::new(Proxy::new(&config, routes).await?);

    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .adaptive_window(true)
        // Each party holds one long-lived stream; leave room for many more calls.
        .max_concurrent_streams(1024);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let proxy = proxy.clone();
                    let service = hyper::service::service_fn(move |req| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, std::convert::Infallible>(proxy.handle(req).await) }
                    });
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    let mut stop = stop_rx.clone();
                    connections.spawn(async move {
                        tokio::pin!(conn);
                        let result = tokio::select! {
                            r = conn.as_mut() => r,
                            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                                // GOAWAY: no new calls, running ones go on.
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        };
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    proxy.set_not_serving().await;
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = connections.len(),
            "grace period over, closing remaining connections"
        );
        connections.shutdown().await;
    }
    drop(refresher);
    Ok(())
}

/// Aborts a background task when the owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
