//! The REST/JSON API beside gRPC on the proxy's port: `/api/...` over HTTP/2
//! (prior knowledge or ALPN h2) and over HTTP/1.1 (ALPN http/1.1).
//!
//! For the dashboard (and anything else served on the proxy's port):
//! `rest::router(state) -> axum::Router` is the whole HTTP surface; merge
//! static routes into it with `.merge(..)`. HTTP/1.1 connections get only
//! this router; HTTP/2 requests get it when their path starts with `/api/`.
//!
//! Authentication is the gate's: a bearer token is checked exactly as for a
//! gRPC user call, and the identity the gate sets (namespace, role, token id)
//! rides on the handler's gRPC call to the owning service, which authorises
//! it as it authorises the CLI. No rule about who may do what lives here.

mod clients;
mod jobs;
mod models;
mod observe;
mod openapi;
mod problem;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header::AUTHORIZATION};
use axum::routing::{get, post};
use cohort_proto::v1::audit_client::AuditClient;
use cohort_proto::v1::client_selector_client::ClientSelectorClient;
use cohort_proto::v1::jobs_client::JobsClient;
use cohort_proto::v1::models_client::ModelsClient;
use cohort_proto::v1::tokens_client::TokensClient;
use cohort_proto::{NAMESPACE_METADATA_KEY, ROLE_METADATA_KEY, TOKEN_METADATA_KEY};
use cohort_runtime::{Channel, Tls};

pub use openapi::{ApiDoc, openapi_json};
pub use problem::Problem;

use crate::gate::Gate;
use crate::routing::Audience;
use crate::{Endpoint, ProxyError};

/// Bound on one unary call to a service behind the proxy.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Model chunks are 1 MiB; leave room.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// What the REST handlers share: the gate and a gRPC client per service.
#[derive(Clone)]
pub struct RestState {
    inner: Arc<Inner>,
}

struct Inner {
    gate: Arc<Gate>,
    jobs: JobsClient<Channel>,
    tokens: TokensClient<Channel>,
    audit: AuditClient<Channel>,
    models: ModelsClient<Channel>,
    selector: ClientSelectorClient<Channel>,
}

impl RestState {
    pub(crate) fn new(
        gate: Arc<Gate>,
        job_scheduler: &Endpoint,
        model_manager: &Endpoint,
        client_selector: &Endpoint,
        upstream: Option<&Tls>,
    ) -> Result<Self, ProxyError> {
        let scheduler = cohort_runtime::channel(&job_scheduler.to_string(), upstream)?;
        let models = cohort_runtime::channel(&model_manager.to_string(), upstream)?;
        let selector = cohort_runtime::channel(&client_selector.to_string(), upstream)?;
        Ok(Self {
            inner: Arc::new(Inner {
                gate,
                jobs: JobsClient::new(scheduler.clone()),
                tokens: TokensClient::new(scheduler.clone()),
                audit: AuditClient::new(scheduler),
                models: ModelsClient::new(models)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
                selector: ClientSelectorClient::new(selector),
            }),
        })
    }

    fn jobs(&self) -> JobsClient<Channel> {
        self.inner.jobs.clone()
    }
    fn tokens(&self) -> TokensClient<Channel> {
        self.inner.tokens.clone()
    }
    fn audit(&self) -> AuditClient<Channel> {
        self.inner.audit.clone()
    }
    fn models(&self) -> ModelsClient<Channel> {
        self.inner.models.clone()
    }
    fn selector(&self) -> ClientSelectorClient<Channel> {
        self.inner.selector.clone()
    }
}

/// The whole REST surface (the OpenAPI document at `/api/openapi.json` needs no token).
pub fn router(state: RestState) -> axum::Router {
    axum::Router::new()
        .route("/api/openapi.json", get(openapi::serve))
        .route("/api/v1/whoami", get(clients::whoami))
        .route("/api/v1/jobs", get(jobs::list).post(jobs::create))
        .route("/api/v1/jobs/{id}", get(jobs::get_job).delete(jobs::delete))
        .route("/api/v1/jobs/{id}/rounds", get(jobs::rounds))
        .route("/api/v1/jobs/{id}/events", get(jobs::events))
        .route("/api/v1/jobs/{id}/watch", get(jobs::watch))
        .route("/api/v1/jobs/{id}/stop", post(jobs::stop))
        .route("/api/v1/models", get(models::list))
        .route("/api/v1/models/{name}", get(models::get_model))
        .route("/api/v1/models/{name}/versions", post(models::upload))
        .route(
            "/api/v1/models/{name}/versions/{version}/download",
            get(models::download),
        )
        .route("/api/v1/clients", get(clients::list))
        .route("/api/v1/clients/{party}/revoke", post(clients::revoke))
        .route(
            "/api/v1/tokens",
            get(clients::list_tokens).post(clients::create_token),
        )
        .route(
            "/api/v1/tokens/{id}",
            axum::routing::delete(clients::delete_token),
        )
        .route("/api/v1/audit", get(clients::audit))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(observe::observe))
}

async fn not_found(uri: axum::http::Uri) -> Problem {
    Problem::new(
        cohort_core::ErrorKind::NotFound,
        format!("no such resource: {} (see /api/openapi.json)", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Problem {
    Problem {
        problem_type: "urn:cohort:problem:method_not_allowed".into(),
        title: "Method Not Allowed".into(),
        status: 405,
        detail: format!(
            "{method} is not served on {} (see /api/openapi.json)",
            uri.path()
        ),
        field: None,
    }
}

/// A caller the gate admitted: the identity metadata it set.
pub(crate) struct Caller {
    identity: HeaderMap,
}

impl FromRequestParts<RestState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &RestState) -> Result<Self, Problem> {
        let mut identity = HeaderMap::new();
        if let Some(value) = parts.headers.get(AUTHORIZATION) {
            identity.insert(AUTHORIZATION, value.clone());
        }
        state
            .inner
            .gate
            .admit(Audience::User, None, &mut identity)
            .await
            .map_err(Problem::from)?;
        Ok(Caller { identity })
    }
}

impl Caller {
    /// `message` as a gRPC request carrying the caller's identity, as the gate forwards it.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        for key in [
            NAMESPACE_METADATA_KEY,
            ROLE_METADATA_KEY,
            TOKEN_METADATA_KEY,
        ] {
            if let Some(value) = self.identity.get(key).and_then(|v| v.to_str().ok())
                && let Ok(value) = value.parse()
            {
                request.metadata_mut().insert(key, value);
            }
        }
        request
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.identity.get(key).and_then(|v| v.to_str().ok())
    }
}

/// One unary call to `service`, bounded in time; its status becomes a problem.
/// A query string's fields, or a 400 problem naming `query`.
fn query<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, Problem> {
    query
        .map(|axum::extract::Query(q)| q)
        .map_err(|e| Problem::invalid("query", e.body_text()))
}

async fn call<T>(
    service: &str,
    response: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Problem> {
    match tokio::time::timeout(CALL_TIMEOUT, response).await {
        Err(_) => Err(Problem::unavailable(service)),
        Ok(Err(status)) => Err(Problem::from(status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    /// A router whose services are never reached (nothing listens on port 1).
    fn offline_router() -> axum::Router {
        let nowhere = Endpoint::parse_field("test", "127.0.0.1:1").unwrap();
        let gate = Gate::new(
            true,
            &nowhere,
            &nowhere,
            None,
            Duration::from_millis(200),
            Duration::from_secs(1),
        )
        .unwrap();
        router(RestState::new(Arc::new(gate), &nowhere, &nowhere, &nowhere, None).unwrap())
    }

    async fn answer(method: &str, path: &str) -> (StatusCode, String, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let response = offline_router().oneshot(request).await.unwrap();
        let kind = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, kind, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn unknown_paths_methods_and_missing_tokens_are_problems() {
        for (method, path, status) in [
            ("GET", "/api/v1/nosuch", 404),
            ("PUT", "/api/v1/jobs", 405),
            ("GET", "/api/v1/jobs", 401),
        ] {
            let (got, kind, body) = answer(method, path).await;
            assert_eq!(got.as_u16(), status, "{method} {path}: {body}");
            assert_eq!(kind, problem::PROBLEM_JSON, "{method} {path}: {body}");
        }
        // Counted by the route axum matched; a path no route matched is `unknown`.
        let before = (
            cohort_metrics::http::requests("/api/v1/jobs/{id}", "GET", 401),
            cohort_metrics::http::requests("unknown", "GET", 404),
        );
        answer("GET", "/api/v1/jobs/j-1").await;
        answer("GET", "/api/v1/nosuch/deeper").await;
        assert_eq!(
            cohort_metrics::http::requests("/api/v1/jobs/{id}", "GET", 401),
            before.0 + 1
        );
        assert!(cohort_metrics::http::requests("unknown", "GET", 404) > before.1);
        let (status, kind, body) = answer("GET", "/api/openapi.json").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(kind, "application/json");
        assert_eq!(body, openapi_json());
    }
}
