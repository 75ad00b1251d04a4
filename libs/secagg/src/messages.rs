//! The protocol's messages: plain structs with public fields and byte arrays for keys, so the
//! wiring maps each onto a protobuf message field by field (32-byte keys through
//! [`key_from_bytes`], which names the party on a wrong length).
//!
//! Flow of one round (P = each party, S = the server):
//!
//! ```text
//!  P → S  Advertisement            c_pk, s_pk, commitment to b
//!  S → P  Roster                   every advertised party, sorted by id; threshold; clip
//!  P → S  Vec<EncryptedShare>      to every other party: its shares of s_sk and b (AEAD)
//!  S → P  ShareDelivery            the parties that shared (U2) and the shares addressed to P
//!  P → S  masked chunks            (offset, Vec<u32>) until the whole vector is sent
//!  S → P  UnmaskRequest            dropped = U2 \ U3, survivors = U3 (masked input complete)
//!  P → S  UnmaskResponse           s_sk shares of the dropped, b shares of the survivors
//! ```

use crate::error::{Result, SecAggError};
use crate::graph::Neighbours;

/// A party's name (in Cohort, the name in its certificate). Parties are ordered by it,
/// bytewise: that order gives roster positions, Shamir indices and mask signs.
pub type PartyId = String;

/// Which round of which job a message belongs to; bound into every key derivation and every
/// share's associated data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoundId {
    pub job: String,
    pub round: u64,
}

impl RoundId {
    pub fn new(job: impl Into<String>, round: u64) -> RoundId {
        RoundId {
            job: job.into(),
            round,
        }
    }
}

impl std::fmt::Display for RoundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} round {}", self.job, self.round)
    }
}

pub(crate) fn check_round(party: &str, expected: &RoundId, got: &RoundId) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(SecAggError::WrongRound {
            party: party.to_string(),
            expected: expected.to_string(),
            got: got.to_string(),
        })
    }
}

/// A 32-byte key from wire bytes, refusing another length naming the party and the field.
pub fn key_from_bytes(party: &str, what: &'static str, bytes: &[u8]) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| SecAggError::KeyLength {
        party: party.to_string(),
        what,
        got: bytes.len(),
    })
}

/// A party's public keys for the round. The wiring sets `party` from the authenticated
/// caller (its certificate, bound to its task token), never from the message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    pub round: RoundId,
    pub party: PartyId,
    /// X25519 public key that agrees the keys encrypting this party's shares.
    pub c_pk: [u8; 32],
    /// X25519 public key that agrees this party's pairwise mask seeds.
    pub s_pk: [u8; 32],
    /// SHA-256 commitment to the self-mask seed b (checked after reconstruction).
    pub b_commitment: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterEntry {
    pub party: PartyId,
    pub c_pk: [u8; 32],
    pub s_pk: [u8; 32],
}

/// The round's parties as the server fixed them: sorted by id, position i (0-based) holding
/// Shamir index i + 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Roster {
    pub round: RoundId,
    /// t: shares needed to reconstruct, and the fewest parties the round may go on with.
    pub threshold: usize,
    /// The L2 clip norm C of the updates (with the roster's size, it fixes the encoding).
    pub clip: f32,
    /// Whom each party shares its secrets with and masks with ([`crate::graph`]); t counts
    /// within a party's closed neighbourhood.
    pub neighbours: Neighbours,
    pub parties: Vec<RosterEntry>,
}

/// t must be at least 2 (one party's sum would be its update), at most the `holders` of one
/// party's shares (all n parties in the complete graph, a party and its k neighbours in a
/// sparse one), and more than half of them: with t ≤ holders/2 a server could tell two
/// disjoint groups of t different dropout sets and learn b from one and s_sk from the other
/// for the same party.
pub fn check_threshold(threshold: usize, holders: usize) -> Result<()> {
    if threshold < 2 || threshold > holders || 2 * threshold <= holders {
        return Err(SecAggError::InvalidParams(format!(
            "threshold t={threshold} with {holders} holders of each party's shares: need \
             2 <= t <= holders and t > holders/2"
        )));
    }
    Ok(())
}

impl Roster {
    pub fn len(&self) -> usize {
        self.parties.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parties.is_empty()
    }

    /// Position of `party` (0-based), by binary search on the sorted ids.
    pub fn position(&self, party: &str) -> Option<usize> {
        self.parties
            .binary_search_by(|e| e.party.as_str().cmp(party))
            .ok()
    }

    /// Parties holding shares of one party's secrets: it and its neighbours.
    pub fn holders(&self) -> usize {
        self.neighbours.holders(self.parties.len())
    }

    /// Shamir index of `party`: its position + 1.
    pub fn index_of(&self, party: &str) -> Option<u32> {
        self.position(party).map(|p| p as u32 + 1)
    }

    pub fn entry(&self, party: &str) -> Option<&RosterEntry> {
        self.position(party).map(|p| &self.parties[p])
    }

    pub(crate) fn entry_or_unknown(&self, party: &str) -> Result<&RosterEntry> {
        self.entry(party).ok_or_else(|| SecAggError::UnknownParty {
            party: party.to_string(),
        })
    }

    /// Everything a party checks of a roster before sharing its keys: the threshold rule,
    /// strictly sorted non-empty ids, no public key used twice.
    pub fn validate(&self) -> Result<()> {
        self.neighbours
            .check()
            .map_err(SecAggError::InvalidRoster)?;
        check_threshold(self.threshold, self.holders())?;
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(SecAggError::InvalidRoster(format!(
                "clip {} is not a finite number > 0",
                self.clip
            )));
        }
        let mut keys = std::collections::BTreeMap::new();
        for (i, e) in self.parties.iter().enumerate() {
            if e.party.is_empty() {
                return Err(SecAggError::InvalidRoster("an empty party id".into()));
            }
            if i > 0 && self.parties[i - 1].party >= e.party {
                return Err(SecAggError::InvalidRoster(format!(
                    "parties not strictly sorted by id at {}",
                    e.party
                )));
            }
            for key in [e.c_pk, e.s_pk] {
                if let Some(other) = keys.insert(key, e.party.clone()) {
                    return Err(SecAggError::KeyReused {
                        party: e.party.clone(),
                        other,
                    });
                }
            }
        }
        Ok(())
    }
}

/// One party's shares of its s_sk and b for one other party, encrypted so that only the
/// recipient reads them; the server routes it unopened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedShare {
    pub round: RoundId,
    pub sender: PartyId,
    pub recipient: PartyId,
    /// nonce (12 bytes) ‖ ChaCha20-Poly1305 ciphertext of (index, s_sk share, b share) ‖ tag.
    pub ciphertext: Vec<u8>,
}

/// What the server sends each party that shared its keys: who shared (U2, sorted; the party
/// masks with exactly these) and the shares the others addressed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDelivery {
    pub round: RoundId,
    pub recipient: PartyId,
    pub sharers: Vec<PartyId>,
    pub shares: Vec<EncryptedShare>,
}

/// The server's request to the parties whose masked input arrived whole (U3): dropped parties
/// (U2 \ U3) need their mask keys reconstructed, survivors their self-masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    pub round: RoundId,
    pub dropped: Vec<PartyId>,
    pub survivors: Vec<PartyId>,
}

/// A decrypted share of `owner`'s secret, as revealed to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevealedShare {
    pub owner: PartyId,
    /// [`crate::shamir::Share`]'s 68-byte encoding.
    pub share: Vec<u8>,
}

/// A survivor's answer: a share of s_sk for every dropped party, a share of b for every
/// survivor (itself included), never both for one party.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskResponse {
    pub round: RoundId,
    pub party: PartyId,
    pub mask_key_shares: Vec<RevealedShare>,
    pub self_mask_shares: Vec<RevealedShare>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(party: &str, k: u8) -> RosterEntry {
        RosterEntry {
            party: party.into(),
            c_pk: [k; 32],
            s_pk: [k + 100; 32],
        }
    }

    fn roster(parties: Vec<RosterEntry>, threshold: usize) -> Roster {
        Roster {
            round: RoundId::new("j", 1),
            threshold,
            clip: 1.0,
            neighbours: Neighbours::Complete,
            parties,
        }
    }

    #[test]
    fn threshold_rule() {
        assert!(check_threshold(3, 5).is_ok());
        assert!(check_threshold(2, 3).is_ok());
        assert!(check_threshold(2, 4).is_err());
        assert!(check_threshold(1, 1).is_err());
        assert!(check_threshold(6, 5).is_err());
    }

    #[test]
    fn rosters_with_unsorted_ids_or_reused_keys_are_refused() {
        let good = roster(vec![entry("a", 1), entry("b", 2), entry("c", 3)], 2);
        assert!(good.validate().is_ok());
        assert_eq!(good.index_of("b"), Some(2));
        assert_eq!(good.index_of("z"), None);
        let unsorted = roster(vec![entry("b", 1), entry("a", 2), entry("c", 3)], 2);
        assert!(matches!(
            unsorted.validate(),
            Err(SecAggError::InvalidRoster(_))
        ));
        let mut reused = good.clone();
        reused.parties[2].s_pk = reused.parties[0].c_pk;
        assert_eq!(
            reused.validate(),
            Err(SecAggError::KeyReused {
                party: "c".into(),
                other: "a".into()
            })
        );
    }

    #[test]
    fn keys_of_the_wrong_length_name_the_party() {
        assert!(key_from_bytes("p", "c_pk", &[0; 32]).is_ok());
        assert_eq!(
            key_from_bytes("p", "c_pk", &[0; 31]),
            Err(SecAggError::KeyLength {
                party: "p".into(),
                what: "c_pk",
                got: 31
            })
        );
    }
}
