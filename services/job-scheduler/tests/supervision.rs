//! Coordinator supervision, in process: the real `JobManager` over a real SQLite
//! store and a `LocalLauncher` running stand-in coordinators (shell scripts that
//! note each launch and either wait to be killed or fail at once). The test plays
//! the coordinator's calls (ready, round reports) and kills the processes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cohort_core::{JobId, JobSpec, JobState};
use cohort_job_scheduler::manager::{JobManager, ManagerConfig, SupervisionConfig};
use cohort_runtime::launcher::{CoordinatorConfig, CoordinatorExit, LocalLauncher};
use cohort_runtime::process::{pid_alive, signal_pid};
use cohort_store::jobs::{JobEventRecord, JobRecord, JobStore, RoundRecord};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Notes each launch ("<unix time> <pid>"); a job named "crash" then fails at once,
/// any other runs until killed (or until the test process ends).
const COORDINATOR: &str = r#"#!/bin/sh
echo "$(date +%s.%N) $$" >> "$(dirname "$0")/launches"
if grep -q '"name":"crash"' "$2"; then
  echo 'error: cannot load the model' >&2
  exit 1
fi
while kill -0 "$PPID" 2>/dev/null; do sleep 0.1; done
"#;

/// One job-scheduler's worth of supervision over the store in `dir`.
struct Scheduler {
    manager: Arc<JobManager>,
    store: Arc<dyn JobStore>,
    supervisor: tokio::task::JoinHandle<()>,
    dir: PathBuf,
    /// Exits the launcher reports when the supervisor is not given them.
    unseen: Option<mpsc::UnboundedReceiver<CoordinatorExit>>,
    _no_exits: Option<mpsc::UnboundedSender<CoordinatorExit>>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

struct Options {
    max_launch_attempts: u32,
    supervision: SupervisionConfig,
    /// Whether the supervisor hears of exits (false: every exit event is lost).
    hears_exits: bool,
}

fn options(max_launch_attempts: u32, backoff_ms: u64, backoff_max_ms: u64) -> Options {
    Options {
        max_launch_attempts,
        supervision: SupervisionConfig {
            reconcile_interval: Duration::from_millis(200),
            relaunch_backoff: Duration::from_millis(backoff_ms),
            relaunch_backoff_max: Duration::from_millis(backoff_max_ms),
        },
        hears_exits: true,
    }
}

async fn open_store(dir: &Path) -> Arc<dyn JobStore> {
    let url = format!("sqlite://{}", dir.join("jobs.db").display());
    cohort_store::open::open_job_store(&url, &Default::default())
        .await
        .unwrap()
}

/// Starts a scheduler on `dir` (its store and coordinators' directory) as
/// job-scheduler starts: recovery first, then the supervisor.
async fn start(dir: &Path, opts: Options) -> Scheduler {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("coordinator.sh");
    std::fs::write(&bin, COORDINATOR).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = open_store(dir).await;
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    let launcher = LocalLauncher::new(
        bin,
        CoordinatorConfig {
            job_scheduler: "127.0.0.1:1".into(),
            model_manager: "127.0.0.1:1".into(),
            client_selector: "127.0.0.1:1".into(),
        },
        dir.join("work"),
        Vec::new(),
        exits_tx,
    )
    .unwrap();
    let manager = JobManager::with_supervision(
        store.clone(),
        Arc::new(launcher),
        ManagerConfig {
            max_launch_attempts: opts.max_launch_attempts,
            stop_grace: Duration::from_secs(1),
            tls: None,
            max_job_log_entries: 1000,
            max_model_parameters: 1_000_000,
        },
        opts.supervision,
    );
    manager.recover().await;
    let (unseen, no_exits, supervised) = if opts.hears_exits {
        (None, None, exits_rx)
    } else {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(exits_rx), Some(tx), rx)
    };
    let supervisor = tokio::spawn(manager.clone().supervise(supervised));
    Scheduler {
        manager,
        store,
        supervisor,
        dir: dir.to_path_buf(),
        unseen,
        _no_exits: no_exits,
    }
}

fn spec(name: &str, rounds: u32) -> JobSpec {
    JobSpec::parse(&format!(
        "name: {name}\nmodel: {{arch: logreg}}\ndata: {{dataset: digits}}\nrounds: {rounds}\n\
         clients: {{per_round: 2, min: 2}}\n"
    ))
    .unwrap()
}

fn round(n: u32) -> RoundRecord {
    RoundRecord {
        round: n,
        eval_loss: 0.5,
        eval_accuracy: 0.8,
        eval_samples: 100,
        train_loss: 0.4,
        updates: 2,
        model_version: n,
        duration_ms: 10,
        refused_updates: 0,
        dropped_updates: 0,
        task_failures: 0,
        robust_accuracy: 0.8,
        eval_parties: 2,
        eval_parties_expected: 2,
        bytes_to_parties: 0,
        bytes_from_parties: 0,
        bytes_from_parties_uncompressed: 0,
        selected: Vec::new(),
        dp_epsilon: 0.0,
        dp_sampling_rate: 0.0,
    }
}

impl Scheduler {
    /// Every launch so far: (unix time in seconds, pid).
    fn launches(&self) -> Vec<(f64, u32)> {
        std::fs::read_to_string(self.dir.join("launches"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (time, pid) = l.split_once(' ').unwrap();
                (time.parse().unwrap(), pid.parse().unwrap())
            })
            .collect()
    }

    async fn wait_launches(&self, n: usize, within: Duration) -> Vec<(f64, u32)> {
        let deadline = Instant::now() + within;
        loop {
            let launches = self.launches();
            if launches.len() >= n {
                return launches;
            }
            assert!(
                Instant::now() < deadline,
                "{n} launches not seen within {within:?}: {launches:?}; job log: {:?}",
                self.all_events().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn job(&self, id: &JobId) -> JobRecord {
        self.store.get_job(id).await.unwrap()
    }

    async fn wait_job(
        &self,
        id: &JobId,
        within: Duration,
        what: &str,
        done: impl Fn(&JobRecord) -> bool,
    ) -> JobRecord {
        let deadline = Instant::now() + within;
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not reached within {within:?}: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the coordinator of launch `n` (1-based) to be recorded, then reports it
    /// ready, as a coordinator does; returns its pid.
    async fn ready(&self, id: &JobId, n: usize) -> u32 {
        let pid = self.wait_launches(n, Duration::from_secs(30)).await[n - 1].1;
        self.wait_job(id, Duration::from_secs(30), "its pid recorded", |j| {
            j.state == JobState::Starting && j.coordinator_pid == Some(pid)
        })
        .await;
        self.manager
            .coordinator_ready(id, "127.0.0.1:9", pid)
            .await
            .unwrap();
        pid
    }

    async fn events(&self, id: &JobId) -> Vec<JobEventRecord> {
        self.store.list_events(id, 0).await.unwrap()
    }

    async fn all_events(&self) -> Vec<String> {
        let mut out = Vec::new();
        let jobs = self
            .store
            .list_jobs(&Default::default(), 100, None)
            .await
            .map(|p| p.items)
            .unwrap_or_default();
        for j in jobs {
            for e in self.store.list_events(&j.id, 0).await.unwrap_or_default() {
                out.push(e.reason);
            }
        }
        out
    }
}

/// The attempt numbers the job's log gives its launches, in order.
fn attempts(events: &[JobEventRecord], max: u32) -> Vec<u32> {
    let tail = format!(" of {max})");
    events
        .iter()
        .filter_map(|e| {
            let end = e.reason.strip_suffix(&tail)?;
            let at = end.rfind("(attempt ")?;
            end[at + "(attempt ".len()..].parse().ok()
        })
        .collect()
}

async fn kill(pid: u32) {
    signal_pid(pid, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "{pid} did not die");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_resets_after_progress_but_still_fails_a_job_that_makes_none() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), options(2, 50, 1000)).await;
    let id = s.manager.create(spec("progress", 10)).await.unwrap().id;

    // Five kills, each after a completed round: more than the budget of 2.
    for n in 1..=5u32 {
        let pid = s.ready(&id, n as usize).await;
        s.manager.report_round(&id, &round(n)).await.unwrap();
        assert_eq!(s.job(&id).await.launch_attempts, 0, "progress resets");
        kill(pid).await;
        s.wait_launches(n as usize + 1, Duration::from_secs(30))
            .await;
    }
    let job = s.job(&id).await;
    assert_eq!(job.state, JobState::Starting, "{}", job.reason);
    assert_eq!(
        job.reason,
        "coordinator killed by SIGKILL; relaunching from round 6 (attempt 1 of 2)"
    );
    let events = s.events(&id).await;
    assert_eq!(
        attempts(&events, 2),
        [1; 6],
        "the first launch, then five after progress: {events:?}"
    );

    // Without progress the budget still ends it: one relaunch more, then FAILED.
    let pid = s.ready(&id, 6).await;
    kill(pid).await;
    let pid = s.ready(&id, 7).await;
    kill(pid).await;
    let failed = s
        .wait_job(&id, Duration::from_secs(30), "FAILED", |j| {
            j.state == JobState::Failed
        })
        .await;
    assert!(
        failed
            .reason
            .ends_with("gave up after 2 coordinator launches without a completed round"),
        "{}",
        failed.reason
    );
    assert_eq!(s.launches().len(), 7, "no launch past the budget");
    assert_eq!(attempts(&s.events(&id).await, 2), [1, 1, 1, 1, 1, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaunches_back_off_exponentially_and_every_launch_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), options(5, 300, 1000)).await;
    let id = s.manager.create(spec("crash", 3)).await.unwrap().id;
    let failed = s
        .wait_job(&id, Duration::from_secs(60), "FAILED", |j| {
            j.state == JobState::Failed
        })
        .await;
    assert!(
        failed
            .reason
            .starts_with("coordinator exit status 1: error: cannot load the model")
            && failed.reason.contains("gave up after 5"),
        "{}",
        failed.reason
    );
    let launches = s.launches();
    assert_eq!(launches.len(), 5, "{launches:?}");
    let gaps: Vec<f64> = launches.windows(2).map(|w| w[1].0 - w[0].0).collect();
    // 300 ms, doubling, capped at 1 s: 0.3, 0.6, 1.0, 1.0 (uncapped the last would be 2.4).
    for (gap, least) in gaps.iter().zip([0.3, 0.6, 1.0, 1.0]) {
        assert!(*gap >= least - 0.02, "gap {gap} below {least}: {gaps:?}");
    }
    assert!(gaps[3] < 2.2, "the wait is capped: {gaps:?}");
    // A coordinator that dies while STARTING changes no state, yet each launch is in
    // the log, numbered in turn.
    let events = s.events(&id).await;
    assert_eq!(attempts(&events, 5), [1, 2, 3, 4, 5], "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.reason.contains(" in 300ms (attempt 2 of 5)")),
        "the wait is told: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_exit_is_found_by_the_reconcile_pass() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(
        dir.path(),
        Options {
            hears_exits: false,
            ..options(5, 50, 1000)
        },
    )
    .await;
    let id = s.manager.create(spec("missed", 5)).await.unwrap().id;
    let pid = s.ready(&id, 1).await;
    s.manager.report_round(&id, &round(1)).await.unwrap();
    kill(pid).await;
    // The launcher did report it, where the supervisor does not listen.
    let lost = tokio::time::timeout(Duration::from_secs(30), s.unseen.as_mut().unwrap().recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lost.job_id, id);

    s.wait_launches(2, Duration::from_secs(30)).await;
    let job = s
        .wait_job(&id, Duration::from_secs(30), "relaunched", |j| {
            j.coordinator_pid.is_some()
        })
        .await;
    assert_eq!(job.state, JobState::Starting);
    assert_eq!(
        job.reason,
        "coordinator is gone (found by job-scheduler's periodic check); relaunching from \
         round 2 (attempt 1 of 5)"
    );
    // Alive coordinators are left alone: no further launch over a few passes.
    s.ready(&id, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.launches().len(), 2);
    assert_eq!(s.job(&id).await.state, JobState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_neither_relaunches_nor_counts_and_the_next_start_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path(), options(2, 50, 1000)).await;
    let id = s.manager.create(spec("restarted", 5)).await.unwrap().id;
    let mut pid = s.ready(&id, 1).await;
    // Five restarts of job-scheduler, without a round completed: more than the budget.
    for restart in 1..=5usize {
        s.manager.shut_down(Duration::from_secs(5)).await;
        assert!(!pid_alive(pid), "the coordinator was stopped");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            s.launches().len(),
            restart,
            "nothing relaunched at shutdown"
        );
        let job = s.job(&id).await;
        assert_eq!(
            (job.state, job.launch_attempts),
            (JobState::Running, 0),
            "the job waits for the next start; the stopped launch is not counted"
        );
        drop(s);
        s = start(dir.path(), options(2, 50, 1000)).await;
        pid = s.ready(&id, restart + 1).await;
        let job = s.job(&id).await;
        assert_eq!(job.launch_attempts, 1);
    }
    let events = s.events(&id).await;
    assert_eq!(attempts(&events, 2), [1; 6], "{events:?}");
    assert!(
        events.iter().any(|e| e.reason
            == "coordinator was gone when job-scheduler restarted; relaunching from round 1 \
                (attempt 1 of 2)"),
        "{events:?}"
    );

    // A relaunch waiting out its backoff at shutdown is given back too.
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), options(5, 60_000, 60_000)).await;
    let id = s.manager.create(spec("crash", 3)).await.unwrap().id;
    s.wait_job(&id, Duration::from_secs(30), "a relaunch waiting", |j| {
        j.launch_attempts == 2 && j.reason.contains(" in 1m ")
    })
    .await;
    s.manager.shut_down(Duration::from_secs(5)).await;
    let job = s.job(&id).await;
    assert_eq!((job.state, job.launch_attempts), (JobState::Starting, 1));
    assert_eq!(s.launches().len(), 1);
}
