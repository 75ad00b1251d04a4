//! The behaviour every `BlobStore` backend must share, written once against
//! the trait and run against each backend.
//!
//! Each check is a `pub async fn` taking a [`Fresh`] (an empty store plus two
//! backend hooks); it panics when the backend misbehaves. The macro
//! [`blob_store_conformance!`] stamps out one `#[tokio::test]` per check, so a
//! failure names the backend (test file and module) and the check (test name).
//!
//! # Running the suite against a backend
//!
//! In an integration test file of this crate (`tests/conformance_<backend>.rs`):
//!
//! ```ignore
//! use cohort_blob::conformance::Fresh;
//!
//! /// A fresh, empty store per test, or None to skip (server not configured).
//! async fn fresh() -> Option<Fresh> {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = Arc::new(FsBlobStore::open(dir.path()).await.unwrap());
//!     let corrupt = { /* overwrite a stored blob's bytes, bypassing the store */ };
//!     let leftovers = { /* count temporary files or objects */ };
//!     Some(Fresh::new(store, corrupt, leftovers, dir)) // `dir` outlives the store
//! }
//!
//! cohort_blob::blob_store_conformance!(fs, fresh());
//! ```
//!
//! The blobs the checks write come from [`pattern_stream`]: generated chunk by
//! chunk and compared by hash, so even the large ones never sit in memory
//! whole, in the store or in the test.

// Test support: a failed expectation is a failed check, so it panics.
#![allow(clippy::unwrap_used)]

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use sha2::Digest as _;

use crate::{BlobError, BlobInfo, BlobStore, ByteStream, CHUNK_SIZE, Digest, PART_SIZE, get_bytes};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Size of the large-blob check.
pub const LARGE_BLOB: u64 = 64 << 20;

/// A fresh, empty store for one check, with the backend's hooks and what
/// must outlive it.
pub struct Fresh {
    pub store: Arc<dyn BlobStore>,
    corrupt: Arc<dyn Fn(Digest, Bytes) -> BoxFuture<()> + Send + Sync>,
    leftovers: Arc<dyn Fn() -> BoxFuture<usize> + Send + Sync>,
    /// Dropped after the store: a temporary directory, a test bucket that
    /// removes itself on drop, ...
    pub guard: Box<dyn Any + Send>,
}

impl Fresh {
    /// `corrupt(digest, bytes)` replaces the stored content of blob `digest`
    /// with `bytes`, behind the store's back (disk rot, a tampered object).
    /// `leftovers()` counts the temporary files or objects (and open uploads,
    /// where the backend can list them) that the store holds: 0 once every
    /// put has returned, whether it succeeded or failed.
    pub fn new<C, CF, L, LF>(
        store: Arc<dyn BlobStore>,
        corrupt: C,
        leftovers: L,
        guard: impl Any + Send,
    ) -> Self
    where
        C: Fn(Digest, Bytes) -> CF + Send + Sync + 'static,
        CF: Future<Output = ()> + Send + 'static,
        L: Fn() -> LF + Send + Sync + 'static,
        LF: Future<Output = usize> + Send + 'static,
    {
        Self {
            store,
            corrupt: Arc::new(move |d, b| Box::pin(corrupt(d, b))),
            leftovers: Arc::new(move || Box::pin(leftovers())),
            guard: Box::new(guard),
        }
    }

    async fn corrupt(&self, digest: &Digest, bytes: Bytes) {
        (self.corrupt)(digest.clone(), bytes).await
    }

    async fn assert_no_leftovers(&self, after: &str) {
        let n = (self.leftovers)().await;
        assert_eq!(n, 0, "{n} temporary objects left behind after {after}");
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __blob_conformance_tests {
    ($module:ident, $fresh:expr, [$($check:ident),* $(,)?]) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let Some(fresh) = $fresh.await else {
                        return;
                    };
                    $crate::conformance::$check(&fresh).await;
                    drop(fresh);
                }
            )*
        }
    };
}

/// One test per check of this module; see the module docs.
#[macro_export]
macro_rules! blob_store_conformance {
    ($module:ident, $fresh:expr) => {
        $crate::__blob_conformance_tests!(
            $module,
            $fresh,
            [
                round_trip,
                empty_blob_round_trips,
                boundary_sizes_round_trip,
                large_blob_streams_back,
                put_is_idempotent,
                concurrent_puts_of_same_content,
                concurrent_puts_of_different_content,
                missing_blob_is_not_found,
                delete_removes_the_blob,
                altered_blob_is_refused,
                truncated_blob_is_refused,
                failed_input_stores_nothing,
                failed_input_after_parts_stores_nothing,
            ]
        );
    };
}

// ---- generated content -------------------------------------------------

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Bytes `start..start+len` of the pseudo-random blob `seed` (the same
/// bytes however the blob is cut).
pub fn pattern_bytes(seed: u64, start: u64, len: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(len);
    let end = start + len as u64;
    let mut pos = start;
    while pos < end {
        let word = splitmix64(seed.rotate_left(32) ^ (pos / 8)).to_le_bytes();
        let from = (pos % 8) as usize;
        let take = (8 - from).min((end - pos) as usize);
        out.extend_from_slice(&word[from..from + take]);
        pos += take as u64;
    }
    out.freeze()
}

/// Blob `seed` of `len` bytes as a stream of `chunk`-byte pieces, generated
/// as they are pulled.
pub fn pattern_stream(seed: u64, len: u64, chunk: usize) -> ByteStream {
    Box::pin(futures::stream::unfold(0u64, move |pos| async move {
        (pos < len).then(|| {
            let n = (len - pos).min(chunk as u64) as usize;
            (Ok(pattern_bytes(seed, pos, n)), pos + n as u64)
        })
    }))
}

/// The digest of blob `seed` of `len` bytes, hashed piece by piece.
pub fn pattern_digest(seed: u64, len: u64) -> Digest {
    let mut hasher = sha2::Sha256::new();
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(CHUNK_SIZE as u64) as usize;
        hasher.update(pattern_bytes(seed, pos, n));
        pos += n as u64;
    }
    Digest::from_hasher(hasher)
}

/// Puts blob `seed` and checks what `put` says about it.
async fn put_pattern(store: &dyn BlobStore, seed: u64, len: u64, chunk: usize) -> BlobInfo {
    let info = store
        .put(pattern_stream(seed, len, chunk))
        .await
        .unwrap_or_else(|e| panic!("put of {len} bytes: {e}"));
    assert_eq!(info.size, len, "size put reports");
    assert_eq!(info.digest, pattern_digest(seed, len), "digest put reports");
    info
}

/// Reads blob `seed` of `len` bytes back chunk by chunk, comparing each with
/// the generator and re-hashing the whole stream.
async fn assert_reads_back(store: &dyn BlobStore, digest: &Digest, seed: u64, len: u64) {
    let mut stream = store
        .get(digest)
        .await
        .unwrap_or_else(|e| panic!("get sha256:{digest}: {e}"));
    let mut hasher = sha2::Sha256::new();
    let mut pos = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("reading sha256:{digest} at {pos}: {e}"));
        assert!(
            !chunk.is_empty() && chunk.len() <= CHUNK_SIZE,
            "chunk of {} bytes at {pos}: expected 1..={CHUNK_SIZE}",
            chunk.len()
        );
        assert!(
            pos + chunk.len() as u64 <= len,
            "more than {len} bytes came back"
        );
        assert!(
            chunk == pattern_bytes(seed, pos, chunk.len()),
            "bytes differ in the chunk at {pos}"
        );
        hasher.update(&chunk);
        pos += chunk.len() as u64;
    }
    assert_eq!(pos, len, "bytes read back");
    assert_eq!(
        &Digest::from_hasher(hasher),
        digest,
        "digest of what came back"
    );
}

/// A stream of `good` followed by an error, as from a client that went away.
fn failing_stream(good: ByteStream, message: &'static str) -> ByteStream {
    Box::pin(good.chain(futures::stream::once(async move {
        Err(BlobError::Input(message.to_string()))
    })))
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, BlobError>, digest: &Digest, op: &str) {
    match result {
        Err(BlobError::NotFound { digest: d }) => assert_eq!(&d, digest, "{op}: digest named"),
        other => panic!("{op}: expected NotFound, got {other:?}"),
    }
}

// ---- the checks ----------------------------------------------------------

pub async fn round_trip(f: &Fresh) {
    let store = f.store.as_ref();
    let data = Bytes::from_static(b"hello, blobs");
    let info = store.put(crate::bytes_stream(data.clone())).await.unwrap();
    assert_eq!(info.digest, Digest::of(&data));
    assert_eq!(info.size, data.len() as u64);
    assert!(store.exists(&info.digest).await.unwrap());
    assert_eq!(get_bytes(store, &info.digest).await.unwrap(), data);
    f.assert_no_leftovers("a put").await;
}

pub async fn empty_blob_round_trips(f: &Fresh) {
    let store = f.store.as_ref();
    let info = store.put(crate::bytes_stream(Bytes::new())).await.unwrap();
    assert_eq!(info.size, 0);
    assert_eq!(info.digest, Digest::of(b""));
    assert!(store.exists(&info.digest).await.unwrap());
    let items: Vec<_> = store.get(&info.digest).await.unwrap().collect().await;
    assert!(
        items.iter().all(|c| c.as_ref().is_ok_and(Bytes::is_empty)),
        "an empty blob reads back as no bytes: {items:?}"
    );
    store.delete(&info.digest).await.unwrap();
    assert!(!store.exists(&info.digest).await.unwrap());
}

/// Sizes around chunk and part edges, fed in awkward pieces.
pub async fn boundary_sizes_round_trip(f: &Fresh) {
    let store = f.store.as_ref();
    let (chunk, part) = (CHUNK_SIZE as u64, PART_SIZE as u64);
    for (seed, len) in [
        1,
        chunk - 1,
        chunk,
        chunk + 1,
        part - 1,
        part,
        part + 1,
        2 * part + 3,
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 100 + seed as u64;
        let info = put_pattern(store, seed, len, 333_333).await;
        assert_reads_back(store, &info.digest, seed, len).await;
    }
    f.assert_no_leftovers("puts").await;
}

/// `LARGE_BLOB` bytes in `CHUNK_SIZE` pieces, generated and checked on the fly.
pub async fn large_blob_streams_back(f: &Fresh) {
    let store = f.store.as_ref();
    let info = put_pattern(store, 7, LARGE_BLOB, CHUNK_SIZE).await;
    assert!(store.exists(&info.digest).await.unwrap());
    assert_reads_back(store, &info.digest, 7, LARGE_BLOB).await;
    f.assert_no_leftovers("a large put").await;
}

pub async fn put_is_idempotent(f: &Fresh) {
    let store = f.store.as_ref();
    for (seed, len) in [(11, 5000), (12, PART_SIZE as u64 + 17)] {
        let a = put_pattern(store, seed, len, CHUNK_SIZE).await;
        let b = put_pattern(store, seed, len, 4096).await;
        assert_eq!(a, b);
        assert_reads_back(store, &a.digest, seed, len).await;
    }
    f.assert_no_leftovers("repeated puts").await;
}

pub async fn concurrent_puts_of_same_content(f: &Fresh) {
    let len = (PART_SIZE + CHUNK_SIZE + 17) as u64;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = f.store.clone();
            tokio::spawn(async move { put_pattern(store.as_ref(), 21, len, CHUNK_SIZE).await })
        })
        .collect();
    let mut infos = Vec::new();
    for t in tasks {
        infos.push(t.await.unwrap());
    }
    assert!(infos.windows(2).all(|w| w[0] == w[1]));
    assert_reads_back(f.store.as_ref(), &infos[0].digest, 21, len).await;
    f.assert_no_leftovers("concurrent puts").await;
}

pub async fn concurrent_puts_of_different_content(f: &Fresh) {
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let store = f.store.clone();
            let len = i * 300_001 + 1;
            tokio::spawn(async move {
                (
                    i,
                    len,
                    put_pattern(store.as_ref(), 30 + i, len, CHUNK_SIZE).await,
                )
            })
        })
        .collect();
    for t in tasks {
        let (i, len, info) = t.await.unwrap();
        assert_reads_back(f.store.as_ref(), &info.digest, 30 + i, len).await;
    }
    f.assert_no_leftovers("concurrent puts").await;
}

pub async fn missing_blob_is_not_found(f: &Fresh) {
    let store = f.store.as_ref();
    let digest = Digest::of(b"never stored");
    assert!(!store.exists(&digest).await.unwrap());
    assert_not_found(store.get(&digest).await.map(|_| ()), &digest, "get");
    assert_not_found(store.delete(&digest).await, &digest, "delete");
}

pub async fn delete_removes_the_blob(f: &Fresh) {
    let store = f.store.as_ref();
    let info = put_pattern(store, 41, 5000, CHUNK_SIZE).await;
    store.delete(&info.digest).await.unwrap();
    assert!(!store.exists(&info.digest).await.unwrap());
    assert_not_found(
        store.get(&info.digest).await.map(|_| ()),
        &info.digest,
        "get",
    );
    assert_not_found(store.delete(&info.digest).await, &info.digest, "delete");
    // Gone means gone: a new put stores it again.
    let again = put_pattern(store, 41, 5000, CHUNK_SIZE).await;
    assert_reads_back(store, &again.digest, 41, 5000).await;
}

/// Same length, one byte flipped in the second chunk: every read ends with
/// `DigestMismatch` naming both digests.
pub async fn altered_blob_is_refused(f: &Fresh) {
    let store = f.store.as_ref();
    let len = 3 * CHUNK_SIZE + 100;
    let info = put_pattern(store, 51, len as u64, CHUNK_SIZE).await;
    let mut altered = BytesMut::from(&pattern_bytes(51, 0, len)[..]);
    altered[CHUNK_SIZE + 7] ^= 0xff;
    let altered = altered.freeze();
    f.corrupt(&info.digest, altered.clone()).await;

    let items: Vec<_> = store.get(&info.digest).await.unwrap().collect().await;
    let (last, rest) = items.split_last().unwrap();
    assert!(
        rest.iter().all(Result::is_ok),
        "only the last item may fail: {rest:?}"
    );
    match last {
        Err(BlobError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, &info.digest);
            assert_eq!(actual, &Digest::of(&altered));
        }
        other => panic!("expected DigestMismatch last, got {other:?}"),
    }
    assert!(matches!(
        get_bytes(store, &info.digest).await,
        Err(BlobError::DigestMismatch { .. })
    ));
}

pub async fn truncated_blob_is_refused(f: &Fresh) {
    let store = f.store.as_ref();
    let info = put_pattern(store, 61, 1000, CHUNK_SIZE).await;
    f.corrupt(&info.digest, pattern_bytes(61, 0, 10)).await;
    assert!(matches!(
        get_bytes(store, &info.digest).await,
        Err(BlobError::DigestMismatch { .. })
    ));
}

pub async fn failed_input_stores_nothing(f: &Fresh) {
    let store = f.store.as_ref();
    let good = crate::bytes_stream(Bytes::from_static(b"partial"));
    match store.put(failing_stream(good, "client went away")).await {
        Err(BlobError::Input(m)) => assert_eq!(m, "client went away"),
        other => panic!("expected the input's error, got {other:?}"),
    }
    assert!(!store.exists(&Digest::of(b"partial")).await.unwrap());
    f.assert_no_leftovers("a failed put").await;
}

/// The input fails after more than two parts' worth: whatever the backend
/// had written or uploaded so far is gone.
pub async fn failed_input_after_parts_stores_nothing(f: &Fresh) {
    let store = f.store.as_ref();
    let len = 2 * PART_SIZE as u64 + 5;
    let good = pattern_stream(71, len, CHUNK_SIZE);
    match store.put(failing_stream(good, "cut off")).await {
        Err(BlobError::Input(m)) => assert_eq!(m, "cut off"),
        other => panic!("expected the input's error, got {other:?}"),
    }
    assert!(!store.exists(&pattern_digest(71, len)).await.unwrap());
    f.assert_no_leftovers("a failed multi-part put").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn patterns_do_not_depend_on_how_they_are_cut() {
        let whole = pattern_bytes(3, 0, 10_000);
        assert_eq!(pattern_bytes(3, 1234, 77), whole.slice(1234..1311));
        let pieces: Vec<Bytes> = pattern_stream(3, 10_000, 999)
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(pieces.iter().all(|p| p.len() <= 999));
        assert_eq!(pieces.concat(), whole.to_vec());
        assert_eq!(pattern_digest(3, 10_000), Digest::of(&whole));
        assert_ne!(pattern_bytes(4, 0, 64), whole.slice(0..64));
    }
}
