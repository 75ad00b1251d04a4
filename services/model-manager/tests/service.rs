//! model-manager over real gRPC on loopback, with SQLite and the filesystem
//! blob store in a temporary directory.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cohort_blob::{BlobStore, Digest, FsBlobStore};
use cohort_model_manager::serve_in_process;
use cohort_proto::v1::models_client::ModelsClient;
use cohort_proto::v1::upload_version_request::Part;
use cohort_proto::v1::{
    GetVersionRequest, Lineage, ListVersionsRequest, Metrics, ModelVersion, UploadHeader,
    UploadVersionRequest,
};
use cohort_store::models::SqliteModelStore;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sha2::Digest as _;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

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
    let client = ModelsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
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

fn header(name: &str, job: &str, round: u32, parent: u32) -> UploadVersionRequest {
    UploadVersionRequest {
        part: Some(Part::Header(UploadHeader {
            name: name.to_string(),
            namespace: String::new(),
            lineage: Some(Lineage {
                job_id: job.to_string(),
                round,
                parent_version: parent,
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
            part: Some(Part::Data(c.to_vec())),
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
    let mut stream = client
        .download(GetVersionRequest {
            name: name.to_string(),
            version,
        })
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
        .get_version(GetVersionRequest {
            name: "digits-mlp".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest, v2);
    let first = h
        .client
        .get_version(GetVersionRequest {
            name: "digits-mlp".into(),
            version: 1,
        })
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
            .get_version(GetVersionRequest {
                name: "absent".into(),
                version,
            })
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
    let channel = Channel::from_shared(format!("http://{}", h.addr))
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
    let mut client = ModelsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
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
