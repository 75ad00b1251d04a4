//! model-manager: Cohort's model registry. Serves `cohort.v1.Models`: named
//! models with immutable, numbered, sha256-addressed safetensors versions and
//! their lineage (job, round, parent), uploaded and downloaded as chunk streams.
//!
//! Metadata lives in a `ModelStore`, bytes in a `BlobStore` (under `models/`
//! of the blob URL). Must not depend on other services' crates or tables.

mod check;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use cohort_blob::{BlobError, BlobStore, ByteStream, Digest};
use cohort_core::{Action, AuthError, Principal};
use cohort_proto::v1::models_server::{Models, ModelsServer};
use cohort_proto::v1::upload_version_request::Part;
use cohort_proto::v1::{
    DataChunk, GetVersionRequest, Lineage, ListVersionsRequest, ListVersionsResponse, Metrics,
    ModelVersion, UploadVersionRequest,
};
use cohort_runtime::{Listener, RuntimeError, ToStatus, calling_principal};
use cohort_store::StoreError;
use cohort_store::models::{ModelStore, ModelVersionRecord, NewModelVersion};
use futures::{Stream, StreamExt};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use crate::check::{SafetensorsCheck, Summary};

const SERVICE_NAME: &str = "model-manager";

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
}

impl Args {
    /// Opens storage, binds, writes the ready file and serves until SIGTERM/SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
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
        let listener = Listener::bind_service(&self.service).await?.with_tls(tls);
        listener
            .serve(
                SERVICE_NAME,
                routes(store, blobs),
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
pub fn routes(store: Arc<dyn ModelStore>, blobs: Arc<dyn BlobStore>) -> tonic::service::Routes {
    tonic::service::Routes::new(ModelsServer::new(ModelsService::new(store, blobs)))
}

/// Serves Models (plus health and reflection) on 127.0.0.1 on a free port
/// until the returned sender fires or is dropped. For tests and `cohort up`.
pub async fn serve_in_process(
    store: Arc<dyn ModelStore>,
    blobs: Arc<dyn BlobStore>,
) -> Result<(SocketAddr, oneshot::Sender<()>), RuntimeError> {
    let listener = Listener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let routes = routes(store, blobs);
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

/// Refuses `action` on a model of `namespace` unless the caller's token
/// allows it; another tenant's model answers like a missing one.
fn authorize(
    principal: Option<&Principal>,
    namespace: &str,
    action: Action,
    not_found: impl FnOnce() -> StoreError,
) -> Result<(), Status> {
    let Some(p) = principal else {
        return Ok(()); // a server-internal caller
    };
    p.authorize(namespace, action).map_err(|e| match e {
        AuthError::OutOfScope => Error::from(not_found()).into(),
        e => e.to_status(),
    })
}

/// The `cohort.v1.Models` implementation.
pub struct ModelsService {
    store: Arc<dyn ModelStore>,
    blobs: Arc<dyn BlobStore>,
}

impl ModelsService {
    pub fn new(store: Arc<dyn ModelStore>, blobs: Arc<dyn BlobStore>) -> Self {
        Self { store, blobs }
    }

    async fn resolve(
        &self,
        request: &Request<GetVersionRequest>,
    ) -> Result<ModelVersionRecord, Status> {
        let principal = calling_principal(request)?;
        let req = request.get_ref();
        check_name("name", &req.name)?;
        let record = if req.version == 0 {
            self.store.latest_version(&req.name).await
        } else {
            self.store.get_version(&req.name, req.version).await
        };
        let record = record.map_err(Error::from)?;
        authorize(principal.as_ref(), &record.namespace, Action::Read, || {
            StoreError::NotFound {
                what: "model version",
                id: if req.version == 0 {
                    req.name.clone()
                } else {
                    format!("{}@{}", req.name, req.version)
                },
            }
        })?;
        Ok(record)
    }
}

type DataChunkStream = Pin<Box<dyn Stream<Item = Result<DataChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Models for ModelsService {
    async fn upload_version(
        &self,
        request: Request<Streaming<UploadVersionRequest>>,
    ) -> Result<Response<ModelVersion>, Status> {
        let principal = calling_principal(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(UploadVersionRequest {
                part: Some(Part::Header(h)),
            }) => h,
            Some(_) => return Err(invalid("header", "the first message must be the header")),
            None => return Err(invalid("header", "empty upload: no header and no data")),
        };
        check_name("header.name", &header.name)?;
        let namespace = match (header.namespace.as_str(), principal.as_ref()) {
            ("", Some(p)) => p.scope.namespace().unwrap_or("default").to_string(),
            ("", None) => "default".to_string(),
            (ns, _) => ns.to_string(),
        };
        if !cohort_core::is_dns_label(&namespace) {
            return Err(invalid(
                "header.namespace",
                format!("{namespace:?} must be a DNS-1123 label"),
            ));
        }
        if let Some(p) = &principal {
            p.authorize(&namespace, Action::Write)
                .map_err(|e| match e {
                    AuthError::OutOfScope => Status::permission_denied(format!(
                        "header.namespace: the API token is for namespace {}, not {namespace:?}",
                        p.scope
                    )),
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
        if lineage.parent_version != 0 {
            match self
                .store
                .get_version(&header.name, lineage.parent_version)
                .await
            {
                Ok(parent) if parent.namespace == namespace => {}
                Ok(_) | Err(StoreError::NotFound { .. }) => {
                    return Err(invalid(
                        "header.lineage.parent_version",
                        format!("{}@{} does not exist", header.name, lineage.parent_version),
                    ));
                }
                Err(e) => return Err(Error::from(e).into()),
            }
        }

        let (verdict_tx, mut verdict_rx) = oneshot::channel();
        let put = self.blobs.put(upload_data(stream, verdict_tx)).await;
        let summary = match (verdict_rx.try_recv(), put) {
            // The data was refused (or the client failed): that is the answer.
            (Ok(Err(status)), _) => return Err(status),
            (_, Err(e)) => return Err(Error::from(e).into()),
            (Ok(Ok(summary)), Ok(info)) => (summary, info),
            (Err(_), Ok(_)) => {
                return Err(Status::internal("upload ended without a verdict"));
            }
        };
        let (Summary { tensors, .. }, info) = summary;

        let record = self
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
                },
                cohort_runtime::now_ms(),
            )
            .await
            .map_err(Error::from)?;
        tracing::info!(
            model = %record.name,
            version = record.version,
            digest = %record.digest,
            size = record.size_bytes,
            tensors,
            "model version stored"
        );
        Ok(Response::new(to_proto(record)))
    }

    async fn list_versions(
        &self,
        request: Request<ListVersionsRequest>,
    ) -> Result<Response<ListVersionsResponse>, Status> {
        let principal = calling_principal(&request)?;
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
            Ok(data) => Ok(DataChunk {
                data: Vec::from(data),
            }),
            Err(e) => Err(Status::from(Error::from(e))),
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}

type Verdict = oneshot::Sender<Result<Summary, Status>>;

struct Upload {
    inner: Streaming<UploadVersionRequest>,
    check: SafetensorsCheck,
    verdict: Verdict,
}

/// The data messages of an upload as a byte stream, validated as it goes.
/// The outcome (a summary, or the status to answer with) goes to `verdict`
/// before the stream ends or fails.
fn upload_data(inner: Streaming<UploadVersionRequest>, verdict: Verdict) -> ByteStream {
    let state = Upload {
        inner,
        check: SafetensorsCheck::default(),
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
            match st.inner.message().await {
                Ok(Some(UploadVersionRequest {
                    part: Some(Part::Data(data)),
                })) => match st.check.feed(&data) {
                    Ok(()) => Some((Ok(Bytes::from(data)), Some(st))),
                    Err(m) => fail(
                        st.verdict,
                        invalid("data", format!("not a safetensors file: {m}")),
                    ),
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
                    Err(m) => fail(
                        st.verdict,
                        invalid("data", format!("not a safetensors file: {m}")),
                    ),
                },
                Err(status) => fail(st.verdict, status),
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::models_blob_url;

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
