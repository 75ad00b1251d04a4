//! Server optimisers (issue 15): `aggregation.strategy` fedadam, fedyogi, fedadagrad and
//! fedavgm, and fedprox (FedAvg with the proximal term in local training), run a digits job to SUCCEEDED
//! with at least 0.85 held-out accuracy (3 parties at α = 0.5, 15 rounds, fixed seed), and a coordinator killed mid-job under fedadam resumes with the server
//! optimiser's moments of its last checkpointed round, bit for bit: the relaunched
//! coordinator's restored state, encoded again, has the digest of the state model-manager
//! stored for that round.

use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::{
    Federation, coordinator_pids, digits_job, log_files_under, state_of,
};
use cohort_proto::v1 as pb;
use nix::sys::signal::Signal;

const ROUNDS: u32 = 15;

fn job(strategy: &str, rounds: u32) -> String {
    format!(
        "{}seed: 7\naggregation: {{strategy: {strategy}}}\n",
        digits_job(&format!("opt-{strategy}"), rounds, 3, 3, "60s")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_optimisers_train_digits_to_085() {
    let fed = Federation::start(3).await.expect("federation");
    let mut reached = Vec::new();
    for strategy in ["fedadam", "fedyogi", "fedadagrad"] {
        let (done, accuracy) = fed.run_to_success(strategy, &job(strategy, ROUNDS)).await;
        assert_eq!(done.rounds_completed, ROUNDS, "{strategy}");
        reached.push((strategy, accuracy));
    }
    eprintln!("held-out accuracy after {ROUNDS} rounds: {reached:?}");
    for (strategy, accuracy) in &reached {
        assert!(
            *accuracy >= 0.85,
            "{strategy}: held-out accuracy {accuracy:.3} < 0.85 (all: {reached:?})"
        );
    }
}

/// FedAvgM: server momentum (β at its default, 0.9) over the round's mean update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavgm_trains_digits_to_085() {
    let fed = Federation::start(3).await.expect("federation");
    let (done, accuracy) = fed.run_to_success("fedavgm", &job("fedavgm", ROUNDS)).await;
    assert_eq!(done.rounds_completed, ROUNDS);
    eprintln!("fedavgm held-out accuracy after {ROUNDS} rounds: {accuracy:.3}");
    assert!(
        accuracy >= 0.85,
        "fedavgm: held-out accuracy {accuracy:.3} < 0.85"
    );
}

/// FedProx: the server is FedAvg, every party's local loss carries the proximal term (μ at
/// its default, 0.01).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedprox_trains_digits_to_085() {
    let fed = Federation::start(3).await.expect("federation");
    let (done, accuracy) = fed.run_to_success("fedprox", &job("fedprox", ROUNDS)).await;
    assert_eq!(done.rounds_completed, ROUNDS);
    eprintln!("fedprox held-out accuracy after {ROUNDS} rounds: {accuracy:.3}");
    // Every party's every training task carried the term.
    let trained: Vec<String> = log_files_under(fed.dir.path())
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.contains(" trained "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        trained.len() >= ROUNDS as usize * 3,
        "a trained line per task: {trained:#?}"
    );
    eprintln!("{}", trained[0]);
    assert!(
        trained.iter().all(|l| l.contains("proximal_mu=Some(0.01)")),
        "{trained:#?}"
    );
    assert!(
        accuracy >= 0.85,
        "fedprox: held-out accuracy {accuracy:.3} < 0.85"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaunched_coordinator_resumes_with_the_checkpointed_server_state() {
    let fed = Federation::start(3).await.expect("federation");
    let created = fed.create_job(&job("fedadam", 8)).await.expect("create");
    fed.wait_job(&created.id, Duration::from_secs(120), "round 3", |j| {
        j.rounds_completed >= 3
    })
    .await
    .expect("the job progresses");
    let coordinators = coordinator_pids(&created.id);
    assert_eq!(coordinators.len(), 1, "one coordinator for the job");
    cohort_runtime::process::signal_pid(coordinators[0], Signal::SIGKILL);
    let done = fed
        .wait_end(&created.id, Duration::from_secs(180))
        .await
        .expect("the job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);

    // What the relaunched coordinator says it restored.
    let log_path = fed.dir.path().join(format!(
        "server/work/coordinators/coordinator-{}.log",
        created.id
    ));
    let log = std::fs::read_to_string(&log_path).expect("coordinator log");
    let restored: Vec<(u32, String, String)> = log
        .lines()
        .filter(|l| l.contains("server optimiser state restored"))
        .filter_map(|l| {
            let field = |name: &str| {
                let rest = l.split_once(&format!("{name}="))?.1;
                Some(rest.split_whitespace().next()?.to_string())
            };
            Some((
                field("round")?.parse().ok()?,
                field("digest")?,
                field("stored")?,
            ))
        })
        .collect();
    let [(round, digest, stored)] = &restored[..] else {
        panic!("one restore in the coordinator's log: {restored:?}\n{log}");
    };
    assert!(*round >= 3, "resumed after round {round}");
    assert_eq!(digest, stored, "the restored moments are the stored ones");

    // And the stored ones are the state checkpointed with that round.
    let versions = fed
        .models()
        .list_versions(pb::ListVersionsRequest {
            name: format!("{}-server-state", created.id),
            job_id: created.id.clone(),
            namespace: String::new(),
        })
        .await
        .expect("list the server states")
        .into_inner()
        .versions;
    let rounds: Vec<u32> = versions
        .iter()
        .filter_map(|v| v.lineage.as_ref().map(|l| l.round))
        .collect();
    assert_eq!(
        rounds,
        (1..=8).collect::<Vec<_>>(),
        "one server state per round"
    );
    let of_round = versions
        .iter()
        .find(|v| v.lineage.as_ref().is_some_and(|l| l.round == *round))
        .expect("the state of the resumed round");
    assert_eq!(&of_round.digest, digest);
    // The moments moved after the restore: the last state is not the restored one.
    let last = versions.last().expect("a last state");
    assert_ne!(&last.digest, digest);
}

/// `clients.selection: data`: parties are drawn with chances proportional to their samples;
/// a job of 2 of 3 parties a round runs to SUCCEEDED and every round has its 2 updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_selection_runs_a_job() {
    let fed = Federation::start(3).await.expect("federation");
    let spec = digits_job("by-data", 6, 2, 2, "60s").replace(
        "clients: {per_round: 2, min: 2, round_timeout: 60s}",
        "clients: {per_round: 2, min: 2, selection: data, round_timeout: 60s}",
    );
    assert!(spec.contains("selection: data"), "{spec}");
    let (done, accuracy) = fed.run_to_success("selection: data", &spec).await;
    assert_eq!(done.rounds_completed, 6);
    assert!(
        done.rounds.iter().all(|r| r.updates == 2),
        "{:?}",
        done.rounds
    );
    eprintln!("selection data: held-out accuracy {accuracy:.3}");
}
