//! cohort-proxy: the server side's one external entry point. A transparent
//! HTTP/2 (h2c) gRPC reverse proxy that routes each call by its `:path` (and,
//! for the round protocol, by `x-cohort-job` metadata) to the owning service,
//! streaming bodies and trailers both ways. Internal services are refused.
//!
//! Must not depend on any other service crate or on storage: it only knows
//! the wire (cohort-proto) and process plumbing (cohort-runtime). Its route
//! table lives in memory and is rebuilt from job-scheduler's `ListRoutes`.
//! Health and reflection are answered here, and show only what is exposed;
//! connections are bounded in number, handshake time, streams and headers.

pub mod dashboard;
mod descriptors;
mod endpoint;
mod forward;
mod gate;
mod limits;
mod preface;
pub mod rest;
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
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use endpoint::Endpoint;
pub use limits::ConnectionLimits;
pub use routing::{Audience, Destination, Refusal, destination, route};

use forward::Proxy;
use gate::Gate;
use limits::{LogThrottle, REFUSAL_LOG_INTERVAL};
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
    /// Connections open at once; beyond it new connections are closed at once.
    #[arg(long, env = "COHORT_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// A new connection must finish its TLS handshake and send the HTTP/2
    /// preface this soon, or it is closed (a silent client holds nothing).
    #[arg(long, env = "COHORT_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Concurrent calls (HTTP/2 streams) per connection.
    #[arg(long, env = "COHORT_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// Bytes of request headers (gRPC metadata) per call.
    #[arg(long, env = "COHORT_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024)]
    pub max_header_list_size: u32,
    /// How often an idle connection is pinged (HTTP/2 PING) ...
    #[arg(long, env = "COHORT_HTTP2_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// ... and how long the answer may take before the connection is closed.
    #[arg(long, env = "COHORT_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,
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
        config.limits = ConnectionLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            max_concurrent_streams: self.max_concurrent_streams,
            max_header_list_size: self.max_header_list_size,
            keepalive_interval: self.http2_keepalive_interval,
            keepalive_timeout: self.http2_keepalive_timeout,
        };
        config.limits.validate()?;
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
                let mut server =
                    cohort_security::server_config(&files, cohort_security::ClientAuth::Optional)?;
                // gRPC speaks h2; REST and the dashboard also HTTP/1.1 (browsers, curl).
                server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
        let health_only = match self.service.health_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ProxyError::Bind { addr, source })?,
            ),
            None => None,
        };
        let _metrics = match cohort_runtime::MetricsEndpoint::bind(&self.service).await? {
            Some(m) => Some(m.start("proxy")?),
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
        tracing::info!(
            service = "proxy",
            max_connections = config.limits.max_connections,
            handshake_timeout = ?config.limits.handshake_timeout,
            max_concurrent_streams = config.limits.max_concurrent_streams,
            max_header_list_size = config.limits.max_header_list_size,
            "connection limits"
        );
        serve_with_health(
            config,
            listener,
            health_only,
            cohort_runtime::shutdown_signal(),
        )
        .await?;
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
    /// Bounds on connections at the door.
    pub limits: ConnectionLimits,
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
            limits: ConnectionLimits::default(),
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
    serve_with_health(config, listener, None, shutdown).await
}

/// [`serve`], plus the proxy's own health service in plaintext on
/// `health_only` (for probes that cannot do TLS).
pub async fn serve_with_health(
    config: Config,
    listener: TcpListener,
    health_only: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ProxyError> {
    config.limits.validate()?;
    let limits = config.limits.clone();
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
    let rest = rest::router(rest::RestState::new(
        gate.clone(),
        &config.job_scheduler,
        &config.model_manager,
        &config.client_selector,
        upstream,
    )?)
    .merge(dashboard::router());
    let _health_only = health_only.map(|l| {
        AbortOnDrop(tokio::spawn(cohort_runtime::serve_health_only(
            l,
            proxy.health(),
        )))
    });

    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        // A peer that stops answering PINGs is gone: its connection closes.
        .keep_alive_interval(Some(limits.keepalive_interval))
        .keep_alive_timeout(limits.keepalive_timeout)
        .adaptive_window(true)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size);

    // One permit per open connection, held until it closes (TLS handshake included).
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let door_logs = Arc::new(DoorLogs::new());
    let handshake_timeout = limits.handshake_timeout;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        // Closed at once: the ones already open keep working.
                        drop(stream);
                        door_logs.over_limit(peer, limits.max_connections);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let door_logs = door_logs.clone();
                    let proxy = proxy.clone();
                    let rest = rest.clone();
                    let http = http.clone();
                    let stop = stop_rx.clone();
                    let acceptor = acceptor.clone();
                    let revoked = gate.revoked();
                    connections.spawn(async move {
                        let _slot = slot;
                        // One deadline for the whole handshake: TLS, then the HTTP/2 preface.
                        let deadline = tokio::time::Instant::now() + handshake_timeout;
                        let Some(acceptor) = acceptor else {
                            if let Some(io) = door_logs.preface(stream, deadline, peer).await {
                                serve_connection(http, io, None, proxy, rest, stop, revoked).await;
                            }
                            return;
                        };
                        let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream)).await;
                        let tls = match handshake {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                if let Some(held_back) = door_logs.handshake_failed.admit() {
                                    tracing::info!(%peer, error = %e, held_back, "TLS handshake refused");
                                }
                                return;
                            }
                            Err(_) => {
                                if let Some(held_back) = door_logs.handshake_timed_out.admit() {
                                    tracing::info!(%peer, timeout = ?handshake_timeout, held_back, "TLS handshake timed out");
                                }
                                return;
                            }
                        };
                        let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                            None => None,
                            Some(cert) => match cohort_security::identity_of(cert) {
                                Ok(id) => Some(id),
                                Err(e) => {
                                    if let Some(held_back) = door_logs.bad_certificate.admit() {
                                        tracing::warn!(%peer, error = %e, held_back, "client certificate without a Cohort identity");
                                    }
                                    return;
                                }
                            },
                        };
                        tracing::debug!(%peer, identity = ?identity, "TLS connection");
                        if tls.get_ref().1.alpn_protocol() == Some(b"http/1.1") {
                            serve_http1(tls, rest, handshake_timeout, stop).await;
                            return;
                        }
                        if let Some(io) = door_logs.preface(tls, deadline, peer).await {
                            serve_connection(http, io, identity, proxy, rest, stop, revoked).await;
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

/// Refusals at the door, each kind logged at a bounded rate.
struct DoorLogs {
    over_limit: LogThrottle,
    refused_total: std::sync::atomic::AtomicU64,
    handshake_failed: LogThrottle,
    handshake_timed_out: LogThrottle,
    bad_certificate: LogThrottle,
    not_http2: LogThrottle,
}

impl DoorLogs {
    fn new() -> Self {
        Self {
            over_limit: LogThrottle::new(REFUSAL_LOG_INTERVAL),
            refused_total: Default::default(),
            handshake_failed: LogThrottle::new(REFUSAL_LOG_INTERVAL),
            handshake_timed_out: LogThrottle::new(REFUSAL_LOG_INTERVAL),
            bad_certificate: LogThrottle::new(REFUSAL_LOG_INTERVAL),
            not_http2: LogThrottle::new(REFUSAL_LOG_INTERVAL),
        }
    }

    /// The connection once its client sent the HTTP/2 preface before
    /// `deadline`; `None` (logged at a bounded rate) otherwise.
    async fn preface<IO>(
        &self,
        io: IO,
        deadline: tokio::time::Instant,
        peer: SocketAddr,
    ) -> Option<preface::Prefaced<IO>>
    where
        IO: tokio::io::AsyncRead + Unpin,
    {
        match tokio::time::timeout_at(deadline, preface::read_preface(io)).await {
            Ok(Ok(Some(io))) => Some(io),
            Ok(Ok(None)) => {
                if let Some(held_back) = self.not_http2.admit() {
                    tracing::info!(%peer, held_back, "not an HTTP/2 client: connection closed");
                }
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection closed before the HTTP/2 preface");
                None
            }
            Err(_) => {
                if let Some(held_back) = self.handshake_timed_out.admit() {
                    tracing::info!(%peer, held_back, "no HTTP/2 preface before the handshake deadline");
                }
                None
            }
        }
    }

    fn over_limit(&self, peer: SocketAddr, max_connections: usize) {
        let total = self
            .refused_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if let Some(held_back) = self.over_limit.admit() {
            tracing::warn!(
                %peer,
                max_connections,
                refused_total = total,
                held_back,
                "connection limit reached: new connection closed"
            );
        }
    }
}

/// Serves one connection until it ends, the proxy stops (GOAWAY, then
/// running calls finish) or, for a party, the party is revoked (closed at once).
async fn serve_connection<IO>(
    http: hyper::server::conn::http2::Builder<TokioExecutor>,
    io: IO,
    identity: Option<Identity>,
    proxy: Arc<Proxy>,
    rest: axum::Router,
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
    let handle = tower::service_fn(move |req| {
        let proxy = proxy.clone();
        let identity = identity.clone();
        async move {
            Ok::<_, std::convert::Infallible>(proxy.handle(req, identity.as_ref().as_ref()).await)
        }
    });
    // One span per call, a child of the caller's; the upstream call is this span's child.
    let traced = tower::Layer::layer(&cohort_telemetry::TraceServerLayer::forwarding(), handle);
    let metered = tower::Layer::layer(&cohort_runtime::grpc_metrics_layer(), traced);
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let metered = metered.clone();
        let rest = rest.clone();
        async move {
            if req.uri().path().starts_with(REST_PREFIX) || dashboard::serves(req.uri().path()) {
                let response = tower::ServiceExt::oneshot(rest, req).await;
                return response.map(|r| r.map(tonic::body::Body::new));
            }
            let response = tower::ServiceExt::oneshot(metered, req).await;
            response.map(|r| r.map(tonic::body::Body::new))
        }
    });
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let revocation = async {
        match &party {
            // Closed when the party is revoked while connected. A party that connects while
            // revoked is served: the gate refuses each call saying why.
            Some(p) => {
                let _ = revoked.wait_for(|set| !set.contains(p)).await;
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

/// HTTP/2 requests under this path go to the REST router, not to gRPC.
const REST_PREFIX: &str = "/api/";

/// Serves an HTTP/1.1 connection (ALPN http/1.1): the REST router only, gRPC
/// needs HTTP/2. Closes once the proxy stops (after the request in flight).
async fn serve_http1<IO>(
    io: IO,
    rest: axum::Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        tower::ServiceExt::oneshot(rest.clone(), req)
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // A client that sends no request head in time is dropped.
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP/1.1 connection ended with an error");
    }
}

/// Aborts a background task when the owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
