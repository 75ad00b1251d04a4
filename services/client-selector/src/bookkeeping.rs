//! Bookkeeping writes kept off the session path: when each party was last
//! seen and its task counters go into a bounded queue in memory, coalesced per
//! party (the latest heartbeat time, counters summed per outcome), and a
//! background writer drains the queue into the clients store, retrying with
//! backoff while the store is unavailable. A session never waits on the
//! database for these.
//!
//! They are statistics nothing else depends on: what is queued is lost if the
//! process ends before the store takes it, and when more than `capacity`
//! parties wait to be written the oldest entries are dropped (counted, and
//! logged at a bounded rate).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_core::PartyId;
use cohort_store::StoreError;
use cohort_store::clients::{ClientStore, TaskOutcome};
use tokio::sync::Notify;

/// At most this many parties' writes wait in the queue.
pub const MAX_PENDING_PARTIES: usize = 10_000;

/// The writer's first wait after a failed write; it doubles up to `LAST_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// Each kind of warning is logged at most once per this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The counters, in the order `Pending::counts` keeps them.
const OUTCOMES: [TaskOutcome; 4] = [
    TaskOutcome::Offered,
    TaskOutcome::Accepted,
    TaskOutcome::Succeeded,
    TaskOutcome::Failed,
];

fn slot(outcome: TaskOutcome) -> usize {
    match outcome {
        TaskOutcome::Offered => 0,
        TaskOutcome::Accepted => 1,
        TaskOutcome::Succeeded => 2,
        TaskOutcome::Failed => 3,
    }
}

/// What is still to be written for one party.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Pending {
    /// The latest heartbeat time (ms since the epoch).
    seen_ms: Option<i64>,
    /// Counts to add, by outcome (`OUTCOMES` order).
    counts: [u64; 4],
}

impl Pending {
    fn merge(&mut self, other: Pending) {
        self.seen_ms = self.seen_ms.max(other.seen_ms);
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine = mine.saturating_add(theirs);
        }
    }
}

/// One entry per party, oldest first.
struct Queue {
    entries: HashMap<PartyId, (u64, Pending)>,
    /// Parties by when their entry was queued.
    order: BTreeMap<u64, PartyId>,
    next_seq: u64,
    capacity: usize,
    /// Entries dropped since the last warning about it, and when that was.
    dropped_unlogged: u64,
    dropped_logged_at: Option<Instant>,
}

impl Queue {
    fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            capacity: capacity.max(1),
            dropped_unlogged: 0,
            dropped_logged_at: None,
        }
    }

    /// Adds `p` to `party`'s entry; a new entry goes last, and when the
    /// queue is full the oldest entries are dropped to make room.
    fn add(&mut self, party: &PartyId, p: Pending) {
        if let Some((_, entry)) = self.entries.get_mut(party) {
            entry.merge(p);
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
            self.dropped_unlogged += 1;
        }
        if self.dropped_unlogged > 0
            && self
                .dropped_logged_at
                .is_none_or(|at| at.elapsed() >= LOG_INTERVAL)
        {
            tracing::warn!(
                dropped = self.dropped_unlogged,
                capacity = self.capacity,
                "bookkeeping queue full: dropped the oldest parties' heartbeat times and task counts"
            );
            self.dropped_unlogged = 0;
            self.dropped_logged_at = Some(Instant::now());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, party.clone());
        self.entries.insert(party.clone(), (seq, p));
    }

    /// Takes every entry, oldest first.
    fn take(&mut self) -> Vec<(PartyId, Pending)> {
        let mut entries = std::mem::take(&mut self.entries);
        std::mem::take(&mut self.order)
            .into_values()
            .filter_map(|party| entries.remove(&party).map(|(_, p)| (party, p)))
            .collect()
    }

    /// Puts back what could not be written: ahead of what was queued since,
    /// which is newer (and merges into it).
    fn put_back(&mut self, unwritten: Vec<(PartyId, Pending)>) {
        let newer = self.take();
        for (party, p) in unwritten.into_iter().chain(newer) {
            self.add(&party, p);
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    closed: AtomicBool,
}

impl Shared {
    fn with_queue<T>(&self, f: impl FnOnce(&mut Queue) -> T) -> T {
        let mut guard = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

/// The queue's handle; its writer stops when this is dropped.
pub struct Bookkeeping {
    shared: Arc<Shared>,
}

impl Bookkeeping {
    /// Starts the writer on the current Tokio runtime.
    pub fn start(store: Arc<dyn ClientStore>, capacity: usize) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::new(capacity)),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(write_loop(shared.clone(), store));
        Self { shared }
    }

    /// Records that `party` was seen at `at_ms`.
    pub fn seen(&self, party: &PartyId, at_ms: i64) {
        self.queue(
            party,
            Pending {
                seen_ms: Some(at_ms),
                ..Pending::default()
            },
        );
    }

    /// Adds one to `party`'s counter of `outcome`.
    pub fn count(&self, party: &PartyId, outcome: TaskOutcome) {
        crate::metrics::task(outcome);
        let mut p = Pending::default();
        p.counts[slot(outcome)] = 1;
        self.queue(party, p);
    }

    fn queue(&self, party: &PartyId, p: Pending) {
        self.shared.with_queue(|q| q.add(party, p));
        self.shared.wake.notify_one();
    }
}

impl Drop for Bookkeeping {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

/// Drains the queue into the store until the handle is dropped and the queue
/// is empty (or the store fails then).
async fn write_loop(shared: Arc<Shared>, store: Arc<dyn ClientStore>) {
    let mut retry = FIRST_RETRY;
    let mut failing = false;
    let mut warned_at: Option<Instant> = None;
    loop {
        let batch = shared.with_queue(Queue::take);
        if batch.is_empty() {
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            shared.wake.notified().await;
            continue;
        }
        match write(store.as_ref(), batch).await {
            Ok(()) => {
                if failing {
                    tracing::info!("bookkeeping writes resumed");
                }
                failing = false;
                retry = FIRST_RETRY;
            }
            Err((unwritten, error)) => {
                let parties = unwritten.len();
                shared.with_queue(|q| q.put_back(unwritten));
                if shared.closed.load(Ordering::Acquire) {
                    tracing::warn!(parties, error = %error, "stopping with bookkeeping writes not done");
                    return;
                }
                failing = true;
                if warned_at.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
                    tracing::warn!(parties, error = %error, "cannot write bookkeeping (last seen, task counts); retrying in the background");
                    warned_at = Some(Instant::now());
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(LAST_RETRY);
            }
        }
    }
}

/// Errors after which the same write may succeed later.
fn worth_retrying(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_) | StoreError::Conflict(_))
}

/// Writes the batch in order; on an error worth retrying, returns what is
/// left (that entry's unwritten part and every later entry).
async fn write(
    store: &dyn ClientStore,
    batch: Vec<(PartyId, Pending)>,
) -> Result<(), (Vec<(PartyId, Pending)>, StoreError)> {
    let mut rest = batch.into_iter();
    while let Some((party, mut p)) = rest.next() {
        if let Err(e) = write_one(store, &party, &mut p).await {
            let mut unwritten = vec![(party, p)];
            unwritten.extend(rest);
            return Err((unwritten, e));
        }
    }
    Ok(())
}

/// Writes `p`, taking out of it what was written, so that a retry after an
/// error neither loses nor repeats a count.
async fn write_one(
    store: &dyn ClientStore,
    party: &PartyId,
    p: &mut Pending,
) -> Result<(), StoreError> {
    if let Some(at) = p.seen_ms {
        match store.touch(party, at).await {
            Ok(()) => {}
            Err(e) if worth_retrying(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(party = %party, error = %e, "cannot record when the party was last seen; dropped")
            }
        }
        p.seen_ms = None;
    }
    for (i, outcome) in OUTCOMES.into_iter().enumerate() {
        while p.counts[i] > 0 {
            match store.count_task(party, outcome).await {
                Ok(()) => p.counts[i] -= 1,
                Err(e) if worth_retrying(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(party = %party, error = %e, ?outcome, count = p.counts[i], "cannot count task outcomes; dropped");
                    p.counts[i] = 0;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn party(name: &str) -> PartyId {
        PartyId::parse(name).unwrap()
    }

    fn seen(at: i64) -> Pending {
        Pending {
            seen_ms: Some(at),
            ..Pending::default()
        }
    }

    fn counted(outcome: TaskOutcome, n: u64) -> Pending {
        let mut p = Pending::default();
        p.counts[slot(outcome)] = n;
        p
    }

    #[test]
    fn entries_coalesce_per_party_keeping_the_latest_time_and_summing_counts() {
        let mut q = Queue::new(10);
        let (a, b) = (party("a"), party("b"));
        q.add(&a, seen(20));
        q.add(&b, counted(TaskOutcome::Offered, 1));
        q.add(&a, seen(10));
        q.add(&a, counted(TaskOutcome::Succeeded, 1));
        q.add(&a, counted(TaskOutcome::Succeeded, 2));
        q.add(&b, counted(TaskOutcome::Offered, 1));
        let taken = q.take();
        assert_eq!(
            taken,
            [
                (
                    a.clone(),
                    Pending {
                        seen_ms: Some(20),
                        counts: [0, 0, 3, 0]
                    }
                ),
                (b, counted(TaskOutcome::Offered, 2)),
            ]
        );
        assert!(q.take().is_empty());
    }

    #[test]
    fn a_full_queue_drops_the_oldest_entries() {
        let mut q = Queue::new(2);
        let (a, b, c) = (party("a"), party("b"), party("c"));
        q.add(&a, seen(1));
        q.add(&b, seen(2));
        // Coalescing into an existing entry needs no room.
        q.add(&a, seen(3));
        assert_eq!(q.entries.len(), 2);
        q.add(&c, seen(4));
        let parties: Vec<PartyId> = q.take().into_iter().map(|(p, _)| p).collect();
        assert_eq!(parties, [b, c]);
    }

    #[test]
    fn what_could_not_be_written_goes_back_ahead_of_newer_entries_and_merges() {
        let mut q = Queue::new(3);
        let (a, b, c, d) = (party("a"), party("b"), party("c"), party("d"));
        q.add(&a, counted(TaskOutcome::Failed, 1));
        q.add(&b, seen(5));
        let unwritten = q.take();
        // Queued while the batch was being written.
        q.add(&c, seen(7));
        q.add(&a, counted(TaskOutcome::Failed, 2));
        q.put_back(unwritten);
        q.add(&d, seen(9));
        // Full: the oldest (a, put back first) made room for d.
        let taken = q.take();
        assert_eq!(
            taken,
            [(b, seen(5)), (c, seen(7)), (d, seen(9))],
            "{taken:?}"
        );

        let mut q = Queue::new(3);
        q.add(&a, counted(TaskOutcome::Failed, 1));
        let unwritten = q.take();
        q.add(&a, counted(TaskOutcome::Failed, 2));
        q.put_back(unwritten);
        assert_eq!(q.take(), [(a, counted(TaskOutcome::Failed, 3))]);
    }
}
