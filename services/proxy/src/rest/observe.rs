//! What every REST request leaves behind: a server span (a child of the caller's
//! `traceparent`, the parent of the gRPC calls its handler makes) and the
//! `cohort_http_server_*` metrics, by the route template axum matched.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument as _;

/// Route label of a request no route matched.
const UNMATCHED: &str = "unknown";

pub(crate) async fn observe(
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched
        .as_ref()
        .map_or(UNMATCHED, |m| m.as_str())
        .to_owned();
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "http.server",
        otel.name = %format!("{} {route}", cohort_metrics::http::method_label(&method)),
        otel.kind = "server",
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    cohort_telemetry::set_parent_from_headers(&span, request.headers());
    let start = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    cohort_metrics::http::record(&route, &method, status, start.elapsed());
    response
}
