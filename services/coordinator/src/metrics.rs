//! The coordinator's Prometheus metrics. A coordinator runs one job: every metric carries
//! its id as `job_id` and goes away with the process, so the label stays bounded. Rounds
//! completed and their durations are counted by job-scheduler, which outlives it.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use cohort_core::ErrorKind;
use cohort_metrics::{GaugeVec, HistogramVec, IntCounterVec};

static JOB_ID: OnceLock<String> = OnceLock::new();

/// Names the job every metric of this process is about (once, at start).
pub(crate) fn set_job(job_id: &str) {
    let _ = JOB_ID.set(job_id.to_string());
}

fn job() -> &'static str {
    JOB_ID.get().map(String::as_str).unwrap_or("")
}

struct Metrics {
    phase_duration: HistogramVec,
    updates: IntCounterVec,
    refused: IntCounterVec,
    update_bytes: IntCounterVec,
    accuracy: GaugeVec,
    loss: GaugeVec,
    aggregated_bytes: IntCounterVec,
    aggregation_throughput: GaugeVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    phase_duration: cohort_metrics::histogram_vec(
        "round_phase_duration_seconds",
        "Time spent in each phase of a round. Per round: offer (asking client-selector until \
         enough parties accepted), train (offer to every update folded), evaluate, checkpoint \
         (the model stored). Per party: fetch (the model sent to it), upload (its update \
         received and checked), aggregate (its update folded into the sum).",
        &["job_id", "phase"],
        cohort_metrics::DURATION_BUCKETS,
    ),
    updates: cohort_metrics::counter_vec(
        "updates_total",
        "Updates parties sent, by outcome: accepted (folded), rejected (content the model \
         cannot take) or broken (not received whole: too slow, the round ended).",
        &["job_id", "outcome"],
    ),
    refused: cohort_metrics::counter_vec(
        "round_calls_refused_total",
        "Round API calls refused (bad token, wrong party, bad update, ...), by error kind.",
        &["job_id", "reason"],
    ),
    update_bytes: cohort_metrics::counter_vec(
        "update_bytes_total",
        "Model bytes sent to parties (to_parties) and update bytes received (from_parties).",
        &["job_id", "direction"],
    ),
    accuracy: cohort_metrics::gauge_vec(
        "round_accuracy_ratio",
        "Held-out accuracy of the latest evaluated round (0 to 1).",
        &["job_id"],
    ),
    loss: cohort_metrics::gauge_vec(
        "round_loss",
        "Held-out loss of the latest evaluated round.",
        &["job_id"],
    ),
    aggregated_bytes: cohort_metrics::counter_vec(
        "aggregated_bytes_total",
        "Update bytes folded into the aggregate.",
        &["job_id"],
    ),
    aggregation_throughput: cohort_metrics::gauge_vec(
        "aggregation_throughput_bytes_per_second",
        "Bytes per second of the latest update folded into the aggregate (read back from \
         staging, checked and added).",
        &["job_id"],
    ),
});

#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    Offer,
    Fetch,
    Train,
    Upload,
    Aggregate,
    Evaluate,
    Checkpoint,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Offer => "offer",
            Phase::Fetch => "fetch",
            Phase::Train => "train",
            Phase::Upload => "upload",
            Phase::Aggregate => "aggregate",
            Phase::Evaluate => "evaluate",
            Phase::Checkpoint => "checkpoint",
        }
    }
}

pub(crate) fn phase(phase: Phase, duration: Duration) {
    METRICS
        .phase_duration
        .with_label_values(&[job(), phase.name()])
        .observe(duration.as_secs_f64());
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum UpdateOutcome {
    Accepted,
    Rejected,
    Broken,
}

pub(crate) fn update(outcome: UpdateOutcome) {
    let outcome = match outcome {
        UpdateOutcome::Accepted => "accepted",
        UpdateOutcome::Rejected => "rejected",
        UpdateOutcome::Broken => "broken",
    };
    METRICS.updates.with_label_values(&[job(), outcome]).inc();
}

pub(crate) fn refused(kind: ErrorKind) {
    METRICS
        .refused
        .with_label_values(&[job(), kind.name()])
        .inc();
}

pub(crate) fn sent(bytes: usize) {
    METRICS
        .update_bytes
        .with_label_values(&[job(), "to_parties"])
        .inc_by(bytes as u64);
}

pub(crate) fn received(bytes: usize) {
    METRICS
        .update_bytes
        .with_label_values(&[job(), "from_parties"])
        .inc_by(bytes as u64);
}

/// An update of `bytes` folded in `duration`.
pub(crate) fn folded(bytes: usize, duration: Duration) {
    METRICS
        .aggregated_bytes
        .with_label_values(&[job()])
        .inc_by(bytes as u64);
    let seconds = duration.as_secs_f64();
    if seconds > 0.0 {
        METRICS
            .aggregation_throughput
            .with_label_values(&[job()])
            .set(bytes as f64 / seconds);
    }
    phase(Phase::Aggregate, duration);
}

pub(crate) fn evaluated(accuracy: f64, loss: f64) {
    METRICS.accuracy.with_label_values(&[job()]).set(accuracy);
    METRICS.loss.with_label_values(&[job()]).set(loss);
}
