//! Faults: a party killed mid-job, a quorum that cannot be met, job-scheduler
//! and coordinator killed and restarted while a job runs.

use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::{Federation, digits_job, processes, state_of};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_killed_mid_job_does_not_stop_the_job() {
    let fed = Federation::start(3).await.expect("federation");
    let job = fed
        .create_job(&digits_job("party-loss", 8, 3, 2, "20s"))
        .await
        .expect("create");
    fed.wait_job(&job.id, Duration::from_secs(60), "round 2", |j| {
        j.rounds_completed >= 2
    })
    .await
    .expect("job progresses");
    fed.stack
        .signal("task-manager-party-2", Signal::SIGKILL)
        .expect("kill party");
    let done = fed
        .wait_end(&job.id, Duration::from_secs(120))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.rounds_completed, 8);
    let last = done.rounds.last().expect("rounds");
    assert_eq!(
        last.updates, 2,
        "the last round had only the two surviving parties"
    );
    assert!(done.rounds.iter().all(|r| r.updates >= 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_that_cannot_be_met_fails_the_job_with_a_reason() {
    let fed = Federation::start(2).await.expect("federation");
    let started = tokio::time::Instant::now();
    let job = fed
        .create_job(&digits_job("no-quorum", 3, 3, 3, "3s"))
        .await
        .expect("create");
    let done = fed
        .wait_end(&job.id, Duration::from_secs(60))
        .await
        .expect("job ends rather than hanging");
    assert_eq!(state_of(&done), JobState::Failed);
    assert!(
        done.reason.contains("quorum"),
        "reason says why: {}",
        done.reason
    );
    assert!(
        done.reason.contains("2 of the required 3"),
        "reason gives the numbers: {}",
        done.reason
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let events = fed.events(&job.id).await.expect("events");
    let last = events.last().expect("events");
    assert_eq!(
        last.reason, done.reason,
        "the transition is recorded with its reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_job_scheduler_loses_no_job() {
    let mut fed = Federation::start(3).await.expect("federation");
    let running = fed
        .create_job(&digits_job("survivor", 10, 3, 2, "20s"))
        .await
        .expect("create");
    fed.wait_job(&running.id, Duration::from_secs(60), "round 2", |j| {
        j.rounds_completed >= 2
    })
    .await
    .expect("job progresses");
    // A second job that is done before the crash must also survive it.
    let before = fed
        .jobs()
        .list_jobs(cohort_proto::v1::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();

    fed.stack
        .signal("job-scheduler", Signal::SIGKILL)
        .expect("kill scheduler");
    tokio::time::sleep(Duration::from_millis(500)).await;
    fed.stack
        .restart("job-scheduler")
        .await
        .expect("restart scheduler");

    let done = fed
        .wait_end(&running.id, Duration::from_secs(120))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.rounds_completed, 10);
    assert_eq!(done.rounds.len(), 10, "every round is recorded once");
    let after = fed
        .jobs()
        .list_jobs(cohort_proto::v1::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let ids = |l: &cohort_proto::v1::ListJobsResponse| {
        l.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&before), ids(&after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_is_relaunched_and_resumes_from_its_checkpoint() {
    let fed = Federation::start(3).await.expect("federation");
    let job = fed
        .create_job(&digits_job("phoenix", 8, 3, 2, "20s"))
        .await
        .expect("create");
    fed.wait_job(&job.id, Duration::from_secs(60), "round 3", |j| {
        j.rounds_completed >= 3
    })
    .await
    .expect("job progresses");
    let coordinators: Vec<u32> = processes()
        .into_iter()
        .filter(|(_, _, _, comm)| comm == "coordinator")
        .filter(|(pid, _, _, _)| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .map(|c| c.contains(&job.id))
                .unwrap_or(false)
        })
        .map(|(pid, _, _, _)| pid)
        .collect();
    assert_eq!(coordinators.len(), 1, "one coordinator for the job");
    cohort_runtime::process::signal_pid(coordinators[0], Signal::SIGKILL);
    let done = fed
        .wait_end(&job.id, Duration::from_secs(120))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.rounds_completed, 8);
    let rounds: Vec<u32> = done.rounds.iter().map(|r| r.round).collect();
    assert_eq!(rounds, (1..=8).collect::<Vec<_>>());
    let events = fed.events(&job.id).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.reason.contains("relaunching from round")),
        "the relaunch is an event: {events:?}"
    );
    // Versions form one lineage: each round's model derives from the previous one.
    let versions = fed
        .models()
        .list_versions(cohort_proto::v1::ListVersionsRequest {
            name: String::new(),
            job_id: job.id.clone(),
            namespace: String::new(),
        })
        .await
        .expect("versions")
        .into_inner()
        .versions;
    let rounds_stored: Vec<u32> = versions
        .iter()
        .filter_map(|v| v.lineage.as_ref().map(|l| l.round))
        .collect();
    for r in 1..=8 {
        assert!(
            rounds_stored.contains(&r),
            "round {r} has a stored model: {rounds_stored:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_no_party_holds_fails_the_job_naming_it() {
    let fed = Federation::start(2).await.expect("federation");
    let job = fed
        .create_job(
            &digits_job("nowhere", 3, 2, 1, "2s").replace("dataset: digits", "dataset: mnist"),
        )
        .await
        .expect("create");
    let done = fed
        .wait_end(&job.id, Duration::from_secs(60))
        .await
        .expect("job ends rather than hanging");
    assert_eq!(state_of(&done), JobState::Failed);
    assert!(done.reason.contains("\"mnist\""), "{}", done.reason);
}
