//! Secure aggregation end to end (issue 16), with real processes: parties mask their clipped
//! updates (`services/executor/src/secagg.rs`), the coordinator sums and unmasks only the
//! sum (`services/coordinator/src/secagg.rs`).
//!
//! - A digits job with `privacy.secure_aggregation` trains like FedAvg with every update
//!   clipped to the same bound and weighing the same (`privacy.dp` with noise_multiplier 0:
//!   DP-FedAvg's clip, weight 1, no noise), the only FedAvg secure aggregation can equal
//!   (its sum has no weights): held-out accuracy within 1 point; plain (sample-weighted)
//!   FedAvg's is printed beside it.
//! - The tap: the coordinator's `COHORT_SECAGG_TAP_DIR` (a test-only switch) copies every
//!   masked update exactly as it arrived, and each party's the clipped update it masked.
//!   No masked update correlates with its party's update (|r| < 0.05 over ~19k values),
//!   while the round's model minus the initial one equals the mean of the parties' clipped
//!   updates within the encoding's bound (and correlates with their sum, r > 0.999).
//! - Dropout (5 parties, t = 3; `COHORT_SECAGG_EXIT_AT`, a test-only executor switch,
//!   makes a party's executor exit at that point): one party gone after its masked update,
//!   one before — the round completes with the mean of the four masked updates that arrived;
//!   three gone before — the job fails with a reason naming the threshold.
//! - SecAgg+'s sparse graph (8 parties, `secagg_neighbours: 4`, t = 3 of a party and its
//!   four neighbours): each party shares with and masks against its 4 neighbours only (a
//!   coordinator and parties that disagreed on the graph would refuse each other's shares);
//!   with one party gone after its masked update and one before, the round's mean is the
//!   mean of the six that arrived.
//! - A hostile party (a real certificate, `adversary.rs`) that sends key shares in another
//!   party's name, then replays its keys of the round before, is refused each time, the
//!   refusals counted in `refused_updates` and written to the job's log; the job succeeds
//!   with the honest parties.

use std::path::Path;
use std::time::Duration;

use cohort_core::{JobState, NamedTensor};
use cohort_integration_tests::adversary::{Adversary, Behaviour, UpdateKind};
use cohort_integration_tests::{Federation, digits_job, state_of, wait_clients};

const CLIP: f64 = 5.0;
const TAP: &str = "COHORT_SECAGG_TAP_DIR";

/// A digits job of every party of `parties` (seed 7, one epoch a round).
fn job(name: &str, rounds: u32, parties: u32, min: u32, extra: &str) -> String {
    format!(
        "{}seed: 7\n{extra}",
        digits_job(name, rounds, parties, min, "60s")
    )
}

fn secure(threshold: u32) -> String {
    format!(
        "privacy: {{secure_aggregation: true, secagg_threshold: {threshold}, secagg_clip: {CLIP}}}\n"
    )
}

/// FedAvg with every update clipped to CLIP and weighing 1, no noise: what secure
/// aggregation's mean is.
fn equal_weight_fedavg() -> String {
    format!("privacy: {{dp: {{clip: {CLIP}, noise_multiplier: 0, delta: 1e-5}}}}\n")
}

fn flat(tensors: &[NamedTensor]) -> Vec<f64> {
    tensors
        .iter()
        .flat_map(|t| t.data.iter().map(|x| f64::from(*x)))
        .collect()
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma).powi(2);
        vb += (y - mb).powi(2);
    }
    cov / (va.sqrt() * vb.sqrt())
}

/// Per element: the most secure aggregation's mean of `n` parties may differ from the exact
/// mean of their clipped updates (`cohort_secagg::Encoding::mean_error_bound`), plus the f32
/// rounding of adding it to the model (half an ulp of values below 4).
fn bound(n: usize) -> f64 {
    cohort_secagg::Encoding::new(CLIP as f32, n)
        .expect("encoding")
        .mean_error_bound()
        + 4.0 * f64::from(f32::EPSILON)
}

async fn wait_parties(fed: &Federation, n: usize) {
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == n
    })
    .await;
}

fn read_f32(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect()
}

fn read_ring(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect()
}

/// The model after round 1 minus the seed's initial model.
async fn first_step(fed: &Federation, job: &cohort_proto::v1::Job) -> Vec<f64> {
    let spec = cohort_core::JobSpec::from_json(&job.spec_json).expect("spec");
    let start = cohort_train::init_model(&spec.model, 64, 10, 7).expect("initial model");
    let after = fed.model_version(job, 1).await.expect("round 1's model");
    flat(&after)
        .iter()
        .zip(flat(&start))
        .map(|(a, s)| a - s)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn digits_with_secure_aggregation_trains_like_equal_weight_fedavg() {
    const ROUNDS: u32 = 15;
    let fed = Federation::start(3).await.expect("federation");
    wait_parties(&fed, 3).await;
    let (masked, secure_accuracy) = fed
        .run_to_success("secagg", &job("secagg", ROUNDS, 3, 3, &secure(2)))
        .await;
    let (equal, equal_accuracy) = fed
        .run_to_success(
            "equal-weight fedavg",
            &job("fedavg-equal", ROUNDS, 3, 3, &equal_weight_fedavg()),
        )
        .await;
    let (_, plain_accuracy) = fed
        .run_to_success("fedavg", &job("fedavg", ROUNDS, 3, 3, ""))
        .await;
    eprintln!(
        "held-out accuracy after {ROUNDS} rounds: secure aggregation {secure_accuracy:.4}, \
         FedAvg clipped at {CLIP} with equal weights {equal_accuracy:.4}, plain FedAvg \
         {plain_accuracy:.4}"
    );
    assert_eq!(masked.rounds_completed, ROUNDS);
    assert!(
        masked
            .rounds
            .iter()
            .all(|r| r.updates == 3 && r.refused_updates == 0),
        "{:?}",
        masked.rounds
    );
    assert!(
        (secure_accuracy - equal_accuracy).abs() <= 0.01,
        "secure aggregation {secure_accuracy:.4} vs equal-weight FedAvg {equal_accuracy:.4}"
    );
    assert!(
        (secure_accuracy - plain_accuracy).abs() <= 0.01,
        "secure aggregation {secure_accuracy:.4} vs FedAvg {plain_accuracy:.4}"
    );
    // Round 1 from the same model, the same parties and seeds: the same aggregate within
    // the encoding's bound (training is deterministic for a task seed).
    let a = first_step(&fed, &masked).await;
    let b = first_step(&fed, &equal).await;
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "round 1: largest difference from equal-weight FedAvg {worst:.3e} (bound {:.3e})",
        bound(3)
    );
    assert!(worst <= bound(3), "{worst} > {}", bound(3));
    // What the coordinator carried over the wire: the masked updates, one model's worth
    // each (4 bytes per value), as many as parties.
    let r1 = &masked.rounds[0];
    let values = a.len() as u64;
    assert_eq!(r1.bytes_from_parties, 3 * 4 * values, "{r1:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_the_coordinator_receives_does_not_correlate_with_any_update_but_the_sum_does() {
    let tap = tempfile::tempdir().expect("tap dir");
    let dir = tap.path().display().to_string();
    let env = vec![(TAP.to_string(), dir.clone())];
    let fed = Federation::digits_with_env(3, env.clone(), env, Vec::new())
        .await
        .expect("federation");
    wait_parties(&fed, 3).await;
    // A wider model: ~19k values, so independent values' correlations stay near 0.007.
    let spec = job("secagg-tap", 1, 3, 3, &secure(2)).replace("hidden: [32]", "hidden: [256]");
    let (done, _) = fed.run_to_success("secagg tap", &spec).await;
    let mean = first_step(&fed, &done).await;
    let mut sum = vec![0.0; mean.len()];
    for party in ["party-1", "party-2", "party-3"] {
        let update = read_f32(&tap.path().join(format!("round-1-{party}.f32")));
        let received = read_ring(&tap.path().join(format!("round-1-{party}.ring32")));
        assert_eq!(update.len(), mean.len(), "{party}");
        assert_eq!(received.len(), mean.len(), "{party}");
        let r = pearson(&received, &update);
        eprintln!("{party}: correlation of what the coordinator received with its update: {r:+.4}");
        assert!(r.abs() < 0.05, "{party}: r = {r}");
        for (s, u) in sum.iter_mut().zip(&update) {
            *s += u;
        }
    }
    let r = pearson(&mean, &sum);
    let worst = mean
        .iter()
        .zip(&sum)
        .map(|(m, s)| (m - s / 3.0).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "the unmasked aggregate vs the parties' sum: r = {r:.6}; largest difference from their \
         mean {worst:.3e} (bound {:.3e})",
        bound(3)
    );
    assert!(r > 0.999, "r = {r}");
    assert!(worst <= bound(3), "{worst} > {}", bound(3));
}

/// `n` parties, each party's clipped update tapped; `exits` make those parties' executors
/// exit at a point of the protocol.
async fn parties_exiting(n: u32, exits: &[(&str, &str)], tap: &Path) -> Federation {
    let env = vec![(TAP.to_string(), tap.display().to_string())];
    let overrides = exits
        .iter()
        .map(|(party, at)| {
            (
                party.to_string(),
                vec![("COHORT_SECAGG_EXIT_AT".to_string(), at.to_string())],
            )
        })
        .collect();
    let fed = Federation::digits_with_env(n, env.clone(), env, overrides)
        .await
        .expect("federation");
    wait_parties(&fed, n as usize).await;
    fed
}

async fn five_parties(exits: &[(&str, &str)], tap: &Path) -> Federation {
    parties_exiting(5, exits, tap).await
}

/// The largest difference between round 1's step and the mean of `parties`' tapped updates.
async fn worst_from_mean(
    fed: &Federation,
    done: &cohort_proto::v1::Job,
    tap: &Path,
    parties: &[&str],
) -> f64 {
    let mean = first_step(fed, done).await;
    let mut sum = vec![0.0; mean.len()];
    for party in parties {
        let update = read_f32(&tap.join(format!("round-1-{party}.f32")));
        for (s, u) in sum.iter_mut().zip(&update) {
            *s += u;
        }
    }
    let n = parties.len() as f64;
    mean.iter()
        .zip(&sum)
        .map(|(m, s)| (m - s / n).abs())
        .fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_party_gone_after_its_masked_update_and_one_before_leave_the_mean_of_the_four() {
    let tap = tempfile::tempdir().expect("tap dir");
    let fed = five_parties(
        &[
            ("party-4", "after_masked_input"),
            ("party-5", "before_masked_input"),
        ],
        tap.path(),
    )
    .await;
    let (done, _) = fed
        .run_to_success("dropouts", &job("secagg-dropouts", 1, 5, 3, &secure(3)))
        .await;
    let r1 = &done.rounds[0];
    eprintln!(
        "round 1: {} updates, {} dropped, {} task failures",
        r1.updates, r1.dropped_updates, r1.task_failures
    );
    // party-4's masked update counts (its self-mask removed with the others' shares),
    // party-5's keys shared but no masked update: its pairwise masks are removed.
    assert_eq!((r1.updates, r1.dropped_updates), (4, 1), "{r1:?}");
    assert_eq!(r1.task_failures, 2, "{r1:?}");
    // The encoding is the roster's (5 parties); the mean is of the 4 that arrived.
    let worst = worst_from_mean(
        &fed,
        &done,
        tap.path(),
        &["party-1", "party-2", "party-3", "party-4"],
    )
    .await;
    eprintln!(
        "largest difference from the mean of parties 1-4: {worst:.3e} (bound {:.3e})",
        bound(5)
    );
    assert!(worst <= bound(5), "{worst} > {}", bound(5));
    let events = fed.events(&done.id).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.kind == "update_dropped" && e.party == "party-5"),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sparse_graph_of_eight_parties_recovers_two_dropouts() {
    let tap = tempfile::tempdir().expect("tap dir");
    let fed = parties_exiting(
        8,
        &[
            ("party-3", "after_masked_input"),
            ("party-6", "before_masked_input"),
        ],
        tap.path(),
    )
    .await;
    // Any two gone leave every neighbourhood of 5 with 3 holders, and H(4, 8) connected.
    let privacy = format!(
        "privacy: {{secure_aggregation: true, secagg_neighbours: 4, secagg_threshold: 3, \
         secagg_clip: {CLIP}}}\n"
    );
    let (done, _) = fed
        .run_to_success("sparse", &job("secagg-sparse", 1, 8, 3, &privacy))
        .await;
    let r1 = &done.rounds[0];
    assert_eq!((r1.updates, r1.dropped_updates), (7, 1), "{r1:?}");
    let arrived = [
        "party-1", "party-2", "party-3", "party-4", "party-5", "party-7", "party-8",
    ];
    let worst = worst_from_mean(&fed, &done, tap.path(), &arrived).await;
    eprintln!(
        "sparse graph: largest difference from the mean of the 7 masked updates: {worst:.3e} \
         (bound {:.3e})",
        bound(8)
    );
    assert!(worst <= bound(8), "{worst} > {}", bound(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_of_five_gone_fail_the_round_naming_the_threshold() {
    let tap = tempfile::tempdir().expect("tap dir");
    let fed = five_parties(
        &[
            ("party-3", "before_masked_input"),
            ("party-4", "before_masked_input"),
            ("party-5", "before_masked_input"),
        ],
        tap.path(),
    )
    .await;
    let created = fed
        .create_job(&job("secagg-below-t", 1, 5, 3, &secure(3)))
        .await
        .expect("create");
    let done = fed
        .wait_end(&created.id, Duration::from_secs(120))
        .await
        .expect("the job ends");
    eprintln!("{}: {}", state_of(&done), done.reason);
    assert_eq!(state_of(&done), JobState::Failed, "{}", done.reason);
    assert!(
        done.reason.contains("privacy.secagg_threshold t=3")
            && done.reason.contains("threshold t=3"),
        "{}",
        done.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shares_in_another_name_and_replayed_keys_are_refused_and_counted() {
    let fed = Federation::start(3).await.expect("federation");
    let dir = tempfile::tempdir().expect("temp dir");
    let _mallory = Adversary::connect(
        &fed,
        dir.path(),
        "mallory",
        Behaviour::digits(600, UpdateKind::SecAggCheat),
    )
    .await
    .expect("the adversary registers");
    wait_parties(&fed, 4).await;
    let (done, accuracy) = fed
        .run_to_success("secagg cheat", &job("secagg-cheat", 2, 4, 3, &secure(3)))
        .await;
    eprintln!(
        "rounds: {:?}; held-out accuracy {accuracy:.4}",
        done.rounds
            .iter()
            .map(|r| (r.updates, r.refused_updates, r.task_failures))
            .collect::<Vec<_>>()
    );
    assert!(
        done.rounds
            .iter()
            .all(|r| r.updates == 3 && r.refused_updates >= 1),
        "{:?}",
        done.rounds
    );
    let refused: Vec<(u32, String)> = fed
        .events(&done.id)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == "update_refused" && e.party == "mallory")
        .map(|e| (e.round, e.reason))
        .collect();
    eprintln!("{refused:#?}");
    assert!(
        refused
            .iter()
            .any(|(r, why)| *r == 1 && why.contains("claims to come from")),
        "round 1: the shares in another's name: {refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|(r, why)| *r == 2 && why.contains("round 1")),
        "round 2: the replayed keys: {refused:?}"
    );
}

/// Secure aggregation with `privacy.dp`: each party adds N(0, (z·clip)²/clients.min) after
/// clipping, so the released mean carries the central mechanism's noise — N(0, (z·clip)²) on
/// the sum, divided by clients.per_round — while the coordinator sees only masked updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_dp_the_parties_noise_adds_up_to_the_central_noise() {
    let tap = tempfile::tempdir().expect("tap dir");
    let env = vec![(TAP.to_string(), tap.path().display().to_string())];
    let fed = Federation::digits_with_env(3, Vec::new(), env, Vec::new())
        .await
        .expect("federation");
    wait_parties(&fed, 3).await;
    let (z, clip) = (1.0, 1.0);
    let privacy = format!(
        "privacy: {{secure_aggregation: true, secagg_threshold: 2, \
         dp: {{clip: {clip}, noise_multiplier: {z}, delta: 1e-5}}}}\n"
    );
    let (done, _) = fed
        .run_to_success("secagg + dp", &job("secagg-dp", 1, 3, 3, &privacy))
        .await;
    let mean = first_step(&fed, &done).await;
    let mut sum = vec![0.0; mean.len()];
    for party in ["party-1", "party-2", "party-3"] {
        let update = read_f32(&tap.path().join(format!("round-1-{party}.f32")));
        for (s, u) in sum.iter_mut().zip(&update) {
            *s += u;
        }
    }
    // What is left once the clipped updates' mean is taken away: the noise over per_round.
    let noise: Vec<f64> = mean.iter().zip(&sum).map(|(m, s)| m - s / 3.0).collect();
    let n = noise.len() as f64;
    let average = noise.iter().sum::<f64>() / n;
    let std = (noise.iter().map(|e| (e - average).powi(2)).sum::<f64>() / n).sqrt();
    let expected = z * clip / 3.0;
    let epsilon = done.rounds[0].dp_epsilon;
    eprintln!(
        "noise in the released mean: std {std:.4} (expected z·clip/per_round = {expected:.4}), \
         mean {average:+.4}, over {n} values; ε after the round {epsilon:.2}"
    );
    assert!(
        (std / expected - 1.0).abs() < 0.1,
        "std {std} vs {expected}"
    );
    assert!(average.abs() < 4.0 * expected / n.sqrt(), "mean {average}");
    assert!(epsilon.is_finite() && epsilon > 0.0, "ε {epsilon}");
}
