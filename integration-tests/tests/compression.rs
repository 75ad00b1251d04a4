//! Compression of updates on the wire (issue 15), on digits (3 parties at α = 0.5, seed 7):
//! in 15 rounds 8-bit quantisation moves at most 30 % of the bytes plain FedAvg moves from
//! the parties and loses at most one point of held-out accuracy against it, and 4-bit
//! reaches 0.85. Top-k at 1 % moves at most 5 %, its parties keeping their residual in their
//! workspace (error feedback); on this model (2410 parameters: 27 values a party a round)
//! it needs 30 rounds to reach 0.85 (15 reach about 0.73), top-k at 10 % reaches it in 15.
//! SCAFFOLD's control-variate tensors compress like the model's. A party cannot choose its
//! own compression: the coordinator drops an update in any dtype but the one the job's spec
//! asks for. Every test prints its figures.

use std::time::Duration;

use cohort_core::spec::Compression;
use cohort_integration_tests::adversary::{Adversary, Behaviour, UpdateKind};
use cohort_integration_tests::{Federation, digits_job, files_under, wait_clients};
use cohort_proto::v1 as pb;

const ROUNDS: u32 = 15;

fn job(name: &str, compression: Option<&str>) -> String {
    job_of(name, ROUNDS, compression)
}

fn job_of(name: &str, rounds: u32, compression: Option<&str>) -> String {
    let mut spec = format!("{}seed: 7\n", digits_job(name, rounds, 3, 3, "60s"));
    if let Some(c) = compression {
        spec.push_str(&format!("compression: {c}\n"));
    }
    spec
}

/// Update bytes the job's rounds received from parties, and what they decoded to.
fn moved(job: &pb::Job) -> (u64, u64) {
    assert!(
        job.rounds
            .iter()
            .all(|r| r.bytes_from_parties_uncompressed > 0),
        "every round counts both: {:?}",
        job.rounds
    );
    job.rounds.iter().fold((0, 0), |(rx, dense), r| {
        (
            rx + r.bytes_from_parties,
            dense + r.bytes_from_parties_uncompressed,
        )
    })
}

fn updates(job: &pb::Job) -> u32 {
    job.rounds.iter().map(|r| r.updates).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_quantisation_moves_under_30_percent_and_keeps_accuracy() {
    let fed = Federation::start(3).await.expect("federation");
    let (plain, plain_accuracy) = fed.run_to_success("fedavg", &job("plain", None)).await;
    let (q8, q8_accuracy) = fed
        .run_to_success("q8", &job("q8", Some("{quantize_bits: 8}")))
        .await;
    let (plain_rx, plain_dense) = moved(&plain);
    let (q8_rx, q8_dense) = moved(&q8);
    let ratio = q8_rx as f64 / plain_rx as f64;
    eprintln!(
        "fedavg: {plain_rx} bytes from parties, accuracy {plain_accuracy:.3}; 8-bit: {q8_rx} \
         bytes ({:.1} % of fedavg's), accuracy {q8_accuracy:.3}",
        100.0 * ratio
    );
    assert_eq!(plain_rx, plain_dense, "uncompressed, both counts agree");
    assert_eq!(
        (updates(&q8), q8_dense),
        (updates(&plain), plain_dense),
        "the same updates, decoded to the same size"
    );
    assert!(ratio <= 0.30, "8-bit moved {:.1} %", 100.0 * ratio);
    assert!(
        q8_accuracy >= plain_accuracy - 0.01,
        "8-bit lost more than a point: {q8_accuracy:.3} against {plain_accuracy:.3}"
    );
    // The same accuracy, but not the same model: the rounding noise is there.
    let (a, b) = (
        fed.model_version(&plain, 0).await.expect("fedavg's model"),
        fed.model_version(&q8, 0).await.expect("8-bit's model"),
    );
    let apart = a
        .iter()
        .zip(&b)
        .flat_map(|(a, b)| a.data.iter().zip(&b.data))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("largest weight difference between the two models: {apart:e}");
    assert!(apart > 0.0, "8-bit trained exactly as fedavg");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_bit_quantisation_reaches_085() {
    let fed = Federation::start(3).await.expect("federation");
    let (q4, accuracy) = fed
        .run_to_success("q4", &job("q4", Some("{quantize_bits: 4}")))
        .await;
    let (rx, dense) = moved(&q4);
    let ratio = rx as f64 / dense as f64;
    eprintln!(
        "4-bit: {rx} of {dense} bytes ({:.1} %), accuracy {accuracy:.3}",
        100.0 * ratio
    );
    assert!(ratio <= 0.16, "4-bit moved {:.1} %", 100.0 * ratio);
    assert!(accuracy >= 0.85, "4-bit: accuracy {accuracy:.3} < 0.85");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_at_one_percent_moves_under_5_percent_with_error_feedback() {
    let fed = Federation::start(3).await.expect("federation");
    let mut reached = Vec::new();
    for (name, rounds, top_k) in [
        ("topk-15", ROUNDS, "0.01"),
        ("topk-30", 30, "0.01"),
        ("topk10-15", ROUNDS, "0.1"),
    ] {
        let compression = format!("{{top_k: {top_k}}}");
        let (done, accuracy) = fed
            .run_to_success(name, &job_of(name, rounds, Some(&compression)))
            .await;
        let (rx, dense) = moved(&done);
        let ratio = rx as f64 / dense as f64;
        eprintln!(
            "top-k {top_k}, {rounds} rounds: {rx} of {dense} bytes ({:.2} %), accuracy \
             {accuracy:.3}",
            100.0 * ratio
        );
        reached.push((done, ratio, accuracy));
    }
    let [
        (_, ratio_15, accuracy_15),
        (at_30, ratio_30, accuracy_30),
        (_, ratio_10, accuracy_10),
    ] = &reached[..]
    else {
        unreachable!("three jobs")
    };
    assert!(
        *ratio_15 <= 0.05 && *ratio_30 <= 0.05,
        "top-k 1 % moved {ratio_15} / {ratio_30}"
    );
    assert!(*ratio_10 <= 0.25, "top-k 10 % moved {ratio_10}");
    // Each party kept what it left out, in its workspace, for its next round.
    let kept: Vec<String> = files_under(&fed.dir.path().join("parties"))
        .into_iter()
        .filter(|f| f.ends_with(&format!("/jobs/{}/topk_residual.safetensors", at_30.id)))
        .collect();
    assert_eq!(kept.len(), 3, "a residual per party: {kept:#?}");
    for file in &kept {
        let residual = cohort_fl::from_safetensors(&std::fs::read(file).expect("read"))
            .expect("the residual is safetensors");
        assert!(
            residual.iter().flat_map(|t| &t.data).any(|v| *v != 0.0),
            "{file}: nothing kept"
        );
    }
    // 15 rounds of 1 % learn, but not to 0.85 (without error feedback: 0.66, and 0.86 at
    // 30 rounds, measured with the residual left out).
    assert!(
        *accuracy_15 >= 0.5,
        "top-k 1 %, 15 rounds: {accuracy_15:.3}"
    );
    assert!(
        *accuracy_30 >= 0.85,
        "top-k 1 %, 30 rounds: {accuracy_30:.3} < 0.85"
    );
    assert!(
        *accuracy_10 >= 0.85,
        "top-k 10 %, 15 rounds: {accuracy_10:.3} < 0.85"
    );
}

/// SCAFFOLD's updates carry the change of the party's control variate (`scaffold.c/*`)
/// beside the model delta: compressed like any tensor, they still train.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_updates_compress_too() {
    let fed = Federation::start(3).await.expect("federation");
    let mut reached = Vec::new();
    for compression in ["{quantize_bits: 8}", "{top_k: 0.1}"] {
        let spec = format!(
            "{}aggregation: {{strategy: scaffold}}\n",
            job("scaffold", Some(compression))
        );
        let (done, accuracy) = fed.run_to_success(compression, &spec).await;
        let (rx, dense) = moved(&done);
        eprintln!(
            "scaffold with {compression}: {:.1} % of the bytes, accuracy {accuracy:.3}",
            100.0 * rx as f64 / dense as f64
        );
        reached.push((compression, accuracy));
    }
    for (compression, accuracy) in reached {
        assert!(
            accuracy >= 0.85,
            "scaffold with {compression}: {accuracy:.3}"
        );
    }
}

/// Two hostile parties with real certificates send updates compressed as they choose:
/// q8 and topk chunks to a job without compression, and topk chunks to a q8 job. Each is
/// dropped with the reason in the job's log; the q8 party's update to the q8 job counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_cannot_choose_its_compression() {
    let fed = Federation::start(2).await.expect("federation");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut adversaries = Vec::new();
    for (name, method) in [
        ("mallory", Compression::Quantize { bits: 8 }),
        ("trudy", Compression::TopK { fraction: 0.1 }),
    ] {
        let behaviour = Behaviour::digits(400, UpdateKind::Compressed(method));
        let adversary = Adversary::connect(&fed, dir.path(), name, behaviour).await;
        adversaries.push(adversary.expect("the adversary registers"));
    }
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 4
    })
    .await;
    let spec = |name: &str, compression: &str| {
        format!("{}seed: 7\n{compression}", digits_job(name, 2, 4, 2, "60s"))
    };
    let (plain, _) = fed.run_to_success("plain", &spec("plain", "")).await;
    let (q8, _) = fed
        .run_to_success("q8", &spec("q8", "compression: {quantize_bits: 8}\n"))
        .await;
    let dropped = |job: &pb::Job, events: &[pb::JobEvent], party: &str| -> Vec<String> {
        let reasons: Vec<String> = events
            .iter()
            .filter(|e| e.kind == "update_dropped" && e.party == party)
            .map(|e| e.reason.clone())
            .collect();
        eprintln!("{}: {party}'s dropped updates: {reasons:?}", job.name);
        reasons
    };
    let plain_events = fed.events(&plain.id).await.expect("events");
    for party in ["mallory", "trudy"] {
        let reasons = dropped(&plain, &plain_events, party);
        assert_eq!(reasons.len(), 2, "{party}: one drop a round: {reasons:?}");
        assert!(
            reasons
                .iter()
                .all(|r| r.contains("asks for no compression")),
            "{party}: {reasons:?}"
        );
    }
    assert!(
        plain.rounds.iter().all(|r| r.updates == 2),
        "{:?}",
        plain.rounds
    );
    let q8_events = fed.events(&q8.id).await.expect("events");
    assert!(dropped(&q8, &q8_events, "mallory").is_empty());
    let reasons = dropped(&q8, &q8_events, "trudy");
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("every chunk must be \"q8\"")),
        "{reasons:?}"
    );
    assert!(q8.rounds.iter().all(|r| r.updates == 3), "{:?}", q8.rounds);
    drop(adversaries);
}
