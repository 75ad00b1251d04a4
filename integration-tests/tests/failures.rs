//! Failures say why, where the user looks: a job that fails carries the real cause as its
//! reason (`cohort job get`) and in its log (`cohort job logs`), and a deterministic failure
//! is not retried until some budget runs out.

use std::time::{Duration, Instant};

use cohort_core::JobState;
use cohort_integration_tests::{Federation, Storage, cohort, digits_mlp, state_of, upload_model};

const JOB_WAIT: Duration = Duration::from_secs(120);

fn spec(name: &str, extra: &str) -> String {
    format!(
        "name: {name}\n\
         model: {{arch: mlp, hidden: [32]{extra}}}\n\
         data: {{dataset: digits}}\n\
         training: {{epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.1}}}}\n\
         rounds: 2\n\
         clients: {{per_round: 2, min: 2, round_timeout: 30s}}\n"
    )
}

/// Every reason in the job's log (state changes and entries).
async fn log_text(fed: &Federation, id: &str) -> String {
    fed.events(id)
        .await
        .expect("events")
        .iter()
        .map(|e| format!("{} {} {}", e.kind, e.party, e.reason))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_init_of_the_wrong_shape_fails_at_once_naming_the_tensor() {
    let fed = Federation::start(2).await.expect("federation");
    upload_model(&fed.api(), "wide", digits_mlp(&[64], 3))
        .await
        .expect("upload");
    let started = Instant::now();
    let job = fed
        .create_job(&spec("narrow", ", init: \"wide@1\""))
        .await
        .expect("create");
    let done = fed.wait_end(&job.id, JOB_WAIT).await.expect("job ends");
    eprintln!("{}: {}", done.name, done.reason);
    assert_eq!(state_of(&done), JobState::Failed);
    assert!(
        done.reason.contains("model.init") && done.reason.contains("fc1.weight"),
        "the reason names the tensor: {}",
        done.reason
    );
    assert!(done.reason.contains("[10, 32]"), "{}", done.reason);
    assert_eq!(done.rounds_completed, 0);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "failed before any round, not by timeouts: {:?}",
        started.elapsed()
    );
    let log = log_text(&fed, &job.id).await;
    assert!(
        !log.contains("relaunching"),
        "a deterministic failure is not retried:\n{log}"
    );
    // Where the user looks: `cohort job get` and `cohort job logs`.
    let profile = fed.dir.path().join("profile.toml");
    fed.stack.profile().save(&profile).expect("profile");
    for args in [["job", "get", &job.id], ["job", "logs", &job.id]] {
        let (code, out, err) = cohort(&args, &profile).await.expect("cli");
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            out.contains("fc1.weight"),
            "{args:?} shows the cause:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_that_cannot_store_its_model_fails_with_the_cause() {
    let fed = Federation::start_with(
        2,
        Storage {
            env: vec![("COHORT_STORAGE_PATIENCE".into(), "2s".into())],
            ..Storage::default()
        },
    )
    .await
    .expect("federation");
    // Model files cannot be written any more: their directory is now a file.
    let models = fed.dir.path().join("server/blobs/models");
    let _ = std::fs::remove_dir_all(&models);
    std::fs::write(&models, b"in the way").expect("block the blob directory");
    let job = fed
        .create_job(&spec("unstorable", ""))
        .await
        .expect("create");
    let done = fed.wait_end(&job.id, JOB_WAIT).await.expect("job ends");
    eprintln!("{}: {}", done.name, done.reason);
    assert_eq!(state_of(&done), JobState::Failed);
    assert!(
        done.reason.contains("cannot store the model"),
        "{}",
        done.reason
    );
    let log = log_text(&fed, &job.id).await;
    assert!(log.contains("cannot store the model"), "{log}");
    assert!(
        !log.contains("gave up after"),
        "not five relaunches of the same failure:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executors_that_crash_the_same_way_fail_the_round_with_their_cause() {
    let fed = Federation::start(2).await.expect("federation");
    // Both parties' training data is broken after they registered it.
    for party in ["party-1", "party-2"] {
        let path = fed.dir.path().join(format!("parties/{party}/train.csv"));
        std::fs::write(&path, "this is not,a digits file\n").expect("break the data");
    }
    let started = Instant::now();
    let job = fed
        .create_job(&spec("broken-data", ""))
        .await
        .expect("create");
    let done = fed.wait_end(&job.id, JOB_WAIT).await.expect("job ends");
    eprintln!("{}: {}", done.name, done.reason);
    assert_eq!(state_of(&done), JobState::Failed);
    assert!(
        done.reason.contains("every task failed the same way") && done.reason.contains("train.csv"),
        "{}",
        done.reason
    );
    assert!(
        started.elapsed() < Duration::from_secs(28),
        "not held until the round timeout: {:?}",
        started.elapsed()
    );
    let events = fed.events(&job.id).await.expect("events");
    for party in ["party-1", "party-2"] {
        assert!(
            events.iter().any(|e| e.kind == "task_failed"
                && e.party == party
                && e.reason.contains("train.csv")),
            "{party}'s failure is in the log: {events:?}"
        );
    }
}
