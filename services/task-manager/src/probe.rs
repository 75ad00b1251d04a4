//! The answer to client-selector's connectivity probe (`cohort check --federation`): a toy
//! EVALUATE task that goes the way a task goes, without a coordinator. The executor is
//! started as for a task (`ProcessExecutors::command`: the party's TLS files, its log
//! format) with `--probe`, and handed down its stdin one EVALUATE task per dataset (this
//! party's `--proxy` as the endpoint, the dataset as tasks get it, no token, a deadline). It
//! dials the proxy, calls `PartySession.Check`, reads each dataset and answers one JSON line
//! (`cohort_runtime::executor_pipe::ProbeAnswer`); the reply relays it. An executor that has
//! not answered by the probe's deadline is stopped: no process outlives the probe.
//!
//! Executor Pods are not started for a probe; the reply says so. Answered off the session
//! loop, so a slow executor never holds up offers or heartbeats.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cohort_proto::v1 as pb;
use cohort_runtime::executor_pipe::{self, ProbeAnswer};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{Executors, Party, ProcessExecutors};

/// How long a party has to answer when the probe does not say (an older client-selector).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a probe may hold an executor, whatever it asks.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of the executor's log end is kept for its last line.
const LOG_TAIL_BYTES: usize = 16 * 1024;
/// How long an executor that answered may take to exit before it is stopped.
const EXIT_GRACE: Duration = Duration::from_secs(2);

pub(crate) async fn answer(party: &Party, probe: pb::Probe) -> pb::ProbeReply {
    let timeout = match probe.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)).min(MAX_TIMEOUT),
    };
    let executor = match &party.executors {
        Executors::Processes(p) => {
            // The executor's own wait for the server ends before it is stopped, so that it
            // is the one to say the server did not answer.
            let deadline_ms = cohort_runtime::now_ms()
                .saturating_add(i64::try_from((timeout * 3 / 5).as_millis()).unwrap_or(i64::MAX));
            let frames = frames(party, &probe.probe_id, deadline_ms);
            // The reply still has to travel.
            probe_executor(p, &frames, timeout * 4 / 5).await
        }
        Executors::Pods(_) => pb::ExecutorProbe {
            in_pods: true,
            ..Default::default()
        },
    };
    let (ok, message) = judge(&party.name, &executor);
    if ok {
        tracing::info!(probe = %probe.probe_id, %message, "probe answered");
    } else {
        tracing::warn!(probe = %probe.probe_id, %message, "probe answered: not ready");
    }
    pb::ProbeReply {
        probe_id: probe.probe_id,
        ok,
        message,
        executor: Some(executor),
    }
}

/// Whether the executor did what a task needs, and the reply's one line saying so.
fn judge(party: &str, e: &pb::ExecutorProbe) -> (bool, String) {
    if e.in_pods {
        return (
            true,
            "executors run as Pods; none is started for a probe".into(),
        );
    }
    if !e.error.is_empty() {
        return (false, e.error.clone());
    }
    if e.server_saw_party != party {
        return (
            false,
            format!(
                "the server took the executor for {:?}, not this party {party:?}",
                e.server_saw_party
            ),
        );
    }
    (
        true,
        format!(
            "executor reached the server as {} ({} ms), read {}/{} datasets; answered in {} ms",
            e.server_saw_party, e.round_trip_ms, e.datasets_readable, e.datasets, e.took_ms
        ),
    )
}

/// The probe's EVALUATE tasks, one per dataset, each a frame for the executor's stdin.
fn frames(party: &Party, probe_id: &str, deadline_ms: i64) -> Vec<Vec<u8>> {
    let probe_id: String = probe_id.chars().take(64).collect();
    party
        .datasets
        .iter()
        .map(|d| {
            let exec = pb::ExecutorTask {
                task: Some(pb::Task {
                    task_id: format!("probe-{probe_id}"),
                    kind: pb::TaskKind::Evaluate as i32,
                    party: party.name.clone(),
                    dataset: d.name.clone(),
                    deadline_ms,
                    ..Default::default()
                }),
                endpoint: party.proxy.clone(),
                data: Some(d.to_pb()),
                state_dir: String::new(),
            };
            prost::Message::encode_to_vec(&exec)
        })
        .collect()
}

/// Starts the executor with `--probe`, hands it the tasks and reads its answer, all within
/// `limit`; the executor is gone (reaped, or stopped) when this returns.
async fn probe_executor(
    processes: &ProcessExecutors,
    frames: &[Vec<u8>],
    limit: Duration,
) -> pb::ExecutorProbe {
    let datasets = u32::try_from(frames.len()).unwrap_or(u32::MAX);
    let started = Instant::now();
    let mut out = pb::ExecutorProbe {
        datasets,
        ..Default::default()
    };
    let mut cmd = processes.command();
    cmd.arg("--probe")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let bin = processes.bin.display();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            out.error = crate::bounded(format!("executor {bin} cannot be started: {e}"));
            return out;
        }
    };
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        cohort_runtime::process::terminate(&mut child, Duration::ZERO).await;
        out.error = format!("executor {bin}: its pipes could not be opened");
        return out;
    };
    // Read all along, so that a chatty executor never blocks on a full pipe.
    let log = tokio::spawn(tail(stderr));
    let talk = async {
        for frame in frames {
            executor_pipe::write_task(&mut stdin, frame).await?;
        }
        drop(stdin);
        executor_pipe::read_probe_answer(&mut tokio::io::BufReader::new(stdout)).await
    };
    let talked = tokio::time::timeout(limit, talk).await;
    let took_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
    let wait_exit = match &talked {
        Ok(Ok(Some(_))) => EXIT_GRACE,
        // It failed or ended without an answer: how it ended says why.
        Ok(_) => limit.saturating_sub(started.elapsed()),
        Err(_) => Duration::ZERO,
    };
    // Whatever happened, the executor is gone (and reaped) before the reply goes.
    let status = match tokio::time::timeout(wait_exit, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            cohort_runtime::process::terminate(&mut child, Duration::from_millis(500)).await;
            None
        }
    };
    let last_line = tokio::time::timeout(Duration::from_secs(1), log)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    match talked {
        Ok(Ok(Some(answer))) => {
            relay(&mut out, answer);
            out.took_ms = took_ms;
        }
        Err(_) => {
            out.error = crate::bounded(format!(
                "executor {bin} did not answer within {limit:?}; stopped{}",
                after(&last_line)
            ))
        }
        Ok(Ok(None)) | Ok(Err(_)) => {
            let ended = status.map_or_else(|| "did not exit".to_string(), |s| s.to_string());
            // A broken pipe only says it ended before reading its tasks; how it ended says why.
            let io = match &talked {
                Ok(Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => format!(" ({e})"),
                _ => String::new(),
            };
            out.error = crate::bounded(format!(
                "executor {bin} ended without answering the probe{io}: {ended}{}",
                after(&last_line)
            ));
        }
    }
    out
}

fn after(last_line: &str) -> String {
    if last_line.is_empty() {
        String::new()
    } else {
        format!(": {last_line}")
    }
}

fn relay(out: &mut pb::ExecutorProbe, answer: ProbeAnswer) {
    out.started = true;
    out.reached_server = !answer.party.is_empty();
    out.server_saw_party = crate::bounded(answer.party.chars().take(200).collect());
    out.round_trip_ms = answer.round_trip_ms;
    // What was handed over is known here; the executor says what it read of it.
    out.datasets_readable = answer.datasets_readable.min(out.datasets);
    out.error = crate::bounded(answer.error);
}

/// The last non-empty line of what `log` writes until it closes (its end only is kept).
async fn tail(mut log: impl AsyncRead + Unpin) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = log.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * LOG_TAIL_BYTES {
            kept.drain(..kept.len() - LOG_TAIL_BYTES);
        }
    }
    String::from_utf8_lossy(&kept)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| crate::bounded(l.trim().to_string()))
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An executor that is the shell script `body` (it gets the executor's arguments).
    fn script(dir: &std::path::Path, body: &str) -> ProcessExecutors {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("executor");
        std::fs::write(&bin, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        ProcessExecutors {
            bin,
            adversary: None,
            tls_args: Vec::new(),
            log_format: cohort_runtime::LogFormat::Text,
            warm: None,
            allowed_commands: Default::default(),
        }
    }

    fn frame() -> Vec<Vec<u8>> {
        vec![prost::Message::encode_to_vec(&pb::ExecutorTask {
            endpoint: "127.0.0.1:1".into(),
            ..Default::default()
        })]
    }

    #[tokio::test]
    async fn the_executors_answer_is_relayed() {
        let dir = tempfile::tempdir().unwrap();
        // Reads its tasks to the end first, as the executor does.
        let executor = script(
            dir.path(),
            r#"case " $* " in *" --probe "*) ;; *) exit 3 ;; esac
cat > /dev/null
echo '{"party":"p","round_trip_ms":7,"datasets":1,"datasets_readable":1,"error":""}'"#,
        );
        let e = probe_executor(&executor, &frame(), Duration::from_secs(20)).await;
        assert!(e.started && e.reached_server, "{e:?}");
        assert_eq!((e.server_saw_party.as_str(), e.round_trip_ms), ("p", 7));
        assert_eq!((e.datasets, e.datasets_readable), (1, 1));
        assert!(judge("p", &e).0);
        let (ok, message) = judge("q", &e);
        assert!(!ok && message.contains("not this party \"q\""), "{message}");
    }

    #[tokio::test]
    async fn an_executor_that_ends_without_answering_is_reported_with_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let executor = script(
            dir.path(),
            "echo 'error: TLS: ca.crt: no such file' >&2; exit 1",
        );
        let e = probe_executor(&executor, &frame(), Duration::from_secs(20)).await;
        assert!(!e.started, "{e:?}");
        assert!(
            e.error.contains("ended without answering")
                && e.error.contains("exit status: 1")
                && e.error.ends_with("error: TLS: ca.crt: no such file"),
            "{e:?}"
        );
        assert!(!judge("p", &e).0);
    }

    #[tokio::test]
    async fn an_executor_past_the_deadline_is_stopped_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let executor = script(
            dir.path(),
            &format!("echo $$ > {}; exec sleep 60", pid_file.display()),
        );
        let started = Instant::now();
        let e = probe_executor(&executor, &frame(), Duration::from_millis(1500)).await;
        assert!(started.elapsed() < Duration::from_secs(10), "{e:?}");
        assert!(!e.started, "{e:?}");
        assert!(
            e.error.contains("did not answer within 1.5s; stopped"),
            "{e:?}"
        );
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!cohort_runtime::process::pid_alive(pid), "{pid} still runs");
    }
}
