//! The tower layer every gRPC server (and the proxy) wears: one server span
//! per call, a child of the context the caller sent in `traceparent`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{extract_headers, inject_headers, tracing_enabled};

/// Wraps a service so that each call runs in a server span named after its
/// path (`cohort.v1.Round/SubmitUpdate`). With [`TraceServerLayer::forwarding`]
/// the request leaves with this span's context in its headers instead of the
/// caller's, so that the next hop (the proxy's upstream) is its child.
/// Does nothing while tracing is off.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceServerLayer {
    forward: bool,
}

impl TraceServerLayer {
    pub fn new() -> Self {
        Self { forward: false }
    }

    /// For a proxy: the request is passed on as a child of this hop's span.
    pub fn forwarding() -> Self {
        Self { forward: true }
    }
}

impl<S> tower::Layer<S> for TraceServerLayer {
    type Service = TraceServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceServerService {
            inner,
            forward: self.forward,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TraceServerService<S> {
    inner: S,
    forward: bool,
}

/// The span's name: the gRPC path without its slash, bounded (a client can
/// send any path; the span name must stay a name).
fn span_name(path: &str) -> &str {
    let name = path.trim_start_matches('/');
    match name.char_indices().nth(128) {
        Some((cut, _)) => &name[..cut],
        None => name,
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for TraceServerService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if !tracing_enabled() {
            return Box::pin(self.inner.call(req));
        }
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = span_name(req.uri().path()),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(extract_headers(req.headers()));
        if self.forward {
            span.in_scope(|| inject_headers(req.headers_mut()));
        }
        let future = span.in_scope(|| self.inner.call(req));
        let recorder = span.clone();
        Box::pin(
            async move {
                let result = future.await;
                // A call that failed before its body answers in the headers
                // ("trailers only"); a streamed answer's code comes later.
                if let Ok(response) = &result
                    && let Some(code) = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                {
                    recorder.record("rpc.grpc.status_code", code);
                    if code != 0 {
                        recorder.set_status(opentelemetry::trace::Status::error(format!(
                            "grpc-status {code}"
                        )));
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::span_name;

    #[test]
    fn span_names_are_paths_bounded() {
        assert_eq!(
            span_name("/cohort.v1.Round/SubmitUpdate"),
            "cohort.v1.Round/SubmitUpdate"
        );
        assert_eq!(
            span_name(&format!("/{}", "é".repeat(500))).chars().count(),
            128
        );
    }
}
