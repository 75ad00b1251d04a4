//! The server's side of a round, as a state machine:
//! advertising → (close_advertising) sharing → (close_sharing) masking → (close_masking)
//! unmasking → (finish) the unmasked [`Aggregate`].
//!
//! The server routes the encrypted shares without being able to read them, sums masked chunks
//! into one u32 vector as they arrive (memory: one model), and, once the masked inputs are in,
//! asks the parties whose input arrived whole (U3, the survivors) for the shares that remove
//! the masks: s_sk of the parties that shared keys but sent no whole input (U2 \ U3, the
//! dropped), b of the survivors. With at least t answers it reconstructs those secrets, checks
//! them against what their owners advertised (the s public key, the commitment to b), and
//! removes the masks from the sum chunk by chunk. It never asks for both secrets of one party,
//! never holds an individual update unmasked (only the sum of U3, at least t ≥ 2 parties), and
//! fails the round with the threshold named when fewer than t parties remain at any step.
//!
//! A masked input must arrive whole: a party whose chunks stop half way leaves masked values in
//! the sum that only both of its secrets could remove, so [`Server::close_masking`] fails the
//! round naming it. A caller that wants such a party counted as dropped instead stages each
//! party's masked chunks and feeds them to [`Server::receive_masked_chunk`] once complete.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use zeroize::Zeroizing;

use crate::crypto::{commit_self_mask, mask_seed_from_secret, public_of};
use crate::encoding::{CHUNK_ELEMENTS, Encoding};
use crate::error::{Result, SecAggError, ShamirError};
use crate::graph::{Graph, Neighbours};
use crate::messages::{
    Advertisement, EncryptedShare, PartyId, RevealedShare, Roster, RosterEntry, RoundId,
    ShareDelivery, UnmaskRequest, UnmaskResponse, check_round, check_threshold,
};
use crate::party::ENCRYPTED_SHARE_LEN;
use crate::prg::{MAX_MASK_ELEMENTS, Sign, apply_mask};
use crate::shamir::{self, Share};

/// What the server is told before a round: the round, t, the clip norm and the vector's length.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub round: RoundId,
    pub threshold: usize,
    pub clip: f32,
    /// Elements of the flattened update (every tensor, in the model's order).
    pub vector_len: usize,
    /// The masking graph: SecAgg's complete one, or SecAgg+'s sparse one (t then counts
    /// within a party's closed neighbourhood).
    pub neighbours: Neighbours,
}

struct Sharing {
    roster: Roster,
    graph: Graph,
    /// Encrypted shares by recipient.
    inbox: BTreeMap<PartyId, Vec<EncryptedShare>>,
    sharers: BTreeSet<PartyId>,
}

struct Masking {
    roster: Roster,
    graph: Graph,
    sharers: Vec<PartyId>,
    encoding: Encoding,
    sum: Vec<u32>,
    /// Elements received so far from each party that sent any.
    received: BTreeMap<PartyId, u64>,
}

struct Answer {
    mask_key: BTreeMap<PartyId, Share>,
    self_mask: BTreeMap<PartyId, Share>,
}

struct Unmasking {
    roster: Roster,
    graph: Graph,
    encoding: Encoding,
    sum: Vec<u32>,
    request: UnmaskRequest,
    answers: BTreeMap<PartyId, Answer>,
}

enum State {
    Advertising,
    Sharing(Sharing),
    Masking(Masking),
    Unmasking(Box<Unmasking>),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Advertising => "advertising",
            State::Sharing(_) => "sharing",
            State::Masking(_) => "masking",
            State::Unmasking(_) => "unmasking",
        }
    }
}

/// The server of one round.
pub struct Server {
    config: ServerConfig,
    adverts: BTreeMap<PartyId, Advertisement>,
    keys: HashMap<[u8; 32], PartyId>,
    state: State,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("parties", &self.adverts.len())
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

fn join<'a>(parties: impl IntoIterator<Item = &'a PartyId>) -> String {
    parties
        .into_iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Server {
    pub fn new(config: ServerConfig) -> Result<Server> {
        if config.threshold < 2 {
            return Err(SecAggError::InvalidParams(format!(
                "threshold t={} (need t >= 2: the sum of one party is its update)",
                config.threshold
            )));
        }
        if config.vector_len == 0 || config.vector_len as u64 > MAX_MASK_ELEMENTS {
            return Err(SecAggError::InvalidParams(format!(
                "vector of {} elements (need 1 to {MAX_MASK_ELEMENTS})",
                config.vector_len
            )));
        }
        config
            .neighbours
            .check()
            .map_err(SecAggError::InvalidParams)?;
        Encoding::new(config.clip, config.threshold)?;
        Ok(Server {
            config,
            adverts: BTreeMap::new(),
            keys: HashMap::new(),
            state: State::Advertising,
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The phase, for logs: advertising, sharing, masking or unmasking.
    pub fn phase(&self) -> &'static str {
        self.state.name()
    }

    fn wrong_phase(&self, expected: &'static str) -> SecAggError {
        SecAggError::WrongPhase {
            actor: "server",
            expected,
            actual: self.state.name(),
        }
    }

    /// The roster, once advertising closed.
    pub fn roster(&self) -> Option<&Roster> {
        match &self.state {
            State::Advertising => None,
            State::Sharing(s) => Some(&s.roster),
            State::Masking(m) => Some(&m.roster),
            State::Unmasking(u) => Some(&u.roster),
        }
    }

    /// Takes a party's public keys. `advertisement.party` must be the authenticated caller.
    /// Refuses a second advertisement of a party and a public key already used (by another
    /// party, or by the same party for both purposes).
    pub fn receive_advertisement(&mut self, advertisement: Advertisement) -> Result<()> {
        if !matches!(self.state, State::Advertising) {
            return Err(self.wrong_phase("advertising"));
        }
        let party = &advertisement.party;
        if party.is_empty() {
            return Err(SecAggError::InvalidParams("empty party id".into()));
        }
        check_round(party, &self.config.round, &advertisement.round)?;
        if self.adverts.contains_key(party) {
            return Err(SecAggError::Duplicate {
                party: party.clone(),
                what: "advertisement",
            });
        }
        if advertisement.c_pk == advertisement.s_pk {
            return Err(SecAggError::KeyReused {
                party: party.clone(),
                other: party.clone(),
            });
        }
        for key in [advertisement.c_pk, advertisement.s_pk] {
            if let Some(other) = self.keys.get(&key) {
                return Err(SecAggError::KeyReused {
                    party: party.clone(),
                    other: other.clone(),
                });
            }
        }
        self.keys.insert(advertisement.c_pk, party.clone());
        self.keys.insert(advertisement.s_pk, party.clone());
        self.adverts.insert(party.clone(), advertisement);
        Ok(())
    }

    /// Fixes the round's parties (every advertised one, sorted by id) and publishes them.
    pub fn close_advertising(&mut self) -> Result<Roster> {
        if !matches!(self.state, State::Advertising) {
            return Err(self.wrong_phase("advertising"));
        }
        let threshold = self.config.threshold;
        if self.adverts.len() < threshold {
            return Err(SecAggError::ThresholdNotMet {
                stage: "advertising",
                have: self.adverts.len(),
                threshold,
                parties: join(self.adverts.keys()),
            });
        }
        check_threshold(
            threshold,
            self.config.neighbours.holders(self.adverts.len()),
        )?;
        let roster = Roster {
            round: self.config.round.clone(),
            threshold,
            clip: self.config.clip,
            neighbours: self.config.neighbours,
            parties: self
                .adverts
                .values()
                .map(|a| RosterEntry {
                    party: a.party.clone(),
                    c_pk: a.c_pk,
                    s_pk: a.s_pk,
                })
                .collect(),
        };
        roster.validate()?;
        self.state = State::Sharing(Sharing {
            graph: Graph::of(&roster),
            roster: roster.clone(),
            inbox: BTreeMap::new(),
            sharers: BTreeSet::new(),
        });
        Ok(roster)
    }

    /// Takes the encrypted shares of `from` (the authenticated caller): exactly one for every
    /// neighbour of `from` (every other party in the complete graph), each from `from`, for
    /// this round, of the right size.
    pub fn receive_shares(&mut self, from: &str, shares: Vec<EncryptedShare>) -> Result<()> {
        let State::Sharing(sharing) = &mut self.state else {
            return Err(self.wrong_phase("sharing"));
        };
        let roster = &sharing.roster;
        let position = roster
            .position(from)
            .ok_or_else(|| SecAggError::UnknownParty {
                party: from.to_string(),
            })?;
        if sharing.sharers.contains(from) {
            return Err(SecAggError::Duplicate {
                party: from.to_string(),
                what: "encrypted shares",
            });
        }
        let neighbours = sharing.graph.neighbours(position).len();
        if shares.len() != neighbours {
            return Err(SecAggError::ShareCount {
                party: from.to_string(),
                got: shares.len(),
                expected: neighbours,
            });
        }
        let mut recipients = BTreeSet::new();
        for share in &shares {
            if share.sender != from {
                return Err(SecAggError::WrongSender {
                    claimed: share.sender.clone(),
                    actual: from.to_string(),
                });
            }
            check_round(from, &self.config.round, &share.round)?;
            let neighbour = roster
                .position(&share.recipient)
                .is_some_and(|r| sharing.graph.adjacent(position, r));
            if !neighbour {
                return Err(SecAggError::Misaddressed {
                    sender: from.to_string(),
                    recipient: share.recipient.clone(),
                    expected: "a neighbour of the sender in the roster".into(),
                });
            }
            if !recipients.insert(share.recipient.as_str()) {
                return Err(SecAggError::Duplicate {
                    party: from.to_string(),
                    what: "share to one recipient",
                });
            }
            if share.ciphertext.len() != ENCRYPTED_SHARE_LEN {
                return Err(SecAggError::Share {
                    party: from.to_string(),
                    source: ShamirError::Malformed("an encrypted share is 164 bytes"),
                });
            }
        }
        for share in shares {
            sharing
                .inbox
                .entry(share.recipient.clone())
                .or_default()
                .push(share);
        }
        sharing.sharers.insert(from.to_string());
        Ok(())
    }

    /// Ends key sharing: the parties that shared (U2; at least t) each get the shares the
    /// others of U2 addressed to them. Allocates the sum (the model's length in u32).
    pub fn close_sharing(&mut self) -> Result<Vec<ShareDelivery>> {
        let State::Sharing(sharing) = &self.state else {
            return Err(self.wrong_phase("sharing"));
        };
        let threshold = self.config.threshold;
        if sharing.sharers.len() < threshold {
            return Err(SecAggError::ThresholdNotMet {
                stage: "key sharing",
                have: sharing.sharers.len(),
                threshold,
                parties: join(&sharing.sharers),
            });
        }
        let State::Sharing(sharing) = std::mem::replace(&mut self.state, State::Advertising) else {
            return Err(self.wrong_phase("sharing"));
        };
        let Sharing {
            roster,
            graph,
            mut inbox,
            sharers,
        } = sharing;
        let sharers: Vec<PartyId> = sharers.into_iter().collect();
        let deliveries = sharers
            .iter()
            .map(|recipient| ShareDelivery {
                round: self.config.round.clone(),
                recipient: recipient.clone(),
                sharers: sharers.clone(),
                shares: inbox.remove(recipient).unwrap_or_default(),
            })
            .collect();
        let encoding = Encoding::new(self.config.clip, roster.len())?;
        self.state = State::Masking(Masking {
            roster,
            graph,
            sharers,
            encoding,
            sum: vec![0u32; self.config.vector_len],
            received: BTreeMap::new(),
        });
        Ok(deliveries)
    }

    /// Adds a masked chunk of `from` (elements `[offset, offset + chunk.len())`) to the sum.
    /// A party's chunks must come in order, without gaps or overlap, within the vector.
    pub fn receive_masked_chunk(&mut self, from: &str, offset: u64, chunk: &[u32]) -> Result<()> {
        let State::Masking(m) = &mut self.state else {
            return Err(self.wrong_phase("masking"));
        };
        if m.sharers
            .binary_search_by(|p| p.as_str().cmp(from))
            .is_err()
        {
            return Err(SecAggError::UnknownParty {
                party: from.to_string(),
            });
        }
        let len = m.sum.len() as u64;
        let expected = m.received.get(from).copied().unwrap_or(0);
        if offset != expected {
            return Err(SecAggError::ChunkOutOfOrder {
                party: from.to_string(),
                expected,
                got: offset,
            });
        }
        let end = offset + chunk.len() as u64;
        if end > len {
            return Err(SecAggError::ChunkOutOfRange {
                party: from.to_string(),
                offset,
                len_sent: chunk.len() as u64,
                len,
            });
        }
        m.sum[offset as usize..end as usize]
            .iter_mut()
            .zip(chunk)
            .for_each(|(s, c)| *s = s.wrapping_add(*c));
        m.received.insert(from.to_string(), end);
        Ok(())
    }

    /// Elements of `party`'s masked input received so far.
    pub fn masked_elements_received(&self, party: &str) -> u64 {
        match &self.state {
            State::Masking(m) => m.received.get(party).copied().unwrap_or(0),
            State::Unmasking(u) if u.request.survivors.iter().any(|p| p == party) => {
                u.sum.len() as u64
            }
            _ => 0,
        }
    }

    /// Ends masked input: the parties whose input arrived whole are the survivors (U3, at least
    /// t), the other sharers are dropped. Returns the request to send to every survivor.
    pub fn close_masking(&mut self) -> Result<UnmaskRequest> {
        let State::Masking(m) = &self.state else {
            return Err(self.wrong_phase("masking"));
        };
        let len = m.sum.len() as u64;
        if let Some((party, received)) = m.received.iter().find(|(_, r)| **r != len) {
            return Err(SecAggError::PartialMaskedInput {
                party: party.clone(),
                received: *received,
                expected: len,
            });
        }
        let (survivors, dropped): (Vec<PartyId>, Vec<PartyId>) = m
            .sharers
            .iter()
            .cloned()
            .partition(|p| m.received.contains_key(p));
        if survivors.len() < self.config.threshold {
            return Err(SecAggError::ThresholdNotMet {
                stage: "masked input",
                have: survivors.len(),
                threshold: self.config.threshold,
                parties: join(&survivors),
            });
        }
        unmaskable(&m.roster, &m.graph, &survivors, &dropped)?;
        let State::Masking(m) = std::mem::replace(&mut self.state, State::Advertising) else {
            return Err(self.wrong_phase("masking"));
        };
        let request = UnmaskRequest {
            round: self.config.round.clone(),
            dropped,
            survivors,
        };
        self.state = State::Unmasking(Box::new(Unmasking {
            roster: m.roster,
            graph: m.graph,
            encoding: m.encoding,
            sum: m.sum,
            request: request.clone(),
            answers: BTreeMap::new(),
        }));
        Ok(request)
    }

    /// Takes a survivor's answer: exactly an s_sk share of every dropped party and a b share of
    /// every survivor that `from` holds shares of (it and its neighbours), each at `from`'s
    /// own Shamir index.
    pub fn receive_unmask(&mut self, from: &str, response: UnmaskResponse) -> Result<()> {
        let State::Unmasking(u) = &mut self.state else {
            return Err(self.wrong_phase("unmasking"));
        };
        if response.party != from {
            return Err(SecAggError::WrongSender {
                claimed: response.party,
                actual: from.to_string(),
            });
        }
        check_round(from, &self.config.round, &response.round)?;
        if !u.request.survivors.iter().any(|p| p == from) {
            return Err(SecAggError::NotSurvivor {
                party: from.to_string(),
            });
        }
        if u.answers.contains_key(from) {
            return Err(SecAggError::Duplicate {
                party: from.to_string(),
                what: "unmask response",
            });
        }
        let position = u
            .roster
            .position(from)
            .ok_or_else(|| SecAggError::UnknownParty {
                party: from.to_string(),
            })?;
        let index = position as u32 + 1;
        let (roster, graph) = (&u.roster, &u.graph);
        let held = |owners: &[PartyId]| -> Vec<PartyId> {
            owners
                .iter()
                .filter(|o| roster.position(o).is_some_and(|p| graph.holds(position, p)))
                .cloned()
                .collect()
        };
        let dropped = held(&u.request.dropped);
        let survivors = held(&u.request.survivors);
        let parse = |shares: &[RevealedShare],
                     owners: &[PartyId],
                     what: &'static str|
         -> Result<BTreeMap<PartyId, Share>> {
            let bad = |source| SecAggError::Share {
                party: from.to_string(),
                source,
            };
            let mut out = BTreeMap::new();
            for r in shares {
                if !owners.contains(&r.owner) {
                    return Err(bad(ShamirError::Malformed(what)));
                }
                let share = Share::from_bytes(&r.share).map_err(bad)?;
                if share.index() != index {
                    return Err(bad(ShamirError::Malformed(
                        "a share at another party's index",
                    )));
                }
                if out.insert(r.owner.clone(), share).is_some() {
                    return Err(bad(ShamirError::Malformed("two shares of one party")));
                }
            }
            if out.len() != owners.len() {
                return Err(bad(ShamirError::Malformed(
                    "a share is missing for a party the request names",
                )));
            }
            Ok(out)
        };
        let mask_key = parse(
            &response.mask_key_shares,
            &dropped,
            "an s_sk share of a party that is not a dropped neighbour",
        )?;
        let self_mask = parse(
            &response.self_mask_shares,
            &survivors,
            "a b share of a party that is not a surviving neighbour",
        )?;
        u.answers.insert(
            from.to_string(),
            Answer {
                mask_key,
                self_mask,
            },
        );
        Ok(())
    }

    /// Survivors that answered so far.
    pub fn answers(&self) -> usize {
        match &self.state {
            State::Unmasking(u) => u.answers.len(),
            _ => 0,
        }
    }

    /// With at least t answers: reconstructs the dropped parties' s_sk and the survivors' b,
    /// checks each against its owner's advertisement, removes every remaining mask from the
    /// sum chunk by chunk and returns the sum of the survivors' encoded updates.
    pub fn finish(self) -> Result<Aggregate> {
        let State::Unmasking(u) = self.state else {
            return Err(SecAggError::WrongPhase {
                actor: "server",
                expected: "unmasking",
                actual: self.state.name(),
            });
        };
        let Unmasking {
            roster,
            graph,
            encoding,
            mut sum,
            request,
            answers,
        } = *u;
        let threshold = roster.threshold;
        if answers.len() < threshold {
            return Err(SecAggError::ThresholdNotMet {
                stage: "unmasking",
                have: answers.len(),
                threshold,
                parties: join(answers.keys()),
            });
        }
        let round = &self.config.round;
        let reconstruct = |owner: &PartyId,
                           pick: &dyn Fn(&Answer) -> Option<&Share>|
         -> Result<Zeroizing<[u8; 32]>> {
            let shares: Vec<Share> = answers.values().filter_map(pick).cloned().collect();
            if shares.len() < threshold {
                return Err(SecAggError::ThresholdNotMet {
                    stage: "unmasking",
                    have: shares.len(),
                    threshold,
                    parties: format!("answers holding shares of {owner}"),
                });
            }
            shamir::reconstruct(&shares, threshold).map_err(|source| SecAggError::Reconstruction {
                owner: owner.clone(),
                source,
            })
        };
        // (seed, how to remove it from the sum)
        let mut masks: Vec<(Zeroizing<[u8; 32]>, Sign)> = Vec::new();
        for v in &request.dropped {
            let entry = roster.entry_or_unknown(v)?;
            let v_at = roster.position(v).unwrap_or(usize::MAX);
            let masked_with: Vec<&PartyId> = request
                .survivors
                .iter()
                .filter(|u| roster.position(u).is_some_and(|p| graph.adjacent(p, v_at)))
                .collect();
            if masked_with.is_empty() {
                continue;
            }
            let secret = reconstruct(v, &|a| a.mask_key.get(v))?;
            if public_of(&secret) != entry.s_pk {
                return Err(SecAggError::ReconstructionMismatch {
                    party: v.clone(),
                    what: "mask key",
                });
            }
            for u in masked_with {
                let peer = roster.entry_or_unknown(u)?;
                let seed = mask_seed_from_secret(&secret, round, v, u, &peer.s_pk)?;
                // Survivor u added PRG(s_uv) when v > u and subtracted it when v < u.
                let remove = if v > u { Sign::Subtract } else { Sign::Add };
                masks.push((seed, remove));
            }
        }
        for u in &request.survivors {
            let b = reconstruct(u, &|a| a.self_mask.get(u))?;
            let advertised = self
                .adverts
                .get(u)
                .map(|a| a.b_commitment)
                .ok_or_else(|| SecAggError::UnknownParty { party: u.clone() })?;
            if commit_self_mask(round, u, &b) != advertised {
                return Err(SecAggError::ReconstructionMismatch {
                    party: u.clone(),
                    what: "self-mask seed",
                });
            }
            masks.push((b, Sign::Subtract));
        }
        for (i, chunk) in sum.chunks_mut(CHUNK_ELEMENTS).enumerate() {
            let offset = (i * CHUNK_ELEMENTS) as u64;
            for (seed, sign) in &masks {
                apply_mask(seed, offset, chunk, *sign)?;
            }
        }
        Ok(Aggregate {
            round: round.clone(),
            encoding,
            contributors: request.survivors,
            sum,
        })
    }
}

/// Whether the sum of `survivors` can be unmasked without revealing more: their subgraph is
/// connected (else each group's sum would show), every survivor has at least t holders of its
/// b among them, and every dropped party that masked with a survivor has at least t.
fn unmaskable(
    roster: &Roster,
    graph: &Graph,
    survivors: &[PartyId],
    dropped: &[PartyId],
) -> Result<()> {
    let threshold = roster.threshold;
    let at =
        |ids: &[PartyId]| -> Vec<usize> { ids.iter().filter_map(|p| roster.position(p)).collect() };
    let (alive, gone) = (at(survivors), at(dropped));
    if !graph.connected(&alive) {
        return Err(SecAggError::Disconnected {
            survivors: join(survivors),
        });
    }
    for &owner in alive.iter().chain(&gone) {
        let holders: Vec<&PartyId> = alive
            .iter()
            .filter(|&&h| graph.holds(h, owner))
            .map(|&h| &roster.parties[h].party)
            .collect();
        let masked_with_survivor = alive.iter().any(|&h| graph.adjacent(h, owner));
        let needed = alive.contains(&owner) || masked_with_survivor;
        if needed && holders.len() < threshold {
            return Err(SecAggError::ThresholdNotMet {
                stage: "masked input (the neighbours holding one party's shares)",
                have: holders.len(),
                threshold,
                parties: format!(
                    "of {}: {}",
                    roster.parties[owner].party,
                    join(holders.iter().copied())
                ),
            });
        }
    }
    Ok(())
}

/// The unmasked sum of the survivors' encoded updates.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub round: RoundId,
    encoding: Encoding,
    contributors: Vec<PartyId>,
    sum: Vec<u32>,
}

impl Aggregate {
    /// The parties whose updates the sum holds (U3).
    pub fn contributors(&self) -> &[PartyId] {
        &self.contributors
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The sum in the ring: exactly Σ of the contributors' encoded vectors.
    pub fn ring_sum(&self) -> &[u32] {
        &self.sum
    }

    /// The f32 sum of the contributors' clipped updates.
    pub fn decode_sum(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.sum.len()];
        self.encoding.decode_sum_into(&self.sum, &mut out);
        out
    }

    /// The unweighted f32 mean of the contributors' clipped updates.
    pub fn decode_mean(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.sum.len()];
        self.decode_mean_range(0, &mut out);
        out
    }

    /// The mean of elements `[offset, offset + out.len())` (clamped to the vector's end), to
    /// decode chunk by chunk into the caller's tensors.
    pub fn decode_mean_range(&self, offset: usize, out: &mut [f32]) {
        let start = offset.min(self.sum.len());
        let end = (offset + out.len()).min(self.sum.len());
        self.encoding
            .decode_mean_into(&self.sum[start..end], self.contributors.len(), out);
    }

    /// Per element: the most [`Aggregate::decode_mean`] differs from the exact mean of the
    /// contributors' clipped inputs.
    pub fn mean_error_bound(&self) -> f64 {
        self.encoding.mean_error_bound()
    }

    /// Per element: the most [`Aggregate::decode_sum`] differs from their exact sum.
    pub fn sum_error_bound(&self) -> f64 {
        self.encoding.sum_error_bound(self.contributors.len())
    }
}
