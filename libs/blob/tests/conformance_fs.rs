//! The blob conformance suite on the local filesystem, plus what is
//! particular to it (the on-disk layout).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use cohort_blob::conformance::Fresh;
use cohort_blob::{BlobStore, Digest, FsBlobStore, bytes_stream, get_bytes};

async fn open() -> (tempfile::TempDir, Arc<FsBlobStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsBlobStore::open(dir.path().join("blobs")).await.unwrap());
    (dir, store)
}

fn tmp_entries(store: &FsBlobStore) -> usize {
    std::fs::read_dir(store.root().join("tmp")).unwrap().count()
}

async fn fresh() -> Option<Fresh> {
    let (dir, store) = open().await;
    let (a, b) = (store.clone(), store.clone());
    Some(Fresh::new(
        store,
        move |digest: Digest, bytes: Bytes| {
            let path = a.blob_path(&digest);
            async move { tokio::fs::write(path, bytes).await.unwrap() }
        },
        move || {
            let n = tmp_entries(&b);
            async move { n }
        },
        dir,
    ))
}

cohort_blob::blob_store_conformance!(fs, fresh());

#[tokio::test]
async fn blobs_live_at_sha256_ab_digest() {
    let (_dir, store) = open().await;
    let data = Bytes::from_static(b"hello, blobs");
    let info = store.put(bytes_stream(data.clone())).await.unwrap();
    let hex = info.digest.as_str();
    let expected = store.root().join("sha256").join(&hex[..2]).join(hex);
    assert_eq!(store.blob_path(&info.digest), expected);
    assert_eq!(std::fs::read(expected).unwrap(), data);
    assert_eq!(tmp_entries(&store), 0);
    assert_eq!(get_bytes(store.as_ref(), &info.digest).await.unwrap(), data);
}

/// The same suite through the metrics decorator `open_blob_store` puts on every store:
/// it forwards every call and every byte unchanged.
mod measured {
    use super::*;
    use cohort_blob::Measured;

    async fn fresh_measured() -> Option<Fresh> {
        let (dir, store) = open().await;
        let (a, b) = (store.clone(), store.clone());
        Some(Fresh::new(
            Arc::new(Measured::new(store, "fs")),
            move |digest: Digest, bytes: Bytes| {
                let path = a.blob_path(&digest);
                async move { tokio::fs::write(path, bytes).await.unwrap() }
            },
            move || {
                let n = tmp_entries(&b);
                async move { n }
            },
            dir,
        ))
    }

    cohort_blob::blob_store_conformance!(fs, fresh_measured());
}
