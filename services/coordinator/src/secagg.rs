//! Secure aggregation's round state on the coordinator (`privacy.secure_aggregation`): one
//! [`cohort_secagg::Server`] per round behind a lock, fed by the `SecureAggregation` calls
//! (`secagg_service.rs`, the gRPC edge) and closed phase by phase by the round loop
//! (`rounds/secagg.rs`). No protobuf here.
//!
//! Who a message is from is always the party of the caller's task token (claimed through
//! [`RoundState::claim_secagg`], checked against its certificate), never a field of the
//! message. Keys advertised in an earlier round of the job are refused, so a party cannot
//! replay them. A masked update is staged on disk as it streams (an unnamed temporary
//! file) and added to the sum whole, under the lock, once its last chunk arrived: a stream
//! that breaks half way leaves nothing in the sum (the party is a dropout, not a failed
//! round), and the coordinator holds one u32 sum of the model's size plus the staged files.
//! Nothing unmasks an individual update: only [`cohort_secagg::Server::finish`] removes
//! masks, from the sum of at least t parties.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cohort_core::{ErrorKind, HasKind};
use cohort_secagg::{
    Advertisement, Aggregate, CHUNK_ELEMENTS, EncryptedShare, Neighbours, PartyId, Roster, RoundId,
    SecAggError, Server, ServerConfig, ShareDelivery, UnmaskRequest, UnmaskResponse,
};
use tokio::sync::watch;

use crate::round_state::{RoundError, RoundState, Ticket};

/// Where a round's protocol stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Advertising,
    Sharing,
    Masking,
    Unmasking,
    /// Unmasked: late calls are answered, nothing changes.
    Done,
    /// The round cannot reach t parties (or another step failed): every waiting call gets
    /// this reason.
    Failed(String),
}

/// What each party of the round did so far.
#[derive(Debug, Clone, Default)]
pub struct Member {
    pub advertised: bool,
    pub shared: bool,
    pub masked: bool,
    pub answered: bool,
    /// Its task ended (client-selector said so) without finishing the protocol.
    pub gone: bool,
}

struct Session {
    round: u32,
    /// Taken by [`SecAgg::finish`].
    server: Option<Server>,
    phase: Phase,
    members: BTreeMap<PartyId, Member>,
    roster: Option<Roster>,
    deliveries: HashMap<PartyId, ShareDelivery>,
    request: Option<UnmaskRequest>,
    /// Parties whose masked update is streaming in now.
    uploading: BTreeSet<PartyId>,
    /// (training loss, samples) the survivors reported.
    losses: Vec<(f64, u64)>,
}

/// The job's secure aggregation: settings, the current round's session, and the keys of
/// earlier rounds.
pub struct SecAgg {
    job: String,
    pub threshold: usize,
    /// The masking graph (SecAgg's complete one, or SecAgg+'s sparse one).
    pub neighbours: Neighbours,
    /// The encoding's range: the parties' clip, plus room for their noise under DP.
    pub range: f32,
    /// What the unmasked sum is divided by (`clients.per_round` under DP); None: the
    /// number of updates it holds.
    pub denominator: Option<u32>,
    state: Arc<RoundState>,
    session: Mutex<Option<Session>>,
    /// Bumped on every change a waiting call or the round loop may look for.
    changed: watch::Sender<u64>,
    /// Every public key advertised in this job's earlier rounds (this process's).
    earlier_keys: Mutex<HashMap<[u8; 32], u32>>,
    /// Tests only (`--secagg-tap-dir`): each masked update as received is copied here.
    tap: Option<PathBuf>,
    staging_dir: PathBuf,
}

/// The session's server, until [`SecAgg::finish`] takes it.
fn server_of<'a>(s: &'a mut Session, phase: &'static str) -> Result<&'a mut Server, SecAggError> {
    s.server.as_mut().ok_or(SecAggError::WrongPhase {
        actor: "server",
        expected: phase,
        actual: "finished",
    })
}

/// How a [`SecAggError`] travels as a round refusal.
pub fn round_error(e: &SecAggError) -> RoundError {
    RoundError {
        kind: e.kind(),
        message: format!("secure aggregation: {e}"),
    }
}

fn failed(reason: &str) -> RoundError {
    RoundError {
        kind: ErrorKind::FailedPrecondition,
        message: reason.to_string(),
    }
}

impl SecAgg {
    pub fn new(
        job: &str,
        spec: cohort_core::spec::SecureAggregation,
        state: Arc<RoundState>,
        staging_dir: PathBuf,
        tap: Option<PathBuf>,
    ) -> Arc<SecAgg> {
        if let Some(dir) = &tap {
            tracing::warn!(dir = %dir.display(), "SECURE AGGREGATION TAP: every masked update received is copied to this directory; for tests only");
        }
        state.take_masked_updates_only();
        Arc::new(SecAgg {
            job: job.to_string(),
            threshold: spec.threshold as usize,
            neighbours: Neighbours::from_degree(spec.neighbours as usize),
            range: spec.range(),
            denominator: spec.denominator,
            state,
            session: Mutex::new(None),
            changed: watch::channel(0).0,
            earlier_keys: Mutex::new(HashMap::new()),
            tap,
            staging_dir,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sees every change after this call (take it before looking).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn round_id(&self, round: u32) -> RoundId {
        RoundId::new(self.job.clone(), u64::from(round))
    }

    // --- the round loop's side ---

    /// Opens round `round`'s session for a flattened model of `vector_len` elements. The
    /// keys of the round before become earlier keys.
    pub fn open(&self, round: u32, vector_len: usize) -> Result<(), SecAggError> {
        let server = Server::new(ServerConfig {
            round: self.round_id(round),
            threshold: self.threshold,
            clip: self.range,
            vector_len,
            neighbours: self.neighbours,
        })?;
        *self.lock() = Some(Session {
            round,
            server: Some(server),
            phase: Phase::Advertising,
            members: BTreeMap::new(),
            roster: None,
            deliveries: HashMap::new(),
            request: None,
            uploading: BTreeSet::new(),
            losses: Vec::new(),
        });
        self.bump();
        Ok(())
    }

    /// What every party did so far (empty without a session).
    pub fn members(&self) -> BTreeMap<PartyId, Member> {
        self.lock()
            .as_ref()
            .map(|s| s.members.clone())
            .unwrap_or_default()
    }

    pub fn phase(&self) -> Option<Phase> {
        self.lock().as_ref().map(|s| s.phase.clone())
    }

    /// A party whose task ended: not waited for any more.
    pub fn mark_gone(&self, party: &str) {
        if let Some(s) = self.lock().as_mut() {
            s.members.entry(party.to_string()).or_default().gone = true;
        }
        self.bump();
    }

    /// Ends the round's protocol with `reason`: waiting parties are told.
    pub fn fail(&self, reason: &str) {
        if let Some(s) = self.lock().as_mut()
            && !matches!(s.phase, Phase::Done | Phase::Failed(_))
        {
            s.phase = Phase::Failed(reason.to_string());
        }
        self.bump();
    }

    /// Moves the round from phase `from` to `to` with `f`, atomically: a waiting call sees
    /// the new phase together with what it produced.
    fn step<T>(
        &self,
        from: Phase,
        to: Phase,
        f: impl FnOnce(&mut Session) -> Result<T, SecAggError>,
    ) -> Result<(T, u32), SecAggError> {
        let mut guard = self.lock();
        let s = guard.as_mut().ok_or_else(|| {
            SecAggError::InvalidParams("no secure-aggregation round is open".into())
        })?;
        if s.phase != from {
            return Err(SecAggError::InvalidParams(format!(
                "the round is in phase {:?}, not {from:?}",
                s.phase
            )));
        }
        let out = f(s)?;
        s.phase = to;
        Ok((out, s.round))
    }

    /// Fixes the roster: every party that advertised (at least t).
    pub fn close_advertising(&self) -> Result<Roster, SecAggError> {
        let result = self.step(Phase::Advertising, Phase::Sharing, |s| {
            let roster = server_of(s, "advertising")?.close_advertising()?;
            s.roster = Some(roster.clone());
            Ok(roster)
        });
        if let Ok((roster, round)) = &result {
            let mut earlier = self.earlier_keys.lock().unwrap_or_else(|p| p.into_inner());
            for e in &roster.parties {
                earlier.insert(e.c_pk, *round);
                earlier.insert(e.s_pk, *round);
            }
        }
        self.bump();
        result.map(|(r, _)| r)
    }

    /// Ends key sharing: each party that shared gets the shares addressed to it. Returns
    /// the parties that shared.
    pub fn close_sharing(&self) -> Result<Vec<PartyId>, SecAggError> {
        let result = self.step(Phase::Sharing, Phase::Masking, |s| {
            let deliveries = server_of(s, "sharing")?.close_sharing()?;
            let sharers = deliveries
                .first()
                .map(|d| d.sharers.clone())
                .unwrap_or_default();
            s.deliveries = deliveries
                .into_iter()
                .map(|d| (d.recipient.clone(), d))
                .collect();
            Ok(sharers)
        });
        self.bump();
        result.map(|(sharers, _)| sharers)
    }

    /// Ends masked input: whoever's update arrived whole survives, the other sharers are
    /// dropped. Updates still streaming are dropped with it.
    pub fn close_masking(&self) -> Result<UnmaskRequest, SecAggError> {
        let result = self.step(Phase::Masking, Phase::Unmasking, |s| {
            let request = server_of(s, "masking")?.close_masking()?;
            s.request = Some(request.clone());
            Ok(request)
        });
        self.bump();
        result.map(|(r, _)| r)
    }

    /// With at least t answers: the unmasked sum of the survivors' updates, and the mean
    /// training loss they reported (NaN if none).
    pub fn finish(&self) -> Result<(Aggregate, f64), SecAggError> {
        let (server, losses) = {
            let mut guard = self.lock();
            let s = guard
                .as_mut()
                .ok_or_else(|| SecAggError::InvalidParams("no secure-aggregation round".into()))?;
            if s.phase != Phase::Unmasking {
                return Err(SecAggError::InvalidParams(format!(
                    "the round is in phase {:?}, not unmasking",
                    s.phase
                )));
            }
            let server = s
                .server
                .take()
                .ok_or_else(|| SecAggError::InvalidParams("the round was finished".into()))?;
            (server, std::mem::take(&mut s.losses))
        };
        // Reconstruction and mask expansion take a while: outside the lock.
        let result = server.finish();
        if let Some(s) = self.lock().as_mut() {
            s.phase = match &result {
                Ok(_) => Phase::Done,
                Err(e) => Phase::Failed(e.to_string()),
            };
        }
        self.bump();
        let (sum, samples) = losses
            .iter()
            .filter(|(l, _)| l.is_finite() && *l >= 0.0)
            .fold((0.0, 0u64), |(s, n), (l, k)| (s + l * *k as f64, n + k));
        let loss = if samples > 0 {
            sum / samples as f64
        } else {
            f64::NAN
        };
        result.map(|a| (a, loss))
    }

    // --- the parties' side (through `secagg_service`) ---

    /// Refuses `e` for `ticket`: counted in the round's refusals; a party's fault also goes
    /// to the job's log.
    fn refuse(&self, ticket: &Ticket, e: &SecAggError) -> RoundError {
        let err = round_error(e);
        if e.party().is_some() {
            self.state.refuse_secagg(ticket, err)
        } else {
            self.state.refuse(err)
        }
    }

    /// The session of the ticket's round, or why there is none.
    fn with_session<T>(
        &self,
        ticket: &Ticket,
        f: impl FnOnce(&mut Session) -> Result<T, SecAggError>,
    ) -> Result<T, RoundError> {
        let mut guard = self.lock();
        let result = match guard.as_mut() {
            Some(s) if s.round == ticket.round => match &s.phase {
                Phase::Failed(reason) => return Err(failed(reason)),
                _ => f(s),
            },
            _ => Err(SecAggError::WrongPhase {
                actor: "server",
                expected: "a secure-aggregation round",
                actual: "another round",
            }),
        };
        drop(guard);
        self.bump();
        result.map_err(|e| self.refuse(ticket, &e))
    }

    pub fn advertise(
        &self,
        ticket: &Ticket,
        c_pk: &[u8],
        s_pk: &[u8],
        commitment: &[u8],
    ) -> Result<(), RoundError> {
        let party = &ticket.party;
        let keys = (|| {
            Ok::<_, SecAggError>(Advertisement {
                round: self.round_id(ticket.round),
                party: party.clone(),
                c_pk: cohort_secagg::key_from_bytes(party, "c_pk", c_pk)?,
                s_pk: cohort_secagg::key_from_bytes(party, "s_pk", s_pk)?,
                b_commitment: cohort_secagg::key_from_bytes(party, "b_commitment", commitment)?,
            })
        })();
        let earlier = self
            .earlier_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.with_session(ticket, |s| {
            let ad = keys?;
            for key in [ad.c_pk, ad.s_pk] {
                if let Some(round) = earlier.get(&key) {
                    return Err(SecAggError::KeyReused {
                        party: party.clone(),
                        other: format!("a party in round {round} (keys are fresh every round)"),
                    });
                }
            }
            let server = s.server.as_mut().ok_or(SecAggError::WrongPhase {
                actor: "server",
                expected: "advertising",
                actual: "finished",
            })?;
            server.receive_advertisement(ad)?;
            s.members.entry(party.clone()).or_default().advertised = true;
            Ok(())
        })
    }

    /// The roster once advertising closed; None while it is open.
    pub fn roster(&self, ticket: &Ticket) -> Result<Option<Roster>, RoundError> {
        self.look(ticket, |s| Ok(s.roster.clone()))
    }

    pub fn share_keys(
        &self,
        ticket: &Ticket,
        shares: Vec<EncryptedShare>,
    ) -> Result<(), RoundError> {
        let party = ticket.party.clone();
        self.with_session(ticket, |s| {
            let server = s.server.as_mut().ok_or(SecAggError::WrongPhase {
                actor: "server",
                expected: "sharing",
                actual: "finished",
            })?;
            server.receive_shares(&party, shares)?;
            s.members.entry(party.clone()).or_default().shared = true;
            Ok(())
        })
    }

    /// The caller's share delivery once sharing closed; None while it is open.
    pub fn delivery(&self, ticket: &Ticket) -> Result<Option<ShareDelivery>, RoundError> {
        self.look(ticket, |s| {
            if s.roster.is_none() || matches!(s.phase, Phase::Advertising | Phase::Sharing) {
                return Ok(None);
            }
            s.deliveries
                .get(&ticket.party)
                .cloned()
                .map(Some)
                .ok_or_else(|| SecAggError::UnknownParty {
                    party: ticket.party.clone(),
                })
        })
    }

    /// The unmask request once masked input closed; None while it is open.
    pub fn unmask_request(&self, ticket: &Ticket) -> Result<Option<UnmaskRequest>, RoundError> {
        self.look(ticket, |s| Ok(s.request.clone()))
    }

    pub fn unmask(&self, ticket: &Ticket, response: UnmaskResponse) -> Result<bool, RoundError> {
        let party = ticket.party.clone();
        self.with_session(ticket, |s| {
            if s.phase == Phase::Done {
                return Ok(false);
            }
            let server = s.server.as_mut().ok_or(SecAggError::WrongPhase {
                actor: "server",
                expected: "unmasking",
                actual: "finishing",
            })?;
            server.receive_unmask(&party, response)?;
            s.members.entry(party.clone()).or_default().answered = true;
            Ok(true)
        })
    }

    /// Reads the session for a waiting call: Some once what it waits for is there.
    fn look<T>(
        &self,
        ticket: &Ticket,
        f: impl FnOnce(&Session) -> Result<Option<T>, SecAggError>,
    ) -> Result<Option<T>, RoundError> {
        let guard = self.lock();
        let result = match guard.as_ref() {
            Some(s) if s.round == ticket.round => match &s.phase {
                Phase::Failed(reason) => return Err(failed(reason)),
                _ => f(s),
            },
            _ => Ok(None),
        };
        drop(guard);
        result.map_err(|e| self.refuse(ticket, &e))
    }

    /// May `ticket`'s party stream its masked update now? Marks it uploading.
    pub fn start_masked(
        self: &Arc<Self>,
        ticket: &Ticket,
        token: &str,
    ) -> Result<MaskedUpload, RoundError> {
        let party = ticket.party.clone();
        let len = self.with_session(ticket, |s| {
            if s.phase != Phase::Masking {
                return Err(SecAggError::WrongPhase {
                    actor: "server",
                    expected: "masking",
                    actual: "another phase",
                });
            }
            let member = s.members.entry(party.clone()).or_default();
            if member.masked {
                return Err(SecAggError::Duplicate {
                    party: party.clone(),
                    what: "masked update",
                });
            }
            if !s.uploading.insert(party.clone()) {
                return Err(SecAggError::Duplicate {
                    party: party.clone(),
                    what: "masked update in flight",
                });
            }
            Ok(s.server.as_ref().map_or(0, |srv| srv.config().vector_len))
        })?;
        let file = match tempfile::tempfile_in(&self.staging_dir) {
            Ok(f) => f,
            Err(e) => {
                self.end_upload(&party);
                return Err(RoundError::unavailable(format!(
                    "the coordinator cannot stage the masked update: {e}"
                )));
            }
        };
        Ok(MaskedUpload {
            secagg: self.clone(),
            ticket: ticket.clone(),
            token: token.to_string(),
            file,
            len: len as u64,
            received: 0,
            done: false,
        })
    }

    fn end_upload(&self, party: &str) {
        if let Some(s) = self.lock().as_mut() {
            s.uploading.remove(party);
        }
        self.bump();
    }
}

/// A masked update streaming in, staged until its last chunk; dropping it unfinished
/// forgets it (the party may try again while masked input is open).
pub struct MaskedUpload {
    secagg: Arc<SecAgg>,
    ticket: Ticket,
    token: String,
    file: std::fs::File,
    len: u64,
    received: u64,
    done: bool,
}

impl MaskedUpload {
    /// Elements of the whole masked update.
    pub fn elements(&self) -> u64 {
        self.len
    }

    /// Stages a "ring32" chunk: elements `[offset, offset + n)` of the flattened model,
    /// continuing the last one.
    pub fn push(&mut self, dtype: &str, offset: u64, data: &[u8]) -> Result<(), SecAggError> {
        let party = &self.ticket.party;
        if dtype != "ring32" || !data.len().is_multiple_of(4) {
            return Err(SecAggError::Share {
                party: party.clone(),
                source: cohort_secagg::ShamirError::Malformed(
                    "a masked update travels as dtype \"ring32\": u32 little endian",
                ),
            });
        }
        let n = (data.len() / 4) as u64;
        if offset != self.received {
            return Err(SecAggError::ChunkOutOfOrder {
                party: party.clone(),
                expected: self.received,
                got: offset,
            });
        }
        if offset + n > self.len {
            return Err(SecAggError::ChunkOutOfRange {
                party: party.clone(),
                offset,
                len_sent: n,
                len: self.len,
            });
        }
        self.file.write_all(data).map_err(|e| {
            SecAggError::InvalidParams(format!("cannot stage the masked update: {e}"))
        })?;
        self.received += n;
        Ok(())
    }

    /// Adds the whole staged update to the sum (under the session's lock, so masked input
    /// cannot close half way through it) and settles the party's task as delivered.
    /// `loss` and `samples` are what it reported of its training.
    pub fn complete(mut self, loss: f64, samples: u64) -> Result<(), RoundError> {
        let secagg = self.secagg.clone();
        let party = self.ticket.party.clone();
        if self.received != self.len {
            let e = SecAggError::PartialMaskedInput {
                party: party.clone(),
                received: self.received,
                expected: self.len,
            };
            return Err(secagg.refuse(&self.ticket, &e));
        }
        let staged = (|| -> std::io::Result<()> {
            self.file.flush()?;
            self.file.rewind()?;
            Ok(())
        })();
        if let Err(e) = staged {
            return Err(RoundError::unavailable(format!(
                "the coordinator cannot read the staged masked update: {e}"
            )));
        }
        let round = self.ticket.round;
        let tap = secagg
            .tap
            .as_ref()
            .map(|dir| dir.join(format!("round-{round}-{party}.ring32")));
        let mut guard = secagg.lock();
        let result = (|| -> Result<(), SecAggError> {
            let s = match guard.as_mut() {
                Some(s) if s.round == round && s.phase == Phase::Masking => s,
                _ => {
                    return Err(SecAggError::WrongPhase {
                        actor: "server",
                        expected: "masking",
                        actual: "closed",
                    });
                }
            };
            let server = s.server.as_mut().ok_or(SecAggError::WrongPhase {
                actor: "server",
                expected: "masking",
                actual: "finished",
            })?;
            let mut tap_file = match &tap {
                Some(path) => Some(std::fs::File::create(path).map_err(|e| {
                    SecAggError::InvalidParams(format!("tap {}: {e}", path.display()))
                })?),
                None => None,
            };
            let mut bytes = vec![0u8; CHUNK_ELEMENTS * 4];
            let mut values = vec![0u32; CHUNK_ELEMENTS];
            let mut offset = 0u64;
            while offset < self.len {
                let n = ((self.len - offset) as usize).min(CHUNK_ELEMENTS);
                self.file.read_exact(&mut bytes[..4 * n]).map_err(|e| {
                    SecAggError::InvalidParams(format!("cannot read the staged masked update: {e}"))
                })?;
                if let Some(f) = tap_file.as_mut() {
                    f.write_all(&bytes[..4 * n])
                        .map_err(|e| SecAggError::InvalidParams(format!("tap: {e}")))?;
                }
                for (v, b) in values[..n].iter_mut().zip(bytes.chunks_exact(4)) {
                    *v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                server.receive_masked_chunk(&party, offset, &values[..n])?;
                offset += n as u64;
            }
            s.members.entry(party.clone()).or_default().masked = true;
            s.losses.push((loss, samples));
            Ok(())
        })();
        if let Some(s) = guard.as_mut() {
            s.uploading.remove(&party);
        }
        drop(guard);
        self.done = true;
        match result {
            Ok(()) => {
                secagg.state.settle_secagg(&self.token, true);
                secagg.bump();
                Ok(())
            }
            Err(e) => {
                secagg.bump();
                Err(secagg.refuse(&self.ticket, &e))
            }
        }
    }
}

impl Drop for MaskedUpload {
    fn drop(&mut self) {
        if !self.done {
            self.secagg.end_upload(&self.ticket.party);
        }
    }
}
