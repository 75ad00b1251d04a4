//! cohort-security: federation certificates (a CA, party and service
//! certificates), identities read from certificates, rustls configurations
//! for mutual TLS, and API tokens (generation and hashing).
//!
//! Must not depend on gRPC, storage or any service crate; no network I/O.

mod ca;
mod error;
mod files;
mod identity;
mod tls;
mod token;

pub use ca::{CertAuthority, CertifiedKey, DEFAULT_VALIDITY, Validity};
pub use error::SecurityError;
pub use files::{load_certs, load_certs_pem, load_key, load_key_pem, write_cert, write_key};
pub use identity::{Identity, TRUST_DOMAIN, identity_of};
pub use tls::{ClientAuth, TlsFiles, client_config, install_crypto_provider, server_config};
pub use token::{ApiToken, bearer_token, token_sha256};
