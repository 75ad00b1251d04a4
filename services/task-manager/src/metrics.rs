//! task-manager's Prometheus metrics: one party per process, so no label names it.
//! Executors report through here (they rarely live long enough to be scraped).

use std::sync::LazyLock;
use std::time::Duration;

use cohort_metrics::{HistogramVec, IntCounterVec};
use cohort_proto::v1 as pb;

struct Metrics {
    offers: IntCounterVec,
    tasks: IntCounterVec,
    task_duration: HistogramVec,
    executor_start: HistogramVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    offers: cohort_metrics::counter_vec(
        "party_offers_total",
        "Task offers this party answered, by answer (accepted or refused).",
        &["answer"],
    ),
    tasks: cohort_metrics::counter_vec(
        "party_tasks_total",
        "Tasks this party ran, by kind and outcome (succeeded, failed, cancelled).",
        &["kind", "outcome"],
    ),
    task_duration: cohort_metrics::histogram_vec(
        "party_task_duration_seconds",
        "Time from a task's acceptance to its end (fetch, training or evaluation, upload).",
        &["kind"],
        cohort_metrics::DURATION_BUCKETS,
    ),
    executor_start: cohort_metrics::histogram_vec(
        "executor_start_duration_seconds",
        "Time to hand a task to an executor: spawning a process (process), reusing or \
         starting the job's kept one (warm), creating a Pod (pod).",
        &["launcher"],
        cohort_metrics::DURATION_BUCKETS,
    ),
});

pub(crate) fn offer(accepted: bool) {
    let answer = if accepted { "accepted" } else { "refused" };
    METRICS.offers.with_label_values(&[answer]).inc();
}

fn kind(task: &pb::Task) -> &'static str {
    cohort_runtime::wire::task_kind_from_wire(task.kind).map_or("unknown", |k| k.as_str())
}

pub(crate) fn task_ended(task: &pb::Task, phase: pb::TaskPhase, took: Duration) {
    let outcome = match phase {
        pb::TaskPhase::Succeeded => "succeeded",
        pb::TaskPhase::Cancelled => "cancelled",
        _ => "failed",
    };
    let kind = kind(task);
    METRICS.tasks.with_label_values(&[kind, outcome]).inc();
    METRICS
        .task_duration
        .with_label_values(&[kind])
        .observe(took.as_secs_f64());
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Launcher {
    Process,
    Warm,
    Pod,
}

pub(crate) fn executor_started(launcher: Launcher, took: Duration) {
    let launcher = match launcher {
        Launcher::Process => "process",
        Launcher::Warm => "warm",
        Launcher::Pod => "pod",
    };
    METRICS
        .executor_start
        .with_label_values(&[launcher])
        .observe(took.as_secs_f64());
}
