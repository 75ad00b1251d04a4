//! Error kinds: every crate's error says which kind it is, and one mapping in
//! `cohort-runtime` turns kinds into gRPC codes (and HTTP statuses).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong; retrying it unchanged will fail again.
    InvalidArgument,
    NotFound,
    /// Changed under the caller, or taken by another (optimistic concurrency).
    Conflict,
    /// A second delivery of something that may be delivered once.
    AlreadyExists,
    /// The request is valid but not in the current state (e.g. delete a running job).
    FailedPrecondition,
    /// A dependency is down; retrying later may work.
    Unavailable,
    /// Stored data failed verification.
    DataLoss,
    /// No credentials, or credentials that do not check out.
    Unauthenticated,
    PermissionDenied,
    /// A limit was reached (too many uploads at once, too large); later or smaller may work.
    ResourceExhausted,
    /// The caller was too slow (an upload that stalled).
    DeadlineExceeded,
    Internal,
}

impl ErrorKind {
    /// The kind in snake case: for metric labels and machine-read output.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DataLoss => "data_loss",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidArgument => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::AlreadyExists => 409,
            ErrorKind::FailedPrecondition => 412,
            ErrorKind::Unavailable => 503,
            ErrorKind::DataLoss => 500,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::ResourceExhausted => 429,
            ErrorKind::DeadlineExceeded => 504,
            ErrorKind::Internal => 500,
        }
    }
}

/// Implemented by every crate's error type; `cohort-runtime` maps kinds to statuses.
pub trait HasKind {
    fn kind(&self) -> ErrorKind;
}

impl HasKind for crate::SpecError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidArgument
    }
}
