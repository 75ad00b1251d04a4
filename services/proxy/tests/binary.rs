//! The `proxy` binary as a real process: configuration errors, ready file,
//! serving, and SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn proxy() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_proxy"));
    for var in [
        "COHORT_LISTEN",
        "COHORT_READY_FILE",
        "COHORT_JOB_SCHEDULER",
        "COHORT_MODEL_MANAGER",
        "COHORT_CLIENT_SELECTOR",
        "COHORT_MAX_CONNECTIONS",
        "COHORT_HANDSHAKE_TIMEOUT",
        "COHORT_MAX_CONCURRENT_STREAMS",
        "COHORT_MAX_HEADER_LIST_SIZE",
        "COHORT_HTTP2_KEEPALIVE_INTERVAL",
        "COHORT_HTTP2_KEEPALIVE_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
    // These tests are about configuration and lifecycle; TLS has its own.
    cmd.arg("--insecure");
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

#[test]
fn bad_endpoint_is_named_and_nothing_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let out = proxy()
        .args(["--listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .args(["--job-scheduler", "127.0.0.1:7000"])
        .args(["--model-manager", "https://models:443"])
        .args(["--client-selector", "127.0.0.1:7002"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: --model-manager"), "{stderr}");
    assert!(!ready.exists());
}

#[test]
fn connection_limits_are_checked_before_anything_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let upstreams = [
        "--job-scheduler",
        "127.0.0.1:7000",
        "--model-manager",
        "127.0.0.1:7001",
        "--client-selector",
        "127.0.0.1:7002",
    ];
    // From the environment and from flags; each error names the flag.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: [Case; 3] = [
        (&[("COHORT_MAX_CONNECTIONS", "0")], &[], "--max-connections"),
        (&[], &["--handshake-timeout", "10m"], "--handshake-timeout"),
        (
            &[("COHORT_MAX_HEADER_LIST_SIZE", "100")],
            &[],
            "--max-header-list-size",
        ),
    ];
    for (env, args, flag) in cases {
        let out = proxy()
            .args(["--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(upstreams)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("error: {flag}")), "{stderr}");
        assert!(!ready.exists(), "{flag}");
    }
}

#[tokio::test]
async fn serves_health_writes_ready_file_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let model_manager = start_model_manager().await;
    let dead = closed_endpoint().await;
    let mut child = tokio::process::Command::from(proxy())
        .args(["--listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .env("COHORT_JOB_SCHEDULER", dead.to_string())
        .env(
            "COHORT_MODEL_MANAGER",
            format!("http://{}", model_manager.addr),
        )
        .env("COHORT_CLIENT_SELECTOR", dead.to_string())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let addr = cohort_runtime::wait_for_file(&ready, WAIT)
        .await
        .expect("ready file not written");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let channel = within("connect", channel.connect()).await.unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = within(
        "Check",
        health.check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await
    .unwrap()
    .into_inner()
    .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut models = cohort_proto::v1::models_client::ModelsClient::new(channel);
    let version = within(
        "GetVersion",
        models.get_version(cohort_proto::v1::GetVersionRequest {
            name: "m".into(),
            version: 1,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(version.digest, "from-model-manager");

    let pid = Pid::from_raw(child.id().unwrap() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    let status = within("exit after SIGTERM", child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");

    model_manager.stop().await;
}
