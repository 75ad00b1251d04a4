//! Secure aggregation: the pure protocol core of SecAgg (Bonawitz et al., CCS 2017) and
//! SecAgg+ (Bell et al., CCS 2020): over the complete graph of a round's parties, or over
//! SecAgg+'s sparse one ([`graph`]: each party with its k nearest on a ring drawn from the
//! keys). Parties clip and encode their f32 updates into the ring Z/2^32 ([`Encoding`]), add
//! pairwise masks with their neighbours that cancel in the sum and a self-mask, and
//! Shamir-share both mask secrets among their neighbours with threshold t; the server sums
//! masked vectors chunk by chunk and, with the shares of at least t surviving holders of each
//! secret, removes the masks of the sum only — never of one party's update (nor of a group of
//! survivors: the survivors' graph must be connected). [`Party`] and [`Server`] are state machines exchanging the plain structs of
//! [`messages`]; the coordinator and the executor carry those over the Round API.
//!
//! Invariants: the server never unmasks an individual update (it only ever learns the sum of
//! at least t ≥ 2 parties, connected in the masking graph; t > half of a secret's holders); a party never reveals both its b share and its s_sk share
//! of the same party (and answers one unmask request per round); every encrypted share is bound
//! to (job, round, sender, recipient), so it cannot be replayed into another round or
//! attributed to another party; every refusal names the party at fault
//! ([`SecAggError::party`]).
//!
//! Threat model: honest-but-curious server, parties identified by the transport (the wiring
//! sets each message's sender from the caller's certificate). The active-adversary additions
//! of SecAgg (signed advertisements, the consistency-check round over U3) are not here.
//!
//! Primitives from audited crates only: X25519 (`x25519-dalek`), HKDF-SHA256 (`hkdf`, `sha2`),
//! ChaCha20-Poly1305 (`chacha20poly1305`), the ChaCha20 keystream as mask PRG (`chacha20`), and
//! Shamir sharing over curve25519-dalek's scalar field.
//!
//! No I/O, no async, no networking: must not depend on tokio, tonic, prost, cohort-proto or
//! any storage crate (cohort-core only, for [`cohort_core::HasKind`]).

mod crypto;
pub mod encoding;
pub mod error;
pub mod graph;
pub mod messages;
pub mod party;
pub mod prg;
pub mod server;
pub mod shamir;

pub use encoding::{CHUNK_ELEMENTS, Encoding, clip_factor};
pub use error::{Result, SecAggError, ShamirError};
pub use graph::{Graph, Neighbours};
pub use messages::{
    Advertisement, EncryptedShare, PartyId, RevealedShare, Roster, RosterEntry, RoundId,
    ShareDelivery, UnmaskRequest, UnmaskResponse, check_threshold, key_from_bytes,
};
pub use party::{ENCRYPTED_SHARE_LEN, Party};
pub use prg::{MAX_MASK_ELEMENTS, mask_range};
pub use server::{Aggregate, Server, ServerConfig};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_sparse;
