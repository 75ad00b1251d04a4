//! job-scheduler started while its database cannot be reached: the real binary
//! waits for it, logging each try with its cause (never the password), and serves
//! once the store opens, instead of exiting.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

const RETRY_LINE: &str = "cannot open the jobs store: database unavailable; retrying";

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, database_url: &str) -> Process {
    let coordinator = dir.join("coordinator.sh");
    std::fs::write(&coordinator, "#!/bin/sh\n").unwrap();
    let log = std::fs::File::create(dir.join("job-scheduler.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_job-scheduler"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--ready-file")
        .arg(dir.join("ready"))
        .args(["--database-url", database_url])
        .args(["--database-connect-timeout", "200ms"])
        .args(["--model-manager", "127.0.0.1:1"])
        .args(["--client-selector", "127.0.0.1:1"])
        .arg("--coordinator-bin")
        .arg(&coordinator)
        .arg("--work-dir")
        .arg(dir.join("work"))
        .env_remove("COHORT_DATABASE_URL")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Process(child)
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("job-scheduler.log")).unwrap_or_default()
}

/// Waits (30 s at most) until the log holds `n` retry lines; the process must keep running.
async fn wait_retries(dir: &Path, process: &mut Process, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = log(dir);
        if text.matches(RETRY_LINE).count() >= n {
            return text;
        }
        if let Some(status) = process.0.try_wait().unwrap() {
            panic!("job-scheduler exited ({status}) instead of waiting: {text}");
        }
        assert!(
            Instant::now() < deadline,
            "{n} retries not logged within 30 s: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unreachable_database_is_retried_and_logged_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let password = "hunter2-not-for-logs";
    let url = format!("postgres://cohort:{password}@127.0.0.1:{port}/jobs");
    let mut process = start(dir.path(), &url);
    let text = wait_retries(dir.path(), &mut process, 3).await;
    assert!(!text.contains(password), "the password leaked: {text}");
    let line = text.lines().find(|l| l.contains(RETRY_LINE)).unwrap();
    assert!(
        line.contains(&format!("postgres://cohort:***@127.0.0.1:{port}/jobs")),
        "names the database by its redacted URL: {line}"
    );
    assert!(line.contains("attempt=1"), "{line}");
    assert!(
        text.contains("attempt=3"),
        "every try is logged, numbered: {text}"
    );
    assert!(!dir.path().join("ready").exists(), "not serving yet");
}

#[tokio::test]
async fn job_scheduler_serves_once_its_database_opens() {
    let dir = tempfile::tempdir().unwrap();
    // SQLite cannot create a file in a directory that does not exist yet.
    let db_dir = dir.path().join("later");
    let url = format!("sqlite://{}", db_dir.join("jobs.db").display());
    let mut process = start(dir.path(), &url);
    wait_retries(dir.path(), &mut process, 1).await;
    assert!(!dir.path().join("ready").exists());
    std::fs::create_dir(&db_dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("ready").exists() {
        if let Some(status) = process.0.try_wait().unwrap() {
            panic!("job-scheduler exited ({status}): {}", log(dir.path()));
        }
        assert!(
            Instant::now() < deadline,
            "not serving within 30 s of the database appearing: {}",
            log(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log(dir.path()).contains("the jobs store is open"));
}

#[tokio::test]
async fn a_malformed_database_url_still_ends_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = start(dir.path(), "mysql://root:pw@127.0.0.1/jobs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = process.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "kept running: {}",
            log(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let text = log(dir.path());
    assert!(text.contains("--database-url"), "{text}");
    assert!(!text.contains(RETRY_LINE), "not retried: {text}");
}
