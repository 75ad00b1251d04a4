//! Every service binary: refuses bad configuration before binding a port,
//! serves grpc.health.v1, and exits cleanly on SIGTERM.

use std::path::Path;
use std::time::Duration;

use cohort_integration_tests::{bin_dir, listening_addresses};
use nix::sys::signal::Signal;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

struct Case {
    binary: &'static str,
    good: Vec<String>,
    /// Arguments with one bad value, and the flag the error must name.
    bad: Vec<(Vec<String>, &'static str)>,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn cases(dir: &Path) -> Vec<Case> {
    let db = |n: &str| format!("sqlite://{}", dir.join(n).display());
    let blobs = format!("file://{}", dir.join("blobs").display());
    let datasets = dir.join("datasets.json");
    std::fs::write(
        &datasets,
        r#"{"digits": {"path": "d.csv", "format": "csv"}}"#,
    )
    .expect("datasets.json");
    std::fs::write(dir.join("d.csv"), "1,2,0\n3,4,1\n").expect("csv");
    let ds = datasets.display().to_string();
    let ws = dir.join("ws").display().to_string();
    let pod_config = |name: &str, json: &str| {
        let path = dir.join(name);
        std::fs::write(&path, json).expect("executor pod config");
        path.display().to_string()
    };
    let misspelt = pod_config(
        "misspelt.json",
        r#"{"namespace": "p", "image": "cohort:1", "tlsSecret": "p-tls",
            "tolerations": [{"efect": "NoSchedule"}]}"#,
    );
    let pinned = pod_config(
        "pinned.json",
        r#"{"namespace": "p", "image": "cohort:1", "tlsSecret": "p-tls", "pinToNode": true}"#,
    );
    let party = |extra: &[&str]| {
        let mut args = s(&[
            "--party",
            "p1",
            "--proxy",
            "127.0.0.1:1",
            "--datasets",
            &ds,
            "--workspace",
            &ws,
            "--insecure",
        ]);
        args.extend(s(extra));
        args
    };
    vec![
        Case {
            binary: "model-manager",
            good: s(&["--database-url", &db("m.db"), "--blob-url", &blobs]),
            bad: vec![
                (
                    s(&["--database-url", "mysql://x", "--blob-url", &blobs]),
                    "--database-url",
                ),
                (
                    s(&["--database-url", &db("m2.db"), "--blob-url", "gopher://x"]),
                    "--blob-url",
                ),
            ],
        },
        Case {
            binary: "client-selector",
            good: s(&["--database-url", &db("c.db")]),
            bad: vec![(
                s(&["--database-url", &db("c.db"), "--heartbeat-interval", "1ms"]),
                "--heartbeat-interval",
            )],
        },
        Case {
            binary: "job-scheduler",
            good: s(&[
                "--database-url",
                &db("j.db"),
                "--model-manager",
                "127.0.0.1:1",
                "--client-selector",
                "127.0.0.1:2",
                "--work-dir",
                &dir.join("work").display().to_string(),
            ]),
            bad: vec![
                (
                    s(&[
                        "--database-url",
                        &db("j2.db"),
                        "--model-manager",
                        "no port",
                        "--client-selector",
                        "127.0.0.1:2",
                    ]),
                    "--model-manager",
                ),
                // (An unreachable database is waited for, not refused: see
                // services/job-scheduler/tests/startup.rs.)
                // The Kubernetes launcher: options checked before anything is contacted.
                (
                    s(&[
                        "--database-url",
                        &db("j3.db"),
                        "--model-manager",
                        "127.0.0.1:1",
                        "--client-selector",
                        "127.0.0.1:2",
                        "--launcher",
                        "kubernetes",
                    ]),
                    "--coordinator-image",
                ),
                (
                    s(&[
                        "--database-url",
                        &db("j4.db"),
                        "--model-manager",
                        "127.0.0.1:1",
                        "--client-selector",
                        "127.0.0.1:2",
                        "--launcher",
                        "kubernetes",
                        "--coordinator-image",
                        "cohort:test",
                        "--coordinator-cpu",
                        "lots",
                    ]),
                    "--coordinator-cpu",
                ),
                (
                    s(&[
                        "--database-url",
                        &db("j5.db"),
                        "--model-manager",
                        "127.0.0.1:1",
                        "--client-selector",
                        "127.0.0.1:2",
                        "--launcher",
                        "kubernetes",
                        "--coordinator-image",
                        "cohort:test",
                        "--coordinator-owner-deployment",
                        "Job_Scheduler",
                    ]),
                    "--coordinator-owner-deployment",
                ),
            ],
        },
        Case {
            binary: "proxy",
            good: s(&[
                "--insecure",
                "--job-scheduler",
                "127.0.0.1:1",
                "--model-manager",
                "127.0.0.1:2",
                "--client-selector",
                "127.0.0.1:3",
            ]),
            bad: vec![
                (
                    s(&[
                        "--insecure",
                        "--job-scheduler",
                        "127.0.0.1:1",
                        "--model-manager",
                        "127.0.0.1:2",
                        "--client-selector",
                        ":::",
                    ]),
                    "--client-selector",
                ),
                // Secure by default: no certificate, no start.
                (
                    s(&[
                        "--job-scheduler",
                        "127.0.0.1:1",
                        "--model-manager",
                        "127.0.0.1:2",
                        "--client-selector",
                        "127.0.0.1:3",
                    ]),
                    "--tls-cert",
                ),
            ],
        },
        Case {
            binary: "task-manager",
            good: s(&[
                "--insecure",
                "--party",
                "p1",
                "--proxy",
                "127.0.0.1:1",
                "--datasets",
                &ds,
                "--workspace",
                &ws,
            ]),
            bad: vec![
                (
                    s(&[
                        "--insecure",
                        "--party",
                        "p 1",
                        "--proxy",
                        "127.0.0.1:1",
                        "--datasets",
                        &ds,
                        "--workspace",
                        &ws,
                    ]),
                    "--party",
                ),
                (
                    s(&[
                        "--insecure",
                        "--party",
                        "p1",
                        "--proxy",
                        "127.0.0.1:1",
                        "--datasets",
                        "/nonexistent.json",
                        "--workspace",
                        &ws,
                    ]),
                    "--datasets",
                ),
                (
                    s(&[
                        "--party",
                        "p1",
                        "--proxy",
                        "127.0.0.1:1",
                        "--datasets",
                        &ds,
                        "--workspace",
                        &ws,
                    ]),
                    "--tls-cert",
                ),
                // Executors as Pods: the pod config is checked before anything is contacted.
                (
                    party(&["--executor-launcher", "kubernetes"]),
                    "--executor-pod-config",
                ),
                (
                    party(&[
                        "--executor-launcher",
                        "kubernetes",
                        "--executor-pod-config",
                        &misspelt,
                    ]),
                    "misspelt.json: tolerations[0].efect: unknown field",
                ),
                (
                    party(&[
                        "--executor-launcher",
                        "kubernetes",
                        "--executor-pod-config",
                        &pinned,
                    ]),
                    "pinToNode",
                ),
                (
                    party(&["--executor-pod-config", &pinned]),
                    "--executor-pod-config: only with --executor-launcher kubernetes",
                ),
            ],
        },
    ]
}

async fn run_bad(binary: &str, args: &[String], flag: &str, dir: &Path) {
    let ready = dir.join(format!("{binary}-bad.addr"));
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin_dir().join(binary))
            .args(args)
            .arg("--ready-file")
            .arg(&ready)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("bad config exits promptly")
    .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{binary} accepted {args:?}");
    assert!(err.contains(flag), "{binary}: error names {flag}: {err}");
    assert!(
        !ready.exists(),
        "{binary} must not serve with a bad configuration"
    );
    assert!(
        !err.contains("hunter2"),
        "{binary} printed a password: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_validate_config_serve_health_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    for case in cases(dir.path()) {
        for (args, flag) in &case.bad {
            run_bad(case.binary, args, flag, dir.path()).await;
        }
        let ready = dir.path().join(format!("{}.addr", case.binary));
        // Server services also answer plaintext health on --health-listen (kubelet probes), on
        // a port of their choosing: one picked here and bound later could be taken meanwhile.
        let health_listen = case.binary != "task-manager";
        let mut command = tokio::process::Command::new(bin_dir().join(case.binary));
        command
            .args(&case.good)
            .args(["--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .kill_on_drop(true);
        if health_listen {
            command.args(["--health-listen", "127.0.0.1:0"]);
        }
        let mut child = command.spawn().expect("spawn");
        let pid = child.id().expect("pid");
        let addr = cohort_runtime::wait_for_file(&ready, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{} did not become ready", case.binary));
        assert_serving(case.binary, &addr).await;
        if health_listen {
            let health_addr = health_listener(pid, &addr).await;
            assert_serving(&format!("{} --health-listen", case.binary), &health_addr).await;
        }
        cohort_runtime::process::signal_pid(pid, Signal::SIGTERM);
        // Well within the 30 s Kubernetes waits before it kills; one that ignored SIGTERM would
        // never exit.
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} ignored SIGTERM", case.binary))
            .expect("wait");
        assert!(
            status.success(),
            "{} exited {status} on SIGTERM",
            case.binary
        );
    }
}

/// Asks grpc.health.v1 at `addr` for the server's status: SERVING, within 30 s.
async fn assert_serving(what: &str, addr: &str) {
    let channel = cohort_runtime::lazy_channel(addr).expect("channel");
    let health = tokio::time::timeout(
        Duration::from_secs(30),
        HealthClient::new(channel).check(HealthCheckRequest::default()),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: no health answer within 30 s"))
    .unwrap_or_else(|e| panic!("{what} health: {e}"))
    .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32, "{what}");
}

/// The address `pid` listens on besides `main` (its --health-listen port), read from /proc.
async fn health_listener(pid: u32, main: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let others: Vec<String> = listening_addresses(pid)
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.to_string())
            .filter(|a| a != main)
            .collect();
        match others.as_slice() {
            [health] => return health.clone(),
            [] => {}
            more => panic!("pid {pid} listens on more than {main} and a health port: {more:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pid {pid} listens on no health port besides {main}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
