//! Process plumbing shared by every Cohort binary: logging, configuration
//! shared by all services, serving gRPC (with health and reflection), signals,
//! client channels and the local process launcher.
//!
//! Must not depend on any service crate or on storage: services depend on it.

pub mod audit;
pub mod executor_pipe;
pub mod launcher;
pub mod process;
pub mod tls;
mod traced_channel;
pub mod wire;

pub use cohort_telemetry::Telemetry;
pub use tls::{Tls, TlsArgs, calling_party, calling_principal, peer_identity};
pub use traced_channel::Channel;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Options every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Address to serve gRPC on (port 0 picks a free port).
    #[arg(long, env = "COHORT_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Once listening, write the bound address to this file.
    #[arg(long, env = "COHORT_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Log line format.
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Also serve grpc.health.v1 (and nothing else) in plaintext here, for
    /// probes that cannot do mutual TLS (kubelet).
    #[arg(long, env = "COHORT_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics in plaintext at http://ADDR/metrics (scrapers rarely hold
    /// client certificates; metrics carry no secret).
    #[arg(long, env = "COHORT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Once serving metrics, write a Prometheus file-based discovery target list naming
    /// them here (removed at exit): how `cohort up` finds ports picked at random.
    #[arg(long, env = "COHORT_METRICS_TARGET_FILE", requires = "metrics_listen")]
    pub metrics_target_file: Option<PathBuf>,
}

/// The metadata database of a service that owns one.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// sqlite://PATH (embedded), postgres://USER:PASSWORD@HOST/DB or mongodb://HOST/DB.
    /// Prefer the environment variable: command lines are visible to other users.
    #[arg(long, env = "COHORT_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "COHORT_DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
    /// How long connecting (and waiting for a pooled connection) may take.
    #[arg(long, env = "COHORT_DATABASE_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub database_connect_timeout: Duration,
}

/// Logs go to stderr; `RUST_LOG` filters (default: info). With
/// `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are exported over OTLP as `service`
/// (unless `OTEL_SERVICE_NAME` names it) and log lines carry trace and span
/// ids. Keep the result until the process ends: it flushes the spans.
pub fn init_tracing(format: LogFormat, service: &str) -> Telemetry {
    let style = match format {
        LogFormat::Text => cohort_telemetry::LogStyle::Text,
        LogFormat::Json => cohort_telemetry::LogStyle::Json,
    };
    cohort_telemetry::init(service, style)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
            }
        }
        _ => {
            // No signal handling available: never resolve rather than exit at once.
            tracing::warn!("cannot install signal handlers");
            std::future::pending::<()>().await
        }
    }
}

/// A bound listener, not yet serving: configuration is validated and the port
/// is taken before anything else starts.
pub struct Listener {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<Tls>,
    /// Plaintext health only (see `ServiceArgs::health_listen`).
    health: Option<TcpListener>,
    /// Plaintext `/metrics` (see `ServiceArgs::metrics_listen`).
    metrics: Option<MetricsEndpoint>,
}

impl Listener {
    pub async fn bind(addr: SocketAddr) -> Result<Self, RuntimeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RuntimeError::Bind { addr, source })?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            tls: None,
            health: None,
            metrics: None,
        })
    }

    /// Binds `--listen` and, when given, `--health-listen`.
    pub async fn bind_service(args: &ServiceArgs) -> Result<Self, RuntimeError> {
        let mut listener = Self::bind(args.listen).await?;
        if let Some(addr) = args.health_listen {
            let health = TcpListener::bind(addr)
                .await
                .map_err(|source| RuntimeError::Bind { addr, source })?;
            listener.health = Some(health);
        }
        listener.metrics = MetricsEndpoint::bind(args).await?;
        Ok(listener)
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve mutual TLS: only peers with a service certificate of the CA get in.
    pub fn with_tls(mut self, tls: Option<Tls>) -> Self {
        self.tls = tls;
        self
    }

    /// Serves `services` plus grpc.health.v1 and server reflection until
    /// `shutdown` resolves. Health answers SERVING for "" and for the name of
    /// each service in `services` (NOT_FOUND for any other name); reflection
    /// lists those services. Writes the ready file once health reports SERVING.
    pub async fn serve(
        self,
        service_name: &str,
        services: impl Into<Services>,
        ready_file: Option<&Path>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), RuntimeError> {
        let Services { routes, names } = services.into();
        let listed = names.is_some();
        let names = names.unwrap_or_default();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        for name in &names {
            reporter
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cohort_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        // Plain `Routes` carry no names: then every known service is listed.
        if listed {
            for name in names.iter().copied().chain([
                tonic_health::pb::health_server::SERVICE_NAME,
                tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
            ]) {
                reflection = reflection.with_service_name(name);
            }
        }
        let reflection = reflection.build_v1().map_err(|e| RuntimeError::Endpoint {
            endpoint: "reflection".into(),
            message: e.to_string(),
        })?;
        let health_only = self.health.map(|l| {
            let health = health.clone();
            tokio::spawn(serve_health_only(l, health))
        });
        let _health_only = AbortOnDrop(health_only);
        let _metrics = match self.metrics {
            Some(m) => Some(m.start(service_name)?),
            None => None,
        };
        let routes = routes.add_service(health).add_service(reflection);
        if let Some(path) = ready_file {
            write_atomic(path, self.local_addr.to_string().as_bytes())?;
        }
        tracing::info!(service = service_name, addr = %self.local_addr, "serving gRPC");
        let incoming = without_delay(self.listener);
        let mut builder = tonic::transport::Server::builder()
            .layer(grpc_metrics_layer())
            .layer(cohort_telemetry::TraceServerLayer::new())
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
        match &self.tls {
            Some(tls) => {
                tracing::info!(service = service_name, identity = %tls.identity(), "serving mutual TLS");
                builder
                    .tls_config(tls.server_config())?
                    .layer(tls::RequireServicePeer)
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await?
            }
            None => {
                builder
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await?
            }
        }
        tracing::info!(service = service_name, "stopped");
        Ok(())
    }
}

/// The gRPC services a process serves, with their names: health answers per
/// name. Built like tonic's `Routes`: `Services::new(a).add_service(b)`.
/// Plain `Routes` convert too, but then health knows only "".
#[derive(Debug, Clone)]
pub struct Services {
    routes: tonic::service::Routes,
    /// `None`: converted from `Routes`, whose services are not known by name.
    names: Option<Vec<&'static str>>,
}

impl Default for Services {
    /// No service but health and reflection.
    fn default() -> Self {
        Self {
            routes: tonic::service::Routes::default(),
            names: Some(Vec::new()),
        }
    }
}

impl Services {
    /// Starts with `service`.
    pub fn new<S>(service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self::default().add_service(service)
    }

    /// Adds `service`; health reports SERVING for its name.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.get_or_insert_default().push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }
}

impl From<tonic::service::Routes> for Services {
    fn from(routes: tonic::service::Routes) -> Self {
        Self {
            routes,
            names: None,
        }
    }
}

/// The `/metrics` port of `--metrics-listen`, bound (so a taken port fails the start) but
/// not yet serving; `--metrics-target-file` goes with it.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    target_file: Option<PathBuf>,
}

impl MetricsEndpoint {
    /// Binds `--metrics-listen`, when given.
    pub async fn bind(args: &ServiceArgs) -> Result<Option<Self>, RuntimeError> {
        let Some(addr) = args.metrics_listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RuntimeError::Bind { addr, source })?;
        Ok(Some(Self {
            listener,
            target_file: args.metrics_target_file.clone(),
        }))
    }

    pub fn local_addr(&self) -> Result<SocketAddr, RuntimeError> {
        Ok(self.listener.local_addr()?)
    }

    /// Publishes the discovery target (if asked for) and serves `/metrics` until the
    /// returned guard is dropped, which also removes the target.
    pub fn start(self, service: &str) -> Result<ServingMetrics, RuntimeError> {
        let target = match &self.target_file {
            Some(path) => Some(MetricsTarget::publish(path, self.local_addr()?, service)?),
            None => None,
        };
        let task = tokio::spawn(async move {
            if let Err(e) = cohort_metrics::serve(self.listener, std::future::pending()).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
        Ok(ServingMetrics {
            _target: target,
            _task: AbortOnDrop(Some(task)),
        })
    }
}

/// `/metrics` being served; stopped (and its target removed) when dropped.
pub struct ServingMetrics {
    _target: Option<MetricsTarget>,
    _task: AbortOnDrop,
}

/// A Prometheus file-based discovery target list (`file_sd_configs`) naming one metrics
/// endpoint, written atomically; removed when dropped (the process ends).
#[derive(Debug)]
struct MetricsTarget {
    path: PathBuf,
}

impl MetricsTarget {
    fn publish(path: &Path, addr: SocketAddr, service: &str) -> Result<Self, RuntimeError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| RuntimeError::WriteFile {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let json = format!(
            "[{{\"targets\": [\"{addr}\"], \"labels\": {{\"service\": \"{}\"}}}}]\n",
            service.escape_default()
        );
        write_atomic(path, json.as_bytes())?;
        tracing::info!(url = %format!("http://{addr}/metrics"), file = %path.display(), "metrics target published");
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for MetricsTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The gRPC metrics layer, knowing every method of Cohort's services, health and
/// reflection (any other path a caller sends counts as `unknown`).
pub fn grpc_metrics_layer() -> cohort_metrics::grpc::GrpcMetricsLayer {
    static LAYER: std::sync::LazyLock<cohort_metrics::grpc::GrpcMetricsLayer> =
        std::sync::LazyLock::new(|| {
            let mut methods = Vec::new();
            for encoded in [
                cohort_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            ] {
                match <prost_types::FileDescriptorSet as prost::Message>::decode(encoded) {
                    Ok(set) => methods.extend(method_paths(&set)),
                    Err(e) => tracing::error!(error = %e, "cannot read a built-in descriptor set"),
                }
            }
            cohort_metrics::grpc::GrpcMetricsLayer::new(methods)
        });
    LAYER.clone()
}

/// `/package.Service/Method` for every method in `set`.
fn method_paths(set: &prost_types::FileDescriptorSet) -> Vec<String> {
    let mut out = Vec::new();
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            let qualified = if package.is_empty() {
                service.name().to_string()
            } else {
                format!("{package}.{}", service.name())
            };
            for method in &service.method {
                out.push(format!("/{qualified}/{}", method.name()));
            }
        }
    }
    out
}

/// Serves only the health service, in plaintext, until aborted.
pub async fn serve_health_only<S>(listener: TcpListener, health: S)
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "serving plaintext health checks");
    let incoming = without_delay(listener);
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming(incoming)
        .await
    {
        tracing::error!(error = %e, "health listener failed");
    }
}

/// HTTP/2 flow control of every service. The proxy carries every party's calls to a service
/// over one connection, and a stream whose data waits unread (an upload queued for one of the
/// coordinator's or model-manager's slots) holds up to its stream window of the connection's
/// window. A connection window of one stream window would let queued uploads starve those
/// being received; this one covers `CONNECTION_WINDOW_BYTES / STREAM_WINDOW_BYTES` (1024)
/// queued streams. What queued uploads buffer is at most one stream window each.
pub const STREAM_WINDOW_BYTES: u32 = 1 << 20;
/// See [`STREAM_WINDOW_BYTES`].
pub const CONNECTION_WINDOW_BYTES: u32 = 1 << 30;
/// Concurrent streams on one connection to a service (tonic sets no limit by default). The
/// proxy's connection carries one session stream per connected party, so it is as high as the
/// proxy's own ceiling per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 10_000;

/// Aborts a background task when dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Writes a file so readers never see it half-written.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), RuntimeError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| RuntimeError::WriteFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Normalises "host:port" or "http://host:port" into a URL.
pub fn endpoint_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// A plaintext channel that connects on first use and reconnects by itself.
pub fn lazy_channel(endpoint: &str) -> Result<Channel, RuntimeError> {
    channel(endpoint, None)
}

/// Accepted connections with Nagle's algorithm off: a small answer (an Ack, a status) goes
/// out at once instead of waiting for the peer's delayed acknowledgement (tens of ms).
fn without_delay(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
        if let Ok(s) = &stream {
            let _ = s.set_nodelay(true);
        }
        stream
    })
}

/// A channel that connects on first use and reconnects by itself; over
/// mutual TLS with `tls`.
pub fn channel(endpoint: &str, tls: Option<&Tls>) -> Result<Channel, RuntimeError> {
    channel_with(endpoint, tls.map(Tls::client_config))
}

/// A channel to a server that must prove itself with a certificate of the CA
/// in `ca_pem`; we present none (users authenticate with tokens).
pub fn server_authenticated_channel(
    endpoint: &str,
    ca_pem: &[u8],
) -> Result<Channel, RuntimeError> {
    cohort_security::install_crypto_provider();
    let config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    channel_with(endpoint, Some(config))
}

fn channel_with(
    endpoint: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<Channel, RuntimeError> {
    let url = match tls {
        Some(_) => endpoint_url(endpoint).replacen("http://", "https://", 1),
        None => endpoint_url(endpoint),
    };
    let invalid = |message: String| RuntimeError::Endpoint {
        endpoint: endpoint.to_string(),
        message,
    };
    let mut ep = Endpoint::from_shared(url.clone()).map_err(|e| invalid(e.to_string()))?;
    if let Some(config) = tls {
        ep = ep.tls_config(config).map_err(|e| invalid(e.to_string()))?;
    }
    // What a client receives (a model fetched, a model downloaded) flows as freely as what
    // servers receive: with h2's default 64 KiB window, a 100 MB fetch waited for a window
    // update every 64 KiB.
    Ok(Channel::new(
        ep.initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .connect_lazy(),
    ))
}

/// Retries `op` with exponential backoff (100 ms doubling to 2 s) until it
/// succeeds, fails with a non-retryable status, or `deadline` passes.
pub async fn retry_unavailable<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut op: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(s) if is_retryable(&s) && start.elapsed() + delay < deadline => {
                tracing::debug!(what, status = %s.message(), "retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(s) => return Err(s),
        }
    }
}

/// Codes that a later attempt may not get (server restarting, overloaded).
pub fn is_retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
    )
}

/// Waits until a file exists and is non-empty; returns its contents.
pub async fn wait_for_file(path: &Path, timeout: Duration) -> Option<String> {
    let start = tokio::time::Instant::now();
    while start.elapsed() < timeout {
        if let Ok(s) = tokio::fs::read_to_string(path).await
            && !s.trim().is_empty()
        {
            return Some(s.trim().to_string());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The one mapping from error kinds to gRPC status codes.
pub fn status(kind: cohort_core::ErrorKind, message: impl Into<String>) -> tonic::Status {
    use cohort_core::ErrorKind;
    let code = match kind {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::Conflict => tonic::Code::Aborted,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::DataLoss => tonic::Code::DataLoss,
        ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorKind::Internal => tonic::Code::Internal,
    };
    tonic::Status::new(code, message)
}

/// Errors that know their kind map onto a status in one place.
pub trait ToStatus {
    fn to_status(&self) -> tonic::Status;
}

impl<E: cohort_core::HasKind + std::fmt::Display + ?Sized> ToStatus for E {
    fn to_status(&self) -> tonic::Status {
        let kind = self.kind();
        if matches!(
            kind,
            cohort_core::ErrorKind::Internal | cohort_core::ErrorKind::DataLoss
        ) {
            tracing::error!(error = %self, "request failed");
        }
        status(kind, self.to_string())
    }
}

/// An address others can dial: an unspecified bind address (0.0.0.0, ::) becomes loopback.
pub fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_proto::v1::coordinator_control_server::{
        CoordinatorControl, CoordinatorControlServer,
    };
    use cohort_proto::v1::{Ack, StopCoordinatorRequest};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    const WAIT: Duration = Duration::from_secs(10);

    struct Control;

    #[tonic::async_trait]
    impl CoordinatorControl for Control {
        async fn stop(
            &self,
            _: tonic::Request<StopCoordinatorRequest>,
        ) -> Result<tonic::Response<Ack>, tonic::Status> {
            Ok(tonic::Response::new(Ack::default()))
        }
    }

    /// The status health gives for `service`, or the error code.
    async fn check(addr: SocketAddr, service: &str) -> Result<i32, tonic::Code> {
        let mut health = HealthClient::new(lazy_channel(&addr.to_string()).unwrap());
        let answer = tokio::time::timeout(
            WAIT,
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .expect("health check timed out");
        answer.map(|r| r.into_inner().status).map_err(|s| s.code())
    }

    async fn scrape(addr: SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut page = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut page))
            .await
            .expect("scrape timed out")
            .unwrap();
        page
    }

    async fn listed_services(addr: SocketAddr) -> Vec<String> {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(lazy_channel(&addr.to_string()).unwrap());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let answer = tokio::time::timeout(WAIT, async {
            let mut stream = client
                .server_reflection_info(futures::stream::iter([request]))
                .await
                .unwrap()
                .into_inner();
            stream.message().await.unwrap().unwrap()
        })
        .await
        .expect("reflection timed out");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("unexpected reflection answer {answer:?}");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn health_answers_for_each_served_service_on_both_ports() {
        let args = ServiceArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            ready_file: None,
            log_format: LogFormat::Text,
            health_listen: Some("127.0.0.1:0".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            metrics_target_file: Some(std::env::temp_dir().join(format!(
                "cohort-runtime-test-{}/metrics/test.json",
                std::process::id()
            ))),
        };
        let target_file = args.metrics_target_file.clone().unwrap();
        let listener = Listener::bind_service(&args).await.unwrap();
        let addr = listener.local_addr();
        let metrics_addr = listener.metrics_addr().unwrap();
        let health_addr = listener.health.as_ref().unwrap().local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(listener.serve(
            "test",
            Services::new(CoordinatorControlServer::new(Control)),
            None,
            async {
                let _ = stopped.await;
            },
        ));

        let serving = ServingStatus::Serving as i32;
        for port in [addr, health_addr] {
            assert_eq!(check(port, "").await, Ok(serving), "{port}");
            assert_eq!(
                check(port, "cohort.v1.CoordinatorControl").await,
                Ok(serving),
                "{port}"
            );
            // Not served here: NOT_FOUND, as grpc.health.v1 defines it.
            for other in ["cohort.v1.Jobs", "cohort.v1.JobControl", "nonsense"] {
                assert_eq!(
                    check(port, other).await,
                    Err(tonic::Code::NotFound),
                    "{port} {other}"
                );
            }
        }
        assert_eq!(
            listed_services(addr).await,
            [
                "cohort.v1.CoordinatorControl",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
            ]
        );
        // The calls on the gRPC port were counted, with their codes (other tests of this
        // process count into the same registry: at least).
        let page = scrape(metrics_addr).await;
        let count = |labels: &str| -> u64 {
            let prefix = format!("cohort_grpc_server_requests_total{{{labels}}} ");
            page.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        // Prometheus' text format sorts the labels.
        let health = r#"grpc_method="Check",grpc_service="grpc.health.v1.Health""#;
        assert!(
            count(&format!(r#"grpc_code="NOT_FOUND",{health}"#)) >= 3,
            "{page}"
        );
        assert!(count(&format!(r#"grpc_code="OK",{health}"#)) >= 2, "{page}");
        assert!(
            page.contains("cohort_grpc_server_request_duration_seconds_bucket"),
            "{page}"
        );
        assert!(
            page.contains("cohort_process_resident_memory_bytes"),
            "{page}"
        );
        // Discoverable by Prometheus' file_sd while it serves, gone after.
        let targets = std::fs::read_to_string(&target_file).unwrap();
        assert!(
            targets.contains(&format!("\"{metrics_addr}\"")),
            "{targets}"
        );
        assert!(targets.contains("\"service\": \"test\""), "{targets}");

        let _ = stop.send(());
        tokio::time::timeout(WAIT, server)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
        assert!(!target_file.exists());
    }

    #[tokio::test]
    async fn plain_routes_still_serve_with_overall_health() {
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr();
        let routes = tonic::service::Routes::new(CoordinatorControlServer::new(Control));
        let server = tokio::spawn(listener.serve("test", routes, None, std::future::pending()));
        assert_eq!(check(addr, "").await, Ok(ServingStatus::Serving as i32));
        let listed = listed_services(addr).await;
        assert!(
            listed.contains(&"cohort.v1.CoordinatorControl".to_string()),
            "{listed:?}"
        );
        server.abort();
    }
}
