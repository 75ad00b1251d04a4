//! The audit log's edge: who made a call ([`Actor`]), one entry per
//! state-changing call ([`Call`]: begun before the work, finished with its
//! outcome, refusals included), the `Audit` API admins read it with, and the
//! entries other services send (`JobControl.RecordAudit`, see
//! [`record_for_service`]).
//!
//! An entry that cannot be written does not change the call's answer: it is
//! logged at error level with every field, so the log keeps what the store
//! could not (see [`Call::finish`] for why).

use std::sync::Arc;

use cohort_core::{Action, AuthError, Principal, Scope};
use cohort_proto::v1 as pb;
use cohort_runtime::{ToStatus, calling_party, calling_principal, peer_identity};
use cohort_security::Identity;
use cohort_store::audit::{AuditFilter, AuditRecord, NewAuditEntry};
use cohort_store::jobs::JobStore;
use tonic::{Code, Request, Response, Status};

/// The page size of a listing that names none.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most entries one answer carries.
const MAX_PAGE_SIZE: u32 = 500;

/// Who made a call.
#[derive(Debug, Clone, PartialEq)]
pub struct Actor {
    /// "token", "party" or "service".
    pub kind: &'static str,
    pub id: String,
    /// The token's name; empty for other actors.
    pub name: String,
    /// The namespaces the caller reaches ("*" for every one): where an entry
    /// about something out of its reach is recorded.
    pub scope: String,
}

impl Actor {
    /// The caller of `req` as every service names it
    /// ([`cohort_runtime::audit::Actor::of`]), with the token's name read from
    /// the store and the namespaces the caller reaches. Never fails: an actor
    /// whose token cannot be read keeps an empty name.
    pub async fn of<T>(store: &dyn JobStore, req: &Request<T>) -> Actor {
        let who = cohort_runtime::audit::Actor::of(req);
        let scope = calling_principal(req)
            .ok()
            .flatten()
            .map_or_else(|| Scope::ALL.to_string(), |p| p.scope.as_str().to_string());
        let name = if who.is_user() {
            token_name(store, &who.id).await
        } else {
            String::new()
        };
        Actor {
            kind: who.kind,
            id: who.id,
            name,
            scope,
        }
    }
}

/// The name of token `id`; empty when there is none or it cannot be read (the
/// id alone still says who it was).
async fn token_name(store: &dyn JobStore, id: &str) -> String {
    if id.is_empty() {
        return String::new();
    }
    match store.get_token(id).await {
        Ok(t) => t.name,
        Err(e) => {
            tracing::debug!(token = %id, error = %e, "no name for the audit entry's token");
            String::new()
        }
    }
}

/// The snake-case name of a gRPC code, as the audit log's outcome.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// One state-changing call on its way to the audit log.
pub struct Call {
    store: Arc<dyn JobStore>,
    actor: Actor,
    action: &'static str,
    object_kind: &'static str,
    /// The object's id, once known.
    pub object_id: String,
    /// The object's namespace once the caller is known to reach it; until
    /// then the caller's own scope, so an entry about something out of its
    /// reach is seen by its own admins, never by the object's.
    pub namespace: String,
}

impl Call {
    pub async fn begin<T>(
        store: &Arc<dyn JobStore>,
        req: &Request<T>,
        action: &'static str,
        object_kind: &'static str,
        object_id: &str,
    ) -> Call {
        let actor = Actor::of(store.as_ref(), req).await;
        Call {
            store: store.clone(),
            namespace: actor.scope.clone(),
            actor,
            action,
            object_kind,
            object_id: object_id.to_string(),
        }
    }

    /// Sets the namespace of the object when the caller reaches it.
    pub fn in_namespace(&mut self, namespace: &str) {
        if Scope::parse(&self.actor.scope).is_ok_and(|s| s.includes(namespace)) {
            self.namespace = namespace.to_string();
        }
    }

    /// Records the call with `result`'s outcome. A failed write is logged
    /// with the whole entry and does not change the answer: the work is done
    /// (a job stopped or a token made cannot be undone here), so failing the
    /// call would tell the caller something false and invite a retry that
    /// does it twice. The audit log shares the database of the work it
    /// records, so a write that fails after the work succeeded is rare.
    pub async fn finish<R>(self, result: &Result<R, Status>) {
        let (outcome, reason) = match result {
            Ok(_) => ("ok", String::new()),
            Err(s) => (code_name(s.code()), s.message().to_string()),
        };
        let entry = NewAuditEntry {
            actor_kind: self.actor.kind.to_string(),
            actor_id: self.actor.id,
            actor_name: self.actor.name,
            action: self.action.to_string(),
            object_kind: self.object_kind.to_string(),
            object_id: self.object_id,
            namespace: self.namespace,
            outcome: outcome.to_string(),
            reason,
        };
        append(self.store.as_ref(), entry).await;
    }
}

/// Appends `entry`, logging a failure (with the entry) once, here.
async fn append(store: &dyn JobStore, entry: NewAuditEntry) -> Option<AuditRecord> {
    match store
        .append_audit(entry.clone(), cohort_runtime::now_ms())
        .await
    {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(
                error = %e,
                actor_kind = %entry.actor_kind,
                actor_id = %entry.actor_id,
                action = %entry.action,
                object_kind = %entry.object_kind,
                object_id = %entry.object_id,
                namespace = %entry.namespace,
                outcome = %entry.outcome,
                reason = %entry.reason,
                "audit entry not stored"
            );
            None
        }
    }
}

fn entry_to_pb(r: AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        id: r.id,
        time_ms: r.time_ms,
        actor_kind: r.actor_kind,
        actor_id: r.actor_id,
        actor_name: r.actor_name,
        action: r.action,
        object_kind: r.object_kind,
        object_id: r.object_id,
        namespace: r.namespace,
        outcome: r.outcome,
        reason: r.reason,
    }
}

/// Which namespace a listing reads: None = every one. `Ok(None)` from the
/// outer option: nothing the caller may see (a namespace out of its reach
/// answers like an empty one).
fn listing_scope(
    principal: Option<&Principal>,
    requested: &str,
) -> Result<Option<Option<String>>, Status> {
    if !requested.is_empty() {
        Scope::parse(requested).map_err(|e| Status::invalid_argument(format!("namespace: {e}")))?;
    }
    let Some(p) = principal else {
        // A server-internal caller reads anything.
        return Ok(Some((!requested.is_empty()).then(|| requested.to_string())));
    };
    let namespace = if requested.is_empty() {
        p.scope.as_str()
    } else {
        requested
    };
    match p.authorize(namespace, Action::Administer) {
        Ok(()) => {}
        Err(AuthError::OutOfScope) => return Ok(None),
        Err(e) => return Err(e.to_status()),
    }
    // A "*" token that names no namespace reads them all.
    Ok(Some(match (requested.is_empty(), &p.scope) {
        (true, Scope::All) => None,
        _ => Some(namespace.to_string()),
    }))
}

#[derive(Clone)]
pub struct AuditApi {
    pub store: Arc<dyn JobStore>,
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditApi {
    async fn list_audit_entries(
        &self,
        req: Request<pb::ListAuditEntriesRequest>,
    ) -> Result<Response<pb::ListAuditEntriesResponse>, Status> {
        let principal = calling_principal(&req)?;
        let r = req.into_inner();
        if r.since_ms < 0 {
            return Err(Status::invalid_argument(
                "since_ms: must be 0 or a time after 1970",
            ));
        }
        if !r.page_token.is_empty() && r.page_token.parse::<u64>().is_err() {
            return Err(Status::invalid_argument(
                "page_token: not one a previous answer gave",
            ));
        }
        let Some(namespace) = listing_scope(principal.as_ref(), &r.namespace)? else {
            return Ok(Response::new(pb::ListAuditEntriesResponse::default()));
        };
        let filter = AuditFilter {
            namespace,
            since_ms: (r.since_ms > 0).then_some(r.since_ms),
        };
        let size = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let token = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let page = self
            .store
            .list_audit(&filter, size, token)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ListAuditEntriesResponse {
            entries: page.items.into_iter().map(entry_to_pb).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }
}

/// `JobControl.RecordAudit`: an entry for a call another service answered.
/// Only server-internal callers reach it (the proxy refuses `JobControl`);
/// it refuses calls that carry a user's or party's identity, and
/// coordinators, which act for one job and change nothing users audit.
pub async fn record_for_service(
    store: &dyn JobStore,
    req: Request<pb::RecordAuditRequest>,
) -> Result<Response<pb::RecordAuditResponse>, Status> {
    if calling_principal(&req)?.is_some() || calling_party(&req)?.is_some() {
        return Err(Status::permission_denied(
            "RecordAudit is for server-internal callers",
        ));
    }
    if let Some(Identity::Service(name)) = peer_identity(&req)
        && name == "coordinator"
    {
        return Err(Status::permission_denied(
            "RecordAudit: coordinators record nothing in the audit log",
        ));
    }
    let r = req.into_inner();
    let e = r
        .entry
        .ok_or_else(|| Status::invalid_argument("entry: required"))?;
    let outcome = code_name(Code::from_i32(r.code));
    if !matches!(e.actor_kind.as_str(), "token" | "party" | "service") {
        return Err(Status::invalid_argument(
            "entry.actor_kind: one of token, party, service",
        ));
    }
    for (field, value) in [
        ("entry.action", &e.action),
        ("entry.object_kind", &e.object_kind),
        ("entry.namespace", &e.namespace),
    ] {
        if value.trim().is_empty() {
            return Err(Status::invalid_argument(format!("{field}: required")));
        }
    }
    let actor_name = if e.actor_kind == "token" {
        token_name(store, &e.actor_id).await
    } else {
        String::new()
    };
    let entry = NewAuditEntry {
        actor_kind: e.actor_kind,
        actor_id: e.actor_id,
        actor_name,
        action: e.action,
        object_kind: e.object_kind,
        object_id: e.object_id,
        namespace: e.namespace,
        outcome: outcome.to_string(),
        reason: e.reason,
    };
    // The caller logs a refusal; the entry is in this log too.
    match append(store, entry).await {
        Some(r) => Ok(Response::new(pb::RecordAuditResponse { id: r.id })),
        None => Err(Status::unavailable("the audit entry was not stored")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_core::Role;

    fn p(scope: &str, role: Role) -> Principal {
        Principal {
            scope: Scope::parse(scope).unwrap(),
            role,
        }
    }

    #[test]
    fn admins_read_their_namespace_others_nothing() {
        let admin_a = p("team-a", Role::Admin);
        assert_eq!(
            listing_scope(Some(&admin_a), "").unwrap(),
            Some(Some("team-a".into()))
        );
        assert_eq!(
            listing_scope(Some(&admin_a), "team-a").unwrap(),
            Some(Some("team-a".into()))
        );
        // Out of reach: like an empty namespace.
        assert_eq!(listing_scope(Some(&admin_a), "team-b").unwrap(), None);
        assert_eq!(listing_scope(Some(&admin_a), "*").unwrap(), None);
        let all = p("*", Role::Admin);
        assert_eq!(listing_scope(Some(&all), "").unwrap(), Some(None));
        assert_eq!(
            listing_scope(Some(&all), "team-b").unwrap(),
            Some(Some("team-b".into()))
        );
        for weak in [Role::Viewer, Role::Member] {
            let s = listing_scope(Some(&p("team-a", weak)), "").unwrap_err();
            assert_eq!(s.code(), Code::PermissionDenied, "{weak:?}");
        }
        assert_eq!(
            listing_scope(Some(&admin_a), "Bad Name!")
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        assert_eq!(listing_scope(None, "").unwrap(), Some(None));
    }

    #[test]
    fn codes_have_snake_case_names() {
        assert_eq!(code_name(Code::PermissionDenied), "permission_denied");
        assert_eq!(code_name(Code::Ok), "ok");
    }
}
