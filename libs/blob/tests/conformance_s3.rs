//! The blob conformance suite on S3, plus what is particular to it: the key
//! layout, multipart copy, the bucket check at open, and a server lost
//! mid-way. The server is `COHORT_TEST_S3_ENDPOINT` (scripts/test.sh starts
//! s3s-fs); each test makes its own bucket and removes it afterwards.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use bytes::Bytes;
use cohort_blob::conformance::{self, Fresh};
use cohort_blob::{
    BlobError, BlobStore, CHUNK_SIZE, Digest, PART_SIZE, S3BlobStore, S3Options, bytes_stream,
    get_bytes,
};
use futures::StreamExt;
use support::{TestBucket, assert_no_secret, endpoint, options};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

const PREFIX: &str = "blobs/test";

/// Temporary objects under the store's tmp/ prefix, plus open multipart
/// uploads where the server can list them (s3s-fs answers NotImplemented).
/// Any other error fails the test: an unanswered count is not zero.
async fn leftovers(store: &S3BlobStore) -> usize {
    let client = store.client();
    let objects = client
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix(store.temp_prefix())
        .send()
        .await
        .unwrap_or_else(|e| panic!("listing temporary objects: {}", DisplayErrorContext(&e)));
    let uploads = match client
        .list_multipart_uploads()
        .bucket(store.bucket())
        .send()
        .await
    {
        Ok(out) => out.uploads().len(),
        Err(e) if e.code() == Some("NotImplemented") => 0,
        Err(e) => panic!("listing multipart uploads: {}", DisplayErrorContext(&e)),
    };
    objects.contents().len() + uploads
}

async fn open_in(bucket: &TestBucket, options: S3Options) -> Arc<S3BlobStore> {
    let url = format!("s3://{}/{PREFIX}", bucket.name);
    Arc::new(S3BlobStore::open_with(&url, options).await.unwrap())
}

async fn fresh_with(options: S3Options) -> Fresh {
    let bucket = TestBucket::create(&options).await;
    let store = open_in(&bucket, options).await;
    let (a, b) = (store.clone(), store.clone());
    Fresh::new(
        store,
        move |digest: Digest, bytes: Bytes| {
            let s = a.clone();
            async move {
                s.client()
                    .put_object()
                    .bucket(s.bucket())
                    .key(s.object_key(&digest))
                    .body(bytes.into())
                    .send()
                    .await
                    .unwrap();
            }
        },
        move || {
            let s = b.clone();
            async move { leftovers(&s).await }
        },
        bucket,
    )
}

async fn fresh() -> Option<Fresh> {
    Some(fresh_with(options(&endpoint()?)).await)
}

cohort_blob::blob_store_conformance!(s3, fresh());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_live_at_prefix_sha256_ab_digest() {
    let Some(endpoint) = endpoint() else { return };
    let options = options(&endpoint);
    let bucket = TestBucket::create(&options).await;
    let store = open_in(&bucket, options).await;
    for data in [
        Bytes::from_static(b"hello, blobs"),
        conformance::pattern_bytes(5, 0, PART_SIZE + CHUNK_SIZE),
    ] {
        let info = store.put(bytes_stream(data.clone())).await.unwrap();
        let hex = info.digest.as_str();
        let key = format!("{PREFIX}/sha256/{}/{hex}", &hex[..2]);
        assert_eq!(store.object_key(&info.digest), key);
        let object = store
            .client()
            .get_object()
            .bucket(&bucket.name)
            .key(&key)
            .send()
            .await
            .unwrap();
        let stored = object.body.collect().await.unwrap().into_bytes();
        assert!(stored == data, "object at {key} holds other bytes");
    }
    assert_eq!(leftovers(&store).await, 0);
}

/// Above the single-copy limit the temporary object reaches its final key by
/// multipart copy (UploadPartCopy); lowered here so 64 MiB takes that path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_blob_through_multipart_copy() {
    let Some(endpoint) = endpoint() else { return };
    let fresh = fresh_with(S3Options {
        single_copy_limit: 5 << 20,
        ..options(&endpoint)
    })
    .await;
    conformance::large_blob_streams_back(&fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opening_a_missing_bucket_names_it_and_no_secret() {
    let Some(endpoint) = endpoint() else { return };
    let bucket = format!("cohort-missing-{:016x}", rand::random::<u64>());
    let err = S3BlobStore::open_with(&format!("s3://{bucket}/x"), options(&endpoint))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, BlobError::Unavailable { .. }), "{text}");
    assert!(text.contains(&bucket), "bucket not named: {text}");
    assert!(text.contains(&endpoint), "endpoint not named: {text}");
    assert!(text.contains("does not exist"), "{text}");
    assert_no_secret(&text);
    assert_no_secret(&format!("{err:?}"));
}

/// A port nothing listens on: bound, never listening, so connections are
/// refused and nobody else takes the port while the socket is kept.
fn closed_port() -> (TcpSocket, u16) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// No server needed: an endpoint nobody answers is refused at open, naming
/// bucket and endpoint. Over https this also builds the SDK's TLS client,
/// which must not panic however many rustls crypto providers are compiled in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opening_an_unreachable_endpoint_names_bucket_and_endpoint() {
    for scheme in ["http", "https"] {
        let (_reserved, port) = closed_port();
        let endpoint = format!("{scheme}://127.0.0.1:{port}");
        let options = S3Options {
            endpoint: Some(endpoint.clone()),
            ..S3Options::from_env().unwrap()
        };
        let err = S3BlobStore::open_with("s3://cohort-nowhere/x", options)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, BlobError::Unavailable { .. }), "{text}");
        assert!(text.contains("cohort-nowhere"), "{text}");
        assert!(text.contains(&endpoint), "{text}");
        assert_no_secret(&text);
    }
}

/// Forwards TCP connections to `upstream` until dropped, which cuts them all.
struct Relay {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Dropped with the task: aborts every connection.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { addr, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The server goes away under an open store, mid-download too: every call
/// ends in `Unavailable` naming the bucket and key, never a panic or a
/// silent short read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_server_is_unavailable() {
    let Some(endpoint) = endpoint() else { return };
    let upstream: SocketAddr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("COHORT_TEST_S3_ENDPOINT as http://ip:port");
    let relay = Relay::start(upstream).await;
    let direct = options(&endpoint);
    let bucket = TestBucket::create(&direct).await;
    let store = open_in(
        &bucket,
        S3Options {
            endpoint: Some(format!("http://{}", relay.addr)),
            ..direct
        },
    )
    .await;
    let len = 32 << 20;
    let info = store
        .put(conformance::pattern_stream(9, len, CHUNK_SIZE))
        .await
        .unwrap();
    let small = store
        .put(bytes_stream(Bytes::from_static(b"small")))
        .await
        .unwrap();

    let mut download = store.get(&info.digest).await.unwrap();
    assert!(download.next().await.unwrap().is_ok());
    drop(relay);
    let mut items = Vec::new();
    while let Some(item) = download.next().await {
        items.push(item);
    }
    match items.last() {
        Some(Err(BlobError::Unavailable { target, .. })) => {
            assert!(target.contains(&store.object_key(&info.digest)), "{target}")
        }
        other => panic!("a cut download must end in Unavailable, got {other:?}"),
    }

    let key = store.object_key(&small.digest);
    let errors = [
        store.exists(&small.digest).await.unwrap_err(),
        get_bytes(store.as_ref(), &small.digest).await.unwrap_err(),
        store.delete(&small.digest).await.unwrap_err(),
        store
            .put(bytes_stream(Bytes::from_static(b"small")))
            .await
            .unwrap_err(),
    ];
    for err in errors {
        let text = err.to_string();
        assert!(matches!(err, BlobError::Unavailable { .. }), "{text}");
        assert!(text.contains(&bucket.name) && text.contains(&key), "{text}");
        assert_no_secret(&text);
    }
}

/// A put dropped mid-upload (its request cancelled) still aborts its
/// multipart upload, from a task of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_put_leaves_nothing() {
    let Some(endpoint) = endpoint() else { return };
    let options = options(&endpoint);
    let bucket = TestBucket::create(&options).await;
    let store = open_in(&bucket, options).await;
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<()>();
    // Two parts and a bit, then nothing: by the time the stream is polled
    // past its data, both parts are uploaded.
    let stalled = futures::stream::once(async move {
        let _ = stalled_tx.send(());
        futures::future::pending::<Result<Bytes, BlobError>>().await
    });
    let input = conformance::pattern_stream(81, 2 * PART_SIZE as u64 + 1, CHUNK_SIZE);
    let put = {
        let store = store.clone();
        tokio::spawn(async move { store.put(Box::pin(input.chain(stalled))).await })
    };
    stalled_rx.await.unwrap();
    let before = leftovers(&store).await;
    put.abort();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n = leftovers(&store).await;
        if n == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} uploads or temporary objects left 10 s after a cancelled put"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if before == 0 {
        eprintln!("note: this server does not list multipart uploads; the abort was not observed");
    }
}
