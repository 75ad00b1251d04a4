//! API tokens: the `Tokens` API for admins and the server-internal `Auth`
//! lookup the proxy makes for every user call. Only hashes are stored.

use std::sync::Arc;

use cohort_core::{Action, AuthError, Principal, Role, Scope};
use cohort_proto::v1 as pb;
use cohort_runtime::wire::{role_from_wire, role_to_wire};
use cohort_runtime::{ToStatus, calling_principal};
use cohort_security::ApiToken;
use cohort_store::StoreError;
use cohort_store::jobs::JobStore;
use cohort_store::tokens::{NewToken, TokenRecord};
use tonic::{Request, Response, Status};

use crate::audit::Call;

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Keeps the admin token of `cohort up` (or of an operator) in the store.
pub async fn ensure_bootstrap_admin(store: &dyn JobStore, sha256: &str) -> Result<(), StoreError> {
    let token = NewToken {
        id: format!("admin-{}", &sha256[..12]),
        name: "bootstrap admin".to_string(),
        sha256: sha256.to_string(),
        namespace: Scope::ALL.to_string(),
        role: Role::Admin.as_str().to_string(),
    };
    store.ensure_token(token, cohort_runtime::now_ms()).await?;
    Ok(())
}

/// A stored role's wire value (unspecified for a role this version does not know).
fn role_to_pb(role: &str) -> i32 {
    Role::parse(role).map_or(pb::Role::Unspecified, role_to_wire) as i32
}

fn role_from_pb(v: i32) -> Result<Role, Status> {
    role_from_wire(v)
        .ok_or_else(|| Status::invalid_argument("role: required, one of admin, member, viewer"))
}

fn info(t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        namespace: t.namespace.clone(),
        role: role_to_pb(&t.role),
        created_at_ms: t.created_at_ms,
    }
}

fn auth_status(e: AuthError, what: &str) -> Status {
    match e {
        AuthError::OutOfScope => Status::not_found(format!("{what} not found")),
        e => e.to_status(),
    }
}

/// Checks an administrative call on `scope`; internal callers (no principal) may.
fn require_admin(principal: &Option<Principal>, scope: &Scope) -> Result<(), Status> {
    match principal {
        None => Ok(()),
        Some(p) => p
            .authorize_scope(scope, Action::Administer)
            .map_err(|e| auth_status(e, "namespace")),
    }
}

#[derive(Clone)]
pub struct TokensApi {
    pub store: Arc<dyn JobStore>,
}

#[tonic::async_trait]
impl pb::tokens_server::Tokens for TokensApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let mut call = Call::begin(&self.store, &req, "token.create", "token", "").await;
        let result = self.create_token_audited(req, &mut call).await;
        call.finish(&result).await;
        result
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.list_tokens_unaudited(req).await
    }

    async fn delete_token(
        &self,
        req: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        let id = req.get_ref().id.clone();
        let mut call = Call::begin(&self.store, &req, "token.delete", "token", &id).await;
        let result = self.delete_token_audited(req, &mut call).await;
        call.finish(&result).await;
        result
    }
}

impl TokensApi {
    async fn create_token_audited(
        &self,
        req: Request<pb::CreateTokenRequest>,
        call: &mut Call,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let principal = calling_principal(&req)?;
        let r = req.into_inner();
        let scope = match (r.namespace.as_str(), &principal) {
            ("", Some(p)) => p.scope.clone(),
            ("", None) => return Err(Status::invalid_argument("namespace: required")),
            (ns, _) => Scope::parse(ns).map_err(|e| e.to_status())?,
        };
        let role = role_from_pb(r.role)?;
        let name = r.name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(Status::invalid_argument("name: 1 to 128 characters"));
        }
        if principal.as_ref().is_none_or(|p| p.scope.covers(&scope)) {
            call.namespace = scope.as_str().to_string();
        }
        require_admin(&principal, &scope)?;
        let token = ApiToken::generate();
        let record = self
            .store
            .insert_token(
                NewToken {
                    id: cohort_core::random_token(6),
                    name: name.to_string(),
                    sha256: token.sha256(),
                    namespace: scope.as_str().to_string(),
                    role: role.as_str().to_string(),
                },
                cohort_runtime::now_ms(),
            )
            .await
            .map_err(|e| e.to_status())?;
        call.object_id = record.id.clone();
        tracing::info!(id = %record.id, namespace = %record.namespace, role = %record.role, "API token created");
        Ok(Response::new(pb::CreateTokenResponse {
            info: Some(info(&record)),
            token: token.expose().to_string(),
        }))
    }

    /// Reads only: nothing goes to the audit log.
    async fn list_tokens_unaudited(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let principal = calling_principal(&req)?;
        let r = req.into_inner();
        let filter = match (r.namespace.as_str(), &principal) {
            ("", Some(p)) => p.scope.clone(),
            ("", None) => Scope::All,
            (ns, _) => Scope::parse(ns).map_err(|e| e.to_status())?,
        };
        require_admin(&principal, &filter)?;
        let tokens = self
            .store
            .list_tokens(filter.namespace())
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(info).collect(),
        }))
    }

    async fn delete_token_audited(
        &self,
        req: Request<pb::DeleteTokenRequest>,
        call: &mut Call,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        let principal = calling_principal(&req)?;
        let id = req.into_inner().id;
        let not_found = || Status::not_found(format!("token {id:?} not found"));
        let token = match self.store.get_token(&id).await {
            Ok(t) => t,
            Err(StoreError::NotFound { .. }) => return Err(not_found()),
            Err(e) => return Err(e.to_status()),
        };
        let scope = Scope::parse(&token.namespace).map_err(|e| e.to_status())?;
        if principal.as_ref().is_none_or(|p| p.scope.covers(&scope)) {
            call.namespace = scope.as_str().to_string();
        }
        if let Some(p) = &principal {
            match p.authorize_scope(&scope, Action::Administer) {
                Ok(()) => {}
                // Tokens of namespaces the caller cannot administer are not there for it.
                Err(_) if !p.scope.covers(&scope) => return Err(not_found()),
                Err(e) => return Err(e.to_status()),
            }
        }
        self.store
            .delete_token(&id)
            .await
            .map_err(|e| e.to_status())?;
        tracing::info!(%id, "API token deleted");
        Ok(Response::new(pb::DeleteTokenResponse {}))
    }
}

#[derive(Clone)]
pub struct AuthApi {
    pub store: Arc<dyn JobStore>,
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthApi {
    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::Principal>, Status> {
        let sha256 = req.into_inner().token_sha256;
        if !is_sha256_hex(&sha256) {
            return Err(Status::invalid_argument(
                "token_sha256: 64 lowercase hex digits",
            ));
        }
        // The proxy waits a few seconds for this answer; a database that is down would make
        // the lookup wait out the pool's timeout, and the user see "did not answer in time"
        // instead of the cause.
        let lookup = tokio::time::timeout(AUTH_LOOKUP_TIMEOUT, self.store.token_by_sha256(&sha256));
        let Ok(found) = lookup.await else {
            return Err(Status::unavailable(format!(
                "database unavailable: no answer within {}",
                humantime::format_duration(AUTH_LOOKUP_TIMEOUT)
            )));
        };
        match found {
            Ok(t) => Ok(Response::new(pb::Principal {
                namespace: t.namespace.clone(),
                role: role_to_pb(&t.role),
                token_id: t.id,
            })),
            Err(StoreError::NotFound { .. }) => Err(Status::unauthenticated("unknown API token")),
            Err(e) => Err(e.to_status()),
        }
    }
}

/// How long a token lookup may wait for the database (less than the proxy's patience).
const AUTH_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_is_checked() {
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)));
        assert!(!is_sha256_hex(&"a".repeat(63)));
    }
}
