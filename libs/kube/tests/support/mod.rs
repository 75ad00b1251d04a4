//! The mocked Kubernetes API server both test files use: no API server can
//! run on these machines, so tests read the exact requests the code makes
//! (method, path, content type, JSON body) and answer them as one would.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::Value;
use tower_test::mock::{Handle, SendResponse};

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// One request as the API server saw it.
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub content_type: String,
    pub body: Value,
    pub reply: SendResponse<Response<Body>>,
}

impl Seen {
    pub fn answer(self, status: StatusCode, body: Value) {
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.reply.send_response(response);
    }

    /// Answers with plain text (a Pod's log).
    pub fn answer_text(self, text: &str) {
        let response = Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(Body::from(text.as_bytes().to_vec()))
            .unwrap();
        self.reply.send_response(response);
    }

    /// Answers with a `Status` failure of `code`, as the API server does.
    pub fn fail(self, code: u16, reason: &str) {
        let status = StatusCode::from_u16(code).unwrap();
        self.answer(
            status,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": reason, "reason": reason, "code": code}),
        );
    }

    /// Answers a create or get with the object itself, as the API server does.
    pub fn echo(self) {
        let body = self.body.clone();
        self.answer(StatusCode::OK, body);
    }
}

/// The next request, within 10 s.
pub async fn next(handle: &mut ApiHandle) -> Seen {
    let (request, reply) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("no request to the API server within 10 s")
        .expect("the client is gone");
    let method = request.method().clone();
    let uri = request.uri().to_string();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Seen {
        method,
        uri,
        content_type,
        body,
        reply,
    }
}
