//! job-scheduler's Prometheus metrics: jobs by state, counted by the store, and the rounds
//! coordinators report (job-scheduler outlives them; no job label, so it stays bounded:
//! per-job figures are the coordinator's while it runs, and the rounds' records).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use cohort_core::JobState;
use cohort_metrics::{GaugeVec, Histogram, IntCounter};
use cohort_store::jobs::JobStore;

/// How often the job counts are read from the store (one GROUP BY query).
pub const JOB_COUNT_INTERVAL: Duration = Duration::from_secs(5);

static JOBS: LazyLock<GaugeVec> = LazyLock::new(|| {
    cohort_metrics::gauge_vec(
        "jobs",
        "Jobs in each state, over every namespace (read from the store every 5 s).",
        &["state"],
    )
});

static ROUNDS: LazyLock<IntCounter> = LazyLock::new(|| {
    cohort_metrics::counter(
        "rounds_total",
        "Rounds completed (their model stored) and reported by coordinators.",
    )
});

static ROUND_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    cohort_metrics::histogram(
        "round_duration_seconds",
        "Time from a round's offer to its model stored, as its coordinator measured it.",
        cohort_metrics::DURATION_BUCKETS,
    )
});

pub fn round_completed(duration: Duration) {
    ROUNDS.inc();
    ROUND_DURATION.observe(duration.as_secs_f64());
}

/// Sets the gauge from the store: every state, 0 where no job is in it.
pub async fn count_jobs(store: &dyn JobStore) {
    match store.count_jobs_by_state().await {
        Ok(counts) => {
            for state in JobState::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| *s == state)
                    .map_or(0, |(_, n)| *n);
                let label = state.as_str().to_ascii_lowercase();
                JOBS.with_label_values(&[label.as_str()]).set(n as f64);
            }
        }
        // Kept at the last count; the store's own errors are logged where they are handled.
        Err(e) => tracing::warn!(error = %e, "cannot count jobs for the metrics"),
    }
}

/// Counts jobs every [`JOB_COUNT_INTERVAL`] until dropped.
pub fn spawn_job_counts(store: Arc<dyn JobStore>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(JOB_COUNT_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            count_jobs(store.as_ref()).await;
        }
    })
}
