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

use crate::gate::Gate;
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
    health: LocalService,
    reflection: LocalService,
}

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

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cohort_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        // Advertise only what is reachable from outside.
        for service in routing::exposed_services() {
            reflection = reflection.with_service_name(service);
        }
        let reflection = reflection
            .build_v1()
            .map_err(|e| ProxyError::Reflection(e.to_string()))?;

        Ok(Self {
            job_scheduler: config.job_scheduler.clone(),
            model_manager: config.model_manager.clone(),
            client_selector: config.client_selector.clone(),
            routes,
            gate,
            client,
            upstream_scheme,
            health_reporter,
            health: BoxCloneSyncService::new(health),
            reflection: BoxCloneSyncService::new(reflection),
        })
    }

    pub(crate) async fn set_not_serving(&self) {
        self.health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }

    pub(crate) async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: Option<&Identity>,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let (destination, audience) = routing::route(&path);
        if let Err(status) = self.gate.admit(audience, peer, req.headers_mut()).await {
            tracing::info!(%path, peer = ?peer, code = ?status.code(), reason = %status.message(), "refused caller");
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
            Destination::Health => local(self.health.clone(), req).await,
            Destination::Reflection => local(self.reflection.clone(), req).await,
            Destination::Refused(Refusal::Internal) => {
                tracing::warn!(%path, "refused: server-internal service");
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
