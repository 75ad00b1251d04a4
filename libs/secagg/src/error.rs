//! The crate's one error type. Every check that a party's message can fail names that party
//! (`party`, `sender`, `owner`, `responder`), so the caller can refuse it, count it against that
//! party and log who was at fault; [`HasKind`] classifies each for the gRPC mapping.

use cohort_core::{ErrorKind, HasKind};

/// Why a Shamir share or a set of shares was refused (wrapped with the party in
/// [`SecAggError::Share`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    #[error("threshold {threshold} is not valid for {parties} shares (need 1 <= t <= n)")]
    InvalidThreshold { threshold: usize, parties: usize },
    #[error("share index 0 is the secret itself and never a share")]
    ZeroIndex,
    #[error("share index {0} appears twice")]
    DuplicateIndex(u32),
    #[error("{have} shares cannot reconstruct a secret of threshold {threshold}")]
    TooFewShares { have: usize, threshold: usize },
    #[error("malformed share: {0}")]
    Malformed(&'static str),
    #[error("share at index {index} does not lie on the polynomial of the others")]
    Inconsistent { index: u32 },
    #[error("the shares interpolate to a value that is not a 32-byte secret")]
    NotASecret,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    #[error("invalid secure-aggregation parameters: {0}")]
    InvalidParams(String),
    #[error("{actor} is in phase {actual}, not {expected}")]
    WrongPhase {
        actor: &'static str,
        expected: &'static str,
        actual: &'static str,
    },
    #[error("party {party} sent a message for round {got}, this is round {expected}")]
    WrongRound {
        party: String,
        expected: String,
        got: String,
    },
    #[error("party {party} is not in this round's roster")]
    UnknownParty { party: String },
    #[error("party {party} already sent its {what}")]
    Duplicate { party: String, what: &'static str },
    #[error("party {party} advertised a public key already used by {other}")]
    KeyReused { party: String, other: String },
    #[error("party {party}'s public key gives a non-contributory (low-order) key agreement")]
    NonContributoryKey { party: String },
    #[error("message from {actual} claims to come from {claimed}")]
    WrongSender { claimed: String, actual: String },
    #[error("share from {sender} is addressed to {recipient}, not to {expected}")]
    Misaddressed {
        sender: String,
        recipient: String,
        expected: String,
    },
    #[error(
        "share from {sender} to {recipient} failed authentication (tampered, replayed from another round, or re-addressed)"
    )]
    ShareAuthentication { sender: String, recipient: String },
    #[error("party {party} sent a bad share: {source}")]
    Share { party: String, source: ShamirError },
    #[error(
        "reconstructing party {owner}'s secret: {source} (a responder sent a wrong share, or {owner} dealt inconsistent ones)"
    )]
    Reconstruction { owner: String, source: ShamirError },
    #[error("invalid message from the server: {0}")]
    ServerMessage(String),
    #[error("party {party} is not a survivor of this round: its unmask response is not asked for")]
    NotSurvivor { party: String },
    #[error("invalid roster: {0}")]
    InvalidRoster(String),
    #[error("party {party} sent {got} encrypted shares, the roster needs {expected}")]
    ShareCount {
        party: String,
        got: usize,
        expected: usize,
    },
    #[error(
        "refused: the request asks for both the self-mask share and the mask-key share of party {party}; revealing both would unmask its individual update"
    )]
    BothSharesRequested { party: String },
    #[error("refused unmask request: {0}")]
    InvalidUnmaskRequest(String),
    #[error(
        "secure aggregation needs at least the threshold t={threshold} of parties at {stage}; only {have} remain ({parties})"
    )]
    ThresholdNotMet {
        stage: &'static str,
        have: usize,
        threshold: usize,
        parties: String,
    },
    #[error(
        "secure aggregation: the surviving parties ({survivors}) do not form one connected group \
         of the masking graph, and unmasking would reveal each group's sum; more neighbours \
         (privacy.secagg_neighbours) tolerate more dropouts"
    )]
    Disconnected { survivors: String },
    #[error(
        "party {party} sent a chunk at element {got}; its masked input continues at element {expected}"
    )]
    ChunkOutOfOrder {
        party: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "party {party} sent {len_sent} elements at element {offset}, past the vector's {len} elements"
    )]
    ChunkOutOfRange {
        party: String,
        offset: u64,
        len_sent: u64,
        len: u64,
    },
    #[error(
        "party {party}'s masked input stopped at element {received} of {expected}: a partial masked input cannot be removed from the sum, the round fails"
    )]
    PartialMaskedInput {
        party: String,
        received: u64,
        expected: u64,
    },
    #[error("the reconstructed {what} of party {party} does not match what it advertised")]
    ReconstructionMismatch { party: String, what: &'static str },
    #[error("value at element {index} is not finite")]
    NotFinite { index: u64 },
    #[error("mask range [{offset}, {offset}+{len}) is past the PRG's (2^32 - 1)·16 elements")]
    MaskRange { offset: u64, len: u64 },
    #[error("party {party}: {what} must be 32 bytes, got {got}")]
    KeyLength {
        party: String,
        what: &'static str,
        got: usize,
    },
}

impl HasKind for SecAggError {
    fn kind(&self) -> ErrorKind {
        use SecAggError::*;
        match self {
            InvalidParams(_)
            | WrongRound { .. }
            | KeyReused { .. }
            | NonContributoryKey { .. }
            | Misaddressed { .. }
            | Share { .. }
            | ServerMessage(_)
            | InvalidRoster(_)
            | ShareCount { .. }
            | InvalidUnmaskRequest(_)
            | ChunkOutOfOrder { .. }
            | ChunkOutOfRange { .. }
            | NotFinite { .. }
            | MaskRange { .. }
            | KeyLength { .. } => ErrorKind::InvalidArgument,
            WrongPhase { .. }
            | ThresholdNotMet { .. }
            | Disconnected { .. }
            | PartialMaskedInput { .. } => ErrorKind::FailedPrecondition,
            UnknownParty { .. }
            | NotSurvivor { .. }
            | WrongSender { .. }
            | BothSharesRequested { .. } => ErrorKind::PermissionDenied,
            Duplicate { .. } => ErrorKind::AlreadyExists,
            ShareAuthentication { .. } => ErrorKind::Unauthenticated,
            Reconstruction { .. } | ReconstructionMismatch { .. } => ErrorKind::DataLoss,
        }
    }
}

impl SecAggError {
    /// The party the error blames, when a party's message caused it (for `refused_updates`
    /// counting and logs); `None` for parameter and phase errors, the threshold, and a
    /// reconstruction that fails (t shares cannot tell which of them is wrong, so the error
    /// names the owner of the secret without blaming anyone).
    pub fn party(&self) -> Option<&str> {
        use SecAggError::*;
        match self {
            WrongRound { party, .. }
            | UnknownParty { party }
            | Duplicate { party, .. }
            | KeyReused { party, .. }
            | NonContributoryKey { party }
            | Share { party, .. }
            | NotSurvivor { party }
            | ShareCount { party, .. }
            | BothSharesRequested { party }
            | ChunkOutOfOrder { party, .. }
            | ChunkOutOfRange { party, .. }
            | PartialMaskedInput { party, .. }
            | KeyLength { party, .. } => Some(party),
            WrongSender { actual, .. } => Some(actual),
            Misaddressed { sender, .. } | ShareAuthentication { sender, .. } => Some(sender),
            InvalidParams(_)
            | WrongPhase { .. }
            | InvalidRoster(_)
            | ServerMessage(_)
            | InvalidUnmaskRequest(_)
            | Reconstruction { .. }
            | ReconstructionMismatch { .. }
            | ThresholdNotMet { .. }
            | Disconnected { .. }
            | NotFinite { .. }
            | MaskRange { .. } => None,
        }
    }
}

pub type Result<T, E = SecAggError> = std::result::Result<T, E>;
