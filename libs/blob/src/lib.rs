//! Content-addressed blob storage: the `BlobStore` trait (blobs named by the
//! sha256 of their bytes, streamed in and out, verified on every read), its
//! local-filesystem and S3 implementations, chosen by URL, and [`Measured`], the
//! decorator that records every store [`open_blob_store`] opens in Prometheus.
//!
//! Depends on cohort-core and cohort-metrics only; must not depend on gRPC, on the
//! metadata store, or on any service crate.

pub mod conformance;
mod fs;
mod measured;
mod s3;

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

pub use fs::FsBlobStore;
pub use measured::Measured;
pub use s3::{MAX_SINGLE_COPY, PART_SIZE, S3BlobStore, S3Options};

/// Largest chunk a `get` stream yields (and `bytes_stream` produces).
pub const CHUNK_SIZE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob sha256:{digest} not found")]
    NotFound { digest: Digest },
    /// The stored bytes no longer hash to their name: corruption on disk.
    #[error(
        "blob content does not match its digest: expected sha256:{expected}, read sha256:{actual}"
    )]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("invalid digest {value:?}: {reason}")]
    InvalidDigest { value: String, reason: &'static str },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unsupported blob store URL scheme {scheme:?} in {url:?}")]
    Unsupported { scheme: String, url: String },
    #[error("invalid blob store URL {url:?}: {message}")]
    InvalidUrl { url: String, message: String },
    /// The stream handed to `put` failed or was cut short by its producer.
    #[error("input stream failed: {0}")]
    Input(String),
    /// The remote store could not be reached or failed; a retry may work.
    /// `target` names bucket, key and endpoint.
    #[error("cannot {op} {target}: {message}")]
    Unavailable {
        op: &'static str,
        target: String,
        message: String,
    },
    #[error("blob is larger than this store's limit of {limit} bytes")]
    TooLarge { limit: u64 },
}

impl cohort_core::HasKind for BlobError {
    fn kind(&self) -> cohort_core::ErrorKind {
        use cohort_core::ErrorKind;
        match self {
            BlobError::NotFound { .. } => ErrorKind::NotFound,
            BlobError::DigestMismatch { .. } => ErrorKind::DataLoss,
            BlobError::InvalidDigest { .. }
            | BlobError::Unsupported { .. }
            | BlobError::InvalidUrl { .. }
            | BlobError::Input(_)
            | BlobError::TooLarge { .. } => ErrorKind::InvalidArgument,
            // The disk filled up, a mount went away, permissions changed: storage that may
            // heal, so callers retry (for a bounded time) rather than give up at once.
            BlobError::Io { .. } | BlobError::Unavailable { .. } => ErrorKind::Unavailable,
        }
    }
}

/// Hex sha256 (64 lowercase hex chars), validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, BlobError> {
        let invalid = |reason| BlobError::InvalidDigest {
            value: s.to_string(),
            reason,
        };
        if s.len() != 64 {
            return Err(invalid("expected 64 hex characters"));
        }
        if !s
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(invalid("expected lowercase hex characters only"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_hasher(sha2::Sha256::new_with_prefix(data))
    }

    pub(crate) fn from_hasher(hasher: sha2::Sha256) -> Self {
        use sha2::Digest as _;
        Digest(hex::encode(hasher.finalize()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = BlobError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
}

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, BlobError>> + Send>>;

#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Streams `data` into the store, hashing as it goes (never the whole blob
    /// in memory); returns digest and size. Idempotent: putting the same bytes
    /// twice is fine. If `data` yields an error, nothing is stored and that
    /// error is returned.
    async fn put(&self, data: ByteStream) -> Result<BlobInfo, BlobError>;

    /// Streams the blob back in chunks of at most `CHUNK_SIZE`. The sha256 is
    /// verified while reading: if the bytes do not hash to `digest`, the
    /// stream's last item is `Err(BlobError::DigestMismatch)` instead of a
    /// clean end, so a corrupted blob is never served silently.
    async fn get(&self, digest: &Digest) -> Result<ByteStream, BlobError>;

    async fn exists(&self, digest: &Digest) -> Result<bool, BlobError>;

    /// Removes the blob; `NotFound` if it is not there.
    async fn delete(&self, digest: &Digest) -> Result<(), BlobError>;
}

/// Collects a `get` fully, verifying the digest.
pub async fn get_bytes(store: &dyn BlobStore, digest: &Digest) -> Result<Bytes, BlobError> {
    let mut stream = store.get(digest).await?;
    let mut out = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out.freeze())
}

/// A stream of `b` in chunks of at most `CHUNK_SIZE` (no copies).
pub fn bytes_stream(b: Bytes) -> ByteStream {
    let chunks: Vec<Bytes> = (0..b.len())
        .step_by(CHUNK_SIZE)
        .map(|start| b.slice(start..(start + CHUNK_SIZE).min(b.len())))
        .collect();
    Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))
}

/// Opens a store from a URL: `file:///abs/path` or a plain path opens an
/// `FsBlobStore` rooted there (created if missing); `s3://bucket[/prefix]` an
/// `S3BlobStore` configured from the environment (see `S3Options::from_env`),
/// once the bucket has answered. Either is wrapped in [`Measured`] (backend `fs` or `s3`).
pub async fn open_blob_store(url: &str) -> Result<Arc<dyn BlobStore>, BlobError> {
    let invalid = |message: &str| BlobError::InvalidUrl {
        url: url.to_string(),
        message: message.to_string(),
    };
    if url.trim().is_empty() {
        return Err(invalid("empty URL"));
    }
    let path = match url.split_once("://") {
        None => PathBuf::from(url),
        Some(("file", rest)) => {
            // No host part: file:///abs/path only.
            if !rest.starts_with('/') {
                return Err(invalid("expected file:///absolute/path"));
            }
            PathBuf::from(rest)
        }
        Some(("s3", _)) => {
            let s3 = Arc::new(S3BlobStore::open(url).await?);
            return Ok(Arc::new(Measured::new(s3, "s3")));
        }
        Some((scheme, _)) => {
            return Err(BlobError::Unsupported {
                scheme: scheme.to_string(),
                url: url.to_string(),
            });
        }
    };
    let fs = Arc::new(FsBlobStore::open(path).await?);
    Ok(Arc::new(Measured::new(fs, "fs")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn digest_parse_validates() {
        let ok = "a".repeat(64);
        assert_eq!(Digest::parse(&ok).unwrap().as_str(), ok);
        assert!(matches!(
            Digest::parse(&"A".repeat(64)),
            Err(BlobError::InvalidDigest { .. })
        ));
        assert!(Digest::parse(&"a".repeat(63)).is_err());
        assert!(Digest::parse(&"g".repeat(64)).is_err());
        assert!(Digest::parse("").is_err());
    }

    #[test]
    fn digest_of_known_value() {
        assert_eq!(
            Digest::of(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn bytes_stream_chunks_at_most_chunk_size() {
        let data = Bytes::from(vec![7u8; CHUNK_SIZE * 2 + 5]);
        let chunks: Vec<Bytes> = bytes_stream(data.clone())
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert_eq!(
            chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
            vec![CHUNK_SIZE, CHUNK_SIZE, 5]
        );
        assert_eq!(chunks.concat(), data.to_vec());
        assert_eq!(bytes_stream(Bytes::new()).count().await, 0);
    }

    #[tokio::test]
    async fn open_blob_store_urls() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("a").display());
        open_blob_store(&url).await.unwrap();
        assert!(dir.path().join("a/sha256").is_dir());
        open_blob_store(dir.path().join("b").to_str().unwrap())
            .await
            .unwrap();
        assert!(dir.path().join("b/tmp").is_dir());
        match open_blob_store("gopher://bucket/prefix").await {
            Err(BlobError::Unsupported { scheme, .. }) => assert_eq!(scheme, "gopher"),
            other => panic!("expected Unsupported, got {:?}", other.err()),
        }
        assert!(matches!(
            open_blob_store("s3://Not_A_Bucket/x").await,
            Err(BlobError::InvalidUrl { .. })
        ));
        assert!(matches!(
            open_blob_store("file://relative/path").await,
            Err(BlobError::InvalidUrl { .. })
        ));
        assert!(matches!(
            open_blob_store("").await,
            Err(BlobError::InvalidUrl { .. })
        ));
    }
}
