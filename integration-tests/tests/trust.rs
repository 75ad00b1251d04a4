//! Trust inside the federation: a hostile party with a real certificate attacks a real
//! federation of two honest parties. Each attack runs a clean job first (same spec, same
//! seed, the adversary absent), then the same job with the adversary connected: the attacked
//! job must succeed with the honest parties, its final model within 2 points of the clean
//! one on held-out data (measured here, not as the parties claim), and the refusal must be
//! in the job's record with its reason.

use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::adversary::{Adversary, Behaviour, UpdateKind, for_job};
use cohort_integration_tests::{
    Federation, Storage, digits_mlp, state_of, upload_model, wait_clients,
};
use cohort_proto::v1 as pb;
use tonic::Code;

const JOB_WAIT: Duration = Duration::from_secs(180);

/// A federation of two honest parties whose coordinators give up on a silent upload fast.
async fn federation() -> Federation {
    Federation::start_with(
        2,
        Storage {
            env: vec![("COHORT_UPLOAD_IDLE_TIMEOUT".into(), "2s".into())],
            ..Storage::default()
        },
    )
    .await
    .expect("federation")
}

/// The job every attack is measured with: every party in every round, a fixed seed.
fn spec(name: &str, extra: &str) -> String {
    format!(
        "name: {name}\n\
         model: {{arch: mlp, hidden: [32]}}\n\
         data: {{dataset: digits}}\n\
         training: {{epochs: 2, batch_size: 16, optimizer: {{name: sgd, lr: 0.1}}}}\n\
         rounds: 4\n\
         seed: 7\n\
         clients: {{per_round: 3, min: 2, round_timeout: 30s}}\n\
         {extra}"
    )
}

async fn run_job(fed: &Federation, spec: &str) -> pb::Job {
    let job = fed.create_job(spec).await.expect("create job");
    fed.wait_end(&job.id, JOB_WAIT).await.expect("job ends")
}

/// Runs the clean job, connects the adversary, runs the attacked job; checks both succeeded
/// and their held-out accuracies are within 2 points. Returns the attacked job.
async fn clean_then_attacked(
    fed: &Federation,
    dir: &std::path::Path,
    extra: &str,
    behaviour: Behaviour,
) -> (pb::Job, Adversary) {
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 2
    })
    .await;
    let clean = run_job(fed, &spec("clean", extra)).await;
    assert_eq!(state_of(&clean), JobState::Succeeded, "{}", clean.reason);
    let clean_accuracy = fed.heldout_accuracy(&clean).await.expect("clean accuracy");

    let adversary = Adversary::connect(fed, dir, "mallory", behaviour)
        .await
        .expect("the adversary registers");
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 3
    })
    .await;
    let attacked = run_job(fed, &spec("attacked", extra)).await;
    assert_eq!(
        state_of(&attacked),
        JobState::Succeeded,
        "the attacked job must succeed with the honest parties: {}",
        attacked.reason
    );
    assert_eq!(attacked.rounds_completed, 4);
    let attacked_accuracy = fed.heldout_accuracy(&attacked).await.expect("accuracy");
    assert!(
        (attacked_accuracy - clean_accuracy).abs() <= 0.02,
        "held-out accuracy {attacked_accuracy:.4} under attack vs {clean_accuracy:.4} clean"
    );
    eprintln!(
        "held-out accuracy: clean {clean_accuracy:.4}, attacked {attacked_accuracy:.4}; \
         rounds: {:?}",
        attacked
            .rounds
            .iter()
            .map(|r| (
                r.updates,
                r.dropped_updates,
                r.refused_updates,
                r.task_failures
            ))
            .collect::<Vec<_>>()
    );
    (attacked, adversary)
}

/// The job's log entries of `kind` about `party`.
async fn log_entries(fed: &Federation, job: &pb::Job, kind: &str, party: &str) -> Vec<String> {
    fed.events(&job.id)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == kind && e.party == party)
        .map(|e| e.reason)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn updates_of_f32_max_are_dropped_and_the_job_learns_from_the_others() {
    let fed = federation().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (job, adversary) = clean_then_attacked(
        &fed,
        dir.path(),
        "",
        Behaviour::digits(600, UpdateKind::Constant(f32::MAX)),
    )
    .await;
    assert!(
        job.rounds
            .iter()
            .all(|r| r.dropped_updates == 1 && r.updates == 2),
        "each round drops the adversary's update: {:?}",
        job.rounds
    );
    let dropped = log_entries(&fed, &job, "update_dropped", "mallory").await;
    assert_eq!(dropped.len(), 4, "{dropped:?}");
    assert!(dropped[0].contains("norm"), "{dropped:?}");
    let answers = adversary.attempts();
    assert!(
        answers
            .iter()
            .filter(|a| a.kind == pb::TaskKind::Train)
            .all(|a| matches!(&a.answer, Err((Code::InvalidArgument, _)))),
        "{answers:?}"
    );
}

/// L2 distance between two models of one layout.
fn distance(a: &[cohort_core::NamedTensor], b: &[cohort_core::NamedTensor]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data))
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_party_whose_weight_is_inflated_is_refused_or_capped() {
    let fed = federation().await;
    let dir = tempfile::tempdir().expect("temp dir");
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 2
    })
    .await;
    // Beyond what a server accepts at all: refused at registration, naming the field.
    let refused = Adversary::connect(
        &fed,
        dir.path(),
        "bragger",
        Behaviour::digits(1_000_000_000_000_000_000, UpdateKind::Constant(0.0)),
    )
    .await
    .err()
    .expect("a quintillion samples is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("samples"), "{refused:?}");

    // Within the server's bound, a thousand times the honest parties' data, sending nothing
    // useful: with `max_weight_share: 0.5` it weighs as much as both honest parties together
    // and no more, so round 1 moves the model half as far as without it (uncapped it would
    // not move at all: 1438 of a million).
    let extra = "aggregation: {max_weight_share: 0.5}\n";
    let clean = run_job(&fed, &spec("clean", extra)).await;
    assert_eq!(state_of(&clean), JobState::Succeeded, "{}", clean.reason);
    let _adversary = Adversary::connect(
        &fed,
        dir.path(),
        "mallory",
        Behaviour::digits(1_000_000, UpdateKind::Constant(0.0)),
    )
    .await
    .expect("registers");
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 3
    })
    .await;
    let attacked = run_job(&fed, &spec("attacked", extra)).await;
    assert_eq!(
        state_of(&attacked),
        JobState::Succeeded,
        "{}",
        attacked.reason
    );
    assert!(
        attacked.rounds.iter().all(|r| r.updates == 3),
        "{:?}",
        attacked.rounds
    );
    let model = cohort_core::JobSpec::from_json(&attacked.spec_json)
        .expect("spec")
        .model;
    let start = cohort_train::init_model(&model, 64, 10, 7).expect("the seed's initial model");
    let moved_clean = distance(&fed.model_version(&clean, 1).await.expect("model"), &start);
    let moved_attacked = distance(
        &fed.model_version(&attacked, 1).await.expect("model"),
        &start,
    );
    let ratio = moved_attacked / moved_clean;
    assert!(
        (0.4..=0.6).contains(&ratio),
        "round 1 moved the model {moved_attacked:.4} under attack vs {moved_clean:.4} clean \
         (ratio {ratio:.3}): the inflated party must weigh half"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_beyond_the_registration_at_job_start_are_refused() {
    let fed = federation().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Registers 600 samples, then claims a billion in every update.
    let mut behaviour = Behaviour::digits(600, UpdateKind::Noise { norm: 1.0 });
    behaviour.claimed_samples = Some(1_000_000_000);
    let (job, _adversary) = clean_then_attacked(&fed, dir.path(), "", behaviour).await;
    let refused = log_entries(&fed, &job, "update_refused", "mallory").await;
    assert!(!refused.is_empty(), "the refusals are in the job's log");
    assert!(refused[0].contains("header.samples"), "{refused:?}");
    assert!(
        job.rounds.iter().all(|r| r.refused_updates >= 1),
        "{:?}",
        job.rounds
    );
}

/// An upload that stalls is ended by the coordinator's idle timeout (2 s here) and the round
/// goes on with the others.
async fn stalled_uploads_end_without_stopping_the_job(stall: UpdateKind) {
    let fed = federation().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (job, adversary) =
        clean_then_attacked(&fed, dir.path(), "", Behaviour::digits(600, stall)).await;
    assert!(
        job.rounds.iter().all(|r| r.updates == 2),
        "{:?}",
        job.rounds
    );
    let answers = adversary.attempts();
    assert!(
        answers.iter().any(
            |a| matches!(&a.answer, Err((Code::DeadlineExceeded, m)) if m.contains("sent nothing"))
        ),
        "the stall was ended by the idle timeout: {answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_stalled_mid_stream_is_dropped_and_frees_its_slot() {
    stalled_uploads_end_without_stopping_the_job(UpdateKind::StallAfterFirstChunk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_stalled_after_its_header_is_dropped() {
    stalled_uploads_end_without_stopping_the_job(UpdateKind::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_party_with_data_of_another_shape_is_left_out_not_the_job_failed() {
    let fed = federation().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let behaviour = Behaviour {
        datasets: vec![("digits".into(), 600, 3, 10)],
        claimed_samples: None,
        update: UpdateKind::Constant(1.0),
        evaluation: Some((600, 0.0, 1.0)),
    };
    let (job, adversary) = clean_then_attacked(&fed, dir.path(), "", behaviour).await;
    let left_out = log_entries(&fed, &job, "party_left_out", "mallory").await;
    assert_eq!(left_out.len(), 1, "said once: {left_out:?}");
    assert!(left_out[0].contains("3 features"), "{left_out:?}");
    assert!(adversary.attempts().is_empty(), "never offered a task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_evaluation_does_not_end_the_job() {
    let fed = federation().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut behaviour = Behaviour::digits(600, UpdateKind::Constant(f32::MAX));
    behaviour.evaluation = Some((1_000_000_000, 0.0, 1.0));
    let (job, _adversary) = clean_then_attacked(
        &fed,
        dir.path(),
        "stop: {target_accuracy: 0.99}\n",
        behaviour,
    )
    .await;
    assert!(job.reason.contains("completed 4 rounds"), "{}", job.reason);
    for r in &job.rounds {
        assert!(r.robust_accuracy < 0.99, "{r:?}");
        // The forged report weighs no more than the party registered.
        assert!(r.evaluation.is_some_and(|e| e.samples < 10_000), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_calls_at_another_job_are_refused_without_flooding_its_log() {
    let fed = federation().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Holds a dataset no job uses: never offered a task, only aims calls.
    let adversary = Adversary::connect(
        &fed,
        dir.path(),
        "mallory",
        Behaviour {
            datasets: vec![("other".into(), 10, 4, 2)],
            claimed_samples: None,
            update: UpdateKind::Constant(0.0),
            evaluation: None,
        },
    )
    .await
    .expect("registers");
    // Long enough that the 200 calls below all reach a running coordinator on a loaded
    // machine (four rounds were over before them under stress-ng).
    let job = fed
        .create_job(&spec("target", "").replace("rounds: 4", "rounds: 20"))
        .await
        .expect("create job");
    fed.wait_job(&job.id, JOB_WAIT, "round 1 to start", |j| {
        state_of(j) == JobState::Running
    })
    .await
    .expect("running");
    let mut round = adversary.round();
    let mut refused = 0;
    for i in 0..200 {
        let r = round
            .submit_evaluation(for_job(
                &job.id,
                pb::SubmitEvaluationRequest {
                    task_token: format!("forged-token-{i:040}"),
                    metrics: Some(pb::Metrics {
                        loss: 0.0,
                        accuracy: 1.0,
                        samples: 10,
                    }),
                },
            ))
            .await;
        if let Err(s) = r {
            assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, 200);
    let job = fed.wait_end(&job.id, JOB_WAIT).await.expect("job ends");
    assert_eq!(state_of(&job), JobState::Succeeded, "{}", job.reason);
    let counted: u32 = job.rounds.iter().map(|r| r.refused_updates).sum();
    assert!(counted >= 150, "refusals counted in the rounds: {counted}");
    let log = std::fs::read_to_string(fed.dir.path().join(format!(
        "server/work/coordinators/coordinator-{}.log",
        job.id
    )))
    .expect("coordinator log");
    let lines = log.matches("round call refused").count();
    assert!(
        lines <= 12,
        "200 refusals wrote {lines} log lines: the coordinator's log must not flood"
    );
}

/// An API for a new token of `namespace` with `role` (created by the federation's admin).
async fn token_for(fed: &Federation, namespace: &str, role: pb::Role) -> cohort_cli::Api {
    let created = fed
        .api()
        .tokens()
        .create_token(pb::CreateTokenRequest {
            name: format!("{namespace}-member"),
            namespace: namespace.into(),
            role: role as i32,
        })
        .await
        .expect("admin creates a token")
        .into_inner();
    cohort_cli::Api::from_profile(&cohort_cli::profile::Profile {
        token: Some(created.token),
        ..fed.stack.profile()
    })
    .expect("api")
}

async fn download(api: &cohort_cli::Api, name: &str) -> Result<Vec<u8>, tonic::Status> {
    use futures::StreamExt;
    let mut stream = api
        .models()
        .download(pb::GetVersionRequest {
            name: name.into(),
            version: 1,
            namespace: String::new(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?.data);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_namespaces_model_is_neither_readable_nor_detectable() {
    let fed = federation().await;
    let team_a = token_for(&fed, "team-a", pb::Role::Member).await;
    let team_b = token_for(&fed, "team-b", pb::Role::Member).await;
    upload_model(&team_a, "a-secret", digits_mlp(&[32], 1))
        .await
        .expect("team-a uploads");

    // A job in team-b starting from team-a's model fails exactly as from a missing one.
    let job_spec = |name: &str, init: &str| {
        format!(
            "namespace: team-b\n{}",
            spec(name, "").replace(
                "hidden: [32]}",
                &format!("hidden: [32], init: \"{init}\", name: {name}-model}}")
            )
        )
    };
    let mut reasons = Vec::new();
    for (name, init) in [("steal", "a-secret@1"), ("miss", "no-such-model@1")] {
        let job = team_b
            .jobs()
            .create_job(pb::CreateJobRequest {
                spec: job_spec(name, init),
            })
            .await
            .expect("create")
            .into_inner();
        let done = fed.wait_end(&job.id, JOB_WAIT).await.expect("ends");
        assert_eq!(state_of(&done), JobState::Failed, "{}", done.reason);
        reasons.push(
            done.reason
                .replace(init.split('@').next().unwrap_or_default(), "NAME"),
        );
    }
    assert!(reasons[0].contains("not found"), "{reasons:?}");
    assert_eq!(
        reasons[0], reasons[1],
        "another namespace's model answers like a missing one"
    );

    // Read directly: the same.
    let theirs = download(&team_b, "a-secret")
        .await
        .expect_err("not team-b's");
    let missing = download(&team_b, "never-was").await.expect_err("missing");
    assert_eq!(theirs.code(), Code::NotFound);
    assert_eq!(
        theirs.message().replace("a-secret", "NAME"),
        missing.message().replace("never-was", "NAME")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_names_belong_to_their_namespace_and_jobs_do_not_collide() {
    let fed = federation().await;
    let team_a = token_for(&fed, "team-a", pb::Role::Member).await;
    let team_b = token_for(&fed, "team-b", pb::Role::Member).await;
    // team-b takes the name first; team-a's model of that name is its own all the same.
    let b = upload_model(&team_b, "shared-name", digits_mlp(&[32], 2))
        .await
        .expect("team-b");
    let a = upload_model(&team_a, "shared-name", digits_mlp(&[32], 3))
        .await
        .expect("team-a is not squatted");
    assert_eq!((a.version, b.version), (1, 1));
    assert_eq!(
        download(&team_a, "shared-name").await.expect("a"),
        digits_mlp(&[32], 3)
    );
    assert_eq!(
        download(&team_b, "shared-name").await.expect("b"),
        digits_mlp(&[32], 2)
    );

    // Two jobs of one name in one namespace each get their own model.
    let mut names = Vec::new();
    for _ in 0..2 {
        let job = fed
            .create_job(&spec("same-name", ""))
            .await
            .expect("create");
        let done = fed.wait_end(&job.id, JOB_WAIT).await.expect("ends");
        assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
        let versions = fed
            .models()
            .list_versions(pb::ListVersionsRequest {
                name: done.model_name.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .versions;
        assert_eq!(
            versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![1, 2, 3, 4],
            "one version per round, no other job's"
        );
        names.push(done.model_name);
    }
    assert_ne!(names[0], names[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registration_raised_mid_job_does_not_raise_the_weight() {
    let fed = federation().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let first = Adversary::connect(
        &fed,
        dir.path(),
        "mallory",
        Behaviour::digits(600, UpdateKind::Noise { norm: 1.0 }),
    )
    .await
    .expect("registers 600 samples");
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 3
    })
    .await;
    let job = fed.create_job(&spec("raised", "")).await.expect("create");
    fed.wait_job(&job.id, JOB_WAIT, "round 1", |j| j.rounds_completed >= 1)
        .await
        .expect("round 1 completes");
    // Reconnects claiming a billion samples, and claims them in its updates.
    drop(first);
    let mut raised = Behaviour::digits(1_000_000_000, UpdateKind::Noise { norm: 1.0 });
    raised.claimed_samples = Some(1_000_000_000);
    let second = Adversary::connect(&fed, dir.path(), "mallory", raised)
        .await
        .expect("re-registers");
    let done = fed.wait_end(&job.id, JOB_WAIT).await.expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    let refusals: Vec<_> = second
        .attempts()
        .into_iter()
        .filter(|a| a.job_id == job.id && a.kind == pb::TaskKind::Train)
        .collect();
    assert!(!refusals.is_empty(), "offered tasks after re-registering");
    for a in &refusals {
        assert!(
            matches!(&a.answer, Err((Code::InvalidArgument, m)) if m.contains("header.samples") && m.contains("600")),
            "weighed by what it registered when the job started: {a:?}"
        );
    }
}
