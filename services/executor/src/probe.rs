//! `executor --probe`: the executor's part of a connectivity probe (`cohort check
//! --federation`), a toy EVALUATE task without a coordinator. task-manager starts it as it
//! starts a task's executor (its TLS files, its `--proxy` in each frame's endpoint) and hands
//! it, down stdin (`cohort_runtime::executor_pipe`), one EVALUATE task per dataset of the
//! party, carrying the dataset as tasks carry it, no token and a deadline. The executor dials
//! the proxy on the channel a task uses and calls `PartySession.Check` (the party the server
//! takes it for), reads each dataset as an evaluation (and a training) would, answers one
//! JSON line and exits. Nothing is fetched, trained or sent but that call.

use std::time::{Duration, Instant};

use anyhow::Context;
use cohort_proto::v1 as pb;
use cohort_runtime::executor_pipe::{self, ProbeAnswer};

use crate::Channels;

/// Most datasets a probe reads (the frames are bounded too).
const MAX_DATASETS: usize = 1000;

/// How long the server's answer is waited for when the probe carries no deadline.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// Reads the probe's tasks from stdin until it closes, probes, answers on stdout.
pub(crate) async fn run(channels: &mut Channels) -> anyhow::Result<()> {
    let mut stdin = tokio::io::stdin();
    let mut tasks = Vec::new();
    while let Some(exec) = executor_pipe::read_task(&mut stdin)
        .await
        .context("stdin: cannot read the probe's tasks")?
    {
        if tasks.len() == MAX_DATASETS {
            anyhow::bail!("stdin: a probe reads at most {MAX_DATASETS} datasets");
        }
        tasks.push(exec);
    }
    let answer = probe(channels, &tasks).await;
    tracing::info!(
        party = %answer.party, round_trip_ms = answer.round_trip_ms,
        datasets = answer.datasets, readable = answer.datasets_readable,
        error = %answer.error, "probe answered"
    );
    executor_pipe::write_probe_answer(&mut tokio::io::stdout(), &answer)
        .await
        .context("stdout: cannot answer the probe")
}

async fn probe(channels: &mut Channels, tasks: &[pb::ExecutorTask]) -> ProbeAnswer {
    let mut answer = ProbeAnswer {
        datasets: u32::try_from(tasks.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    let Some(first) = tasks.first() else {
        answer.error = "no task came on stdin (a probe hands one per dataset)".into();
        return answer;
    };
    let deadline_ms = first.task.as_ref().map_or(0, |t| t.deadline_ms);
    match check(channels, &first.endpoint, wait_until(deadline_ms)).await {
        Ok((party, round_trip)) => {
            answer.party = party;
            answer.round_trip_ms = u32::try_from(round_trip.as_millis()).unwrap_or(u32::MAX);
        }
        Err(e) => answer.error = crate::error_line(&e),
    }
    for exec in tasks {
        let name = exec.task.as_ref().map_or("", |t| t.dataset.as_str());
        match read(exec) {
            Ok(()) => answer.datasets_readable += 1,
            Err(e) => {
                if answer.error.is_empty() {
                    answer.error = crate::error_line(&e.context(format!("dataset {name:?}")));
                }
            }
        }
    }
    answer
}

/// How long the server's answer may take: until the task's deadline.
fn wait_until(deadline_ms: i64) -> Duration {
    if deadline_ms <= 0 {
        return DEFAULT_WAIT;
    }
    let left = deadline_ms.saturating_sub(cohort_runtime::now_ms());
    Duration::from_millis(u64::try_from(left).unwrap_or(0))
}

/// `PartySession.Check` through the proxy, on the channel a task would use: the party the
/// server took this executor for, and the call's round trip.
async fn check(
    channels: &mut Channels,
    endpoint: &str,
    wait: Duration,
) -> anyhow::Result<(String, Duration)> {
    let channel = channels.to(endpoint)?;
    let mut client = pb::party_session_client::PartySessionClient::new(channel);
    let mut req = tonic::Request::new(pb::PartyCheckRequest {});
    req.set_timeout(wait.max(Duration::from_millis(1)));
    let started = Instant::now();
    let reply = tokio::time::timeout(wait, client.check(req))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {wait:?}"))
        .and_then(|r| r.map_err(|s| anyhow::anyhow!(status_line(&s))))
        .with_context(|| format!("cannot reach the server through the proxy at {endpoint}"))?;
    Ok((reply.into_inner().party, started.elapsed()))
}

/// A refused call on one line: its code and message (a transport error's message is its
/// cause: `invalid peer certificate: UnknownIssuer`), else the causes it carries.
fn status_line(status: &tonic::Status) -> String {
    let mut line = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while line.is_empty()
        && let Some(cause) = source
    {
        line = cause.to_string();
        source = cause.source();
    }
    format!("{:?}: {line}", status.code())
}

/// Reads the dataset as tasks do: the training file, and the evaluation split when it has
/// one. A synthetic dataset has no files.
fn read(exec: &pb::ExecutorTask) -> anyhow::Result<()> {
    let data = exec.data.as_ref().context("data is missing")?;
    if data.synthetic.is_some() {
        return Ok(());
    }
    crate::load(data, false)?;
    if !data.eval_path.is_empty() {
        crate::load(data, true)?;
    }
    Ok(())
}
