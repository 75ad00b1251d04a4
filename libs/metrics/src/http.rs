//! Requests a plain HTTP API answered (the proxy's REST API): by route template, method and
//! status, and their latency. The caller passes the route template its router matched (or
//! `unknown`), never the raw path, so a client cannot grow the label set.

use std::sync::LazyLock;
use std::time::Duration;

use crate::{HistogramVec, IntCounterVec};

struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

static HTTP: LazyLock<HttpMetrics> = LazyLock::new(|| HttpMetrics {
    requests: crate::counter_vec(
        "http_server_requests_total",
        "HTTP API requests this server answered, by route template, method and status.",
        &["route", "method", "status"],
    ),
    duration: crate::histogram_vec(
        "http_server_request_duration_seconds",
        "Time from an HTTP API request's arrival to its response's head (a streamed body \
         goes on after).",
        &["route", "method"],
        crate::DURATION_BUCKETS,
    ),
});

/// The method as a label: the standard ones by name, anything else `other`.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Counts one answered request.
pub fn record(route: &str, method: &str, status: u16, elapsed: Duration) {
    let method = method_label(method);
    HTTP.requests
        .with_label_values(&[route, method, &status.to_string()])
        .inc();
    HTTP.duration
        .with_label_values(&[route, method])
        .observe(elapsed.as_secs_f64());
}

/// Requests counted so far for these labels (tests).
pub fn requests(route: &str, method: &str, status: u16) -> u64 {
    HTTP.requests
        .with_label_values(&[route, method_label(method), &status.to_string()])
        .get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_and_odd_methods_share_a_label() {
        let before = requests("/api/v1/x/{id}", "BREW", 418);
        record("/api/v1/x/{id}", "BREW", 418, Duration::from_millis(3));
        record("/api/v1/x/{id}", "COFFEE", 418, Duration::from_millis(3));
        assert_eq!(requests("/api/v1/x/{id}", "other", 418), before + 2);
        assert_eq!(method_label("GET"), "GET");
    }
}
