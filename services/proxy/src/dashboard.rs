//! The web dashboard: static HTML, one JS module and one stylesheet built into
//! the binary (nothing fetched at run time; the federation may be air-gapped),
//! served at `/` and `/assets/*` beside the REST API it calls. It holds no
//! data and no rule of its own: every figure comes from `/api/v1` with the
//! user's token, which the browser keeps in `sessionStorage`.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Only this origin: no CDN, no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: &'static str,
}

/// FNV-1a of `bytes`, computed at compile time for each asset's ETag.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"` + 16 hex digits + `"`, at compile time.
const fn etag_of(bytes: &[u8]) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = fnv1a(bytes);
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

macro_rules! asset {
    ($name:literal, $type:literal) => {{
        const BODY: &[u8] = include_bytes!(concat!("../dashboard/", $name));
        const ETAG: [u8; 18] = etag_of(BODY);
        Asset {
            name: $name,
            content_type: $type,
            body: BODY,
            etag: match std::str::from_utf8(&ETAG) {
                Ok(etag) => etag,
                Err(_) => panic!("an ETag is ASCII"),
            },
        }
    }};
}

const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
const ASSETS: [Asset; 2] = [
    asset!("dashboard.js", "text/javascript; charset=utf-8"),
    asset!("dashboard.css", "text/css; charset=utf-8"),
];

/// Whether `path` is the dashboard's, for HTTP/2 connections that carry gRPC
/// too (no gRPC method's path is `/`, `/index.html` or under `/assets/`).
pub fn serves(path: &str) -> bool {
    path == "/" || path == "/index.html" || path.starts_with("/assets/")
}

/// `/` and `/assets/{name}`; merge into the REST router (no fallback here).
pub fn router() -> axum::Router {
    axum::Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/{name}", get(asset))
}

async fn index(request: HeaderMap) -> Response {
    serve(&INDEX, &request)
}

async fn asset(Path(name): Path<String>, request: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(found) => serve(found, &request),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("no dashboard asset named {name:?}"),
        )
            .into_response(),
    }
}

/// The asset with its headers; 304 when the browser's copy is current. The
/// assets' URLs carry no version, so the browser revalidates every time
/// (`no-cache`) and the ETag makes that cheap.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut request = Request::get(path);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        let request = request.body(Body::empty()).expect("a request");
        router().oneshot(request).await.expect("infallible")
    }

    fn header_of(response: &Response, name: header::HeaderName) -> &str {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn pages_and_assets_have_their_types_and_a_strict_policy() {
        for (path, content_type) in [
            ("/", "text/html; charset=utf-8"),
            ("/assets/dashboard.js", "text/javascript; charset=utf-8"),
            ("/assets/dashboard.css", "text/css; charset=utf-8"),
        ] {
            let response = get(path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(header_of(&response, header::CONTENT_TYPE), content_type);
            let csp = header_of(&response, header::CONTENT_SECURITY_POLICY);
            assert!(csp.contains("default-src 'none'"), "{csp}");
            assert!(!csp.contains("http"), "no external origin: {csp}");
            assert!(!csp.contains("unsafe"), "no inline code: {csp}");
            assert_eq!(header_of(&response, header::CACHE_CONTROL), "no-cache");
            assert_eq!(
                header_of(&response, header::X_CONTENT_TYPE_OPTIONS),
                "nosniff"
            );
        }
    }

    #[tokio::test]
    async fn a_current_copy_is_not_sent_again() {
        let first = get("/assets/dashboard.js", None).await;
        let etag = header_of(&first, header::ETAG).to_string();
        assert!(etag.starts_with('"') && etag.len() == 18, "{etag}");
        let again = get("/assets/dashboard.js", Some(&etag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        let stale = get("/assets/dashboard.js", Some("\"0000000000000000\"")).await;
        assert_eq!(stale.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn an_unknown_asset_is_not_found() {
        let response = get("/assets/../Cargo.toml", None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = get("/assets/nope.js", None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn grpc_paths_are_not_the_dashboards() {
        assert!(serves("/") && serves("/assets/dashboard.js"));
        assert!(!serves("/cohort.v1.Jobs/ListJobs") && !serves("/api/v1/jobs"));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        let html = std::str::from_utf8(INDEX.body).expect("utf-8");
        for asset in &ASSETS {
            assert!(
                html.contains(&format!("/assets/{}", asset.name)),
                "{}",
                asset.name
            );
            let text = std::str::from_utf8(asset.body).expect("utf-8");
            // SVG's namespace is a name, not a place the page loads from.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{}",
                asset.name
            );
        }
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(
            !html.contains("style="),
            "inline styles are refused by the policy"
        );
    }
}
