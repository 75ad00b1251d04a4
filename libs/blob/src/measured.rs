//! [`Measured`]: a `BlobStore` that forwards every call to another and records it in the
//! process's Prometheus registry. One decorator instead of code in each backend: bytes are
//! counted as they pass through the streams `put` takes and `get` returns, so what a backend
//! does inside (multipart uploads, temporary files) does not matter.
//!
//! - `cohort_blob_bytes_total{backend,direction=read|written}`
//! - `cohort_blob_operation_duration_seconds{backend,operation}`: a `get` lasts until its
//!   stream ends, fails or is dropped, so the figure is the whole read, not its first byte
//! - `cohort_blob_errors_total{backend,operation,kind}`: `kind` is the error's
//!   [`ErrorKind`](cohort_core::ErrorKind) name, so a missing blob (`not_found`) is told apart
//!   from an S3 endpoint that failed (`unavailable`) or a corrupted blob (`data_loss`)
//!
//! Labels are closed sets: two backends, four operations, two directions, the error kinds.

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use cohort_core::HasKind;
use cohort_metrics::{HistogramVec, IntCounterVec};
use futures::{Stream, StreamExt};

use crate::{BlobError, BlobInfo, BlobStore, ByteStream, Digest};

static BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    cohort_metrics::counter_vec(
        "blob_bytes_total",
        "Bytes read from and written to the blob store (counted as they stream).",
        &["backend", "direction"],
    )
});

static DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    cohort_metrics::histogram_vec(
        "blob_operation_duration_seconds",
        "Time of a blob store call; a get lasts until its stream ends.",
        &["backend", "operation"],
        cohort_metrics::DURATION_BUCKETS,
    )
});

static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    cohort_metrics::counter_vec(
        "blob_errors_total",
        "Blob store calls that failed, by the error's kind (S3 and disk failures are unavailable).",
        &["backend", "operation", "kind"],
    )
});

/// A `BlobStore` that measures the one it wraps; `backend` is the label (`fs`, `s3`).
pub struct Measured {
    inner: Arc<dyn BlobStore>,
    backend: &'static str,
}

impl Measured {
    pub fn new(inner: Arc<dyn BlobStore>, backend: &'static str) -> Self {
        // Touched once so the families show on /metrics before the first call.
        for direction in ["read", "written"] {
            BYTES.with_label_values(&[backend, direction]);
        }
        Self { inner, backend }
    }

    fn finish<T>(
        &self,
        operation: &'static str,
        start: Instant,
        result: Result<T, BlobError>,
    ) -> Result<T, BlobError> {
        observe(self.backend, operation, start);
        if let Err(e) = &result {
            count_error(self.backend, operation, e);
        }
        result
    }
}

fn observe(backend: &str, operation: &str, start: Instant) {
    DURATION
        .with_label_values(&[backend, operation])
        .observe(start.elapsed().as_secs_f64());
}

fn count_error(backend: &str, operation: &str, e: &BlobError) {
    ERRORS
        .with_label_values(&[backend, operation, e.kind().name()])
        .inc();
}

#[async_trait::async_trait]
impl BlobStore for Measured {
    async fn put(&self, data: ByteStream) -> Result<BlobInfo, BlobError> {
        let start = Instant::now();
        let written = BYTES.with_label_values(&[self.backend, "written"]);
        let counted = data.inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                written.inc_by(chunk.len() as u64);
            }
        });
        let result = self.inner.put(Box::pin(counted)).await;
        self.finish("put", start, result)
    }

    async fn get(&self, digest: &Digest) -> Result<ByteStream, BlobError> {
        let start = Instant::now();
        match self.inner.get(digest).await {
            Ok(stream) => Ok(Box::pin(MeasuredRead {
                inner: stream,
                backend: self.backend,
                start,
                ended: false,
            })),
            Err(e) => self.finish("get", start, Err(e)),
        }
    }

    async fn exists(&self, digest: &Digest) -> Result<bool, BlobError> {
        let start = Instant::now();
        let result = self.inner.exists(digest).await;
        self.finish("exists", start, result)
    }

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        let start = Instant::now();
        let result = self.inner.delete(digest).await;
        self.finish("delete", start, result)
    }
}

/// A `get` stream that counts its bytes and records the read's duration once: at its end,
/// its first error (a digest mismatch ends the stream), or when the reader drops it.
struct MeasuredRead {
    inner: ByteStream,
    backend: &'static str,
    start: Instant,
    ended: bool,
}

impl MeasuredRead {
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            observe(self.backend, "get", self.start);
        }
    }
}

impl Stream for MeasuredRead {
    type Item = Result<bytes::Bytes, BlobError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.as_mut().poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(chunk))) => {
                BYTES
                    .with_label_values(&[self.backend, "read"])
                    .inc_by(chunk.len() as u64);
            }
            Poll::Ready(Some(Err(e))) => {
                if !self.ended {
                    count_error(self.backend, "get", e);
                }
                self.end();
            }
            Poll::Ready(None) => self.end(),
            Poll::Pending => {}
        }
        item
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl Drop for MeasuredRead {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{FsBlobStore, bytes_stream, get_bytes};
    use bytes::Bytes;

    fn bytes(backend: &str, direction: &str) -> u64 {
        BYTES.with_label_values(&[backend, direction]).get()
    }

    fn calls(backend: &str, operation: &str) -> u64 {
        DURATION
            .with_label_values(&[backend, operation])
            .get_sample_count()
    }

    fn errors(backend: &str, operation: &str, kind: &str) -> u64 {
        ERRORS.with_label_values(&[backend, operation, kind]).get()
    }

    // Each test uses its own backend label: the registry is the process's, shared by tests.
    #[tokio::test]
    async fn calls_bytes_and_errors_are_counted_with_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(dir.path()).await.unwrap());
        let store = Measured::new(fs.clone(), "test-a");
        let data = Bytes::from(vec![5u8; crate::CHUNK_SIZE + 100]);

        let info = store.put(bytes_stream(data.clone())).await.unwrap();
        assert_eq!(bytes("test-a", "written"), data.len() as u64);
        assert_eq!(calls("test-a", "put"), 1);

        assert_eq!(get_bytes(&store, &info.digest).await.unwrap(), data);
        assert_eq!(bytes("test-a", "read"), data.len() as u64);
        assert_eq!(calls("test-a", "get"), 1, "one read, observed once");

        assert!(store.exists(&info.digest).await.unwrap());
        store.delete(&info.digest).await.unwrap();
        assert_eq!(calls("test-a", "exists"), 1);
        assert_eq!(calls("test-a", "delete"), 1);
        assert_eq!(errors("test-a", "delete", "not_found"), 0);

        assert!(store.delete(&info.digest).await.is_err());
        assert!(store.get(&info.digest).await.is_err());
        assert_eq!(errors("test-a", "delete", "not_found"), 1);
        assert_eq!(errors("test-a", "get", "not_found"), 1);
        assert_eq!(calls("test-a", "get"), 2);
    }

    #[tokio::test]
    async fn a_corrupted_read_is_a_data_loss_error_and_a_dropped_read_is_timed() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(FsBlobStore::open(dir.path()).await.unwrap());
        let store = Measured::new(fs.clone(), "test-b");
        let info = store
            .put(bytes_stream(Bytes::from_static(b"original")))
            .await
            .unwrap();
        tokio::fs::write(fs.blob_path(&info.digest), b"tampered")
            .await
            .unwrap();
        assert!(get_bytes(&store, &info.digest).await.is_err());
        assert_eq!(errors("test-b", "get", "data_loss"), 1);
        assert_eq!(calls("test-b", "get"), 1);

        let stream = store.get(&info.digest).await.unwrap();
        assert_eq!(
            calls("test-b", "get"),
            1,
            "not observed before the read ends"
        );
        drop(stream);
        assert_eq!(calls("test-b", "get"), 2);
        assert_eq!(errors("test-b", "get", "data_loss"), 1);
    }

    #[tokio::test]
    async fn a_failed_input_is_counted_as_the_put_error() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(dir.path()).await.unwrap());
        let store = Measured::new(fs, "test-c");
        let failing: ByteStream = Box::pin(futures::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(BlobError::Input("cut".into())),
        ]));
        assert!(store.put(failing).await.is_err());
        assert_eq!(errors("test-c", "put", "invalid_argument"), 1);
        assert_eq!(bytes("test-c", "written"), 3);
    }
}
