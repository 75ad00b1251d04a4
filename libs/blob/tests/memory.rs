//! Memory stays bounded however large the blob: the peak resident set while
//! a 256 MiB blob goes in and comes back out stays far below its size, on
//! each backend. One test in this binary, so nothing else moves the peak.
//! Linux only (reads and resets the peak from /proc/self); elsewhere it
//! skips, and fails under CI like a missing S3 server (`cohort_testkit`).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use cohort_blob::conformance::{pattern_digest, pattern_stream};
use cohort_blob::{BlobStore, CHUNK_SIZE, FsBlobStore, S3BlobStore};
use futures::StreamExt;
use sha2::Digest as _;

const BLOB: u64 = 256 << 20;
/// Allowed growth of the peak over the resident set before: a part or two
/// plus allocator slack, nowhere near the blob.
const BOUND: u64 = 48 << 20;

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the kernel's peak-RSS mark; false where that is not possible.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// How far the peak resident set rose above its level before `f`.
async fn peak_rise<T>(f: impl std::future::Future<Output = T>) -> (T, u64) {
    let before = status_bytes("VmRSS:").unwrap();
    assert!(reset_peak());
    let out = f.await;
    let peak = status_bytes("VmHWM:").unwrap();
    (out, peak.saturating_sub(before))
}

async fn measure(name: &str, store: Arc<dyn BlobStore>) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    // Warm up: the first calls allocate pools, clients, TLS state, ...
    let warm = store
        .put(pattern_stream(1, 1 << 20, CHUNK_SIZE))
        .await
        .unwrap();
    let _ = cohort_blob::get_bytes(store.as_ref(), &warm.digest).await;

    let (info, put_rise) = peak_rise(store.put(pattern_stream(2, BLOB, CHUNK_SIZE))).await;
    let info = info.unwrap();
    assert_eq!(info.digest, pattern_digest(2, BLOB));

    let (read, get_rise) = peak_rise(async {
        let mut stream = store.get(&info.digest).await.unwrap();
        let mut hasher = sha2::Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            n += chunk.len() as u64;
            hasher.update(&chunk);
        }
        (n, hex::encode(hasher.finalize()))
    })
    .await;
    assert_eq!(read, (BLOB, info.digest.as_str().to_string()));
    eprintln!(
        "{name}: {:.0} MiB blob, peak RSS rise: put {:.1} MiB, get {:.1} MiB",
        mib(BLOB),
        mib(put_rise),
        mib(get_rise)
    );
    for (op, rise) in [("put", put_rise), ("get", get_rise)] {
        assert!(
            rise < BOUND,
            "{name} {op} of {:.0} MiB raised peak RSS by {:.1} MiB (bound {:.0} MiB)",
            mib(BLOB),
            mib(rise),
            mib(BOUND)
        );
    }
    store.delete(&info.digest).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_and_get_hold_about_one_part() {
    if status_bytes("VmHWM:").is_none() || !reset_peak() {
        cohort_testkit::skip("no /proc/self peak-RSS accounting here (VmHWM, clear_refs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    measure(
        "filesystem",
        Arc::new(FsBlobStore::open(dir.path()).await.unwrap()),
    )
    .await;

    let Some(endpoint) = support::endpoint() else {
        return;
    };
    let options = support::options(&endpoint);
    let bucket = support::TestBucket::create(&options).await;
    let url = format!("s3://{}/mem", bucket.name);
    let store = S3BlobStore::open_with(&url, options).await.unwrap();
    measure("s3", Arc::new(store)).await;
}
