//! The registry's state: live party sessions, offers awaiting an answer and the
//! tasks parties accepted, behind one lock. The gRPC edge is `sessions.rs`.
//!
//! Parties are not trusted: what a session sends can only touch that party's
//! own offers and tasks, and every collection here has a bound.
//!
//! Nothing here waits on the database: heartbeat times and task counters go
//! through `bookkeeping.rs`. A party whose session ends keeps its running
//! tasks for the reconnect grace: when it registers again and lists them they
//! stay RUNNING (so the coordinator keeps their tokens and waits for their
//! updates); what it does not list, or everything once the grace is over,
//! becomes FAILED.

use crate::metrics::OfferAnswer;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_core::{PartyId, random_token};
use cohort_proto::v1 as pb;
use cohort_runtime::now_ms;
use cohort_store::clients::{
    ClientStore, DatasetEntry, Reliability, ResourcesEntry, TaskOutcome, TaskResult,
};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tracing::Instrument as _;

use crate::bookkeeping::{Bookkeeping, MAX_PENDING_PARTIES};
use crate::selection::{Capacity, Pick, Traits};

/// Ended tasks are remembered this long for TaskStates queries.
const TASK_MEMORY: Duration = Duration::from_secs(600);

/// At most this many tasks are remembered; the oldest ended ones go first.
const MAX_REMEMBERED_TASKS: usize = 100_000;

/// A party's reason for a failed task is kept up to this many bytes (cut on
/// a character boundary).
pub const MAX_TASK_MESSAGE_BYTES: usize = 1000;

/// What a task says that failed because its party's session ended and the
/// party did not come back within the reconnect grace (or was revoked).
pub const PARTY_DISCONNECTED: &str = cohort_proto::TASK_PARTY_DISCONNECTED;

/// What a running task says that its party did not list when it registered
/// again.
pub const PARTY_RECONNECTED_WITHOUT_IT: &str = cohort_proto::TASK_PARTY_RECONNECTED_WITHOUT_IT;

/// Most task ids a Register may list as running.
pub const MAX_LISTED_TASKS: usize = 1024;

/// Longest task id a Register may list.
pub const MAX_TASK_ID_BYTES: usize = 256;
/// Longest GPU model name a party may register.
pub const MAX_GPU_NAME_BYTES: usize = 256;

/// How much a party may claim when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationLimits {
    pub max_datasets: usize,
    pub max_samples: u64,
    pub max_features: u32,
    pub max_classes: u32,
    /// What a party may say it has (`selection: resource` draws by it).
    pub max_cpus: u32,
    pub max_memory_bytes: u64,
    pub max_gpus: u32,
    pub max_tasks: u32,
}

impl Default for RegistrationLimits {
    fn default() -> Self {
        Self {
            max_datasets: 64,
            max_samples: 1_000_000_000,
            max_features: 1_000_000,
            max_classes: 100_000,
            max_cpus: 65_536,
            max_memory_bytes: 1 << 50,
            max_gpus: 4096,
            max_tasks: 4096,
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
    /// How long a party whose session ended keeps its running tasks (zero:
    /// they fail when the session ends).
    pub reconnect_grace: Duration,
    pub limits: RegistrationLimits,
}

type SessionSender = mpsc::Sender<Result<pb::ServerMessage, Status>>;

struct Session {
    id: u64,
    tx: SessionSender,
    datasets: Vec<DatasetEntry>,
    running_tasks: u32,
    /// What it registered it has, and what it last said is free (bounded by that).
    resources: ResourcesEntry,
    free: Option<Free>,
    /// Its GPUs' models and memory, as it registered them.
    gpu_devices: Vec<pb::GpuInfo>,
    /// Its record of training tasks, as the store had it when the party registered and as
    /// results were recorded since.
    reliability: Reliability,
}

/// What a party says it has free, bounded by what it registered it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Free {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
}

impl Free {
    /// `reported`, each figure cut to the party's registered total: a party cannot make
    /// itself look bigger between heartbeats than it registered (which is bounded).
    pub fn bounded(reported: &pb::FreeResources, totals: &ResourcesEntry) -> Free {
        Free {
            cpu_millis: u64::from(reported.cpu_millis).min(u64::from(totals.cpus) * 1000),
            memory_bytes: reported.memory_bytes.min(totals.memory_bytes),
            gpus: reported.gpus.min(totals.gpus),
        }
    }

    /// A party that reports nothing free (an older task-manager): its totals.
    fn of_totals(totals: &ResourcesEntry) -> Free {
        Free {
            cpu_millis: u64::from(totals.cpus) * 1000,
            memory_bytes: totals.memory_bytes,
            gpus: totals.gpus,
        }
    }
}

/// What a registering party brings to its session.
pub struct Joining {
    pub datasets: Vec<DatasetEntry>,
    pub resources: ResourcesEntry,
    pub free: Option<pb::FreeResources>,
    pub gpu_devices: Vec<pb::GpuInfo>,
    pub reliability: Reliability,
}

/// An offer sent to `party`; only that party's reply answers it.
struct PendingOffer {
    party: PartyId,
    reply: oneshot::Sender<pb::OfferReply>,
}

struct TaskInfo {
    party: PartyId,
    job_id: String,
    /// The task's kind (wire value): only training tasks have results recorded.
    kind: i32,
    /// Its result was recorded in the party's reliability record (or is being).
    result_recorded: bool,
    phase: pb::TaskPhase,
    /// Why it failed or was cancelled, as the party said (bounded).
    message: Option<String>,
    accepted_at: Instant,
    ended_at: Option<Instant>,
    /// The party's own final word (succeeded or failed) was counted: once per task, also
    /// when the server had already ended it (cancelled at the job's end, or failed while the
    /// party was away), so a party's record shows the work it did.
    outcome_counted: bool,
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

    fn insert(&mut self, task_id: String, party: PartyId, job_id: String, kind: i32) {
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
                kind,
                result_recorded: false,
                phase: pb::TaskPhase::Running,
                message: None,
                accepted_at: Instant::now(),
                ended_at: None,
                outcome_counted: false,
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
    /// unknown or another party's; otherwise the phase it had before. Only a
    /// running task changes: an ended one keeps the phase the coordinator may
    /// already have acted on.
    /// Records a status of `party`'s task: the phase changes only while the task runs.
    /// Returns the phase before, and whether this is the party's first final word on the task
    /// (to be counted).
    fn record_status(
        &mut self,
        party: &PartyId,
        task_id: &str,
        phase: pb::TaskPhase,
        message: &str,
    ) -> Option<(pb::TaskPhase, bool)> {
        let t = self.tasks.get_mut(task_id).filter(|t| &t.party == party)?;
        let before = t.phase;
        let count =
            matches!(phase, pb::TaskPhase::Succeeded | pb::TaskPhase::Failed) && !t.outcome_counted;
        t.outcome_counted |= count;
        if before != pb::TaskPhase::Running {
            return Some((before, count));
        }
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
        Some((before, count))
    }

    /// How many tasks each party runs.
    fn running_by_party(&self) -> HashMap<&PartyId, u32> {
        let mut running: HashMap<&PartyId, u32> = HashMap::new();
        for t in self.tasks.values() {
            if t.phase == pb::TaskPhase::Running {
                *running.entry(&t.party).or_default() += 1;
            }
        }
        running
    }

    /// Takes the results a coordinator reports for `job_id` that may be recorded: tasks
    /// offered for that job to the party named, training tasks, not recorded before. They
    /// are marked recorded at once (a concurrent report of the same task is ignored);
    /// [`TaskBook::unclaim`] gives back those the store did not take.
    fn claim_results(
        &mut self,
        job_id: &str,
        reports: &[pb::TaskResultReport],
    ) -> (Vec<(String, PartyId, TaskResult)>, usize) {
        let train = pb::TaskKind::Train as i32;
        let mut claimed = Vec::new();
        for r in reports {
            let result = match pb::TaskResult::try_from(r.result) {
                Ok(pb::TaskResult::Finished) => TaskResult::Finished,
                Ok(pb::TaskResult::Failed) => TaskResult::Failed,
                Ok(pb::TaskResult::TimedOut) => TaskResult::TimedOut,
                _ => continue,
            };
            let Some(t) = self.tasks.get_mut(&r.task_id) else {
                continue;
            };
            if t.job_id != job_id || t.party.as_str() != r.party || t.kind != train {
                continue;
            }
            if std::mem::replace(&mut t.result_recorded, true) {
                continue;
            }
            claimed.push((r.task_id.clone(), t.party.clone(), result));
        }
        let ignored = reports.len() - claimed.len();
        (claimed, ignored)
    }

    /// Gives back claimed results that were not recorded, so a retry records them.
    fn unclaim(&mut self, task_ids: &[String]) {
        for id in task_ids {
            if let Some(t) = self.tasks.get_mut(id) {
                t.result_recorded = false;
            }
        }
    }

    /// How many tasks `party` runs.
    fn running_of(&self, party: &PartyId) -> usize {
        self.tasks
            .values()
            .filter(|t| &t.party == party && t.phase == pb::TaskPhase::Running)
            .count()
    }

    /// Fails the running tasks of `party` with `message`.
    fn fail_party(&mut self, party: &PartyId, message: &str) -> usize {
        let mut failed = 0;
        for t in self.tasks.values_mut() {
            if &t.party == party && t.phase == pb::TaskPhase::Running {
                t.phase = pb::TaskPhase::Failed;
                t.message = Some(message.to_string());
                t.ended_at = Some(Instant::now());
                failed += 1;
            }
        }
        failed
    }

    /// Settles `party`'s tasks against what it listed as running when it
    /// registered again. Ids that are unknown or another party's are ignored.
    fn reattach(&mut self, party: &PartyId, listed: &HashSet<String>) -> Reattached {
        let mut out = Reattached::default();
        for (id, t) in self.tasks.iter_mut().filter(|(_, t)| &t.party == party) {
            match (t.phase, listed.contains(id)) {
                (pb::TaskPhase::Running, true) => out.kept += 1,
                (pb::TaskPhase::Running, false) => {
                    t.phase = pb::TaskPhase::Failed;
                    t.message = Some(PARTY_RECONNECTED_WITHOUT_IT.to_string());
                    t.ended_at = Some(Instant::now());
                    out.failed += 1;
                }
                // It still runs a task that ended here (cancelled, or failed
                // while the party was away): its work is no longer wanted.
                (pb::TaskPhase::Failed | pb::TaskPhase::Cancelled, true) => {
                    let reason = t
                        .message
                        .clone()
                        .unwrap_or_else(|| "the task has ended".into());
                    out.cancels.push((id.clone(), reason));
                }
                _ => {}
            }
        }
        out.ignored = listed
            .iter()
            .filter(|id| self.tasks.get(*id).is_none_or(|t| &t.party != party))
            .count();
        out
    }

    /// Marks a job's running tasks cancelled, with `reason` as their message
    /// (when given); returns them with their parties.
    fn cancel_job(&mut self, job_id: &str, reason: &str) -> Vec<(String, PartyId)> {
        let mut out = Vec::new();
        for (id, t) in self.tasks.iter_mut() {
            if t.job_id == job_id && t.phase == pb::TaskPhase::Running {
                t.phase = pb::TaskPhase::Cancelled;
                t.ended_at = Some(Instant::now());
                t.message = (!reason.is_empty()).then(|| bounded_message(reason).to_string());
                out.push((id.clone(), t.party.clone()));
            }
        }
        out
    }
}

/// What became of a party's tasks when it registered again.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reattached {
    /// Listed and still running: they stay RUNNING.
    pub kept: usize,
    /// Running here but not listed: now FAILED.
    pub failed: usize,
    /// Listed but ended here: (task id, why) to send the party as Cancel.
    pub cancels: Vec<(String, String)>,
    /// Listed ids that are unknown or another party's.
    pub ignored: usize,
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
    /// What selection weighs it by.
    pub traits: Traits,
}

/// Keeps `count` of `candidates` as `pick` draws them, in the order drawn, each with its
/// score (the draw weighs it by `Pick::weight`).
pub fn choose<R: rand::Rng>(
    pick: Pick,
    candidates: Vec<Candidate>,
    count: usize,
    rng: &mut R,
) -> Vec<(Candidate, f64)> {
    let traits: Vec<Traits> = candidates.iter().map(|c| c.traits.clone()).collect();
    let scores = pick.scores(&traits);
    let weights: Vec<f64> = scores.iter().map(|s| pick.weight(*s)).collect();
    let order = crate::selection::draw(&weights, count, rng);
    let mut slots: Vec<Option<Candidate>> = candidates.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|i| slots[i].take().map(|c| (c, scores[i])))
        .collect()
}

struct State {
    sessions: HashMap<PartyId, Session>,
    offers: HashMap<String, PendingOffer>,
    tasks: TaskBook,
    next_session: u64,
    /// Parties whose session ended while they ran tasks, within the
    /// reconnect grace: the id of the session that ended.
    away: HashMap<PartyId, u64>,
}

impl State {
    /// Removes `party`'s session if `session_id` is still its current one.
    fn close_session(&mut self, party: &PartyId, session_id: u64) -> bool {
        if self.sessions.get(party).is_none_or(|x| x.id != session_id) {
            return false;
        }
        self.sessions.remove(party);
        crate::metrics::session(false);
        crate::metrics::connected(self.sessions.len());
        // Its offers can no longer be answered.
        self.offers.retain(|_, o| &o.party != party);
        true
    }
}

pub struct Registry {
    store: Arc<dyn ClientStore>,
    bookkeeping: Bookkeeping,
    settings: Settings,
    state: Mutex<State>,
    /// Connectivity probes waiting for their answers.
    probes: crate::probes::Probes,
}

impl Registry {
    /// Must be called on a Tokio runtime: it starts the bookkeeping writer.
    pub fn new(store: Arc<dyn ClientStore>, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            bookkeeping: Bookkeeping::start(store.clone(), MAX_PENDING_PARTIES),
            store,
            settings,
            state: Mutex::new(State {
                sessions: HashMap::new(),
                offers: HashMap::new(),
                tasks: TaskBook::new(MAX_REMEMBERED_TASKS),
                next_session: 0,
                away: HashMap::new(),
            }),
            probes: crate::probes::Probes::default(),
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
    /// one, and settles the party's tasks against those it `listed` as
    /// running (see `Reattached`). Returns the session's id.
    pub fn add_session(
        &self,
        party: &PartyId,
        tx: SessionSender,
        joining: Joining,
        listed: &HashSet<String>,
    ) -> (u64, Reattached) {
        let Joining {
            datasets,
            resources,
            free,
            gpu_devices,
            reliability,
        } = joining;
        let free = free.map(|f| Free::bounded(&f, &resources));
        self.with_state(|s| {
            s.next_session += 1;
            let id = s.next_session;
            // Dropping the old sender ends that stream.
            let replaced = s.sessions.insert(
                party.clone(),
                Session {
                    id,
                    tx,
                    datasets,
                    running_tasks: 0,
                    resources,
                    free,
                    gpu_devices,
                    reliability,
                },
            );
            s.away.remove(party);
            if replaced.is_some() {
                crate::metrics::session(false);
            }
            crate::metrics::session(true);
            crate::metrics::connected(s.sessions.len());
            (id, s.tasks.reattach(party, listed))
        })
    }

    /// Ends the party's session `session_id`, if it is still its current one.
    /// Its running tasks stay RUNNING for the reconnect grace and then fail
    /// with `PARTY_DISCONNECTED`, unless the party registers again first.
    pub fn end_session(self: &Arc<Self>, party: &PartyId, session_id: u64) {
        let grace = self.settings.reconnect_grace;
        let ended = self.with_state(|s| {
            if !s.close_session(party, session_id) {
                return None;
            }
            let running = s.tasks.running_of(party);
            if running == 0 || grace.is_zero() {
                s.away.remove(party);
                return Some((0, s.tasks.fail_party(party, PARTY_DISCONNECTED)));
            }
            s.away.insert(party.clone(), session_id);
            Some((running, 0))
        });
        let Some((kept, failed)) = ended else {
            return;
        };
        tracing::info!(party = %party, kept_tasks = kept, failed_tasks = failed, "party disconnected");
        if kept > 0 {
            let registry = Arc::downgrade(self);
            let party = party.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if let Some(registry) = registry.upgrade() {
                    registry.give_up_on(&party, session_id);
                }
            });
        }
    }

    /// Fails the tasks of a party still away since its session `session_id`
    /// ended.
    fn give_up_on(&self, party: &PartyId, session_id: u64) {
        let failed = self.with_state(|s| {
            if s.away.get(party) != Some(&session_id) {
                return None;
            }
            s.away.remove(party);
            Some(s.tasks.fail_party(party, PARTY_DISCONNECTED))
        });
        if let Some(failed) = failed {
            tracing::warn!(
                party = %party,
                failed_tasks = failed,
                grace = ?self.settings.reconnect_grace,
                "party did not come back within the reconnect grace; its tasks failed"
            );
        }
    }

    /// Tells a revoked party's live session why, then ends it; its tasks fail
    /// at once (it will not be let back).
    pub fn end_revoked_session(&self, party: &PartyId) {
        let (closed, failed) = self.with_state(|s| {
            let closed = match s.sessions.get(party) {
                Some(sess) => {
                    let revoked = pb::ServerMessage {
                        kind: Some(pb::server_message::Kind::Revoked(pb::Revoked {
                            reason: format!("party {party} was revoked by an administrator"),
                        })),
                    };
                    // Best effort: a full queue must not keep the session open.
                    let _ = sess.tx.try_send(Ok(revoked));
                    let id = sess.id;
                    s.close_session(party, id)
                }
                None => false,
            };
            s.away.remove(party);
            (closed, s.tasks.fail_party(party, PARTY_DISCONNECTED))
        });
        if closed || failed > 0 {
            tracing::info!(party = %party, failed_tasks = failed, "revoked party's session closed");
        }
    }

    /// Handles one message of `party`'s session. Never waits: what goes to
    /// the store is queued.
    pub fn handle_message(&self, party: &PartyId, session_id: u64, msg: pb::PartyMessage) {
        match msg.kind {
            Some(pb::party_message::Kind::Heartbeat(hb)) => {
                self.with_state(|s| {
                    if let Some(sess) = s.sessions.get_mut(party).filter(|x| x.id == session_id) {
                        sess.running_tasks = hb.running_tasks;
                        if let Some(free) = hb.resources.as_ref().and_then(|r| r.free.as_ref()) {
                            sess.free = Some(Free::bounded(free, &sess.resources));
                        }
                    }
                });
                self.bookkeeping.seen(party, now_ms());
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
                let Some((before, count)) = before else {
                    tracing::debug!(party = %party, task = %bounded_message(&status.task_id), "status for an unknown task");
                    return;
                };
                // A repeated final status changes nothing and counts once; one for a task
                // the server ended first still counts the party's own outcome once.
                if count {
                    if phase == pb::TaskPhase::Failed && before == pb::TaskPhase::Running {
                        tracing::warn!(party = %party, task = %status.task_id, message = %message, "task failed");
                    }
                    self.bookkeeping.count(
                        party,
                        if phase == pb::TaskPhase::Succeeded {
                            TaskOutcome::Succeeded
                        } else {
                            TaskOutcome::Failed
                        },
                    );
                }
            }
            Some(pb::party_message::Kind::Register(_)) => {
                tracing::warn!(party = %party, "second Register on one session ignored");
            }
            Some(pb::party_message::Kind::ProbeReply(reply)) => self.probes.answer(party, reply),
            None => {}
        }
    }

    /// Probes every connected party (`crate::probes`), each waiting at most `timeout`.
    pub async fn probe_parties(&self, timeout: Duration) -> Vec<pb::PartyProbe> {
        let sessions = self.with_state(|s| {
            s.sessions
                .iter()
                .map(|(p, sess)| (p.clone(), sess.tx.clone()))
                .collect()
        });
        self.probes.probe_all(sessions, timeout).await
    }

    /// Connected parties: how many tasks each runs, and what it last said is free.
    pub fn live(&self) -> HashMap<PartyId, (u32, Option<Free>)> {
        self.with_state(|s| {
            s.sessions
                .iter()
                .map(|(p, sess)| (p.clone(), (sess.running_tasks, sess.free)))
                .collect()
        })
    }

    /// Connected parties' GPUs (model, memory), by party name.
    pub fn gpu_devices(&self) -> HashMap<String, Vec<pb::GpuInfo>> {
        self.with_state(|s| {
            s.sessions
                .iter()
                .map(|(p, sess)| (p.to_string(), sess.gpu_devices.clone()))
                .collect()
        })
    }

    /// Records what became of training tasks of `job_id` in their parties' reliability
    /// records: only tasks this registry offered for that job to the party a report names,
    /// training tasks, each once (see `TaskBook::claim_results`). Returns how many were
    /// recorded and how many ignored; a store error leaves the unrecorded ones for a retry.
    pub async fn record_results(
        &self,
        job_id: &str,
        reports: &[pb::TaskResultReport],
    ) -> Result<(usize, usize), cohort_store::StoreError> {
        let (claimed, ignored) = self.with_state(|s| s.tasks.claim_results(job_id, reports));
        let now = now_ms();
        for (i, (task_id, party, result)) in claimed.iter().enumerate() {
            if let Err(e) = self.store.record_task_result(party, *result, now).await {
                let left: Vec<String> = claimed[i..].iter().map(|(id, _, _)| id.clone()).collect();
                self.with_state(|s| s.tasks.unclaim(&left));
                return Err(e);
            }
            tracing::debug!(party = %party, task = %task_id, ?result, "task result recorded");
            // The connected party's copy follows the store's arithmetic.
            self.with_state(|s| {
                if let Some(sess) = s.sessions.get_mut(party) {
                    sess.reliability = sess.reliability.after(*result, now);
                }
            });
        }
        Ok((claimed.len(), ignored))
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
    /// has the shape asked for (a zero matches any), with what selection weighs them by.
    /// A party's running tasks are the more of what it says and what this registry knows
    /// it accepted and has not heard end.
    pub fn candidates(
        &self,
        dataset: &str,
        exclude: &[String],
        features: u32,
        classes: u32,
    ) -> Vec<Candidate> {
        self.with_state(|s| {
            s.tasks.forget_expired();
            let running = s.tasks.running_by_party();
            s.sessions
                .iter()
                .filter(|(p, _)| !exclude.iter().any(|e| e == p.as_str()))
                .filter_map(|(p, sess)| {
                    sess.datasets
                        .iter()
                        .find(|d| d.name == dataset)
                        .filter(|d| features == 0 || d.features == features)
                        .filter(|d| classes == 0 || d.classes == classes)
                        .map(|d| {
                            let busy = sess.running_tasks.max(running.get(p).copied().unwrap_or(0));
                            let free = sess
                                .free
                                .unwrap_or_else(|| Free::of_totals(&sess.resources));
                            Candidate {
                                party: p.clone(),
                                tx: sess.tx.clone(),
                                traits: Traits {
                                    samples: d.samples,
                                    capacity: Capacity {
                                        cpu_millis: free.cpu_millis,
                                        memory_bytes: free.memory_bytes,
                                        gpus: free.gpus,
                                        slots: sess.resources.max_tasks.saturating_sub(busy),
                                    },
                                    reliability: sess.reliability.clone(),
                                },
                            }
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
        let Candidate { party, tx, traits } = candidate;
        let samples = traits.samples;
        let offer_id = random_token(12);
        task.task_id = format!("{}-r{}-{}", task.job_id, task.round, random_token(4));
        task.party = party.to_string();
        task.seed = if task.seed == 0 {
            rand::random()
        } else {
            task_seed(task.seed, &party, task.round, task.kind)
        };
        // The party's spans for this task are children of this one.
        let span = cohort_telemetry::trace_span!("offer", party = %party, task_id = %task.task_id);
        task.trace_context = span.in_scope(cohort_telemetry::context_map);
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
        self.bookkeeping.count(&party, TaskOutcome::Offered);
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
        .instrument(span)
        .await;
        self.with_state(|s| s.offers.remove(&offer_id));
        match reply {
            Ok(Some(r)) if r.accepted => {
                crate::metrics::offer(OfferAnswer::Accepted);
                self.with_state(|s| {
                    s.tasks.insert(
                        task.task_id.clone(),
                        party.clone(),
                        task.job_id.clone(),
                        task.kind,
                    )
                });
                self.bookkeeping.count(&party, TaskOutcome::Accepted);
                Ok(pb::AcceptedTask {
                    party: party.to_string(),
                    task_id: task.task_id,
                    task_token: task.task_token,
                    samples,
                })
            }
            Ok(Some(r)) => {
                crate::metrics::offer(OfferAnswer::Declined);
                Err((party, format!("refused: {}", bounded_message(&r.reason))))
            }
            Ok(None) => {
                crate::metrics::offer(OfferAnswer::Disconnected);
                Err((party, "disconnected".to_string()))
            }
            Err(_) => {
                crate::metrics::offer(OfferAnswer::Unanswered);
                Err((party, format!("no answer within {timeout:?}")))
            }
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

    /// Marks a job's running tasks cancelled (`reason` is their message);
    /// returns how many, and each whose party is connected with its session.
    /// A party away within the reconnect grace is sent the Cancel when it
    /// registers again listing the task.
    pub fn cancel_job(&self, job_id: &str, reason: &str) -> (usize, Vec<(String, SessionSender)>) {
        self.with_state(|s| {
            let cancelled = s.tasks.cancel_job(job_id, reason);
            let count = cancelled.len();
            let connected = cancelled
                .into_iter()
                .filter_map(|(id, party)| s.sessions.get(&party).map(|sess| (id, sess.tx.clone())))
                .collect();
            (count, connected)
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

    fn candidates(samples: &[u64]) -> Vec<Candidate> {
        let (tx, _rx) = mpsc::channel(1);
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| Candidate {
                party: party(&format!("p{i}")),
                tx: tx.clone(),
                traits: Traits {
                    samples: *s,
                    ..Traits::default()
                },
            })
            .collect()
    }

    const TRAIN: i32 = pb::TaskKind::Train as i32;

    #[test]
    fn choose_keeps_the_drawn_candidates_with_their_scores() {
        use rand::SeedableRng as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let draws = 4000;
        let mut first = [0u32; 3];
        for _ in 0..draws {
            let picked = choose(Pick::Data, candidates(&[100, 300, 600]), 1, &mut rng);
            let i: usize = picked[0].0.party.as_str()[1..].parse().unwrap();
            assert_eq!(picked[0].1, [100.0, 300.0, 600.0][i], "its score");
            first[i] += 1;
        }
        // One draw: chances 0.1, 0.3 and 0.6.
        for (i, want) in [0.1, 0.3, 0.6].into_iter().enumerate() {
            let got = f64::from(first[i]) / f64::from(draws);
            assert!(
                (got - want).abs() < 0.03,
                "party {i}: {got} vs {want} ({first:?})"
            );
        }
        // Several: distinct parties, as many as asked, never more than there are.
        let two = choose(Pick::Data, candidates(&[1, 1, 1_000_000]), 2, &mut rng);
        assert_eq!(two.len(), 2);
        assert_ne!(two[0].0.party, two[1].0.party);
        assert_eq!(
            choose(Pick::Data, candidates(&[5, 0]), 9, &mut rng).len(),
            2
        );
        let random = choose(Pick::Random, candidates(&[5, 5, 5]), 2, &mut rng);
        assert_eq!(random.len(), 2);
        assert!(random.iter().all(|(_, w)| *w == 1.0));
        // No free capacity (default traits): none drawn under resource.
        assert!(choose(Pick::Resource, candidates(&[5, 5]), 2, &mut rng).is_empty());
    }

    #[test]
    fn free_figures_are_bounded_by_what_the_party_registered() {
        let totals = ResourcesEntry {
            cpus: 4,
            memory_bytes: 8 << 30,
            gpus: 1,
            max_tasks: 2,
        };
        let claimed = pb::FreeResources {
            cpu_millis: u32::MAX,
            memory_bytes: u64::MAX,
            gpus: 99,
        };
        assert_eq!(
            Free::bounded(&claimed, &totals),
            Free {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                gpus: 1
            }
        );
        let modest = pb::FreeResources {
            cpu_millis: 1500,
            memory_bytes: 1 << 30,
            gpus: 0,
        };
        assert_eq!(
            Free::bounded(&modest, &totals),
            Free {
                cpu_millis: 1500,
                memory_bytes: 1 << 30,
                gpus: 0
            }
        );
    }

    fn report(task_id: &str, party: &str, result: pb::TaskResult) -> pb::TaskResultReport {
        pb::TaskResultReport {
            task_id: task_id.into(),
            party: party.into(),
            result: result as i32,
        }
    }

    #[test]
    fn only_results_of_the_jobs_own_training_tasks_count_and_each_once() {
        let mut book = TaskBook::new(10);
        let (a, b) = (party("a"), party("b"));
        book.insert("t-a".into(), a.clone(), "job".into(), TRAIN);
        book.insert("t-b".into(), b.clone(), "job".into(), TRAIN);
        book.insert("t-other".into(), a.clone(), "other".into(), TRAIN);
        book.insert(
            "t-eval".into(),
            a.clone(),
            "job".into(),
            pb::TaskKind::Evaluate as i32,
        );
        use pb::TaskResult::*;
        let (claimed, ignored) = book.claim_results(
            "job",
            &[
                report("t-a", "a", TimedOut),
                // Another party's task, another job's, an evaluation, an unknown id, no result.
                report("t-b", "a", Finished),
                report("t-other", "a", Finished),
                report("t-eval", "a", Finished),
                report("nope", "a", Finished),
                report("t-b", "b", Unspecified),
                // The same task twice in one report.
                report("t-a", "a", Finished),
            ],
        );
        assert_eq!(
            claimed,
            vec![("t-a".into(), a.clone(), TaskResult::TimedOut)]
        );
        assert_eq!(ignored, 6);
        // Once recorded, never again; given back (a store error), it may be.
        let (again, _) = book.claim_results("job", &[report("t-a", "a", Finished)]);
        assert!(again.is_empty());
        book.unclaim(&["t-a".to_string()]);
        let (retried, _) = book.claim_results("job", &[report("t-a", "a", Finished)]);
        assert_eq!(retried.len(), 1);
        let (b_claimed, _) = book.claim_results("job", &[report("t-b", "b", Failed)]);
        assert_eq!(b_claimed, vec![("t-b".into(), b, TaskResult::Failed)]);
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
            book.insert(format!("t{i}"), a.clone(), "job".into(), TRAIN);
            tick();
        }
        // t2 ends before t0: both go before any running task.
        book.record_status(&a, "t2", pb::TaskPhase::Failed, "boom")
            .unwrap();
        tick();
        book.record_status(&a, "t0", pb::TaskPhase::Succeeded, "")
            .unwrap();
        book.insert("t4".into(), b.clone(), "job".into(), TRAIN);
        let mut ids: Vec<&str> = book.tasks.keys().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["t0", "t1", "t3", "t4"]);
        book.insert("t5".into(), b.clone(), "job".into(), TRAIN);
        let mut ids: Vec<&str> = book.tasks.keys().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["t1", "t3", "t4", "t5"]);
        // With nothing ended, the task accepted first goes.
        book.insert("t6".into(), b, "job".into(), TRAIN);
        assert!(!book.tasks.contains_key("t1"));
        assert_eq!(book.tasks.len(), 4);
    }

    #[test]
    fn a_status_from_another_party_or_for_an_unknown_task_changes_nothing() {
        let mut book = TaskBook::new(10);
        let (a, b) = (party("a"), party("b"));
        book.insert("t0".into(), a.clone(), "job".into(), TRAIN);
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

    #[test]
    fn the_partys_own_outcome_counts_once_even_after_the_server_ended_the_task() {
        let mut book = TaskBook::new(10);
        let a = party("a");
        book.insert("t0".into(), a.clone(), "job".into(), TRAIN);
        book.insert("t1".into(), a.clone(), "job".into(), TRAIN);
        // The job ended: its running tasks are cancelled; the party then reports.
        assert_eq!(book.cancel_job("job", "done").len(), 2);
        assert_eq!(
            book.record_status(&a, "t0", pb::TaskPhase::Succeeded, ""),
            Some((pb::TaskPhase::Cancelled, true))
        );
        assert_eq!(
            book.record_status(&a, "t0", pb::TaskPhase::Succeeded, ""),
            Some((pb::TaskPhase::Cancelled, false)),
            "a repeated report counts once"
        );
        assert_eq!(book.tasks["t0"].phase, pb::TaskPhase::Cancelled);
        // A cancellation the party confirms is no outcome.
        assert_eq!(
            book.record_status(&a, "t1", pb::TaskPhase::Cancelled, "cancelled"),
            Some((pb::TaskPhase::Cancelled, false))
        );
    }
}
