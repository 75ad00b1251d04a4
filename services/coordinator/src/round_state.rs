//! One job's round state: the task tickets of the current round, what they delivered and the
//! aggregate being built. No protobuf here: `round_service` turns gRPC calls into these
//! methods and [`RoundError`]s into statuses; `rounds` drives the phases.
//!
//! Invariants kept here: a task token is good for one party, one round, one kind of task and
//! one delivery; a party has at most one upload in flight; when a phase (a round's training or
//! evaluation) ends, its uploads stop and free their slots; what a party claims (samples,
//! metrics) is bounded by what it registered when the job started.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_core::{ErrorKind, HasKind, NamedTensor, PartyId, TaskKind};
use cohort_fl::{AggregationRules, FedAvg, UpdateCheck};

use crate::selection::{Drawn, RoundSelection, TicketEnd};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

/// Why a round call is refused. Mapped onto gRPC codes once, at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RoundError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RoundError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthenticated, message)
    }
    pub fn too_slow(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::DeadlineExceeded, message)
    }
    fn ended(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    /// The coordinator itself cannot take the update now (e.g. its disk): try again.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
}

impl HasKind for RoundError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TicketState {
    /// Minted for an offer whose answer has not come back: not usable yet.
    Minted,
    Issued,
    /// An upload is in progress.
    InFlight,
    Done,
    /// Delivered something the round refused.
    Dropped,
}

/// A task token's binding.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub party: String,
    pub task_id: String,
    pub kind: TaskKind,
    pub round: u32,
    /// Most samples the task may claim: what its party registered when the job started.
    pub samples_cap: u64,
    state: TicketState,
    /// Deliveries begun with this token: an upload that breaks may be tried again, a few times.
    attempts: u32,
    /// Model fetches with this token: a fetch that breaks may be tried again, a few times.
    fetches: u32,
}

/// Deliveries one token may begin; then it is dropped for the round.
const MAX_ATTEMPTS: u32 = 3;
/// Model fetches one token may make: each streams the whole model.
const MAX_FETCHES: u32 = 5;

/// What happened to one task of the current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskProgress {
    Pending,
    InFlight,
    Delivered,
    Dropped,
}

/// An accepted task, to bind to the token minted for it.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub token: String,
    pub party: String,
    pub task_id: String,
    pub samples_cap: u64,
}

/// One party's evaluation of the global model.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub party: String,
    /// Samples evaluated, bounded by what the party registered.
    pub weight: f64,
    pub loss: f64,
    pub accuracy: f64,
}

/// What a training phase produced.
pub struct Training {
    pub aggregate: FedAvg,
    /// Sample-weighted mean training loss the parties reported (NaN if none).
    pub train_loss: f64,
    pub dropped: u32,
}

/// An entry for the job's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub kind: NoteKind,
    pub round: u32,
    pub party: String,
    pub task_id: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    TaskFailed,
    PartyLeftOut,
    UpdateRefused,
    UpdateDropped,
    RoundFailed,
    /// Anything else worth the user's attention.
    Note,
}

impl NoteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoteKind::TaskFailed => "task_failed",
            NoteKind::PartyLeftOut => "party_left_out",
            NoteKind::UpdateRefused => "update_refused",
            NoteKind::UpdateDropped => "update_dropped",
            NoteKind::RoundFailed => "round_failed",
            NoteKind::Note => "note",
        }
    }
}

enum Collecting {
    Nothing,
    Updates {
        aggregate: FedAvg,
        check: Arc<UpdateCheck>,
        loss_sum: f64,
        loss_samples: u64,
        dropped: u32,
    },
    Evaluations(Vec<EvalReport>),
}

struct Inner {
    round: u32,
    /// Changes whenever a phase begins or ends.
    phase: u64,
    deadline: Instant,
    collecting: Collecting,
    tickets: HashMap<String, Ticket>,
    /// Parties with an upload in flight.
    uploading: HashSet<String>,
    refused: u64,
    notes: Vec<Note>,
    /// Who the round's training drew and what became of each.
    selection: RoundSelection,
}

/// Settles the draws of the training tickets still held: delivered, dropped, or open (timed
/// out at the round's end, given up on before it). A ticket that is still open before the
/// round's end but has an upload in flight is kept, so it is not settled yet.
fn settle_draws(inner: &mut Inner, round_over: bool) {
    for t in inner.tickets.values() {
        if t.kind != TaskKind::Train || t.task_id.is_empty() {
            continue;
        }
        let end = match t.state {
            TicketState::Done => TicketEnd::Delivered,
            TicketState::Dropped => TicketEnd::Dropped,
            TicketState::InFlight if !round_over => continue,
            TicketState::InFlight | TicketState::Issued | TicketState::Minted => TicketEnd::Open,
        };
        // Delivered and dropped tickets survive a re-offer; they settle at the round's end.
        if !round_over && end != TicketEnd::Open {
            continue;
        }
        inner.selection.settle(&t.task_id, end, round_over);
    }
}

/// At most this many refusals are logged per window; the rest are only counted.
const REFUSAL_LOG_BURST: u32 = 10;
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);
/// How long a call with a minted but not yet confirmed token waits for its offer's answer.
const BIND_WAIT: Duration = Duration::from_secs(10);
/// At most this many log entries wait for the round loop to send them.
const MAX_PENDING_NOTES: usize = 1000;

struct RefusalLog {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

pub struct RoundState {
    inner: Mutex<Inner>,
    /// What parties fetch and updates are checked against: the model, then whatever the
    /// strategy serves beside it.
    global: Mutex<Arc<Vec<NamedTensor>>>,
    /// The model alone (the same `Arc` as `global` when nothing is served beside it).
    model: Mutex<Arc<Vec<NamedTensor>>>,
    /// Signalled when minted tokens are bound to parties (or forgotten).
    bound: Notify,
    /// Counts landings (an update or evaluation received or dropped, a stop): a waiter
    /// that subscribed before looking misses none.
    progress: watch::Sender<u64>,
    upload_slots: Arc<Semaphore>,
    phase: watch::Sender<u64>,
    stop: watch::Sender<Option<String>>,
    refusal_log: Mutex<RefusalLog>,
    traffic_to_parties: AtomicU64,
    traffic_from_parties: AtomicU64,
    traffic_from_parties_uncompressed: AtomicU64,
    /// Under secure aggregation updates come masked (`crate::secagg`): a plain one is refused.
    masked_only: std::sync::atomic::AtomicBool,
}

/// Tensor bytes moved between the coordinator and the parties.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub to_parties: u64,
    /// As received (compressed under the job's `compression`).
    pub from_parties: u64,
    /// What the received updates decoded to (f32).
    pub from_parties_uncompressed: u64,
}

impl RoundState {
    pub fn new(max_concurrent_uploads: usize) -> Arc<Self> {
        let (phase, _) = watch::channel(0);
        let (stop, _) = watch::channel(None);
        Arc::new(Self {
            inner: Mutex::new(Inner {
                round: 0,
                phase: 0,
                deadline: Instant::now(),
                collecting: Collecting::Nothing,
                tickets: HashMap::new(),
                uploading: HashSet::new(),
                refused: 0,
                notes: Vec::new(),
                selection: RoundSelection::default(),
            }),
            global: Mutex::new(Arc::new(Vec::new())),
            model: Mutex::new(Arc::new(Vec::new())),
            bound: Notify::new(),
            progress: watch::channel(0).0,
            upload_slots: Arc::new(Semaphore::new(max_concurrent_uploads.max(1))),
            phase,
            stop,
            refusal_log: Mutex::new(RefusalLog {
                window_start: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
            traffic_to_parties: AtomicU64::new(0),
            traffic_from_parties: AtomicU64::new(0),
            traffic_from_parties_uncompressed: AtomicU64::new(0),
            masked_only: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Counts model bytes sent to a party.
    pub fn sent(&self, bytes: usize) {
        crate::metrics::sent(bytes);
        self.traffic_to_parties
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts update bytes received from a party, as they came on the wire.
    pub fn received(&self, bytes: usize) {
        crate::metrics::received(bytes);
        self.traffic_from_parties
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts what received update bytes decoded to (the same without compression).
    pub fn decoded(&self, bytes: usize) {
        self.traffic_from_parties_uncompressed
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The bytes moved since the last time this was asked.
    pub fn take_traffic(&self) -> Traffic {
        Traffic {
            to_parties: self.traffic_to_parties.swap(0, Ordering::Relaxed),
            from_parties: self.traffic_from_parties.swap(0, Ordering::Relaxed),
            from_parties_uncompressed: self
                .traffic_from_parties_uncompressed
                .swap(0, Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn global(&self) -> Arc<Vec<NamedTensor>> {
        self.global
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The model alone (without the strategy's extras): what a round's checkpoint stores.
    pub fn model(&self) -> Arc<Vec<NamedTensor>> {
        self.model.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A model with nothing served beside it.
    pub fn set_global(&self, global: Vec<NamedTensor>) {
        self.set_model(global, Vec::new());
    }

    /// The next rounds' model and what the strategy serves beside it (SCAFFOLD's control
    /// variate): parties fetch both, and updates are checked against both.
    pub fn set_model(&self, model: Vec<NamedTensor>, extras: Vec<NamedTensor>) {
        let model = Arc::new(model);
        let served = if extras.is_empty() {
            model.clone()
        } else {
            let mut served = Vec::with_capacity(model.len() + extras.len());
            served.extend(model.iter().cloned());
            served.extend(extras);
            Arc::new(served)
        };
        *self.model.lock().unwrap_or_else(|p| p.into_inner()) = model;
        *self.global.lock().unwrap_or_else(|p| p.into_inner()) = served;
    }

    // --- stopping ---

    pub fn request_stop(&self, reason: String) {
        self.stop.send_replace(Some(reason));
        self.landed();
    }

    pub fn stop_reason(&self) -> Option<String> {
        self.stop.borrow().clone()
    }

    // --- phases ---

    fn next_phase(&self, inner: &mut Inner) {
        inner.phase += 1;
        inner.tickets.clear();
        inner.uploading.clear();
        self.phase.send_replace(inner.phase);
    }

    /// Starts collecting round `round`'s updates against the current global model.
    pub fn begin_training(&self, round: u32, rules: AggregationRules, deadline: Instant) {
        let aggregate = FedAvg::new(self.global(), rules);
        let check = aggregate.checker();
        let mut inner = self.lock();
        self.next_phase(&mut inner);
        inner.selection.clear();
        inner.round = round;
        inner.deadline = deadline;
        inner.collecting = Collecting::Updates {
            aggregate,
            check,
            loss_sum: 0.0,
            loss_samples: 0,
            dropped: 0,
        };
    }

    /// Ends the training phase: uploads still in flight stop and free their slots.
    pub fn finish_training(&self) -> Option<Training> {
        let mut inner = self.lock();
        let collecting = std::mem::replace(&mut inner.collecting, Collecting::Nothing);
        settle_draws(&mut inner, true);
        self.next_phase(&mut inner);
        match collecting {
            Collecting::Updates {
                aggregate,
                loss_sum,
                loss_samples,
                dropped,
                ..
            } => Some(Training {
                aggregate,
                train_loss: if loss_samples > 0 {
                    loss_sum / loss_samples as f64
                } else {
                    f64::NAN
                },
                dropped,
            }),
            _ => None,
        }
    }

    pub fn begin_evaluation(&self, round: u32, deadline: Instant) {
        let mut inner = self.lock();
        self.next_phase(&mut inner);
        inner.round = round;
        inner.deadline = deadline;
        inner.collecting = Collecting::Evaluations(Vec::new());
    }

    pub fn finish_evaluation(&self) -> Vec<EvalReport> {
        let mut inner = self.lock();
        let collecting = std::mem::replace(&mut inner.collecting, Collecting::Nothing);
        self.next_phase(&mut inner);
        match collecting {
            Collecting::Evaluations(reports) => reports,
            _ => Vec::new(),
        }
    }

    /// Round calls refused since the last time this was asked (bad token, wrong party,
    /// duplicate, ...).
    pub fn take_refused(&self) -> u64 {
        std::mem::take(&mut self.lock().refused)
    }

    // --- tickets ---

    /// Mints `count` tokens for offers of the current round: known before any party can
    /// use them, but usable only once bound to the party that accepted.
    pub fn mint(&self, kind: TaskKind, count: u32) -> Vec<String> {
        let tokens: Vec<String> = (0..count).map(|_| cohort_core::random_token(32)).collect();
        let mut inner = self.lock();
        let round = inner.round;
        for t in &tokens {
            inner.tickets.insert(
                t.clone(),
                Ticket {
                    party: String::new(),
                    task_id: String::new(),
                    kind,
                    round,
                    samples_cap: 0,
                    state: TicketState::Minted,
                    attempts: 0,
                    fetches: 0,
                },
            );
        }
        tokens
    }

    /// Binds minted tokens to the parties that accepted them; the others die.
    pub fn bind(&self, minted: &[String], accepted: &[Accepted]) {
        {
            let mut inner = self.lock();
            for token in minted {
                let Some(a) = accepted.iter().find(|a| &a.token == token) else {
                    inner.tickets.remove(token);
                    continue;
                };
                if let Some(t) = inner.tickets.get_mut(token) {
                    t.party = a.party.clone();
                    t.task_id = a.task_id.clone();
                    t.samples_cap = a.samples_cap;
                    t.state = TicketState::Issued;
                }
            }
        }
        self.bound.notify_waiters();
    }

    /// Before the round's tasks are offered again: tokens that delivered nothing and have
    /// no upload in flight die, so a late call cannot count twice.
    pub fn forget_undelivered(&self) {
        let mut inner = self.lock();
        // Given up on before the round's end: their draws failed.
        settle_draws(&mut inner, false);
        inner.tickets.retain(|_, t| {
            matches!(
                t.state,
                TicketState::Done | TicketState::Dropped | TicketState::InFlight
            )
        });
    }

    /// Parties that delivered, were dropped, or are uploading in this phase: not to be
    /// offered the phase's task again.
    pub fn engaged_parties(&self) -> Vec<String> {
        let inner = self.lock();
        let mut parties: Vec<String> = inner
            .tickets
            .values()
            .filter(|t| {
                matches!(
                    t.state,
                    TicketState::Done | TicketState::Dropped | TicketState::InFlight
                )
            })
            .map(|t| t.party.clone())
            .collect();
        parties.sort();
        parties.dedup();
        parties
    }

    /// Updates or evaluations delivered in this phase.
    pub fn delivered(&self) -> u32 {
        self.lock()
            .tickets
            .values()
            .filter(|t| t.state == TicketState::Done)
            .count() as u32
    }

    /// Uploads in flight in this phase.
    pub fn in_flight(&self) -> u32 {
        self.lock().uploading.len() as u32
    }

    pub fn task_progress(&self, task_ids: &[String]) -> HashMap<String, TaskProgress> {
        let inner = self.lock();
        let mut out: HashMap<String, TaskProgress> = task_ids
            .iter()
            .map(|id| (id.clone(), TaskProgress::Pending))
            .collect();
        for t in inner.tickets.values() {
            if let Some(p) = out.get_mut(&t.task_id) {
                *p = match t.state {
                    TicketState::Done => TaskProgress::Delivered,
                    TicketState::Dropped => TaskProgress::Dropped,
                    TicketState::InFlight => TaskProgress::InFlight,
                    TicketState::Minted | TicketState::Issued => TaskProgress::Pending,
                };
            }
        }
        out
    }

    fn landed(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sees every landing (update, evaluation, drop, stop) after this call: take it before
    /// looking at the tasks' progress, then wait on it, and nothing that lands in between
    /// is missed.
    pub fn watch_progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    // --- the job's log ---

    pub fn note(&self, note: Note) {
        let mut inner = self.lock();
        // The log's word on a task is the draw's outcome too.
        if note.kind == NoteKind::TaskFailed && !note.task_id.is_empty() {
            inner.selection.failed(&note.task_id);
        }
        if inner.notes.len() < MAX_PENDING_NOTES {
            inner.notes.push(note);
        }
    }

    pub fn take_notes(&self) -> Vec<Note> {
        std::mem::take(&mut self.lock().notes)
    }

    // --- selection ---

    /// Parties client-selector drew for this round's training, each with its score and the
    /// task it accepted (None: it refused or did not answer).
    pub fn record_draws(&self, draws: Vec<(String, f64, Option<String>)>) {
        let mut inner = self.lock();
        for (party, score, task_id) in draws {
            inner.selection.record(party, score, task_id);
        }
    }

    /// The round's draws so far (settled when its training ends).
    pub fn draws(&self) -> Vec<Drawn> {
        self.lock().selection.drawn().to_vec()
    }

    /// The parties whose updates this round aggregated, in the order drawn.
    pub fn round_parties(&self) -> Vec<String> {
        self.lock().selection.finished_parties()
    }

    // --- refusals ---

    /// Counts a refused call and logs it, at most a few lines a minute: a hostile party
    /// aiming calls at this coordinator cannot flood its log.
    pub fn refuse(&self, e: RoundError) -> RoundError {
        crate::metrics::refused(e.kind);
        let round = {
            let mut inner = self.lock();
            inner.refused += 1;
            inner.round
        };
        let mut log = self.refusal_log.lock().unwrap_or_else(|p| p.into_inner());
        if log.window_start.elapsed() >= REFUSAL_LOG_WINDOW {
            if log.suppressed > 0 {
                tracing::warn!(
                    suppressed = log.suppressed,
                    "round calls refused without a log line in the last minute"
                );
            }
            *log = RefusalLog {
                window_start: Instant::now(),
                logged: 0,
                suppressed: 0,
            };
        }
        if log.logged < REFUSAL_LOG_BURST {
            log.logged += 1;
            tracing::warn!(round, reason = %e.message, "round call refused");
        } else {
            log.suppressed += 1;
        }
        e
    }

    /// A refusal of a call that held a valid ticket: also goes to the job's log.
    fn refuse_ticket(&self, ticket: &Ticket, e: RoundError) -> RoundError {
        self.note(Note {
            kind: NoteKind::UpdateRefused,
            round: ticket.round,
            party: ticket.party.clone(),
            task_id: ticket.task_id.clone(),
            message: e.message.clone(),
        });
        self.refuse(e)
    }

    /// The ticket for `token`, if `caller` may use it for `kind` now. `exclusive` takes it
    /// for a delivery (a second one is refused). Waits a little for a token whose offer's
    /// answer has not come back yet: the party may be faster than that.
    async fn claim(
        &self,
        token: &str,
        kind: Option<TaskKind>,
        exclusive: bool,
        caller: Option<&PartyId>,
    ) -> Result<Ticket, RoundError> {
        let deadline = Instant::now() + BIND_WAIT;
        loop {
            let bound = self.bound.notified();
            match self.try_claim(token, kind, exclusive, caller) {
                Some(outcome) => return outcome,
                None if Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, bound).await;
                }
                None => {
                    return Err(self.refuse(RoundError::denied("task token was never confirmed")));
                }
            }
        }
    }

    /// None while the token is minted but not yet bound.
    fn try_claim(
        &self,
        token: &str,
        kind: Option<TaskKind>,
        exclusive: bool,
        caller: Option<&PartyId>,
    ) -> Option<Result<Ticket, RoundError>> {
        let mut inner = self.lock();
        let round = inner.round;
        let refusal = match inner.tickets.get_mut(token) {
            None => RoundError::denied("unknown or expired task token"),
            Some(t) if t.state == TicketState::Minted => return None,
            // A token is good only for the party it was issued to.
            Some(t) if caller.is_some_and(|c| c.as_str() != t.party) => {
                RoundError::denied(format!(
                    "task {} was not offered to party {}",
                    t.task_id,
                    caller.map(|c| c.as_str()).unwrap_or_default()
                ))
            }
            Some(t) if t.round != round => RoundError::ended(format!(
                "task {} belongs to round {}, the current round is {round}",
                t.task_id, t.round
            )),
            Some(t) if kind.is_some_and(|k| k != t.kind) => {
                RoundError::denied(format!("task {} is a {} task", t.task_id, t.kind))
            }
            Some(t) if exclusive && t.state != TicketState::Issued => RoundError::new(
                ErrorKind::AlreadyExists,
                format!("task {} already delivered or delivering", t.task_id),
            ),
            Some(t) if exclusive && t.attempts >= MAX_ATTEMPTS => {
                t.state = TicketState::Dropped;
                RoundError::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "task {}: {MAX_ATTEMPTS} deliveries were begun and none finished",
                        t.task_id
                    ),
                )
            }
            Some(t) if !exclusive && t.fetches >= MAX_FETCHES => RoundError::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "task {}: the model was fetched {MAX_FETCHES} times",
                    t.task_id
                ),
            ),
            Some(t) => {
                if exclusive {
                    t.state = TicketState::InFlight;
                    t.attempts += 1;
                } else {
                    t.fetches += 1;
                }
                return Some(Ok(t.clone()));
            }
        };
        drop(inner);
        Some(Err(self.refuse(refusal)))
    }

    /// For a secure-aggregation call (`crate::secagg`): the caller's training ticket of the
    /// current round, delivered or not (a survivor answers the unmask request after its
    /// masked update counted). Counts nothing against the token: the protocol makes several
    /// calls per task; the session refuses a second delivery. Waits for a minted token's offer like [`Self::claim`].
    pub async fn claim_secagg(
        &self,
        token: &str,
        caller: Option<&PartyId>,
    ) -> Result<Ticket, RoundError> {
        let deadline = Instant::now() + BIND_WAIT;
        loop {
            let bound = self.bound.notified();
            let outcome = {
                let inner = self.lock();
                match inner.tickets.get(token) {
                    None => Err(RoundError::denied("unknown or expired task token")),
                    Some(t) if t.state == TicketState::Minted && Instant::now() < deadline => {
                        Ok(None)
                    }
                    Some(t) if t.state == TicketState::Minted => {
                        Err(RoundError::denied("task token was never confirmed"))
                    }
                    Some(t) if caller.is_some_and(|c| c.as_str() != t.party) => {
                        Err(RoundError::denied(format!(
                            "task {} was not offered to party {}",
                            t.task_id,
                            caller.map(|c| c.as_str()).unwrap_or_default()
                        )))
                    }
                    Some(t) if t.round != inner.round || t.kind != TaskKind::Train => {
                        Err(RoundError::ended(format!(
                            "task {} is not a training task of round {}",
                            t.task_id, inner.round
                        )))
                    }
                    Some(t) => Ok(Some(t.clone())),
                }
            };
            match outcome {
                Ok(Some(ticket)) => return Ok(ticket),
                // Minted, its offer's answer not back yet.
                Ok(None) => {
                    let _ = tokio::time::timeout_at(deadline, bound).await;
                }
                Err(refusal) => return Err(self.refuse(refusal)),
            }
        }
    }

    /// From now on every update must come masked (secure aggregation).
    pub fn take_masked_updates_only(&self) {
        self.masked_only.store(true, Ordering::Relaxed);
    }

    /// Settles a secure-aggregation task: its masked update counted (`delivered`) or not.
    pub fn settle_secagg(&self, token: &str, delivered: bool) {
        {
            let mut inner = self.lock();
            if let Some(t) = inner.tickets.get_mut(token) {
                t.state = if delivered {
                    TicketState::Done
                } else {
                    TicketState::Dropped
                };
            }
        }
        self.landed();
    }

    /// A refusal of a secure-aggregation message of a party holding a valid ticket: counted
    /// in the round's refusals and written to the job's log.
    pub fn refuse_secagg(&self, ticket: &Ticket, e: RoundError) -> RoundError {
        self.refuse_ticket(ticket, e)
    }

    /// For a model fetch: any valid ticket of the caller.
    pub async fn claim_fetch(
        &self,
        token: &str,
        caller: Option<&PartyId>,
    ) -> Result<Ticket, RoundError> {
        self.claim(token, None, false, caller).await
    }

    /// Starts receiving an update for `token`: one per token, one in flight per party,
    /// `samples` within what the party registered.
    pub async fn start_upload(
        self: &Arc<Self>,
        token: &str,
        caller: Option<&PartyId>,
        samples: u64,
    ) -> Result<Upload, RoundError> {
        if self.masked_only.load(Ordering::Relaxed) {
            return Err(self.refuse(RoundError::denied(
                "this job takes masked updates only (privacy.secure_aggregation): \
                 SecureAggregation.SubmitMasked, not Round.SubmitUpdate",
            )));
        }
        let ticket = self
            .claim(token, Some(TaskKind::Train), true, caller)
            .await?;
        let mut inner = self.lock();
        let release = |inner: &mut Inner| {
            if let Some(t) = inner.tickets.get_mut(token) {
                t.state = TicketState::Issued;
            }
        };
        let Collecting::Updates { check, .. } = &inner.collecting else {
            release(&mut inner);
            drop(inner);
            return Err(self.refuse(RoundError::ended("no round is collecting updates")));
        };
        let check = check.clone();
        if !inner.uploading.insert(ticket.party.clone()) {
            release(&mut inner);
            drop(inner);
            return Err(self.refuse(RoundError::new(
                ErrorKind::ResourceExhausted,
                format!("party {} already has an upload in flight", ticket.party),
            )));
        }
        let (phase, deadline) = (inner.phase, inner.deadline);
        drop(inner);
        let upload = Upload {
            state: self.clone(),
            token: token.to_string(),
            ticket,
            samples,
            phase,
            deadline,
            check,
            finished: false,
        };
        if samples == 0 || samples > upload.ticket.samples_cap {
            let e = RoundError::invalid(format!(
                "header.samples: {samples} is outside 1..={} (the samples party {} registered \
                 for this dataset when the job started)",
                upload.ticket.samples_cap, upload.ticket.party
            ));
            return Err(self.refuse_ticket(&upload.ticket, e));
        }
        Ok(upload)
    }

    /// Records an evaluation for `token`. The sample count weighs at most what the party
    /// registered; the metrics must be possible ones.
    pub async fn record_evaluation(
        &self,
        token: &str,
        caller: Option<&PartyId>,
        samples: u64,
        loss: f64,
        accuracy: f64,
    ) -> Result<(), RoundError> {
        let ticket = self
            .claim(token, Some(TaskKind::Evaluate), true, caller)
            .await?;
        let valid = samples > 0
            && loss.is_finite()
            && loss >= 0.0
            && accuracy.is_finite()
            && (0.0..=1.0).contains(&accuracy);
        let mut inner = self.lock();
        let current = inner
            .tickets
            .get(token)
            .is_some_and(|t| t.round == inner.round);
        if !valid || !current {
            if let Some(t) = inner.tickets.get_mut(token) {
                t.state = TicketState::Issued;
            }
            drop(inner);
            let e = if valid {
                RoundError::ended("the round's evaluation ended before this report")
            } else {
                RoundError::invalid(
                    "metrics: samples must be positive, loss finite and non-negative, \
                     accuracy in [0, 1]",
                )
            };
            return Err(self.refuse_ticket(&ticket, e));
        }
        let Collecting::Evaluations(reports) = &mut inner.collecting else {
            drop(inner);
            return Err(self.refuse(RoundError::ended("no evaluation is being collected")));
        };
        reports.push(EvalReport {
            party: ticket.party.clone(),
            weight: samples.min(ticket.samples_cap.max(1)) as f64,
            loss,
            accuracy,
        });
        if let Some(t) = inner.tickets.get_mut(token) {
            t.state = TicketState::Done;
        }
        drop(inner);
        self.landed();
        Ok(())
    }
}

/// An update being received. Dropping it unfinished gives the token back (the party may
/// try again in this round) and frees the party's upload.
pub struct Upload {
    state: Arc<RoundState>,
    token: String,
    ticket: Ticket,
    samples: u64,
    phase: u64,
    deadline: Instant,
    check: Arc<UpdateCheck>,
    finished: bool,
}

impl Upload {
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// The model the update must match.
    pub fn check(&self) -> &Arc<UpdateCheck> {
        &self.check
    }

    /// When the round stops taking updates.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Resolves when the phase the upload belongs to has ended.
    pub async fn phase_ended(&self) {
        let mut phase = self.state.phase.subscribe();
        let _ = phase.wait_for(|p| *p != self.phase).await;
    }

    /// A slot among the updates held in memory at once, waited for while the phase lasts.
    pub async fn slot(&self) -> Result<OwnedSemaphorePermit, RoundError> {
        tokio::select! {
            permit = self.state.upload_slots.clone().acquire_owned() => {
                permit.map_err(|_| RoundError::ended("the coordinator is shutting down"))
            }
            _ = self.phase_ended() => Err(RoundError::ended("the round ended while the update waited")),
            _ = tokio::time::sleep_until(self.deadline) => {
                Err(RoundError::too_slow("the round's deadline passed while the update waited"))
            }
        }
    }

    /// Checks the received update and folds it into the round's aggregate. An update the
    /// round cannot take (wrong layout, over the norm bound, not finite once applied) is
    /// dropped: the task delivered, but nothing of it counts; the job's log says why.
    /// Returns the update's L2 norm as received.
    pub fn complete(self, delta: Vec<NamedTensor>, train_loss: f64) -> Result<f64, RoundError> {
        let checked = self.check.check(delta).map_err(|e| e.to_string());
        self.finish(checked.map(|update| (update, train_loss)))
    }

    /// Folds an update checked as it streamed in (see [`Upload::complete`]).
    pub fn complete_checked(
        self,
        update: cohort_fl::CheckedUpdate,
        train_loss: f64,
    ) -> Result<f64, RoundError> {
        self.finish(Ok((update, train_loss)))
    }

    /// Drops the update for a fault of its content (`why`), as [`Upload::complete`] would.
    pub fn reject(self, why: String) -> RoundError {
        match self.finish(Err(why)) {
            Err(e) => e,
            Ok(_) => RoundError::invalid("rejected"),
        }
    }

    fn finish(
        mut self,
        checked: Result<(cohort_fl::CheckedUpdate, f64), String>,
    ) -> Result<f64, RoundError> {
        let state = self.state.clone();
        let mut inner = state.lock();
        if inner.phase != self.phase || !inner.tickets.contains_key(&self.token) {
            drop(inner);
            return Err(state.refuse(RoundError::ended(
                "the round ended, or the task was offered again, while the update was uploaded",
            )));
        }
        let outcome = match (checked, &mut inner.collecting) {
            (
                Ok((update, train_loss)),
                Collecting::Updates {
                    aggregate,
                    loss_sum,
                    loss_samples,
                    ..
                },
            ) => {
                if update.clipped {
                    tracing::info!(party = %self.ticket.party, norm = update.norm, "update clipped to the norm bound");
                }
                let norm = update.norm;
                match aggregate.add(update, self.samples) {
                    Ok(()) => {
                        if train_loss.is_finite() && train_loss >= 0.0 {
                            *loss_sum += train_loss * self.samples as f64;
                            *loss_samples += self.samples;
                        }
                        Ok(norm)
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            (Err(why), _) => Err(why),
            (Ok(_), _) => Err("no round is collecting updates".to_string()),
        };
        let state_after = if outcome.is_ok() {
            TicketState::Done
        } else {
            TicketState::Dropped
        };
        if let Some(t) = inner.tickets.get_mut(&self.token) {
            t.state = state_after;
        }
        inner.uploading.remove(&self.ticket.party);
        if outcome.is_err()
            && let Collecting::Updates { dropped, .. } = &mut inner.collecting
        {
            *dropped += 1;
        }
        drop(inner);
        self.finished = true;
        state.landed();
        match outcome {
            Ok(norm) => Ok(norm),
            Err(why) => {
                state.note(Note {
                    kind: NoteKind::UpdateDropped,
                    round: self.ticket.round,
                    party: self.ticket.party.clone(),
                    task_id: self.ticket.task_id.clone(),
                    message: why.clone(),
                });
                tracing::warn!(party = %self.ticket.party, task = %self.ticket.task_id, reason = %why, "update dropped");
                Err(RoundError::invalid(why))
            }
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut inner = self.state.lock();
        if inner.phase == self.phase {
            if let Some(t) = inner.tickets.get_mut(&self.token)
                && t.state == TicketState::InFlight
            {
                t.state = TicketState::Issued;
            }
            inner.uploading.remove(&self.ticket.party);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn model() -> Vec<NamedTensor> {
        vec![NamedTensor {
            name: "w".into(),
            shape: vec![2],
            data: vec![0.0, 0.0],
        }]
    }

    fn delta(v: f32) -> Vec<NamedTensor> {
        vec![NamedTensor {
            name: "w".into(),
            shape: vec![2],
            data: vec![v, v],
        }]
    }

    fn party(name: &str) -> PartyId {
        PartyId::parse(name).unwrap()
    }

    /// A training phase with one bound token per party.
    fn training(parties: &[(&str, u64)]) -> (Arc<RoundState>, Vec<String>) {
        let state = RoundState::new(4);
        state.set_global(model());
        state.begin_training(
            1,
            AggregationRules::default(),
            Instant::now() + Duration::from_secs(30),
        );
        let tokens = state.mint(TaskKind::Train, parties.len() as u32);
        let accepted: Vec<Accepted> = tokens
            .iter()
            .zip(parties)
            .map(|(t, (p, cap))| Accepted {
                token: t.clone(),
                party: p.to_string(),
                task_id: format!("task-{p}"),
                samples_cap: *cap,
            })
            .collect();
        state.bind(&tokens, &accepted);
        (state, tokens)
    }

    #[tokio::test]
    async fn a_token_is_good_for_its_party_and_one_update() {
        let (state, tokens) = training(&[("a", 10), ("b", 10)]);
        let err = state
            .start_upload(&tokens[0], Some(&party("b")), 5)
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::PermissionDenied);
        let upload = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .unwrap();
        // One upload in flight per party, and one delivery per token.
        let err = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::AlreadyExists);
        upload.complete(delta(1.0), 0.5).unwrap();
        let err = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::AlreadyExists);
        assert_eq!(state.delivered(), 1);
        assert_eq!(state.take_refused(), 3);
        assert_eq!(state.take_refused(), 0);
    }

    #[tokio::test]
    async fn a_rounds_draws_settle_from_what_its_tickets_did() {
        use crate::selection::Outcome;
        let (state, tokens) = training(&[("a", 10), ("b", 10), ("c", 10), ("d", 10)]);
        state.record_draws(vec![
            ("a".into(), 0.9, Some("task-a".into())),
            ("b".into(), 0.8, Some("task-b".into())),
            ("c".into(), 0.7, Some("task-c".into())),
            ("d".into(), 0.6, Some("task-d".into())),
            ("e".into(), 0.5, None),
        ]);
        state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .unwrap()
            .complete(delta(1.0), 0.5)
            .unwrap();
        // b's party said it failed; c and d, silent, are given up on when the task is
        // offered again (a task still open at the round's end times out: the next test).
        state.note(Note {
            kind: NoteKind::TaskFailed,
            round: 1,
            party: "b".into(),
            task_id: "task-b".into(),
            message: "executor crashed".into(),
        });
        state.forget_undelivered();
        // Its token died with the re-offer: too late to count.
        assert!(
            state
                .start_upload(&tokens[2], Some(&party("c")), 5)
                .await
                .is_err()
        );
        let training = state.finish_training().unwrap();
        assert_eq!(training.aggregate.updates(), 1);
        let outcomes: Vec<(String, Outcome)> = state
            .draws()
            .into_iter()
            .map(|d| (d.party, d.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("a".to_string(), Outcome::Finished),
                ("b".to_string(), Outcome::Failed),
                ("c".to_string(), Outcome::Failed),
                ("d".to_string(), Outcome::Failed),
                ("e".to_string(), Outcome::Refused),
            ]
        );
        assert_eq!(state.round_parties(), ["a"]);
        // The next round starts with none.
        state.begin_training(
            2,
            AggregationRules::default(),
            Instant::now() + Duration::from_secs(30),
        );
        assert!(state.draws().is_empty());
    }

    #[tokio::test]
    async fn a_task_still_open_at_the_rounds_end_timed_out() {
        use crate::selection::Outcome;
        let (state, tokens) = training(&[("a", 10), ("b", 10)]);
        state.record_draws(vec![
            ("a".into(), 1.0, Some("task-a".into())),
            ("b".into(), 1.0, Some("task-b".into())),
        ]);
        state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .unwrap()
            .complete(delta(1.0), 0.5)
            .unwrap();
        // b's upload is still in flight when the round ends.
        let _upload = state
            .start_upload(&tokens[1], Some(&party("b")), 5)
            .await
            .unwrap();
        state.forget_undelivered();
        state.finish_training().unwrap();
        let outcomes: Vec<Outcome> = state.draws().into_iter().map(|d| d.outcome).collect();
        assert_eq!(outcomes, [Outcome::Finished, Outcome::TimedOut]);
    }

    #[tokio::test]
    async fn samples_are_bounded_by_the_registration() {
        let (state, tokens) = training(&[("a", 100)]);
        let err = state
            .start_upload(&tokens[0], Some(&party("a")), 101)
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        assert!(err.message.contains("header.samples"), "{err}");
        // The refusal gave the token back and is in the job's log.
        assert!(
            state
                .start_upload(&tokens[0], Some(&party("a")), 100)
                .await
                .is_ok()
        );
        let notes = state.take_notes();
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].kind, NoteKind::UpdateRefused);
    }

    #[tokio::test]
    async fn an_abandoned_upload_frees_its_token_and_party() {
        let (state, tokens) = training(&[("a", 10)]);
        let upload = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .unwrap();
        assert_eq!(state.in_flight(), 1);
        drop(upload);
        assert_eq!(state.in_flight(), 0);
        let upload = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .unwrap();
        upload.complete(delta(2.0), 0.1).unwrap();
        let training = state.finish_training().unwrap();
        assert_eq!(training.aggregate.finish().unwrap()[0].data, vec![2.0, 2.0]);
    }

    #[tokio::test]
    async fn a_token_allows_a_few_broken_uploads_only() {
        let (state, tokens) = training(&[("a", 10)]);
        for _ in 0..MAX_ATTEMPTS {
            let upload = state
                .start_upload(&tokens[0], Some(&party("a")), 5)
                .await
                .unwrap();
            drop(upload);
        }
        let err = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::ResourceExhausted);
        assert_eq!(
            state.task_progress(&["task-a".to_string()])["task-a"],
            TaskProgress::Dropped
        );
    }

    #[tokio::test]
    async fn a_token_fetches_the_model_a_few_times_only() {
        let (state, tokens) = training(&[("a", 10)]);
        for _ in 0..MAX_FETCHES {
            state
                .claim_fetch(&tokens[0], Some(&party("a")))
                .await
                .unwrap();
        }
        let err = state
            .claim_fetch(&tokens[0], Some(&party("a")))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::ResourceExhausted);
    }

    #[tokio::test]
    async fn tokens_of_another_kind_round_or_offer_are_refused() {
        let (state, tokens) = training(&[("a", 10), ("b", 10)]);
        // A training token is no evaluation token.
        let err = state
            .record_evaluation(&tokens[0], Some(&party("a")), 5, 0.1, 0.9)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::PermissionDenied);
        // Offered again: the undelivered tokens die, the delivered one stays.
        state
            .start_upload(&tokens[1], Some(&party("b")), 5)
            .await
            .unwrap()
            .complete(delta(1.0), 0.1)
            .unwrap();
        state.forget_undelivered();
        let err = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .err()
            .unwrap();
        assert_eq!(
            (err.kind, err.message.as_str()),
            (ErrorKind::PermissionDenied, "unknown or expired task token")
        );
        assert_eq!(state.engaged_parties(), vec!["b".to_string()]);
        // The next round: every token of the last one is unknown.
        state.finish_training().unwrap();
        state.begin_training(
            2,
            AggregationRules::default(),
            Instant::now() + Duration::from_secs(30),
        );
        let err = state
            .claim_fetch(&tokens[1], Some(&party("b")))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::PermissionDenied);
        // A minted token is usable only once bound, by its party.
        let minted = state.mint(TaskKind::Evaluate, 1);
        state.bind(&minted, &[]);
        let err = state
            .claim_fetch(&minted[0], Some(&party("a")))
            .await
            .unwrap_err();
        assert_eq!(err.message, "unknown or expired task token");
    }

    #[tokio::test]
    async fn the_end_of_a_phase_stops_its_uploads() {
        let (state, tokens) = training(&[("a", 10)]);
        let upload = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .unwrap();
        let ended = tokio::spawn({
            let state = state.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                state.finish_training();
            }
        });
        tokio::time::timeout(Duration::from_secs(5), upload.phase_ended())
            .await
            .expect("the upload learns that its round ended");
        ended.await.unwrap();
        let err = upload.complete(delta(1.0), 0.1).err().unwrap();
        assert_eq!(err.kind, ErrorKind::FailedPrecondition);
    }

    #[tokio::test]
    async fn a_refused_update_is_dropped_with_its_reason() {
        let (state, tokens) = training(&[("a", 10), ("b", 10)]);
        let upload = state
            .start_upload(&tokens[0], Some(&party("a")), 5)
            .await
            .unwrap();
        let err = upload.complete(delta(f32::MAX), 0.1).err().unwrap();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        let upload = state
            .start_upload(&tokens[1], Some(&party("b")), 5)
            .await
            .unwrap();
        upload.complete(delta(1.0), 0.1).unwrap();
        let notes = state.take_notes();
        assert_eq!(notes.len(), 1);
        assert_eq!(
            (notes[0].kind, notes[0].party.as_str()),
            (NoteKind::UpdateDropped, "a")
        );
        let training = state.finish_training().unwrap();
        assert_eq!(training.dropped, 1);
        assert_eq!(training.aggregate.updates(), 1);
        assert_eq!(training.aggregate.finish().unwrap()[0].data, vec![1.0, 1.0]);
    }

    #[tokio::test]
    async fn evaluations_are_bounded_and_once_per_token() {
        let state = RoundState::new(4);
        state.begin_evaluation(1, Instant::now() + Duration::from_secs(30));
        let tokens = state.mint(TaskKind::Evaluate, 1);
        state.bind(
            &tokens,
            &[Accepted {
                token: tokens[0].clone(),
                party: "a".into(),
                task_id: "t".into(),
                samples_cap: 50,
            }],
        );
        let bad = state
            .record_evaluation(&tokens[0], Some(&party("a")), 10, 0.1, 1.5)
            .await;
        assert_eq!(bad.unwrap_err().kind, ErrorKind::InvalidArgument);
        state
            .record_evaluation(&tokens[0], Some(&party("a")), 1_000_000, 0.1, 0.9)
            .await
            .unwrap();
        let again = state
            .record_evaluation(&tokens[0], Some(&party("a")), 10, 0.1, 0.9)
            .await;
        assert_eq!(again.unwrap_err().kind, ErrorKind::AlreadyExists);
        let reports = state.finish_evaluation();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].weight, 50.0, "capped at the registered samples");
    }
}
