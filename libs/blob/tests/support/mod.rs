//! What the S3 tests share: the test server from the environment, a bucket
//! per test, and the no-secret check.
#![allow(dead_code, clippy::unwrap_used)]

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use cohort_blob::S3Options;

/// The S3 server under test (`COHORT_TEST_S3_ENDPOINT`, credentials in
/// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`). None: the test reports
/// itself skipped, or fails under CI (`cohort_testkit`'s rule).
#[track_caller]
pub fn endpoint() -> Option<String> {
    cohort_testkit::require_env(
        "COHORT_TEST_S3_ENDPOINT",
        "an S3 server such as s3s-fs, credentials in AWS_ACCESS_KEY_ID / \
         AWS_SECRET_ACCESS_KEY; scripts/test.sh starts one",
    )
    .map(|e| e.trim().to_string())
}

/// Options for `endpoint`, the rest (region) from the environment.
pub fn options(endpoint: &str) -> S3Options {
    S3Options {
        endpoint: Some(endpoint.trim_end_matches('/').to_string()),
        ..S3Options::from_env().unwrap()
    }
}

/// Panics if a secret from the environment appears in `text`.
pub fn assert_no_secret(text: &str) {
    for var in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"] {
        if let Ok(secret) = std::env::var(var)
            && secret.len() >= 4
        {
            assert!(!text.contains(&secret), "{var} appears in: {text}");
        }
    }
}

/// A bucket of its own on the test server, emptied and removed on drop
/// (best effort).
pub struct TestBucket {
    pub name: String,
    options: S3Options,
}

impl TestBucket {
    pub async fn create(options: &S3Options) -> TestBucket {
        let client = options.sdk_client().await;
        let name = format!("cohort-t-{:016x}", rand::random::<u64>());
        let mut create = client.create_bucket().bucket(&name);
        if options.region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(options.region.as_str()))
                    .build(),
            );
        }
        create.send().await.unwrap_or_else(|e| {
            panic!(
                "create bucket {name} at {:?}: {}",
                options.endpoint,
                DisplayErrorContext(&e)
            )
        });
        TestBucket {
            name,
            options: options.clone(),
        }
    }

    async fn remove(options: &S3Options, bucket: &str) {
        let client = options.sdk_client().await;
        if let Ok(uploads) = client.list_multipart_uploads().bucket(bucket).send().await {
            for u in uploads.uploads() {
                let _ = client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(u.key().unwrap_or_default())
                    .upload_id(u.upload_id().unwrap_or_default())
                    .send()
                    .await;
            }
        }
        let mut pages = client
            .list_objects_v2()
            .bucket(bucket)
            .into_paginator()
            .send();
        while let Some(Ok(page)) = pages.next().await {
            for o in page.contents() {
                let _ = client
                    .delete_object()
                    .bucket(bucket)
                    .key(o.key().unwrap_or_default())
                    .send()
                    .await;
            }
        }
        let _ = client.delete_bucket().bucket(bucket).send().await;
    }
}

impl Drop for TestBucket {
    fn drop(&mut self) {
        let (options, bucket) = (self.options.clone(), self.name.clone());
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(Self::remove(&options, &bucket));
        })
        .join();
    }
}
