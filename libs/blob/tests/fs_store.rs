//! FsBlobStore against real files in a temporary directory.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use cohort_blob::{
    BlobError, BlobStore, ByteStream, CHUNK_SIZE, Digest, FsBlobStore, bytes_stream, get_bytes,
};
use futures::StreamExt;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

async fn store() -> (tempfile::TempDir, FsBlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path().join("blobs")).await.unwrap();
    (dir, store)
}

fn tmp_entries(store: &FsBlobStore) -> usize {
    std::fs::read_dir(store.root().join("tmp")).unwrap().count()
}

#[tokio::test]
async fn round_trip() {
    let (_dir, store) = store().await;
    let data = Bytes::from_static(b"hello, blobs");
    let info = store.put(bytes_stream(data.clone())).await.unwrap();
    assert_eq!(info.digest, Digest::of(&data));
    assert_eq!(info.size, data.len() as u64);
    assert!(store.exists(&info.digest).await.unwrap());
    assert_eq!(get_bytes(&store, &info.digest).await.unwrap(), data);

    let hex = info.digest.as_str();
    let expected_path = store.root().join("sha256").join(&hex[..2]).join(hex);
    assert_eq!(store.blob_path(&info.digest), expected_path);
    assert_eq!(std::fs::read(expected_path).unwrap(), data);
    assert_eq!(tmp_entries(&store), 0);
}

#[tokio::test]
async fn large_blob_streams_back_identical() {
    let (_dir, store) = store().await;
    let data = pattern(20 << 20);
    let chunks: Vec<Result<Bytes, BlobError>> = data
        .chunks(64 << 10)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let input: ByteStream = Box::pin(futures::stream::iter(chunks));
    let info = store.put(input).await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.digest, Digest::of(&data));

    let mut stream = store.get(&info.digest).await.unwrap();
    let mut back = Vec::with_capacity(data.len());
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.len() <= CHUNK_SIZE);
        back.extend_from_slice(&chunk);
        chunks += 1;
    }
    assert_eq!(chunks, 20);
    assert!(back == data, "bytes differ after round trip");
}

#[tokio::test]
async fn altered_blob_is_refused_with_digest_mismatch() {
    let (_dir, store) = store().await;
    let data = Bytes::from(pattern(3 * CHUNK_SIZE + 100));
    let info = store.put(bytes_stream(data)).await.unwrap();
    let path = store.blob_path(&info.digest);
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[CHUNK_SIZE + 7] ^= 0xff;
    std::fs::write(&path, &on_disk).unwrap();

    let items: Vec<_> = store.get(&info.digest).await.unwrap().collect().await;
    let (last, rest) = items.split_last().unwrap();
    assert!(rest.iter().all(Result::is_ok));
    match last {
        Err(BlobError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, &info.digest);
            assert_eq!(actual, &Digest::of(&on_disk));
        }
        other => panic!("expected DigestMismatch last, got {other:?}"),
    }
    assert!(matches!(
        get_bytes(&store, &info.digest).await,
        Err(BlobError::DigestMismatch { .. })
    ));
}

#[tokio::test]
async fn truncated_blob_is_refused() {
    let (_dir, store) = store().await;
    let info = store
        .put(bytes_stream(Bytes::from(pattern(1000))))
        .await
        .unwrap();
    let path = store.blob_path(&info.digest);
    std::fs::write(&path, pattern(10)).unwrap();
    assert!(matches!(
        get_bytes(&store, &info.digest).await,
        Err(BlobError::DigestMismatch { .. })
    ));
}

#[tokio::test]
async fn missing_blob_is_not_found() {
    let (_dir, store) = store().await;
    let digest = Digest::of(b"never stored");
    assert!(!store.exists(&digest).await.unwrap());
    match store.get(&digest).await {
        Err(BlobError::NotFound { digest: d }) => assert_eq!(d, digest),
        Err(e) => panic!("expected NotFound, got {e:?}"),
        Ok(_) => panic!("expected NotFound, got a stream"),
    }
    assert!(matches!(
        store.delete(&digest).await,
        Err(BlobError::NotFound { .. })
    ));
}

#[tokio::test]
async fn put_is_idempotent_and_delete_removes() {
    let (_dir, store) = store().await;
    let data = Bytes::from(pattern(5000));
    let a = store.put(bytes_stream(data.clone())).await.unwrap();
    let b = store.put(bytes_stream(data.clone())).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(get_bytes(&store, &a.digest).await.unwrap(), data);
    assert_eq!(tmp_entries(&store), 0);

    store.delete(&a.digest).await.unwrap();
    assert!(!store.exists(&a.digest).await.unwrap());
}

#[tokio::test]
async fn empty_blob_round_trips() {
    let (_dir, store) = store().await;
    let info = store.put(bytes_stream(Bytes::new())).await.unwrap();
    assert_eq!(info.size, 0);
    assert_eq!(info.digest, Digest::of(b""));
    assert!(get_bytes(&store, &info.digest).await.unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_puts_of_same_content() {
    let (_dir, store) = store().await;
    let store = Arc::new(store);
    let data = Bytes::from(pattern(3 * CHUNK_SIZE + 17));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let data = data.clone();
            tokio::spawn(async move { store.put(bytes_stream(data)).await })
        })
        .collect();
    for t in tasks {
        let info = t.await.unwrap().unwrap();
        assert_eq!(info.digest, Digest::of(&data));
    }
    assert_eq!(
        get_bytes(store.as_ref(), &Digest::of(&data)).await.unwrap(),
        data
    );
    assert_eq!(tmp_entries(&store), 0);
}

#[tokio::test]
async fn failed_input_stores_nothing() {
    let (_dir, store) = store().await;
    let input: ByteStream = Box::pin(futures::stream::iter(vec![
        Ok(Bytes::from_static(b"partial")),
        Err(BlobError::Input("client went away".into())),
    ]));
    match store.put(input).await {
        Err(BlobError::Input(m)) => assert_eq!(m, "client went away"),
        other => panic!("expected Input error, got {other:?}"),
    }
    assert!(!store.exists(&Digest::of(b"partial")).await.unwrap());
    assert_eq!(tmp_entries(&store), 0);
}
