//! The client channel every process dials with: tonic's channel, with the
//! current span's W3C trace context added to each call's headers, so that the
//! server's span is a child of the caller's.

use std::task::{Context, Poll};

/// A gRPC channel that carries trace context (see the module). Cloning is
/// cheap and shares the connection, as with tonic's `Channel`.
#[derive(Debug, Clone)]
pub struct Channel {
    inner: tonic::transport::Channel,
}

impl Channel {
    pub fn new(inner: tonic::transport::Channel) -> Self {
        Self { inner }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future =
        <tonic::transport::Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // Called from within the caller's future: the current span is the caller's.
        cohort_telemetry::inject_headers(req.headers_mut());
        self.inner.call(req)
    }
}
