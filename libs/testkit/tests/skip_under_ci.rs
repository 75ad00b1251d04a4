//! `skip` and `require_env` as a test sees them: this test binary runs its
//! own probes in a child process with `CI` set in different ways, and checks
//! that a skip passes (saying so) outside CI and fails under it.

use std::process::{Command, Output};

const PROBE_VAR: &str = "COHORT_TESTKIT_PROBE_NEVER_SET";

/// Runs `probe` (an ignored test of this binary) alone, with `CI` as given.
fn run_probe(probe: &str, ci: Option<&str>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--ignored", "--exact", "--nocapture", probe])
        .env_remove(PROBE_VAR);
    match ci {
        Some(value) => cmd.env("CI", value),
        None => cmd.env_remove("CI"),
    };
    cmd.output().expect("run the probe")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
#[ignore = "a probe run by the tests below in a child process"]
fn probe_require_env() {
    assert_eq!(
        cohort_testkit::require_env(PROBE_VAR, "a server the probe never gets"),
        None
    );
}

#[test]
#[ignore = "a probe run by the tests below in a child process"]
fn probe_skip() {
    cohort_testkit::skip("the probe's tool is not installed");
}

#[test]
fn a_missing_service_skips_outside_ci_and_fails_under_ci() {
    for probe in ["probe_require_env", "probe_skip"] {
        for ci in [None, Some(""), Some("false"), Some("0")] {
            let out = run_probe(probe, ci);
            let text = text(&out);
            assert!(out.status.success(), "{probe} with CI={ci:?}: {text}");
            assert!(text.contains("skipped: "), "{probe} with CI={ci:?}: {text}");
            assert!(text.contains("1 passed"), "{probe} ran: {text}");
        }
        for ci in ["true", "1"] {
            let out = run_probe(probe, Some(ci));
            let text = text(&out);
            assert!(
                !out.status.success(),
                "{probe} with CI={ci:?} passed: {text}"
            );
            assert!(
                text.contains("under CI") && !text.contains("skipped: "),
                "{probe} with CI={ci:?}: {text}"
            );
        }
    }
}
