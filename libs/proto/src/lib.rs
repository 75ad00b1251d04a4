//! Generated protobuf and gRPC code for Cohort's public API (`proto/cohort/v1`).
//!
//! This crate is the wire format only: no logic, no I/O. Other crates convert
//! these types into validated domain types (`cohort-core`) at the edge.
#![allow(clippy::all, clippy::unwrap_used, missing_docs)]

pub mod v1 {
    tonic::include_proto!("cohort.v1");
}

/// Encoded `FileDescriptorSet` of every Cohort proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cohort_descriptor.bin"));

/// Metadata key naming the job a round call belongs to; the proxy routes on it.
pub const JOB_METADATA_KEY: &str = "x-cohort-job";

/// Metadata the proxy sets (after removing any copy a caller sent) once it has
/// authenticated a call; server-internal services trust it only from peers
/// with a service certificate.
///
/// The party named by the caller's client certificate.
pub const PARTY_METADATA_KEY: &str = "x-cohort-party";
/// The namespace of the caller's API token (`*`: every namespace).
pub const NAMESPACE_METADATA_KEY: &str = "x-cohort-namespace";
/// The role of the caller's API token: admin, member or viewer.
pub const ROLE_METADATA_KEY: &str = "x-cohort-role";
/// The id of the caller's API token (who made a call, for the audit log).
pub const TOKEN_METADATA_KEY: &str = "x-cohort-token";
/// Every identity header the proxy strips from incoming calls.
pub const IDENTITY_METADATA_KEYS: [&str; 4] = [
    PARTY_METADATA_KEY,
    NAMESPACE_METADATA_KEY,
    ROLE_METADATA_KEY,
    TOKEN_METADATA_KEY,
];

/// Why client-selector failed a task whose party went away (TaskStates messages): the party's
/// session, not its work, failed — another try may well succeed.
pub const TASK_PARTY_DISCONNECTED: &str = "party disconnected";
/// Why client-selector failed a task its party did not list when it registered again.
pub const TASK_PARTY_RECONNECTED_WITHOUT_IT: &str = "the party reconnected without it";
