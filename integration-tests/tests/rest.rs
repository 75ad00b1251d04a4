//! The REST/JSON API on the proxy's port, end to end with the real binaries over real
//! HTTP/1.1 and HTTP/2 (TLS, the federation's CA): the OpenAPI document without a token,
//! 401/403/404 as problem+json, a bad spec's field, namespaces and roles as in gRPC, a job
//! created over REST listed by `cohort job list` beside one created over gRPC, its watch
//! stream to the end, rounds, events, a model downloaded with model-manager's digest,
//! clients, tokens and the audit log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cohort_cli::profile::Profile;
use cohort_integration_tests::{Federation, cohort, digits_job};
use cohort_proto::v1 as pb;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const CALL: Duration = Duration::from_secs(30);

/// An HTTP client of the proxy's REST API: one TLS connection per request.
struct Rest {
    endpoint: String,
    /// Sent with every request besides the token (to try spoofing identity headers).
    extra: Vec<(&'static str, String)>,
    tls: Arc<rustls::ClientConfig>,
    tls_h2: Arc<rustls::ClientConfig>,
    token: Option<String>,
}

struct Answer {
    status: StatusCode,
    content_type: String,
    www_authenticate: String,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A problem+json answer with `status`: its document.
    fn problem(&self, status: u16) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type, "application/problem+json");
        let p = self.json();
        assert_eq!(p["status"], status, "{p}");
        assert!(
            p["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("urn:cohort:problem:")),
            "{p}"
        );
        assert!(p["title"].is_string() && p["detail"].is_string(), "{p}");
        p
    }
}

impl Rest {
    fn new(profile: &Profile, token: Option<String>) -> Rest {
        let ca = profile.ca_cert.as_ref().expect("the federation serves TLS");
        let config = |alpn: &[u8]| {
            let mut c = cohort_security::client_config(ca, None).expect("TLS client");
            c.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(c)
        };
        Rest {
            extra: Vec::new(),
            endpoint: profile.endpoint.clone(),
            tls: config(b"http/1.1"),
            tls_h2: config(b"h2"),
            token,
        }
    }

    fn with_token(&self, token: &str) -> Rest {
        Rest {
            extra: self.extra.clone(),
            endpoint: self.endpoint.clone(),
            tls: self.tls.clone(),
            tls_h2: self.tls_h2.clone(),
            token: Some(token.to_string()),
        }
    }

    async fn tls(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let host = self
            .endpoint
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .expect("host:port");
        let name = rustls::pki_types::ServerName::try_from(host).expect("server name");
        let tcp = tokio::net::TcpStream::connect(&self.endpoint)
            .await
            .expect("connect to the proxy");
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        kind: Option<&str>,
        body: Vec<u8>,
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.endpoint))
            .header("host", &self.endpoint);
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        if let Some(kind) = kind {
            builder = builder.header("content-type", kind);
        }
        for (name, value) in &self.extra {
            builder = builder.header(*name, value);
        }
        builder.body(Full::new(Bytes::from(body))).expect("request")
    }

    /// Sends a request over HTTP/1.1; the response head.
    async fn start(
        &self,
        method: Method,
        path: &str,
        kind: Option<&str>,
        body: Vec<u8>,
    ) -> hyper::Response<hyper::body::Incoming> {
        let io = TokioIo::new(self.tls(self.tls.clone()).await);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        tokio::time::timeout(
            CALL,
            sender.send_request(self.request(method, path, kind, body)),
        )
        .await
        .expect("the proxy answers in time")
        .expect("HTTP/1.1 response")
    }

    async fn send(&self, method: Method, path: &str, kind: Option<&str>, body: Vec<u8>) -> Answer {
        let response = self.start(method, path, kind, body).await;
        collect(response).await
    }

    /// The same over HTTP/2 (ALPN h2, as gRPC).
    async fn send_h2(&self, method: Method, path: &str) -> Answer {
        let io = TokioIo::new(self.tls(self.tls_h2.clone()).await);
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        let response = tokio::time::timeout(
            CALL,
            sender.send_request(self.request(method, path, None, Vec::new())),
        )
        .await
        .expect("the proxy answers in time")
        .expect("HTTP/2 response");
        collect(response).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, Vec::new()).await
    }

    async fn post_json(&self, path: &str, body: Value) -> Answer {
        self.send(
            Method::POST,
            path,
            Some("application/json"),
            body.to_string().into_bytes(),
        )
        .await
    }
}

async fn collect(response: hyper::Response<hyper::body::Incoming>) -> Answer {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let www_authenticate = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = tokio::time::timeout(CALL, response.into_body().collect())
        .await
        .expect("the body arrives in time")
        .expect("body")
        .to_bytes();
    Answer {
        status,
        content_type,
        www_authenticate,
        body,
    }
}

fn spec_in(namespace: &str, name: &str, rounds: u32) -> String {
    format!(
        "namespace: {namespace}\n{}",
        digits_job(name, rounds, 2, 2, "60s")
    )
}

fn saved_profile(fed: &Federation, dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    Profile {
        token: Some(token.to_string()),
        ..fed.stack.profile()
    }
    .save(&path)
    .expect("profile written");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_api_serves_jobs_models_clients_and_tokens_like_grpc() {
    let fed = Federation::start(2).await.expect("federation");
    let profile = fed.stack.profile();
    let admin = Rest::new(&profile, profile.token.clone());
    let anonymous = Rest::new(&profile, None);

    // The document needs no token and is the checked-in one.
    let doc = anonymous.get("/api/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    let checked_in = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
        .expect("docs/openapi.json");
    assert_eq!(
        doc.body.as_ref(),
        checked_in.as_slice(),
        "served document differs"
    );
    assert_eq!(doc.json()["openapi"], "3.1.0");

    // No token, a forged token: 401 as problem+json, the secret never echoed.
    let unauthenticated = anonymous.get("/api/v1/jobs").await;
    unauthenticated.problem(401);
    assert_eq!(unauthenticated.www_authenticate, "Bearer realm=\"cohort\"");
    let forged = cohort_security::ApiToken::generate().expose().to_string();
    let refused = admin.with_token(&forged).get("/api/v1/jobs").await;
    refused.problem(401);
    assert!(!String::from_utf8_lossy(&refused.body).contains(&forged));
    admin.get("/api/v1/nosuch").await.problem(404);
    admin
        .send(Method::PUT, "/api/v1/jobs", None, Vec::new())
        .await
        .problem(405);

    // HTTP/2 requests under /api/ reach the same router.
    let me = admin.send_h2(Method::GET, "/api/v1/whoami").await;
    assert_eq!(
        me.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&me.body)
    );
    assert_eq!(me.json()["role"], "admin", "{}", me.json());

    // Tokens over REST: the secret once, then usable on REST and gRPC alike.
    let mut secrets = std::collections::HashMap::new();
    for (name, namespace, role) in [
        ("member-a", "team-a", "member"),
        ("viewer-a", "team-a", "viewer"),
        ("member-b", "team-b", "member"),
    ] {
        let created = admin
            .post_json(
                "/api/v1/tokens",
                json!({"name": name, "namespace": namespace, "role": role}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.json());
        let c = created.json();
        assert_eq!(c["info"]["role"], role, "{c}");
        secrets.insert(name, c["token"].as_str().expect("secret").to_string());
    }
    admin
        .post_json(
            "/api/v1/tokens",
            json!({"name": "x", "namespace": "team-a", "role": "boss"}),
        )
        .await
        .problem(400);
    let member_a = admin.with_token(&secrets["member-a"]);
    let viewer_a = admin.with_token(&secrets["viewer-a"]);
    let member_b = admin.with_token(&secrets["member-b"]);
    let who = viewer_a.get("/api/v1/whoami").await.json();
    assert_eq!(who["role"], "viewer", "{who}");
    assert_eq!(who["namespaces"], json!(["team-a"]), "{who}");
    member_a.get("/api/v1/tokens").await.problem(403);
    let listed = admin.get("/api/v1/tokens?namespace=team-a").await.json();
    assert_eq!(
        listed["tokens"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    // A bad spec: 400 naming the field.
    let bad = format!("{}colour: red\n", spec_in("team-a", "bad", 1));
    let p = member_a
        .send(
            Method::POST,
            "/api/v1/jobs",
            Some("application/yaml"),
            bad.into_bytes(),
        )
        .await
        .problem(400);
    assert_eq!(p["field"], "colour", "{p}");
    // A viewer learns nothing from spec errors: refused first.
    viewer_a
        .send(
            Method::POST,
            "/api/v1/jobs",
            Some("application/yaml"),
            b"rounds: x".to_vec(),
        )
        .await
        .problem(403);

    // A job over REST (YAML) and one over REST as JSON, beside one over gRPC.
    let created = member_a
        .send(
            Method::POST,
            "/api/v1/jobs",
            Some("application/yaml"),
            spec_in("team-a", "rest-yaml", 2).into_bytes(),
        )
        .await;
    assert_eq!(
        created.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let job = created.json();
    let job_id = job["id"].as_str().expect("job id").to_string();
    assert_eq!(job["namespace"], "team-a", "{job}");
    assert_eq!(job["rounds"], 2, "{job}");
    let as_json: Value =
        serde_yaml::from_str(&digits_job("rest-json", 1, 2, 2, "60s")).expect("spec as a value");
    let created = member_a
        .post_json("/api/v1/jobs?namespace=team-a", as_json)
        .await;
    assert_eq!(
        created.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let json_job_id = created.json()["id"].as_str().expect("id").to_string();
    let grpc_job = fed
        .create_job(&spec_in("team-a", "grpc", 1))
        .await
        .expect("a job over gRPC");

    // Namespaces and roles, as gRPC answers them.
    let path = format!("/api/v1/jobs/{job_id}");
    member_b.get(&path).await.problem(404);
    member_b
        .send(Method::POST, &format!("{path}/stop"), None, Vec::new())
        .await
        .problem(404);
    viewer_a
        .send(Method::POST, &format!("{path}/stop"), None, Vec::new())
        .await
        .problem(403);
    viewer_a
        .send(Method::DELETE, &path, None, Vec::new())
        .await
        .problem(403);
    // Identity headers a caller sends are not believed: the gate sets them from the token.
    let spoofing = Rest {
        extra: vec![
            ("x-cohort-namespace", "team-a".to_string()),
            ("x-cohort-role", "admin".to_string()),
        ],
        ..member_b.with_token(&secrets["member-b"])
    };
    spoofing.get(&path).await.problem(404);
    let b_jobs = member_b.get("/api/v1/jobs").await.json();
    assert_eq!(b_jobs["jobs"], json!([]), "{b_jobs}");
    let a_jobs = viewer_a.get("/api/v1/jobs").await.json();
    let ids: Vec<&str> = a_jobs["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    for id in [&job_id, &json_job_id, &grpc_job.id] {
        assert!(ids.contains(&id.as_str()), "{id} not in {a_jobs}");
    }
    admin.get("/api/v1/jobs?state=bogus").await.problem(400);

    // The CLI lists the REST job and the gRPC job alike.
    let dir = tempfile::tempdir().expect("temp dir");
    let viewer_profile = saved_profile(&fed, dir.path(), "viewer", &secrets["viewer-a"]);
    let (code, out, err) = cohort(&["--json", "job", "list"], &viewer_profile)
        .await
        .expect("cohort job list");
    assert_eq!(code, 0, "{err}");
    for id in [&job_id, &grpc_job.id] {
        assert!(
            out.contains(id.as_str()),
            "{id} not listed by the CLI: {out}"
        );
    }

    // Watch the REST job to its end: one data line per update, the last one final.
    let watch = viewer_a
        .start(Method::GET, &format!("{path}/watch"), None, Vec::new())
        .await;
    assert_eq!(watch.status(), StatusCode::OK);
    assert!(
        watch
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"))
    );
    let mut body = watch.into_body();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => panic!("the watch stream did not end with the job: {text}"),
            Ok(None) => break,
            Ok(Some(frame)) => {
                if let Some(data) = frame.expect("watch frame").data_ref() {
                    text.push_str(&String::from_utf8_lossy(data));
                }
            }
        }
    }
    let updates: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).expect("a JSON update"))
        .collect();
    let last = updates.last().expect("at least one update");
    assert_eq!(last["state"], "succeeded", "{last}");
    assert_eq!(last["round"], 2, "{last}");

    // The finished job: progress, rounds with the parties drawn, its log.
    let done = viewer_a.get(&path).await.json();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        done["last_accuracy"].as_f64().is_some_and(|a| a > 0.0),
        "{done}"
    );
    let rounds = viewer_a.get(&format!("{path}/rounds")).await.json();
    let rounds = rounds["rounds"].as_array().expect("rounds").clone();
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        // Each draw with its outcome (a busy party refuses, another is drawn).
        let finished = r["parties"]
            .as_array()
            .map(|p| p.iter().filter(|p| p["outcome"] == "finished").count());
        assert_eq!(finished, Some(2), "{r}");
        assert!(
            r["accuracy"].is_number() && r["duration_ms"].is_number(),
            "{r}"
        );
    }
    let events = viewer_a.get(&format!("{path}/events")).await.json();
    assert!(
        events["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["to"] == "succeeded")),
        "{events}"
    );

    // Its model: listed, its versions with lineage, a download with model-manager's digest.
    let model = done["model_name"].as_str().expect("model name").to_string();
    let models = viewer_a.get("/api/v1/models").await.json();
    assert!(
        models["models"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == model.as_str())),
        "{models}"
    );
    member_b
        .get(&format!("/api/v1/models/{model}"))
        .await
        .problem(404);
    let versions = viewer_a
        .get(&format!("/api/v1/models/{model}"))
        .await
        .json();
    let v1 = &versions["versions"][0];
    assert_eq!(v1["lineage"]["job_id"], job_id.as_str(), "{versions}");
    let stored = fed
        .models()
        .get_version(pb::GetVersionRequest {
            name: model.clone(),
            version: 1,
            namespace: "team-a".into(),
        })
        .await
        .expect("model-manager's version")
        .into_inner();
    let download = viewer_a
        .get(&format!("/api/v1/models/{model}/versions/1/download"))
        .await;
    assert_eq!(download.status, StatusCode::OK);
    assert_eq!(download.content_type, "application/octet-stream");
    assert_eq!(download.body.len() as u64, stored.size_bytes);
    assert_eq!(hex::encode(Sha256::digest(&download.body)), stored.digest);
    viewer_a
        .get(&format!("/api/v1/models/{model}/versions/99/download"))
        .await
        .problem(404);

    // Uploading needs a member; the upload is the next version.
    viewer_a
        .send(
            Method::POST,
            &format!("/api/v1/models/{model}/versions"),
            Some("application/octet-stream"),
            download.body.to_vec(),
        )
        .await
        .problem(403);
    let uploaded = member_a
        .send(
            Method::POST,
            &format!("/api/v1/models/{model}/versions"),
            Some("application/octet-stream"),
            download.body.to_vec(),
        )
        .await;
    assert_eq!(
        uploaded.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&uploaded.body)
    );
    assert_eq!(uploaded.json()["digest"], stored.digest.as_str());

    // Stop the JSON job (a member may), then delete the finished REST job.
    let stopped = member_a
        .post_json(
            &format!("/api/v1/jobs/{json_job_id}/stop"),
            json!({"reason": "enough"}),
        )
        .await;
    assert_eq!(
        stopped.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&stopped.body)
    );
    let deleted = member_a.send(Method::DELETE, &path, None, Vec::new()).await;
    assert_eq!(
        deleted.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&deleted.body)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let gone = viewer_a.get(&path).await;
        if gone.status == StatusCode::NOT_FOUND {
            gone.problem(404);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted job is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Clients: both parties connected with their datasets; revoking needs a cluster admin.
    let clients = viewer_a.get("/api/v1/clients").await.json();
    let clients = clients["clients"].as_array().expect("clients").clone();
    assert_eq!(clients.len(), 2, "{clients:?}");
    for c in &clients {
        assert_eq!(c["connected"], true, "{c}");
        assert!(
            c["datasets"].as_array().is_some_and(|d| !d.is_empty()),
            "{c}"
        );
    }
    let party = clients[0]["party"].as_str().expect("party").to_string();
    member_a
        .send(
            Method::POST,
            &format!("/api/v1/clients/{party}/revoke"),
            None,
            Vec::new(),
        )
        .await
        .problem(403);

    // The audit log names the REST calls; a viewer may not read it.
    viewer_a.get("/api/v1/audit").await.problem(403);
    let audit = admin.get("/api/v1/audit?namespace=team-a").await.json();
    let entries = audit["entries"].as_array().expect("entries");
    assert!(
        entries
            .iter()
            .any(|e| e["object_id"] == job_id.as_str() && e["action"] == "job.delete"),
        "{audit}"
    );

    // Deleting a token over REST: it stops working (the proxy's cache TTL is 10 s).
    let tokens = admin.get("/api/v1/tokens?namespace=team-b").await.json();
    let b_id = tokens["tokens"][0]["id"]
        .as_str()
        .expect("token id")
        .to_string();
    let gone = admin
        .send(
            Method::DELETE,
            &format!("/api/v1/tokens/{b_id}"),
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while member_b.get("/api/v1/jobs").await.status != StatusCode::UNAUTHORIZED {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a deleted token still works"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
