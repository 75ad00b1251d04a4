//! `cohort bench`: the real binary measures, checks its own result and refuses bad sizes.

use std::path::Path;

use cohort_integration_tests::cohort;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_aggregate_folds_exactly_and_reports_its_throughput() {
    // No federation: the profile is never read.
    let profile = Path::new("/nonexistent/profile.toml");
    let run = |batch: &'static str| async move {
        let (code, out, err) = cohort(
            &[
                "--json",
                "bench",
                "aggregate",
                "--updates",
                "3",
                "--params",
                "300001",
                "--layers",
                "3",
                "--threads",
                "2",
                "--batch",
                batch,
                "--passes",
                "2",
            ],
            profile,
        )
        .await
        .expect("run cohort bench aggregate");
        assert_eq!(code, 0, "{err}");
        let report: Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(report["updates"], 3, "{report}");
        assert_eq!(report["params"], 300_001, "{report}");
        assert_eq!(report["layers"], 3, "{report}");
        assert_eq!(report["threads"], 2, "{report}");
        assert_eq!(report["passes"], 2, "{report}");
        assert_eq!(report["update_bytes"], 3 * 300_001 * 4, "{report}");
        let error = report["aggregate_max_abs_error"].as_f64().expect("error");
        assert!(error < 1e-6, "{report}");
        for rate in ["fold_gb_per_s", "first_pass_gb_per_s", "check_gb_per_s"] {
            assert!(report[rate].as_f64().is_some_and(|r| r > 0.0), "{report}");
        }
        report
    };
    let (together, one_by_one) = (run("3").await, run("1").await);
    assert_eq!(
        (&together["batch"], &one_by_one["batch"]),
        (&3.into(), &1.into())
    );
    // Folded together or one by one, the aggregate is the same to the bit.
    assert_eq!(
        together["aggregate_max_abs_error"], one_by_one["aggregate_max_abs_error"],
        "{together} vs {one_by_one}"
    );

    // Sizes out of range are usage errors naming the flag.
    for (flag, value) in [
        ("--params", "0"),
        ("--updates", "0"),
        ("--threads", "0"),
        ("--batch", "0"),
        ("--passes", "0"),
        ("--params", "99999999999"),
    ] {
        let (code, _, err) = cohort(&["bench", "aggregate", flag, value], profile)
            .await
            .expect("run cohort");
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}

/// The check: two parties, 10 000 parameters, two rounds through the real processes;
/// the final model is the exact average, the counters are what the workload moves, and no
/// process of the federation outlives the bench.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_round_runs_the_federation_and_leaves_nothing_behind() {
    let profile = Path::new("/nonexistent/profile.toml");
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("federation");
    let data = data_dir.display().to_string();
    let (code, out, err) = cohort(
        &[
            "--json",
            "bench",
            "round",
            "--parties",
            "2",
            "--params",
            "10000",
            "--rounds",
            "2",
            "--data-dir",
            &data,
        ],
        profile,
    )
    .await
    .expect("run cohort bench round");
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(report["state"], "SUCCEEDED", "{report}");
    assert_eq!(report["parties"], 2, "{report}");
    assert_eq!(report["params"], 10_000, "{report}");
    let error = report["aggregate_max_abs_error"].as_f64().expect("error");
    assert!(error < 1e-6, "{report}");
    let rounds = report["round_s"].as_array().expect("round_s");
    assert_eq!(rounds.len(), 2, "{report}");
    assert!(rounds.iter().all(|r| r.as_f64().is_some_and(|s| s > 0.0)));
    // Each party fetches the model and sends one update per round: 2 × 2 × 40 000 bytes.
    assert_eq!(report["bytes_to_parties"], 160_000, "{report}");
    assert_eq!(report["bytes_from_parties"], 160_000, "{report}");
    for peak in [
        "coordinator_peak_rss_bytes",
        "proxy_peak_rss_bytes",
        "model_manager_peak_rss_bytes",
        "party_peak_rss_bytes",
    ] {
        // Every process maps at least a few MB; 0 would mean it was never seen.
        let bytes = report[peak].as_u64().expect(peak);
        assert!(bytes > 4 << 20 && bytes < 1 << 30, "{peak}: {report}");
    }
    // The rounds really ran in the processes the bench started: the coordinator's log has them.
    let log = std::fs::read_to_string(data_dir.join("server/work/coordinators").join(format!(
        "coordinator-{}.log",
        report["job"].as_str().expect("job")
    )))
    .expect("the coordinator's log");
    assert_eq!(log.matches("round complete").count(), 2, "{log}");

    // Nothing is left: no process of its group, none running from its directory.
    let group = report["process_group"].as_i64().expect("process group") as i32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left: Vec<_> = cohort_integration_tests::processes()
            .into_iter()
            .filter(|(pid, _, pgid, _)| {
                *pgid == group
                    || std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&data))
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes left after the bench: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
