//! Updates that turn bad halfway through their stream change nothing: the coordinator checks
//! each chunk as it arrives and stages it apart from the aggregate, so what the honest parties
//! sent is averaged exactly as if the adversaries had never been there. The synthetic workload
//! makes "exactly" checkable: its true average is known.

use std::time::Duration;

use cohort_core::JobState;
use cohort_fl::SyntheticModel;
use cohort_integration_tests::adversary::{Adversary, Behaviour, UpdateKind};
use cohort_integration_tests::{Federation, state_of, wait_clients};

const PARAMS: u64 = 200_000;
const ROUNDS: u32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn updates_that_turn_bad_halfway_change_nothing() {
    // party-1 and party-2 are honest (synthetic indexes 0 and 1).
    let fed = Federation::synthetic(2).await.expect("federation");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut adversaries = Vec::new();
    for (name, kind) in [
        ("mallory", UpdateKind::NanHalfway),
        ("trudy", UpdateKind::WrongShapeHalfway),
    ] {
        let behaviour = Behaviour::synthetic(500, kind);
        let adversary = Adversary::connect(&fed, dir.path(), name, behaviour).await;
        adversaries.push(adversary.expect("the adversary registers"));
    }
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 4
    })
    .await;
    let job = fed
        .create_job(&format!(
            "name: midstream\nmodel: {{arch: synthetic, params: {PARAMS}, layers: 4}}\n\
             data: {{dataset: synthetic}}\nrounds: {ROUNDS}\n\
             clients: {{per_round: 4, min: 2, round_timeout: 60s}}\n"
        ))
        .await
        .expect("create");
    let job = fed
        .wait_end(&job.id, Duration::from_secs(180))
        .await
        .expect("the job ends");
    assert_eq!(state_of(&job), JobState::Succeeded, "{}", job.reason);
    for r in &job.rounds {
        assert_eq!(
            (r.updates, r.dropped_updates),
            (2, 2),
            "round {}: the honest updates count, the two bad ones are dropped: {r:?}",
            r.round
        );
    }

    // The model is the honest parties' exact average, round after round.
    let version = job.rounds.last().expect("rounds").model_version;
    let model = fed.model_version(&job, version).await.expect("the model");
    let synthetic = SyntheticModel {
        params: PARAMS,
        layers: 4,
    };
    let error = synthetic.max_abs_error(&model, 2, u64::from(ROUNDS));
    assert!(error < 1e-6, "the honest average moved by {error:e}");

    // Each drop is in the job's log with the chunk's fault.
    let events = fed.events(&job.id).await.expect("events");
    let dropped = |party: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.kind == "update_dropped" && e.party == party)
            .map(|e| e.reason.clone())
            .collect()
    };
    let (nan_drops, shape_drops) = (dropped("mallory"), dropped("trudy"));
    assert_eq!(nan_drops.len(), ROUNDS as usize, "{nan_drops:?}");
    assert!(
        nan_drops.iter().all(|r| r.contains("non-finite")),
        "{nan_drops:?}"
    );
    assert_eq!(shape_drops.len(), ROUNDS as usize, "{shape_drops:?}");
    assert!(
        shape_drops.iter().all(|r| r.contains("shape")),
        "{shape_drops:?}"
    );
    drop(adversaries);
}
