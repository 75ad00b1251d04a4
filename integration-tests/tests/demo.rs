//! `cohort demo` end to end: separate processes, the accuracy target, and no
//! process left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use cohort_integration_tests::{cohort_bin, in_groups, processes};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_succeeds_with_separate_processes_and_leaves_none_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = tokio::process::Command::new(cohort_bin())
        .args([
            "demo",
            "--clients",
            "3",
            "--rounds",
            "10",
            "--json",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start cohort demo");
    let demo_pid = child.id().expect("pid");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s).await;
        s
    });

    // Watch the process tree under the demo while it runs.
    let mut seen: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut groups: BTreeSet<i32> = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "demo did not finish in 300s"
        );
        let procs = processes();
        let mut tree: BTreeSet<u32> = BTreeSet::from([demo_pid]);
        // Descendants of the demo (a few passes settle the tree).
        for _ in 0..4 {
            for (pid, ppid, _, _) in &procs {
                if tree.contains(ppid) {
                    tree.insert(*pid);
                }
            }
        }
        for (pid, _, pgid, comm) in &procs {
            if tree.contains(pid) && *pid != demo_pid {
                seen.entry(comm.clone()).or_default().insert(*pid);
                groups.insert(*pgid);
            }
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    };
    let out = reader.await.expect("stdout reader");
    assert!(status.success(), "demo failed: {status}\n{out}");

    let last: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("output")).expect("last line is JSON");
    assert_eq!(last["state"], "SUCCEEDED", "{last}");
    assert_eq!(last["rounds"], 10, "{last}");
    let accuracy = last["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.90, "held-out accuracy {accuracy} < 0.90");
    // Every line is JSON, and every round was reported.
    let rounds = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|v| v["event"] == "round")
        .count();
    assert_eq!(rounds, 10);

    for service in [
        "job-scheduler",
        "model-manager",
        "client-selector",
        "proxy",
        "coordinator",
        "executor",
    ] {
        assert!(
            seen.contains_key(service),
            "no {service} process seen; saw {seen:?}"
        );
    }
    assert_eq!(
        seen.get("task-manager").map(|p| p.len()),
        Some(3),
        "three task-managers: {seen:?}"
    );
    assert!(
        seen["executor"].len() >= 2,
        "executors are separate processes: {seen:?}"
    );

    groups.remove(&(nix::unistd::getpgrp().as_raw()));
    let left = in_groups(&groups.into_iter().collect::<Vec<_>>());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// Runs `cohort demo --json` with these extra arguments; returns its last line.
async fn demo_result(args: &[&str]) -> serde_json::Value {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(cohort_bin())
            .args(["demo", "--json"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("demo finishes in time")
    .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_accuracy() {
    let args = ["--clients", "2", "--rounds", "3", "--seed", "11"];
    let first = demo_result(&args).await;
    let second = demo_result(&args).await;
    assert_eq!(first["state"], "SUCCEEDED", "{first}");
    let accuracy = |v: &serde_json::Value| v["accuracy"].as_f64().expect("accuracy");
    assert_eq!(
        accuracy(&first),
        accuracy(&second),
        "two runs with seed 11: {first} / {second}"
    );
}
