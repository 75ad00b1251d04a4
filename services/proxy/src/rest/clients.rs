//! `/api/v1/whoami`, `/clients`, `/tokens` and `/audit`: client-selector's
//! and job-scheduler's user APIs as JSON.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use cohort_proto::v1 as pb;
use cohort_proto::{NAMESPACE_METADATA_KEY, ROLE_METADATA_KEY, TOKEN_METADATA_KEY};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Caller, Problem, RestState, call, query};

/// The token's principal (to show only what the caller may do).
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    /// The token's name where the token may list tokens (admins), else its id.
    pub name: String,
    pub token_id: String,
    /// admin, member or viewer.
    pub role: String,
    /// The namespaces the token acts in (`*`: every namespace).
    pub namespaces: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Dataset {
    pub name: String,
    pub samples: u64,
    pub features: u32,
    pub classes: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Gpu {
    pub name: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Reliability {
    pub finished: u64,
    pub failed: u64,
    pub timed_out: u64,
    /// 0..1, what selection weighs parties by.
    pub score: f64,
    pub last_result_ms: i64,
}

/// A party as client-selector sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Client {
    pub party: String,
    pub connected: bool,
    pub revoked: bool,
    pub revoked_at_ms: i64,
    pub last_seen_ms: i64,
    pub datasets: Vec<Dataset>,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub gpus: Vec<Gpu>,
    pub max_tasks: u32,
    pub running_tasks: u32,
    pub tasks_offered: u64,
    pub tasks_succeeded: u64,
    pub tasks_failed: u64,
    pub reliability: Option<Reliability>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientList {
    pub clients: Vec<Client>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub role: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<Token>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewToken {
    pub name: String,
    /// A namespace, or `*` for every namespace (cluster admins only).
    pub namespace: String,
    /// admin, member or viewer.
    pub role: String,
}

/// The secret is shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    pub info: Token,
    pub token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: u64,
    pub time_ms: i64,
    pub actor_kind: String,
    pub actor_id: String,
    pub actor_name: String,
    pub action: String,
    pub object_kind: String,
    pub object_id: String,
    pub namespace: String,
    pub outcome: String,
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
    /// Empty on the last page.
    pub next_page_token: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokensQuery {
    /// Default: the token's own namespace.
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    pub namespace: Option<String>,
    /// Only entries at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// At most 500 (default 100).
    pub page_size: Option<u32>,
    pub page_token: Option<String>,
}

fn role_name(role: i32) -> String {
    cohort_runtime::wire::role_from_wire(role)
        .map(|r| r.as_str().to_string())
        .unwrap_or_else(|| "unspecified".into())
}

fn token_view(t: &pb::TokenInfo) -> Token {
    Token {
        id: t.id.clone(),
        name: t.name.clone(),
        namespace: t.namespace.clone(),
        role: role_name(t.role),
        created_at_ms: t.created_at_ms,
    }
}

/// Who the token is.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "auth",
    responses((status = 200, body = WhoAmI), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn whoami(
    State(state): State<RestState>,
    caller: Caller,
) -> Result<Json<WhoAmI>, Problem> {
    let token_id = caller
        .get(TOKEN_METADATA_KEY)
        .unwrap_or_default()
        .to_string();
    let role = caller
        .get(ROLE_METADATA_KEY)
        .unwrap_or_default()
        .to_string();
    let namespace = caller.get(NAMESPACE_METADATA_KEY).unwrap_or_default();
    // Only admins may list tokens; anyone else is known by the token's id.
    let name = match call(
        "job-scheduler",
        state
            .tokens()
            .list_tokens(caller.request(pb::ListTokensRequest::default())),
    )
    .await
    {
        Ok(list) => list
            .tokens
            .into_iter()
            .find(|t| t.id == token_id)
            .map(|t| t.name)
            .unwrap_or_else(|| token_id.clone()),
        Err(_) => token_id.clone(),
    };
    Ok(Json(WhoAmI {
        name,
        token_id,
        role,
        namespaces: vec![namespace.to_string()],
    }))
}

/// Parties, connected or not.
#[utoipa::path(get, path = "/api/v1/clients", tag = "clients",
    responses((status = 200, body = ClientList), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(
    State(state): State<RestState>,
    caller: Caller,
) -> Result<Json<ClientList>, Problem> {
    let list = call(
        "client-selector",
        state
            .selector()
            .list_clients(caller.request(pb::ListClientsRequest {})),
    )
    .await?;
    Ok(Json(ClientList {
        clients: list.clients.iter().map(client_view).collect(),
    }))
}

fn client_view(c: &pb::ClientInfo) -> Client {
    let resources = c.resources.clone().unwrap_or_default();
    Client {
        party: c.party.clone(),
        connected: c.connected,
        revoked: c.revoked,
        revoked_at_ms: c.revoked_at_ms,
        last_seen_ms: c.last_seen_ms,
        datasets: c
            .datasets
            .iter()
            .map(|d| Dataset {
                name: d.name.clone(),
                samples: d.samples,
                features: d.features,
                classes: d.classes,
            })
            .collect(),
        cpus: resources.cpus,
        memory_bytes: resources.memory_bytes,
        gpus: resources
            .gpu_devices
            .iter()
            .map(|g| Gpu {
                name: g.name.clone(),
                memory_bytes: g.memory_bytes,
            })
            .collect(),
        max_tasks: resources.max_tasks,
        running_tasks: c.running_tasks,
        tasks_offered: c.tasks_offered,
        tasks_succeeded: c.tasks_succeeded,
        tasks_failed: c.tasks_failed,
        reliability: c.reliability.as_ref().map(|r| Reliability {
            finished: r.finished,
            failed: r.failed,
            timed_out: r.timed_out,
            score: r.score,
            last_result_ms: r.last_result_ms,
        }),
    }
}

/// Revokes a party's certificate (cluster admins): its connections close.
#[utoipa::path(post, path = "/api/v1/clients/{party}/revoke", params(("party" = String, Path)), tag = "clients",
    responses((status = 200, body = Client), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn revoke(
    State(state): State<RestState>,
    caller: Caller,
    Path(party): Path<String>,
) -> Result<Json<Client>, Problem> {
    let client = call(
        "client-selector",
        state
            .selector()
            .revoke_client(caller.request(pb::RevokeClientRequest { party })),
    )
    .await?;
    Ok(Json(client_view(&client)))
}

/// API tokens of a namespace (admins).
#[utoipa::path(get, path = "/api/v1/tokens", params(TokensQuery), tag = "auth",
    responses((status = 200, body = TokenList), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_tokens(
    State(state): State<RestState>,
    caller: Caller,
    q: Result<Query<TokensQuery>, QueryRejection>,
) -> Result<Json<TokenList>, Problem> {
    let namespace = query(q)?.namespace.unwrap_or_default();
    let list = call(
        "job-scheduler",
        state
            .tokens()
            .list_tokens(caller.request(pb::ListTokensRequest { namespace })),
    )
    .await?;
    Ok(Json(TokenList {
        tokens: list.tokens.iter().map(token_view).collect(),
    }))
}

/// Creates an API token (admins); the secret is in the answer only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "auth", request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create_token(
    State(state): State<RestState>,
    caller: Caller,
    body: Result<Json<NewToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), Problem> {
    let Json(new) = body.map_err(|e| Problem::invalid("body", e.body_text()))?;
    let role =
        cohort_core::Role::parse(&new.role).map_err(|e| Problem::invalid("role", e.to_string()))?;
    let request = caller.request(pb::CreateTokenRequest {
        name: new.name,
        namespace: new.namespace,
        role: cohort_runtime::wire::role_to_wire(role) as i32,
    });
    let created = call("job-scheduler", state.tokens().create_token(request)).await?;
    let info = created.info.as_ref().map(token_view).ok_or_else(|| {
        Problem::new(
            cohort_core::ErrorKind::Internal,
            "job-scheduler answered without the token's details",
        )
    })?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            info,
            token: created.token,
        }),
    ))
}

/// Deletes an API token (admins); it stops working within the proxy's token cache TTL.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path)), tag = "auth",
    responses((status = 204, description = "deleted"), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn delete_token(
    State(state): State<RestState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    call(
        "job-scheduler",
        state
            .tokens()
            .delete_token(caller.request(pb::DeleteTokenRequest { id })),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The audit log (namespace admins).
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery), tag = "auth",
    responses((status = 200, body = AuditList), (status = "4XX", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn audit(
    State(state): State<RestState>,
    caller: Caller,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditList>, Problem> {
    let q = query(q)?;
    let request = caller.request(pb::ListAuditEntriesRequest {
        namespace: q.namespace.unwrap_or_default(),
        since_ms: q.since_ms.unwrap_or(0),
        page_size: q.page_size.unwrap_or(0),
        page_token: q.page_token.unwrap_or_default(),
    });
    let list = call("job-scheduler", state.audit().list_audit_entries(request)).await?;
    Ok(Json(AuditList {
        entries: list
            .entries
            .into_iter()
            .map(|e| AuditEntry {
                id: e.id,
                time_ms: e.time_ms,
                actor_kind: e.actor_kind,
                actor_id: e.actor_id,
                actor_name: e.actor_name,
                action: e.action,
                object_kind: e.object_kind,
                object_id: e.object_id,
                namespace: e.namespace,
                outcome: e.outcome,
                reason: e.reason,
            })
            .collect(),
        next_page_token: list.next_page_token,
    }))
}
