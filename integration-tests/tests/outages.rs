//! Outages that heal: storage that refuses writes for a while, a database that goes away, a
//! proxy that restarts mid-training. Jobs must come through them with every round, without
//! losing evaluations or retraining rounds.

use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::{Federation, assert_one_version_per_round, on_postgres, state_of};
use cohort_proto::v1 as pb;
use nix::sys::signal::Signal;

fn spec(name: &str, rounds: u32, epochs: u32) -> String {
    spec_with(name, rounds, epochs, 16)
}

fn spec_with(name: &str, rounds: u32, epochs: u32, batch_size: u32) -> String {
    format!(
        "name: {name}\n\
         model: {{arch: mlp, hidden: [32]}}\n\
         data: {{dataset: digits}}\n\
         training: {{epochs: {epochs}, batch_size: {batch_size}, optimizer: {{name: sgd, lr: 0.01}}}}\n\
         rounds: {rounds}\n\
         clients: {{per_round: 3, min: 3, round_timeout: 120s}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_storage_refusing_writes_for_a_while_delays_the_job_only() {
    let fed = Federation::start(3).await.expect("federation");
    let job = fed
        .create_job(&spec("patient", 6, 1))
        .await
        .expect("create");
    fed.wait_job(&job.id, Duration::from_secs(90), "round 2", |j| {
        j.rounds_completed >= 2
    })
    .await
    .expect("job progresses");
    // Model files cannot be written for 15 s: their directory is a file meanwhile.
    let models = fed.dir.path().join("server/blobs/models");
    let aside = fed.dir.path().join("server/blobs/models-aside");
    std::fs::rename(&models, &aside).expect("move the blob directory aside");
    std::fs::write(&models, b"in the way").expect("block the blob directory");
    tokio::time::sleep(Duration::from_secs(15)).await;
    std::fs::remove_file(&models).expect("unblock");
    std::fs::rename(&aside, &models).expect("put the blob directory back");

    let done = fed
        .wait_end(&job.id, Duration::from_secs(180))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.rounds_completed, 6);
    assert_one_version_per_round(&fed.api(), &done, 6).await;
    let events = fed.events(&job.id).await.expect("events");
    assert!(
        !events.iter().any(|e| e.reason.contains("relaunching")),
        "the coordinator waited for the storage instead of dying: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_no_evaluation_and_no_work_in_flight() {
    let Some((pg, fed)) = on_postgres(3).await else {
        return;
    };
    let job = fed
        .create_job(&spec("outlast", 10, 1))
        .await
        .expect("create");
    fed.wait_job(&job.id, Duration::from_secs(90), "round 2", |j| {
        j.rounds_completed >= 2
    })
    .await
    .expect("job progresses");
    // A token the proxy has not seen yet: checking it needs the database.
    let fresh = fed
        .api()
        .tokens()
        .create_token(pb::CreateTokenRequest {
            name: "during-the-outage".into(),
            namespace: "default".into(),
            role: pb::Role::Viewer as i32,
        })
        .await
        .expect("create a token")
        .into_inner()
        .token;
    let fresh = cohort_cli::Api::from_profile(&cohort_cli::profile::Profile {
        token: Some(fresh),
        ..fed.stack.profile()
    })
    .expect("api");
    pg.stop_server().expect("stop PostgreSQL");
    let started = tokio::time::Instant::now();
    // The user is told the cause, not that a service "did not answer in time".
    let refused = fresh
        .jobs()
        .get_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .expect_err("no database, no token check");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("database unavailable"),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(started.elapsed())).await;
    pg.start_server().expect("start PostgreSQL again");

    let done = fed
        .wait_end(&job.id, Duration::from_secs(240))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.rounds_completed, 10);
    for r in &done.rounds {
        assert_eq!(
            (r.eval_parties, r.eval_parties_expected),
            (3, 3),
            "round {} evaluated on every party's data: {r:?}",
            r.round
        );
        assert_eq!(r.task_failures, 0, "no party's work was refused: {r:?}");
    }
    assert_one_version_per_round(&fed.api(), &done, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restart_mid_training_keeps_the_work_in_flight() {
    let mut fed = Federation::start(3).await.expect("federation");
    // Long local training (one sample a step): the proxy goes away while every executor
    // trains.
    let job = fed
        .create_job(&spec_with("steadfast", 2, 15, 1))
        .await
        .expect("create");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while cohort_integration_tests::processes()
        .iter()
        .filter(|(_, _, _, comm)| comm == "executor")
        .count()
        < 3
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the executors never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fed.stack
        .signal("proxy", Signal::SIGKILL)
        .expect("kill the proxy");
    tokio::time::sleep(Duration::from_millis(500)).await;
    fed.stack.restart("proxy").await.expect("restart the proxy");

    let done = fed
        .wait_end(&job.id, Duration::from_secs(240))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    let first = &done.rounds[0];
    assert_eq!(first.updates, 3, "{first:?}");
    assert_eq!(
        first.task_failures, 0,
        "no task was failed for its party's session dropping: {first:?}"
    );
    let events = fed.events(&job.id).await.expect("events");
    assert!(
        !events.iter().any(|e| e.kind == "task_failed"),
        "the round was not retrained: {events:?}"
    );
}
