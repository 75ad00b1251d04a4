//! Cohort's domain types: the job spec, job states, identifiers and the errors
//! that go with them.
//!
//! Pure and synchronous: no I/O, no async runtime, no protobuf or storage types.
//! Everything that enters the system is converted into these types at the edge.

pub mod auth;
pub mod error;
pub mod ids;
pub mod spec;
pub mod state;
pub mod task;
pub mod tensor;

pub use auth::{Action, AuthError, Principal, Role, Scope};
pub use error::{ErrorKind, HasKind};
pub use ids::{JobId, PartyId, is_dns_label, random_token};
pub use spec::{JobSpec, SpecError};
pub use state::JobState;
pub use task::TaskKind;
pub use tensor::NamedTensor;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    #[error("invalid {what}: {value:?}")]
    InvalidId { what: &'static str, value: String },
    #[error("invalid job state {0:?}")]
    InvalidState(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
}

/// Milliseconds since the Unix epoch, as stored and sent on the wire.
pub type UnixMillis = i64;
