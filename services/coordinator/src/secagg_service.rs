//! The `SecureAggregation` calls parties make (through the proxy), as a thin gRPC edge over
//! [`SecAgg`]: the party is the one of the caller's task token, messages convert into
//! `cohort-secagg`'s structs here, and waiting calls answer within [`LONG_POLL`] (with
//! `waiting: true` when nothing is there yet).

use std::sync::Arc;
use std::time::Duration;

use cohort_core::PartyId;
use cohort_proto::v1 as pb;
use cohort_runtime::ToStatus;
use cohort_secagg::{EncryptedShare, RevealedShare, UnmaskResponse};
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::round_service::{first_header, next_upload_part};
use crate::round_state::{RoundError, RoundState, Ticket};
use crate::secagg::SecAgg;

/// How long a waiting call waits before it answers `waiting: true`.
pub const LONG_POLL: Duration = Duration::from_secs(20);

pub struct SecAggApi {
    pub secagg: Arc<SecAgg>,
    pub state: Arc<RoundState>,
    /// Every call must carry the party the proxy authenticated (mutual TLS on).
    pub require_party: bool,
    /// A masked upload that moves nothing for this long is dropped.
    pub idle_timeout: Duration,
}

fn ack(message: &str) -> Response<pb::Ack> {
    Response::new(pb::Ack {
        message: message.to_string(),
    })
}

impl SecAggApi {
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<PartyId>, Status> {
        crate::round_service::round_caller(&self.state, self.require_party, req)
    }

    /// The caller's training ticket of the current round.
    async fn ticket<T>(&self, req: &Request<T>, token: &str) -> Result<Ticket, Status> {
        let caller = self.caller(req)?;
        self.state
            .claim_secagg(token, caller.as_ref())
            .await
            .map_err(|e| e.to_status())
    }

    /// The next part of a masked upload, within the idle timeout.
    async fn next_part(
        &self,
        inbound: &mut Streaming<pb::SubmitUpdateRequest>,
    ) -> Result<Option<Option<pb::submit_update_request::Part>>, RoundError> {
        next_upload_part(inbound, self.idle_timeout, "masked upload").await
    }

    /// Asks `look` until it has an answer, the session changes to one, or [`LONG_POLL`].
    async fn wait<T>(
        &self,
        ticket: &Ticket,
        look: impl Fn(&SecAgg, &Ticket) -> Result<Option<T>, RoundError>,
    ) -> Result<Option<T>, Status> {
        let until = Instant::now() + LONG_POLL;
        let mut changed = self.secagg.watch();
        loop {
            if let Some(found) = look(&self.secagg, ticket).map_err(|e| e.to_status())? {
                return Ok(Some(found));
            }
            if tokio::time::timeout_at(until, changed.changed())
                .await
                .is_err()
            {
                return Ok(None);
            }
        }
    }
}

fn share_to_wire(s: EncryptedShare) -> pb::SecAggShare {
    pb::SecAggShare {
        sender: s.sender,
        recipient: s.recipient,
        ciphertext: s.ciphertext.into(),
    }
}

fn revealed(shares: Vec<pb::SecAggRevealedShare>) -> Vec<RevealedShare> {
    shares
        .into_iter()
        .map(|s| RevealedShare {
            owner: s.owner,
            share: s.share.to_vec(),
        })
        .collect()
}

/// Most shares one message may carry: one per other party of the largest roster.
const MAX_SHARES: usize = 10_000;

#[tonic::async_trait]
impl pb::secure_aggregation_server::SecureAggregation for SecAggApi {
    async fn advertise(
        &self,
        req: Request<pb::SecAggAdvertiseRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let ticket = self.ticket(&req, &req.get_ref().task_token).await?;
        let r = req.into_inner();
        self.secagg
            .advertise(&ticket, &r.c_pk, &r.s_pk, &r.b_commitment)
            .map_err(|e| e.to_status())?;
        tracing::debug!(party = %ticket.party, round = ticket.round, "secure aggregation: keys advertised");
        Ok(ack("keys advertised"))
    }

    async fn get_roster(
        &self,
        req: Request<pb::SecAggWaitRequest>,
    ) -> Result<Response<pb::SecAggRoster>, Status> {
        let ticket = self.ticket(&req, &req.get_ref().task_token).await?;
        let roster = self.wait(&ticket, |s, t| s.roster(t)).await?;
        Ok(Response::new(match roster {
            None => pb::SecAggRoster {
                waiting: true,
                ..Default::default()
            },
            Some(r) => pb::SecAggRoster {
                waiting: false,
                threshold: r.threshold as u32,
                clip: r.clip,
                neighbours: r.neighbours.degree() as u32,
                parties: r
                    .parties
                    .into_iter()
                    .map(|e| pb::SecAggRosterEntry {
                        party: e.party,
                        c_pk: e.c_pk.to_vec().into(),
                        s_pk: e.s_pk.to_vec().into(),
                    })
                    .collect(),
            },
        }))
    }

    async fn share_keys(
        &self,
        req: Request<pb::SecAggShareKeysRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let ticket = self.ticket(&req, &req.get_ref().task_token).await?;
        let r = req.into_inner();
        if r.shares.len() > MAX_SHARES {
            let e = RoundError::invalid(format!(
                "shares: {} shares, at most {MAX_SHARES}",
                r.shares.len()
            ));
            return Err(self.state.refuse_secagg(&ticket, e).to_status());
        }
        let round = self.secagg.round_id(ticket.round);
        let shares = r
            .shares
            .into_iter()
            .map(|s| EncryptedShare {
                round: round.clone(),
                sender: s.sender,
                recipient: s.recipient,
                ciphertext: s.ciphertext.to_vec(),
            })
            .collect();
        self.secagg
            .share_keys(&ticket, shares)
            .map_err(|e| e.to_status())?;
        Ok(ack("shares taken"))
    }

    async fn get_shares(
        &self,
        req: Request<pb::SecAggWaitRequest>,
    ) -> Result<Response<pb::SecAggShares>, Status> {
        let ticket = self.ticket(&req, &req.get_ref().task_token).await?;
        let delivery = self.wait(&ticket, |s, t| s.delivery(t)).await?;
        Ok(Response::new(match delivery {
            None => pb::SecAggShares {
                waiting: true,
                ..Default::default()
            },
            Some(d) => pb::SecAggShares {
                waiting: false,
                sharers: d.sharers,
                shares: d.shares.into_iter().map(share_to_wire).collect(),
            },
        }))
    }

    async fn submit_masked(
        &self,
        req: Request<Streaming<pb::SubmitUpdateRequest>>,
    ) -> Result<Response<pb::Ack>, Status> {
        let caller = self.caller(&req)?;
        let mut inbound = req.into_inner();
        let header = first_header(&self.state, self.next_part(&mut inbound).await)?;
        let ticket = self
            .state
            .claim_secagg(&header.task_token, caller.as_ref())
            .await
            .map_err(|e| e.to_status())?;
        let mut upload = self
            .secagg
            .start_masked(&ticket, &header.task_token)
            .map_err(|e| e.to_status())?;
        loop {
            match self.next_part(&mut inbound).await {
                Ok(Some(Some(pb::submit_update_request::Part::Chunk(c)))) => {
                    self.state.received(c.data.len());
                    self.state.decoded(c.data.len());
                    if let Err(e) = upload.push(&c.dtype, c.offset, &c.data) {
                        let err = crate::secagg::round_error(&e);
                        return Err(self.state.refuse_secagg(&ticket, err).to_status());
                    }
                }
                Ok(Some(Some(pb::submit_update_request::Part::Header(_)))) => {
                    let e = RoundError::invalid("header sent twice");
                    return Err(self.state.refuse_secagg(&ticket, e).to_status());
                }
                Ok(None | Some(None)) => break,
                // A broken stream is forgotten: the party may send it again.
                Err(e) => {
                    tracing::warn!(party = %ticket.party, error = %e, "masked update not received");
                    return Err(e.to_status());
                }
            }
        }
        let loss = header.train.map_or(f64::NAN, |m| m.loss);
        let samples = header.samples.min(ticket.samples_cap);
        let len = upload.elements();
        tokio::task::spawn_blocking(move || upload.complete(loss, samples))
            .await
            .map_err(|e| Status::internal(format!("adding the masked update failed: {e}")))?
            .map_err(|e| e.to_status())?;
        tracing::info!(party = %ticket.party, round = ticket.round, elements = len, "secure aggregation: masked update added to the sum");
        Ok(ack("masked update added"))
    }

    async fn get_unmask_request(
        &self,
        req: Request<pb::SecAggWaitRequest>,
    ) -> Result<Response<pb::SecAggUnmaskRequest>, Status> {
        let ticket = self.ticket(&req, &req.get_ref().task_token).await?;
        let request = self.wait(&ticket, |s, t| s.unmask_request(t)).await?;
        Ok(Response::new(match request {
            None => pb::SecAggUnmaskRequest {
                waiting: true,
                ..Default::default()
            },
            Some(r) => pb::SecAggUnmaskRequest {
                waiting: false,
                dropped: r.dropped,
                survivors: r.survivors,
            },
        }))
    }

    async fn unmask(
        &self,
        req: Request<pb::SecAggUnmaskResponse>,
    ) -> Result<Response<pb::Ack>, Status> {
        let ticket = self.ticket(&req, &req.get_ref().task_token).await?;
        let r = req.into_inner();
        if r.mask_key_shares.len() + r.self_mask_shares.len() > 2 * MAX_SHARES {
            let e = RoundError::invalid("too many shares");
            return Err(self.state.refuse_secagg(&ticket, e).to_status());
        }
        let response = UnmaskResponse {
            round: self.secagg.round_id(ticket.round),
            party: ticket.party.clone(),
            mask_key_shares: revealed(r.mask_key_shares),
            self_mask_shares: revealed(r.self_mask_shares),
        };
        let taken = self
            .secagg
            .unmask(&ticket, response)
            .map_err(|e| e.to_status())?;
        Ok(ack(if taken {
            "shares taken"
        } else {
            "the round is already unmasked"
        }))
    }
}
