//! How task-manager hands tasks to an executor it keeps running between tasks of one job
//! (`executor --serve`): tasks go down the executor's stdin, one answer per task comes
//! back on its stdout. Nothing of a task (its token above all) touches the disk.
//!
//! A task is a frame: its length as a little-endian u32, then the `ExecutorTask` message.
//! An answer is one line: `ok`, or `error: ` and the task's fatal error on one line.
//!
//! A connectivity probe (`executor --probe`, `cohort check --federation`) goes the same way:
//! one frame per dataset of the party, each an `ExecutorTask` of an EVALUATE task with no
//! token, stdin then closed; its answer is one JSON line, a [`ProbeAnswer`].

use cohort_proto::v1 as pb;
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest task frame: a task is its job's spec and a few names and paths.
pub const MAX_TASK_BYTES: u32 = 4 << 20;

/// Largest answer line read back (a longer one is cut).
pub const MAX_ANSWER_BYTES: usize = 16 << 10;

/// Writes one task frame and flushes it.
pub async fn write_task<W: AsyncWrite + Unpin>(out: &mut W, task: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(task.len())
        .ok()
        .filter(|len| *len <= MAX_TASK_BYTES)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a task of {} bytes is over {MAX_TASK_BYTES}", task.len()),
            )
        })?;
    out.write_all(&len.to_le_bytes()).await?;
    out.write_all(task).await?;
    out.flush().await
}

/// Reads the next task; None when the writer closed the pipe between tasks.
pub async fn read_task<R: AsyncRead + Unpin>(
    input: &mut R,
) -> std::io::Result<Option<pb::ExecutorTask>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_TASK_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a task frame of {len} bytes is over {MAX_TASK_BYTES}"),
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    input.read_exact(&mut bytes).await?;
    pb::ExecutorTask::decode(bytes.as_slice())
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes a task's answer: `Ok` or its error, already on one line.
pub async fn write_answer<W: AsyncWrite + Unpin>(
    out: &mut W,
    outcome: Result<(), String>,
) -> std::io::Result<()> {
    let line = match outcome {
        Ok(()) => "ok".to_string(),
        Err(line) => line.replace(['\n', '\r'], " "),
    };
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await
}

/// Reads a task's answer: Some(Ok) for `ok`, Some(Err(line)) for anything else, None when
/// the executor closed its stdout (it ended).
pub async fn read_answer<R: tokio::io::AsyncBufRead + Unpin>(
    input: &mut R,
) -> std::io::Result<Option<Result<(), String>>> {
    let mut line = Vec::new();
    let read = input
        .take(MAX_ANSWER_BYTES as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&line);
    let text = text.trim_end_matches(['\n', '\r']);
    Ok(Some(if text == "ok" {
        Ok(())
    } else {
        Err(text.to_string())
    }))
}

/// What a probe's executor did, as it answers on its stdout (one JSON line).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProbeAnswer {
    /// The party the server took the executor for (`PartySession.Check`); empty when the
    /// call failed.
    pub party: String,
    /// That call's round trip.
    pub round_trip_ms: u32,
    /// The datasets handed over, and how many of them were read.
    pub datasets: u32,
    pub datasets_readable: u32,
    /// The first thing that failed, on one line; empty when nothing did.
    pub error: String,
}

/// Writes a probe's answer: one JSON line.
pub async fn write_probe_answer<W: AsyncWrite + Unpin>(
    out: &mut W,
    answer: &ProbeAnswer,
) -> std::io::Result<()> {
    // serde_json escapes control characters: the line stays one line.
    let line = serde_json::to_string(answer).map_err(std::io::Error::other)?;
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await
}

/// Reads a probe's answer: None when the executor ended without one; an error when what it
/// wrote is not an answer.
pub async fn read_probe_answer<R: tokio::io::AsyncBufRead + Unpin>(
    input: &mut R,
) -> std::io::Result<Option<ProbeAnswer>> {
    let mut line = Vec::new();
    let read = input
        .take(MAX_ANSWER_BYTES as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_and_answers_go_through_a_pipe() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let task = pb::ExecutorTask {
            endpoint: "127.0.0.1:1".into(),
            ..Default::default()
        };
        write_task(&mut a, &task.encode_to_vec()).await.unwrap();
        write_task(&mut a, &task.encode_to_vec()).await.unwrap();
        drop(a);
        let mut b = tokio::io::BufReader::new(b);
        assert_eq!(read_task(&mut b).await.unwrap(), Some(task.clone()));
        assert_eq!(read_task(&mut b).await.unwrap(), Some(task));
        assert_eq!(
            read_task(&mut b).await.unwrap(),
            None,
            "closed between tasks"
        );

        let (mut a, b) = tokio::io::duplex(1 << 16);
        write_answer(&mut a, Ok(())).await.unwrap();
        write_answer(&mut a, Err("error: two\nlines".into()))
            .await
            .unwrap();
        drop(a);
        let mut b = tokio::io::BufReader::new(b);
        assert_eq!(read_answer(&mut b).await.unwrap(), Some(Ok(())));
        assert_eq!(
            read_answer(&mut b).await.unwrap(),
            Some(Err("error: two lines".into()))
        );
        assert_eq!(read_answer(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_probe_answer_is_one_json_line() {
        let answer = ProbeAnswer {
            party: "party-1".into(),
            round_trip_ms: 12,
            datasets: 2,
            datasets_readable: 1,
            error: "dataset b: two\nlines".into(),
        };
        let (mut a, b) = tokio::io::duplex(1 << 16);
        write_probe_answer(&mut a, &answer).await.unwrap();
        a.write_all(b"not json\n").await.unwrap();
        drop(a);
        let mut b = tokio::io::BufReader::new(b);
        assert_eq!(read_probe_answer(&mut b).await.unwrap(), Some(answer));
        assert!(read_probe_answer(&mut b).await.is_err());
        assert_eq!(read_probe_answer(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_and_cut_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&(MAX_TASK_BYTES + 1).to_le_bytes())
            .await
            .unwrap();
        assert!(read_task(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&10u32.to_le_bytes()).await.unwrap();
        a.write_all(b"abc").await.unwrap();
        drop(a);
        assert!(read_task(&mut b).await.is_err(), "cut inside a frame");
        let too_big = vec![0u8; MAX_TASK_BYTES as usize + 1];
        let (mut a, _b) = tokio::io::duplex(16);
        assert!(write_task(&mut a, &too_big).await.is_err());
    }
}
