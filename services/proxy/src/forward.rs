//! Per-call handling: local services, refusals, and forwarding with bodies
//! and trailers streamed through untouched.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use cohort_security::Identity;
use hyper_rustls::HttpsConnector;

use crate::descriptors;
use crate::gate::Gate;
use crate::limits::{LogThrottle, REFUSAL_LOG_INTERVAL};
use crate::route_table::{Resolution, RouteTable};
use crate::routing::{self, Destination, Refusal};
use crate::{Config, Endpoint, ProxyError};

type LocalService = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

pub(crate) struct Proxy {
    job_scheduler: Endpoint,
    model_manager: Endpoint,
    client_selector: Endpoint,
    routes: Arc<RouteTable>,
    gate: Arc<Gate>,
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    /// https when the internal services serve mutual TLS.
    upstream_scheme: Scheme,
    health_reporter: tonic_health::server::HealthReporter,
    /// For a plaintext health-only listener (`--health-listen`).
    health: HealthServer,
    /// Health and reflection, answered here.
    local: LocalService,
    /// Per-call refusals: anyone can cause them, so their log lines are rationed.
    refused_callers: LogThrottle,
    refused_internal: LogThrottle,
}

pub(crate) type HealthServer =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

impl Proxy {
    pub(crate) async fn new(
        config: &Config,
        routes: Arc<RouteTable>,
        gate: Arc<Gate>,
    ) -> Result<Self, ProxyError> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let upstream = config.security.upstream();
        let mut tls = match upstream {
            Some(tls) => {
                let files = tls.files();
                cohort_security::client_config(&files.ca, Some((&files.cert, &files.key)))?
            }
            // Never used for plaintext upstreams, but the connector wants one.
            None => rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| ProxyError::Config(format!("TLS client: {e}")))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        };
        // hyper-rustls sets ALPN itself (h2) and refuses a preset one.
        tls.alpn_protocols.clear();
        let upstream_scheme = if upstream.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http2()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_keep_alive_interval(Some(Duration::from_secs(20)))
            .http2_keep_alive_while_idle(true)
            .http2_adaptive_window(true)
            .build(connector);

        // Health answers "" and each exposed service by name; reflection
        // shows only what is exposed (both API versions).
        let health_reporter = tonic_health::server::HealthReporter::new();
        let health = HealthServer::new(tonic_health::server::HealthService::from_health_reporter(
            health_reporter.clone(),
        ));
        for name in std::iter::once("").chain(routing::exposed_services()) {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let public = descriptors::public_descriptor_set(cohort_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| ProxyError::Reflection(format!("Cohort descriptors: {e}")))?;
        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_file_descriptor_set(public.clone())
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
                .include_reflection_service(false);
            for service in routing::exposed_services() {
                builder = builder.with_service_name(service);
            }
            builder
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ProxyError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ProxyError::Reflection(e.to_string()))?;
        let local = tonic::service::Routes::new(health.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        Ok(Self {
            job_scheduler: config.job_scheduler.clone(),
            model_manager: config.model_manager.clone(),
            client_selector: config.client_selector.clone(),
            routes,
            gate,
            client,
            upstream_scheme,
            health_reporter,
            health,
            local: BoxCloneSyncService::new(local),
            refused_callers: LogThrottle::new(REFUSAL_LOG_INTERVAL),
            refused_internal: LogThrottle::new(REFUSAL_LOG_INTERVAL),
        })
    }

    pub(crate) fn health(&self) -> HealthServer {
        self.health.clone()
    }

    pub(crate) async fn set_not_serving(&self) {
        for name in std::iter::once("").chain(routing::exposed_services()) {
            self.health_reporter
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
    }

    pub(crate) async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: Option<&Identity>,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let (destination, audience) = routing::route(&path);
        if let Err(status) = self.gate.admit(audience, peer, req.headers_mut()).await {
            if let Some(held_back) = self.refused_callers.admit() {
                tracing::info!(%path, peer = ?peer, code = ?status.code(), reason = %status.message(), held_back, "refused caller");
            }
            return grpc_error(status);
        }
        match destination {
            Destination::JobScheduler => {
                self.forward("job-scheduler", &self.job_scheduler, req)
                    .await
            }
            Destination::ModelManager => {
                self.forward("model-manager", &self.model_manager, req)
                    .await
            }
            Destination::ClientSelector => {
                self.forward("client-selector", &self.client_selector, req)
                    .await
            }
            Destination::Coordinator => self.to_coordinator(&path, req).await,
            Destination::Health | Destination::Reflection => local(self.local.clone(), req).await,
            Destination::Refused(Refusal::Internal) => {
                if let Some(held_back) = self.refused_internal.admit() {
                    tracing::warn!(%path, held_back, "refused: server-internal service");
                }
                grpc_error(Status::permission_denied(format!(
                    "{path} is server-internal and not exposed by the proxy"
                )))
            }
            Destination::Refused(Refusal::Unknown) => {
                tracing::debug!(%path, "refused: unknown path");
                grpc_error(Status::unimplemented(format!(
                    "{path} is not served by the proxy"
                )))
            }
        }
    }

    async fn to_coordinator(&self, path: &str, req: Request<Incoming>) -> Response<Body> {
        let key = cohort_proto::JOB_METADATA_KEY;
        let job = match req.headers().get(key).map(|v| v.to_str()) {
            Some(Ok(job)) if !job.trim().is_empty() => job.trim().to_string(),
            Some(_) => {
                tracing::warn!(%path, "round call with an unreadable {key}");
                return grpc_error(Status::invalid_argument(format!(
                    "{key} metadata must be a non-empty job id"
                )));
            }
            None => {
                tracing::warn!(%path, "round call without {key}");
                return grpc_error(Status::invalid_argument(format!(
                    "{key} metadata is required: it names the job whose coordinator serves {path}"
                )));
            }
        };
        match self.routes.resolve(&job).await {
            Resolution::Found(endpoint) => {
                let target = format!("coordinator of job {job}");
                self.forward(&target, &endpoint, req).await
            }
            Resolution::Unknown => {
                tracing::warn!(%path, %job, "no coordinator for job");
                grpc_error(Status::not_found(format!(
                    "job {job} has no running coordinator"
                )))
            }
            Resolution::Unavailable(e) => {
                tracing::warn!(%path, %job, error = %e, "cannot resolve job");
                grpc_error(Status::unavailable(format!(
                    "cannot find the coordinator of job {job}: {e}"
                )))
            }
        }
    }

    /// Sends the call to `endpoint` as is: headers, streaming body, trailers.
    async fn forward(
        &self,
        target: &str,
        endpoint: &Endpoint,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        let path_and_query = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme(self.upstream_scheme.clone())
            .authority(endpoint.authority().clone())
            .path_and_query(path_and_query)
            .build();
        match uri {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => {
                return grpc_error(Status::internal(format!(
                    "cannot address {target} at {endpoint}: {e}"
                )));
            }
        }
        let path = req.uri().path().to_string();
        tracing::debug!(%path, upstream = %target, %endpoint, "forwarding");
        match self.client.request(req).await {
            Ok(response) => response.map(Body::new),
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!(%path, upstream = %target, %endpoint, error = %reason, "upstream unreachable");
                grpc_error(Status::new(
                    Code::Unavailable,
                    format!("{target} at {endpoint} is unavailable: {reason}"),
                ))
            }
        }
    }
}

async fn local(service: LocalService, req: Request<Incoming>) -> Response<Body> {
    match service.oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// A trailers-only gRPC error response (HTTP 200, grpc-status in headers).
fn grpc_error(status: Status) -> Response<Body> {
    status.into_http()
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
