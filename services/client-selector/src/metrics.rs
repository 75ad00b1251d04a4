//! client-selector's Prometheus metrics: parties' sessions, offers and task outcomes.
//! No label names a party (their number is unbounded); per-party figures are in the
//! client store (`cohort client list`).

use std::sync::LazyLock;

use cohort_metrics::{IntCounterVec, IntGauge};
use cohort_store::clients::TaskOutcome;

struct Metrics {
    connected: IntGauge,
    sessions: IntCounterVec,
    offers: IntCounterVec,
    tasks: IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    connected: cohort_metrics::int_gauge("clients_connected", "Parties with an open session now."),
    sessions: cohort_metrics::counter_vec(
        "party_sessions_total",
        "Party sessions opened and closed.",
        &["event"],
    ),
    offers: cohort_metrics::counter_vec(
        "offers_total",
        "Task offers sent to parties, by answer: accepted, declined (the party said no), \
         unanswered (no answer in time) or disconnected.",
        &["answer"],
    ),
    tasks: cohort_metrics::counter_vec(
        "task_outcomes_total",
        "Tasks by outcome as parties report them: offered, accepted, succeeded, failed.",
        &["outcome"],
    ),
});

pub(crate) fn connected(parties: usize) {
    METRICS.connected.set(parties as i64);
}

pub(crate) fn session(opened: bool) {
    let event = if opened { "opened" } else { "closed" };
    METRICS.sessions.with_label_values(&[event]).inc();
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum OfferAnswer {
    Accepted,
    Declined,
    Unanswered,
    Disconnected,
}

pub(crate) fn offer(answer: OfferAnswer) {
    let answer = match answer {
        OfferAnswer::Accepted => "accepted",
        OfferAnswer::Declined => "declined",
        OfferAnswer::Unanswered => "unanswered",
        OfferAnswer::Disconnected => "disconnected",
    };
    METRICS.offers.with_label_values(&[answer]).inc();
}

pub(crate) fn task(outcome: TaskOutcome) {
    let outcome = match outcome {
        TaskOutcome::Offered => "offered",
        TaskOutcome::Accepted => "accepted",
        TaskOutcome::Succeeded => "succeeded",
        TaskOutcome::Failed => "failed",
    };
    METRICS.tasks.with_label_values(&[outcome]).inc();
}
