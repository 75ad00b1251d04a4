//! Metadata stores: one trait per owning service (`JobStore` for
//! job-scheduler, `ModelStore` for model-manager, `ClientStore` for
//! client-selector), implemented for SQLite (the embedded default), PostgreSQL
//! and MongoDB, chosen by URL with [`open_job_store`] and its siblings. The
//! [`conformance`] suite states the behaviour every backend must share.
//!
//! What each store holds: jobs with their events and rounds, and the API
//! tokens ([`TokenStore`], a supertrait of `JobStore`: only token hashes are
//! stored) and the audit log ([`AuditStore`], likewise); model versions, each model in one namespace; parties with their
//! holdings, counters and revocation.
//!
//! Services hold an `Arc<dyn ...Store>` and never see SQL; every store opened
//! by URL is wrapped in [`measured::Measured`] (call latency, errors and pool
//! connections on `/metrics`). Of ours this crate depends on cohort-core and
//! cohort-metrics only; it must not depend on gRPC, on the blob store or on any
//! service crate.

pub mod audit;
pub mod clients;
pub mod conformance;
pub mod jobs;
pub mod measured;
pub mod models;
pub mod mongo;
pub mod open;
pub mod postgres;
mod rows;
mod sqlite;
pub mod tokens;

pub use audit::{AuditFilter, AuditRecord, AuditStore, NewAuditEntry};
pub use open::{DatabaseOptions, open_client_store, open_job_store, open_model_store, redact_url};
pub use sqlite::open_sqlite;
pub use tokens::{NewToken, TokenRecord, TokenStore};

/// Store errors, mapped once onto gRPC codes by the services.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// The record exists already, or changed since it was read.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid database URL {url:?}: {message}")]
    InvalidUrl { url: String, message: String },
    /// The database cannot be reached or failed; the request may be retried.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt record {what} {id:?}: {message}")]
    Corrupt {
        what: &'static str,
        id: String,
        message: String,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StoreError::NotFound {
                what: "record",
                id: String::new(),
            },
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_string())
            }
            // PostgreSQL aborted the transaction (serialization failure,
            // deadlock): nothing was written and the caller may retry.
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("40001") | Some("40P01")) =>
            {
                StoreError::Conflict(format!("transaction aborted, retry: {}", db.message()))
            }
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Unavailable(format!("migration failed: {e}"))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A u64 as the i64 every backend stores (INTEGER, BIGINT, MongoDB's int64), naming the
/// record and the field that does not fit.
pub(crate) fn to_i64(value: u64, field: &str, what: &'static str, id: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt {
        what,
        id: id.to_string(),
        message: format!("{field} {value} exceeds the database's 63-bit range"),
    })
}

/// A page of results and the token for the next one (None: last page).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_token: Option<String>,
}

impl cohort_core::HasKind for StoreError {
    fn kind(&self) -> cohort_core::ErrorKind {
        use cohort_core::ErrorKind;
        match self {
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::Conflict(_) => ErrorKind::Conflict,
            StoreError::InvalidUrl { .. } => ErrorKind::InvalidArgument,
            StoreError::Unavailable(_) => ErrorKind::Unavailable,
            StoreError::Corrupt { .. } => ErrorKind::DataLoss,
        }
    }
}
