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
mod gate;
mod route_table;
mod routing;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use cohort_runtime::Tls;
use cohort_security::Identity;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use endpoint::Endpoint;
pub use routing::{Audience, Destination, Refusal, destination, route};

use forward::Proxy;
use gate::Gate;
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
    #[error("{0}")]
    Config(String),
    #[error("TLS: {0}")]
    Tls(#[from] cohort_security::SecurityError),
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
    /// The proxy's certificate (a service certificate whose DNS/IP names are
    /// what parties and users dial), its key and the federation CA. Parties
    /// must present a client certificate of that CA; users an API token.
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
    /// Dial the server-internal services over mutual TLS with the same certificate.
    #[arg(long, env = "COHORT_INTERNAL_TLS")]
    pub internal_tls: bool,
    /// How long a checked API token is trusted before job-scheduler is asked
    /// again: a deleted token keeps working at most this long.
    #[arg(long, env = "COHORT_TOKEN_CACHE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub token_cache_ttl: Duration,
    /// Serve plaintext and check no certificate or token. For local debugging only.
    #[arg(long, env = "COHORT_INSECURE")]
    pub insecure: bool,
}

impl Args {
    /// Validates the upstream endpoints; nothing is bound yet.
    pub fn config(&self) -> Result<Config, ProxyError> {
        let mut config = Config::new(
            Endpoint::parse_field("--job-scheduler", &self.job_scheduler)?,
            Endpoint::parse_field("--model-manager", &self.model_manager)?,
            Endpoint::parse_field("--client-selector", &self.client_selector)?,
        );
        if self.token_cache_ttl > Duration::from_secs(600) {
            return Err(ProxyError::Config(
                "--token-cache-ttl: at most 10m (deleted tokens must stop working)".into(),
            ));
        }
        config.token_cache_ttl = self.token_cache_ttl;
        config.security = match (self.tls.files(), self.insecure) {
            (Some(_), true) => {
                return Err(ProxyError::Config(
                    "--insecure and --tls-cert exclude each other".into(),
                ));
            }
            (None, true) if self.internal_tls => {
                return Err(ProxyError::Config(
                    "--internal-tls needs --tls-cert, --tls-key and --tls-ca".into(),
                ));
            }
            (None, true) => Security::Insecure,
            (None, false) => {
                return Err(ProxyError::Config(
                    "--tls-cert, --tls-key and --tls-ca are required: the proxy serves mutual TLS \
                     (pass --insecure only to debug on a private machine)"
                        .into(),
                ));
            }
            (Some(files), false) => {
                let tls = Tls::load(&files)?;
                let server =
                    cohort_security::server_config(&files, cohort_security::ClientAuth::Optional)?;
                Security::Tls {
                    server: Arc::new(server),
                    upstream: self.internal_tls.then_some(tls),
                }
            }
        };
        Ok(config)
    }

    /// Validates, binds, writes the ready file and serves until SIGTERM/SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        let config = self.config()?;
        let addr = self.service.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind { addr, source })?;
        let local = listener.local_addr()?;
        // Probes that cannot do mutual TLS (kubelet) get plaintext health here.
        let _health_only = match self.service.health_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ProxyError::Bind { addr, source })?;
                let (reporter, health) = tonic_health::server::health_reporter();
                reporter
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
                Some(AbortOnDrop(tokio::spawn(
                    cohort_runtime::serve_health_only(l, health),
                )))
            }
            None => None,
        };
        if let Some(path) = &self.service.ready_file {
            cohort_runtime::write_atomic(path, local.to_string().as_bytes())?;
        }
        match &config.security {
            Security::Insecure => tracing::warn!(
                service = "proxy",
                addr = %local,
                "serving PLAINTEXT without authentication (--insecure)"
            ),
            Security::Tls { upstream, .. } => tracing::info!(
                service = "proxy",
                addr = %local,
                internal_tls = upstream.is_some(),
                "serving gRPC over mutual TLS"
            ),
        }
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
    pub security: Security,
    /// How long a checked API token is trusted without asking again.
    pub token_cache_ttl: Duration,
}

/// What the proxy checks at its door.
#[derive(Clone)]
pub enum Security {
    /// Plaintext, nothing checked (`--insecure`).
    Insecure,
    /// TLS with optional client certificates (parties present one, users
    /// send a token); `upstream`: dial internal services over mutual TLS.
    Tls {
        server: Arc<rustls::ServerConfig>,
        upstream: Option<Tls>,
    },
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Insecure => f.write_str("Insecure"),
            Security::Tls { upstream, .. } => f
                .debug_struct("Tls")
                .field("internal_tls", &upstream.is_some())
                .finish_non_exhaustive(),
        }
    }
}

impl Security {
    fn upstream(&self) -> Option<&Tls> {
        match self {
            Security::Insecure => None,
            Security::Tls { upstream, .. } => upstream.as_ref(),
        }
    }
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
            security: Security::Insecure,
            token_cache_ttl: Duration::from_secs(10),
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
    let upstream = config.security.upstream();
    let routes = Arc::new(RouteTable::new(
        &config.job_scheduler,
        upstream,
        config.connect_timeout,
    )?);
    // The table loads in the background: the other routes serve meanwhile.
    let refresher = AbortOnDrop(tokio::spawn(
        routes.clone().refresh_loop(config.refresh_interval),
    ));
    let (acceptor, enforce) = match &config.security {
        Security::Insecure => (None, false),
        Security::Tls { server, .. } => {
            (Some(tokio_rustls::TlsAcceptor::from(server.clone())), true)
        }
    };
    let gate = Arc::new(Gate::new(
        enforce,
        &config.job_scheduler,
        &config.client_selector,
        upstream,
        config.connect_timeout,
        config.token_cache_ttl,
    )?);
    let _revocations = enforce.then(|| {
        AbortOnDrop(tokio::spawn(
            gate.clone().revocation_loop(config.refresh_interval),
        ))
    });
    let proxy = Arc::new(Proxy::new(&config, routes, gate.clone()).await?);

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
                    let http = http.clone();
                    let stop = stop_rx.clone();
                    let acceptor = acceptor.clone();
                    let revoked = gate.revoked();
                    connections.spawn(async move {
                        let Some(acceptor) = acceptor else {
                            return serve_connection(http, stream, None, proxy, stop, revoked).await;
                        };
                        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                        let tls = match handshake {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::info!(%peer, error = %e, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                        let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                            None => None,
                            Some(cert) => match cohort_security::identity_of(cert) {
                                Ok(id) => Some(id),
                                Err(e) => {
                                    tracing::warn!(%peer, error = %e, "client certificate without a Cohort identity");
                                    return;
                                }
                            },
                        };
                        tracing::debug!(%peer, identity = ?identity, "TLS connection");
                        serve_connection(http, tls, identity, proxy, stop, revoked).await
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

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one connection until it ends, the proxy stops (GOAWAY, then
/// running calls finish) or, for a party, the party is revoked (closed at once).
async fn serve_connection<IO>(
    http: hyper::server::conn::http2::Builder<TokioExecutor>,
    io: IO,
    identity: Option<Identity>,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
    mut revoked: watch::Receiver<gate::RevokedParties>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let party = match &identity {
        Some(Identity::Party(name)) => Some(name.clone()),
        _ => None,
    };
    let identity = Arc::new(identity);
    let service = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        let identity = identity.clone();
        async move {
            Ok::<_, std::convert::Infallible>(proxy.handle(req, identity.as_ref().as_ref()).await)
        }
    });
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let revocation = async {
        match &party {
            Some(p) => {
                let _ = revoked.wait_for(|set| set.contains(p)).await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = revocation => {
            tracing::info!(party = ?party, "party revoked: closing its connection");
            return;
        }
        _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
            // GOAWAY: no new calls, running ones go on.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Aborts a background task when the owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
