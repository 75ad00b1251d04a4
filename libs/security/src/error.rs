//! One error type for the crate. Messages name the file or field at fault and
//! never carry key or token material.

use std::path::PathBuf;

use cohort_core::{ErrorKind, HasKind};

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A name, SAN, validity window or other argument is malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {what} {}: {source}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file was read but its contents are not what they should be.
    #[error("invalid {what} {}: {reason}", path.display())]
    InvalidFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// Key or certificate generation failed inside the crypto library.
    #[error("cannot generate {what}: {reason}")]
    Generate { what: String, reason: String },
    /// rustls refused to build a configuration; `what` names the files involved.
    #[error("TLS configuration ({what}): {source}")]
    Tls { what: String, source: rustls::Error },
    /// A certificate does not carry exactly one valid Cohort identity.
    #[error("certificate identity: {reason}")]
    Identity { reason: String },
    /// A malformed API token or authorization header. Never echoes the value.
    #[error("invalid {field}: {reason}")]
    Token {
        field: &'static str,
        reason: &'static str,
    },
}

impl SecurityError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        SecurityError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn identity(reason: impl Into<String>) -> Self {
        SecurityError::Identity {
            reason: reason.into(),
        }
    }
}

impl HasKind for SecurityError {
    fn kind(&self) -> ErrorKind {
        match self {
            SecurityError::InvalidArgument { .. } | SecurityError::InvalidFile { .. } => {
                ErrorKind::InvalidArgument
            }
            // Local files and the crypto library: nothing the caller can fix by retrying.
            SecurityError::Read { .. }
            | SecurityError::Write { .. }
            | SecurityError::Generate { .. }
            | SecurityError::Tls { .. } => ErrorKind::Internal,
            // A bad credential is refused like an unknown one.
            SecurityError::Identity { .. } | SecurityError::Token { .. } => {
                ErrorKind::PermissionDenied
            }
        }
    }
}
