//! The round protocol parties call (through the proxy), as a thin gRPC edge over
//! [`RoundState`]: model fetch, update and evaluation submission. Streams are bounded in
//! time: a stalled upload or fetch is dropped and frees what it held.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cohort_core::PartyId;
use cohort_fl::{CHUNK_BYTES, UpdateDecoder, chunk_tensors_shared};

use crate::metrics::{Phase, UpdateOutcome};
use cohort_proto::v1 as pb;
use cohort_runtime::ToStatus;
use futures::{Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::round_state::{RoundError, RoundState};
use crate::staging::StagedUpdate;

pub struct RoundApi {
    pub state: Arc<RoundState>,
    /// Every call must carry the party the proxy authenticated (mutual TLS on).
    pub require_party: bool,
    /// An upload or fetch that moves nothing for this long is dropped.
    pub idle_timeout: Duration,
    /// Where updates are staged while they stream in.
    pub staging_dir: std::path::PathBuf,
    /// The job's `compression`: the one dtype its updates' chunks may have.
    pub compression: Option<cohort_core::spec::Compression>,
}

/// The authenticated party of a round call (of `Round` or `SecureAggregation`), when there is
/// one; with `require_party`, a call without one is refused and counted.
pub(crate) fn round_caller<T>(
    state: &RoundState,
    require_party: bool,
    req: &Request<T>,
) -> Result<Option<PartyId>, Status> {
    let party = cohort_runtime::calling_party(req)?;
    if party.is_none() && require_party {
        return Err(state
            .refuse(RoundError::unauthenticated(
                "round calls must come through the proxy with a party certificate",
            ))
            .to_status());
    }
    Ok(party)
}

impl RoundApi {
    /// The authenticated party of a round call, when there is one.
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<PartyId>, Status> {
        round_caller(&self.state, self.require_party, req)
    }
}

/// The next part of an upload (`what`: "upload", "masked upload") within `idle`; a message
/// without a part is passed on as `Some(None)` for the caller to refuse.
pub(crate) async fn next_upload_part(
    inbound: &mut Streaming<pb::SubmitUpdateRequest>,
    idle: Duration,
    what: &str,
) -> Result<Option<Option<pb::submit_update_request::Part>>, RoundError> {
    match tokio::time::timeout(idle, inbound.next()).await {
        Err(_) => Err(RoundError::too_slow(format!(
            "the {what} sent nothing for {}",
            humantime::format_duration(idle)
        ))),
        Ok(None) => Ok(None),
        Ok(Some(Err(s))) => Err(RoundError::invalid(format!(
            "the {what} broke: {}",
            s.message()
        ))),
        Ok(Some(Ok(m))) => Ok(Some(m.part)),
    }
}

/// The header that must open an upload, or the refusal (counted) of what came instead.
pub(crate) fn first_header(
    state: &RoundState,
    first: Result<Option<Option<pb::submit_update_request::Part>>, RoundError>,
) -> Result<pb::UpdateHeader, Status> {
    match first {
        Ok(Some(Some(pb::submit_update_request::Part::Header(h)))) => Ok(h),
        Ok(_) => Err(state
            .refuse(RoundError::invalid(
                "the first message must be the update header",
            ))
            .to_status()),
        Err(e) => Err(state.refuse(e).to_status()),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::TensorChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::round_server::Round for RoundApi {
    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        req: Request<pb::FetchModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let caller = self.caller(&req)?;
        let token = req.into_inner().task_token;
        let ticket = self
            .state
            .claim_fetch(&token, caller.as_ref())
            .await
            .map_err(|e| e.to_status())?;
        tracing::debug!(party = %ticket.party, task = %ticket.task_id, "model fetched");
        let global = self.state.global();
        let idle = self.idle_timeout;
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let sending = cohort_telemetry::trace_span!("send_model", party = %ticket.party);
        tokio::spawn(
            async move {
                let started = std::time::Instant::now();
                // The chunks share the global model's memory: no copy per party.
                for chunk in chunk_tensors_shared(global, CHUNK_BYTES) {
                    state.sent(chunk.data.len());
                    // A reader that stops reading does not keep the model alive.
                    match tokio::time::timeout(idle, tx.send(Ok(chunk))).await {
                        Ok(Ok(())) => {}
                        _ => return,
                    }
                }
                crate::metrics::phase(Phase::Fetch, started.elapsed());
            }
            .instrument(sending),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<pb::SubmitUpdateRequest>>,
    ) -> Result<Response<pb::Ack>, Status> {
        let caller = self.caller(&req)?;
        let mut inbound = req.into_inner();
        let first = next_upload_part(&mut inbound, self.idle_timeout, "upload").await;
        let header = first_header(&self.state, first)?;
        let upload = self
            .state
            .start_upload(&header.task_token, caller.as_ref(), header.samples)
            .await
            .map_err(|e| e.to_status())?;
        let party = upload.ticket().party.clone();
        let task = upload.ticket().task_id.clone();
        let receiving = std::time::Instant::now();
        let received = tokio::select! {
            r = self.receive(&upload, &mut inbound).instrument(cohort_telemetry::trace_span!("receive_update")) => r,
            _ = upload.phase_ended() => Err(Received::Broken(RoundError::too_slow(
                "the round ended while the update was uploaded",
            ))),
            _ = tokio::time::sleep_until(upload.deadline()) => Err(Received::Broken(RoundError::too_slow(
                "the round's deadline passed while the update was uploaded",
            ))),
        };
        // The slot is held until the update is folded: until then it is staged.
        let (update, _slot) = match received {
            Ok(received) => received,
            // Content the model cannot take: the update is dropped, with its reason.
            Err(Received::Bad(why)) => {
                crate::metrics::update(UpdateOutcome::Rejected);
                return Err(upload.reject(why).to_status());
            }
            Err(Received::Broken(e)) => {
                crate::metrics::update(UpdateOutcome::Broken);
                tracing::warn!(%party, %task, error = %e, "update not received");
                // Dropping the upload gives the token back for another try.
                return Err(e.to_status());
            }
        };
        crate::metrics::phase(Phase::Upload, receiving.elapsed());
        let train_loss = header.train.map(|m| m.loss).unwrap_or(f64::NAN);
        let update_bytes: usize = self.state.global().iter().map(|t| t.data.len() * 4).sum();
        let folding = cohort_telemetry::trace_span!("fold_update");
        // The fold reads the staged update back: off the threads that serve the network.
        let norm = tokio::task::spawn_blocking(move || {
            let _in_span = folding.enter();
            let started = std::time::Instant::now();
            let result = upload.complete_checked(update, train_loss);
            if result.is_ok() {
                crate::metrics::folded(update_bytes, started.elapsed());
            }
            result
        })
        .await
        .map_err(|e| Status::internal(format!("the fold of the update failed: {e}")))?
        .map_err(|e| {
            crate::metrics::update(UpdateOutcome::Rejected);
            e.to_status()
        })?;
        crate::metrics::update(UpdateOutcome::Accepted);
        tracing::info!(%party, %task, samples = header.samples, norm, "update folded");
        Ok(Response::new(pb::Ack {
            message: "update accepted".into(),
        }))
    }

    async fn submit_evaluation(
        &self,
        req: Request<pb::SubmitEvaluationRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let m = r.metrics.unwrap_or_default();
        self.state
            .record_evaluation(
                &r.task_token,
                caller.as_ref(),
                m.samples,
                m.loss,
                m.accuracy,
            )
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::Ack {
            message: "evaluation recorded".into(),
        }))
    }
}

/// Why an update was not received.
enum Received {
    /// Its content does not fit the round's model: dropped.
    Bad(String),
    /// The stream broke, stalled or came too late: the token may be used again.
    Broken(RoundError),
}

impl RoundApi {
    /// Decodes the update chunk by chunk as it comes (refusing a dtype the job's spec does
    /// not ask for), checks it (layout, finiteness, effect on the model) and stages it on
    /// disk as f32, so no update is ever whole in memory; a bad chunk
    /// ends it at once. The upload takes one of the slots bounding the updates received at
    /// once when its first chunk arrived: a party that sends a header and stalls holds no
    /// slot. Returns the checked update with its slot, which the caller holds until the
    /// update is folded.
    async fn receive(
        &self,
        upload: &crate::round_state::Upload,
        inbound: &mut Streaming<pb::SubmitUpdateRequest>,
    ) -> Result<(cohort_fl::CheckedUpdate, Option<OwnedSemaphorePermit>), Received> {
        let mut check = upload.check().stream();
        let decoder = UpdateDecoder::new(self.compression, upload.check().layout());
        // The coordinator's disk, not the party's upload: the party may try again.
        let unstaged = |e: std::io::Error| {
            Received::Broken(RoundError::unavailable(format!(
                "the coordinator cannot stage the update: {e}"
            )))
        };
        let mut staged = StagedUpdate::create(&self.staging_dir).map_err(unstaged)?;
        let mut slot = None;
        while let Some(part) = next_upload_part(inbound, self.idle_timeout, "upload")
            .await
            .map_err(Received::Broken)?
        {
            if slot.is_none() {
                slot = Some(upload.slot().await.map_err(Received::Broken)?);
            }
            match part {
                Some(pb::submit_update_request::Part::Chunk(c)) => {
                    // Counted as received, then checked and staged as f32.
                    self.state.received(c.data.len());
                    let c = decoder
                        .decode(c)
                        .map_err(|e| Received::Bad(e.to_string()))?;
                    self.state.decoded(c.data.len());
                    let (tensor, offset) =
                        check.push(&c).map_err(|e| Received::Bad(e.to_string()))?;
                    staged.append(tensor, offset, &c.data).map_err(unstaged)?;
                }
                Some(pb::submit_update_request::Part::Header(_)) => {
                    return Err(Received::Bad("header sent twice".into()));
                }
                None => {}
            }
        }
        let update = check
            .finish(Box::new(staged))
            .map_err(|e| Received::Bad(e.to_string()))?;
        Ok((update, slot))
    }
}

pub struct ControlApi {
    pub state: Arc<RoundState>,
}

#[tonic::async_trait]
impl pb::coordinator_control_server::CoordinatorControl for ControlApi {
    async fn stop(
        &self,
        req: Request<pb::StopCoordinatorRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let reason = req.into_inner().reason;
        let reason = if reason.is_empty() {
            "stopped".to_string()
        } else {
            reason
        };
        tracing::info!(%reason, "stop requested");
        self.state.request_stop(reason);
        Ok(Response::new(pb::Ack {
            message: "stopping".into(),
        }))
    }
}
