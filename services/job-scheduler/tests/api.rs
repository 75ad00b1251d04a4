//! job-scheduler's API over real gRPC on loopback: the real binary, a SQLite
//! store, and a stand-in coordinator (a shell script) that either waits for
//! its parent to go or fails the way a real one does, with an error line.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cohort_proto::v1 as pb;
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::jobs_client::JobsClient;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Fails a job named "crash" like a coordinator whose model cannot be loaded;
/// any other waits until job-scheduler is gone.
const COORDINATOR: &str = r#"#!/bin/sh
if grep -q '"name":"crash"' "$2"; then
  echo '2026-12-06T10:00:00.000001Z  INFO cohort_coordinator: starting'
  echo '2026-12-06T10:00:00.000002Z  WARN cohort_coordinator: a warning before the error'
  echo 'error: model.init: tensor "fc0.weight" has shape [64, 64], the spec needs [32, 64]' >&2
  exit 3
fi
while kill -0 "$PPID" 2>/dev/null; do sleep 0.2; done
"#;

/// A job-scheduler process, killed on drop.
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_coordinator(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("coordinator.sh");
    std::fs::write(&bin, COORDINATOR).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn job_scheduler(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_job-scheduler"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .arg("--ready-file")
        .arg(dir.join("ready"))
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.join("jobs.db").display()))
        .args(["--model-manager", "127.0.0.1:1"])
        .args(["--client-selector", "127.0.0.1:1"])
        .arg("--coordinator-bin")
        .arg(write_coordinator(dir))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .args(extra)
        .env_remove("COHORT_DATABASE_URL")
        .stdin(Stdio::null());
    cmd
}

/// Starts job-scheduler and waits (30 s at most) until it serves.
async fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("job-scheduler.log")).unwrap();
    let child = job_scheduler(dir.path(), extra)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        addr: String::new(),
        _dir: dir,
    };
    let ready = server._dir.path().join("ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(addr) = std::fs::read_to_string(&ready)
            && !addr.is_empty()
        {
            server.addr = addr.trim().to_string();
            return server;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("job-scheduler ended at start ({status}): {}", server.log());
        }
        assert!(
            Instant::now() < deadline,
            "job-scheduler not serving within 30 s: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("job-scheduler.log")).unwrap_or_default()
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn jobs(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel().await)
    }

    async fn control(&self) -> JobControlClient<Channel> {
        JobControlClient::new(self.channel().await)
    }
}

/// `msg` as the proxy forwards it for a token of `namespace` and `role`.
fn as_token<T>(msg: T, namespace: &str, role: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        cohort_proto::NAMESPACE_METADATA_KEY,
        namespace.parse().unwrap(),
    );
    req.metadata_mut()
        .insert(cohort_proto::ROLE_METADATA_KEY, role.parse().unwrap());
    req
}

fn spec(name: &str, model: &str, rounds: u32) -> String {
    format!(
        "name: {name}\nmodel: {model}\ndata: {{dataset: digits}}\nrounds: {rounds}\n\
         clients: {{per_round: 2, min: 2}}\n"
    )
}

async fn create(jobs: &mut JobsClient<Channel>, spec: String) -> pb::Job {
    jobs.create_job(pb::CreateJobRequest { spec })
        .await
        .unwrap()
        .into_inner()
}

/// Polls the job until `done` holds, for at most `within`.
async fn wait_for(
    jobs: &mut JobsClient<Channel>,
    id: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let deadline = Instant::now() + within;
    loop {
        let job = jobs
            .get_job(pb::GetJobRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached within {within:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events(jobs: &mut JobsClient<Channel>, id: &str, after_seq: u64) -> Vec<pb::JobEvent> {
    jobs.list_job_events(pb::ListJobEventsRequest {
        id: id.into(),
        after_seq,
    })
    .await
    .unwrap()
    .into_inner()
    .events
}

fn note(kind: &str, round: u32, party: &str, message: &str) -> pb::EventNote {
    pb::EventNote {
        kind: kind.into(),
        round,
        party: party.into(),
        task_id: format!("job-r{round}-0a1b2c3d"),
        message: message.into(),
    }
}

async fn record(
    control: &mut JobControlClient<Channel>,
    job_id: &str,
    events: Vec<pb::EventNote>,
) -> Result<u32, tonic::Status> {
    control
        .record_events(pb::RecordEventsRequest {
            job_id: job_id.into(),
            events,
        })
        .await
        .map(|r| r.into_inner().recorded)
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str) -> String {
    match r {
        Err(s) if s.code() == Code::InvalidArgument => {
            assert!(
                s.message().starts_with(field),
                "names {field}: {}",
                s.message()
            );
            s.message().to_string()
        }
        other => panic!("expected INVALID_ARGUMENT naming {field}, got {other:?}"),
    }
}

#[tokio::test]
async fn record_events_are_bounded_and_listed_after_seq() {
    let server = start(&["--max-job-log-entries", "600"]).await;
    let (mut jobs, mut control) = (server.jobs().await, server.control().await);
    let job = create(&mut jobs, spec("logged", "{arch: logreg}", 3)).await;
    let id = job.id.as_str();

    // Refused whole, at the edge, naming what is wrong.
    let many: Vec<_> = (0..101)
        .map(|i| note("note", 0, "", &format!("n{i}")))
        .collect();
    let m = assert_invalid(record(&mut control, id, many).await, "events:");
    assert!(m.contains("100"), "{m}");
    for (bad, field) in [
        (note("exploded", 1, "p1", "x"), "events[1].kind"),
        (note("task_failed", 4, "p1", "x"), "events[1].round"),
        (note("task_failed", 1, "bad party!", "x"), "events[1].party"),
        (
            pb::EventNote {
                task_id: "t/../../x".into(),
                ..note("task_failed", 1, "p1", "x")
            },
            "events[1].task_id",
        ),
    ] {
        let events = vec![note("note", 0, "", "fine"), bad];
        assert_invalid(record(&mut control, id, events).await, field);
    }
    match record(&mut control, "no-such-job", vec![note("note", 0, "", "x")]).await {
        Err(s) => assert_eq!(s.code(), Code::NotFound, "{s:?}"),
        Ok(n) => panic!("recorded {n} for a missing job"),
    }
    let before = events(&mut jobs, id, 0).await;
    assert!(
        before.iter().all(|e| e.kind.is_empty()),
        "nothing refused was stored: {before:?}"
    );

    // A long message is cut to 1000 characters on a character boundary.
    let long = format!("{}\0tail", "é".repeat(1500));
    let recorded = record(
        &mut control,
        id,
        vec![note("task_failed", 2, "hospital-a", &long)],
    )
    .await
    .unwrap();
    assert_eq!(recorded, 1);
    let all = events(&mut jobs, id, 0).await;
    let failed = all.iter().find(|e| e.kind == "task_failed").unwrap();
    assert_eq!(failed.reason, "é".repeat(1000));
    assert_eq!(
        (failed.round, failed.party.as_str(), failed.task_id.as_str()),
        (2, "hospital-a", "job-r2-0a1b2c3d")
    );
    assert_eq!(failed.from, failed.to, "an entry is no state change");
    assert_ne!(failed.to, pb::JobState::Unspecified as i32);

    // The job's bound (600): the call that reaches it stores what fits, the next none.
    let batch = |call: u32| -> Vec<pb::EventNote> {
        (0..100)
            .map(|i| note("update_refused", 1, "p1", &format!("call {call} entry {i}")))
            .collect()
    };
    let mut stored = Vec::new();
    for call in 0..7 {
        stored.push(record(&mut control, id, batch(call)).await.unwrap());
    }
    assert_eq!(stored, [100, 100, 100, 100, 100, 99, 0]);

    // Pages of at most 500, followed by seq.
    let first = events(&mut jobs, id, 0).await;
    assert_eq!(first.len(), 500);
    let mut all = first.clone();
    loop {
        let after = all.last().unwrap().seq;
        let next = events(&mut jobs, id, after).await;
        if next.is_empty() {
            break;
        }
        assert!(next.iter().all(|e| e.seq > after), "only after {after}");
        all.extend(next);
    }
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    assert_eq!(all.iter().filter(|e| !e.kind.is_empty()).count(), 600);
    let last_kept = all.iter().rev().find(|e| !e.kind.is_empty()).unwrap();
    assert_eq!(
        last_kept.reason, "call 5 entry 98",
        "the oldest entries are kept"
    );
    let tail = events(&mut jobs, id, failed.seq).await;
    assert_eq!(tail.first().map(|e| e.seq), Some(failed.seq + 1));

    // Read access as today: another namespace's token sees no such job.
    let mine = jobs
        .list_job_events(as_token(
            pb::ListJobEventsRequest {
                id: id.into(),
                after_seq: failed.seq - 1,
            },
            "default",
            "viewer",
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(mine.first().map(|e| e.seq), Some(failed.seq));
    let other = jobs
        .list_job_events(as_token(
            pb::ListJobEventsRequest {
                id: id.into(),
                after_seq: 0,
            },
            "team-b",
            "admin",
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound, "{other:?}");
}

#[tokio::test]
async fn rounds_give_the_best_and_last_round() {
    let server = start(&["--max-model-parameters", "5000000"]).await;
    let (mut jobs, mut control) = (server.jobs().await, server.control().await);
    let job = create(&mut jobs, spec("rounds", "{arch: mlp, hidden: [128]}", 5)).await;
    assert_eq!(
        job.model_name, job.id,
        "a job's models are named after its id"
    );
    assert_eq!((job.best_round, job.last_round), (0, 0));
    let named = create(
        &mut jobs,
        spec("named", "{arch: logreg, name: shared-model}", 2),
    )
    .await;
    assert_eq!(named.model_name, "shared-model");

    let id = job.id.clone();
    wait_for(&mut jobs, &id, Duration::from_secs(30), "STARTING", |j| {
        j.state == pb::JobState::Starting as i32
    })
    .await;
    control
        .coordinator_ready(pb::CoordinatorReadyRequest {
            job_id: id.clone(),
            endpoint: "127.0.0.1:9".into(),
            pid: 0,
        })
        .await
        .unwrap();
    let assignment = control
        .get_assignment(pb::GetAssignmentRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(assignment.max_model_parameters, 5_000_000);

    let round = |n: u32, accuracy: f64, robust: f64| pb::RoundSummary {
        round: n,
        evaluation: Some(pb::Metrics {
            loss: 0.5,
            accuracy,
            samples: 100,
        }),
        train_loss: 0.4,
        updates: 2,
        model_version: n,
        duration_ms: 10,
        refused_updates: 1,
        dropped_updates: n,
        task_failures: n + 1,
        robust_accuracy: robust,
        eval_parties: n % 3,
        eval_parties_expected: 2,
        bytes_to_parties: 3_000_000_000 + u64::from(n),
        bytes_from_parties: 5_000_000_000 + u64::from(n),
        bytes_from_parties_uncompressed: 20_000_000_000 + u64::from(n),
        dp_epsilon: 0.5 * f64::from(n),
        dp_sampling_rate: 0.75,
        selected: vec![pb::SelectedParty {
            party: format!("party-{n}"),
            score: 0.5 + f64::from(n) / 10.0,
            outcome: "finished".into(),
        }],
    };
    let report = |summary: pb::RoundSummary| pb::ReportRoundRequest {
        job_id: id.clone(),
        round: Some(summary),
    };
    // Refused: a robust accuracy outside [0, 1], counts beyond the bound.
    for (bad, field) in [
        (round(1, 0.5, 1.5), "round.robust_accuracy"),
        (round(1, 0.5, f64::NAN), "round.robust_accuracy"),
        (
            pb::RoundSummary {
                dropped_updates: 2_000_000,
                ..round(1, 0.5, 0.5)
            },
            "round.dropped_updates",
        ),
        (
            pb::RoundSummary {
                task_failures: u32::MAX,
                ..round(1, 0.5, 0.5)
            },
            "round.task_failures",
        ),
        (
            pb::RoundSummary {
                eval_parties: 3,
                ..round(1, 0.5, 0.5)
            },
            "round.eval_parties: 3 is more than round.eval_parties_expected (2)",
        ),
        (
            pb::RoundSummary {
                eval_parties_expected: 100_001,
                ..round(1, 0.5, 0.5)
            },
            "round.eval_parties_expected",
        ),
        (
            pb::RoundSummary {
                bytes_to_parties: (1 << 50) + 1,
                ..round(1, 0.5, 0.5)
            },
            "round.bytes_to_parties",
        ),
        (
            pb::RoundSummary {
                selected: vec![pb::SelectedParty {
                    party: "p".into(),
                    score: f64::INFINITY,
                    outcome: "finished".into(),
                }],
                ..round(1, 0.5, 0.5)
            },
            "round.selected[0].score",
        ),
    ] {
        assert_invalid(control.report_round(report(bad)).await, field);
    }
    // Round 2 has the highest accuracy, but round 3 the highest robust one.
    for summary in [round(1, 0.6, 0.0), round(2, 0.95, 0.7), round(3, 0.8, 0.8)] {
        control.report_round(report(summary)).await.unwrap();
    }
    let got = jobs
        .get_job(pb::GetJobRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.best_round, got.last_round), (3, 3));
    assert_eq!(got.rounds.len(), 3);
    assert_eq!(got.rounds[1], round(2, 0.95, 0.7), "every field is kept");
    // The listing tells the same, without the rounds themselves.
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let listed = listed.iter().find(|j| j.id == id).unwrap();
    assert_eq!((listed.best_round, listed.last_round), (3, 3));
    assert!(listed.rounds.is_empty());
    assert_eq!(listed.model_name, id);
    // A later round that only some parties evaluated: its plain accuracy counts.
    control
        .report_round(report(round(4, 0.9, 0.0)))
        .await
        .unwrap();
    let got = jobs
        .get_job(pb::GetJobRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.best_round, got.last_round), (4, 4));
}

#[tokio::test]
async fn create_refuses_models_over_the_size_limit() {
    let server = start(&[]).await;
    let mut jobs = server.jobs().await;
    let huge = spec(
        "huge",
        "{arch: mlp, hidden: [65536, 65536, 65536, 65536]}",
        2,
    );
    for req in [
        Request::new(pb::CreateJobRequest { spec: huge.clone() }),
        as_token(pb::CreateJobRequest { spec: huge }, "default", "member"),
    ] {
        let m = assert_invalid(jobs.create_job(req).await, "model.hidden:");
        let count = cohort_core::JobSpec::parse(&spec(
            "huge",
            "{arch: mlp, hidden: [65536, 65536, 65536, 65536]}",
            2,
        ))
        .unwrap()
        .model
        .parameter_count(1, 2);
        assert!(m.contains(&count.to_string()), "states the count: {m}");
        assert!(m.contains("100000000"), "states the limit: {m}");
    }
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(listed.is_empty(), "nothing stored: {listed:?}");
    let ok = create(&mut jobs, spec("small", "{arch: mlp, hidden: [128]}", 2)).await;
    assert_eq!(ok.name, "small");
    create(&mut jobs, spec("conv", "{arch: cnn}", 2)).await;

    // A smaller limit refuses a cnn by its architecture.
    let strict = start(&["--max-model-parameters", "1000"]).await;
    let mut jobs = strict.jobs().await;
    let m = assert_invalid(
        jobs.create_job(pb::CreateJobRequest {
            spec: spec("conv", "{arch: cnn}", 2),
        })
        .await,
        "model.arch:",
    );
    assert!(m.contains("1000"), "{m}");
    create(&mut jobs, spec("tiny", "{arch: logreg}", 2)).await;
}

#[tokio::test]
async fn limits_of_zero_are_refused_at_start() {
    for flag in [
        "--max-model-parameters",
        "--max-job-log-entries",
        "--reconcile-interval",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = job_scheduler(dir.path(), &[flag, "0"]).output().unwrap();
        assert!(!out.status.success(), "{flag} 0 was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "names {flag}: {stderr}");
        assert!(!dir.path().join("ready").exists(), "{flag} 0: never served");
    }
}

#[tokio::test]
async fn server_info_answers_any_caller() {
    let server = start(&[]).await;
    let mut jobs = server.jobs().await;
    for req in [
        Request::new(pb::GetServerInfoRequest {}),
        as_token(pb::GetServerInfoRequest {}, "team-b", "viewer"),
        as_token(pb::GetServerInfoRequest {}, "*", "admin"),
    ] {
        let info = jobs.get_server_info(req).await.unwrap().into_inner();
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert!(!info.version.is_empty());
    }
    // Identity metadata comes whole, or not at all.
    let mut half = Request::new(pb::GetServerInfoRequest {});
    half.metadata_mut()
        .insert(cohort_proto::ROLE_METADATA_KEY, "admin".parse().unwrap());
    let err = jobs.get_server_info(half).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn a_coordinator_exit_names_its_last_error() {
    let server = start(&["--max-launch-attempts", "2"]).await;
    let mut jobs = server.jobs().await;
    let job = create(&mut jobs, spec("crash", "{arch: logreg}", 2)).await;
    let failed = wait_for(&mut jobs, &job.id, Duration::from_secs(60), "FAILED", |j| {
        j.state == pb::JobState::Failed as i32
    })
    .await;
    let cause = r#"exit status 3: error: model.init: tensor "fc0.weight" has shape [64, 64], the spec needs [32, 64]"#;
    assert!(
        failed.reason.contains(cause) && failed.reason.contains("gave up after 2"),
        "{}",
        failed.reason
    );
    assert!(
        !failed.reason.contains("WARN"),
        "the error, not the warning before it: {}",
        failed.reason
    );
    // The job's log tells the same.
    let last = events(&mut jobs, &job.id, 0).await.pop().unwrap();
    assert_eq!(last.to, pb::JobState::Failed as i32);
    assert_eq!(last.reason, failed.reason);
}
