//! model-manager: Cohort's model registry. Serves `cohort.v1.Models`: named
//! models with immutable, numbered, sha256-addressed safetensors versions and
//! their lineage (job, round, parent), uploaded and downloaded as chunk streams.
//!
//! A job stores one version per round: an upload naming a (job, round) the
//! model already has a version of (a retry after a lost answer) is checked
//! as ever, but its data is not kept, and the stored version is the answer.
//!
//! Models are identified by namespace and name. A caller with an API token of
//! one namespace (identity metadata the proxy sets) works in that namespace
//! only: other namespaces answer like missing models. A token of every
//! namespace, or a server-internal caller (no metadata), names the namespace
//! in the request (default `default`). Coordinators act for their job's
//! namespace: a call from the `coordinator` service certificate must carry
//! that metadata.
//!
//! Uploads are bounded (`UploadLimits`): bytes per upload, safetensors header
//! bytes (the only part buffered), uploads at once, the wait for a slot, and
//! how long an upload may send nothing.
//!
//! An upload by a user (an API token the proxy checked) is recorded in
//! job-scheduler's audit log through `--job-scheduler` (`RecordAudit`),
//! refusals included: action `model.upload`, object `NAME@VERSION` (the
//! name alone when no version was made), in the model's namespace, or the
//! caller's own when the one it named is out of its reach. Coordinators'
//! checkpoints are not: they act for a job, one upload per round, and the
//! job's log and lineage already say what they stored.
//!
//! Metadata lives in a `ModelStore`, bytes in a `BlobStore` (under `models/`
//! of the blob URL). Must not depend on other services' crates or tables.

mod check;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cohort_blob::{BlobError, BlobStore, ByteStream, Digest};
use cohort_core::{Action, AuthError, Principal};
use cohort_proto::v1::models_server::{Models, ModelsServer};
use cohort_proto::v1::upload_version_request::Part;
use cohort_proto::v1::{
    DataChunk, GetVersionRequest, Lineage, ListVersionsRequest, ListVersionsResponse, Metrics,
    ModelVersion, UploadVersionRequest,
};
use cohort_runtime::audit::{self, Actor, AuditClient};
use cohort_runtime::{Listener, RuntimeError, Tls, ToStatus, calling_principal, peer_identity};
use cohort_security::Identity;
use cohort_store::StoreError;
use cohort_store::models::{ModelStore, ModelVersionRecord, NewModelVersion, version_not_found};
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tonic::{Request, Response, Status, Streaming};

use crate::check::{Refusal, SAFETENSORS_MAX_HEADER_LEN, SafetensorsCheck, Summary};

const SERVICE_NAME: &str = "model-manager";

/// The service name in coordinators' certificates.
const COORDINATOR_SERVICE: &str = "coordinator";

/// The namespace of a request that names none, from a caller not bound to one.
const DEFAULT_NAMESPACE: &str = "default";

/// Bounds on uploads, so that hostile or broken uploaders cannot hold
/// unbounded memory, disk or slots: at most `max_concurrent_uploads` ×
/// `max_safetensors_header_bytes` of headers are buffered at once.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct UploadLimits {
    /// The largest model file accepted, in bytes; a larger upload is refused
    /// (RESOURCE_EXHAUSTED) and nothing of it is kept.
    #[arg(long, env = "COHORT_MAX_UPLOAD_BYTES", default_value_t = 4 << 30)]
    pub max_upload_bytes: u64,
    /// Uploads received at once; further ones wait for a slot.
    #[arg(long, env = "COHORT_MAX_CONCURRENT_UPLOADS", default_value_t = 8)]
    pub max_concurrent_uploads: usize,
    /// How long an upload waits for a slot before it is refused
    /// (RESOURCE_EXHAUSTED).
    #[arg(long, env = "COHORT_UPLOAD_SLOT_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upload_slot_wait: Duration,
    /// An upload that sends nothing for this long is aborted
    /// (DEADLINE_EXCEEDED) and frees its slot.
    #[arg(long, env = "COHORT_UPLOAD_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub upload_idle_timeout: Duration,
    /// The largest safetensors JSON header accepted, in bytes: the one part
    /// of an upload held in memory (to be parsed).
    #[arg(long, env = "COHORT_MAX_SAFETENSORS_HEADER_BYTES", default_value_t = 16 << 20)]
    pub max_safetensors_header_bytes: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 4 << 30,
            max_concurrent_uploads: 8,
            upload_slot_wait: Duration::from_secs(30),
            upload_idle_timeout: Duration::from_secs(60),
            max_safetensors_header_bytes: 16 << 20,
        }
    }
}

impl UploadLimits {
    /// The most uploads at once that may be configured.
    pub const MAX_CONCURRENT_UPLOADS: usize = 4096;
    /// The longest wait or idle time that may be configured.
    pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

    /// Refuses limits that would refuse everything or bound nothing, naming the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_upload_bytes > 0,
            "--max-upload-bytes: must be at least 1"
        );
        anyhow::ensure!(
            (1..=Self::MAX_CONCURRENT_UPLOADS).contains(&self.max_concurrent_uploads),
            "--max-concurrent-uploads: {} is not in 1..={}",
            self.max_concurrent_uploads,
            Self::MAX_CONCURRENT_UPLOADS
        );
        for (flag, d) in [
            ("--upload-slot-wait", self.upload_slot_wait),
            ("--upload-idle-timeout", self.upload_idle_timeout),
        ] {
            anyhow::ensure!(
                !d.is_zero() && d <= Self::MAX_WAIT,
                "{flag}: {} is not between 1ns and {}",
                humantime::format_duration(d),
                humantime::format_duration(Self::MAX_WAIT)
            );
        }
        anyhow::ensure!(
            (1..=SAFETENSORS_MAX_HEADER_LEN).contains(&self.max_safetensors_header_bytes),
            "--max-safetensors-header-bytes: {} is not in 1..={SAFETENSORS_MAX_HEADER_LEN} \
             (the safetensors format's own bound)",
            self.max_safetensors_header_bytes
        );
        Ok(())
    }
}

/// Command line of the `model-manager` binary.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "model-manager",
    about = "Cohort's model registry (cohort.v1.Models)"
)]
pub struct Args {
    #[command(flatten)]
    pub service: cohort_runtime::ServiceArgs,
    #[command(flatten)]
    pub database: cohort_runtime::DatabaseArgs,
    /// Blob store root, e.g. file:///var/lib/cohort/blobs or a plain path;
    /// model files go under its `models/` prefix.
    #[arg(long, env = "COHORT_BLOB_URL")]
    pub blob_url: String,
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
    #[command(flatten)]
    pub limits: UploadLimits,
    /// job-scheduler's gRPC endpoint (host:port), where users' uploads are
    /// recorded in the audit log. Without it they are not recorded (each one
    /// logs an error saying so).
    #[arg(long, env = "COHORT_JOB_SCHEDULER")]
    pub job_scheduler: Option<String>,
}

impl Args {
    /// Opens storage, binds, writes the ready file and serves until SIGTERM/SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        self.limits.validate()?;
        let tls = self.tls.load().context("TLS")?;
        let store = cohort_store::open::open_model_store(
            &self.database.database_url,
            &cohort_store::open::DatabaseOptions::new(
                self.database.database_max_connections,
                self.database.database_connect_timeout,
            ),
        )
        .await
        .context("--database-url")?;
        anyhow::ensure!(!self.blob_url.trim().is_empty(), "--blob-url: empty URL");
        let blobs = cohort_blob::open_blob_store(&models_blob_url(&self.blob_url))
            .await
            .context("--blob-url")?;
        let audit =
            AuditClient::from_flag(SERVICE_NAME, self.job_scheduler.as_deref(), tls.as_ref())
                .context("--job-scheduler")?;
        let listener = Listener::bind_service(&self.service).await?.with_tls(tls);
        listener
            .serve(
                SERVICE_NAME,
                routes(store, blobs, self.limits, audit),
                self.service.ready_file.as_deref(),
                cohort_runtime::shutdown_signal(),
            )
            .await?;
        Ok(())
    }
}

/// The part of the blob store that model-manager owns: `models/` under `blob_url`.
fn models_blob_url(blob_url: &str) -> String {
    let trimmed = blob_url.trim_end_matches('/');
    if trimmed.ends_with(':') {
        // A scheme and the root path, e.g. file:///
        format!("{blob_url}models")
    } else {
        format!("{trimmed}/models")
    }
}

/// The Models service as routes, for `Listener::serve` or an in-process server.
pub fn routes(
    store: Arc<dyn ModelStore>,
    blobs: Arc<dyn BlobStore>,
    limits: UploadLimits,
    audit: AuditClient,
) -> cohort_runtime::Services {
    cohort_runtime::Services::new(ModelsServer::new(
        ModelsService::new(store, blobs, limits).with_audit(audit),
    ))
}

/// Serves Models (plus health and reflection) on 127.0.0.1 on a free port
/// until the returned sender fires or is dropped, with the default limits
/// and no TLS. For tests and `cohort up`.
pub async fn serve_in_process(
    store: Arc<dyn ModelStore>,
    blobs: Arc<dyn BlobStore>,
) -> Result<(SocketAddr, oneshot::Sender<()>), RuntimeError> {
    serve_in_process_with(
        store,
        blobs,
        UploadLimits::default(),
        None,
        AuditClient::none(SERVICE_NAME),
    )
    .await
}

/// [`serve_in_process`] with `limits`, over mutual TLS with `tls`, and
/// users' uploads recorded with `audit`.
pub async fn serve_in_process_with(
    store: Arc<dyn ModelStore>,
    blobs: Arc<dyn BlobStore>,
    limits: UploadLimits,
    tls: Option<Tls>,
    audit: AuditClient,
) -> Result<(SocketAddr, oneshot::Sender<()>), RuntimeError> {
    let listener = Listener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?
        .with_tls(tls);
    let addr = listener.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let routes = routes(store, blobs, limits, audit);
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = listener.serve(SERVICE_NAME, routes, None, shutdown).await {
            tracing::error!(error = %e, "in-process model-manager failed");
        }
    });
    Ok((addr, stop))
}

/// Everything that can go wrong in a request, mapped once onto gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl cohort_core::HasKind for Error {
    fn kind(&self) -> cohort_core::ErrorKind {
        match self {
            Error::Invalid { .. } => cohort_core::ErrorKind::InvalidArgument,
            Error::Store(e) => e.kind(),
            // Blobs are only ever looked up through a stored version, so a
            // missing blob is lost data, not a bad request.
            Error::Blob(BlobError::NotFound { .. }) => cohort_core::ErrorKind::DataLoss,
            Error::Blob(e) => e.kind(),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        cohort_runtime::ToStatus::to_status(&e)
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> Status {
    Error::Invalid {
        field,
        message: message.into(),
    }
    .into()
}

fn check_name(field: &'static str, name: &str) -> Result<(), Status> {
    if cohort_core::is_dns_label(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a DNS-1123 label (1-63 of a-z, 0-9, '-')"),
        ))
    }
}

/// Most parties a version's lineage may name.
pub const MAX_LINEAGE_PARTIES: usize = 10_000;

/// The parties of a lineage: only for a job's round, bounded, each a party name once.
fn check_lineage_parties(lineage: &Lineage) -> Result<(), Status> {
    let field = "header.lineage.parties";
    if lineage.parties.is_empty() {
        return Ok(());
    }
    if lineage.job_id.is_empty() || lineage.round == 0 {
        return Err(invalid(
            field,
            "only a job's round (lineage.job_id and lineage.round) names parties",
        ));
    }
    if lineage.parties.len() > MAX_LINEAGE_PARTIES {
        return Err(invalid(
            field,
            format!(
                "{} parties is over the limit of {MAX_LINEAGE_PARTIES}",
                lineage.parties.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, party) in lineage.parties.iter().enumerate() {
        let bounded = &party[..party.floor_char_boundary(64)];
        if let Err(e) = cohort_core::PartyId::parse(party) {
            return Err(invalid(field, format!("[{i}] {bounded:?}: {e}")));
        }
        if !seen.insert(party.as_str()) {
            return Err(invalid(field, format!("[{i}] {bounded:?} is listed twice")));
        }
    }
    Ok(())
}

fn to_proto(r: ModelVersionRecord) -> ModelVersion {
    ModelVersion {
        name: r.name,
        version: r.version,
        digest: r.digest,
        size_bytes: r.size_bytes,
        lineage: Some(Lineage {
            job_id: r.job_id,
            round: r.round,
            parent_version: r.parent_version,
            parties: r.parties,
        }),
        metrics: Some(Metrics {
            loss: r.loss,
            accuracy: r.accuracy,
            samples: r.samples,
        }),
        created_at_ms: r.created_at_ms,
        namespace: r.namespace,
    }
}

/// Who is calling: the holder of an API token (or a coordinator acting for
/// its job's namespace, with the same metadata), or None for a
/// server-internal caller, which may do anything.
fn caller<T>(request: &Request<T>) -> Result<Option<Principal>, Status> {
    let principal = calling_principal(request)?;
    if principal.is_none()
        && matches!(peer_identity(request), Some(Identity::Service(name)) if name == COORDINATOR_SERVICE)
    {
        return Err(Status::permission_denied(
            "coordinators act for a job's namespace: principal metadata required",
        ));
    }
    Ok(principal)
}

/// The namespace a call is about: a one-namespace token's own; otherwise
/// (a token of every namespace, a server-internal caller) `asked`, default
/// `default`. None: `asked` names a namespace the token does not reach.
fn namespace_of_call(
    principal: Option<&Principal>,
    field: &'static str,
    asked: &str,
) -> Result<Option<String>, Status> {
    if !asked.is_empty() && !cohort_core::is_dns_label(asked) {
        return Err(invalid(
            field,
            format!("{asked:?} must be a DNS-1123 label"),
        ));
    }
    Ok(match principal.and_then(|p| p.scope.namespace()) {
        Some(own) if asked.is_empty() || asked == own => Some(own.to_string()),
        Some(_) => None,
        None if asked.is_empty() => Some(DEFAULT_NAMESPACE.to_string()),
        None => Some(asked.to_string()),
    })
}

/// The `cohort.v1.Models` implementation.
pub struct ModelsService {
    store: Arc<dyn ModelStore>,
    blobs: Arc<dyn BlobStore>,
    limits: UploadLimits,
    upload_slots: Arc<Semaphore>,
    /// Where users' uploads are recorded.
    audit: AuditClient,
}

/// What an upload is about, as far as it got: for its audit entry.
#[derive(Default)]
struct UploadTarget {
    /// The model's name once checked; empty before.
    name: String,
    /// The model's namespace once the caller is known to reach it; until
    /// then the caller's own scope, so an entry about a namespace out of its
    /// reach is seen by its own admins, never by that namespace's.
    namespace: String,
}

impl ModelsService {
    pub fn new(
        store: Arc<dyn ModelStore>,
        blobs: Arc<dyn BlobStore>,
        limits: UploadLimits,
    ) -> Self {
        let upload_slots = Arc::new(Semaphore::new(limits.max_concurrent_uploads.max(1)));
        Self {
            store,
            blobs,
            limits,
            upload_slots,
            audit: AuditClient::none(SERVICE_NAME),
        }
    }

    /// Records users' uploads with `audit`.
    pub fn with_audit(mut self, audit: AuditClient) -> Self {
        self.audit = audit;
        self
    }

    /// The version a Get or Download names. Whatever the caller may not see
    /// answers exactly as a missing version does.
    async fn resolve(
        &self,
        request: &Request<GetVersionRequest>,
    ) -> Result<ModelVersionRecord, Status> {
        let principal = caller(request)?;
        let req = request.get_ref();
        check_name("name", &req.name)?;
        let not_found = || Status::from(Error::from(version_not_found(&req.name, req.version)));
        let Some(namespace) = namespace_of_call(principal.as_ref(), "namespace", &req.namespace)?
        else {
            return Err(not_found());
        };
        if let Some(p) = &principal {
            p.authorize(&namespace, Action::Read).map_err(|e| match e {
                AuthError::OutOfScope => not_found(),
                e => e.to_status(),
            })?;
        }
        let record = if req.version == 0 {
            self.store.latest_version(&namespace, &req.name).await
        } else {
            self.store
                .get_version(&namespace, &req.name, req.version)
                .await
        };
        record.map_err(|e| Error::from(e).into())
    }

    /// A slot for one upload, waiting at most `upload_slot_wait` for one.
    async fn upload_slot(&self) -> Result<OwnedSemaphorePermit, Status> {
        let wait = self.limits.upload_slot_wait;
        match tokio::time::timeout(wait, self.upload_slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Status::unavailable("model-manager is shutting down")),
            Err(_) => Err(Status::resource_exhausted(format!(
                "model-manager is receiving its limit of {} uploads at once \
                 (--max-concurrent-uploads) and none finished within {} \
                 (--upload-slot-wait); retry later",
                self.limits.max_concurrent_uploads,
                humantime::format_duration(wait)
            ))),
        }
    }
}

/// The next message of an upload, or DEADLINE_EXCEEDED after `idle` without one.
async fn next_message(
    stream: &mut Streaming<UploadVersionRequest>,
    idle: Duration,
) -> Result<Option<UploadVersionRequest>, Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(message) => message,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the upload sent nothing for {} (--upload-idle-timeout): aborted",
            humantime::format_duration(idle)
        ))),
    }
}

type DataChunkStream = Pin<Box<dyn Stream<Item = Result<DataChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Models for ModelsService {
    async fn upload_version(
        &self,
        request: Request<Streaming<UploadVersionRequest>>,
    ) -> Result<Response<ModelVersion>, Status> {
        let actor = Actor::of(&request);
        let coordinator = matches!(peer_identity(&request),
            Some(Identity::Service(name)) if name == COORDINATOR_SERVICE);
        let scope = match calling_principal(&request) {
            Ok(Some(p)) if actor.is_user() && !coordinator => p.scope,
            // A coordinator's checkpoint or a server-internal caller: not audited.
            _ => {
                return self
                    .receive_upload(request, &mut UploadTarget::default())
                    .await;
            }
        };
        let mut target = UploadTarget {
            name: String::new(),
            namespace: scope.as_str().to_string(),
        };
        let result = self.receive_upload(request, &mut target).await;
        let (object_id, namespace) = match &result {
            Ok(v) => (
                format!("{}@{}", v.get_ref().name, v.get_ref().version),
                v.get_ref().namespace.as_str(),
            ),
            Err(_) => (target.name.clone(), target.namespace.as_str()),
        };
        self.audit
            .record(audit::entry(
                &actor,
                "model.upload",
                "model",
                &object_id,
                namespace,
                &result,
            ))
            .await;
        result
    }

    async fn list_versions(
        &self,
        request: Request<ListVersionsRequest>,
    ) -> Result<Response<ListVersionsResponse>, Status> {
        let principal = caller(&request)?;
        let req = request.into_inner();
        let name = Some(req.name.as_str()).filter(|s| !s.is_empty());
        let job_id = Some(req.job_id.as_str()).filter(|s| !s.is_empty());
        let mut namespace = Some(req.namespace.as_str()).filter(|s| !s.is_empty());
        if let Some(p) = &principal
            && let Some(own) = p.scope.namespace()
        {
            match namespace {
                // Another tenant's namespace looks empty.
                Some(asked) if asked != own => {
                    return Ok(Response::new(ListVersionsResponse::default()));
                }
                _ => namespace = Some(own),
            }
        }
        let versions = self
            .store
            .list_versions(name, job_id, namespace)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ListVersionsResponse {
            versions: versions.into_iter().map(to_proto).collect(),
        }))
    }

    async fn get_version(
        &self,
        request: Request<GetVersionRequest>,
    ) -> Result<Response<ModelVersion>, Status> {
        let record = self.resolve(&request).await?;
        Ok(Response::new(to_proto(record)))
    }

    type DownloadStream = DataChunkStream;

    async fn download(
        &self,
        request: Request<GetVersionRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let record = self.resolve(&request).await?;
        let digest = Digest::parse(&record.digest).map_err(Error::from)?;
        let blob = self.blobs.get(&digest).await.map_err(Error::from)?;
        let chunks = blob.map(|item| match item {
            Ok(data) => Ok(DataChunk { data }),
            Err(e) => Err(Status::from(Error::from(e))),
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}

impl ModelsService {
    /// An upload, its name and namespace noted in `target` as they are
    /// known (for the audit entry).
    async fn receive_upload(
        &self,
        request: Request<Streaming<UploadVersionRequest>>,
        target: &mut UploadTarget,
    ) -> Result<Response<ModelVersion>, Status> {
        let principal = caller(&request)?;
        // Held until the answer: the slot bounds what uploads hold at once.
        let _slot = self.upload_slot().await?;
        let idle = self.limits.upload_idle_timeout;
        let mut stream = request.into_inner();
        let header = match next_message(&mut stream, idle).await? {
            Some(UploadVersionRequest {
                part: Some(Part::Header(h)),
            }) => h,
            Some(_) => return Err(invalid("header", "the first message must be the header")),
            None => return Err(invalid("header", "empty upload: no header and no data")),
        };
        check_name("header.name", &header.name)?;
        target.name.clone_from(&header.name);
        // Names only the caller's own scope and the namespace it asked for.
        let elsewhere = || {
            Status::permission_denied(format!(
                "header.namespace: the API token is for namespace {}, not {:?}",
                principal
                    .as_ref()
                    .map_or(cohort_core::Scope::ALL, |p| p.scope.as_str()),
                header.namespace
            ))
        };
        let Some(namespace) =
            namespace_of_call(principal.as_ref(), "header.namespace", &header.namespace)?
        else {
            return Err(elsewhere());
        };
        // Within the caller's reach (namespace_of_call gives no other).
        target.namespace.clone_from(&namespace);
        if let Some(p) = &principal {
            p.authorize(&namespace, Action::Write)
                .map_err(|e| match e {
                    AuthError::OutOfScope => elsewhere(),
                    e => e.to_status(),
                })?;
        }
        let lineage = header.lineage.unwrap_or_default();
        let metrics = header.metrics.unwrap_or_default();
        if !lineage.job_id.is_empty() && !cohort_core::is_dns_label(&lineage.job_id) {
            return Err(invalid(
                "header.lineage.job_id",
                format!("{:?} is not a job id", lineage.job_id),
            ));
        }
        check_lineage_parties(&lineage)?;
        if lineage.parent_version != 0 {
            match self
                .store
                .get_version(&namespace, &header.name, lineage.parent_version)
                .await
            {
                Ok(_) => {}
                Err(StoreError::NotFound { .. }) => {
                    return Err(invalid(
                        "header.lineage.parent_version",
                        format!("{}@{} does not exist", header.name, lineage.parent_version),
                    ));
                }
                Err(e) => return Err(Error::from(e).into()),
            }
        }

        let (verdict_tx, mut verdict_rx) = oneshot::channel();
        let check = SafetensorsCheck::new(
            self.limits.max_safetensors_header_bytes,
            self.limits.max_upload_bytes,
        );
        let data = upload_data(stream, check, idle, verdict_tx);

        // A round the job stored already (its coordinator retrying an upload
        // whose answer was lost): the stored version is the answer. The data
        // is received and checked (the uploader gets the same refusals), not
        // kept.
        if let Some(stored) = self
            .store
            .round_version(&namespace, &header.name, &lineage.job_id, lineage.round)
            .await
            .map_err(Error::from)?
        {
            discard(data).await;
            match verdict_rx.try_recv() {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => return Err(status),
                Err(_) => return Err(Status::internal("upload ended without a verdict")),
            }
            log_redelivery(&stored);
            return Ok(Response::new(to_proto(stored)));
        }
        let put = self.blobs.put(data).await;
        let summary = match (verdict_rx.try_recv(), put) {
            // The data was refused (or the client failed): that is the answer.
            (Ok(Err(status)), _) => return Err(status),
            (_, Err(e)) => {
                tracing::warn!(model = %header.name, error = %e, "cannot store a model's bytes");
                return Err(Error::from(e).into());
            }
            (Ok(Ok(summary)), Ok(info)) => (summary, info),
            (Err(_), Ok(_)) => {
                return Err(Status::internal("upload ended without a verdict"));
            }
        };
        let (Summary { tensors, .. }, info) = summary;

        let stored = self
            .store
            .insert_version(
                NewModelVersion {
                    name: header.name,
                    namespace,
                    digest: info.digest.to_string(),
                    size_bytes: info.size,
                    job_id: lineage.job_id,
                    round: lineage.round,
                    parent_version: lineage.parent_version,
                    loss: metrics.loss,
                    accuracy: metrics.accuracy,
                    samples: metrics.samples,
                    parties: lineage.parties,
                },
                cohort_runtime::now_ms(),
            )
            .await
            .map_err(Error::from)?;
        let record = stored.record;
        if !stored.created {
            // An upload of the same round won the race since the check
            // above. The data just put stays unreferenced unless it is the
            // stored version's (content addressing makes equal data one blob).
            log_redelivery(&record);
            return Ok(Response::new(to_proto(record)));
        }
        tracing::info!(
            namespace = %record.namespace,
            model = %record.name,
            version = record.version,
            digest = %record.digest,
            size = record.size_bytes,
            tensors,
            "model version stored"
        );
        Ok(Response::new(to_proto(record)))
    }
}

/// Logs an upload of a round the job has a version of already.
fn log_redelivery(stored: &ModelVersionRecord) {
    tracing::info!(
        namespace = %stored.namespace,
        model = %stored.name,
        version = stored.version,
        job = %stored.job_id,
        round = stored.round,
        "model version re-delivered: the round's stored version answers"
    );
}

/// Reads `data` to its end (or its first error), keeping nothing.
async fn discard(mut data: ByteStream) {
    while let Some(Ok(_)) = data.next().await {}
}

type Verdict = oneshot::Sender<Result<Summary, Status>>;

struct Upload {
    inner: Streaming<UploadVersionRequest>,
    check: SafetensorsCheck,
    idle: Duration,
    verdict: Verdict,
}

/// The status for data `check` refused.
fn refused(refusal: Refusal) -> Status {
    match refusal {
        Refusal::Invalid(m) => invalid("data", format!("not a safetensors file: {m}")),
        Refusal::TooLarge(m) => Status::resource_exhausted(format!("data: {m}")),
    }
}

/// The data messages of an upload as a byte stream, validated and bounded
/// by `check` as it goes, failing when nothing arrives for `idle`. The
/// outcome (a summary, or the status to answer with) goes to `verdict`
/// before the stream ends or fails.
fn upload_data(
    inner: Streaming<UploadVersionRequest>,
    check: SafetensorsCheck,
    idle: Duration,
    verdict: Verdict,
) -> ByteStream {
    let state = Upload {
        inner,
        check,
        idle,
        verdict,
    };
    let fail = |verdict: Verdict, status: Status| {
        let message = status.message().to_string();
        let _ = verdict.send(Err(status));
        Some((Err(BlobError::Input(message)), None))
    };
    Box::pin(futures::stream::unfold(
        Some(state),
        move |state| async move {
            let mut st = state?;
            match next_message(&mut st.inner, st.idle).await {
                Ok(Some(UploadVersionRequest {
                    part: Some(Part::Data(data)),
                })) => match st.check.feed(&data) {
                    Ok(()) => Some((Ok(data), Some(st))),
                    Err(refusal) => {
                        tracing::warn!(reason = ?refusal, "upload refused");
                        fail(st.verdict, refused(refusal))
                    }
                },
                Ok(Some(UploadVersionRequest {
                    part: Some(Part::Header(_)),
                })) => fail(
                    st.verdict,
                    invalid(
                        "header",
                        "sent twice: only the first message may be a header",
                    ),
                ),
                Ok(Some(UploadVersionRequest { part: None })) => fail(
                    st.verdict,
                    invalid("part", "message has neither header nor data"),
                ),
                Ok(None) => match st.check.finish() {
                    Ok(summary) => {
                        let _ = st.verdict.send(Ok(summary));
                        None
                    }
                    Err(m) => fail(st.verdict, refused(Refusal::Invalid(m))),
                },
                Err(status) => {
                    if status.code() == tonic::Code::DeadlineExceeded {
                        tracing::warn!(reason = %status.message(), "upload aborted");
                    }
                    fail(st.verdict, status)
                }
            }
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Args, UploadLimits, models_blob_url};

    #[test]
    fn flag_defaults_are_the_default_limits() {
        use clap::Parser as _;
        // (Unless COHORT_* variables for these flags are set where tests run.)
        let args = Args::try_parse_from([
            "model-manager",
            "--database-url",
            "sqlite://m.db",
            "--blob-url",
            "blobs",
        ])
        .unwrap();
        assert_eq!(args.limits, UploadLimits::default());
        args.limits.validate().unwrap();
    }

    #[test]
    fn models_prefix_is_joined_onto_the_blob_url() {
        assert_eq!(
            models_blob_url("file:///data/blobs"),
            "file:///data/blobs/models"
        );
        assert_eq!(
            models_blob_url("file:///data/blobs/"),
            "file:///data/blobs/models"
        );
        assert_eq!(models_blob_url("file:///"), "file:///models");
        assert_eq!(models_blob_url("blobs"), "blobs/models");
        assert_eq!(models_blob_url("s3://bucket/p"), "s3://bucket/p/models");
    }
}
