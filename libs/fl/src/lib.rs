//! Federated-learning math and tensor framing: chunking tensors for the wire,
//! reassembling them with validation, safetensors encoding, and streaming
//! aggregation (FedAvg with bounded weights and update norms, robust rules), and the
//! server side of every strategy ([`Strategy`]: momentum, adaptive optimisers, SCAFFOLD)
//! that moves the global model by it; compression of updates on the wire
//! (`compress`: stochastic quantisation, top-k with the party's residual); differential
//! privacy (`privacy`: clipping, Gaussian noise on the sum, the RDP accountant).
//!
//! No I/O and no async: callers feed chunks in and take tensors out. Must not
//! depend on candle, storage or networking crates.

pub mod aggregate;
mod buffers;
pub mod compress;
pub mod corrupt;
pub mod privacy;
pub mod robust;
pub mod server_opt;
pub mod strategy;
pub mod synthetic;
pub mod wire;

pub use aggregate::{
    AggregationRules, CheckedUpdate, FedAvg, UpdateCheck, UpdateStream, UpdateValues,
    capped_weights, lower_median,
};
pub use compress::{Encoded, UpdateDecoder};
pub use corrupt::Corruption;
pub use privacy::{Accountant, DpAggregation, LocalDp};
pub use robust::RobustRule;
pub use server_opt::AdaptiveServer;
pub use strategy::{Combine, RoundFacts, Strategy};
pub use synthetic::SyntheticModel;
pub use wire::{
    TensorAssembler, chunk_tensors, chunk_tensors_shared, from_safetensors, safetensors_stream,
    to_safetensors,
};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlError {
    #[error("tensor {tensor:?}: {message}")]
    BadChunk { tensor: String, message: String },
    #[error("update does not match the global model: {0}")]
    LayoutMismatch(String),
    #[error("update of {0} samples carries no weight")]
    ZeroWeight(u64),
    #[error("nothing was aggregated")]
    Empty,
    #[error("invalid safetensors: {0}")]
    Safetensors(String),
    #[error("tensor {tensor:?} holds a non-finite value")]
    NonFinite { tensor: String },
    #[error("update norm {norm:.4e} is over the bound {bound:.4e}")]
    UpdateTooLarge { norm: f64, bound: f64 },
    #[error("tensor {tensor:?} would no longer be finite with this update applied")]
    NonFiniteResult { tensor: String },
    #[error("the aggregate is not finite (tensor {tensor:?}); it is not stored")]
    NonFiniteAggregate { tensor: String },
    #[error("the aggregate is incomplete: {0}")]
    Broken(String),
    #[error("cannot read a staged update back: {0}")]
    Staging(String),
}

/// Default chunk size on the wire (DESIGN §1: 1 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;
