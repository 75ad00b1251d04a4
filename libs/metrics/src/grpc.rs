//! A tower layer for gRPC servers: per method, requests by status code, latency (until the
//! response's last frame: a stream is timed to its end) and calls in flight. One layer
//! shared by every service, not code in each handler.
//!
//! The method label comes from the request path only when the path is one the server
//! serves; anything else (a caller can send any path) counts as `unknown`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};

use crate::{HistogramVec, IntCounterVec, IntGaugeVec};

struct ServerMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
}

static SERVER: LazyLock<ServerMetrics> = LazyLock::new(|| ServerMetrics {
    requests: crate::counter_vec(
        "grpc_server_requests_total",
        "gRPC calls this server answered, by method and status code.",
        &["grpc_service", "grpc_method", "grpc_code"],
    ),
    duration: crate::histogram_vec(
        "grpc_server_request_duration_seconds",
        "Time from a gRPC call's arrival to its response's last frame (a stream's end).",
        &["grpc_service", "grpc_method"],
        crate::DURATION_BUCKETS,
    ),
    in_flight: crate::register(
        IntGaugeVec::new(
            crate::Opts::new(
                "grpc_server_requests_in_flight",
                "gRPC calls this server is answering now.",
            )
            .namespace(crate::NAMESPACE),
            &["grpc_service", "grpc_method"],
        )
        .expect("metric options are constants"),
    ),
});

/// The layer. `methods` are the paths the server serves (`/package.Service/Method`).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    methods: Arc<HashSet<String>>,
}

impl GrpcMetricsLayer {
    pub fn new(methods: impl IntoIterator<Item = String>) -> Self {
        Self {
            methods: Arc::new(methods.into_iter().collect()),
        }
    }

    fn labels(&self, path: &str) -> (String, String) {
        if self.methods.contains(path)
            && let Some((service, method)) = path.trim_start_matches('/').split_once('/')
        {
            return (service.to_string(), method.to_string());
        }
        ("unknown".to_string(), "unknown".to_string())
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (service, method) = self.layer.labels(req.uri().path());
        let call = Call::start(service, method);
        ResponseFuture {
            inner: self.inner.call(req),
            call: Some(call),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<MeteredBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                if let Some(call) = &mut call {
                    // A trailers-only response (an error at once) has its status here.
                    call.status_from(response.headers());
                }
                Ok(response.map(|inner| {
                    let call = call.map(|mut c| {
                        c.ended = inner.is_end_stream();
                        c
                    });
                    MeteredBody { inner, call }
                }))
            }
            Err(e) => {
                if let Some(call) = &mut call {
                    call.code = Some("INTERNAL");
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call when it ends or is dropped.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(call) = this.call.as_mut() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(trailers) = f.trailers_ref() {
                        call.status_from(trailers);
                    }
                    call.ended = this.inner.is_end_stream();
                }
                Some(Err(_)) => call.code = call.code.or(Some("INTERNAL")),
                None => call.ended = true,
            }
            if call.ended {
                // Recorded now, not when hyper gets round to dropping the body.
                this.call.take();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One call being answered; recorded when dropped.
pub struct Call {
    service: String,
    method: String,
    start: Instant,
    code: Option<&'static str>,
    ended: bool,
}

impl Call {
    fn start(service: String, method: String) -> Self {
        SERVER
            .in_flight
            .with_label_values(&[service.as_str(), method.as_str()])
            .inc();
        Call {
            service,
            method,
            start: Instant::now(),
            code: None,
            ended: false,
        }
    }

    fn status_from(&mut self, headers: &HeaderMap) {
        if let Some(value) = headers.get("grpc-status") {
            let number = value.to_str().ok().and_then(|v| v.parse::<usize>().ok());
            self.code = Some(
                number
                    .and_then(|n| CODES.get(n).copied())
                    .unwrap_or("UNKNOWN"),
            );
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let labels = [self.service.as_str(), self.method.as_str()];
        SERVER.in_flight.with_label_values(&labels).dec();
        SERVER
            .duration
            .with_label_values(&labels)
            .observe(self.start.elapsed().as_secs_f64());
        // A body dropped before its end: the caller went away.
        let code = match (self.code, self.ended) {
            (Some(code), _) => code,
            (None, true) => "UNKNOWN",
            (None, false) => "CANCELLED",
        };
        SERVER
            .requests
            .with_label_values(&[labels[0], labels[1], code])
            .inc();
    }
}

/// gRPC's status codes by number, named as in the gRPC specification.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use tower::{Layer, ServiceExt};

    type TestBody = StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
    >;

    fn count(service: &str, method: &str, code: &str) -> u64 {
        SERVER
            .requests
            .with_label_values(&[service, method, code])
            .get()
    }

    fn answer_with(frames: Vec<Frame<Bytes>>, headers_status: Option<&str>) -> Response<TestBody> {
        let frames: Vec<_> = frames.into_iter().map(Ok).collect();
        let mut response = Response::new(StreamBody::new(futures::stream::iter(frames)));
        if let Some(s) = headers_status {
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_str(s).unwrap());
        }
        response
    }

    fn trailers(code: &str) -> Frame<Bytes> {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_str(code).unwrap());
        Frame::trailers(t)
    }

    async fn call(
        layer: &GrpcMetricsLayer,
        path: &str,
        response: Response<TestBody>,
    ) -> Response<MeteredBody<TestBody>> {
        let response = std::sync::Mutex::new(Some(response));
        let inner = tower::service_fn(move |_req: Request<()>| {
            let r = response.lock().unwrap().take().unwrap();
            async move { Ok::<_, std::convert::Infallible>(r) }
        });
        let req = Request::builder().uri(path).body(()).unwrap();
        layer.layer(inner).oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn calls_are_counted_by_method_and_the_code_of_their_trailers() {
        let layer = GrpcMetricsLayer::new(["/t.v1.Things/Get".to_string()]);
        let before = count("t.v1.Things", "Get", "NOT_FOUND");
        let response = call(
            &layer,
            "/t.v1.Things/Get",
            answer_with(
                vec![Frame::data(Bytes::from_static(b"x")), trailers("5")],
                None,
            ),
        )
        .await;
        // In flight until the body has been read to its end.
        assert_eq!(
            SERVER
                .in_flight
                .with_label_values(&["t.v1.Things", "Get"])
                .get(),
            1
        );
        response.into_body().collect().await.unwrap();
        assert_eq!(count("t.v1.Things", "Get", "NOT_FOUND"), before + 1);
        assert_eq!(
            SERVER
                .in_flight
                .with_label_values(&["t.v1.Things", "Get"])
                .get(),
            0
        );
    }

    #[tokio::test]
    async fn trailers_only_answers_unknown_paths_and_dropped_streams_are_bounded() {
        let layer = GrpcMetricsLayer::new(["/t.v1.Other/Put".to_string()]);
        // An error at once: the status is in the headers and the body is empty.
        let before = count("t.v1.Other", "Put", "PERMISSION_DENIED");
        let r = call(&layer, "/t.v1.Other/Put", answer_with(vec![], Some("7"))).await;
        drop(r);
        assert_eq!(count("t.v1.Other", "Put", "PERMISSION_DENIED"), before + 1);
        // Any path a caller invents is one label value.
        let before = count("unknown", "unknown", "UNIMPLEMENTED");
        for path in ["/x.Y/Z", "/a/b/c", "/t.v1.Other/Get"] {
            let r = call(&layer, path, answer_with(vec![trailers("12")], None)).await;
            r.into_body().collect().await.unwrap();
        }
        assert_eq!(count("unknown", "unknown", "UNIMPLEMENTED"), before + 3);
        // A stream whose caller went away before its end.
        let before = count("t.v1.Other", "Put", "CANCELLED");
        let r = call(
            &layer,
            "/t.v1.Other/Put",
            answer_with(
                vec![Frame::data(Bytes::from_static(b"x")), trailers("0")],
                None,
            ),
        )
        .await;
        drop(r);
        assert_eq!(count("t.v1.Other", "Put", "CANCELLED"), before + 1);
        // A status number outside gRPC's is UNKNOWN, not a new label value.
        let before = count("t.v1.Other", "Put", "UNKNOWN");
        let r = call(&layer, "/t.v1.Other/Put", answer_with(vec![], Some("99"))).await;
        drop(r);
        assert_eq!(count("t.v1.Other", "Put", "UNKNOWN"), before + 1);
    }
}
