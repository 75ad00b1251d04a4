//! SCAFFOLD end to end (issue 15): a digits job with `aggregation.strategy: scaffold` (3
//! parties at α = 0.5, 15 rounds, seed 7) runs to SUCCEEDED with at least 0.85 held-out
//! accuracy, every party trains with the control-variate correction and keeps its c_i in its
//! workspace (`jobs/<job id>/scaffold_c.safetensors`), read back from the second round on;
//! and a coordinator killed mid-job resumes with the server control variate c of its last
//! checkpointed round: the relaunched coordinator's restored c, encoded again, has the
//! digest of the state model-manager stored for that round, and that state is a real c
//! (`scaffold.c/*`, not zero).

use cohort_integration_tests::{Federation, digits_job, files_under, log_files_under};
use cohort_proto::v1 as pb;

const ROUNDS: u32 = 15;
const PARTIES: u32 = 3;
const STATE_FILE: &str = "scaffold_c.safetensors";

fn job(name: &str, rounds: u32) -> String {
    format!(
        "{}seed: 7\naggregation: {{strategy: scaffold}}\n",
        digits_job(name, rounds, PARTIES, PARTIES, "60s")
    )
}

/// The executors' `trained` lines under the federation's directory.
fn trained_lines(fed: &Federation) -> Vec<String> {
    log_files_under(fed.dir.path())
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.contains(" trained "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_trains_digits_to_085_and_every_party_keeps_its_control_variate() {
    let fed = Federation::start(PARTIES).await.expect("federation");
    let (done, accuracy) = fed
        .run_to_success("scaffold", &job("scaffold", ROUNDS))
        .await;
    assert_eq!(done.rounds_completed, ROUNDS);
    eprintln!("scaffold held-out accuracy after {ROUNDS} rounds: {accuracy:.3}");

    // Every training task ran with the correction; each party started from a zero c_i
    // once and read its kept one back in every later round.
    let trained = trained_lines(&fed);
    assert!(
        trained.len() >= (ROUNDS * PARTIES) as usize,
        "a trained line per task: {trained:#?}"
    );
    eprintln!("{}", trained[0]);
    assert!(
        trained.iter().all(|l| l.contains("scaffold=true")),
        "{trained:#?}"
    );
    let starts = trained
        .iter()
        .filter(|l| l.contains("client_control=\"zero\"") || l.contains("client_control=zero"))
        .count();
    let kept = trained
        .iter()
        .filter(|l| l.contains("client_control=\"kept\"") || l.contains("client_control=kept"))
        .count();
    assert_eq!(
        (starts, kept),
        (PARTIES as usize, trained.len() - PARTIES as usize),
        "{trained:#?}"
    );

    // Each party's workspace holds its c_i for the job: the model's layout, moved from zero.
    let model = fed.model_version(&done, 0).await.expect("the final model");
    let kept_files: Vec<String> = files_under(&fed.dir.path().join("parties"))
        .into_iter()
        .filter(|f| f.ends_with(&format!("/jobs/{}/{STATE_FILE}", done.id)))
        .collect();
    assert_eq!(kept_files.len(), PARTIES as usize, "{kept_files:#?}");
    for file in &kept_files {
        let bytes = std::fs::read(file).expect("read c_i");
        let kept = cohort_fl::from_safetensors(&bytes).expect("c_i is safetensors");
        // c_i after the party's last round, beside the c_i it started from and its number.
        let round = kept
            .iter()
            .find(|t| t.name == "round")
            .map(|t| t.data.clone());
        assert_eq!(round, Some(vec![ROUNDS as f32]), "{file}");
        let previous = kept
            .iter()
            .filter(|t| t.name.starts_with("previous/"))
            .count();
        assert_eq!(previous, model.len(), "{file}");
        let mut c: Vec<_> = kept
            .into_iter()
            .filter(|t| t.name != "round" && !t.name.starts_with("previous/"))
            .collect();
        c.sort_by(|a, b| a.name.cmp(&b.name));
        let mut layout: Vec<(String, Vec<usize>)> = model
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        layout.sort();
        let found: Vec<(String, Vec<usize>)> = c
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        assert_eq!(found, layout, "{file}");
        assert!(
            c.iter().flat_map(|t| &t.data).any(|v| *v != 0.0),
            "{file}: c_i never moved"
        );
        assert!(
            c.iter().flat_map(|t| &t.data).all(|v| v.is_finite()),
            "{file}"
        );
    }
    assert!(
        accuracy >= 0.85,
        "scaffold: held-out accuracy {accuracy:.3} < 0.85"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaunched_coordinator_resumes_with_the_checkpointed_server_control_variate() {
    let fed = Federation::start(PARTIES).await.expect("federation");
    let created = fed
        .create_job(&job("scaffold-restart", 8))
        .await
        .expect("create");
    let done = fed.kill_coordinator_after(&created.id, 3).await;
    // What the relaunched coordinator says it restored...
    let restored = fed.restored_server_state(&created.id);
    let round = restored.round;
    assert!(round >= 3, "resumed after round {round}");
    assert_eq!(
        restored.digest, restored.stored,
        "the restored c is the stored one"
    );
    // ...is the c checkpointed with that round.
    let state_model = format!("{}-server-state", created.id);
    let versions = fed.server_states(&created.id, 8).await;
    let of_round = versions
        .iter()
        .find(|v| v.lineage.as_ref().is_some_and(|l| l.round == round))
        .expect("the state of the resumed round");
    assert_eq!(of_round.digest, restored.digest);

    // It is SCAFFOLD's c, one tensor per model tensor, and it had moved from zero: the
    // coordinator resumed with the parties' accumulated corrections, not from scratch.
    let state_of_round = fed
        .api()
        .job_model(
            &pb::Job {
                model_name: state_model,
                namespace: done.namespace.clone(),
                ..Default::default()
            },
            of_round.version,
        )
        .await
        .expect("download the restored state");
    let model = fed.model_version(&done, 0).await.expect("the final model");
    assert_eq!(state_of_round.len(), model.len(), "{state_of_round:?}");
    for t in &model {
        let c = state_of_round
            .iter()
            .find(|c| c.name == format!("scaffold.c/{}", t.name))
            .unwrap_or_else(|| panic!("no scaffold.c/{} in the state", t.name));
        assert_eq!(c.shape, t.shape, "{}", c.name);
    }
    assert!(
        state_of_round
            .iter()
            .flat_map(|t| &t.data)
            .any(|v| *v != 0.0),
        "the checkpointed c of round {round} is zero"
    );
    // c moved after the restore: the last state is not the restored one.
    let last = versions.last().expect("a last state");
    assert_ne!(last.digest, restored.digest);
    // Parties whose update of the interrupted round was acknowledged trained it again from
    // their c_i of before it (none when the kill fell between rounds).
    let rolled_back = trained_lines(&fed)
        .iter()
        .filter(|l| l.contains("rolled_back"))
        .count();
    eprintln!("resumed after round {round}; {rolled_back} task(s) started from a rolled-back c_i");
}
