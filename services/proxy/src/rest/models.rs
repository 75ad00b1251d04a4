//! `/api/v1/models`: model-manager's Models API; downloads and uploads are
//! streamed chunk by chunk, never held whole.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cohort_proto::v1 as pb;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Caller, Problem, RestState, call, query};

/// Upload chunks sent to model-manager (its chunked upload).
const UPLOAD_CHUNK: usize = 1024 * 1024;

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelSummary {
    pub name: String,
    pub namespace: String,
    pub versions: usize,
    pub latest_version: u32,
    pub latest_created_at_ms: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub models: Vec<ModelSummary>,
}

/// Where a version came from.
#[derive(Debug, Serialize, ToSchema)]
pub struct Lineage {
    pub job_id: String,
    pub round: u32,
    pub parent_version: u32,
    pub parties: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelVersion {
    pub name: String,
    pub namespace: String,
    pub version: u32,
    /// sha256 of the safetensors file, hex.
    pub digest: String,
    pub size_bytes: u64,
    pub created_at_ms: i64,
    pub lineage: Option<Lineage>,
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Model {
    pub name: String,
    pub versions: Vec<ModelVersion>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NamespaceQuery {
    /// The namespace (default: the token's own).
    pub namespace: Option<String>,
}

fn version_view(v: &pb::ModelVersion) -> ModelVersion {
    ModelVersion {
        name: v.name.clone(),
        namespace: v.namespace.clone(),
        version: v.version,
        digest: v.digest.clone(),
        size_bytes: v.size_bytes,
        created_at_ms: v.created_at_ms,
        lineage: v.lineage.as_ref().map(|l| Lineage {
            job_id: l.job_id.clone(),
            round: l.round,
            parent_version: l.parent_version,
            parties: l.parties.clone(),
        }),
        accuracy: v.metrics.as_ref().map(|m| m.accuracy),
        loss: v.metrics.as_ref().map(|m| m.loss),
    }
}

fn namespace(q: Result<Query<NamespaceQuery>, QueryRejection>) -> Result<String, Problem> {
    Ok(query(q)?.namespace.unwrap_or_default())
}

/// Models the token may see, one entry per name.
#[utoipa::path(get, path = "/api/v1/models", params(NamespaceQuery), tag = "models",
    responses((status = 200, body = ModelList), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(
    State(state): State<RestState>,
    caller: Caller,
    q: Result<Query<NamespaceQuery>, QueryRejection>,
) -> Result<Json<ModelList>, Problem> {
    let request = caller.request(pb::ListVersionsRequest {
        namespace: namespace(q)?,
        ..Default::default()
    });
    let list = call("model-manager", state.models().list_versions(request)).await?;
    let mut models: BTreeMap<(String, String), ModelSummary> = BTreeMap::new();
    for v in &list.versions {
        let entry = models
            .entry((v.namespace.clone(), v.name.clone()))
            .or_insert_with(|| ModelSummary {
                name: v.name.clone(),
                namespace: v.namespace.clone(),
                versions: 0,
                latest_version: 0,
                latest_created_at_ms: 0,
            });
        entry.versions += 1;
        if v.version >= entry.latest_version {
            entry.latest_version = v.version;
            entry.latest_created_at_ms = v.created_at_ms;
        }
    }
    Ok(Json(ModelList {
        models: models.into_values().collect(),
    }))
}

/// A model's versions with their lineage, oldest first.
#[utoipa::path(get, path = "/api/v1/models/{name}", params(("name" = String, Path), NamespaceQuery), tag = "models",
    responses((status = 200, body = Model), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_model(
    State(state): State<RestState>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<NamespaceQuery>, QueryRejection>,
) -> Result<Json<Model>, Problem> {
    let request = caller.request(pb::ListVersionsRequest {
        name: name.clone(),
        namespace: namespace(q)?,
        ..Default::default()
    });
    let list = call("model-manager", state.models().list_versions(request)).await?;
    if list.versions.is_empty() {
        return Err(Problem::new(
            cohort_core::ErrorKind::NotFound,
            format!("model {name} has no versions"),
        ));
    }
    let mut versions: Vec<ModelVersion> = list.versions.iter().map(version_view).collect();
    versions.sort_by_key(|v| v.version);
    Ok(Json(Model { name, versions }))
}

/// The version's safetensors file, streamed as model-manager sends it.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}/download",
    params(("name" = String, Path), ("version" = u32, Path), NamespaceQuery), tag = "models",
    responses((status = 200, description = "the safetensors file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn download(
    State(state): State<RestState>,
    caller: Caller,
    Path((name, version)): Path<(String, String)>,
    q: Result<Query<NamespaceQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let version: u32 = version
        .parse()
        .map_err(|_| Problem::invalid("version", format!("{version:?} is not a version number")))?;
    let namespace = namespace(q)?;
    // Metadata first: a missing version is a 404, not a broken download.
    let meta = call(
        "model-manager",
        state
            .models()
            .get_version(caller.request(pb::GetVersionRequest {
                name: name.clone(),
                version,
                namespace: namespace.clone(),
            })),
    )
    .await?;
    let chunks = call(
        "model-manager",
        state
            .models()
            .download(caller.request(pb::GetVersionRequest {
                name: name.clone(),
                version,
                namespace,
            })),
    )
    .await?;
    let body = Body::from_stream(chunks.map(|chunk| {
        chunk
            .map(|c| c.data)
            .map_err(|status| std::io::Error::other(status.message().to_string()))
    }));
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size_bytes));
    if let Ok(disposition) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}-v{}.safetensors\"",
        name.replace(['"', '\\', '/'], "_"),
        version
    )) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    if let Ok(digest) = HeaderValue::from_str(&meta.digest) {
        headers.insert("x-cohort-sha256", digest);
    }
    Ok(response)
}

/// Uploads a safetensors file as the model's next version (members and admins).
#[utoipa::path(post, path = "/api/v1/models/{name}/versions",
    params(("name" = String, Path), NamespaceQuery), tag = "models",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ModelVersion), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn upload(
    State(state): State<RestState>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<NamespaceQuery>, QueryRejection>,
    body: Body,
) -> Result<(StatusCode, Json<ModelVersion>), Problem> {
    let header = pb::UploadVersionRequest {
        part: Some(pb::upload_version_request::Part::Header(pb::UploadHeader {
            name,
            namespace: namespace(q)?,
            ..Default::default()
        })),
    };
    // The body's frames re-cut to at most UPLOAD_CHUNK; a broken body ends the upload
    // early and model-manager refuses the short file.
    let data = body.into_data_stream().flat_map(|frame| {
        let pieces: Vec<pb::UploadVersionRequest> = match frame {
            Ok(bytes) => bytes
                .chunks(UPLOAD_CHUNK)
                .map(|c| pb::UploadVersionRequest {
                    part: Some(pb::upload_version_request::Part::Data(c.to_vec().into())),
                })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "model upload body ended with an error");
                Vec::new()
            }
        };
        futures::stream::iter(pieces)
    });
    let stream = futures::stream::iter([header]).chain(data);
    let version = call(
        "model-manager",
        state.models().upload_version(caller.request(stream)),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(version_view(&version))))
}
