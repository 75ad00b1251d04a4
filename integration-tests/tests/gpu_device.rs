//! `training.device: cuda` (issue 17) on a federation without a GPU: parties report what
//! they have (`--gpus`, declared here since this machine has none), and a cuda job is
//! decided at the offer. party-1 and party-2 declare one GPU each, party-3 none. A job that
//! needs three GPU parties fails its round when the quorum is not met, naming
//! `training.device`, and the job's log names the party left out and why; a job that needs
//! two is offered to party-1 and party-2 only, whose executors (built without the `cuda`
//! feature) fail the task saying so instead of training on the CPU.

use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::{Federation, state_of, wait_clients};
use cohort_proto::v1 as pb;

fn gpus(n: u32) -> (String, String) {
    ("COHORT_GPUS".to_string(), n.to_string())
}

fn cuda_job(name: &str, clients: &str) -> String {
    format!(
        "name: {name}\n\
         model: {{arch: logreg}}\n\
         data: {{dataset: digits}}\n\
         training: {{epochs: 1, batch_size: 16, device: cuda, optimizer: {{name: sgd, lr: 0.1}}}}\n\
         rounds: 2\n\
         seed: 3\n\
         clients: {clients}\n"
    )
}

fn log_of(events: &[pb::JobEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{} {} {}", e.kind, e.party, e.reason))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cuda_job_is_offered_only_to_parties_with_a_gpu_and_refused_at_the_offer_without_enough()
{
    let fed = Federation::digits_with_env(
        3,
        Vec::new(),
        vec![gpus(0)],
        vec![
            ("party-1".to_string(), vec![gpus(1)]),
            ("party-2".to_string(), vec![gpus(1)]),
        ],
    )
    .await
    .expect("federation");
    // What the parties report: party-1 and party-2 one GPU each, party-3 none.
    let gpus_of = |clients: &[pb::ClientInfo], party: &str| {
        clients
            .iter()
            .find(|c| c.party == party && c.connected)
            .and_then(|c| c.resources.as_ref())
            .map(|r| (r.gpus, r.gpu_devices.len()))
    };
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        gpus_of(c, "party-1") == Some((1, 1))
            && gpus_of(c, "party-2") == Some((1, 1))
            && gpus_of(c, "party-3") == Some((0, 0))
    })
    .await;

    // Three GPU parties needed, two there: the round fails at the offer, naming the field.
    let three = fed
        .create_job(&cuda_job(
            "cuda-three",
            "{per_round: 3, min: 3, round_timeout: 6s}",
        ))
        .await
        .expect("create");
    let done = fed
        .wait_end(&three.id, Duration::from_secs(90))
        .await
        .expect("the job ends");
    assert_eq!(state_of(&done), JobState::Failed, "{}", done.reason);
    assert!(
        done.reason.contains("quorum not met") && done.reason.contains("training.device is cuda"),
        "{}",
        done.reason
    );
    let events = fed.events(&three.id).await.expect("events");
    assert!(
        events.iter().any(|e| e.party == "party-3"
            && e.reason
                .contains("not offered: the job's training.device is cuda")),
        "party-3's reason is in the job's log: {:#?}",
        log_of(&events)
    );

    // Two needed: party-1 and party-2 are offered it, and their executors have no CUDA.
    let two = fed
        .create_job(&cuda_job(
            "cuda-two",
            "{per_round: 2, min: 2, round_timeout: 20s}",
        ))
        .await
        .expect("create");
    let done = fed
        .wait_end(&two.id, Duration::from_secs(120))
        .await
        .expect("the job ends");
    assert_eq!(state_of(&done), JobState::Failed, "{}", done.reason);
    let events = fed.events(&two.id).await.expect("events");
    let failures: Vec<&pb::JobEvent> = events.iter().filter(|e| e.kind == "task_failed").collect();
    assert!(
        !failures.is_empty()
            && failures.iter().all(|e| e.party != "party-3"
                && e.reason.contains("training.device")
                && e.reason.contains("built without CUDA")),
        "only the GPU parties ran it, and failed it naming training.device: {:#?}",
        log_of(&events)
    );
    eprintln!(
        "cuda-two: {}; {:?}",
        done.reason,
        failures.first().map(|e| &e.reason)
    );
    assert!(
        done.rounds.iter().all(|r| r.updates == 0),
        "no update was trained anywhere: {:?}",
        done.rounds
    );
}
