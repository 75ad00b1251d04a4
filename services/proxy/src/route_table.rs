//! Job id -> coordinator endpoint, copied from job-scheduler's `ListRoutes`.
//! The proxy keeps no state of its own: a restarted proxy reloads it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cohort_proto::v1::ListRoutesRequest;
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_runtime::Channel;
use tokio::time::Instant;

use crate::{Endpoint, ProxyError};

/// What a job id resolves to.
pub(crate) enum Resolution {
    Found(Endpoint),
    /// job-scheduler answered and has no coordinator for the job.
    Unknown,
    /// job-scheduler could not be asked; the cached table has no entry.
    Unavailable(String),
}

pub(crate) struct RouteTable {
    routes: RwLock<HashMap<String, Endpoint>>,
    client: JobControlClient<Channel>,
    scheduler: String,
    timeout: Duration,
    /// Serialises reloads; holds when the last successful one started.
    reload: tokio::sync::Mutex<Option<Instant>>,
}

impl RouteTable {
    pub(crate) fn new(
        job_scheduler: &Endpoint,
        tls: Option<&cohort_runtime::Tls>,
        timeout: Duration,
    ) -> Result<Self, ProxyError> {
        let scheduler = job_scheduler.to_string();
        let channel = cohort_runtime::channel(&scheduler, tls)?;
        Ok(Self {
            routes: RwLock::new(HashMap::new()),
            client: JobControlClient::new(channel),
            scheduler,
            timeout,
            reload: tokio::sync::Mutex::new(None),
        })
    }

    fn get(&self, job: &str) -> Option<Endpoint> {
        // A panic elsewhere cannot leave a map half-written: writers swap it whole.
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.get(job).cloned()
    }

    /// Looks the job up; on a miss reloads once (sharing a reload that started
    /// after the miss with concurrent callers) before giving up.
    pub(crate) async fn resolve(&self, job: &str) -> Resolution {
        if let Some(ep) = self.get(job) {
            return Resolution::Found(ep);
        }
        let missed_at = Instant::now();
        let mut last = self.reload.lock().await;
        let fresh = last.is_some_and(|started| started >= missed_at);
        if !fresh && let Err(e) = self.reload_locked(&mut last).await {
            return match self.get(job) {
                Some(ep) => Resolution::Found(ep),
                None => Resolution::Unavailable(e),
            };
        }
        match self.get(job) {
            Some(ep) => Resolution::Found(ep),
            None => Resolution::Unknown,
        }
    }

    /// Reloads the whole table; returns how many routes it holds.
    pub(crate) async fn reload(&self) -> Result<usize, String> {
        let mut last = self.reload.lock().await;
        self.reload_locked(&mut last).await
    }

    async fn reload_locked(&self, last: &mut Option<Instant>) -> Result<usize, String> {
        let started = Instant::now();
        let mut client = self.client.clone();
        let response = tokio::time::timeout(self.timeout, client.list_routes(ListRoutesRequest {}))
            .await
            .map_err(|_| {
                format!(
                    "job-scheduler at {} did not answer ListRoutes within {:?}",
                    self.scheduler, self.timeout
                )
            })?
            .map_err(|s| {
                format!(
                    "job-scheduler at {}: ListRoutes failed: {:?}: {}",
                    self.scheduler,
                    s.code(),
                    s.message()
                )
            })?;
        let mut table = HashMap::new();
        for route in response.into_inner().routes {
            if route.job_id.is_empty() {
                tracing::warn!(endpoint = %route.endpoint, "ignoring route with empty job_id");
                continue;
            }
            match Endpoint::parse(&route.endpoint) {
                Ok(ep) => {
                    table.insert(route.job_id, ep);
                }
                Err(reason) => tracing::warn!(
                    job = %route.job_id,
                    endpoint = %route.endpoint,
                    %reason,
                    "ignoring route with invalid endpoint"
                ),
            }
        }
        let count = table.len();
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = table;
        *last = Some(started);
        Ok(count)
    }

    /// Reloads every `interval` for ever (retrying faster until the first
    /// load succeeds); the caller aborts it.
    pub(crate) async fn refresh_loop(self: Arc<Self>, interval: Duration) {
        let retry = interval.min(Duration::from_millis(500));
        let mut loaded = false;
        let mut healthy = true;
        let mut previous = None;
        loop {
            match self.reload().await {
                Ok(count) => {
                    if !loaded || !healthy || previous != Some(count) {
                        tracing::info!(routes = count, "job route table loaded");
                    }
                    loaded = true;
                    healthy = true;
                    previous = Some(count);
                }
                Err(e) => {
                    // Warn once per outage, not every tick.
                    if healthy {
                        tracing::warn!(error = %e, "cannot load job route table, retrying");
                    } else {
                        tracing::debug!(error = %e, "cannot load job route table");
                    }
                    healthy = false;
                }
            }
            tokio::time::sleep(if loaded { interval } else { retry }).await;
        }
    }
}
