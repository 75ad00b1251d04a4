//! Recording a call in job-scheduler's audit log from another service
//! (`JobControl.RecordAudit`): client-selector's revocations, model-manager's
//! uploads by users. job-scheduler owns the log; a service that answers a
//! state-changing call itself sends the entry there with [`AuditClient`].
//!
//! Recording never changes the call's answer: the work is done (or refused)
//! whether or not job-scheduler stores the entry, and failing the call over
//! it would tell the caller something false. An entry that cannot be sent
//! within [`AUDIT_TIMEOUT`] (or is refused, or has nowhere to go) is logged
//! once, at error level, with every field, so the log keeps what the audit
//! log could not.

use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1 as pb;
use cohort_proto::v1::job_control_client::JobControlClient;
use futures::future::BoxFuture;
use tonic::{Code, Request, Status};

use crate::tls::{Tls, calling_party, calling_principal, calling_token, peer_identity};
use crate::{RuntimeError, channel};

/// How long a call waits for its audit entry to be stored.
pub const AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where entries go: `RecordAudit` on job-scheduler, or a stand-in (tests).
pub type AuditSink =
    Arc<dyn Fn(pb::RecordAuditRequest) -> BoxFuture<'static, Result<(), Status>> + Send + Sync>;

/// Who made a call, as the audit log names actors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// "token", "party" or "service".
    pub kind: &'static str,
    pub id: String,
}

impl Actor {
    /// The caller of `req`: the API token the proxy checked (its id; the
    /// proxy sends it with the principal), else the party the proxy
    /// authenticated, else the service that called from inside (the name in
    /// its certificate; "internal" without TLS). A service acting for a
    /// namespace (a coordinator's `act_as`) carries a principal but no token:
    /// it is that service.
    pub fn of<T>(req: &Request<T>) -> Actor {
        if calling_principal(req).ok().flatten().is_some()
            && let Some(id) = calling_token(req).ok().flatten()
        {
            return Actor { kind: "token", id };
        }
        if let Some(party) = calling_party(req).ok().flatten() {
            return Actor {
                kind: "party",
                id: party.to_string(),
            };
        }
        Actor {
            kind: "service",
            id: peer_identity(req).map_or_else(|| "internal".to_string(), |i| i.name().to_string()),
        }
    }

    /// Whether this is a user: the holder of an API token.
    pub fn is_user(&self) -> bool {
        self.kind == "token"
    }
}

/// One entry for `RecordAudit`: `actor` did `action` on the object
/// (`object_kind`, `object_id`) of `namespace`, answered with `result` (its
/// code as the outcome, its message as the reason).
pub fn entry<R>(
    actor: &Actor,
    action: &str,
    object_kind: &str,
    object_id: &str,
    namespace: &str,
    result: &Result<R, Status>,
) -> pb::RecordAuditRequest {
    let (code, reason) = match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    };
    pb::RecordAuditRequest {
        entry: Some(pb::AuditEntry {
            actor_kind: actor.kind.to_string(),
            actor_id: actor.id.clone(),
            action: action.to_string(),
            object_kind: object_kind.to_string(),
            object_id: object_id.to_string(),
            namespace: namespace.to_string(),
            reason,
            ..Default::default()
        }),
        code: code as i32,
    }
}

/// Sends entries to job-scheduler's audit log, or (without an endpoint)
/// logs each one as not recorded.
#[derive(Clone)]
pub struct AuditClient {
    /// The service sending (for the log lines).
    service: &'static str,
    sink: Option<AuditSink>,
    timeout: Duration,
}

impl AuditClient {
    /// Entries to job-scheduler at `endpoint` (host:port), over mutual TLS
    /// with `tls`. The channel connects on first use.
    pub fn connect(
        service: &'static str,
        endpoint: &str,
        tls: Option<&Tls>,
    ) -> Result<AuditClient, RuntimeError> {
        let client = JobControlClient::new(channel(endpoint, tls)?);
        let sink: AuditSink = Arc::new(move |request| {
            let mut client = client.clone();
            Box::pin(async move { client.record_audit(request).await.map(|_| ()) })
        });
        Ok(AuditClient::with_sink(service, sink))
    }

    /// [`AuditClient::connect`] when `endpoint` is given (a
    /// `--job-scheduler` flag); otherwise one that records nothing, warned
    /// about now and logged as an error with every entry.
    pub fn from_flag(
        service: &'static str,
        endpoint: Option<&str>,
        tls: Option<&Tls>,
    ) -> Result<AuditClient, RuntimeError> {
        match endpoint {
            Some(endpoint) => AuditClient::connect(service, endpoint, tls),
            None => {
                tracing::warn!(
                    "{service} has no --job-scheduler: the calls it audits are not recorded in \
                     the audit log"
                );
                Ok(AuditClient::none(service))
            }
        }
    }

    /// Entries to `sink` (tests, or another transport).
    pub fn with_sink(service: &'static str, sink: AuditSink) -> AuditClient {
        AuditClient {
            service,
            sink: Some(sink),
            timeout: AUDIT_TIMEOUT,
        }
    }

    /// Nowhere to send entries: each is logged as an error instead.
    pub fn none(service: &'static str) -> AuditClient {
        AuditClient {
            service,
            sink: None,
            timeout: AUDIT_TIMEOUT,
        }
    }

    /// The longest wait for job-scheduler's answer (default [`AUDIT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> AuditClient {
        self.timeout = timeout;
        self
    }

    /// Records `request`, waiting at most the timeout. A failure is logged
    /// here, once, with the entry; it is never the caller's: see the module
    /// header.
    pub async fn record(&self, request: pb::RecordAuditRequest) {
        let failure = match &self.sink {
            None => format!("{} has no --job-scheduler", self.service),
            Some(sink) => match tokio::time::timeout(self.timeout, sink(request.clone())).await {
                Ok(Ok(())) => return,
                Ok(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
                Err(_) => format!("job-scheduler did not answer within {:?}", self.timeout),
            },
        };
        let e = request.entry.unwrap_or_default();
        tracing::error!(
            error = %failure,
            actor_kind = %e.actor_kind,
            actor_id = %e.actor_id,
            action = %e.action,
            object_kind = %e.object_kind,
            object_id = %e.object_id,
            namespace = %e.namespace,
            outcome = ?Code::from_i32(request.code),
            reason = %e.reason,
            "audit entry not recorded"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_core::Role;
    use std::sync::Mutex;

    #[test]
    fn a_token_is_a_user_a_service_acting_for_a_namespace_is_not() {
        let mut req = Request::new(());
        crate::wire::act_as(&mut req, "team-a", Role::Member).unwrap();
        assert_eq!(
            Actor::of(&req),
            Actor {
                kind: "service",
                id: "internal".into()
            }
        );
        req.metadata_mut()
            .insert(cohort_proto::TOKEN_METADATA_KEY, "tok-1".parse().unwrap());
        let actor = Actor::of(&req);
        assert_eq!(
            actor,
            Actor {
                kind: "token",
                id: "tok-1".into()
            }
        );
        assert!(actor.is_user());
        let mut party = Request::new(());
        party
            .metadata_mut()
            .insert(cohort_proto::PARTY_METADATA_KEY, "party-1".parse().unwrap());
        assert_eq!(Actor::of(&party).kind, "party");
    }

    #[test]
    fn entries_carry_the_outcome_and_the_reason() {
        let actor = Actor {
            kind: "token",
            id: "t".into(),
        };
        let ok = entry(
            &actor,
            "model.upload",
            "model",
            "m@1",
            "team-a",
            &Ok::<(), _>(()),
        );
        assert_eq!(ok.code, Code::Ok as i32);
        let e = ok.entry.unwrap();
        assert_eq!(
            (e.action.as_str(), e.object_id.as_str(), e.reason.as_str()),
            ("model.upload", "m@1", "")
        );
        let refused = entry::<()>(
            &actor,
            "model.upload",
            "model",
            "m",
            "team-a",
            &Err(Status::permission_denied("viewers read")),
        );
        assert_eq!(refused.code, Code::PermissionDenied as i32);
        assert_eq!(refused.entry.unwrap().reason, "viewers read");
    }

    #[tokio::test]
    async fn entries_reach_the_sink_and_a_stalled_one_does_not_hold_the_call() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = seen.clone();
        let sink: AuditSink = Arc::new(move |r| {
            kept.lock().unwrap().push(r);
            Box::pin(async { Ok(()) })
        });
        let actor = Actor {
            kind: "service",
            id: "x".into(),
        };
        let request = entry(&actor, "a", "k", "o", "*", &Ok::<(), _>(()));
        AuditClient::with_sink("test", sink)
            .record(request.clone())
            .await;
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            std::slice::from_ref(&request)
        );

        let stalled: AuditSink = Arc::new(|_| Box::pin(futures::future::pending()));
        let started = std::time::Instant::now();
        AuditClient::with_sink("test", stalled)
            .with_timeout(Duration::from_millis(50))
            .record(request.clone())
            .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        // Nowhere to send: logged, returns.
        AuditClient::none("test").record(request).await;
    }
}
