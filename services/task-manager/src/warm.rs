//! Executors kept running between the tasks of one job (`executor --serve`): a party's
//! successive tasks of a job reuse its process and its connection to the proxy instead of
//! starting a process and a TLS handshake each. An executor serves one job only, so
//! isolation is per job and party; a task is handed over a pipe, so its token never
//! touches the disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cohort_runtime::executor_pipe;
use tokio::io::BufReader;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;

/// A serving executor of one job.
pub(crate) struct WarmExecutor {
    pub(crate) child: Child,
    tasks: ChildStdin,
    answers: BufReader<ChildStdout>,
    /// Its log (every task it ran).
    pub(crate) log: PathBuf,
    idle_since: Instant,
}

impl WarmExecutor {
    /// The answer to the task handed to it: Some(Ok) or Some(Err(its one-line error)); None
    /// when it ended without answering.
    pub(crate) async fn answer(&mut self) -> Option<Result<(), String>> {
        executor_pipe::read_answer(&mut self.answers)
            .await
            .ok()
            .flatten()
    }
}

/// The serving executors of a task-manager waiting for their job's next task.
pub(crate) struct WarmPool {
    /// How long one waits, idle, before it is stopped.
    keep: Duration,
    /// Most kept idle at once, whatever their jobs (the party's task capacity): a party
    /// that worked for many jobs does not keep an executor for each.
    max_idle: usize,
    /// Where their logs go, one file each.
    logs: PathBuf,
    idle: Mutex<HashMap<String, Vec<WarmExecutor>>>,
    started: AtomicU64,
}

impl WarmPool {
    pub(crate) fn new(keep: Duration, max_idle: usize, logs: PathBuf) -> WarmPool {
        WarmPool {
            keep,
            max_idle: max_idle.max(1),
            logs,
            idle: Mutex::default(),
            started: AtomicU64::new(0),
        }
    }

    pub(crate) fn keep(&self) -> Duration {
        self.keep
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<WarmExecutor>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `task` (an encoded `ExecutorTask` of `job`) to an idle executor of the job, or
    /// to a new one started with `command` (the executor binary and its TLS and log
    /// options). Returns the executor and whether it was reused, or why no executor took
    /// the task.
    pub(crate) async fn hand(
        &self,
        job: &str,
        task: &[u8],
        command: impl Fn() -> Command,
    ) -> Result<(WarmExecutor, bool), String> {
        while let Some(mut executor) = self.take_idle(job) {
            // One that ended (or closed its stdin) meanwhile takes nothing: try the next.
            if executor_pipe::write_task(&mut executor.tasks, task)
                .await
                .is_ok()
            {
                return Ok((executor, true));
            }
            stop(executor).await;
        }
        let mut executor = self.start(job, command)?;
        match executor_pipe::write_task(&mut executor.tasks, task).await {
            Ok(()) => Ok((executor, false)),
            Err(e) => {
                let log = executor.log.clone();
                stop(executor).await;
                Err(format!(
                    "cannot hand the task to the executor: {e}: {}",
                    crate::last_line(&log)
                ))
            }
        }
    }

    /// An idle executor of `job` still running, if any.
    fn take_idle(&self, job: &str) -> Option<WarmExecutor> {
        let mut idle = self.lock();
        let waiting = idle.get_mut(job)?;
        while let Some(mut executor) = waiting.pop() {
            if matches!(executor.child.try_wait(), Ok(None)) {
                return Some(executor);
            }
        }
        idle.remove(job);
        None
    }

    fn start(&self, job: &str, command: impl Fn() -> Command) -> Result<WarmExecutor, String> {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let log = self.logs.join(format!("{}-{n}.log", crate::sanitize(job)));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("cannot open the executor log {}: {e}", log.display()))?;
        // Its own backstop, well past the pool's: the pool stops it first.
        let idle_exit = self.keep * 2 + Duration::from_secs(60);
        let mut cmd = command();
        cmd.arg("--serve")
            .arg("--idle-exit-secs")
            .arg(idle_exit.as_secs().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the executor: {e}"))?;
        let (Some(tasks), Some(answers)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the executor was started without its pipes".into());
        };
        tracing::info!(job, pid = child.id(), log = %log.display(), "executor started for the job's tasks");
        Ok(WarmExecutor {
            child,
            tasks,
            answers: BufReader::new(answers),
            log,
            idle_since: Instant::now(),
        })
    }

    /// Keeps an executor that answered its task for the job's next one. When as many are
    /// idle as the pool keeps, the one idle longest goes (killed: it was idle).
    pub(crate) fn put_back(&self, job: &str, mut executor: WarmExecutor) {
        executor.idle_since = Instant::now();
        let mut idle = self.lock();
        while idle.values().map(Vec::len).sum::<usize>() >= self.max_idle {
            let oldest = idle
                .iter()
                .flat_map(|(job, waiting)| {
                    waiting
                        .iter()
                        .enumerate()
                        .map(move |(i, e)| (e.idle_since, job.clone(), i))
                })
                .min();
            let Some((_, job, i)) = oldest else { break };
            if let Some(waiting) = idle.get_mut(&job) {
                drop(waiting.remove(i));
                if waiting.is_empty() {
                    idle.remove(&job);
                }
            }
        }
        idle.entry(job.to_string()).or_default().push(executor);
    }

    /// Stops the executors idle longer than the pool keeps them.
    pub(crate) async fn expire(&self) {
        let expired: Vec<WarmExecutor> = {
            let mut idle = self.lock();
            let mut expired = Vec::new();
            for waiting in idle.values_mut() {
                let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(waiting)
                    .into_iter()
                    .partition(|e| e.idle_since.elapsed() >= self.keep);
                *waiting = keep;
                expired.extend(old);
            }
            idle.retain(|_, waiting| !waiting.is_empty());
            expired
        };
        for executor in expired {
            tracing::info!(pid = executor.child.id(), "idle executor stopped");
            stop(executor).await;
        }
    }

    /// Stops every idle executor (the daemon is stopping).
    pub(crate) async fn stop_all(&self) {
        let all: Vec<WarmExecutor> = self.lock().drain().flat_map(|(_, w)| w).collect();
        for executor in all {
            stop(executor).await;
        }
    }

    /// Idle executors now, for tests.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

/// Closes an executor's stdin (it exits between tasks when it sees that) and waits a moment
/// for it; kills it if it does not go.
pub(crate) async fn stop(executor: WarmExecutor) {
    let WarmExecutor {
        mut child, tasks, ..
    } = executor;
    drop(tasks);
    if tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Where serving executors log, under the workspace.
pub(crate) fn logs_dir(workspace: &Path) -> PathBuf {
    workspace.join("executors")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A stand-in for `executor --serve` that answers every task `ok` (the pipe protocol
    /// is the executor's; the process is real).
    fn cat_like() -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("while [ \"$(head -c 4 | wc -c)\" -eq 4 ]; do echo ok; done")
            .arg("--");
        cmd
    }

    #[tokio::test]
    async fn an_idle_executor_is_reused_for_its_job_only_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let pool = WarmPool::new(Duration::from_millis(200), 2, dir.path().to_path_buf());
        let (first, reused) = pool.hand("job-a", b"", cat_like).await.unwrap();
        assert!(!reused);
        let pid = first.child.id();
        pool.put_back("job-a", first);
        // Another job never gets it.
        let (other, reused) = pool.hand("job-b", b"", cat_like).await.unwrap();
        assert!(!reused);
        assert_ne!(other.child.id(), pid);
        stop(other).await;
        let (again, reused) = pool.hand("job-a", b"", cat_like).await.unwrap();
        assert!(reused);
        assert_eq!(again.child.id(), pid);
        pool.put_back("job-a", again);
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        pool.expire().await;
        assert_eq!(pool.idle_count(), 0, "idle past its time");
    }

    #[tokio::test]
    async fn no_more_are_kept_idle_than_the_party_runs_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let pool = WarmPool::new(Duration::from_secs(60), 2, dir.path().to_path_buf());
        let mut pids = Vec::new();
        for job in ["job-a", "job-b", "job-c"] {
            let (executor, _) = pool.hand(job, b"", cat_like).await.unwrap();
            pids.push(executor.child.id());
            pool.put_back(job, executor);
        }
        assert_eq!(pool.idle_count(), 2);
        // The one idle longest (job-a's) went; the others are still kept.
        assert!(pool.take_idle("job-a").is_none());
        for (job, pid) in [("job-b", pids[1]), ("job-c", pids[2])] {
            let (executor, reused) = pool.hand(job, b"", cat_like).await.unwrap();
            assert!(reused, "{job}");
            assert_eq!(executor.child.id(), pid, "{job}");
        }
    }

    #[tokio::test]
    async fn an_executor_that_ended_while_idle_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let pool = WarmPool::new(Duration::from_secs(60), 2, dir.path().to_path_buf());
        let (mut first, _) = pool.hand("job-a", b"", cat_like).await.unwrap();
        let pid = first.child.id();
        first.child.kill().await.unwrap();
        pool.put_back("job-a", first);
        let (next, reused) = pool.hand("job-a", b"", cat_like).await.unwrap();
        assert!(!reused, "a dead executor is not reused");
        assert_ne!(next.child.id(), pid);
        pool.put_back("job-a", next);
        pool.stop_all().await;
        assert_eq!(pool.idle_count(), 0);
    }
}
