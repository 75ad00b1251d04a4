//! The party's side of a round, as a state machine:
//! created → (share_keys) shared → (receive_shares) masking → (unmask) answered.
//!
//! A party masks its encoded update y = x + PRG(b) + Σ_{v ∈ U2, v > u} PRG(s_uv)
//! − Σ_{v ∈ U2, v < u} PRG(s_uv) chunk by chunk at any offset, and answers one unmask request
//! per round: s_sk shares of the dropped parties, b shares of the survivors, refusing a request
//! that names a party in both lists, leaves one out, or has fewer than t survivors. A repeated
//! identical request gets the same answer (a retried call); any other second request is refused,
//! so a server cannot learn b from one answer and s_sk from another.
//!
//! One `Party` serves one round and one update: masking a different update under the same masks
//! would give the server the difference of the two. Make a new `Party` for every round.

use std::collections::{BTreeMap, BTreeSet};

use rand::CryptoRng;
use zeroize::Zeroizing;

use crate::crypto::{KeyPair, commit_self_mask, sealed_len};
use crate::encoding::Encoding;
use crate::error::{Result, SecAggError};
use crate::graph::Graph;
use crate::messages::{
    Advertisement, EncryptedShare, PartyId, RevealedShare, Roster, RoundId, ShareDelivery,
    UnmaskRequest, UnmaskResponse, check_round,
};
use crate::prg::{Sign, apply_mask};
use crate::shamir::{self, SHARE_LEN, Share};

/// Plaintext of an encrypted share: the s_sk share, then the b share.
pub(crate) const SHARE_PLAINTEXT_LEN: usize = 2 * SHARE_LEN;
/// Bytes of an [`EncryptedShare`]'s ciphertext.
pub const ENCRYPTED_SHARE_LEN: usize = sealed_len(SHARE_PLAINTEXT_LEN);

/// The shares a party holds of one other party's secrets.
struct Held {
    mask_key: Share,
    self_mask: Share,
}

struct Shared {
    roster: Roster,
    graph: Graph,
    position: usize,
    own: Held,
}

struct Masking {
    roster: Roster,
    graph: Graph,
    /// Every party that shared (U2), this party's neighbours or not.
    sharers: Vec<PartyId>,
    /// Shares of every neighbour's secrets that shared, this party's own included.
    held: BTreeMap<PartyId, Held>,
    /// Pairwise mask seeds with every neighbour that shared and whether this party adds or
    /// subtracts.
    seeds: Vec<(Zeroizing<[u8; 32]>, Sign)>,
    encoding: Encoding,
}

enum State {
    Created,
    Shared(Box<Shared>),
    Masking(Box<Masking>),
    Answered(Box<Masking>, UnmaskRequest, UnmaskResponse),
    /// A step failed half way; the party takes no further part in the round.
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Created => "created",
            State::Shared(_) => "shared keys",
            State::Masking(_) => "masking",
            State::Answered(..) => "answered unmask request",
            State::Failed => "failed",
        }
    }
}

/// One party's secrets and progress in one round.
pub struct Party {
    round: RoundId,
    id: PartyId,
    clip: f32,
    c: KeyPair,
    s: KeyPair,
    b: Zeroizing<[u8; 32]>,
    state: State,
}

impl std::fmt::Debug for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Party")
            .field("round", &self.round)
            .field("id", &self.id)
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

impl Party {
    /// A party for `round` with fresh key pairs and self-mask seed drawn from `rng` (OS
    /// randomness in production: `rand::rngs::OsRng.unwrap_err()` or `rand::rng()`).
    pub fn new<R: CryptoRng + ?Sized>(
        round: RoundId,
        id: impl Into<PartyId>,
        clip: f32,
        rng: &mut R,
    ) -> Result<Party> {
        let id = id.into();
        if id.is_empty() {
            return Err(SecAggError::InvalidParams("empty party id".into()));
        }
        if !(clip.is_finite() && clip > 0.0) {
            return Err(SecAggError::InvalidParams(format!(
                "clip must be a finite number > 0, got {clip}"
            )));
        }
        let c = KeyPair::generate(rng);
        let s = KeyPair::generate(rng);
        let mut b = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut b[..]);
        Ok(Party {
            round,
            id,
            clip,
            c,
            s,
            b,
            state: State::Created,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn round(&self) -> &RoundId {
        &self.round
    }

    /// The round's encoding, once the shares arrived (it depends on the roster's size).
    pub fn encoding(&self) -> Option<Encoding> {
        match &self.state {
            State::Masking(m) | State::Answered(m, ..) => Some(m.encoding),
            _ => None,
        }
    }

    /// The parties this party masks with (U2), once the shares arrived.
    pub fn sharers(&self) -> Option<&[PartyId]> {
        match &self.state {
            State::Masking(m) | State::Answered(m, ..) => Some(&m.sharers),
            _ => None,
        }
    }

    fn wrong_phase(&self, expected: &'static str) -> SecAggError {
        SecAggError::WrongPhase {
            actor: "party",
            expected,
            actual: self.state.name(),
        }
    }

    /// The public keys to send to the server.
    pub fn advertise(&self) -> Advertisement {
        Advertisement {
            round: self.round.clone(),
            party: self.id.clone(),
            c_pk: self.c.public(),
            s_pk: self.s.public(),
            b_commitment: commit_self_mask(&self.round, &self.id, &self.b),
        }
    }

    /// Checks the roster and Shamir-shares s_sk and b with its threshold among this party and
    /// its neighbours in the roster's graph: one encrypted share for every neighbour.
    pub fn share_keys<R: CryptoRng + ?Sized>(
        &mut self,
        roster: &Roster,
        rng: &mut R,
    ) -> Result<Vec<EncryptedShare>> {
        if !matches!(self.state, State::Created) {
            return Err(self.wrong_phase("created"));
        }
        if roster.round != self.round {
            return Err(SecAggError::InvalidRoster(format!(
                "for {}, this is {}",
                roster.round, self.round
            )));
        }
        roster.validate()?;
        if roster.clip != self.clip {
            return Err(SecAggError::InvalidRoster(format!(
                "clip {} differs from this party's {}",
                roster.clip, self.clip
            )));
        }
        let position = roster
            .position(&self.id)
            .ok_or_else(|| SecAggError::InvalidRoster(format!("party {} is not in it", self.id)))?;
        let mine = &roster.parties[position];
        if mine.c_pk != self.c.public() || mine.s_pk != self.s.public() {
            return Err(SecAggError::InvalidRoster(format!(
                "the keys listed for {} are not its own",
                self.id
            )));
        }
        let graph = Graph::of(roster);
        let holders: Vec<usize> = (0..roster.len())
            .filter(|&p| graph.holds(p, position))
            .collect();
        let indices: Vec<u32> = holders.iter().map(|&p| p as u32 + 1).collect();
        let shamir_error = |source| SecAggError::Share {
            party: self.id.clone(),
            source,
        };
        let mask_key_shares = shamir::split(
            &self.s.secret_bytes(),
            roster.threshold,
            &indices,
            &mut *rng,
        )
        .map_err(shamir_error)?;
        let self_mask_shares =
            shamir::split(&self.b, roster.threshold, &indices, &mut *rng).map_err(shamir_error)?;
        let mut out = Vec::with_capacity(holders.len() - 1);
        let mut own = None;
        for ((entry, s_share), b_share) in holders
            .iter()
            .map(|&p| &roster.parties[p])
            .zip(mask_key_shares)
            .zip(self_mask_shares)
        {
            if entry.party == self.id {
                own = Some(Held {
                    mask_key: s_share,
                    self_mask: b_share,
                });
                continue;
            }
            let mut plaintext = Zeroizing::new([0u8; SHARE_PLAINTEXT_LEN]);
            plaintext[..SHARE_LEN].copy_from_slice(&s_share.to_bytes()[..]);
            plaintext[SHARE_LEN..].copy_from_slice(&b_share.to_bytes()[..]);
            let key = self.c.share_key(
                &self.round,
                &self.id,
                &entry.party,
                &entry.party,
                &entry.c_pk,
            )?;
            out.push(EncryptedShare {
                round: self.round.clone(),
                sender: self.id.clone(),
                recipient: entry.party.clone(),
                ciphertext: key.seal(&plaintext[..], &mut *rng)?,
            });
        }
        let own = own.ok_or_else(|| SecAggError::InvalidRoster("own entry vanished".into()))?;
        self.state = State::Shared(Box::new(Shared {
            roster: roster.clone(),
            graph,
            position,
            own,
        }));
        Ok(out)
    }

    /// Decrypts and checks the shares its neighbours addressed to this party and agrees its
    /// pairwise mask seeds with every neighbour that shared (in U2). A share that fails is
    /// refused naming its sender, and the party takes no further part in the round.
    pub fn receive_shares(&mut self, delivery: &ShareDelivery) -> Result<()> {
        let State::Shared(shared) = std::mem::replace(&mut self.state, State::Failed) else {
            return Err(self.wrong_phase("shared keys"));
        };
        // On an error the party stays `Failed`: it does not mask with a set it could not check.
        let masking = self.open_delivery(&shared, delivery)?;
        self.state = State::Masking(Box::new(masking));
        Ok(())
    }

    fn open_delivery(&self, shared: &Shared, delivery: &ShareDelivery) -> Result<Masking> {
        let roster = &shared.roster;
        let server_error = |what: String| SecAggError::ServerMessage(what);
        if delivery.round != self.round {
            return Err(server_error(format!(
                "share delivery for {}, this is {}",
                delivery.round, self.round
            )));
        }
        if delivery.recipient != self.id {
            return Err(server_error(format!(
                "share delivery for {}, this is {}",
                delivery.recipient, self.id
            )));
        }
        for (i, p) in delivery.sharers.iter().enumerate() {
            roster.entry_or_unknown(p)?;
            if i > 0 && delivery.sharers[i - 1] >= *p {
                return Err(server_error(format!("sharers not strictly sorted at {p}")));
            }
        }
        if delivery.sharers.binary_search(&self.id).is_err() {
            return Err(server_error(format!(
                "{} is not among the parties that shared",
                self.id
            )));
        }
        let graph = &shared.graph;
        let neighbour = |p: &str| {
            roster
                .position(p)
                .is_some_and(|at| graph.adjacent(at, shared.position))
        };
        // Its b must be recoverable from the sharers holding its shares (itself included).
        let holders: Vec<&PartyId> = delivery
            .sharers
            .iter()
            .filter(|p| **p == self.id || neighbour(p))
            .collect();
        if delivery.sharers.len() < roster.threshold || holders.len() < roster.threshold {
            return Err(SecAggError::ThresholdNotMet {
                stage: "key sharing",
                have: holders.len(),
                threshold: roster.threshold,
                parties: holders
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let my_index = shared.position as u32 + 1;
        let mut held = BTreeMap::new();
        for share in &delivery.shares {
            let sender = &share.sender;
            if delivery.sharers.binary_search(sender).is_err() || !neighbour(sender) {
                return Err(server_error(format!(
                    "a share from {sender}, who is not a neighbour that shared"
                )));
            }
            if share.recipient != self.id {
                return Err(SecAggError::Misaddressed {
                    sender: sender.clone(),
                    recipient: share.recipient.clone(),
                    expected: self.id.clone(),
                });
            }
            check_round(sender, &self.round, &share.round)?;
            let entry = roster.entry_or_unknown(sender)?;
            let key = self
                .c
                .share_key(&self.round, sender, &self.id, sender, &entry.c_pk)?;
            let plaintext =
                key.open(&share.ciphertext)
                    .ok_or_else(|| SecAggError::ShareAuthentication {
                        sender: sender.clone(),
                        recipient: self.id.clone(),
                    })?;
            let bad = |source| SecAggError::Share {
                party: sender.clone(),
                source,
            };
            if plaintext.len() != SHARE_PLAINTEXT_LEN {
                return Err(bad(crate::ShamirError::Malformed(
                    "an encrypted share holds two 68-byte shares",
                )));
            }
            let mask_key = Share::from_bytes(&plaintext[..SHARE_LEN]).map_err(bad)?;
            let self_mask = Share::from_bytes(&plaintext[SHARE_LEN..]).map_err(bad)?;
            if mask_key.index() != my_index || self_mask.index() != my_index {
                return Err(bad(crate::ShamirError::Malformed(
                    "a share for another party's index",
                )));
            }
            if held
                .insert(
                    sender.clone(),
                    Held {
                        mask_key,
                        self_mask,
                    },
                )
                .is_some()
            {
                return Err(SecAggError::Duplicate {
                    party: sender.clone(),
                    what: "share to this party",
                });
            }
        }
        if let Some(missing) = holders
            .iter()
            .find(|p| **p != &self.id && !held.contains_key(**p))
        {
            return Err(server_error(format!(
                "no share from {missing}, who is listed as having shared"
            )));
        }
        held.insert(
            self.id.clone(),
            Held {
                mask_key: shared.own.mask_key.clone(),
                self_mask: shared.own.self_mask.clone(),
            },
        );
        let mut seeds = Vec::with_capacity(holders.len());
        for peer in holders {
            if *peer == self.id {
                continue;
            }
            let entry = roster.entry_or_unknown(peer)?;
            let seed = self.s.mask_seed(&self.round, &self.id, peer, &entry.s_pk)?;
            let sign = if *peer > self.id {
                Sign::Add
            } else {
                Sign::Subtract
            };
            seeds.push((seed, sign));
        }
        Ok(Masking {
            roster: roster.clone(),
            graph: shared.graph.clone(),
            sharers: delivery.sharers.clone(),
            held,
            seeds,
            encoding: Encoding::new(self.clip, roster.len())?,
        })
    }

    /// Encodes and masks elements `[offset, offset + values.len())` of the clipped update into
    /// `out` (same length). Returns how many values were clamped to [−clip, clip].
    pub fn mask_into(&self, offset: u64, values: &[f32], out: &mut [u32]) -> Result<usize> {
        let State::Masking(m) = &self.state else {
            return Err(self.wrong_phase("masking"));
        };
        let clamped = m.encoding.encode(offset, values, out)?;
        apply_mask(&self.b, offset, out, Sign::Add)?;
        for (seed, sign) in &m.seeds {
            apply_mask(seed, offset, out, *sign)?;
        }
        Ok(clamped)
    }

    /// [`Party::mask_into`] into a new vector.
    pub fn mask(&self, offset: u64, values: &[f32]) -> Result<Vec<u32>> {
        let mut out = vec![0u32; values.len()];
        self.mask_into(offset, values, &mut out)?;
        Ok(out)
    }

    /// Answers the server's unmask request: for each dropped neighbour its s_sk share, for each
    /// surviving neighbour (and itself) its b share. Refuses a request naming one party in both
    /// lists (that would reveal its update), one that leaves out a party that shared or names
    /// one that did not, one where this party is not a survivor, one with fewer than t
    /// survivors, and one whose survivors fall apart into groups of the masking graph (each
    /// group's sum would show).
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse> {
        let masking = match &self.state {
            State::Masking(m) => m,
            State::Answered(_, answered, response) => {
                if answered == request {
                    return Ok(response.clone());
                }
                return Err(SecAggError::InvalidUnmaskRequest(
                    "this party already answered a different request this round".into(),
                ));
            }
            _ => return Err(self.wrong_phase("masking")),
        };
        let response = self.answer(masking, request)?;
        let State::Masking(m) = std::mem::replace(&mut self.state, State::Failed) else {
            return Err(self.wrong_phase("masking"));
        };
        self.state = State::Answered(m, request.clone(), response.clone());
        Ok(response)
    }

    fn answer(&self, m: &Masking, request: &UnmaskRequest) -> Result<UnmaskResponse> {
        if request.round != self.round {
            return Err(SecAggError::InvalidUnmaskRequest(format!(
                "for {}, this is {}",
                request.round, self.round
            )));
        }
        let survivors: BTreeSet<&PartyId> = request.survivors.iter().collect();
        let dropped: BTreeSet<&PartyId> = request.dropped.iter().collect();
        // The SecAgg rule first: never both shares of one party.
        if let Some(both) = dropped.intersection(&survivors).next() {
            return Err(SecAggError::BothSharesRequested {
                party: (*both).clone(),
            });
        }
        if survivors.len() != request.survivors.len() || dropped.len() != request.dropped.len() {
            return Err(SecAggError::InvalidUnmaskRequest(
                "a party is listed twice".into(),
            ));
        }
        for p in survivors.iter().chain(dropped.iter()) {
            if m.sharers.binary_search(p).is_err() {
                return Err(SecAggError::InvalidUnmaskRequest(format!(
                    "{p} did not share keys this round"
                )));
            }
        }
        if let Some(missing) = m
            .sharers
            .iter()
            .find(|p| !survivors.contains(p) && !dropped.contains(p))
        {
            return Err(SecAggError::InvalidUnmaskRequest(format!(
                "{missing} shared keys but is listed neither as dropped nor as survivor"
            )));
        }
        if !survivors.contains(&self.id) {
            return Err(SecAggError::InvalidUnmaskRequest(format!(
                "{} is not listed as a survivor",
                self.id
            )));
        }
        if survivors.len() < m.roster.threshold {
            return Err(SecAggError::ThresholdNotMet {
                stage: "unmasking",
                have: survivors.len(),
                threshold: m.roster.threshold,
                parties: request.survivors.join(", "),
            });
        }
        let alive: Vec<usize> = survivors
            .iter()
            .filter_map(|p| m.roster.position(p))
            .collect();
        if !m.graph.connected(&alive) {
            return Err(SecAggError::Disconnected {
                survivors: request.survivors.join(", "),
            });
        }
        let reveal = |owner: &PartyId, share: &Share| RevealedShare {
            owner: owner.clone(),
            share: share.to_bytes().to_vec(),
        };
        let mut mask_key_shares = Vec::with_capacity(request.dropped.len());
        for p in &request.dropped {
            if let Some(h) = m.held.get(p) {
                mask_key_shares.push(reveal(p, &h.mask_key));
            }
        }
        let mut self_mask_shares = Vec::with_capacity(request.survivors.len());
        for p in &request.survivors {
            if let Some(h) = m.held.get(p) {
                self_mask_shares.push(reveal(p, &h.self_mask));
            }
        }
        Ok(UnmaskResponse {
            round: self.round.clone(),
            party: self.id.clone(),
            mask_key_shares,
            self_mask_shares,
        })
    }
}
