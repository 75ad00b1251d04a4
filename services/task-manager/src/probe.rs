//! The answer to client-selector's connectivity probe (`cohort check --federation`): the
//! party shows it could run a task now by starting its executor binary once (`--help`: it
//! loads and exits at once; no task, no data, no network), and says how long that took.
//! Executor Pods are not started for a probe; the answer says so. Answered off the session
//! loop, so a slow start never holds up offers or heartbeats.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cohort_proto::v1 as pb;

use crate::Executors;

/// How long the executor may take to start and exit.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn answer(executors: &Executors, probe: pb::Probe) -> pb::ProbeReply {
    let (ok, message) = match executors {
        Executors::Processes(p) => start_once(&p.bin).await,
        Executors::Pods(_) => (
            true,
            "executors run as Pods; none is started for a probe".to_string(),
        ),
    };
    pb::ProbeReply {
        probe_id: probe.probe_id,
        ok,
        message,
    }
}

async fn start_once(bin: &std::path::Path) -> (bool, String) {
    let started = Instant::now();
    let run = tokio::process::Command::new(bin)
        .arg("--help")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(START_TIMEOUT, run).await {
        Ok(Ok(status)) if status.success() => (
            true,
            format!(
                "executor started and exited in {} ms",
                started.elapsed().as_millis()
            ),
        ),
        Ok(Ok(status)) => (
            false,
            format!("executor {} ended with {status}", bin.display()),
        ),
        Ok(Err(e)) => (
            false,
            format!("executor {} cannot be started: {e}", bin.display()),
        ),
        Err(_) => (
            false,
            format!(
                "executor {} did not exit within {START_TIMEOUT:?}",
                bin.display()
            ),
        ),
    }
}
