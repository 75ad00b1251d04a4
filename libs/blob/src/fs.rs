//! The local-filesystem blob store: `ROOT/sha256/ab/abcdef...`, written through
//! `ROOT/tmp` and renamed into place so a blob's final name only ever holds
//! complete, fsynced bytes.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

use crate::{BlobError, BlobInfo, BlobStore, ByteStream, CHUNK_SIZE, Digest};

#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BlobError {
    let path = path.to_path_buf();
    move |source| BlobError::Io { op, path, source }
}

impl FsBlobStore {
    /// Opens the store rooted at `root`, creating its directories if missing.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        for dir in [root.join("sha256"), root.join("tmp")] {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(io("create directory", &dir))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob named `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.as_str();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    fn temp_path(&self) -> PathBuf {
        self.root.join("tmp").join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ))
    }

    async fn write_temp(&self, tmp: &Path, mut data: ByteStream) -> Result<BlobInfo, BlobError> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .await
            .map_err(io("create", tmp))?;
        let mut out = BufWriter::with_capacity(CHUNK_SIZE, file);
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(io("write", tmp))?;
        }
        out.flush().await.map_err(io("write", tmp))?;
        out.into_inner()
            .sync_all()
            .await
            .map_err(io("fsync", tmp))?;
        Ok(BlobInfo {
            digest: Digest::from_hasher(hasher),
            size,
        })
    }
}

/// Removes the temp file unless the blob was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn fsync_dir(dir: &Path) -> Result<(), BlobError> {
    let f = tokio::fs::File::open(dir)
        .await
        .map_err(io("open directory", dir))?;
    f.sync_all().await.map_err(io("fsync directory", dir))
}

#[async_trait::async_trait]
impl BlobStore for FsBlobStore {
    async fn put(&self, data: ByteStream) -> Result<BlobInfo, BlobError> {
        let tmp = self.temp_path();
        let mut guard = TempFile(Some(tmp.clone()));
        let info = self.write_temp(&tmp, data).await?;
        let dest = self.blob_path(&info.digest);
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io("create directory", &dir))?;
        // Renaming over an existing copy is atomic and the bytes are the same:
        // this is what makes put idempotent and concurrent puts safe.
        tokio::fs::rename(&tmp, &dest)
            .await
            .map_err(io("rename into", &dest))?;
        guard.0 = None;
        fsync_dir(&dir).await?;
        Ok(info)
    }

    async fn get(&self, digest: &Digest) -> Result<ByteStream, BlobError> {
        let path = self.blob_path(digest);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(BlobError::NotFound {
                    digest: digest.clone(),
                });
            }
            Err(e) => return Err(io("open", &path)(e)),
        };
        let reader = Reader {
            file,
            path,
            hasher: sha2::Sha256::new(),
            expected: digest.clone(),
        };
        Ok(Box::pin(futures::stream::unfold(
            Some(reader),
            |reader| async move {
                let mut reader = reader?;
                match reader.next_chunk().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(reader))),
                    Ok(None) => {
                        let actual = Digest::from_hasher(reader.hasher);
                        if actual == reader.expected {
                            None
                        } else {
                            let expected = reader.expected;
                            Some((Err(BlobError::DigestMismatch { expected, actual }), None))
                        }
                    }
                    Err(e) => Some((Err(e), None)),
                }
            },
        )))
    }

    async fn exists(&self, digest: &Digest) -> Result<bool, BlobError> {
        let path = self.blob_path(digest);
        tokio::fs::try_exists(&path)
            .await
            .map_err(io("stat", &path))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        let path = self.blob_path(digest);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(BlobError::NotFound {
                digest: digest.clone(),
            }),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }
}

struct Reader {
    file: tokio::fs::File,
    path: PathBuf,
    hasher: sha2::Sha256,
    expected: Digest,
}

impl Reader {
    /// Reads up to `CHUNK_SIZE` bytes; `None` at end of file.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, BlobError> {
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut filled = 0;
        while filled < buf.len() {
            let n = self
                .file
                .read(&mut buf[filled..])
                .await
                .map_err(io("read", &self.path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(None);
        }
        buf.truncate(filled);
        self.hasher.update(&buf);
        Ok(Some(Bytes::from(buf)))
    }
}
