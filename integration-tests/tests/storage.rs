//! The federation on production storage: PostgreSQL for metadata, S3 for
//! models. Each test starts its own PostgreSQL cluster and S3 server.

use std::process::Stdio;
use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::servers::{PgCluster, S3Server};
use cohort_integration_tests::{
    Federation, Storage, assert_one_version_per_round, cohort_bin, digits_job, files_under,
    on_postgres, state_of,
};
use cohort_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_succeeds_on_postgres_and_s3_and_logs_no_password() {
    let (Some(pg), Some(s3)) = (PgCluster::start(), S3Server::start()) else {
        return;
    };
    let url = pg.create_database("cohort").expect("database");
    s3.create_bucket("models").expect("bucket");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(cohort_bin())
            .args([
                "demo",
                "--clients",
                "3",
                "--rounds",
                "10",
                "--json",
                "--blob-url",
                "s3://models/demo",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("COHORT_DATABASE_URL", &url)
            .envs(s3.env())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("demo finishes")
    .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stdout}\n{stderr}");
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON");
    assert_eq!(last["state"], "SUCCEEDED", "{last}");
    assert_eq!(last["rounds"], 10);

    // The models went to S3: one object per round under the prefix.
    let objects = files_under(&s3.object_path("models", "demo"));
    assert!(objects.len() >= 10, "models stored in S3: {objects:?}");
    // The metadata went to PostgreSQL, not to SQLite files.
    let sqlite_files: Vec<_> = files_under(dir.path())
        .into_iter()
        .filter(|p| p.ends_with(".db"))
        .collect();
    assert!(sqlite_files.is_empty(), "{sqlite_files:?}");

    // No secret in any log line or output.
    let mut text = format!("{stdout}{stderr}");
    for f in files_under(&dir.path().join("logs")) {
        text.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
    }
    assert!(
        !text.contains(pg.password()),
        "the database password leaked into a log"
    );
    assert!(
        !text.contains(&s3.secret_key),
        "the S3 secret leaked into a log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_mid_job_loses_nothing_recorded_before_it() {
    let Some((pg, fed)) = on_postgres(3).await else {
        return;
    };
    let job = fed
        .create_job(&digits_job("outage", 12, 3, 2, "60s"))
        .await
        .expect("create");
    let before = fed
        .wait_job(&job.id, Duration::from_secs(90), "round 3", |j| {
            j.rounds_completed >= 3
        })
        .await
        .expect("job progresses");
    let events_before = fed.events(&job.id).await.expect("events");
    let models = || fed.models();
    let versions_before = models()
        .list_versions(pb::ListVersionsRequest {
            name: String::new(),
            job_id: job.id.clone(),
            namespace: String::new(),
        })
        .await
        .expect("versions")
        .into_inner()
        .versions;

    pg.stop_server().expect("stop PostgreSQL");
    // While the database is down, requests fail as UNAVAILABLE (not a crash).
    let err = fed.get_job(&job.id).await.expect_err("no database");
    let status = err.downcast_ref::<tonic::Status>().expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_server().expect("start PostgreSQL again");

    let done = fed
        .wait_end(&job.id, Duration::from_secs(180))
        .await
        .expect("job ends");
    // The outage is shorter than every patience involved (the coordinator's storage and
    // scheduler patience, the services' pools): the job rides it out.
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.rounds_completed, 12);
    let rounds: Vec<u32> = done.rounds.iter().map(|r| r.round).collect();
    assert_eq!(rounds, (1..=12).collect::<Vec<_>>());
    assert_one_version_per_round(&fed.api(), &done, 12).await;
    // Everything recorded before the outage is still there.
    for r in &before.rounds {
        assert!(done.rounds.contains(r), "round {} survived", r.round);
    }
    let events_after = fed.events(&job.id).await.expect("events");
    assert_eq!(&events_after[..events_before.len()], &events_before[..]);
    let versions_after = models()
        .list_versions(pb::ListVersionsRequest {
            name: String::new(),
            job_id: job.id.clone(),
            namespace: String::new(),
        })
        .await
        .expect("versions")
        .into_inner()
        .versions;
    for v in &versions_before {
        assert!(versions_after.contains(v), "version {} survived", v.version);
    }
    // Services are all still up: the database outage crashed nothing.
    let pids_alive = fed
        .stack
        .pids()
        .iter()
        .all(|(_, pid)| cohort_runtime::process::pid_alive(*pid));
    assert!(pids_alive, "a service died during the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_altered_in_s3_is_refused_on_download() {
    let Some(s3) = S3Server::start() else {
        return;
    };
    s3.create_bucket("models").expect("bucket");
    let fed = Federation::start_with(
        2,
        Storage {
            blob_url: Some("s3://models/fed".into()),
            env: s3.env(),
            ..Storage::default()
        },
    )
    .await
    .expect("federation on S3");
    let job = fed
        .create_job(&digits_job("tamper", 2, 2, 2, "30s"))
        .await
        .expect("create");
    let done = fed
        .wait_end(&job.id, Duration::from_secs(90))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    let mut models = fed.models();
    let v = models
        .get_version(pb::GetVersionRequest {
            name: done.model_name.clone(),
            version: 2,
            namespace: done.namespace.clone(),
        })
        .await
        .expect("version")
        .into_inner();
    let object = files_under(&s3.object_path("models", "fed"))
        .into_iter()
        .find(|p| p.ends_with(&v.digest))
        .expect("the object is in the bucket");
    let mut bytes = std::fs::read(&object).expect("read object");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let root = s3.object_path("models", "");
    let key = object
        .strip_prefix(root.to_str().expect("path"))
        .expect("object under the bucket")
        .trim_start_matches('/')
        .to_string();
    s3.overwrite("models", &key, bytes)
        .await
        .expect("alter the object in S3");

    let mut stream = models
        .download(pb::GetVersionRequest {
            name: done.model_name.clone(),
            version: 2,
            namespace: done.namespace.clone(),
        })
        .await
        .expect("download starts")
        .into_inner();
    let mut refused = None;
    while let Some(item) = futures::StreamExt::next(&mut stream).await {
        if let Err(s) = item {
            refused = Some(s);
            break;
        }
    }
    let status = refused.expect("the altered object is refused");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains("digest") || status.message().contains("sha256"),
        "{status:?}"
    );
}
