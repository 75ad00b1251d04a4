//! `executor --serve` as task-manager runs it: a real process reading tasks from a pipe.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

fn serve(idle_secs: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_executor"));
    cmd.args(["--serve", "--idle-exit-secs", idle_secs])
        .env_remove("COHORT_TASK_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn a_serving_executor_leaves_when_no_task_comes_or_its_stdin_closes() {
    // Idle, with its stdin still open: it leaves by itself (no read left hanging).
    let mut idle = serve("1").spawn().unwrap();
    // Held here: `Child::wait` would close a stdin it still holds.
    let _open = idle.stdin.take().unwrap();
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), idle.wait())
        .await
        .expect("left after its idle time")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "left before its idle time: {:?}",
        started.elapsed()
    );

    // Its task-manager gone: stdin closes, it leaves at once.
    let mut orphan = serve("600").spawn().unwrap();
    drop(orphan.stdin.take());
    let status = tokio::time::timeout(Duration::from_secs(20), orphan.wait())
        .await
        .expect("left when its stdin closed")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_task_it_cannot_run_is_answered_and_the_next_one_is_read() {
    let mut executor = serve("600").spawn().unwrap();
    let mut tasks = executor.stdin.take().unwrap();
    let mut answers = executor.stdout.take().unwrap();
    // Twice a task with nothing in it: each gets its error as the answer.
    for _ in 0..2 {
        cohort_runtime::executor_pipe::write_task(&mut tasks, &[])
            .await
            .unwrap();
    }
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.lines().count() < 2 {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout_at(deadline, answers.read(&mut buf))
            .await
            .expect("two answers")
            .unwrap();
        assert!(n > 0, "the executor ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    for line in seen.lines() {
        assert_eq!(line, "error: task file: task is missing", "{seen}");
    }
    // A frame over the limit is not a task: the executor says so and ends.
    tasks
        .write_all(&(cohort_runtime::executor_pipe::MAX_TASK_BYTES + 1).to_le_bytes())
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), executor.wait())
        .await
        .expect("ended")
        .unwrap();
    assert!(!status.success());
    let mut log = String::new();
    executor
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .await
        .unwrap();
    assert!(log.contains("stdin: cannot read the next task"), "{log}");
}
