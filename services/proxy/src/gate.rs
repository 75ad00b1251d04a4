//! Who is calling: parties prove themselves with a client certificate of the
//! federation CA, users with an API token. The gate strips identity metadata
//! a caller sent and sets what it verified, so services behind the proxy can
//! trust it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::v1::auth_client::AuthClient;
use cohort_proto::v1::client_selector_client::ClientSelectorClient;
use cohort_proto::v1::{AuthenticateRequest, ListRevokedRequest};
use cohort_proto::{
    IDENTITY_METADATA_KEYS, NAMESPACE_METADATA_KEY, PARTY_METADATA_KEY, ROLE_METADATA_KEY,
    TOKEN_METADATA_KEY,
};
use cohort_runtime::Channel;
use cohort_runtime::Tls;
use cohort_security::Identity;
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderValue};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::routing::Audience;
use crate::{Endpoint, ProxyError};

const TOKEN_CACHE_MAX: usize = 4096;

pub(crate) type RevokedParties = Arc<HashSet<String>>;

/// What a checked token stands for, as the metadata the proxy sets.
#[derive(Clone)]
struct Checked {
    namespace: HeaderValue,
    role: HeaderValue,
    /// The token's id: who made the call, for the audit log.
    token_id: HeaderValue,
}

pub(crate) struct Gate {
    /// Off only with `--insecure`: nothing is checked.
    enforce: bool,
    auth: AuthClient<Channel>,
    selector: ClientSelectorClient<Channel>,
    timeout: Duration,
    cache_ttl: Duration,
    /// token sha256 -> (checked at, namespace, role).
    cache: Mutex<HashMap<String, (Instant, Checked)>>,
    revoked: watch::Sender<RevokedParties>,
}

impl Gate {
    pub(crate) fn new(
        enforce: bool,
        job_scheduler: &Endpoint,
        client_selector: &Endpoint,
        upstream_tls: Option<&Tls>,
        timeout: Duration,
        cache_ttl: Duration,
    ) -> Result<Self, ProxyError> {
        let auth = cohort_runtime::channel(&job_scheduler.to_string(), upstream_tls)?;
        let selector = cohort_runtime::channel(&client_selector.to_string(), upstream_tls)?;
        Ok(Self {
            enforce,
            auth: AuthClient::new(auth),
            selector: ClientSelectorClient::new(selector),
            timeout,
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            revoked: watch::Sender::new(Arc::default()),
        })
    }

    pub(crate) fn revoked(&self) -> watch::Receiver<RevokedParties> {
        self.revoked.subscribe()
    }

    /// Checks the caller of a call for `audience` and rewrites the identity
    /// metadata accordingly; `Err` is the answer to send instead.
    pub(crate) async fn admit(
        &self,
        audience: Audience,
        peer: Option<&Identity>,
        headers: &mut HeaderMap,
    ) -> Result<(), Status> {
        for key in IDENTITY_METADATA_KEYS {
            headers.remove(key);
        }
        if !self.enforce {
            return Ok(());
        }
        match audience {
            Audience::Anyone => Ok(()),
            Audience::User => {
                // The secret goes no further than the proxy.
                let value = headers.remove(AUTHORIZATION).ok_or_else(|| {
                    Status::unauthenticated(
                        "an API token is required: send `authorization: Bearer <token>` \
                         (the cohort CLI reads it from its profile)",
                    )
                })?;
                let text = value
                    .to_str()
                    .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
                let token = cohort_security::bearer_token(text)
                    .map_err(|e| Status::unauthenticated(e.to_string()))?;
                let checked = self.authenticate(&token.sha256()).await?;
                headers.insert(NAMESPACE_METADATA_KEY, checked.namespace);
                headers.insert(ROLE_METADATA_KEY, checked.role);
                headers.insert(TOKEN_METADATA_KEY, checked.token_id);
                Ok(())
            }
            Audience::Party => match peer {
                Some(Identity::Party(name)) => {
                    if self.revoked.borrow().contains(name) {
                        return Err(Status::permission_denied(format!(
                            "party {name} is revoked"
                        )));
                    }
                    let value = HeaderValue::from_str(name)
                        .map_err(|_| Status::unauthenticated("party name is not a header value"))?;
                    headers.insert(PARTY_METADATA_KEY, value);
                    Ok(())
                }
                Some(other) => Err(Status::permission_denied(format!(
                    "{other} is not a party: party APIs need a party certificate"
                ))),
                None => Err(Status::unauthenticated(
                    "a party client certificate is required (cohort cert issue --party NAME)",
                )),
            },
        }
    }

    async fn authenticate(&self, sha256: &str) -> Result<Checked, Status> {
        if let Some((at, checked)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sha256)
            && at.elapsed() < self.cache_ttl
        {
            return Ok(checked.clone());
        }
        let mut client = self.auth.clone();
        let request = AuthenticateRequest {
            token_sha256: sha256.to_string(),
        };
        let principal = match tokio::time::timeout(self.timeout, client.authenticate(request)).await
        {
            Err(_) => {
                return Err(Status::unavailable(
                    "cannot check the API token: job-scheduler did not answer in time",
                ));
            }
            Ok(Err(s)) if matches!(s.code(), Code::NotFound | Code::Unauthenticated) => {
                return Err(Status::unauthenticated("the API token is not valid"));
            }
            Ok(Err(s)) => {
                tracing::warn!(code = ?s.code(), error = %s.message(), "cannot check an API token");
                return Err(Status::unavailable(format!(
                    "cannot check the API token: job-scheduler: {}",
                    s.message()
                )));
            }
            Ok(Ok(p)) => p.into_inner(),
        };
        let role = cohort_runtime::wire::role_from_wire(principal.role)
            .ok_or_else(|| Status::internal("job-scheduler returned a token without a role"))?
            .as_str();
        let namespace = HeaderValue::from_str(&principal.namespace)
            .map_err(|_| Status::internal("job-scheduler returned an unusable namespace"))?;
        let role = HeaderValue::from_static(role);
        let token_id = HeaderValue::from_str(&principal.token_id)
            .map_err(|_| Status::internal("job-scheduler returned an unusable token id"))?;
        let checked = Checked {
            namespace,
            role,
            token_id,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= TOKEN_CACHE_MAX {
            cache.clear();
        }
        cache.insert(sha256.to_string(), (Instant::now(), checked.clone()));
        Ok(checked)
    }

    /// Reloads the revoked parties from client-selector every `interval`;
    /// connections of a newly revoked party are closed by their watchers.
    pub(crate) async fn revocation_loop(self: Arc<Self>, interval: Duration) {
        let mut healthy = true;
        loop {
            let mut client = self.selector.clone();
            match tokio::time::timeout(self.timeout, client.list_revoked(ListRevokedRequest {}))
                .await
            {
                Ok(Ok(list)) => {
                    let parties: HashSet<String> = list.into_inner().parties.into_iter().collect();
                    if **self.revoked.borrow() != parties {
                        tracing::info!(revoked = parties.len(), "revoked parties updated");
                        self.revoked.send_replace(Arc::new(parties));
                    }
                    healthy = true;
                }
                Ok(Err(s)) => {
                    if healthy {
                        tracing::warn!(error = %s.message(), "cannot load revoked parties, retrying");
                    }
                    healthy = false;
                }
                Err(_) => {
                    if healthy {
                        tracing::warn!(
                            "client-selector did not answer ListRevoked in time, retrying"
                        );
                    }
                    healthy = false;
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
}
