//! The registry's state: live party sessions, offers awaiting an answer and the
//! tasks parties accepted, behind one lock. The gRPC edge is `sessions.rs`.
//!
//! Parties are not trusted: what a session sends can only touch that party's
//! own offers and tasks, and every collection here has a bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_core::{PartyId, random_token};
use cohort_proto::v1 as pb;
use cohort_runtime::now_ms;
use cohort_store::clients::{ClientStore, DatasetEntry, TaskOutcome};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// Ended tasks are remembered this long for TaskStates queries.
const TASK_MEMORY: Duration = Duration::from_secs(600);

/// At most this many tasks are remembered; the oldest ended ones go first.
const MAX_REMEMBERED_TASKS: usize = 100_000;

/// A party's reason for a failed task is kept up to this many bytes (cut on
/// a character boundary).
pub const MAX_TASK_MESSAGE_BYTES: usize = 1000;

/// What a task that failed because its party's session ended says.
pub const PARTY_DISCONNECTED: &str = "party disconnected";

/// How much a party may claim when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationLimits {
    pub max_datasets: usize,
    pub max_samples: u64,
    pub max_features: u32,
    pub max_classes: u32,
}

impl Default for RegistrationLimits {
    fn default() -> Self {
        Self {
            max_datasets: 64,
            max_samples: 1_000_000_000,
            max_features: 1_000_000,
            max_classes: 100_000,
        }
    }
}

/// Longest dataset name a party may register (as a job spec's data.dataset).
pub const MAX_DATASET_NAME: usize = 128;

/// Dataset names: what a job spec's `data.dataset` accepts.
pub fn is_dataset_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_DATASET_NAME
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// How the registry runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often parties must send a heartbeat; three missed ones end the session.
    pub heartbeat_interval: Duration,
    pub limits: RegistrationLimits,
}

type SessionSender = mpsc::Sender<Result<pb::ServerMessage, Status>>;

struct Session {
    id: u64,
    tx: SessionSender,
    datasets: Vec<DatasetEntry>,
    running_tasks: u32,
}

/// An offer sent to `party`; only that party's reply answers it.
struct PendingOffer {
    party: PartyId,
    reply: oneshot::Sender<pb::OfferReply>,
}

struct TaskInfo {
    party: PartyId,
    job_id: String,
    phase: pb::TaskPhase,
    /// Why it failed or was cancelled, as the party said (bounded).
    message: Option<String>,
    accepted_at: Instant,
    ended_at: Option<Instant>,
}

/// Tasks parties accepted: remembered until `TASK_MEMORY` after they end,
/// and never more than `capacity` of them.
struct TaskBook {
    tasks: HashMap<String, TaskInfo>,
    capacity: usize,
}

impl TaskBook {
    fn new(capacity: usize) -> Self {
        Self {
            tasks: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    fn insert(&mut self, task_id: String, party: PartyId, job_id: String) {
        self.forget_expired();
        if self.tasks.len() >= self.capacity {
            // Make room for a percent more at once, so a full book is not
            // scanned on every insert.
            let excess = self.tasks.len() + 1 - self.capacity + self.capacity / 100;
            self.forget_oldest(excess);
        }
        self.tasks.insert(
            task_id,
            TaskInfo {
                party,
                job_id,
                phase: pb::TaskPhase::Running,
                message: None,
                accepted_at: Instant::now(),
                ended_at: None,
            },
        );
    }

    fn forget_expired(&mut self) {
        self.tasks
            .retain(|_, t| t.ended_at.is_none_or(|at| at.elapsed() < TASK_MEMORY));
    }

    /// Forgets the `n` oldest tasks: ended ones first (by when they ended),
    /// then running ones (by when they were accepted).
    fn forget_oldest(&mut self, n: usize) {
        let n = n.min(self.tasks.len());
        if n == 0 {
            return;
        }
        let mut by_age: Vec<((bool, Instant), String)> = self
            .tasks
            .iter()
            .map(|(id, t)| {
                let age = match t.ended_at {
                    Some(at) => (false, at),
                    None => (true, t.accepted_at),
                };
                (age, id.clone())
            })
            .collect();
        by_age.select_nth_unstable_by_key(n - 1, |(age, _)| *age);
        let running = by_age[..n].iter().filter(|((r, _), _)| *r).count();
        for (_, id) in &by_age[..n] {
            self.tasks.remove(id);
        }
        tracing::warn!(
            forgotten = n,
            running,
            "too many tasks remembered; forgot the oldest"
        );
    }

    /// Records a status `party` sent for `task_id`. `None` when the task is
    /// unknown or another party's; otherwise the phase it had before.
    fn record_status(
        &mut self,
        party: &PartyId,
        task_id: &str,
        phase: pb::TaskPhase,
        message: &str,
    ) -> Option<pb::TaskPhase> {
        let t = self.tasks.get_mut(task_id).filter(|t| &t.party == party)?;
        let before = t.phase;
        t.phase = phase;
        if phase != pb::TaskPhase::Running {
            t.ended_at = Some(Instant::now());
        }
        t.message = match phase {
            pb::TaskPhase::Failed | pb::TaskPhase::Cancelled if !message.is_empty() => {
                Some(bounded_message(message).to_string())
            }
            _ => None,
        };
        Some(before)
    }

    /// Fails the running tasks of a party whose session ended.
    fn fail_party(&mut self, party: &PartyId) -> usize {
        let mut failed = 0;
        for t in self.tasks.values_mut() {
            if &t.party == party && t.phase == pb::TaskPhase::Running {
                t.phase = pb::TaskPhase::Failed;
                t.message = Some(PARTY_DISCONNECTED.to_string());
                t.ended_at = Some(Instant::now());
                failed += 1;
            }
        }
        failed
    }

    /// Marks a job's running tasks cancelled; returns them with their parties.
    fn cancel_job(&mut self, job_id: &str) -> Vec<(String, PartyId)> {
        let mut out = Vec::new();
        for (id, t) in self.tasks.iter_mut() {
            if t.job_id == job_id && t.phase == pb::TaskPhase::Running {
                t.phase = pb::TaskPhase::Cancelled;
                t.ended_at = Some(Instant::now());
                out.push((id.clone(), t.party.clone()));
            }
        }
        out
    }
}

/// At most `MAX_TASK_MESSAGE_BYTES` of `s`, cut on a character boundary.
pub fn bounded_message(s: &str) -> &str {
    &s[..s.floor_char_boundary(MAX_TASK_MESSAGE_BYTES)]
}

/// A task's seed, derived from the job's seed: the same job seed gives a
/// party the same seed in the same round and kind on every run. FNV-1a over
/// the inputs, then SplitMix64's finaliser; both are fixed algorithms, so the
/// value does not change between builds, platforms or Rust versions (std's
/// `DefaultHasher` may).
pub fn task_seed(job_seed: u64, party: &PartyId, round: u32, kind: i32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(&job_seed.to_le_bytes());
    // The name's length first, so no two (name, round) pairs feed the same bytes.
    feed(&(party.as_str().len() as u64).to_le_bytes());
    feed(party.as_str().as_bytes());
    feed(&round.to_le_bytes());
    feed(&kind.to_le_bytes());
    splitmix64_finalize(hash)
}

fn splitmix64_finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One connected party's registration of a dataset.
#[derive(Debug, Clone)]
pub struct Holder {
    pub party: PartyId,
    pub dataset: DatasetEntry,
}

/// The (features, classes) most holders agree on; ties go to the shape with
/// the most samples, then to the smaller (features, classes).
pub fn majority_shape(holders: &[Holder]) -> Option<(u32, u32)> {
    let mut shapes: HashMap<(u32, u32), (usize, u64)> = HashMap::new();
    for h in holders {
        let e = shapes
            .entry((h.dataset.features, h.dataset.classes))
            .or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(h.dataset.samples);
    }
    shapes
        .into_iter()
        .max_by(
            |(shape_a, (count_a, samples_a)), (shape_b, (count_b, samples_b))| {
                count_a
                    .cmp(count_b)
                    .then(samples_a.cmp(samples_b))
                    .then(shape_b.cmp(shape_a))
            },
        )
        .map(|(shape, _)| shape)
}

/// A connected party that may be offered a task.
pub struct Candidate {
    pub party: PartyId,
    tx: SessionSender,
    pub samples: u64,
}

struct State {
    sessions: HashMap<PartyId, Session>,
    offers: HashMap<String, PendingOffer>,
    tasks: TaskBook,
    next_session: u64,
}

pub struct Registry {
    store: Arc<dyn ClientStore>,
    settings: Settings,
    state: Mutex<State>,
}

impl Registry {
    pub fn new(store: Arc<dyn ClientStore>, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            store,
            settings,
            state: Mutex::new(State {
                sessions: HashMap::new(),
                offers: HashMap::new(),
                tasks: TaskBook::new(MAX_REMEMBERED_TASKS),
                next_session: 0,
            }),
        })
    }

    pub fn store(&self) -> &dyn ClientStore {
        self.store.as_ref()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Makes `tx` the party's session, replacing (and so ending) an older
    /// one. Returns the session's id.
    pub fn add_session(
        &self,
        party: &PartyId,
        tx: SessionSender,
        datasets: Vec<DatasetEntry>,
    ) -> u64 {
        self.with_state(|s| {
            s.next_session += 1;
            let id = s.next_session;
            // Dropping the old sender ends that stream.
            s.sessions.insert(
                party.clone(),
                Session {
                    id,
                    tx,
                    datasets,
                    running_tasks: 0,
                },
            );
            id
        })
    }

    pub fn end_session(&self, party: &PartyId, session_id: u64) {
        let dropped = self.with_state(|s| {
            if s.sessions.get(party).is_some_and(|x| x.id == session_id) {
                s.sessions.remove(party);
                // Its offers can no longer be answered.
                s.offers.retain(|_, o| &o.party != party);
                Some(s.tasks.fail_party(party))
            } else {
                None
            }
        });
        if let Some(failed) = dropped {
            tracing::info!(party = %party, failed_tasks = failed, "party disconnected");
        }
    }

    /// Tells a revoked party's live session why, then ends it.
    pub fn end_revoked_session(&self, party: &PartyId) {
        let session = self.with_state(|s| {
            s.sessions.get(party).map(|sess| {
                let revoked = pb::ServerMessage {
                    kind: Some(pb::server_message::Kind::Revoked(pb::Revoked {
                        reason: format!("party {party} was revoked by an administrator"),
                    })),
                };
                // Best effort: a full queue must not keep the session open.
                let _ = sess.tx.try_send(Ok(revoked));
                sess.id
            })
        });
        if let Some(id) = session {
            self.end_session(party, id);
            tracing::info!(party = %party, "revoked party's session closed");
        }
    }

    pub async fn handle_message(&self, party: &PartyId, session_id: u64, msg: pb::PartyMessage) {
        match msg.kind {
            Some(pb::party_message::Kind::Heartbeat(hb)) => {
                self.with_state(|s| {
                    if let Some(sess) = s.sessions.get_mut(party).filter(|x| x.id == session_id) {
                        sess.running_tasks = hb.running_tasks;
                    }
                });
                if let Err(e) = self.store.touch(party, now_ms()).await {
                    tracing::warn!(party = %party, error = %e, "cannot record heartbeat");
                }
            }
            Some(pb::party_message::Kind::OfferReply(reply)) => {
                // Only the party an offer went to can answer it; nothing is
                // stored for ids we did not create.
                let waiter = self.with_state(|s| match s.offers.get(&reply.offer_id) {
                    Some(o) if &o.party == party => s.offers.remove(&reply.offer_id),
                    _ => None,
                });
                match waiter {
                    Some(w) => {
                        let _ = w.reply.send(reply);
                    }
                    None => {
                        tracing::debug!(party = %party, "reply to an unknown offer");
                    }
                }
            }
            Some(pb::party_message::Kind::TaskStatus(status)) => {
                let phase =
                    pb::TaskPhase::try_from(status.phase).unwrap_or(pb::TaskPhase::Unspecified);
                let message = bounded_message(&status.message);
                let before = self.with_state(|s| {
                    s.tasks
                        .record_status(party, &status.task_id, phase, message)
                });
                let Some(before) = before else {
                    tracing::debug!(party = %party, task = %bounded_message(&status.task_id), "status for an unknown task");
                    return;
                };
                // A repeated status changes nothing: no second count, no
                // second log line.
                if before == phase {
                    return;
                }
                let outcome = match phase {
                    pb::TaskPhase::Succeeded => Some(TaskOutcome::Succeeded),
                    pb::TaskPhase::Failed => Some(TaskOutcome::Failed),
                    _ => None,
                };
                if phase == pb::TaskPhase::Failed {
                    tracing::warn!(party = %party, task = %status.task_id, message = %message, "task failed");
                }
                if let Some(o) = outcome
                    && let Err(e) = self.store.count_task(party, o).await
                {
                    tracing::warn!(party = %party, error = %e, "cannot count task outcome");
                }
            }
            Some(pb::party_message::Kind::Register(_)) => {
                tracing::warn!(party = %party, "second Register on one session ignored");
            }
            None => {}
        }
    }

    /// Connected parties and how many tasks each runs.
    pub fn running_tasks(&self) -> HashMap<PartyId, u32> {
        self.with_state(|s| {
            s.sessions
                .iter()
                .map(|(p, sess)| (p.clone(), sess.running_tasks))
                .collect()
        })
    }

    /// Every connected party holding `dataset`, sorted by party name.
    pub fn holders(&self, dataset: &str) -> Vec<Holder> {
        let mut holders: Vec<Holder> = self.with_state(|s| {
            s.sessions
                .iter()
                .filter_map(|(party, sess)| {
                    sess.datasets
                        .iter()
                        .find(|d| d.name == dataset)
                        .map(|d| Holder {
                            party: party.clone(),
                            dataset: d.clone(),
                        })
                })
                .collect()
        });
        holders.sort_by(|a, b| a.party.cmp(&b.party));
        holders
    }

    /// Connected parties holding `dataset`, not excluded, whose registration
    /// has the shape asked for (a zero matches any).
    pub fn candidates(
        &self,
        dataset: &str,
        exclude: &[String],
        features: u32,
        classes: u32,
    ) -> Vec<Candidate> {
        self.with_state(|s| {
            s.tasks.forget_expired();
            s.sessions
                .iter()
                .filter(|(p, _)| !exclude.iter().any(|e| e == p.as_str()))
                .filter_map(|(p, sess)| {
                    sess.datasets
                        .iter()
                        .find(|d| d.name == dataset)
                        .filter(|d| features == 0 || d.features == features)
                        .filter(|d| classes == 0 || d.classes == classes)
                        .map(|d| Candidate {
                            party: p.clone(),
                            tx: sess.tx.clone(),
                            samples: d.samples,
                        })
                })
                .collect()
        })
    }

    /// Offers `task` to one candidate and waits up to `timeout` for its answer.
    pub async fn offer_one(
        self: &Arc<Self>,
        candidate: Candidate,
        mut task: pb::Task,
        timeout: Duration,
    ) -> Result<pb::AcceptedTask, (PartyId, String)> {
        let Candidate { party, tx, samples } = candidate;
        let offer_id = random_token(12);
        task.task_id = format!("{}-r{}-{}", task.job_id, task.round, random_token(4));
        task.party = party.to_string();
        task.seed = if task.seed == 0 {
            rand::random()
        } else {
            task_seed(task.seed, &party, task.round, task.kind)
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        self.with_state(|s| {
            s.offers.insert(
                offer_id.clone(),
                PendingOffer {
                    party: party.clone(),
                    reply: reply_tx,
                },
            )
        });
        if let Err(e) = self.store.count_task(&party, TaskOutcome::Offered).await {
            tracing::warn!(party = %party, error = %e, "cannot count offer");
        }
        let offer = pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Offer(pb::Offer {
                offer_id: offer_id.clone(),
                task: Some(task.clone()),
                reply_by_ms: now_ms() + timeout.as_millis() as i64,
            })),
        };
        // Both the send (a party that does not read its stream fills the
        // queue) and the answer are bounded by the timeout.
        let reply = tokio::time::timeout(timeout, async {
            tx.send(Ok(offer)).await.ok()?;
            reply_rx.await.ok()
        })
        .await;
        self.with_state(|s| s.offers.remove(&offer_id));
        match reply {
            Ok(Some(r)) if r.accepted => {
                self.with_state(|s| {
                    s.tasks
                        .insert(task.task_id.clone(), party.clone(), task.job_id.clone())
                });
                let _ = self.store.count_task(&party, TaskOutcome::Accepted).await;
                Ok(pb::AcceptedTask {
                    party: party.to_string(),
                    task_id: task.task_id,
                    task_token: task.task_token,
                    samples,
                })
            }
            Ok(Some(r)) => Err((party, format!("refused: {}", bounded_message(&r.reason)))),
            Ok(None) => Err((party, "disconnected".to_string())),
            Err(_) => Err((party, format!("no answer within {timeout:?}"))),
        }
    }

    /// Each task's phase (UNSPECIFIED when unknown), and for those that failed
    /// or were cancelled with a reason, the reason.
    pub fn task_states(&self, ids: Vec<String>) -> (HashMap<String, i32>, HashMap<String, String>) {
        self.with_state(|s| {
            let tasks = &s.tasks;
            let mut phases = HashMap::new();
            let mut messages = HashMap::new();
            for id in ids {
                let (phase, message) = match tasks.tasks.get(&id) {
                    Some(t) => (t.phase, t.message.clone()),
                    None => (pb::TaskPhase::Unspecified, None),
                };
                if let Some(m) = message {
                    messages.insert(id.clone(), m);
                }
                phases.insert(id, phase as i32);
            }
            (phases, messages)
        })
    }

    /// Marks a job's running tasks cancelled; returns each with its party's
    /// session, where the party is connected.
    pub fn cancel_job(&self, job_id: &str) -> Vec<(String, SessionSender)> {
        self.with_state(|s| {
            let cancelled = s.tasks.cancel_job(job_id);
            cancelled
                .into_iter()
                .filter_map(|(id, party)| s.sessions.get(&party).map(|sess| (id, sess.tx.clone())))
                .collect()
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn party(name: &str) -> PartyId {
        PartyId::parse(name).unwrap()
    }

    #[test]
    fn task_seeds_are_stable_and_differ_per_party_round_and_kind() {
        let a = party("hospital-a");
        let train = pb::TaskKind::Train as i32;
        // Pinned: a change here changes every seeded job's results.
        assert_eq!(task_seed(42, &a, 1, train), task_seed(42, &a, 1, train));
        assert_eq!(task_seed(42, &a, 1, train), 0xd630_bd42_f21f_d5f8);
        let seeds = [
            task_seed(42, &a, 1, train),
            task_seed(43, &a, 1, train),
            task_seed(42, &party("hospital-b"), 1, train),
            task_seed(42, &a, 2, train),
            task_seed(42, &a, 1, pb::TaskKind::Evaluate as i32),
        ];
        for (i, x) in seeds.iter().enumerate() {
            for y in &seeds[i + 1..] {
                assert_ne!(x, y, "{seeds:x?}");
            }
        }
    }

    #[test]
    fn messages_are_cut_on_a_character_boundary() {
        assert_eq!(bounded_message("short"), "short");
        let long = "é".repeat(MAX_TASK_MESSAGE_BYTES);
        let cut = bounded_message(&long);
        assert_eq!(cut.len(), MAX_TASK_MESSAGE_BYTES);
        assert_eq!(cut.chars().count(), MAX_TASK_MESSAGE_BYTES / 2);
        let odd = format!("x{long}");
        assert_eq!(bounded_message(&odd).len(), MAX_TASK_MESSAGE_BYTES - 1);
    }

    #[test]
    fn the_majority_shape_wins_then_the_most_samples_then_the_smaller_shape() {
        let holder = |name: &str, samples, features, classes| Holder {
            party: party(name),
            dataset: DatasetEntry {
                name: "digits".into(),
                samples,
                features,
                classes,
            },
        };
        assert_eq!(majority_shape(&[]), None);
        let majority = [
            holder("a", 10, 64, 10),
            holder("b", 1_000_000, 3, 10),
            holder("c", 10, 64, 10),
        ];
        assert_eq!(majority_shape(&majority), Some((64, 10)));
        let tie_on_count = [holder("a", 10, 64, 10), holder("b", 11, 3, 10)];
        assert_eq!(majority_shape(&tie_on_count), Some((3, 10)));
        let tie_on_samples = [holder("a", 10, 64, 10), holder("b", 10, 3, 10)];
        assert_eq!(majority_shape(&tie_on_samples), Some((3, 10)));
    }

    #[test]
    fn the_task_book_forgets_the_oldest_ended_tasks_first_when_full() {
        // Instants taken in a row may be equal; a tick apart they are ordered.
        let tick = || std::thread::sleep(Duration::from_millis(2));
        let mut book = TaskBook::new(4);
        let (a, b) = (party("a"), party("b"));
        for i in 0..4 {
            book.insert(format!("t{i}"), a.clone(), "job".into());
            tick();
        }
        // t2 ends before t0: both go before any running task.
        book.record_status(&a, "t2", pb::TaskPhase::Failed, "boom")
            .unwrap();
        tick();
        book.record_status(&a, "t0", pb::TaskPhase::Succeeded, "")
            .unwrap();
        book.insert("t4".into(), b.clone(), "job".into());
        let mut ids: Vec<&str> = book.tasks.keys().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["t0", "t1", "t3", "t4"]);
        book.insert("t5".into(), b.clone(), "job".into());
        let mut ids: Vec<&str> = book.tasks.keys().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["t1", "t3", "t4", "t5"]);
        // With nothing ended, the task accepted first goes.
        book.insert("t6".into(), b, "job".into());
        assert!(!book.tasks.contains_key("t1"));
        assert_eq!(book.tasks.len(), 4);
    }

    #[test]
    fn a_status_from_another_party_or_for_an_unknown_task_changes_nothing() {
        let mut book = TaskBook::new(10);
        let (a, b) = (party("a"), party("b"));
        book.insert("t0".into(), a.clone(), "job".into());
        assert_eq!(
            book.record_status(&b, "t0", pb::TaskPhase::Failed, "forged"),
            None
        );
        assert_eq!(
            book.record_status(&b, "nope", pb::TaskPhase::Failed, "forged"),
            None
        );
        assert_eq!(book.tasks.len(), 1);
        let t = &book.tasks["t0"];
        assert_eq!(
            (t.phase, t.message.as_deref()),
            (pb::TaskPhase::Running, None)
        );
    }
}
