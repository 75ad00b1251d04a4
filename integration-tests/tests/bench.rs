//! `cohort bench`: the real binary measures, checks its own result and refuses bad sizes.

use std::path::Path;

use cohort_integration_tests::cohort;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_aggregate_folds_exactly_and_reports_its_throughput() {
    // No federation: the profile is never read.
    let profile = Path::new("/nonexistent/profile.toml");
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
    assert_eq!(report["update_bytes"], 3 * 300_001 * 4, "{report}");
    let error = report["aggregate_max_abs_error"].as_f64().expect("error");
    assert!(error < 1e-6, "{report}");
    for rate in ["fold_gb_per_s", "check_gb_per_s"] {
        assert!(report[rate].as_f64().is_some_and(|r| r > 0.0), "{report}");
    }

    // Sizes out of range are usage errors naming the flag.
    for (flag, value) in [
        ("--params", "0"),
        ("--updates", "0"),
        ("--threads", "0"),
        ("--params", "99999999999"),
    ] {
        let (code, _, err) = cohort(&["bench", "aggregate", flag, value], profile)
            .await
            .expect("run cohort");
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}
