//! S3 (AWS, MinIO or any S3-compatible server) as a blob store.
//!
//! Layout: `<prefix>/sha256/<ab>/<digest>`, as on the filesystem. The digest
//! is known only after the last byte, so `put` streams into a multipart
//! upload under `<prefix>/tmp/<random>` (one part in memory at a time,
//! hashed as it passes), then copies that object to its final key on the
//! server and deletes it. A blob that fits in one part is known whole before
//! anything is sent and goes straight to its final key with one PutObject
//! (atomic on S3). `get` streams the object back and verifies its sha256.
//!
//! A put that fails or is cancelled aborts its upload and deletes its
//! temporary object (best effort: a crash can still leave some behind, so a
//! bucket lifecycle rule expiring `<prefix>/tmp/` and incomplete multipart
//! uploads after a day is advisable on real S3).

use std::fmt;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use sha2::Digest as _;

use crate::{BlobError, BlobInfo, BlobStore, ByteStream, CHUNK_SIZE, Digest};

/// Multipart part size: above S3's 5 MiB minimum, small enough to hold in
/// memory. A put holds about one part (plus one input chunk) at a time.
pub const PART_SIZE: usize = 8 << 20;

/// S3 allows at most this many parts per multipart upload, so the largest
/// blob is `MAX_PARTS * PART_SIZE` (about 78 GiB).
const MAX_PARTS: u64 = 10_000;

/// The largest object one CopyObject may copy.
pub const MAX_SINGLE_COPY: u64 = 5 << 30;

/// Smallest part S3 accepts (all but the last part).
const MIN_PART: u64 = 5 << 20;

/// Parts copied at once in a multipart copy (server-side work, no memory).
const COPY_CONCURRENCY: usize = 4;

/// How an `S3BlobStore` reaches its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    /// Custom endpoint (MinIO, a test server), e.g. `http://127.0.0.1:9000`;
    /// `None` for AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`); `None`: on with a custom
    /// endpoint (few of them serve virtual hosts), off for AWS.
    pub path_style: Option<bool>,
    /// Objects up to this size are copied with one CopyObject, larger ones by
    /// multipart copy. S3's own limit is the default; lower it for servers
    /// with a smaller one (or to exercise the multipart copy in tests).
    pub single_copy_limit: u64,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".to_string(),
            path_style: None,
            single_copy_limit: MAX_SINGLE_COPY,
        }
    }
}

impl S3Options {
    /// From the environment: `COHORT_S3_ENDPOINT` (else `AWS_ENDPOINT_URL`),
    /// `AWS_REGION` (default us-east-1), `COHORT_S3_PATH_STYLE` (true/false).
    /// Credentials are not read here: the AWS chain finds them.
    pub fn from_env() -> Result<Self, BlobError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As `from_env`, with variables looked up by `var`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, BlobError> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let invalid = |name: &str, message: &str| BlobError::InvalidUrl {
            url: name.to_string(),
            message: message.to_string(),
        };
        let (endpoint_var, endpoint) = match var("COHORT_S3_ENDPOINT") {
            Some(e) => ("COHORT_S3_ENDPOINT", Some(e)),
            None => ("AWS_ENDPOINT_URL", var("AWS_ENDPOINT_URL")),
        };
        if let Some(e) = &endpoint {
            let Some((scheme, authority)) = e.split_once("://") else {
                return Err(invalid(
                    endpoint_var,
                    "expected http://host:port or https://...",
                ));
            };
            if scheme != "http" && scheme != "https" {
                return Err(invalid(endpoint_var, "expected an http:// or https:// URL"));
            }
            // Never echo it: a user:password@ part would be a secret.
            if authority.split('/').next().is_some_and(|a| a.contains('@')) {
                return Err(invalid(
                    endpoint_var,
                    "credentials belong in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, not in the endpoint URL",
                ));
            }
        }
        let path_style = match var("COHORT_S3_PATH_STYLE").as_deref().map(str::trim) {
            None => None,
            Some("true" | "1" | "yes" | "on") => Some(true),
            Some("false" | "0" | "no" | "off") => Some(false),
            Some(_) => {
                return Err(invalid("COHORT_S3_PATH_STYLE", "expected true or false"));
            }
        };
        Ok(Self {
            endpoint: endpoint.map(|e| e.trim_end_matches('/').to_string()),
            region: var("AWS_REGION").unwrap_or_else(|| "us-east-1".to_string()),
            path_style,
            single_copy_limit: MAX_SINGLE_COPY,
        })
    }

    /// An SDK client for these options, credentials from the AWS chain
    /// (environment, profile, web identity, container or instance role).
    pub async fn sdk_client(&self) -> Client {
        // The SDK's HTTPS client names its rustls crypto provider itself
        // (`builder_with_provider`), so it does not need a process default.
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(self.region.clone()));
        if let Some(ep) = &self.endpoint {
            loader = loader.endpoint_url(ep);
        }
        let shared = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(self.path_style.unwrap_or(self.endpoint.is_some()))
            .build();
        Client::from_conf(config)
    }

    /// The endpoint as errors name it.
    fn endpoint_name(&self) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => format!("AWS S3 ({})", self.region),
        }
    }
}

#[derive(Clone)]
pub struct S3BlobStore {
    client: Client,
    bucket: String,
    /// Without leading or trailing '/'; may be empty.
    prefix: String,
    endpoint: String,
    single_copy_limit: u64,
}

impl fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the client: its config holds the credentials.
        f.debug_struct("S3BlobStore")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3BlobStore {
    /// Opens `s3://bucket[/prefix]` with options from the environment
    /// (`S3Options::from_env`).
    pub async fn open(url: &str) -> Result<Self, BlobError> {
        parse_url(url)?; // a bad URL is the first thing to report
        Self::open_with(url, S3Options::from_env()?).await
    }

    /// Opens `s3://bucket[/prefix]`; fails unless the bucket is reachable
    /// (HeadBucket), naming bucket and endpoint.
    pub async fn open_with(url: &str, options: S3Options) -> Result<Self, BlobError> {
        let (bucket, prefix) = parse_url(url)?;
        let client = options.sdk_client().await;
        let endpoint = options.endpoint_name();
        let target = format!("bucket {bucket:?} at {endpoint}");
        if let Err(e) = client.head_bucket().bucket(&bucket).send().await {
            let message = match e.raw_response().map(|r| r.status().as_u16()) {
                Some(404) => "the bucket does not exist".to_string(),
                Some(403) => {
                    "access denied: check the credentials and the bucket's policy".to_string()
                }
                Some(301) => "the bucket is in another region: set AWS_REGION".to_string(),
                _ => describe(&e),
            };
            return Err(BlobError::Unavailable {
                op: "open",
                target,
                message,
            });
        }
        Ok(Self {
            client,
            bucket,
            prefix,
            endpoint,
            single_copy_limit: options.single_copy_limit.clamp(MIN_PART, MAX_SINGLE_COPY),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix, without slashes at either end; empty for none.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The SDK client the store uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The key of the blob named `digest` (whether or not it exists).
    pub fn object_key(&self, digest: &Digest) -> String {
        let d = digest.as_str();
        self.with_prefix(&format!("sha256/{}/{d}", &d[..2]))
    }

    /// Where puts keep their temporary objects, ending in '/'.
    pub fn temp_prefix(&self) -> String {
        self.with_prefix("tmp/")
    }

    fn with_prefix(&self, tail: &str) -> String {
        if self.prefix.is_empty() {
            tail.to_string()
        } else {
            format!("{}/{tail}", self.prefix)
        }
    }

    fn target(&self, key: &str) -> String {
        format!("s3://{}/{key} at {}", self.bucket, self.endpoint)
    }

    fn unavailable<E>(
        &self,
        op: &'static str,
        key: &str,
        e: &SdkError<E, HttpResponse>,
    ) -> BlobError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        BlobError::Unavailable {
            op,
            target: self.target(key),
            message: describe(e),
        }
    }

    /// Whether `key` holds an object of `size` bytes. One of another size is
    /// a damaged copy: treated as absent so the put replaces it.
    async fn holds(&self, key: &str, size: u64) -> Result<bool, BlobError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(head.content_length().and_then(|l| u64::try_from(l).ok()) == Some(size)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(self.unavailable("check", key, &e)),
        }
    }

    async fn start_upload(&self, key: &str) -> Result<String, BlobError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.unavailable("start upload of", key, &e))?;
        created
            .upload_id()
            .map(str::to_string)
            .ok_or_else(|| BlobError::Unavailable {
                op: "start upload of",
                target: self.target(key),
                message: "the server returned no upload id".to_string(),
            })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<CompletedPart, BlobError> {
        let part = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(S3Body::from(body))
            .send()
            .await
            .map_err(|e| self.unavailable("upload part of", key, &e))?;
        Ok(CompletedPart::builder()
            .set_e_tag(part.e_tag().map(str::to_string))
            .part_number(number)
            .build())
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<(), BlobError> {
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.unavailable("finish upload of", key, &e))?;
        Ok(())
    }

    /// Server-side copy of `from` (`size` bytes) to `to`.
    async fn copy(&self, from: &str, to: &str, size: u64) -> Result<(), BlobError> {
        // Keys are made of [A-Za-z0-9._/-] only: no URL encoding needed.
        let source = format!("{}/{from}", self.bucket);
        if size <= self.single_copy_limit {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(to)
                .copy_source(source)
                .send()
                .await
                .map_err(|e| self.unavailable("copy into", to, &e))?;
            return Ok(());
        }
        let part_size = self.single_copy_limit.max(size.div_ceil(MAX_PARTS));
        let upload_id = self.start_upload(to).await?;
        let mut cleanup = Cleanup::new(self);
        cleanup.upload = Some((to.to_string(), upload_id.clone()));
        let ranges = (0..size.div_ceil(part_size)).map(|i| {
            let start = i * part_size;
            let end = (start + part_size).min(size) - 1;
            (i as i32 + 1, start, end)
        });
        let copied: Result<Vec<CompletedPart>, BlobError> = futures::stream::iter(ranges)
            .map(|(number, start, end)| {
                let (source, upload_id) = (&source, &upload_id);
                async move {
                    let out = self
                        .client
                        .upload_part_copy()
                        .bucket(&self.bucket)
                        .key(to)
                        .upload_id(upload_id)
                        .part_number(number)
                        .copy_source(source)
                        .copy_source_range(format!("bytes={start}-{end}"))
                        .send()
                        .await
                        .map_err(|e| self.unavailable("copy part into", to, &e))?;
                    Ok(CompletedPart::builder()
                        .set_e_tag(
                            out.copy_part_result()
                                .and_then(|r| r.e_tag())
                                .map(str::to_string),
                        )
                        .part_number(number)
                        .build())
                }
            })
            .buffered(COPY_CONCURRENCY)
            .try_collect()
            .await;
        let result = match copied {
            Ok(parts) => self.complete_upload(to, &upload_id, parts).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => cleanup.upload = None,
            Err(_) => cleanup.run().await,
        }
        result
    }

    /// The streaming part of `put`: reads `data` into the temporary upload
    /// that `cleanup` tracks, then stores the blob under its digest.
    async fn put_inner(
        &self,
        mut data: ByteStream,
        cleanup: &mut Cleanup,
    ) -> Result<BlobInfo, BlobError> {
        let temp_key = format!("{}{:032x}", self.temp_prefix(), rand::random::<u128>());
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        let mut buf = BytesMut::new();
        let mut parts: Vec<CompletedPart> = Vec::new();
        let mut upload_id: Option<String> = None;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if buf.capacity() == 0 {
                buf.reserve(PART_SIZE + CHUNK_SIZE);
            }
            buf.extend_from_slice(&chunk);
            // Strictly more than a part: a blob of exactly one part stays a PutObject.
            while buf.len() > PART_SIZE {
                if parts.len() as u64 + 1 >= MAX_PARTS {
                    return Err(BlobError::TooLarge {
                        limit: MAX_PARTS * PART_SIZE as u64,
                    });
                }
                let id = match &upload_id {
                    Some(id) => id.clone(),
                    None => {
                        let id = self.start_upload(&temp_key).await?;
                        cleanup.upload = Some((temp_key.clone(), id.clone()));
                        upload_id.insert(id).clone()
                    }
                };
                let part = buf.split_to(PART_SIZE).freeze();
                let number = parts.len() as i32 + 1;
                parts.push(self.upload_part(&temp_key, &id, number, part).await?);
            }
        }
        let digest = Digest::from_hasher(hasher);
        let key = self.object_key(&digest);
        let Some(upload_id) = upload_id else {
            // The whole blob is in `buf`: one PutObject, straight to its name.
            if !self.holds(&key, size).await? {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .body(S3Body::from(buf.freeze()))
                    .send()
                    .await
                    .map_err(|e| self.unavailable("put", &key, &e))?;
            }
            return Ok(BlobInfo { digest, size });
        };
        if self.holds(&key, size).await? {
            // Stored already: the upload is not needed (`put` aborts it).
            return Ok(BlobInfo { digest, size });
        }
        let number = parts.len() as i32 + 1;
        parts.push(
            self.upload_part(&temp_key, &upload_id, number, buf.freeze())
                .await?,
        );
        self.complete_upload(&temp_key, &upload_id, parts).await?;
        cleanup.upload = None;
        cleanup.object = Some(temp_key.clone());
        self.copy(&temp_key, &key, size).await?;
        Ok(BlobInfo { digest, size })
    }
}

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;

/// Checks an `s3://bucket[/prefix]` URL; returns bucket and prefix.
fn parse_url(url: &str) -> Result<(String, String), BlobError> {
    let invalid = |message: String| BlobError::InvalidUrl {
        url: url.to_string(),
        message,
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| invalid("expected s3://bucket/prefix".into()))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some(reason) = bucket_name_problem(bucket) {
        return Err(invalid(format!("bucket name {bucket:?} {reason}")));
    }
    let prefix = prefix.trim_matches('/');
    for segment in prefix.split('/').filter(|_| !prefix.is_empty()) {
        let ok = !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
        if !ok {
            return Err(invalid(format!(
                "prefix {prefix:?}: segments must be non-empty, not . or .., and use only \
                 letters, digits, '-', '_' or '.'"
            )));
        }
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Why `b` is not a valid S3 bucket name, if it is not.
fn bucket_name_problem(b: &str) -> Option<&'static str> {
    if !(3..=63).contains(&b.len()) {
        return Some("must be 3 to 63 characters long");
    }
    if !b
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
    {
        return Some("may hold only lowercase letters, digits, '-' and '.'");
    }
    let bytes = b.as_bytes();
    if !bytes[0].is_ascii_alphanumeric() || !bytes[b.len() - 1].is_ascii_alphanumeric() {
        return Some("must begin and end with a letter or digit");
    }
    if b.contains("..") {
        return Some("may not hold two adjacent periods");
    }
    if b.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some("may not be an IP address");
    }
    None
}

/// An SDK error in one line: the service's code and message, or the cause
/// chain of a transport failure. It holds no credentials.
fn describe<E>(e: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let SdkError::ServiceError(service) = e {
        let status = service.raw().status().as_u16();
        let code = e.code().unwrap_or("error");
        return match e.message() {
            Some(m) => format!("{code} (HTTP {status}): {m}"),
            None => format!("{code} (HTTP {status})"),
        };
    }
    error_chain(e)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        // Wrappers often repeat their cause.
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

/// What a put left on the server that must go if it does not finish: an
/// open multipart upload and/or a temporary object. Removed by `run`, or,
/// if the put is dropped mid-way (a cancelled request), by a spawned task.
struct Cleanup {
    client: Client,
    bucket: String,
    /// (key, upload id)
    upload: Option<(String, String)>,
    object: Option<String>,
}

impl Cleanup {
    fn new(store: &S3BlobStore) -> Self {
        Self {
            client: store.client.clone(),
            bucket: store.bucket.clone(),
            upload: None,
            object: None,
        }
    }

    /// Best effort: a failure is logged (by key), not returned, since the
    /// caller is already reporting the error that matters.
    async fn run(&mut self) {
        if let Some((key, upload_id)) = self.upload.take() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&key)
                .upload_id(upload_id)
                .send()
                .await;
            if let Err(e) = aborted {
                tracing::warn!(bucket = %self.bucket, %key, error = %describe(&e), "cannot abort multipart upload");
            }
        }
        if let Some(key) = self.object.take() {
            let deleted = self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await;
            if let Err(e) = deleted {
                tracing::warn!(bucket = %self.bucket, %key, error = %describe(&e), "cannot delete temporary object");
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.upload.is_none() && self.object.is_none() {
            return;
        }
        let mut rest = Cleanup {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            upload: self.upload.take(),
            object: self.object.take(),
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { rest.run().await });
        }
    }
}

#[async_trait::async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, data: ByteStream) -> Result<BlobInfo, BlobError> {
        let mut cleanup = Cleanup::new(self);
        let result = self.put_inner(data, &mut cleanup).await;
        // Success or not, the temporary upload and object have served.
        cleanup.run().await;
        result
    }

    async fn get(&self, digest: &Digest) -> Result<ByteStream, BlobError> {
        let key = self.object_key(digest);
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    BlobError::NotFound {
                        digest: digest.clone(),
                    }
                } else {
                    self.unavailable("get", &key, &e)
                }
            })?;
        let download = Download {
            body: object.body,
            carry: Bytes::new(),
            pending: BytesMut::new(),
            hasher: sha2::Sha256::new(),
            expected: digest.clone(),
            target: self.target(&key),
        };
        Ok(Box::pin(futures::stream::unfold(
            Some(download),
            |download| async move {
                let mut d = download?;
                match d.next_chunk().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(d))),
                    Ok(None) => {
                        let actual = Digest::from_hasher(d.hasher);
                        if actual == d.expected {
                            None
                        } else {
                            let expected = d.expected;
                            Some((Err(BlobError::DigestMismatch { expected, actual }), None))
                        }
                    }
                    Err(e) => Some((Err(e), None)),
                }
            },
        )))
    }

    async fn exists(&self, digest: &Digest) -> Result<bool, BlobError> {
        let key = self.object_key(digest);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(self.unavailable("check", &key, &e)),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<(), BlobError> {
        // S3 deletes missing keys without complaint; the trait wants NotFound.
        if !self.exists(digest).await? {
            return Err(BlobError::NotFound {
                digest: digest.clone(),
            });
        }
        let key = self.object_key(digest);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.unavailable("delete", &key, &e))?;
        Ok(())
    }
}

/// A `get` in progress: the SDK's body, re-cut into chunks of `CHUNK_SIZE`
/// (the last may be shorter), hashed as it passes.
struct Download {
    body: S3Body,
    /// What is left of the body's last piece.
    carry: Bytes,
    pending: BytesMut,
    hasher: sha2::Sha256,
    expected: Digest,
    target: String,
}

impl Download {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, BlobError> {
        loop {
            if self.carry.is_empty() {
                match self.body.next().await {
                    Some(Ok(piece)) => {
                        self.hasher.update(&piece);
                        self.carry = piece;
                        continue;
                    }
                    Some(Err(e)) => {
                        return Err(BlobError::Unavailable {
                            op: "read",
                            target: self.target.clone(),
                            message: error_chain(&e),
                        });
                    }
                    None if self.pending.is_empty() => return Ok(None),
                    None => return Ok(Some(self.pending.split().freeze())),
                }
            }
            if self.pending.capacity() == 0 {
                self.pending.reserve(CHUNK_SIZE);
            }
            let room = CHUNK_SIZE - self.pending.len();
            let piece = self.carry.split_to(room.min(self.carry.len()));
            self.pending.extend_from_slice(&piece);
            if self.pending.len() == CHUNK_SIZE {
                return Ok(Some(self.pending.split().freeze()));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_bucket_and_prefix() {
        let ok = |url: &str| parse_url(url).unwrap();
        assert_eq!(ok("s3://my-bucket"), ("my-bucket".into(), "".into()));
        assert_eq!(ok("s3://my-bucket/"), ("my-bucket".into(), "".into()));
        assert_eq!(
            ok("s3://my.bucket/a/b_c/"),
            ("my.bucket".into(), "a/b_c".into())
        );
        for bad in [
            "s3://",
            "s3://ab",
            "s3://Bucket",
            "s3://-bucket",
            "s3://bucket-",
            "s3://a..b",
            "s3://192.168.1.1",
            "s3://under_score",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "s3://bucket/a b",
            "s3://bucket/a?b",
            "file:///x",
        ] {
            assert!(
                matches!(parse_url(bad), Err(BlobError::InvalidUrl { .. })),
                "{bad} should be refused"
            );
        }
        let message = parse_url("s3://Bad_Bucket").unwrap_err().to_string();
        assert!(message.contains("Bad_Bucket"), "{message}");
    }

    #[test]
    fn options_from_variables() {
        let from = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            S3Options::from_lookup(move |name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
        };
        assert_eq!(from(&[]).unwrap(), S3Options::default());
        let o = from(&[
            ("COHORT_S3_ENDPOINT", "http://127.0.0.1:9000/"),
            ("AWS_ENDPOINT_URL", "http://other:1"),
            ("AWS_REGION", "eu-west-1"),
        ])
        .unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(o.region, "eu-west-1");
        assert_eq!(o.path_style, None);
        let o = from(&[
            ("AWS_ENDPOINT_URL", "https://s3.example"),
            ("COHORT_S3_PATH_STYLE", "false"),
        ])
        .unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("https://s3.example"));
        assert_eq!(o.path_style, Some(false));
        assert!(from(&[("COHORT_S3_PATH_STYLE", "maybe")]).is_err());
        assert!(from(&[("COHORT_S3_ENDPOINT", "127.0.0.1:9000")]).is_err());
        let e = from(&[("COHORT_S3_ENDPOINT", "http://key:hunter2@127.0.0.1:9000")])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn error_chains_skip_repeats() {
        let inner = std::io::Error::other("connection refused");
        let outer = std::io::Error::other(inner);
        assert_eq!(error_chain(&outer), "connection refused");
    }
}
