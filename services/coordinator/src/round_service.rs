//! The round protocol parties call (through the proxy): model fetch, update
//! and evaluation submission. Every call carries a task token issued for one
//! party, one round and one kind of task; an update is accepted once per token.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use cohort_core::{NamedTensor, PartyId};
use cohort_fl::wire::Layout;
use cohort_fl::{CHUNK_BYTES, FedAvg, TensorAssembler, chunk_tensors};
use cohort_proto::v1 as pb;
use futures::{Stream, StreamExt};
use tokio::sync::{Notify, Semaphore, watch};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketState {
    Issued,
    /// An upload is in progress; a second one is refused.
    InFlight,
    Done,
}

#[derive(Debug, Clone)]
pub struct Ticket {
    pub party: String,
    pub task_id: String,
    pub kind: pb::TaskKind,
    pub round: u32,
    /// The samples the party registered for the dataset: an update may not claim more.
    pub samples_cap: u64,
    pub state: TicketState,
}

/// Evaluation results, accumulated weighted by samples.
#[derive(Debug, Clone, Default)]
pub struct EvalSum {
    pub loss_sum: f64,
    pub correct_sum: f64,
    pub samples: u64,
    pub reports: u32,
}

impl EvalSum {
    pub fn metrics(&self) -> pb::Metrics {
        if self.samples == 0 {
            return pb::Metrics::default();
        }
        pb::Metrics {
            loss: self.loss_sum / self.samples as f64,
            accuracy: self.correct_sum / self.samples as f64,
            samples: self.samples,
        }
    }
}

/// What the current round collects.
pub struct Collect {
    pub round: u32,
    pub tickets: HashMap<String, Ticket>,
    pub aggregate: Option<FedAvg>,
    pub train_loss_sum: f64,
    pub train_samples: u64,
    pub eval: EvalSum,
    /// Refused calls (bad token, wrong round, duplicate), for the log and metrics.
    pub refused: u64,
}

/// How long a call with a minted but not yet confirmed token waits.
const BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct Unbound;

pub struct RoundShared {
    /// Signalled when minted tokens are bound to parties.
    pub bound: Notify,
    pub global: Mutex<Arc<Vec<NamedTensor>>>,
    pub collect: Mutex<Collect>,
    /// Signalled whenever an update or evaluation lands.
    pub progress: Notify,
    /// Bounds the updates held in memory at once (each is O(model)).
    pub upload_slots: Semaphore,
    pub stop: watch::Sender<Option<String>>,
}

impl RoundShared {
    pub fn new(global: Vec<NamedTensor>, max_concurrent_uploads: usize) -> Arc<Self> {
        let (stop, _) = watch::channel(None);
        Arc::new(Self {
            global: Mutex::new(Arc::new(global)),
            collect: Mutex::new(Collect {
                round: 0,
                tickets: HashMap::new(),
                aggregate: None,
                train_loss_sum: 0.0,
                train_samples: 0,
                eval: EvalSum::default(),
                refused: 0,
            }),
            progress: Notify::new(),
            bound: Notify::new(),
            upload_slots: Semaphore::new(max_concurrent_uploads.max(1)),
            stop,
        })
    }

    pub fn lock_collect(&self) -> std::sync::MutexGuard<'_, Collect> {
        self.collect.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn global(&self) -> Arc<Vec<NamedTensor>> {
        self.global
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_global(&self, g: Vec<NamedTensor>) {
        *self.global.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(g);
    }

    /// Like `try_claim`, but waits a little for a token minted for an offer
    /// whose answer has not come back yet (the party may be faster than that).
    async fn claim(
        &self,
        token: &str,
        kind: pb::TaskKind,
        exclusive: bool,
        caller: Option<&PartyId>,
    ) -> Result<Ticket, Status> {
        let deadline = tokio::time::Instant::now() + BIND_WAIT;
        loop {
            let notified = self.bound.notified();
            match self.try_claim(token, kind, exclusive, caller) {
                Err(Unbound) if tokio::time::Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, notified).await;
                }
                Err(Unbound) => {
                    return Err(
                        self.refuse(Status::permission_denied("task token was never confirmed"))
                    );
                }
                Ok(r) => return r,
            }
        }
    }

    fn refuse(&self, s: Status) -> Status {
        let mut c = self.lock_collect();
        c.refused += 1;
        tracing::warn!(round = c.round, reason = %s.message(), "round call refused");
        s
    }

    /// Marks minted tokens as bound to the parties that accepted them.
    pub fn bind(&self, tickets: impl IntoIterator<Item = (String, Ticket)>) {
        {
            let mut c = self.lock_collect();
            for (token, t) in tickets {
                c.tickets.insert(token, t);
            }
        }
        self.bound.notify_waiters();
    }

    /// Invalidates this round's tokens that delivered nothing, before their
    /// tasks are offered again: a late upload must not count twice.
    pub fn forget_undelivered(&self, round: u32) {
        let mut c = self.lock_collect();
        c.tickets
            .retain(|_, t| t.round != round || t.state == TicketState::Done);
    }

    /// Drops minted tokens that no party accepted.
    pub fn forget_unbound(&self, minted: &[String], accepted: &[pb::AcceptedTask]) {
        let mut c = self.lock_collect();
        for t in minted {
            if !accepted.iter().any(|a| &a.task_token == t) {
                c.tickets.remove(t);
            }
        }
    }

    fn try_claim(
        &self,
        token: &str,
        kind: pb::TaskKind,
        exclusive: bool,
        caller: Option<&PartyId>,
    ) -> Result<Result<Ticket, Status>, Unbound> {
        let mut c = self.lock_collect();
        if c.tickets.get(token).is_some_and(|t| t.party.is_empty()) {
            return Err(Unbound);
        }
        let round = c.round;
        let outcome = match c.tickets.get_mut(token) {
            None => Err(Status::permission_denied("unknown or expired task token")),
            // A token is good only for the party it was issued to.
            Some(t) if caller.is_some_and(|c| c.as_str() != t.party) => {
                Err(Status::permission_denied(format!(
                    "task {} was not offered to party {}",
                    t.task_id,
                    caller.map(|c| c.as_str()).unwrap_or_default()
                )))
            }
            Some(t) if t.round != round => Err(Status::failed_precondition(format!(
                "task {} belongs to round {}, the current round is {round}",
                t.task_id, t.round
            ))),
            Some(t) if t.kind != kind => Err(Status::permission_denied(format!(
                "task {} is not a {kind:?} task",
                t.task_id
            ))),
            Some(t) if exclusive && t.state != TicketState::Issued => Err(Status::already_exists(
                format!("task {} already submitted", t.task_id),
            )),
            Some(t) => {
                if exclusive {
                    t.state = TicketState::InFlight;
                }
                Ok(t.clone())
            }
        };
        if let Err(s) = &outcome {
            c.refused += 1;
            tracing::warn!(round, reason = %s.message(), "round call refused");
        }
        Ok(outcome)
    }

    fn release(&self, token: &str, state: TicketState) {
        let mut c = self.lock_collect();
        if let Some(t) = c.tickets.get_mut(token) {
            t.state = state;
        }
    }
}

pub struct RoundApi {
    pub shared: Arc<RoundShared>,
    /// Every call must carry the party the proxy authenticated (mutual TLS on).
    pub require_party: bool,
}

impl RoundApi {
    /// The authenticated party of a round call, when there is one.
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<PartyId>, Status> {
        let party = cohort_runtime::calling_party(req)?;
        if party.is_none() && self.require_party {
            return Err(self.shared.refuse(Status::unauthenticated(
                "round calls must come through the proxy with a party certificate",
            )));
        }
        Ok(party)
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::TensorChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::round_server::Round for RoundApi {
    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        req: Request<pb::FetchModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let caller = self.caller(&req)?;
        let token = req.into_inner().task_token;
        let kind = self
            .shared
            .lock_collect()
            .tickets
            .get(&token)
            .map(|t| t.kind);
        let ticket = self
            .shared
            .claim(
                &token,
                kind.unwrap_or(pb::TaskKind::Train),
                false,
                caller.as_ref(),
            )
            .await?;
        tracing::debug!(party = %ticket.party, task = %ticket.task_id, "model fetched");
        let global = self.shared.global();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for chunk in chunk_tensors(&global, CHUNK_BYTES) {
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<pb::SubmitUpdateRequest>>,
    ) -> Result<Response<pb::Ack>, Status> {
        let caller = self.caller(&req)?;
        let mut inbound = req.into_inner();
        let header = match inbound.next().await {
            Some(Ok(pb::SubmitUpdateRequest {
                part: Some(pb::submit_update_request::Part::Header(h)),
            })) => h,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be the update header",
                ));
            }
        };
        let ticket = self
            .shared
            .claim(
                &header.task_token,
                pb::TaskKind::Train,
                true,
                caller.as_ref(),
            )
            .await?;
        let token = header.task_token.clone();
        let result = self
            .receive_update(&token, &ticket, header, &mut inbound)
            .await;
        match &result {
            Ok(_) => self.shared.release(&token, TicketState::Done),
            Err(s) => {
                tracing::warn!(party = %ticket.party, task = %ticket.task_id, error = %s.message(), "update refused");
                self.shared.release(&token, TicketState::Issued);
            }
        }
        result
    }

    async fn submit_evaluation(
        &self,
        req: Request<pb::SubmitEvaluationRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let ticket = self
            .shared
            .claim(&r.task_token, pb::TaskKind::Evaluate, true, caller.as_ref())
            .await?;
        let m = r.metrics.unwrap_or_default();
        let valid = m.samples > 0
            && m.samples <= ticket.samples_cap.max(1) * 4
            && m.loss.is_finite()
            && m.loss >= 0.0
            && (0.0..=1.0).contains(&m.accuracy);
        if !valid {
            self.shared.release(&r.task_token, TicketState::Issued);
            return Err(Status::invalid_argument(
                "metrics: samples must be positive, loss finite and non-negative, accuracy in [0, 1]",
            ));
        }
        {
            let mut c = self.shared.lock_collect();
            c.eval.loss_sum += m.loss * m.samples as f64;
            c.eval.correct_sum += m.accuracy * m.samples as f64;
            c.eval.samples += m.samples;
            c.eval.reports += 1;
            if let Some(t) = c.tickets.get_mut(&r.task_token) {
                t.state = TicketState::Done;
            }
        }
        self.shared.progress.notify_waiters();
        Ok(Response::new(pb::Ack {
            message: "evaluation recorded".into(),
        }))
    }
}

impl RoundApi {
    async fn receive_update(
        &self,
        token: &str,
        ticket: &Ticket,
        header: pb::UpdateHeader,
        inbound: &mut Streaming<pb::SubmitUpdateRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        if header.samples == 0 || header.samples > ticket.samples_cap {
            return Err(Status::invalid_argument(format!(
                "header.samples: {} is outside 1..={} (the samples registered for this dataset)",
                header.samples, ticket.samples_cap
            )));
        }
        let _slot = self
            .shared
            .upload_slots
            .acquire()
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let global = self.shared.global();
        let layout = Layout::of(&global);
        let max = cohort_core::tensor::total_elements(&global);
        let mut asm = TensorAssembler::new(Some(&layout), max);
        while let Some(msg) = inbound.next().await {
            match msg?.part {
                Some(pb::submit_update_request::Part::Chunk(c)) => asm
                    .push(c)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
                Some(pb::submit_update_request::Part::Header(_)) => {
                    return Err(Status::invalid_argument("header sent twice"));
                }
                None => {}
            }
        }
        let delta = asm
            .finish()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let train = header.train.unwrap_or_default();
        {
            let mut c = self.shared.lock_collect();
            if c.round != ticket.round || !c.tickets.contains_key(token) {
                return Err(Status::failed_precondition(
                    "the round ended, or the task was offered again, while the update was uploaded",
                ));
            }
            let agg = c
                .aggregate
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("no round is collecting updates"))?;
            agg.fold(&delta, header.samples)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if train.loss.is_finite() {
                c.train_loss_sum += train.loss * header.samples as f64;
                c.train_samples += header.samples;
            }
        }
        tracing::info!(party = %ticket.party, task = %ticket.task_id, samples = header.samples, "update folded");
        self.shared.progress.notify_waiters();
        Ok(Response::new(pb::Ack {
            message: "update accepted".into(),
        }))
    }
}

pub struct ControlApi {
    pub shared: Arc<RoundShared>,
}

#[tonic::async_trait]
impl pb::coordinator_control_server::CoordinatorControl for ControlApi {
    async fn stop(
        &self,
        req: Request<pb::StopCoordinatorRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let reason = req.into_inner().reason;
        let reason = if reason.is_empty() {
            "stopped".to_string()
        } else {
            reason
        };
        tracing::info!(%reason, "stop requested");
        self.shared.stop.send_replace(Some(reason));
        self.shared.progress.notify_waiters();
        Ok(Response::new(pb::Ack {
            message: "stopping".into(),
        }))
    }
}
