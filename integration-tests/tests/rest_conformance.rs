//! The REST API against its own OpenAPI document, property-based: schemathesis reads
//! `/api/openapi.json` from a running federation and sends generated requests (valid and
//! invalid) to every operation with an admin token; no answer may be a 5xx or differ
//! from the document (status, content type, body schema). Bounded: a fixed seed, few
//! examples per operation, a hard timeout.
//!
//! Needs schemathesis, named by `COHORT_TEST_SCHEMATHESIS` (scripts/test-services.sh
//! installs it in its venv); skipped without it (failed under CI).

use std::time::Duration;

use cohort_integration_tests::Federation;

const RUN_LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_api_conforms_to_its_openapi_document() {
    let Some(schemathesis) = cohort_testkit::require_env(
        "COHORT_TEST_SCHEMATHESIS",
        "the schemathesis command, installed by scripts/test-services.sh",
    ) else {
        return;
    };
    let fed = Federation::start(0).await.expect("federation");
    let profile = fed.stack.profile();
    let token = profile.token.clone().expect("the admin token");
    let ca = profile.ca_cert.clone().expect("the federation CA");
    let base = format!("https://{}", profile.endpoint);
    let run = tokio::process::Command::new(&schemathesis)
        .arg("run")
        .arg(format!("{base}/api/openapi.json"))
        .args(["--url", &base])
        .arg("--tls-verify")
        .arg(&ca)
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "8", "--seed", "20261207", "--no-shrink"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "20", "--no-color"])
        .args(["--generation-database", "none"])
        // Whatever it keeps (.schemathesis, .hypothesis) goes to the federation's directory.
        .current_dir(fed.dir.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .expect("schemathesis finishes within its limit")
        .expect("schemathesis starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found failures (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
}
