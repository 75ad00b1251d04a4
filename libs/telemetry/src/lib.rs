//! Telemetry for every Cohort process: the log subscriber (text or JSON on
//! stderr), OpenTelemetry traces exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard `OTEL_*` variables
//! honoured: service name, resource attributes, sampler, batch settings), and
//! W3C trace context (`traceparent`, `tracestate`) carried in HTTP headers
//! ([`inject_headers`], [`TraceServerLayer`]) and in string maps that travel
//! inside messages ([`context_map`], [`set_parent_from_map`]).
//!
//! With tracing on, every log line carries the `trace_id` and `span_id` of
//! the span it was written in.
//!
//! This crate must not depend on any crate of ours: the runtime and every
//! binary build on it.

mod log_format;
mod server;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use server::{TraceServerLayer, TraceServerService};

#[doc(hidden)]
pub use tracing as __tracing;

/// `tracing::info_span!(...)` while traces are exported, else a disabled span:
/// spans made only for traces (a round, a task, a fold) leave logs as they
/// are when tracing is off.
#[macro_export]
macro_rules! trace_span {
    ($($arg:tt)*) => {
        if $crate::tracing_enabled() {
            $crate::__tracing::info_span!($($arg)*)
        } else {
            $crate::__tracing::Span::none()
        }
    };
}

/// The variable that turns tracing on.
pub const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The trace settings a process passes to the processes and Pods it starts
/// (coordinators, executors), so that their spans reach the same collector.
/// Not `OTEL_SERVICE_NAME`: a child is another service.
pub const CHILD_VARIABLES: [&str; 13] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
];

/// This process's values of [`CHILD_VARIABLES`], to give a child.
pub fn child_environment() -> Vec<(&'static str, String)> {
    CHILD_VARIABLES
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| (*name, v)))
        .collect()
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    Text,
    Json,
}

static TRACING_ON: OnceLock<bool> = OnceLock::new();

/// Whether spans go to an OTLP endpoint in this process. Code that makes
/// spans only for traces (one per gRPC call, one per round) asks this first,
/// so that with tracing off logs stay as they were and nothing is spent.
pub fn tracing_enabled() -> bool {
    TRACING_ON.get().copied().unwrap_or(false)
}

/// The process's telemetry; flushes the spans still queued when dropped or
/// shut down. Keep it alive for the whole of `main`.
#[must_use = "dropping it stops the export of traces"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    // The exporter's gRPC connection lives on its own runtime, so that
    // flushing at exit works from any thread, also from a single-threaded
    // runtime's only thread (the executor's), which the export would
    // otherwise need and block.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Exports what is queued (bounded by the export timeout) and stops.
    pub fn shutdown(mut self) {
        self.flush_and_stop();
    }

    fn flush_and_stop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("warning: traces not all exported at exit: {e}");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.flush_and_stop();
    }
}

/// Installs the global subscriber: logs to stderr filtered by `RUST_LOG`
/// (default: info), and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans
/// exported over OTLP/gRPC under `OTEL_SERVICE_NAME` or else `service`.
/// A failure to set up the exporter is reported on stderr and leaves logging
/// on: a process never fails to start for want of a trace collector.
pub fn init(service: &str, style: LogStyle) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let endpoint = std::env::var(OTLP_ENDPOINT_VAR)
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (provider, runtime) = match endpoint {
        Some(endpoint) => match exporting_provider(service) {
            Ok((provider, runtime)) => (Some(provider), Some(runtime)),
            Err(message) => {
                eprintln!("warning: no traces: {OTLP_ENDPOINT_VAR}={endpoint:?}: {message}");
                (None, None)
            }
        },
        None => (None, None),
    };
    let tracing_on = provider.is_some();
    let _ = TRACING_ON.set(tracing_on);
    // Spans are exported at INFO whatever RUST_LOG says: quieter logs must not
    // cut traces apart.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("cohort"))
            .with_error_events_to_status(true)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let fmt = log_format::layer(style, tracing_on).with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .try_init();
    Telemetry { provider, runtime }
}

/// For a command-line tool, whose output is its own: spans exported when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, no log lines. Nothing is installed
/// otherwise.
pub fn init_traces_only(service: &str) -> Telemetry {
    let configured = std::env::var(OTLP_ENDPOINT_VAR).is_ok_and(|v| !v.trim().is_empty());
    if !configured {
        return Telemetry {
            provider: None,
            runtime: None,
        };
    }
    match exporting_provider(service) {
        Ok((provider, runtime)) => {
            let _ = TRACING_ON.set(true);
            let otel = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("cohort"))
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
            let _ = tracing_subscriber::registry().with(otel).try_init();
            Telemetry {
                provider: Some(provider),
                runtime: Some(runtime),
            }
        }
        Err(message) => {
            eprintln!("warning: no traces: {message}");
            Telemetry {
                provider: None,
                runtime: None,
            }
        }
    }
}

fn exporting_provider(
    service: &str,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the export thread: {e}"))?;
    // The channel's worker is spawned on the runtime entered while building.
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| e.to_string())?
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME (read by the default detectors) wins over our name.
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.trim().is_empty()) {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok((provider, runtime))
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Longest trace-context value taken from a peer: `traceparent` is 55
/// characters, `tracestate` at most 32 members of 256 (W3C).
const MAX_CONTEXT_VALUE: usize = 8192;

/// Writes the current span's context into `headers` (replacing any there).
/// Nothing when tracing is off or no span is current.
pub fn inject_headers(headers: &mut http::HeaderMap) {
    if !tracing_enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The context a peer sent in `headers`; an empty one when none (or it is
/// malformed: the propagator refuses what is not W3C trace context).
pub fn extract_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    let too_long = ["traceparent", "tracestate"]
        .iter()
        .any(|k| headers.get(*k).is_some_and(|v| v.len() > MAX_CONTEXT_VALUE));
    if too_long {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The current span's context as a string map, to travel inside a message
/// (a task offered to a party, a task handed to an executor). Empty when
/// tracing is off.
pub fn context_map() -> HashMap<String, String> {
    let mut map = HashMap::new();
    if tracing_enabled() {
        let cx = tracing::Span::current().context();
        TraceContextPropagator::new().inject_context(&cx, &mut map);
    }
    map
}

/// Makes `span` a child of the context a caller sent in its `traceparent`
/// header (for servers that are not behind [`TraceServerLayer`]).
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if !tracing_enabled() {
        return;
    }
    let _ = span.set_parent(extract_headers(headers));
}

/// Makes `span` a child of the context in `map` (from [`context_map`] in
/// another process). Nothing when tracing is off or the map has none.
pub fn set_parent_from_map(span: &tracing::Span, map: &HashMap<String, String>) {
    if !tracing_enabled() || map.values().any(|v| v.len() > MAX_CONTEXT_VALUE) {
        return;
    }
    let cx = TraceContextPropagator::new().extract(map);
    // Only before the span is first entered; later it keeps its parent.
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_crosses_headers_and_maps_unchanged() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().unwrap());
        let cx = extract_headers(&headers);
        let mut map = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut map);
        assert_eq!(
            map.get("traceparent").map(String::as_str),
            Some(traceparent)
        );
    }

    #[test]
    fn malformed_or_oversized_context_is_ignored() {
        use opentelemetry::trace::TraceContextExt as _;
        for bad in [
            "not-a-traceparent".to_string(),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_string(),
            format!("00-{}-00f067aa0ba902b7-01", "a".repeat(MAX_CONTEXT_VALUE)),
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", bad.parse().unwrap());
            let cx = extract_headers(&headers);
            assert!(!cx.span().span_context().is_valid(), "{bad}");
        }
    }
}
