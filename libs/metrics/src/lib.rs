//! Prometheus metrics of a Cohort process: the process's one registry (with the usual
//! process collector), the `/metrics` endpoint in the text exposition format, and a tower
//! layer that counts and times every gRPC call a server answers ([`grpc`]).
//!
//! Every name starts with `cohort_` and follows Prometheus' rules (base units in the name,
//! `_total` for counters). Labels stay bounded: callers choose label values from closed
//! sets (a gRPC method outside the served ones is `unknown`).
//!
//! Must not depend on any service crate, on storage or on protobuf: services depend on it.

mod endpoint;
pub mod grpc;
pub mod http;

use std::sync::LazyLock;

pub use endpoint::{EndpointError, serve};
pub use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Every metric name starts with this, followed by `_`.
pub const NAMESPACE: &str = "cohort";

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let registry = Registry::new();
    let process =
        prometheus::process_collector::ProcessCollector::new(std::process::id() as i32, NAMESPACE);
    if let Err(e) = registry.register(Box::new(process)) {
        tracing::error!(error = %e, "cannot register the process collector");
    }
    registry
});

/// The process's registry: what `/metrics` shows.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// Registers `metric` and returns it. A metric is defined once per process (in a
/// `LazyLock`); a second registration of one name is a bug, logged, and the metric then
/// counts without being shown rather than taking the process down.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(metric: M) -> M {
    if let Err(e) = REGISTRY.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "cannot register a metric");
    }
    metric
}

/// A counter `cohort_<name>` with `labels`.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let opts = Opts::new(name, help).namespace(NAMESPACE);
    register(IntCounterVec::new(opts, labels).expect("metric options are constants"))
}

/// A counter `cohort_<name>` without labels.
pub fn counter(name: &str, help: &str) -> IntCounter {
    let opts = Opts::new(name, help).namespace(NAMESPACE);
    register(IntCounter::with_opts(opts).expect("metric options are constants"))
}

/// A gauge `cohort_<name>` with `labels`.
pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let opts = Opts::new(name, help).namespace(NAMESPACE);
    register(GaugeVec::new(opts, labels).expect("metric options are constants"))
}

/// An integer gauge `cohort_<name>` without labels.
pub fn int_gauge(name: &str, help: &str) -> IntGauge {
    let opts = Opts::new(name, help).namespace(NAMESPACE);
    register(IntGauge::with_opts(opts).expect("metric options are constants"))
}

/// A histogram `cohort_<name>` with `labels` and `buckets`.
pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets.to_vec());
    register(HistogramVec::new(opts, labels).expect("metric options are constants"))
}

/// A histogram `cohort_<name>` without labels.
pub fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets.to_vec());
    register(Histogram::with_opts(opts).expect("metric options are constants"))
}

/// An integer gauge `cohort_<name>` with `labels` whose values are read when `/metrics` is
/// scraped: `sample` sets them each time, on a gauge emptied first, so a label set it no
/// longer sets disappears. For figures another library keeps (a pool's connections), where
/// a refresh loop would only show them late.
pub fn sampled_int_gauge_vec<F>(name: &str, help: &str, labels: &[&str], sample: F)
where
    F: Fn(&IntGaugeVec) + Send + Sync + 'static,
{
    let opts = Opts::new(name, help).namespace(NAMESPACE);
    let gauge = IntGaugeVec::new(opts, labels).expect("metric options are constants");
    register(Sampled {
        gauge,
        sample: std::sync::Arc::new(sample),
        lock: std::sync::Arc::new(std::sync::Mutex::new(())),
    });
}

#[derive(Clone)]
struct Sampled {
    gauge: IntGaugeVec,
    sample: std::sync::Arc<dyn Fn(&IntGaugeVec) + Send + Sync>,
    /// Two scrapes at once must not see each other's half-filled gauge.
    lock: std::sync::Arc<std::sync::Mutex<()>>,
}

impl prometheus::core::Collector for Sampled {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gauge.reset();
        (self.sample)(&self.gauge);
        self.gauge.collect()
    }
}

/// Buckets for durations from a millisecond to ten minutes, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// The registry in Prometheus' text exposition format.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&REGISTRY.gather(), &mut out) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_shows_the_process_and_what_is_registered() {
        let c = counter_vec("test_things_total", "Things done in a test.", &["kind"]);
        c.with_label_values(&["a"]).inc_by(3);
        let text = render();
        assert!(
            text.contains("cohort_test_things_total{kind=\"a\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("cohort_process_resident_memory_bytes"),
            "{text}"
        );
        assert!(text.contains("cohort_process_open_fds"), "{text}");
        assert!(text.contains("# HELP cohort_test_things_total Things done in a test."));
    }

    #[test]
    fn a_sampled_gauge_is_read_at_each_scrape() {
        use std::sync::atomic::{AtomicI64, Ordering};
        static VALUE: AtomicI64 = AtomicI64::new(3);
        sampled_int_gauge_vec(
            "test_sampled",
            "A gauge read when scraped.",
            &["kind"],
            |g| {
                let v = VALUE.load(Ordering::Relaxed);
                if v > 0 {
                    g.with_label_values(&["a"]).set(v);
                }
            },
        );
        assert!(render().contains("cohort_test_sampled{kind=\"a\"} 3"));
        VALUE.store(5, Ordering::Relaxed);
        assert!(render().contains("cohort_test_sampled{kind=\"a\"} 5"));
        VALUE.store(0, Ordering::Relaxed);
        assert!(
            !render().contains("cohort_test_sampled{"),
            "a label set no longer sampled is gone"
        );
    }
}
