//! Server optimisers (issue 15): `aggregation.strategy` fedadam, fedyogi, fedadagrad and
//! fedavgm, and fedprox (FedAvg with the proximal term in local training), run a digits job to SUCCEEDED
//! with at least 0.85 held-out accuracy (3 parties at α = 0.5, 15 rounds, fixed seed), and a coordinator killed mid-job under fedadam resumes with the server
//! optimiser's moments of its last checkpointed round, bit for bit: the relaunched
//! coordinator's restored state, encoded again, has the digest of the state model-manager
//! stored for that round.

use cohort_integration_tests::{Federation, digits_job, log_files_under};

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
    fed.kill_coordinator_after(&created.id, 3).await;
    // What the relaunched coordinator says it restored...
    let restored = fed.restored_server_state(&created.id);
    assert!(
        restored.round >= 3,
        "resumed after round {}",
        restored.round
    );
    assert_eq!(
        restored.digest, restored.stored,
        "the restored moments are the stored ones"
    );
    // ...is the state checkpointed with that round.
    let versions = fed.server_states(&created.id, 8).await;
    let of_round = versions
        .iter()
        .find(|v| {
            v.lineage
                .as_ref()
                .is_some_and(|l| l.round == restored.round)
        })
        .expect("the state of the resumed round");
    assert_eq!(of_round.digest, restored.digest);
    // The moments moved after the restore: the last state is not the restored one.
    let last = versions.last().expect("a last state");
    assert_ne!(last.digest, restored.digest);
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
