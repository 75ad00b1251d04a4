//! The gRPC edge: parties' sessions (PartySession) and the coordinator- and
//! operator-facing ClientSelector API, over the state in `registry.rs`.
//! Registrations are validated here, against the configured limits.
//!
//! Registering reads and writes the clients store (a revoked party must be
//! refused, so with the store down a registration fails UNAVAILABLE); once a
//! session is open, nothing it does waits on the store.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cohort_core::{Action, PartyId, Scope};
use cohort_proto::v1 as pb;
use cohort_runtime::audit::{self, Actor, AuditClient};
use cohort_runtime::{ToStatus, calling_party, calling_principal, now_ms};
use cohort_store::clients::{DatasetEntry, ResourcesEntry};
use futures::{Stream, StreamExt};
use rand::SeedableRng as _;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::registry::{
    Free, Joining, MAX_DATASET_NAME, MAX_GPU_NAME_BYTES, MAX_LISTED_TASKS, MAX_TASK_ID_BYTES,
    RegistrationLimits, Registry, choose, is_dataset_name, majority_shape,
};
use crate::selection::{Pick, draw_seed, reliability_score};

type ServerStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

pub struct SessionApi {
    pub registry: Arc<Registry>,
}

/// A party's registration, validated.
struct Registration {
    party: PartyId,
    datasets: Vec<DatasetEntry>,
    resources: ResourcesEntry,
    free: Option<pb::FreeResources>,
    gpu_devices: Vec<pb::GpuInfo>,
    /// The tasks it says it still runs.
    running_tasks: HashSet<String>,
}

/// `r` checked against `limits`: what a party claims is bounded, and a
/// refusal names the field at fault.
fn validate_register(r: pb::Register, limits: &RegistrationLimits) -> Result<Registration, Status> {
    let party = PartyId::parse(&r.party)
        .map_err(|e| Status::invalid_argument(format!("register.party: {e}")))?;
    let invalid = |field: String, message: String| {
        Status::invalid_argument(format!("register.{field}: {message}"))
    };
    if r.datasets.len() > limits.max_datasets {
        return Err(invalid(
            "datasets".into(),
            format!(
                "{} datasets is over the limit of {} per party",
                r.datasets.len(),
                limits.max_datasets
            ),
        ));
    }
    let mut datasets = Vec::new();
    for (i, d) in r.datasets.into_iter().enumerate() {
        let field = |name: &str| format!("datasets[{i}].{name}");
        if !is_dataset_name(&d.name) {
            return Err(invalid(
                field("name"),
                format!("must be 1 to {MAX_DATASET_NAME} letters, digits, '-', '_' or '.'"),
            ));
        }
        if d.samples == 0 || d.samples > limits.max_samples {
            return Err(invalid(
                field("samples"),
                format!(
                    "{} is not between 1 and the limit of {}",
                    d.samples, limits.max_samples
                ),
            ));
        }
        if d.features == 0 || d.features > limits.max_features {
            return Err(invalid(
                field("features"),
                format!(
                    "{} is not between 1 and the limit of {}",
                    d.features, limits.max_features
                ),
            ));
        }
        if d.classes < 2 || d.classes > limits.max_classes {
            return Err(invalid(
                field("classes"),
                format!(
                    "{} is not between 2 and the limit of {}",
                    d.classes, limits.max_classes
                ),
            ));
        }
        if datasets.iter().any(|x: &DatasetEntry| x.name == d.name) {
            return Err(invalid(field("name"), format!("{:?} listed twice", d.name)));
        }
        datasets.push(DatasetEntry {
            name: d.name,
            samples: d.samples,
            features: d.features,
            classes: d.classes,
        });
    }
    if r.running_tasks.len() > MAX_LISTED_TASKS {
        return Err(invalid(
            "running_tasks".into(),
            format!(
                "{} task ids is over the limit of {MAX_LISTED_TASKS}",
                r.running_tasks.len()
            ),
        ));
    }
    if let Some(i) = r
        .running_tasks
        .iter()
        .position(|id| id.len() > MAX_TASK_ID_BYTES)
    {
        return Err(invalid(
            format!("running_tasks[{i}]"),
            format!("longer than {MAX_TASK_ID_BYTES} bytes"),
        ));
    }
    let res = r.resources.unwrap_or_default();
    for (field, value, limit) in [
        ("cpus", u64::from(res.cpus), u64::from(limits.max_cpus)),
        ("memory_bytes", res.memory_bytes, limits.max_memory_bytes),
        ("gpus", u64::from(res.gpus), u64::from(limits.max_gpus)),
        (
            "max_tasks",
            u64::from(res.max_tasks),
            u64::from(limits.max_tasks),
        ),
    ] {
        if value > limit {
            return Err(invalid(
                format!("resources.{field}"),
                format!("{value} is over the limit of {limit}"),
            ));
        }
    }
    if res.gpu_devices.len() > res.gpus as usize {
        return Err(invalid(
            "resources.gpu_devices".into(),
            format!(
                "{} GPUs described but gpus is {}",
                res.gpu_devices.len(),
                res.gpus
            ),
        ));
    }
    if let Some(i) = res
        .gpu_devices
        .iter()
        .position(|g| g.name.len() > MAX_GPU_NAME_BYTES)
    {
        return Err(invalid(
            format!("resources.gpu_devices[{i}].name"),
            format!("longer than {MAX_GPU_NAME_BYTES} bytes"),
        ));
    }
    Ok(Registration {
        party,
        datasets,
        resources: ResourcesEntry {
            cpus: res.cpus,
            memory_bytes: res.memory_bytes,
            gpus: res.gpus,
            max_tasks: res.max_tasks,
        },
        free: res.free,
        gpu_devices: res.gpu_devices,
        running_tasks: r.running_tasks.into_iter().collect(),
    })
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
        let Registration {
            party,
            datasets,
            resources,
            free,
            gpu_devices,
            running_tasks,
        } = validate_register(register, &self.registry.settings().limits).inspect_err(|e| {
            // Logged once here; the party is told why.
            let certified = certified.as_ref().map_or("", PartyId::as_str);
            tracing::warn!(certified, error = %e.message(), "registration refused");
        })?;
        if let Some(certified) = &certified
            && certified != &party
        {
            tracing::warn!(certified = %certified, claimed = %party, "party registering under another name");
            return Err(Status::permission_denied(format!(
                "register.party: the client certificate is party {certified}'s, not {party}'s"
            )));
        }
        let registry = self.registry.clone();
        // Both stay synchronous: a revoked party must be refused, and the
        // party must be recorded before its counters are written.
        match registry.store().get_client(&party).await {
            Ok(c) if c.revoked_at_ms.is_some() => {
                tracing::warn!(party = %party, "revoked party refused");
                return Err(Status::permission_denied(format!(
                    "party {party} is revoked"
                )));
            }
            Ok(_) | Err(cohort_store::StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.to_status()),
        }
        let record = registry
            .store()
            .upsert_client(&party, &datasets, &resources, now_ms())
            .await
            .map_err(|e| e.to_status())?;
        let (tx, rx) = mpsc::channel(64);
        let dataset_count = datasets.len();
        let joining = Joining {
            datasets,
            resources,
            free,
            gpu_devices,
            reliability: record.reliability,
        };
        let (session_id, tasks) = registry.add_session(&party, tx.clone(), joining, &running_tasks);
        tracing::info!(
            party = %party,
            datasets = dataset_count,
            kept_tasks = tasks.kept,
            failed_tasks = tasks.failed,
            "party registered"
        );
        if tasks.ignored > 0 {
            tracing::warn!(party = %party, ignored = tasks.ignored, "party listed running tasks that are unknown or not its own; ignored");
        }
        let registered = pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Registered(pb::Registered {
                party: party.to_string(),
                heartbeat_interval_ms: registry.settings().heartbeat_interval.as_millis() as u32,
            })),
        };
        tx.send(Ok(registered))
            .await
            .map_err(|_| Status::cancelled("session closed"))?;
        if !tasks.cancels.is_empty() {
            // From a task: the stream reaches the party only once this
            // handler returns, and its queue holds 64 messages.
            let tx = tx.clone();
            tokio::spawn(async move {
                for (task_id, reason) in tasks.cancels {
                    let msg = pb::ServerMessage {
                        kind: Some(pb::server_message::Kind::Cancel(pb::Cancel {
                            task_id,
                            reason,
                        })),
                    };
                    match tokio::time::timeout(CANCEL_SEND_TIMEOUT, tx.send(Ok(msg))).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
            });
        }
        let silence = registry.settings().heartbeat_interval * 3;
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(silence, inbound.next()).await {
                    Ok(Some(Ok(msg))) => registry.handle_message(&party, session_id, msg),
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

    /// Registers nothing: tells a party (`cohort check`) who the server takes it for and
    /// the time. The proxy already refused a party on its revoked list; the store decides
    /// here too, as it does for Register, since the proxy's list is reloaded periodically.
    async fn check(
        &self,
        req: Request<pb::PartyCheckRequest>,
    ) -> Result<Response<pb::PartyCheckResponse>, Status> {
        let Some(party) = calling_party(&req)? else {
            return Err(Status::unauthenticated(
                "no party certificate came with the call: the proxy admits party APIs only \
                 with one (cohort cert issue --party NAME)",
            ));
        };
        match self.registry.store().get_client(&party).await {
            Ok(c) if c.revoked_at_ms.is_some() => {
                return Err(Status::permission_denied(format!(
                    "party {party} is revoked"
                )));
            }
            Ok(_) | Err(cohort_store::StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.to_status()),
        }
        Ok(Response::new(pb::PartyCheckResponse {
            party: party.to_string(),
            server_time_ms: now_ms(),
        }))
    }
}

/// Most task results one RecordTaskResults may carry.
const MAX_RESULTS_PER_CALL: usize = 10_000;

/// How long a Cancel may wait for room in a party's session queue.
const CANCEL_SEND_TIMEOUT: Duration = Duration::from_secs(2);

pub struct SelectorApi {
    pub registry: Arc<Registry>,
    /// Where revocations are recorded (job-scheduler's audit log; without
    /// `--job-scheduler`, nowhere, which every revocation logs as an error).
    pub audit: AuditClient,
}

impl SelectorApi {
    async fn revoke_client_audited(
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
            .store()
            .revoke_client(&party, now_ms())
            .await
            .map_err(|e| e.to_status())?;
        tracing::warn!(party = %party, "party revoked");
        self.registry.end_revoked_session(&party);
        Ok(Response::new(client_info(record, &HashMap::new())))
    }
}

#[tonic::async_trait]
impl pb::client_selector_server::ClientSelector for SelectorApi {
    async fn revoke_client(
        &self,
        req: Request<pb::RevokeClientRequest>,
    ) -> Result<Response<pb::ClientInfo>, Status> {
        let actor = Actor::of(&req);
        let party = req.get_ref().party.clone();
        let result = self.revoke_client_audited(req).await;
        // A revocation takes effect whether or not it could be recorded
        // (refusing it because the audit log is away would keep a party in
        // that should be out). Parties belong to no namespace; only "*"
        // admins revoke them.
        self.audit
            .record(audit::entry(
                &actor,
                "party.revoke",
                "party",
                &party,
                Scope::ALL,
                &result,
            ))
            .await;
        result
    }

    async fn probe_parties(
        &self,
        req: Request<pb::ProbePartiesRequest>,
    ) -> Result<Response<pb::ProbePartiesResponse>, Status> {
        if let Some(p) = calling_principal(&req)? {
            p.authorize_scope(&Scope::All, Action::Administer)
                .map_err(|e| {
                    Status::permission_denied(format!(
                        "{e}: probing the parties needs an admin token for every namespace (\"*\")"
                    ))
                })?;
        }
        let timeout = match req.get_ref().timeout_ms {
            0 => crate::probes::DEFAULT_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)).min(crate::probes::MAX_TIMEOUT),
        };
        let parties = self.registry.probe_parties(timeout).await;
        let answered = parties.iter().filter(|p| p.answered).count();
        tracing::info!(parties = parties.len(), answered, "parties probed");
        Ok(Response::new(pb::ProbePartiesResponse { parties }))
    }

    async fn list_revoked(
        &self,
        _req: Request<pb::ListRevokedRequest>,
    ) -> Result<Response<pb::ListRevokedResponse>, Status> {
        let revoked = self
            .registry
            .store()
            .list_revoked()
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ListRevokedResponse {
            parties: revoked.iter().map(ToString::to_string).collect(),
        }))
    }

    /// Parties as the store has them, with whether each is connected now.
    /// Last-seen times and task counters are written in the background
    /// (`bookkeeping.rs`): they may lag a moment behind, and for as long as
    /// the store is unavailable.
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
            .store()
            .list_clients()
            .await
            .map_err(|e| e.to_status())?;
        let live = self.registry.live();
        let gpu_devices = self.registry.gpu_devices();
        let mut clients: Vec<pb::ClientInfo> =
            records.into_iter().map(|c| client_info(c, &live)).collect();
        // A connected party's GPUs as it described them (kept with its session, not stored).
        for c in &mut clients {
            if let (Some(res), Some(gpus)) = (c.resources.as_mut(), gpu_devices.get(&c.party)) {
                res.gpu_devices = gpus.clone();
            }
        }
        Ok(Response::new(pb::ListClientsResponse { clients }))
    }

    async fn describe_dataset(
        &self,
        req: Request<pb::DescribeDatasetRequest>,
    ) -> Result<Response<pb::DatasetSummary>, Status> {
        let name = req.into_inner().name;
        let holders = self.registry.holders(&name);
        // Parties that disagree on the shape are listed, not an error: the
        // coordinator leaves out those that do not fit the job's model.
        let Some((features, classes)) = majority_shape(&holders) else {
            return Err(Status::not_found(format!(
                "no connected party holds dataset {name:?}"
            )));
        };
        Ok(Response::new(pb::DatasetSummary {
            name,
            parties: holders.len() as u32,
            samples: holders
                .iter()
                .fold(0u64, |sum, h| sum.saturating_add(h.dataset.samples)),
            features,
            classes,
            holders: holders
                .into_iter()
                .map(|h| pb::DatasetHolder {
                    party: h.party.to_string(),
                    samples: h.dataset.samples,
                    features: h.dataset.features,
                    classes: h.dataset.classes,
                })
                .collect(),
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
        let Some(pick) = Pick::parse(&r.selection) else {
            return Err(Status::invalid_argument(format!(
                "selection: {:?} is not one of random, data, resource, reliability",
                r.selection
            )));
        };
        let timeout = Duration::from_millis(u64::from(r.reply_timeout_ms.clamp(100, 60_000)));
        // A seeded job draws the same parties from the same candidates on every run.
        let mut rng = match template.seed {
            0 => rand::rngs::StdRng::from_rng(&mut rand::rng()),
            seed => rand::rngs::StdRng::seed_from_u64(draw_seed(seed, r.kind)),
        };
        // A party whose data does not have the job's shape is never offered
        // its tasks.
        // Nor is one without the free GPUs a `training.device: cuda` job asks for.
        let (fit, without_gpu) = crate::placement::split_by_gpus(
            self.registry
                .candidates(&r.dataset, &r.exclude, r.features, r.classes),
            r.gpus,
            |c| c.traits.capacity.gpus,
        );
        let candidates = choose(pick, fit, r.count as usize, &mut rng);
        let selected: Vec<pb::PartyScore> = candidates
            .iter()
            .map(|(c, score)| pb::PartyScore {
                party: c.party.to_string(),
                score: *score,
            })
            .collect();
        let mut task = template;
        task.job_id = r.job_id.clone();
        task.round = r.round;
        task.kind = r.kind;
        task.dataset = r.dataset.clone();
        let offers = candidates
            .into_iter()
            .zip(r.task_tokens)
            .map(|((candidate, _), token)| {
                let registry = self.registry.clone();
                let mut task = task.clone();
                task.task_token = token;
                async move { registry.offer_one(candidate, task, timeout).await }
            });
        let mut resp = pb::OfferTasksResponse {
            selected,
            refused: without_gpu
                .into_iter()
                .map(|(c, why)| (c.party.to_string(), why))
                .collect(),
            ..Default::default()
        };
        for result in futures::future::join_all(offers).await {
            match result {
                Ok(a) => resp.accepted.push(a),
                Err((party, why)) => {
                    resp.refused.insert(party.to_string(), why);
                }
            }
        }
        tracing::info!(job = %r.job_id, round = r.round, selection = pick.as_str(), accepted = resp.accepted.len(), refused = resp.refused.len(), "tasks offered");
        Ok(Response::new(resp))
    }

    async fn record_task_results(
        &self,
        req: Request<pb::RecordTaskResultsRequest>,
    ) -> Result<Response<pb::RecordTaskResultsResponse>, Status> {
        // Server-internal (the proxy refuses it): a user or party never writes a record.
        if calling_principal(&req)?.is_some() || calling_party(&req)?.is_some() {
            return Err(Status::permission_denied(
                "task results are recorded by coordinators only",
            ));
        }
        let r = req.into_inner();
        if r.results.len() > MAX_RESULTS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "results: {} is over the limit of {MAX_RESULTS_PER_CALL}",
                r.results.len()
            )));
        }
        let (recorded, ignored) = self
            .registry
            .record_results(&r.job_id, &r.results)
            .await
            .map_err(|e| e.to_status())?;
        if ignored > 0 {
            tracing::info!(job = %r.job_id, round = r.round, ignored, "task results not recorded: not this job's training tasks for the party named, recorded already, or forgotten");
        }
        tracing::debug!(job = %r.job_id, round = r.round, recorded, "task results recorded");
        Ok(Response::new(pb::RecordTaskResultsResponse {
            recorded: u32::try_from(recorded).unwrap_or(u32::MAX),
            ignored: u32::try_from(ignored).unwrap_or(u32::MAX),
        }))
    }

    async fn task_states(
        &self,
        req: Request<pb::TaskStatesRequest>,
    ) -> Result<Response<pb::TaskStatesResponse>, Status> {
        let (phases, messages) = self.registry.task_states(req.into_inner().task_ids);
        Ok(Response::new(pb::TaskStatesResponse { phases, messages }))
    }

    async fn cancel_job_tasks(
        &self,
        req: Request<pb::CancelJobTasksRequest>,
    ) -> Result<Response<pb::CancelJobTasksResponse>, Status> {
        let r = req.into_inner();
        let (cancelled, targets) = self.registry.cancel_job(&r.job_id, &r.reason);
        let cancelled = u32::try_from(cancelled).unwrap_or(u32::MAX);
        let sends = targets.into_iter().map(|(task_id, tx)| {
            let msg = pb::ServerMessage {
                kind: Some(pb::server_message::Kind::Cancel(pb::Cancel {
                    task_id,
                    reason: r.reason.clone(),
                })),
            };
            // A party that does not read its stream must not hold the caller.
            tokio::time::timeout(CANCEL_SEND_TIMEOUT, async move {
                let _ = tx.send(Ok(msg)).await;
            })
        });
        futures::future::join_all(sends).await;
        Ok(Response::new(pb::CancelJobTasksResponse { cancelled }))
    }
}

fn client_info(
    c: cohort_store::clients::ClientRecord,
    live: &HashMap<PartyId, (u32, Option<Free>)>,
) -> pb::ClientInfo {
    let (running_tasks, free) = live.get(&c.party).copied().unwrap_or((0, None));
    let r = &c.reliability;
    pb::ClientInfo {
        connected: live.contains_key(&c.party),
        running_tasks,
        reliability: Some(pb::Reliability {
            finished: r.finished,
            failed: r.failed,
            timed_out: r.timed_out,
            score: reliability_score(r),
            last_result_ms: r.last_result_ms,
        }),
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
            // What a connected party last said is free.
            free: free.map(|f| pb::FreeResources {
                cpu_millis: u32::try_from(f.cpu_millis).unwrap_or(u32::MAX),
                memory_bytes: f.memory_bytes,
                gpus: f.gpus,
            }),
            gpu_devices: Vec::new(),
        }),
        last_seen_ms: c.last_seen_ms,
        tasks_offered: c.stats.tasks_offered,
        tasks_succeeded: c.stats.tasks_succeeded,
        tasks_failed: c.stats.tasks_failed,
        revoked: c.revoked_at_ms.is_some(),
        revoked_at_ms: c.revoked_at_ms.unwrap_or(0),
    }
}
