//! Live party sessions, task offers and task tracking.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_core::{Action, PartyId, Scope, random_token};
use cohort_proto::v1 as pb;
use cohort_runtime::{ToStatus, calling_party, calling_principal, now_ms};
use cohort_store::clients::{ClientStore, DatasetEntry, ResourcesEntry, TaskOutcome};
use futures::{Stream, StreamExt};
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};

struct Session {
    id: u64,
    tx: mpsc::Sender<Result<pb::ServerMessage, Status>>,
    datasets: Vec<DatasetEntry>,
    running_tasks: u32,
}

struct TaskInfo {
    party: PartyId,
    job_id: String,
    phase: pb::TaskPhase,
    ended_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<PartyId, Session>,
    offers: HashMap<String, oneshot::Sender<pb::OfferReply>>,
    tasks: HashMap<String, TaskInfo>,
    next_session: u64,
}

pub struct Registry {
    store: Arc<dyn ClientStore>,
    heartbeat_interval: Duration,
    state: Mutex<State>,
}

/// Ended tasks are remembered this long for TaskStates queries.
const TASK_MEMORY: Duration = Duration::from_secs(600);

impl Registry {
    pub fn new(store: Arc<dyn ClientStore>, heartbeat_interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            heartbeat_interval,
            state: Mutex::default(),
        })
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    fn end_session(&self, party: &PartyId, session_id: u64) {
        let dropped = self.with_state(|s| {
            if s.sessions.get(party).is_some_and(|x| x.id == session_id) {
                s.sessions.remove(party);
                let mut failed = 0;
                for t in s.tasks.values_mut() {
                    if &t.party == party && t.phase == pb::TaskPhase::Running {
                        t.phase = pb::TaskPhase::Failed;
                        t.ended_at = Some(Instant::now());
                        failed += 1;
                    }
                }
                Some(failed)
            } else {
                None
            }
        });
        if let Some(failed) = dropped {
            tracing::info!(party = %party, failed_tasks = failed, "party disconnected");
        }
    }

    /// Tells a revoked party's live session why, then ends it.
    fn end_revoked_session(&self, party: &PartyId) {
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

    async fn handle_message(&self, party: &PartyId, session_id: u64, msg: pb::PartyMessage) {
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
                if let Some(waiter) = self.with_state(|s| s.offers.remove(&reply.offer_id)) {
                    let _ = waiter.send(reply);
                }
            }
            Some(pb::party_message::Kind::TaskStatus(status)) => {
                let phase =
                    pb::TaskPhase::try_from(status.phase).unwrap_or(pb::TaskPhase::Unspecified);
                let known = self.with_state(|s| match s.tasks.get_mut(&status.task_id) {
                    Some(t) if &t.party == party => {
                        t.phase = phase;
                        if phase != pb::TaskPhase::Running {
                            t.ended_at = Some(Instant::now());
                        }
                        true
                    }
                    _ => false,
                });
                if !known {
                    tracing::debug!(party = %party, task = %status.task_id, "status for an unknown task");
                    return;
                }
                let outcome = match phase {
                    pb::TaskPhase::Succeeded => Some(TaskOutcome::Succeeded),
                    pb::TaskPhase::Failed => Some(TaskOutcome::Failed),
                    _ => None,
                };
                if phase == pb::TaskPhase::Failed {
                    tracing::warn!(party = %party, task = %status.task_id, message = %status.message, "task failed");
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

    async fn offer_one(
        self: &Arc<Self>,
        party: PartyId,
        tx: mpsc::Sender<Result<pb::ServerMessage, Status>>,
        mut task: pb::Task,
        samples: u64,
        timeout: Duration,
    ) -> Result<pb::AcceptedTask, (PartyId, String)> {
        let offer_id = random_token(12);
        task.task_id = format!("{}-r{}-{}", task.job_id, task.round, random_token(4));
        task.party = party.to_string();
        task.seed = rand::random();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.with_state(|s| s.offers.insert(offer_id.clone(), reply_tx));
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
        if tx.send(Ok(offer)).await.is_err() {
            self.with_state(|s| s.offers.remove(&offer_id));
            return Err((party, "disconnected".to_string()));
        }
        let reply = tokio::time::timeout(timeout, reply_rx).await;
        self.with_state(|s| s.offers.remove(&offer_id));
        match reply {
            Ok(Ok(r)) if r.accepted => {
                self.with_state(|s| {
                    s.tasks.insert(
                        task.task_id.clone(),
                        TaskInfo {
                            party: party.clone(),
                            job_id: task.job_id.clone(),
                            phase: pb::TaskPhase::Running,
                            ended_at: None,
                        },
                    )
                });
                let _ = self.store.count_task(&party, TaskOutcome::Accepted).await;
                Ok(pb::AcceptedTask {
                    party: party.to_string(),
                    task_id: task.task_id,
                    task_token: task.task_token,
                    samples,
                })
            }
            Ok(Ok(r)) => Err((party, format!("refused: {}", r.reason))),
            Ok(Err(_)) => Err((party, "disconnected".to_string())),
            Err(_) => Err((party, format!("no answer within {timeout:?}"))),
        }
    }
}

type ServerStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

pub struct SessionApi {
    pub registry: Arc<Registry>,
}

fn validate_register(
    r: pb::Register,
) -> Result<(PartyId, Vec<DatasetEntry>, ResourcesEntry), Status> {
    let party = PartyId::parse(&r.party)
        .map_err(|e| Status::invalid_argument(format!("register.party: {e}")))?;
    let mut datasets = Vec::new();
    for (i, d) in r.datasets.into_iter().enumerate() {
        if d.name.is_empty() || d.samples == 0 || d.features == 0 || d.classes < 2 {
            return Err(Status::invalid_argument(format!(
                "register.datasets[{i}]: name, samples > 0, features > 0 and classes >= 2 are required"
            )));
        }
        if datasets.iter().any(|x: &DatasetEntry| x.name == d.name) {
            return Err(Status::invalid_argument(format!(
                "register.datasets[{i}]: {:?} listed twice",
                d.name
            )));
        }
        datasets.push(DatasetEntry {
            name: d.name,
            samples: d.samples,
            features: d.features,
            classes: d.classes,
        });
    }
    let res = r.resources.unwrap_or_default();
    Ok((
        party,
        datasets,
        ResourcesEntry {
            cpus: res.cpus,
            memory_bytes: res.memory_bytes,
            gpus: res.gpus,
            max_tasks: res.max_tasks,
        },
    ))
}

#[tonic::async_trait]
impl pb::party_session_server::PartySession for SessionApi {
    type OpenStream = ServerStream;

    async fn open(
        &self,
        req: Request<Streaming<pb::PartyMessage>>,
    ) -> Result<Response<ServerStream>, Status> {
        let certified = calling_party(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within 10s"))?
            .ok_or_else(|| Status::invalid_argument("stream ended before Register"))??;
        let Some(pb::party_message::Kind::Register(register)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be Register",
            ));
        };
        let (party, datasets, resources) = validate_register(register)?;
        if let Some(certified) = &certified
            && certified != &party
        {
            tracing::warn!(certified = %certified, claimed = %party, "party registering under another name");
            return Err(Status::permission_denied(format!(
                "register.party: the client certificate is party {certified}'s, not {party}'s"
            )));
        }
        let registry = self.registry.clone();
        match registry.store.get_client(&party).await {
            Ok(c) if c.revoked_at_ms.is_some() => {
                tracing::warn!(party = %party, "revoked party refused");
                return Err(Status::permission_denied(format!(
                    "party {party} is revoked"
                )));
            }
            Ok(_) | Err(cohort_store::StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.to_status()),
        }
        registry
            .store
            .upsert_client(&party, &datasets, &resources, now_ms())
            .await
            .map_err(|e| e.to_status())?;
        let (tx, rx) = mpsc::channel(64);
        let session_id = registry.with_state(|s| {
            s.next_session += 1;
            let id = s.next_session;
            // A party that reconnects replaces its old session; dropping the old
            // sender ends that stream.
            s.sessions.insert(
                party.clone(),
                Session {
                    id,
                    tx: tx.clone(),
                    datasets: datasets.clone(),
                    running_tasks: 0,
                },
            );
            id
        });
        tracing::info!(party = %party, datasets = datasets.len(), "party registered");
        let registered = pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Registered(pb::Registered {
                party: party.to_string(),
                heartbeat_interval_ms: registry.heartbeat_interval.as_millis() as u32,
            })),
        };
        tx.send(Ok(registered))
            .await
            .map_err(|_| Status::cancelled("session closed"))?;
        let silence = registry.heartbeat_interval * 3;
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(silence, inbound.next()).await {
                    Ok(Some(Ok(msg))) => registry.handle_message(&party, session_id, msg).await,
                    Ok(Some(Err(status))) => {
                        tracing::debug!(party = %party, status = %status.message(), "session stream broke");
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        tracing::warn!(party = %party, "no heartbeat for {silence:?}; ending session");
                        break;
                    }
                }
            }
            registry.end_session(&party, session_id);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

pub struct SelectorApi {
    pub registry: Arc<Registry>,
}

#[tonic::async_trait]
impl pb::client_selector_server::ClientSelector for SelectorApi {
    async fn revoke_client(
        &self,
        req: Request<pb::RevokeClientRequest>,
    ) -> Result<Response<pb::ClientInfo>, Status> {
        if let Some(p) = calling_principal(&req)? {
            p.authorize_scope(&Scope::All, Action::Administer)
                .map_err(|e| {
                    Status::permission_denied(format!(
                        "{e}: revoking a party needs an admin token for every namespace (\"*\")"
                    ))
                })?;
        }
        let party = PartyId::parse(&req.get_ref().party)
            .map_err(|e| Status::invalid_argument(format!("party: {e}")))?;
        let record = self
            .registry
            .store
            .revoke_client(&party, now_ms())
            .await
            .map_err(|e| e.to_status())?;
        tracing::warn!(party = %party, "party revoked");
        self.registry.end_revoked_session(&party);
        Ok(Response::new(client_info(record, &HashMap::new())))
    }

    async fn list_revoked(
        &self,
        _req: Request<pb::ListRevokedRequest>,
    ) -> Result<Response<pb::ListRevokedResponse>, Status> {
        let revoked = self
            .registry
            .store
            .list_revoked()
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ListRevokedResponse {
            parties: revoked.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn list_clients(
        &self,
        req: Request<pb::ListClientsRequest>,
    ) -> Result<Response<pb::ListClientsResponse>, Status> {
        if let Some(p) = calling_principal(&req)? {
            p.authorize_scope(&p.scope, Action::Read)
                .map_err(|e| e.to_status())?;
        }
        let records = self
            .registry
            .store
            .list_clients()
            .await
            .map_err(|e| e.to_status())?;
        let live: HashMap<PartyId, u32> = self.registry.with_state(|s| {
            s.sessions
                .iter()
                .map(|(p, sess)| (p.clone(), sess.running_tasks))
                .collect()
        });
        let clients = records.into_iter().map(|c| client_info(c, &live)).collect();
        Ok(Response::new(pb::ListClientsResponse { clients }))
    }

    async fn describe_dataset(
        &self,
        req: Request<pb::DescribeDatasetRequest>,
    ) -> Result<Response<pb::DatasetSummary>, Status> {
        let name = req.into_inner().name;
        let holders: Vec<DatasetEntry> = self.registry.with_state(|s| {
            s.sessions
                .values()
                .filter_map(|sess| sess.datasets.iter().find(|d| d.name == name).cloned())
                .collect()
        });
        let Some(first) = holders.first() else {
            return Err(Status::not_found(format!(
                "no connected party holds dataset {name:?}"
            )));
        };
        if let Some(other) = holders
            .iter()
            .find(|d| d.features != first.features || d.classes != first.classes)
        {
            return Err(Status::failed_precondition(format!(
                "parties disagree on dataset {name:?}: {} features/{} classes vs {} features/{} classes",
                first.features, first.classes, other.features, other.classes
            )));
        }
        Ok(Response::new(pb::DatasetSummary {
            name,
            parties: holders.len() as u32,
            samples: holders.iter().map(|d| d.samples).sum(),
            features: first.features,
            classes: first.classes,
        }))
    }

    async fn offer_tasks(
        &self,
        req: Request<pb::OfferTasksRequest>,
    ) -> Result<Response<pb::OfferTasksResponse>, Status> {
        let r = req.into_inner();
        let template = r
            .template
            .ok_or_else(|| Status::invalid_argument("template: missing"))?;
        if r.count == 0 {
            return Err(Status::invalid_argument("count: must be at least 1"));
        }
        if r.task_tokens.len() < r.count as usize || r.task_tokens.iter().any(|t| t.len() < 32) {
            return Err(Status::invalid_argument(
                "task_tokens: one token of at least 32 characters per party offered is required",
            ));
        }
        if r.selection != "random" && !r.selection.is_empty() {
            return Err(Status::invalid_argument(format!(
                "selection: {:?} is not supported yet",
                r.selection
            )));
        }
        let timeout = Duration::from_millis(u64::from(r.reply_timeout_ms.clamp(100, 60_000)));
        let mut candidates: Vec<(PartyId, mpsc::Sender<_>, u64)> = self.registry.with_state(|s| {
            s.tasks
                .retain(|_, t| t.ended_at.is_none_or(|at| at.elapsed() < TASK_MEMORY));
            s.sessions
                .iter()
                .filter(|(p, _)| !r.exclude.iter().any(|e| e == p.as_str()))
                .filter_map(|(p, sess)| {
                    sess.datasets
                        .iter()
                        .find(|d| d.name == r.dataset)
                        .map(|d| (p.clone(), sess.tx.clone(), d.samples))
                })
                .collect()
        });
        candidates.shuffle(&mut rand::rng());
        candidates.truncate(r.count as usize);
        let mut task = template;
        task.job_id = r.job_id.clone();
        task.round = r.round;
        task.kind = r.kind;
        task.dataset = r.dataset.clone();
        let offers =
            candidates
                .into_iter()
                .zip(r.task_tokens)
                .map(|((party, tx, samples), token)| {
                    let registry = self.registry.clone();
                    let mut task = task.clone();
                    task.task_token = token;
                    async move { registry.offer_one(party, tx, task, samples, timeout).await }
                });
        let mut resp = pb::OfferTasksResponse::default();
        for result in futures::future::join_all(offers).await {
            match result {
                Ok(a) => resp.accepted.push(a),
                Err((party, why)) => {
                    resp.refused.insert(party.to_string(), why);
                }
            }
        }
        tracing::info!(job = %r.job_id, round = r.round, accepted = resp.accepted.len(), refused = resp.refused.len(), "tasks offered");
        Ok(Response::new(resp))
    }

    async fn task_states(
        &self,
        req: Request<pb::TaskStatesRequest>,
    ) -> Result<Response<pb::TaskStatesResponse>, Status> {
        let ids = req.into_inner().task_ids;
        let phases = self.registry.with_state(|s| {
            ids.into_iter()
                .map(|id| {
                    let phase = s
                        .tasks
                        .get(&id)
                        .map(|t| t.phase)
                        .unwrap_or(pb::TaskPhase::Unspecified);
                    (id, phase as i32)
                })
                .collect()
        });
        Ok(Response::new(pb::TaskStatesResponse { phases }))
    }

    async fn cancel_job_tasks(
        &self,
        req: Request<pb::CancelJobTasksRequest>,
    ) -> Result<Response<pb::CancelJobTasksResponse>, Status> {
        let r = req.into_inner();
        let targets: Vec<(String, mpsc::Sender<_>)> = self.registry.with_state(|s| {
            let mut out = Vec::new();
            let State {
                tasks, sessions, ..
            } = s;
            for (id, t) in tasks.iter_mut() {
                if t.job_id == r.job_id && t.phase == pb::TaskPhase::Running {
                    t.phase = pb::TaskPhase::Cancelled;
                    t.ended_at = Some(Instant::now());
                    if let Some(sess) = sessions.get(&t.party) {
                        out.push((id.clone(), sess.tx.clone()));
                    }
                }
            }
            out
        });
        let cancelled = targets.len() as u32;
        for (task_id, tx) in targets {
            let msg = pb::ServerMessage {
                kind: Some(pb::server_message::Kind::Cancel(pb::Cancel {
                    task_id,
                    reason: r.reason.clone(),
                })),
            };
            let _ = tx.send(Ok(msg)).await;
        }
        Ok(Response::new(pb::CancelJobTasksResponse { cancelled }))
    }
}

fn client_info(
    c: cohort_store::clients::ClientRecord,
    live: &HashMap<PartyId, u32>,
) -> pb::ClientInfo {
    pb::ClientInfo {
        connected: live.contains_key(&c.party),
        running_tasks: live.get(&c.party).copied().unwrap_or(0),
        party: c.party.to_string(),
        datasets: c
            .datasets
            .into_iter()
            .map(|d| pb::DatasetInfo {
                name: d.name,
                samples: d.samples,
                features: d.features,
                classes: d.classes,
            })
            .collect(),
        resources: Some(pb::Resources {
            cpus: c.resources.cpus,
            memory_bytes: c.resources.memory_bytes,
            gpus: c.resources.gpus,
            max_tasks: c.resources.max_tasks,
        }),
        last_seen_ms: c.last_seen_ms,
        tasks_offered: c.stats.tasks_offered,
        tasks_succeeded: c.stats.tasks_succeeded,
        tasks_failed: c.stats.tasks_failed,
        revoked: c.revoked_at_ms.is_some(),
        revoked_at_ms: c.revoked_at_ms.unwrap_or(0),
    }
}
