//! Launchers start and stop one coordinator per running job (DESIGN §1).
//!
//! `LocalLauncher` runs coordinators as child processes. Exits, expected or
//! not, are reported on a channel with their cause (the exit status and the
//! last error or warning the coordinator logged); job-scheduler decides what
//! they mean. Reports are edges that can be missed (a full store, a restart),
//! so a launcher also answers [`Launcher::alive`]: job-scheduler's periodic
//! reconcile pass compares that level with what its jobs need.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cohort_core::JobId;
use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

use crate::RuntimeError;
use crate::process::{pid_alive, signal_pid, spawn_logged};

/// Where a coordinator finds the services it talks to.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub job_scheduler: String,
    pub model_manager: String,
    pub client_selector: String,
}

/// A coordinator process ended.
#[derive(Debug, Clone)]
pub struct CoordinatorExit {
    pub job_id: JobId,
    /// How it ended, for the job's event log ("exit status 1", "killed by SIGKILL"),
    /// with the last error or warning it logged where there is one
    /// ("exit status 1: error: cannot store round 3: ...").
    pub description: String,
}

#[async_trait]
pub trait Launcher: Send + Sync + 'static {
    /// Starts the job's coordinator with the job's (validated) spec as JSON, which the
    /// coordinator is given as a file (`--job-spec`). Returns its pid where there is one.
    async fn launch(&self, job_id: &JobId, spec_json: &str) -> Result<Option<u32>, RuntimeError>;
    /// Watches a coordinator started by an earlier run of job-scheduler.
    /// Returns false if it is already gone.
    async fn adopt(&self, job_id: &JobId, pid: Option<u32>) -> bool;
    /// Whether the job's coordinator runs now (or is starting): `Some(false)` when this
    /// launcher knows of none for the job or the one it knows has ended, `None` when it
    /// cannot tell now (the cluster's API does not answer). A coordinator of an earlier
    /// job-scheduler that was not adopted is not known: try [`Launcher::adopt`] before
    /// taking `Some(false)` for gone.
    async fn alive(&self, job_id: &JobId) -> Option<bool>;
    /// Terminates the job's coordinator: SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, job_id: &JobId, grace: Duration);
    /// Stops every coordinator this launcher watches (on shutdown). Returns the jobs whose
    /// coordinators it stopped (none where coordinators outlive job-scheduler): they were
    /// stopped on purpose and need a coordinator again at the next start.
    async fn stop_all(&self, grace: Duration) -> Vec<JobId>;
}

struct Running {
    /// Which launch (or adoption) of this launcher: a watcher forgets its own entry only,
    /// never that of a coordinator launched for the job after it.
    serial: u64,
    pid: Option<u32>,
    /// Dropping or firing this ends the watcher; used to stop a child.
    stop: Option<oneshot::Sender<Duration>>,
}

/// Coordinators as child processes of job-scheduler.
pub struct LocalLauncher {
    binary: PathBuf,
    config: CoordinatorConfig,
    log_dir: PathBuf,
    extra_args: Vec<String>,
    /// Where coordinators publish their metrics targets (`--metrics-target-file`), if
    /// they serve metrics.
    metrics_dir: Option<PathBuf>,
    running: Arc<Mutex<HashMap<JobId, Running>>>,
    /// The serial of the last launch or adoption.
    serials: std::sync::atomic::AtomicU64,
    exits: mpsc::UnboundedSender<CoordinatorExit>,
}

impl LocalLauncher {
    pub fn new(
        binary: PathBuf,
        config: CoordinatorConfig,
        log_dir: PathBuf,
        extra_args: Vec<String>,
        exits: mpsc::UnboundedSender<CoordinatorExit>,
    ) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&log_dir).map_err(|source| RuntimeError::WriteFile {
            path: log_dir.clone(),
            source,
        })?;
        Ok(Self {
            binary,
            config,
            log_dir,
            extra_args,
            metrics_dir: None,
            running: Arc::default(),
            serials: std::sync::atomic::AtomicU64::new(0),
            exits,
        })
    }

    /// Coordinators serve metrics on a loopback port of their choosing and publish it as
    /// a Prometheus file-based discovery target in `dir` (`coordinator-<job>.json`).
    pub fn with_metrics_dir(mut self, dir: PathBuf) -> Self {
        self.metrics_dir = Some(dir);
        self
    }

    /// Records the job's coordinator (replacing an older entry); returns its serial.
    fn remember(&self, job_id: &JobId, pid: Option<u32>, stop: oneshot::Sender<Duration>) -> u64 {
        let serial = self
            .serials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if let Ok(mut map) = self.running.lock() {
            map.insert(
                job_id.clone(),
                Running {
                    serial,
                    pid,
                    stop: Some(stop),
                },
            );
        }
        serial
    }

    /// Forgets the coordinator of launch `serial`, unless a later one replaced it.
    /// Reports launch (or adoption) `serial`'s exit and forgets it, in one step under the
    /// lock `alive` takes: whoever sees the coordinator not alive finds its exit, with the
    /// cause, already sent, and no one sees it alive after its exit was reported.
    fn report_exit(
        running: &Mutex<HashMap<JobId, Running>>,
        exits: &mpsc::UnboundedSender<CoordinatorExit>,
        exit: CoordinatorExit,
        serial: u64,
    ) {
        let mut map = running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.get(&exit.job_id).is_some_and(|r| r.serial == serial) {
            map.remove(&exit.job_id);
        }
        let _ = exits.send(exit);
    }
}

/// Whether process `pid` is a coordinator of `job_id` (its command line names the job):
/// a pid stored by an earlier job-scheduler may have been reused by another process since.
fn is_coordinator_of(pid: u32, job_id: &JobId) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(arg) = args.next() {
        if arg == b"--job-id" {
            return args.next() == Some(job_id.as_str().as_bytes());
        }
    }
    false
}

/// How much of the end of a coordinator's log is searched for its last problem.
/// Settings of a local coordinator that it takes from job-scheduler's environment (an
/// operator tunes coordinators there). Nothing else of job-scheduler's configuration reaches
/// a coordinator: not its database URL (a password), nor its listen, health or ready-file
/// settings, which would collide with job-scheduler's own; the rest comes as flags.
pub const COORDINATOR_TUNABLES: [&str; 4] = [
    "COHORT_MAX_CONCURRENT_UPLOADS",
    "COHORT_UPLOAD_IDLE_TIMEOUT",
    "COHORT_STORAGE_PATIENCE",
    // Tests only: where masked updates are copied under secure aggregation.
    "COHORT_SECAGG_TAP_DIR",
];

/// What any process needs of its parent's environment.
const PROCESS_BASICS: [&str; 8] = [
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "TZ",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

const LOG_TAIL_BYTES: u64 = 64 * 1024;
/// The most characters of a log line an exit description carries.
const CAUSE_CHARS: usize = 300;

/// The log's length now: where the lines of a process started now begin.
fn log_length(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// `how` the process ended, with the last problem it logged after byte `from`
/// of `log` (earlier runs of the job's coordinator wrote what comes before).
async fn describe_with_cause(how: String, log: PathBuf, from: u64) -> String {
    let cause = tokio::task::spawn_blocking(move || last_problem(&log, from))
        .await
        .ok()
        .flatten();
    match cause {
        Some(cause) => format!("{how}: {cause}"),
        None => how,
    }
}

/// The last ERROR line (or, without one, WARN line) in `log` after byte
/// `from`, looking at most [`LOG_TAIL_BYTES`] back from its end, cleaned up
/// and cut to [`CAUSE_CHARS`]. Coordinators log no secrets, so a line may be
/// shown to the job's users.
fn last_problem(log: &Path, from: u64) -> Option<String> {
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    let start = from.max(len.saturating_sub(LOG_TAIL_BYTES));
    if start >= len {
        return None;
    }
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    file.take(len - start).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > from && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    let mut warning = None;
    for (i, line) in lines.iter().enumerate().rev() {
        match problem_in(line) {
            Some((Level::Error, mut cause)) => {
                // A panic's message is on the line after "panicked at".
                if cause.contains(" panicked at ")
                    && let Some(next) = lines.get(i + 1)
                {
                    cause = format!("{cause} {}", next.trim());
                }
                return Some(clean(&cause));
            }
            Some((Level::Warn, cause)) if warning.is_none() => warning = Some(cause),
            _ => {}
        }
    }
    warning.map(|w| clean(&w))
}

#[derive(Debug, PartialEq)]
enum Level {
    Error,
    Warn,
}

/// A problem in one log line: `error: ...` (how a service's main ends), a
/// panic, or an ERROR or WARN line of the text or JSON log format.
fn problem_in(line: &str) -> Option<(Level, String)> {
    let line = line.trim();
    if line.starts_with("error:") || line.contains(" panicked at ") {
        return Some((Level::Error, line.to_string()));
    }
    if line.starts_with('{') {
        let level = if line.contains(r#""level":"ERROR""#) {
            Level::Error
        } else if line.contains(r#""level":"WARN""#) {
            Level::Warn
        } else {
            return None;
        };
        let message = json_string_field(line, "message").unwrap_or_default();
        let target = json_string_field(line, "target").unwrap_or_default();
        let word = if level == Level::Error {
            "ERROR"
        } else {
            "WARN"
        };
        let mut text = format!("{word} {target}: {message}");
        // The cause usually rides in an `error` field, as in the text format.
        if let Some(error) = json_string_field(line, "error") {
            text.push_str(&format!(" error={error}"));
        }
        return Some((level, text));
    }
    // "2026-12-06T10:00:00.123456Z ERROR target: message fields" (levels are padded).
    let mut words = line.split_whitespace();
    let _time = words.next()?;
    let (level, word) = match words.next()? {
        "ERROR" => (Level::Error, "ERROR"),
        "WARN" => (Level::Warn, "WARN"),
        _ => return None,
    };
    let at = line.find(word)?;
    Some((level, line[at..].to_string()))
}

/// The first string value of `"field":` in a JSON line, unescaped (enough
/// for what tracing writes; anything odd ends the value).
fn json_string_field(line: &str, field: &str) -> Option<String> {
    let key = format!(r#""{field}":""#);
    let rest = &line[line.find(&key)? + key.len()..];
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' | 't' | 'r' => out.push(' '),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(
                        u32::from_str_radix(&hex, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .unwrap_or('?'),
                    );
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// One line of plain text, at most [`CAUSE_CHARS`] characters.
fn clean(cause: &str) -> String {
    let flat: String = cause
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    match flat.char_indices().nth(CAUSE_CHARS) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat.to_string(),
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            _ => "ended".to_string(),
        },
        Err(e) => format!("could not be waited on: {e}"),
    }
}

#[async_trait]
impl Launcher for LocalLauncher {
    async fn launch(&self, job_id: &JobId, spec_json: &str) -> Result<Option<u32>, RuntimeError> {
        // The spec holds no secrets; it sits beside the coordinator's log.
        let spec = self.log_dir.join(format!("coordinator-{job_id}.spec.json"));
        std::fs::write(&spec, spec_json).map_err(|source| RuntimeError::WriteFile {
            path: spec.clone(),
            source,
        })?;
        let mut cmd = Command::new(&self.binary);
        cmd.env_clear();
        for name in PROCESS_BASICS
            .iter()
            .chain(&COORDINATOR_TUNABLES)
            .chain(&cohort_telemetry::CHILD_VARIABLES)
        {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.arg("--job-spec")
            .arg(&spec)
            .arg("--job-id")
            .arg(job_id.as_str())
            .arg("--job-scheduler")
            .arg(&self.config.job_scheduler)
            .arg("--model-manager")
            .arg(&self.config.model_manager)
            .arg("--client-selector")
            .arg(&self.config.client_selector)
            .args(&self.extra_args);
        if let Some(dir) = &self.metrics_dir {
            cmd.arg("--metrics-listen")
                .arg("127.0.0.1:0")
                .arg("--metrics-target-file")
                .arg(dir.join(format!("coordinator-{job_id}.json")));
        }
        let log = self.log_dir.join(format!("coordinator-{job_id}.log"));
        let program = self.binary.display().to_string();
        // The log is appended to across launches: this run's lines start here.
        let log_start = log_length(&log);
        let mut child = spawn_logged(cmd, &program, &log)?;
        let pid = child.id();
        let (stop_tx, mut stop_rx) = oneshot::channel::<Duration>();
        let serial = self.remember(job_id, pid, stop_tx);
        let running = self.running.clone();
        let exits = self.exits.clone();
        let job = job_id.clone();
        let log_path = log.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                grace = &mut stop_rx => {
                    if let Ok(grace) = grace {
                        crate::process::terminate(&mut child, grace).await;
                    }
                    child.wait().await
                }
            };
            let description = describe_with_cause(describe(status), log_path, log_start).await;
            let exit = CoordinatorExit {
                job_id: job,
                description,
            };
            LocalLauncher::report_exit(&running, &exits, exit, serial);
        });
        tracing::info!(job = %job_id, pid = ?pid, log = %log.display(), "coordinator launched");
        Ok(pid)
    }

    async fn adopt(&self, job_id: &JobId, pid: Option<u32>) -> bool {
        let Some(pid) = pid.filter(|p| pid_alive(*p) && is_coordinator_of(*p, job_id)) else {
            return false;
        };
        let (stop_tx, mut stop_rx) = oneshot::channel::<Duration>();
        let serial = self.remember(job_id, Some(pid), stop_tx);
        let running = self.running.clone();
        let exits = self.exits.clone();
        let job = job_id.clone();
        // It still appends to the log its launch opened; what it writes from now on is ours.
        let log = self.log_dir.join(format!("coordinator-{job_id}.log"));
        let log_start = log_length(&log);
        // Not our child: poll for its end.
        tokio::spawn(async move {
            let mut stop_deadline: Option<tokio::time::Instant> = None;
            loop {
                if !pid_alive(pid) {
                    break;
                }
                if let Ok(grace) = stop_rx.try_recv() {
                    signal_pid(pid, Signal::SIGTERM);
                    stop_deadline = Some(tokio::time::Instant::now() + grace);
                }
                if stop_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    signal_pid(pid, Signal::SIGKILL);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let description =
                describe_with_cause("exited (adopted process)".to_string(), log, log_start).await;
            let exit = CoordinatorExit {
                job_id: job,
                description,
            };
            LocalLauncher::report_exit(&running, &exits, exit, serial);
        });
        tracing::info!(job = %job_id, pid, "adopted running coordinator");
        true
    }

    async fn alive(&self, job_id: &JobId) -> Option<bool> {
        let pid = self.running.lock().ok()?.get(job_id).map(|r| r.pid);
        Some(match pid {
            None => false,
            // Watched, but a dead child not reaped yet is no coordinator either.
            Some(Some(pid)) => pid_alive(pid),
            Some(None) => true,
        })
    }

    async fn stop(&self, job_id: &JobId, grace: Duration) {
        let stop = self
            .running
            .lock()
            .ok()
            .and_then(|mut map| map.get_mut(job_id).and_then(|r| r.stop.take()));
        if let Some(stop) = stop {
            let _ = stop.send(grace);
        }
    }

    async fn stop_all(&self, grace: Duration) -> Vec<JobId> {
        let (jobs, pids): (Vec<JobId>, Vec<Option<u32>>) = self
            .running
            .lock()
            .map(|map| map.iter().map(|(j, r)| (j.clone(), r.pid)).unzip())
            .unwrap_or_default();
        for job in &jobs {
            self.stop(job, grace).await;
        }
        // Wait for them to go, bounded by the grace period plus a little.
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline && pids.iter().flatten().any(|p| pid_alive(*p))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        jobs
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A directory of its own under the system's temporary directory.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "cohort-launcher-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn log_with(dir: &TempDir, text: &str) -> PathBuf {
        let log = dir.0.join("c.log");
        std::fs::write(&log, text).unwrap();
        log
    }

    #[test]
    fn the_last_error_wins_over_later_warnings_and_info() {
        let dir = TempDir::new();
        let log = log_with(
            &dir,
            "2026-12-06T10:00:00.000001Z  INFO cohort_coordinator: serving\n\
             2026-12-06T10:00:01.000001Z ERROR cohort_coordinator::rounds: first failure\n\
             2026-12-06T10:00:02.000001Z ERROR cohort_coordinator::rounds: storing round 3 failed error=belongs to another namespace\n\
             2026-12-06T10:00:03.000001Z  WARN cohort_coordinator: shutting down\n\
             2026-12-06T10:00:04.000001Z  INFO cohort_coordinator: bye\n",
        );
        assert_eq!(
            last_problem(&log, 0).as_deref(),
            Some(
                "ERROR cohort_coordinator::rounds: storing round 3 failed error=belongs to another namespace"
            )
        );
        // Without an error, the last warning.
        let log = log_with(
            &dir,
            "2026-12-06T10:00:00.000001Z  WARN a: early\n2026-12-06T10:00:03.000001Z  WARN a: late\nplain output\n",
        );
        assert_eq!(last_problem(&log, 0).as_deref(), Some("WARN a: late"));
        let log = log_with(&dir, "2026-12-06T10:00:00.000001Z  INFO a: fine\n");
        assert_eq!(last_problem(&log, 0), None);
        assert_eq!(last_problem(&dir.0.join("missing.log"), 0), None);
    }

    #[test]
    fn only_lines_after_the_start_count() {
        let dir = TempDir::new();
        let earlier = "error: an earlier launch failed\n";
        let log = log_with(
            &dir,
            &format!("{earlier}2026-12-06T10:00:00.000001Z  INFO a: fine\n"),
        );
        assert_eq!(last_problem(&log, earlier.len() as u64), None);
        assert_eq!(
            last_problem(&log, 0).as_deref(),
            Some("error: an earlier launch failed")
        );
    }

    #[test]
    fn main_errors_panics_and_json_lines_are_found() {
        let dir = TempDir::new();
        let log = log_with(
            &dir,
            "2026-12-06T10:00:00.000001Z ERROR a: something\nerror: job spec: model.init: tensor \"fc0.weight\" has shape [64, 64]\n",
        );
        assert_eq!(
            last_problem(&log, 0).as_deref(),
            Some("error: job spec: model.init: tensor \"fc0.weight\" has shape [64, 64]")
        );
        let log = log_with(
            &dir,
            "\nthread 'main' panicked at services/coordinator/src/rounds.rs:10:5:\nindex out of bounds\nnote: run with `RUST_BACKTRACE=1`\n",
        );
        assert_eq!(
            last_problem(&log, 0).as_deref(),
            Some(
                "thread 'main' panicked at services/coordinator/src/rounds.rs:10:5: index out of bounds"
            )
        );
        let log = log_with(
            &dir,
            concat!(
                r#"{"timestamp":"2026-12-06T10:00:00Z","level":"ERROR","fields":{"message":"round failed","error":"no \"quorum\"\nat all \u00e9"},"target":"cohort_coordinator::rounds"}"#,
                "\n",
                r#"{"timestamp":"2026-12-06T10:00:01Z","level":"INFO","fields":{"message":"bye"},"target":"cohort_coordinator"}"#,
                "\n"
            ),
        );
        assert_eq!(
            last_problem(&log, 0).as_deref(),
            Some("ERROR cohort_coordinator::rounds: round failed error=no \"quorum\" at all é")
        );
    }

    #[test]
    fn causes_are_one_bounded_line() {
        let dir = TempDir::new();
        let long = format!("error: {}\u{7}end", "é".repeat(1000));
        let log = log_with(&dir, &format!("{long}\n"));
        let cause = last_problem(&log, 0).unwrap();
        assert_eq!(
            cause.chars().count(),
            CAUSE_CHARS + 1,
            "cut, with an ellipsis"
        );
        assert!(
            cause.starts_with("error: éé") && cause.ends_with("é…"),
            "{cause}"
        );
        // Only the end of a large log is read; a line cut there is skipped.
        let filler = "x".repeat(LOG_TAIL_BYTES as usize);
        let log = log_with(
            &dir,
            &format!(
                "error: far back {filler}\n2026-12-06T10:00:00.000001Z  WARN a: near the end\n"
            ),
        );
        assert_eq!(
            last_problem(&log, 0).as_deref(),
            Some("WARN a: near the end")
        );
    }

    async fn next_exit(rx: &mut mpsc::UnboundedReceiver<CoordinatorExit>) -> CoordinatorExit {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no exit reported within 30 s")
            .expect("exit channel closed")
    }

    fn launcher_with(
        dir: &TempDir,
        script: &str,
    ) -> (LocalLauncher, mpsc::UnboundedReceiver<CoordinatorExit>) {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.0.join("coordinator");
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let launcher = LocalLauncher::new(
            bin,
            CoordinatorConfig {
                job_scheduler: "127.0.0.1:1".into(),
                model_manager: "127.0.0.1:2".into(),
                client_selector: "127.0.0.1:3".into(),
            },
            dir.0.join("logs"),
            Vec::new(),
            tx,
        )
        .unwrap();
        (launcher, rx)
    }

    /// Runs until killed (or its parent, the test, ends).
    const WAITS: &str = "#!/bin/sh\nwhile kill -0 \"$PPID\" 2>/dev/null; do sleep 0.1; done\n";

    async fn wait_alive(launcher: &LocalLauncher, job: &JobId, want: Option<bool>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while launcher.alive(job).await != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "alive never became {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn alive_follows_the_coordinator_and_an_old_exit_forgets_only_its_own() {
        let dir = TempDir::new();
        let (launcher, mut exits) = launcher_with(&dir, WAITS);
        let job = JobId::parse("job-a1b2c3").unwrap();
        assert_eq!(launcher.alive(&job).await, Some(false), "never launched");
        let first = launcher.launch(&job, "{}").await.unwrap().unwrap();
        assert_eq!(launcher.alive(&job).await, Some(true));
        signal_pid(first, Signal::SIGKILL);
        assert_eq!(next_exit(&mut exits).await.description, "killed by SIGKILL");
        wait_alive(&launcher, &job, Some(false)).await;

        // A relaunch while the old one still runs (a missed exit): the old one's end
        // must not make the launcher forget the new one.
        let old = launcher.launch(&job, "{}").await.unwrap().unwrap();
        let new = launcher.launch(&job, "{}").await.unwrap().unwrap();
        signal_pid(old, Signal::SIGKILL);
        assert_eq!(next_exit(&mut exits).await.job_id, job);
        assert!(pid_alive(new));
        assert_eq!(
            launcher.alive(&job).await,
            Some(true),
            "the new one is known"
        );

        // Shutdown stops it and names the job: it was stopped on purpose.
        assert_eq!(
            launcher.stop_all(Duration::from_secs(5)).await,
            vec![job.clone()]
        );
        assert!(!pid_alive(new));
        assert!(next_exit(&mut exits).await.description.contains("SIGTERM"));
        wait_alive(&launcher, &job, Some(false)).await;
        assert!(launcher.stop_all(Duration::from_secs(1)).await.is_empty());
    }

    #[tokio::test]
    async fn a_coordinator_gets_only_the_allowed_part_of_the_environment() {
        let dir = TempDir::new();
        let seen = dir.0.join("env.txt");
        let script = format!("#!/bin/sh\nenv > '{}'\n", seen.display());
        let (launcher, mut exits) = launcher_with(&dir, &script);
        let job = JobId::parse("job-a1b2c3").unwrap();
        launcher.launch(&job, "{}").await.unwrap();
        assert_eq!(next_exit(&mut exits).await.description, "exit status 0");
        let env = std::fs::read_to_string(&seen).unwrap();
        let names: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, _)| n)
            .collect();
        assert!(names.contains(&"PATH"), "{names:?}");
        // cargo sets it for every test run: the parent has it, the coordinator must not.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        for name in &names {
            assert!(
                PROCESS_BASICS.contains(name)
                    || COORDINATOR_TUNABLES.contains(name)
                    || cohort_telemetry::CHILD_VARIABLES.contains(name)
                    || *name == "PWD"
                    || *name == "SHLVL"
                    || *name == "_",
                "{name} reached the coordinator"
            );
        }
    }

    #[tokio::test]
    async fn adopt_takes_only_a_live_coordinator_of_the_job() {
        let dir = TempDir::new();
        let (launcher, mut exits) = launcher_with(&dir, WAITS);
        let job = JobId::parse("job-a1b2c3").unwrap();
        let spawn = |args: &[&str]| {
            // No output handles: the shell's `sleep` outlives a killed shell and must not
            // hold the test's.
            let child = std::process::Command::new("sh")
                .args(["-c", "sleep 30; true", "coordinator"])
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Until it has exec'd, its command line is this test's.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
                .unwrap_or_default()
                .starts_with(b"sh\0")
            {
                assert!(std::time::Instant::now() < deadline, "sh never started");
                std::thread::sleep(Duration::from_millis(5));
            }
            child
        };
        // A live process that is not the job's coordinator (a reused pid).
        let mut stranger = spawn(&["--job-id", "job-other1"]);
        assert!(!launcher.adopt(&job, Some(stranger.id())).await);
        assert_eq!(launcher.alive(&job).await, Some(false));
        assert!(!launcher.adopt(&job, None).await);
        let mut orphan = spawn(&["--job-spec", "x", "--job-id", job.as_str()]);
        assert!(launcher.adopt(&job, Some(orphan.id())).await);
        assert_eq!(launcher.alive(&job).await, Some(true));
        signal_pid(orphan.id(), Signal::SIGKILL);
        let _ = orphan.wait();
        let exit = next_exit(&mut exits).await;
        assert_eq!(
            (exit.job_id, exit.description.as_str()),
            (job.clone(), "exited (adopted process)")
        );
        wait_alive(&launcher, &job, Some(false)).await;
        // A dead pid is not adopted.
        assert!(!launcher.adopt(&job, Some(orphan.id())).await);
        let _ = stranger.kill();
        let _ = stranger.wait();
    }

    #[tokio::test]
    async fn an_exit_carries_the_last_error_of_that_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        // Fails on its first run, succeeds quietly on the second.
        let bin = dir.0.join("coordinator");
        let marker = dir.0.join("ran-once");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\n\
                 if [ -e '{marker}' ]; then echo '2026-12-06T10:00:00.000001Z  INFO c: done'; exit 0; fi\n\
                 touch '{marker}'\n\
                 echo '2026-12-06T10:00:00.000001Z  WARN c: slow party'\n\
                 echo 'error: storing round 1: model \"m\" is not yours' >&2\n\
                 exit 3\n",
                marker = marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let launcher = LocalLauncher::new(
            bin,
            CoordinatorConfig {
                job_scheduler: "127.0.0.1:1".into(),
                model_manager: "127.0.0.1:2".into(),
                client_selector: "127.0.0.1:3".into(),
            },
            dir.0.join("logs"),
            Vec::new(),
            tx,
        )
        .unwrap();
        let job = JobId::parse("job-a1b2c3").unwrap();
        launcher.launch(&job, "{}").await.unwrap();
        let exit = next_exit(&mut rx).await;
        assert_eq!(exit.job_id, job);
        assert_eq!(
            exit.description,
            "exit status 3: error: storing round 1: model \"m\" is not yours"
        );
        // The log keeps the first run's lines; the second run's exit is its own.
        launcher.launch(&job, "{}").await.unwrap();
        assert_eq!(next_exit(&mut rx).await.description, "exit status 0");
    }
}
