//! The OpenAPI 3.1 document, generated from the handlers' types and
//! annotations; served at `/api/openapi.json` and checked in at
//! `docs/openapi.json` (a test fails when that copy is stale; regenerate with
//! `COHORT_UPDATE_OPENAPI=1 cargo test -p cohort-proxy openapi`).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{clients, jobs, models};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cohort REST API",
        description = "Jobs, models, clients, tokens and the audit log over JSON, beside gRPC on \
                       the proxy's port. Send `Authorization: Bearer <token>` (the CLI's API \
                       tokens). Errors are RFC 9457 `application/problem+json`."
    ),
    paths(
        clients::whoami,
        jobs::list, jobs::create, jobs::get_job, jobs::rounds, jobs::events, jobs::watch,
        jobs::stop, jobs::delete,
        models::list, models::get_model, models::download, models::upload,
        clients::list, clients::revoke,
        clients::list_tokens, clients::create_token, clients::delete_token,
        clients::audit,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as served and checked in (pretty, with a final newline).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = "v1".into();
    let mut text = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()));
    text.push('\n');
    text
}

pub(crate) async fn serve() -> Response {
    let mut response = openapi_json().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in document is the generated one.
    #[test]
    fn checked_in_openapi_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = openapi_json();
        if std::env::var_os("COHORT_UPDATE_OPENAPI").is_some() {
            if let Err(e) = std::fs::write(&path, &generated) {
                panic!("cannot write {}: {e}", path.display());
            }
            return;
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} is stale: regenerate it with `COHORT_UPDATE_OPENAPI=1 cargo test -p cohort-proxy openapi`",
            path.display()
        );
    }
}
