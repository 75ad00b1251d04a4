//! model-manager over real gRPC on loopback, with SQLite and the filesystem
//! blob store in a temporary directory: versions, one version per job round,
//! namespaces (API-token metadata as the proxy sets it, coordinators over
//! mutual TLS) and the upload limits.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cohort_blob::{BlobStore, Digest, FsBlobStore};
use cohort_model_manager::{UploadLimits, serve_in_process, serve_in_process_with};
use cohort_proto::v1::RecordAuditRequest;
use cohort_proto::v1::models_client::ModelsClient;
use cohort_proto::v1::upload_version_request::Part;
use cohort_proto::v1::{
    GetVersionRequest, Lineage, ListVersionsRequest, Metrics, ModelVersion, UploadHeader,
    UploadVersionRequest,
};
use cohort_runtime::Channel;
use cohort_runtime::audit::{AuditClient, AuditSink};
use cohort_security::{CertAuthority, TlsFiles, Validity};
use cohort_store::models::SqliteModelStore;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sha2::Digest as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::{Code, Request, Status};

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

struct Harness {
    _dir: tempfile::TempDir,
    blobs: Arc<FsBlobStore>,
    addr: SocketAddr,
    client: ModelsClient<Channel>,
    _stop: oneshot::Sender<()>,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("models.db").display());
    let store = Arc::new(SqliteModelStore::open(&url).await.unwrap());
    let blobs = Arc::new(FsBlobStore::open(dir.path().join("blobs")).await.unwrap());
    let (addr, stop) = serve_in_process(store, blobs.clone()).await.unwrap();
    let client = ModelsClient::new(cohort_runtime::lazy_channel(&addr.to_string()).unwrap());
    Harness {
        _dir: dir,
        blobs,
        addr,
        client,
        _stop: stop,
    }
}

async fn start_with(limits: UploadLimits) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("models.db").display());
    let store = Arc::new(SqliteModelStore::open(&url).await.unwrap());
    let blobs = Arc::new(FsBlobStore::open(dir.path().join("blobs")).await.unwrap());
    let (addr, stop) = serve_in_process_with(
        store,
        blobs.clone(),
        limits,
        None,
        AuditClient::none("test"),
    )
    .await
    .unwrap();
    let client = ModelsClient::new(cohort_runtime::lazy_channel(&addr.to_string()).unwrap());
    Harness {
        _dir: dir,
        blobs,
        addr,
        client,
        _stop: stop,
    }
}

/// A real safetensors file: a 768x1024 f32 weight (3 MiB) and a bias.
fn model_file(seed: u8) -> Vec<u8> {
    let w: Vec<u8> = (0..768 * 1024 * 4)
        .map(|i| (i as u8).wrapping_mul(seed))
        .collect();
    let b: Vec<u8> = (0..1024 * 4).map(|i| i as u8 ^ seed).collect();
    let tensors = vec![
        (
            "fc.weight",
            TensorView::new(Dtype::F32, vec![768, 1024], &w).unwrap(),
        ),
        (
            "fc.bias",
            TensorView::new(Dtype::F32, vec![1024], &b).unwrap(),
        ),
    ];
    safetensors::serialize(tensors, None).unwrap()
}

/// A small real safetensors file (1 KiB of weights).
fn small_file(seed: u8) -> Vec<u8> {
    let w: Vec<u8> = (0..16 * 16 * 4).map(|i| (i as u8) ^ seed).collect();
    let tensors = vec![("w", TensorView::new(Dtype::F32, vec![16, 16], &w).unwrap())];
    safetensors::serialize(tensors, None).unwrap()
}

fn header(name: &str, job: &str, round: u32, parent: u32) -> UploadVersionRequest {
    header_in("", name, job, round, parent)
}

/// A header naming `namespace` ("" for the default).
fn header_in(
    namespace: &str,
    name: &str,
    job: &str,
    round: u32,
    parent: u32,
) -> UploadVersionRequest {
    UploadVersionRequest {
        part: Some(Part::Header(UploadHeader {
            name: name.to_string(),
            namespace: namespace.to_string(),
            lineage: Some(Lineage {
                job_id: job.to_string(),
                round,
                parent_version: parent,
                parties: Vec::new(),
            }),
            metrics: Some(Metrics {
                loss: 0.25,
                accuracy: 0.9,
                samples: 1797,
            }),
        })),
    }
}

fn data_messages(bytes: &[u8], chunk: usize) -> Vec<UploadVersionRequest> {
    bytes
        .chunks(chunk)
        .map(|c| UploadVersionRequest {
            part: Some(Part::Data(c.to_vec().into())),
        })
        .collect()
}

async fn upload(
    client: &mut ModelsClient<Channel>,
    messages: Vec<UploadVersionRequest>,
) -> Result<ModelVersion, tonic::Status> {
    client
        .upload_version(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

async fn upload_file(
    client: &mut ModelsClient<Channel>,
    first: UploadVersionRequest,
    file: &[u8],
) -> Result<ModelVersion, tonic::Status> {
    let mut messages = vec![first];
    messages.extend(data_messages(file, 256 << 10));
    upload(client, messages).await
}

async fn download(
    client: &mut ModelsClient<Channel>,
    name: &str,
    version: u32,
) -> Result<Vec<u8>, tonic::Status> {
    download_as(client, Caller::Internal, "", name, version).await
}

async fn download_as(
    client: &mut ModelsClient<Channel>,
    caller: Caller<'_>,
    namespace: &str,
    name: &str,
    version: u32,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .download(caller.request(get_request(namespace, name, version)))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        assert!(chunk.data.len() <= 1 << 20, "chunk over 1 MiB");
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

async fn list(client: &mut ModelsClient<Channel>, name: &str, job_id: &str) -> Vec<(String, u32)> {
    client
        .list_versions(ListVersionsRequest {
            name: name.to_string(),
            job_id: job_id.to_string(),
            namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions
        .into_iter()
        .map(|v| (v.name, v.version))
        .collect()
}

/// Every version stored, in every namespace: (namespace, name, version).
async fn list_all(client: &mut ModelsClient<Channel>) -> Vec<(String, String, u32)> {
    client
        .list_versions(ListVersionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .versions
        .into_iter()
        .map(|v| (v.namespace, v.name, v.version))
        .collect()
}

fn get_request(namespace: &str, name: &str, version: u32) -> GetVersionRequest {
    GetVersionRequest {
        name: name.to_string(),
        version,
        namespace: namespace.to_string(),
    }
}

/// Who a test call comes from.
#[derive(Debug, Clone, Copy)]
enum Caller<'a> {
    /// Another service: no identity metadata.
    Internal,
    /// A namespace (or "*") and a role without a token: a coordinator acting
    /// for its job's namespace.
    Token(&'a str, &'a str),
    /// An API token (namespace, role, token id) as the proxy passes it on.
    User(&'a str, &'a str, &'a str),
}

impl Caller<'_> {
    fn request<T>(self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        let (namespace, role, token) = match self {
            Caller::Internal => return req,
            Caller::Token(namespace, role) => (namespace, role, None),
            Caller::User(namespace, role, token) => (namespace, role, Some(token)),
        };
        let md = req.metadata_mut();
        md.insert(
            cohort_proto::NAMESPACE_METADATA_KEY,
            namespace.parse().unwrap(),
        );
        md.insert(cohort_proto::ROLE_METADATA_KEY, role.parse().unwrap());
        if let Some(token) = token {
            md.insert(cohort_proto::TOKEN_METADATA_KEY, token.parse().unwrap());
        }
        req
    }
}

const TEAM_A: Caller<'static> = Caller::Token("team-a", "member");
const TEAM_B: Caller<'static> = Caller::Token("team-b", "member");
const EVERYWHERE: Caller<'static> = Caller::Token("*", "admin");

async fn upload_as(
    client: &mut ModelsClient<Channel>,
    caller: Caller<'_>,
    first: UploadVersionRequest,
    file: &[u8],
) -> Result<ModelVersion, Status> {
    let mut messages = vec![first];
    messages.extend(data_messages(file, 256 << 10));
    client
        .upload_version(caller.request(tokio_stream::iter(messages)))
        .await
        .map(|r| r.into_inner())
}

async fn get_as(
    client: &mut ModelsClient<Channel>,
    caller: Caller<'_>,
    namespace: &str,
    name: &str,
    version: u32,
) -> Result<ModelVersion, Status> {
    client
        .get_version(caller.request(get_request(namespace, name, version)))
        .await
        .map(|r| r.into_inner())
}

/// An error's code and message: what a caller can tell apart.
fn answer<T: std::fmt::Debug>(r: Result<T, Status>) -> (Code, String) {
    match r {
        Err(s) => (s.code(), s.message().to_string()),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[tokio::test]
async fn upload_list_get_download_round_trip() {
    let mut h = start().await;
    let file1 = model_file(3);
    let v1 = upload_file(&mut h.client, header("digits-mlp", "job-a", 4, 0), &file1)
        .await
        .unwrap();
    assert_eq!(v1.name, "digits-mlp");
    assert_eq!(v1.version, 1);
    assert_eq!(v1.digest, sha256_hex(&file1));
    assert_eq!(v1.size_bytes, file1.len() as u64);
    let lineage = v1.lineage.clone().unwrap();
    assert_eq!(
        (
            lineage.job_id.as_str(),
            lineage.round,
            lineage.parent_version
        ),
        ("job-a", 4, 0)
    );
    let metrics = v1.metrics.unwrap();
    assert_eq!(
        (metrics.loss, metrics.accuracy, metrics.samples),
        (0.25, 0.9, 1797)
    );
    assert!(v1.created_at_ms > 0);

    let file2 = model_file(5);
    let v2 = upload_file(&mut h.client, header("digits-mlp", "job-b", 5, 1), &file2)
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.lineage.as_ref().unwrap().parent_version, 1);
    let other = upload_file(&mut h.client, header("other", "job-a", 1, 0), &file1)
        .await
        .unwrap();
    assert_eq!((other.version, &other.digest), (1, &v1.digest));

    assert_eq!(
        list(&mut h.client, "", "").await,
        vec![
            ("digits-mlp".into(), 1),
            ("digits-mlp".into(), 2),
            ("other".into(), 1)
        ]
    );
    assert_eq!(
        list(&mut h.client, "digits-mlp", "").await,
        vec![("digits-mlp".into(), 1), ("digits-mlp".into(), 2)]
    );
    assert_eq!(
        list(&mut h.client, "", "job-a").await,
        vec![("digits-mlp".into(), 1), ("other".into(), 1)]
    );

    let latest = h
        .client
        .get_version(get_request("", "digits-mlp", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest, v2);
    let first = h
        .client
        .get_version(get_request("", "digits-mlp", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.digest, v1.digest);

    let back = download(&mut h.client, "digits-mlp", 1).await.unwrap();
    assert!(back == file1, "downloaded bytes differ");
    assert_eq!(sha256_hex(&back), v1.digest);
    let parsed = safetensors::SafeTensors::deserialize(&back).unwrap();
    assert_eq!(parsed.tensor("fc.weight").unwrap().shape(), &[768, 1024]);
    let latest_bytes = download(&mut h.client, "digits-mlp", 0).await.unwrap();
    assert_eq!(sha256_hex(&latest_bytes), v2.digest);
}

#[tokio::test]
async fn upload_without_header_is_refused() {
    let mut h = start().await;
    let file = model_file(1);
    let err = upload(&mut h.client, data_messages(&file, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("header"), "{}", err.message());

    let err = upload(&mut h.client, vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut twice = vec![header("m", "", 0, 0), header("m", "", 0, 0)];
    twice.extend(data_messages(&file, 1 << 20));
    let err = upload(&mut h.client, twice).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("header"), "{}", err.message());

    assert!(list(&mut h.client, "", "").await.is_empty());
}

#[tokio::test]
async fn empty_and_non_safetensors_uploads_are_refused() {
    let mut h = start().await;
    let err = upload(&mut h.client, vec![header("m", "", 0, 0)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("no data"), "{}", err.message());

    let text = b"{\"weights\": [1, 2, 3]} -- definitely not safetensors".repeat(1000);
    let err = upload_file(&mut h.client, header("m", "", 0, 0), &text)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("safetensors"), "{}", err.message());

    let file = model_file(2);
    let err = upload_file(
        &mut h.client,
        header("m", "", 0, 0),
        &file[..file.len() - 10],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("truncated"), "{}", err.message());

    assert!(list(&mut h.client, "", "").await.is_empty());
    // Refused data is not kept either.
    assert!(
        !h.blobs
            .exists(&Digest::of(&file[..file.len() - 10]))
            .await
            .unwrap()
    );
}

/// `header` with `parties` in its lineage.
fn with_parties(mut h: UploadVersionRequest, parties: &[&str]) -> UploadVersionRequest {
    if let Some(Part::Header(header)) = &mut h.part
        && let Some(lineage) = &mut header.lineage
    {
        lineage.parties = parties.iter().map(|p| p.to_string()).collect();
    }
    h
}

#[tokio::test]
async fn a_rounds_parties_are_kept_in_its_lineage_and_checked() {
    let mut h = start().await;
    let file = model_file(4);
    let parties = ["party-2", "hospital.a", "party-1"];
    let v = upload_file(
        &mut h.client,
        with_parties(header("m", "job-a", 1, 0), &parties),
        &file,
    )
    .await
    .unwrap();
    let stored = |v: &ModelVersion| v.lineage.clone().unwrap_or_default().parties;
    assert_eq!(stored(&v), parties, "in the coordinator's order");
    let got = h
        .client
        .get_version(GetVersionRequest {
            name: "m".into(),
            version: 1,
            namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored(&got), parties);
    // A retried round answers the stored version, parties and all.
    let again = upload_file(
        &mut h.client,
        with_parties(header("m", "job-a", 1, 0), &["mallory"]),
        &file,
    )
    .await
    .unwrap();
    assert_eq!((again.version, stored(&again)), (1, stored(&got)));
    for (h_, why) in [
        (
            with_parties(header("m", "", 0, 0), &["p"]),
            "only a job's round",
        ),
        (
            with_parties(header("m", "job-a", 2, 0), &["p", "Bad Party!"]),
            "[1]",
        ),
        (
            with_parties(header("m", "job-a", 2, 0), &["p", "q", "p"]),
            "listed twice",
        ),
    ] {
        let err = upload_file(&mut h.client, h_, &file).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{why}");
        assert!(
            err.message().contains("header.lineage.parties") && err.message().contains(why),
            "{}",
            err.message()
        );
    }
    let many: Vec<String> = (0..=cohort_model_manager::MAX_LINEAGE_PARTIES)
        .map(|i| format!("p{i}"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = upload_file(
        &mut h.client,
        with_parties(header("m", "job-a", 2, 0), &many),
        &file,
    )
    .await
    .unwrap_err();
    assert!(
        err.message().contains("over the limit"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn bad_names_and_lineage_are_refused() {
    let mut h = start().await;
    let file = model_file(4);
    for name in ["", "Upper", "-x", "has_underscore"] {
        let err = upload_file(&mut h.client, header(name, "", 0, 0), &file)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "name {name:?}");
        assert!(err.message().contains("header.name"), "{}", err.message());
    }
    let err = upload_file(&mut h.client, header("m", "", 0, 3), &file)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("parent_version"),
        "{}",
        err.message()
    );
    let err = upload_file(&mut h.client, header("m", "Bad Job", 0, 0), &file)
        .await
        .unwrap_err();
    assert!(err.message().contains("job_id"), "{}", err.message());
}

#[tokio::test]
async fn missing_versions_are_not_found() {
    let mut h = start().await;
    for version in [0, 1] {
        let err = h
            .client
            .get_version(get_request("", "absent", version))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("absent"), "{}", err.message());
    }
    let err = download(&mut h.client, "absent", 2).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("absent@2"), "{}", err.message());
}

#[tokio::test]
async fn download_of_altered_blob_fails_with_data_loss() {
    let mut h = start().await;
    let file = model_file(7);
    let v = upload_file(&mut h.client, header("m", "", 0, 0), &file)
        .await
        .unwrap();
    let path = h.blobs.blob_path(&Digest::parse(&v.digest).unwrap());
    let mut on_disk = std::fs::read(&path).unwrap();
    let last = on_disk.len() - 1;
    on_disk[last] ^= 0x01;
    std::fs::write(&path, &on_disk).unwrap();

    let err = download(&mut h.client, "m", 1).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert!(err.message().contains(&v.digest), "{}", err.message());

    std::fs::remove_file(&path).unwrap();
    let err = download(&mut h.client, "m", 1).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
}

#[tokio::test]
async fn health_reports_serving() {
    let h = start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn binary_refuses_bad_config_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let db = format!("sqlite://{}", dir.path().join("m.db").display());
    let cases = [
        (db.as_str(), "s3://bucket/prefix", "--blob-url"),
        (
            "postgresql-ish:nope",
            dir.path().to_str().unwrap(),
            "--database-url",
        ),
    ];
    for (database_url, blob_url, flag) in cases {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_model-manager"))
            .args(["--database-url", database_url, "--blob-url", blob_url])
            .arg("--ready-file")
            .arg(&ready)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("error:") && stderr.contains(flag),
            "{stderr}"
        );
        assert!(!ready.exists());
    }
}

#[tokio::test]
async fn binary_serves_after_ready_file() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_model-manager"))
        .env(
            "COHORT_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("m.db").display()),
        )
        .env(
            "COHORT_BLOB_URL",
            format!("file://{}", dir.path().join("blobs").display()),
        )
        .arg("--ready-file")
        .arg(&ready)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = cohort_runtime::wait_for_file(&ready, Duration::from_secs(30))
        .await
        .expect("ready file");
    let mut client = ModelsClient::new(cohort_runtime::lazy_channel(&addr.to_string()).unwrap());
    let file = model_file(9);
    let v = upload_file(&mut client, header("m", "", 0, 0), &file)
        .await
        .unwrap();
    // Blobs land under the models/ prefix of the blob URL.
    let hex = v.digest.as_str();
    assert!(
        dir.path()
            .join("blobs/models/sha256")
            .join(&hex[..2])
            .join(hex)
            .is_file()
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn binary_refuses_bad_limits_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let db = format!("sqlite://{}", dir.path().join("m.db").display());
    let blobs = dir.path().join("blobs");
    for (flag, value) in [
        ("--max-upload-bytes", "0"),
        ("--max-concurrent-uploads", "0"),
        ("--upload-idle-timeout", "0s"),
        ("--upload-slot-wait", "2days"),
        ("--max-safetensors-header-bytes", "100000001"),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_model-manager"))
            .args(["--database-url", &db, "--blob-url"])
            .arg(&blobs)
            .args([flag, value])
            .arg("--ready-file")
            .arg(&ready)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains("error:") && stderr.contains(flag),
            "{flag} {value}: {stderr}"
        );
        assert!(!ready.exists());
    }
}

#[tokio::test]
async fn other_namespaces_answer_exactly_like_missing_models() {
    let mut h = start().await;
    // What team-b is told about "secret" while no namespace has it, asking
    // in its own namespace, in team-a's and in one that does not exist.
    let asks: [(&str, u32); 6] = [
        ("", 1),
        ("team-b", 0),
        ("team-a", 1),
        ("team-a", 0),
        ("team-a", 2),
        ("nowhere", 1),
    ];
    let mut before = Vec::new();
    for (ns, version) in asks {
        before.push(answer(
            get_as(&mut h.client, TEAM_B, ns, "secret", version).await,
        ));
        before.push(answer(
            download_as(&mut h.client, TEAM_B, ns, "secret", version).await,
        ));
    }
    for (code, message) in &before {
        assert_eq!(*code, Code::NotFound, "{message}");
        assert!(!message.contains("team-a"), "{message}");
    }
    // Asking in team-a answers word for word as asking at home.
    assert_eq!(before[0], before[4], "get of secret@1");
    assert_eq!(before[2], before[6], "get of the latest");
    assert_eq!(
        before[0],
        (
            Code::NotFound,
            "model version \"secret@1\" not found".into()
        )
    );

    let file = model_file(11);
    for parent in [0, 1] {
        upload_as(
            &mut h.client,
            TEAM_A,
            header("secret", "job-a", parent + 1, parent),
            &file,
        )
        .await
        .unwrap();
    }
    let mut after = Vec::new();
    for (ns, version) in asks {
        after.push(answer(
            get_as(&mut h.client, TEAM_B, ns, "secret", version).await,
        ));
        after.push(answer(
            download_as(&mut h.client, TEAM_B, ns, "secret", version).await,
        ));
    }
    assert_eq!(after, before, "team-a's model is not an oracle for team-b");
    let listed = h
        .client
        .list_versions(TEAM_B.request(ListVersionsRequest {
            namespace: "team-a".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.versions.is_empty());

    // Those who may see it do: its namespace's tokens (viewers too), a
    // token of every namespace naming it, a server-internal caller naming it.
    for (caller, ns) in [
        (TEAM_A, ""),
        (TEAM_A, "team-a"),
        (Caller::Token("team-a", "viewer"), ""),
        (EVERYWHERE, "team-a"),
        (Caller::Internal, "team-a"),
    ] {
        let v = get_as(&mut h.client, caller, ns, "secret", 0)
            .await
            .unwrap_or_else(|e| panic!("{caller:?} in {ns:?}: {e}"));
        assert_eq!((v.namespace.as_str(), v.version), ("team-a", 2));
        let bytes = download_as(&mut h.client, caller, ns, "secret", 1)
            .await
            .unwrap();
        assert!(bytes == file, "{caller:?}: downloaded bytes differ");
    }
    // Without a namespace, those not bound to one ask in "default".
    for caller in [EVERYWHERE, Caller::Internal] {
        assert_eq!(
            answer(get_as(&mut h.client, caller, "", "secret", 1).await),
            before[0],
            "{caller:?}"
        );
    }
    let (code, message) = answer(get_as(&mut h.client, TEAM_B, "Team_A", "secret", 1).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("namespace"), "{message}");
}

#[tokio::test]
async fn the_same_name_in_two_namespaces_is_two_models() {
    let mut h = start().await;
    let (file_a, file_b) = (model_file(21), model_file(22));
    // team-a takes the name first; team-b's upload is its own model.
    let a1 = upload_as(&mut h.client, TEAM_A, header("x", "job-a", 1, 0), &file_a)
        .await
        .unwrap();
    let b1 = upload_as(&mut h.client, TEAM_B, header("x", "job-b", 1, 0), &file_b)
        .await
        .unwrap();
    assert_eq!((a1.namespace.as_str(), a1.version), ("team-a", 1));
    assert_eq!((b1.namespace.as_str(), b1.version), ("team-b", 1));
    for (caller, file) in [(TEAM_A, &file_a), (TEAM_B, &file_b)] {
        for version in [0, 1] {
            let got = download_as(&mut h.client, caller, "", "x", version)
                .await
                .unwrap();
            assert!(got == *file, "{caller:?} x@{version}: not its own bytes");
        }
    }
    // Numbering and lineage are per namespace.
    let a2 = upload_as(&mut h.client, TEAM_A, header("x", "job-a", 2, 1), &file_b)
        .await
        .unwrap();
    assert_eq!(a2.version, 2);
    assert_eq!(
        get_as(&mut h.client, TEAM_B, "", "x", 0)
            .await
            .unwrap()
            .version,
        1
    );
    let (code, message) =
        answer(upload_as(&mut h.client, TEAM_B, header("x", "job-b", 2, 2), &file_b).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.contains("parent_version") && message.contains("x@2"),
        "{message}"
    );
    // A server-internal caller names the namespace it writes to.
    let b2 = upload_as(
        &mut h.client,
        Caller::Internal,
        header_in("team-b", "x", "job-b", 2, 1),
        &file_b,
    )
    .await
    .unwrap();
    assert_eq!((b2.namespace.as_str(), b2.version), ("team-b", 2));
    let row = |ns: &str, v: u32| (ns.to_string(), "x".to_string(), v);
    assert_eq!(
        list_all(&mut h.client).await,
        [
            row("team-a", 1),
            row("team-a", 2),
            row("team-b", 1),
            row("team-b", 2)
        ]
    );
}

#[tokio::test]
async fn uploads_into_another_namespace_are_refused() {
    let mut h = start().await;
    let file = small_file(1);
    let (code, message) = answer(
        upload_as(
            &mut h.client,
            TEAM_A,
            header_in("team-b", "m", "", 0, 0),
            &file,
        )
        .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(
        message,
        "header.namespace: the API token is for namespace team-a, not \"team-b\""
    );
    let (code, message) = answer(
        upload_as(
            &mut h.client,
            Caller::Token("team-a", "viewer"),
            header("m", "", 0, 0),
            &file,
        )
        .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(list_all(&mut h.client).await.is_empty());
    // Its own namespace, named or not, is fine.
    for ns in ["", "team-a"] {
        upload_as(&mut h.client, TEAM_A, header_in(ns, "m", "", 0, 0), &file)
            .await
            .unwrap();
    }
    assert_eq!(list_all(&mut h.client).await.len(), 2);
}

#[tokio::test]
async fn uploads_over_the_limits_are_refused_and_nothing_is_stored() {
    let limits = UploadLimits {
        max_upload_bytes: 1 << 20,
        max_safetensors_header_bytes: 64 << 10,
        ..UploadLimits::default()
    };
    let mut h = start_with(limits).await;
    // 3 MiB: refused once the header declares it, before the data streams.
    let big = model_file(31);
    let (code, message) = answer(upload_file(&mut h.client, header("m", "", 0, 0), &big).await);
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(
        message.contains("--max-upload-bytes") && message.contains("1048576"),
        "{message}"
    );
    assert!(!h.blobs.exists(&Digest::of(&big)).await.unwrap());
    // A header over its own bound: refused on its length, unbuffered.
    let mut long_header = (65u64 << 10).to_le_bytes().to_vec();
    long_header.resize(8 + (65 << 10), b' ');
    let (code, message) =
        answer(upload_file(&mut h.client, header("m", "", 0, 0), &long_header).await);
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(
        message.contains("--max-safetensors-header-bytes") && message.contains("65536"),
        "{message}"
    );
    assert!(list_all(&mut h.client).await.is_empty());
    assert!(
        blob_files(h.blobs.root()).is_empty(),
        "nothing of a refused upload is kept"
    );

    // Within the limits, uploads work.
    let small = small_file(3);
    let v = upload_file(&mut h.client, header("m", "", 0, 0), &small)
        .await
        .unwrap();
    assert_eq!(v.version, 1);
    assert_eq!(blob_files(h.blobs.root()).len(), 1);
}

#[tokio::test]
async fn a_round_uploaded_again_answers_the_stored_version() {
    let mut h = start().await;
    let (file1, file2) = (small_file(41), small_file(42));
    let v1 = upload_as(&mut h.client, TEAM_A, header("m", "job-a", 1, 0), &file1)
        .await
        .unwrap();
    assert_eq!(
        (v1.version, v1.digest.as_str()),
        (1, sha256_hex(&file1).as_str())
    );
    assert_eq!(blob_files(h.blobs.root()).len(), 1);
    // A retry of the round, with the same bytes or (retrained) other ones,
    // is answered with the stored version; the other bytes are not kept.
    for file in [&file1, &file2] {
        let again = upload_as(&mut h.client, TEAM_A, header("m", "job-a", 1, 0), file)
            .await
            .unwrap();
        assert_eq!(again, v1);
    }
    assert!(!h.blobs.exists(&Digest::of(&file2)).await.unwrap());
    assert_eq!(blob_files(h.blobs.root()).len(), 1);
    let back = download_as(&mut h.client, TEAM_A, "", "m", 1)
        .await
        .unwrap();
    assert!(back == file1, "the stored version's bytes");
    // Its data is still checked.
    let (code, message) = answer(
        upload_as(
            &mut h.client,
            TEAM_A,
            header("m", "job-a", 1, 0),
            &file2[..file2.len() - 10],
        )
        .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("truncated"), "{message}");

    // The next round, and uploads outside a job's rounds, are new versions.
    let v2 = upload_as(&mut h.client, TEAM_A, header("m", "job-a", 2, 1), &file2)
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    for (job, round, version) in [("", 1, 3), ("", 1, 4), ("job-a", 0, 5), ("job-a", 0, 6)] {
        let v = upload_as(&mut h.client, TEAM_A, header("m", job, round, 0), &file1)
            .await
            .unwrap();
        assert_eq!(v.version, version, "job {job:?} round {round}");
    }
    // Another namespace's round of the same name and job is its own.
    let b1 = upload_as(&mut h.client, TEAM_B, header("m", "job-a", 1, 0), &file2)
        .await
        .unwrap();
    assert_eq!(
        (b1.namespace.as_str(), b1.version, b1.digest.as_str()),
        ("team-b", 1, sha256_hex(&file2).as_str())
    );

    // Retries racing each other store the round once.
    let uploads: Vec<_> = (0..6u8)
        .map(|i| {
            let mut client = h.client.clone();
            let file = small_file(50 + i);
            tokio::spawn(async move {
                upload_as(&mut client, TEAM_A, header("m", "job-a", 3, 2), &file).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for u in uploads {
        answers.push(
            tokio::time::timeout(WAIT, u)
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "every retry answers the one stored version: {answers:?}"
    );
    assert_eq!(answers[0].version, 7);
    let rounds: Vec<u32> = h
        .client
        .list_versions(TEAM_A.request(ListVersionsRequest {
            name: "m".into(),
            job_id: "job-a".into(),
            namespace: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .versions
        .iter()
        .map(|v| v.lineage.as_ref().unwrap().round)
        .collect();
    assert_eq!(rounds, [1, 2, 0, 0, 3]);
}

/// Every file under `dir` (the blob store's root), temporary ones included.
fn blob_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

fn data(bytes: &[u8]) -> UploadVersionRequest {
    UploadVersionRequest {
        part: Some(Part::Data(bytes.to_vec().into())),
    }
}

/// An upload in flight whose further messages the test sends when it likes.
struct OpenUpload {
    tx: mpsc::Sender<UploadVersionRequest>,
    call: tokio::task::JoinHandle<Result<ModelVersion, Status>>,
    started: Instant,
}

/// Starts an upload of `first` (and whatever is sent on `tx` later); it
/// ends when `tx` is dropped.
fn open_upload(client: &ModelsClient<Channel>, first: Vec<UploadVersionRequest>) -> OpenUpload {
    let (tx, rx) = mpsc::channel(first.len().max(1) + 4);
    for m in first {
        tx.try_send(m).unwrap();
    }
    let mut client = client.clone();
    let call = tokio::spawn(async move {
        client
            .upload_version(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner())
    });
    OpenUpload {
        tx,
        call,
        started: Instant::now(),
    }
}

/// The answer to an upload, once it comes.
async fn outcome(
    call: tokio::task::JoinHandle<Result<ModelVersion, Status>>,
) -> Result<ModelVersion, Status> {
    tokio::time::timeout(WAIT, call)
        .await
        .expect("no answer to the upload")
        .unwrap()
}

/// Waits until every upload slot is held: a probe (a header and no data,
/// which would be refused as empty) is refused for want of a slot. The
/// refusal, and how long the probe waited for it.
async fn wait_until_slots_are_taken(client: &mut ModelsClient<Channel>) -> (Status, Duration) {
    let deadline = Instant::now() + WAIT;
    loop {
        let asked = Instant::now();
        match upload(client, vec![header("probe", "", 0, 0)]).await {
            Err(s) if s.code() == Code::ResourceExhausted => return (s, asked.elapsed()),
            // It got a slot: not every upload holds one yet.
            Err(s) if s.code() == Code::InvalidArgument => {}
            other => panic!("probe: {other:?}"),
        }
        assert!(Instant::now() < deadline, "the upload slots never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stalled_uploads_are_aborted_after_the_idle_timeout_and_free_their_slots() {
    let idle = Duration::from_secs(2);
    let slot_wait = Duration::from_millis(200);
    let mut h = start_with(UploadLimits {
        max_concurrent_uploads: 2,
        upload_slot_wait: slot_wait,
        upload_idle_timeout: idle,
        ..UploadLimits::default()
    })
    .await;
    let file = small_file(5);
    // One sends nothing at all, one stops halfway through the file; both
    // keep their streams open.
    let silent = open_upload(&h.client, vec![]);
    let halfway = open_upload(
        &h.client,
        vec![header("stalled", "", 0, 0), data(&file[..file.len() / 2])],
    );
    let (refusal, waited) = wait_until_slots_are_taken(&mut h.client).await;
    assert!(
        refusal.message().contains("--max-concurrent-uploads"),
        "{}",
        refusal.message()
    );
    assert!(waited >= slot_wait, "refused after {waited:?}");

    for (what, stalled) in [("silent", &silent), ("halfway", &halfway)] {
        assert!(!stalled.tx.is_closed(), "{what}: the client still sends");
    }
    for (what, stalled) in [("silent", silent), ("halfway", halfway)] {
        let (code, message) = answer(outcome(stalled.call).await);
        let after = stalled.started.elapsed();
        assert_eq!(code, Code::DeadlineExceeded, "{what}: {message}");
        assert!(
            message.contains("--upload-idle-timeout") && message.contains("2s"),
            "{what}: {message}"
        );
        assert!(after >= idle, "{what}: aborted after {after:?}");
        // Kept open until here: the server, not the client, ended it.
        drop(stalled.tx);
    }

    // Both slots are free again: two uploads at once are taken.
    let (mut c1, mut c2) = (h.client.clone(), h.client.clone());
    let (f1, f2) = (small_file(6), small_file(7));
    let (v1, v2) = tokio::join!(
        upload_file(&mut c1, header("next", "", 0, 0), &f1),
        upload_file(&mut c2, header("other", "", 0, 0), &f2),
    );
    assert_eq!((v1.unwrap().version, v2.unwrap().version), (1, 1));
    let row = |name: &str| ("default".to_string(), name.to_string(), 1);
    assert_eq!(list_all(&mut h.client).await, [row("next"), row("other")]);
    assert_eq!(
        blob_files(h.blobs.root()).len(),
        2,
        "nothing kept of the stalled ones"
    );
}

#[tokio::test]
async fn uploads_beyond_the_bound_wait_for_a_slot_then_are_refused() {
    let slot_wait = Duration::from_secs(3);
    let mut h = start_with(UploadLimits {
        max_concurrent_uploads: 2,
        upload_slot_wait: slot_wait,
        ..UploadLimits::default()
    })
    .await;
    let file = small_file(8);
    let half = file.len() / 2;
    let first = open_upload(
        &h.client,
        vec![header("first", "", 0, 0), data(&file[..half])],
    );
    let second = open_upload(
        &h.client,
        vec![header("second", "", 0, 0), data(&file[..half])],
    );
    let (refusal, waited) = wait_until_slots_are_taken(&mut h.client).await;
    assert!(waited >= slot_wait, "refused after {waited:?}");
    assert!(
        refusal
            .message()
            .contains("2 uploads at once (--max-concurrent-uploads)")
            && refusal.message().contains("3s (--upload-slot-wait)"),
        "{}",
        refusal.message()
    );

    // A complete upload queues while both slots are held...
    let mut messages = vec![header("queued", "", 0, 0)];
    messages.extend(data_messages(&file, 1 << 10));
    let queued = open_upload(&h.client, messages);
    drop(queued.tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!queued.call.is_finished(), "stored past the bound");
    // ...and is taken as soon as one frees, within its wait.
    first.tx.send(data(&file[half..])).await.unwrap();
    drop(first.tx);
    assert_eq!(outcome(first.call).await.unwrap().name, "first");
    let v = outcome(queued.call).await.unwrap();
    assert_eq!(v.name, "queued");
    second.tx.send(data(&file[half..])).await.unwrap();
    drop(second.tx);
    assert_eq!(outcome(second.call).await.unwrap().name, "second");
    assert_eq!(list_all(&mut h.client).await.len(), 3);
}

/// Writes a service certificate for `name`, valid for 127.0.0.1, and
/// returns its TLS files.
fn service_files(dir: &Path, ca: &CertAuthority, ca_cert: &Path, name: &str) -> TlsFiles {
    let validity = Validity::for_duration(Duration::from_secs(3600));
    let pair = ca
        .issue_service(name, &["127.0.0.1".to_string()], validity)
        .unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    cohort_security::write_cert(&cert, &pair.cert_pem).unwrap();
    cohort_security::write_key(&key, &pair.key_pem).unwrap();
    TlsFiles {
        cert,
        key,
        ca: ca_cert.to_path_buf(),
    }
}

#[tokio::test]
async fn coordinators_act_only_for_a_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate(
        "test federation",
        Validity::for_duration(Duration::from_secs(3600)),
    )
    .unwrap();
    let ca_cert = dir.path().join("ca.crt");
    cohort_security::write_cert(&ca_cert, ca.cert_pem()).unwrap();
    let tls_of = |name: &str| {
        cohort_runtime::Tls::load(&service_files(dir.path(), &ca, &ca_cert, name)).unwrap()
    };
    let url = format!("sqlite://{}", dir.path().join("models.db").display());
    let store = Arc::new(SqliteModelStore::open(&url).await.unwrap());
    let blobs = Arc::new(FsBlobStore::open(dir.path().join("blobs")).await.unwrap());
    let (addr, _stop) = serve_in_process_with(
        store,
        blobs,
        UploadLimits::default(),
        Some(tls_of("model-manager")),
        AuditClient::none("test"),
    )
    .await
    .unwrap();
    let client_as = |service: &str| {
        ModelsClient::new(
            cohort_runtime::channel(&addr.to_string(), Some(&tls_of(service))).unwrap(),
        )
    };
    let mut coordinator = client_as("coordinator");
    let mut scheduler = client_as("job-scheduler");
    let file = small_file(9);

    // Without principal metadata, a coordinator may do nothing.
    let refused = (
        Code::PermissionDenied,
        "coordinators act for a job's namespace: principal metadata required".to_string(),
    );
    let internal = Caller::Internal;
    assert_eq!(
        answer(get_as(&mut coordinator, internal, "team-a", "m", 0).await),
        refused
    );
    assert_eq!(
        answer(download_as(&mut coordinator, internal, "team-a", "m", 1).await),
        refused
    );
    assert_eq!(
        answer(
            upload_as(
                &mut coordinator,
                internal,
                header_in("team-a", "m", "", 0, 0),
                &file
            )
            .await
        ),
        refused
    );
    assert_eq!(
        answer(
            coordinator
                .list_versions(ListVersionsRequest::default())
                .await
        ),
        refused
    );

    // With its job's namespace, it is a caller of that namespace...
    let for_job = Caller::Token("team-a", "member");
    let v = upload_as(&mut coordinator, for_job, header("m", "job-a", 1, 0), &file)
        .await
        .unwrap();
    assert_eq!((v.namespace.as_str(), v.version), ("team-a", 1));
    let got = download_as(&mut coordinator, for_job, "", "m", 0)
        .await
        .unwrap();
    assert!(got == file, "downloaded bytes differ");
    // ...and of no other: another namespace's model answers like a missing one.
    upload_as(
        &mut scheduler,
        internal,
        header_in("team-b", "theirs", "", 0, 0),
        &file,
    )
    .await
    .unwrap();
    assert_eq!(
        answer(get_as(&mut coordinator, for_job, "team-b", "theirs", 1).await),
        answer(get_as(&mut coordinator, for_job, "", "theirs", 1).await),
    );
    assert_eq!(
        answer(
            upload_as(
                &mut coordinator,
                for_job,
                header_in("team-b", "m", "", 0, 0),
                &file
            )
            .await
        )
        .0,
        Code::PermissionDenied
    );

    // Other services without metadata stay server-internal.
    for (ns, name) in [("team-a", "m"), ("team-b", "theirs")] {
        let v = get_as(&mut scheduler, internal, ns, name, 1).await.unwrap();
        assert_eq!(v.namespace, ns);
    }
}

/// Users' uploads, refusals included, are recorded (actor, object, namespace,
/// outcome); a namespace out of the caller's reach is recorded in its own;
/// a coordinator's or another service's upload is not.
#[tokio::test]
async fn users_uploads_are_audited_and_coordinators_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("models.db").display());
    let store = Arc::new(SqliteModelStore::open(&url).await.unwrap());
    let blobs = Arc::new(FsBlobStore::open(dir.path().join("blobs")).await.unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::<RecordAuditRequest>::new()));
    let kept = seen.clone();
    let sink: AuditSink = Arc::new(move |r| {
        kept.lock().unwrap().push(r);
        Box::pin(async { Ok(()) })
    });
    let (addr, _stop) = serve_in_process_with(
        store,
        blobs,
        UploadLimits::default(),
        None,
        AuditClient::with_sink("test", sink),
    )
    .await
    .unwrap();
    let mut client = ModelsClient::new(cohort_runtime::lazy_channel(&addr.to_string()).unwrap());
    let file = small_file(3);
    let admin = Caller::User("team-a", "admin", "tok-admin");
    let viewer = Caller::User("team-a", "viewer", "tok-viewer");

    let v = upload_as(&mut client, admin, header("m", "", 0, 0), &file)
        .await
        .unwrap();
    answer(upload_as(&mut client, viewer, header("m", "", 0, 0), &file).await);
    answer(
        upload_as(
            &mut client,
            admin,
            header_in("team-b", "m", "", 0, 0),
            &file,
        )
        .await,
    );
    answer(
        upload_as(
            &mut client,
            admin,
            header("m", "", 0, 0),
            b"not safetensors",
        )
        .await,
    );
    // Not users: a coordinator's checkpoint, another service.
    upload_as(&mut client, TEAM_A, header("m", "job-a", 1, 0), &file)
        .await
        .unwrap();
    upload_as(
        &mut client,
        Caller::Internal,
        header_in("team-a", "m", "", 0, 0),
        &file,
    )
    .await
    .unwrap();

    let entries: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| {
            let e = r.entry.clone().unwrap();
            (
                e.actor_kind,
                e.actor_id,
                e.action,
                e.object_kind,
                e.object_id,
                e.namespace,
                Code::from_i32(r.code),
                e.reason.is_empty(),
            )
        })
        .collect();
    let entry = |actor: &str, object: &str, namespace: &str, code: Code| {
        (
            "token".to_string(),
            actor.to_string(),
            "model.upload".to_string(),
            "model".to_string(),
            object.to_string(),
            namespace.to_string(),
            code,
            code == Code::Ok,
        )
    };
    assert_eq!(
        entries,
        vec![
            entry("tok-admin", &format!("m@{}", v.version), "team-a", Code::Ok),
            entry("tok-viewer", "m", "team-a", Code::PermissionDenied),
            // team-b is out of its reach: recorded in its own namespace.
            entry("tok-admin", "m", "team-a", Code::PermissionDenied),
            entry("tok-admin", "m", "team-a", Code::InvalidArgument),
        ]
    );
}
