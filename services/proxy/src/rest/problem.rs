//! RFC 9457 problem details: every REST error is `application/problem+json`
//! with the HTTP status of `ErrorKind::http_status`. A gRPC status from a
//! service is turned back into its kind through the one kind → code mapping
//! (`cohort_runtime::status`), so REST and gRPC callers see the same refusal.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cohort_core::ErrorKind;
use serde::Serialize;
use utoipa::ToSchema;

pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

const KINDS: [ErrorKind; 12] = [
    ErrorKind::InvalidArgument,
    ErrorKind::NotFound,
    ErrorKind::Conflict,
    ErrorKind::AlreadyExists,
    ErrorKind::FailedPrecondition,
    ErrorKind::Unavailable,
    ErrorKind::DataLoss,
    ErrorKind::Unauthenticated,
    ErrorKind::PermissionDenied,
    ErrorKind::ResourceExhausted,
    ErrorKind::DeadlineExceeded,
    ErrorKind::Internal,
];

/// The kind whose gRPC code is `code` (the inverse of `cohort_runtime::status`);
/// codes no kind maps to (UNKNOWN, CANCELLED, ...) are internal.
pub(crate) fn kind_of_code(code: tonic::Code) -> ErrorKind {
    KINDS
        .into_iter()
        .find(|kind| cohort_runtime::status(*kind, "").code() == code)
        .unwrap_or(ErrorKind::Internal)
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:cohort:problem:<kind>`, the error kind in snake case (e.g. `not_found`).
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status, repeated.
    pub status: u16,
    /// What went wrong, as the owning service said it.
    pub detail: String,
    /// The request field at fault (a job spec's field path, a query parameter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    pub(crate) fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        let status = kind.http_status();
        let title = StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error")
            .to_string();
        Self {
            problem_type: format!("urn:cohort:problem:{}", kind.name()),
            title,
            status,
            detail: detail.into(),
            field: None,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, detail).with_field(field)
    }

    pub(crate) fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub(crate) fn unavailable(what: &str) -> Self {
        Self::new(
            ErrorKind::Unavailable,
            format!("{what} did not answer in time"),
        )
    }
}

impl From<tonic::Status> for Problem {
    fn from(status: tonic::Status) -> Self {
        Problem::new(kind_of_code(status.code()), status.message())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(&self)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: say which scheme is expected.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"cohort\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_back_to_their_kinds_and_http_statuses() {
        for kind in KINDS {
            let code = cohort_runtime::status(kind, "").code();
            let back = kind_of_code(code);
            // Conflict and AlreadyExists share 409; every kind keeps its HTTP status.
            assert_eq!(back.http_status(), kind.http_status(), "{kind:?}");
        }
        assert_eq!(Problem::from(tonic::Status::not_found("job x")).status, 404);
        assert_eq!(
            Problem::from(tonic::Status::permission_denied("no")).status,
            403
        );
        assert_eq!(Problem::from(tonic::Status::unknown("?")).status, 500);
    }
}
