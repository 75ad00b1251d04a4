//! Restarts that must not cost a job: a coordinator that dies while the database is
//! down, a coordinator killed again and again, and `cohort up` stopped with Ctrl-C and
//! started again, over and over. Each job must SUCCEED with every round, and its log must
//! count coordinator launches as they happened. Also: `cohort up` reports every restart of
//! a service it supervises, failed ones with their cause.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cohort_cli::Api;
use cohort_cli::profile::Profile;
use cohort_core::JobState;
use cohort_integration_tests::{
    Federation, assert_one_version_per_round, cohort_bin, coordinator_pids, descendant_groups,
    digits_job, on_postgres, state_of,
};
use cohort_proto::v1 as pb;
use nix::sys::signal::Signal;
use tokio::time::Instant;

/// The pid of the job's coordinator, waiting (30 s at most) for there to be exactly one.
async fn coordinator_of(job_id: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids = coordinator_pids(job_id);
        if let [pid] = pids[..] {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "not one coordinator for {job_id}: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills `pid` and waits (30 s at most) until it is gone.
async fn kill(pid: u32) {
    cohort_runtime::process::signal_pid(pid, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cohort_runtime::process::pid_alive(pid) {
        assert!(Instant::now() < deadline, "coordinator {pid} did not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The attempt numbers the job's log gives its coordinator launches, in order.
fn attempts(events: &[pb::JobEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| {
            let end = e.reason.strip_suffix(" of 5)")?;
            let at = end.rfind("(attempt ")?;
            end[at + "(attempt ".len()..].parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_dies_while_postgres_is_down_is_relaunched_once_it_is_back() {
    let Some((pg, fed)) = on_postgres(3).await else {
        return;
    };
    let services_before = fed.stack.pids();
    let job = fed
        .create_job(&digits_job("stranded", 8, 3, 2, "60s"))
        .await
        .expect("create");
    fed.wait_job(
        &job.id,
        Duration::from_secs(120),
        "round 2 while RUNNING",
        |j| j.rounds_completed >= 2 && state_of(j) == JobState::Running,
    )
    .await
    .expect("job progresses");
    let coordinator = coordinator_of(&job.id).await;

    pg.stop_server().expect("stop PostgreSQL");
    // Its exit cannot be recorded now: job-scheduler must keep it, not drop it.
    kill(coordinator).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    pg.start_server().expect("start PostgreSQL again");

    let done = fed
        .wait_end(&job.id, Duration::from_secs(300))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    let rounds: Vec<u32> = done.rounds.iter().map(|r| r.round).collect();
    assert_eq!(rounds, (1..=8).collect::<Vec<_>>());
    assert_one_version_per_round(&fed.api(), &done, 8).await;
    // One relaunch, for the kill; no service was restarted (job-scheduler included).
    let events = fed.events(&job.id).await.expect("events");
    let relaunches: Vec<&str> = events
        .iter()
        .filter(|e| e.reason.contains("relaunching from round"))
        .map(|e| e.reason.as_str())
        .collect();
    assert_eq!(relaunches.len(), 1, "{relaunches:?}");
    assert!(
        relaunches[0].starts_with("coordinator killed by SIGKILL"),
        "{relaunches:?}"
    );
    // The exit came while the store was down: it was kept (and retried, or simply waited for
    // while the supervisor's pass waited on the pool) and handled once the store was back.
    assert_eq!(fed.stack.pids(), services_before, "no service restarted");
    for (name, pid) in &services_before {
        assert!(cohort_runtime::process::pid_alive(*pid), "{name} died");
    }
}

/// How many relaunches the job's log records for a killed coordinator.
async fn relaunches_after_kills(fed: &Federation, id: &str) -> usize {
    fed.events(id)
        .await
        .unwrap_or_default()
        .iter()
        .filter(|e| {
            // The cause may follow: the last warning the coordinator logged.
            e.reason.starts_with("coordinator killed by SIGKILL")
                && e.reason.contains("; relaunching from round")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_coordinator_kills_over_thirty_rounds_do_not_fail_the_job() {
    let fed = Federation::start(3).await.expect("federation");
    let job = fed
        .create_job(&digits_job("tenacious", 30, 3, 2, "60s"))
        .await
        .expect("create");
    // Each kill comes once the coordinator launched after the previous one has completed
    // a round: ten kills, twice the launch budget, spread over the job.
    let mut base = 0;
    for kill_number in 1..=10 {
        let seen = fed
            .wait_job(
                &job.id,
                Duration::from_secs(180),
                &format!("a round after kill {}", kill_number - 1),
                |j| j.rounds_completed > base && state_of(j) == JobState::Running,
            )
            .await
            .expect("job progresses");
        assert!(
            seen.rounds_completed < 30,
            "the job must still run for kill {kill_number}; it is at round {}",
            seen.rounds_completed
        );
        kill(coordinator_of(&job.id).await).await;
        // Rounds counted once the relaunch is decided are the dead coordinator's.
        let deadline = Instant::now() + Duration::from_secs(60);
        while relaunches_after_kills(&fed, &job.id).await < kill_number {
            assert!(Instant::now() < deadline, "kill {kill_number} not handled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        base = fed.get_job(&job.id).await.expect("job").rounds_completed;
    }
    let done = fed
        .wait_end(&job.id, Duration::from_secs(600))
        .await
        .expect("job ends");
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    let rounds: Vec<u32> = done.rounds.iter().map(|r| r.round).collect();
    assert_eq!(rounds, (1..=30).collect::<Vec<_>>());
    assert_one_version_per_round(&fed.api(), &done, 30).await;
    // The first launch and ten relaunches, each the first since a completed round.
    let events = fed.events(&job.id).await.expect("events");
    assert_eq!(attempts(&events), [1; 11], "{events:#?}");
    assert_eq!(relaunches_after_kills(&fed, &job.id).await, 10);
}

/// `cohort up` as a child process in a process group of its own (Ctrl-C reaches it
/// alone, as in a terminal); everything it started is killed on drop.
struct Up {
    child: std::process::Child,
    profile: PathBuf,
}

impl Up {
    fn start(data: &Path, config: &Path) -> Up {
        Up::start_with(data, config, Stdio::inherit())
    }

    fn start_with(data: &Path, config: &Path, stderr: Stdio) -> Up {
        let mut child = std::process::Command::new(cohort_bin())
            .args(["up", "--json", "--listen", "127.0.0.1:0", "--clients", "3"])
            .arg("--data-dir")
            .arg(data)
            .env("XDG_CONFIG_HOME", config)
            .env_remove("COHORT_DATABASE_URL")
            .env_remove("COHORT_BLOB_URL")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .expect("start cohort up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("cohort up reports it is up");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        assert_eq!(v["event"], "up", "{v}");
        Up {
            child,
            profile: PathBuf::from(v["profile"].as_str().expect("profile path")),
        }
    }

    fn api(&self) -> Api {
        Api::from_profile(&Profile::load(&self.profile).expect("profile")).expect("api")
    }

    /// Ctrl-C, and its exit status once everything it started has stopped.
    async fn interrupt(&mut self) -> std::process::ExitStatus {
        cohort_runtime::process::signal_pid(self.child.id(), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "cohort up did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        for g in descendant_groups(self.child.id()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(g), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the job through `api` until `done` holds, for at most `within`.
async fn wait_for(
    api: &Api,
    id: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Ok(job) = api
            .jobs()
            .get_job(pb::GetJobRequest { id: id.to_string() })
            .await
        {
            let job = job.into_inner();
            if done(&job) {
                return job;
            }
            assert!(
                !state_of(&job).is_terminal(),
                "the job ended {} while waiting for {what}: {}",
                state_of(&job),
                job.reason
            );
            last = Some(job);
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached within {within:?}: {:?}",
            last.map(|j| (state_of(&j), j.rounds_completed, j.reason))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_ctrl_c_restarts_of_cohort_up_do_not_fail_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, config) = (dir.path().join("data"), dir.path().join("config"));
    let mut up = Up::start(&data, &config);
    let job = up
        .api()
        .jobs()
        .create_job(pb::CreateJobRequest {
            spec: digits_job("enduring", 30, 3, 2, "60s"),
        })
        .await
        .expect("create")
        .into_inner();
    wait_for(
        &up.api(),
        &job.id,
        Duration::from_secs(180),
        "round 2",
        |j| j.rounds_completed >= 2,
    )
    .await;
    // Each restart comes as soon as the coordinator is back, round or no round: five
    // restarts, each a stopped and a new launch, with a launch budget of five.
    for restart in 1..=5 {
        let status = up.interrupt().await;
        assert!(status.success(), "cohort up ended {status} on Ctrl-C");
        drop(up);
        up = Up::start(&data, &config);
        wait_for(
            &up.api(),
            &job.id,
            Duration::from_secs(180),
            &format!("RUNNING after restart {restart}"),
            |j| state_of(j) == JobState::Running,
        )
        .await;
    }
    let api = up.api();
    let done = wait_for(
        &api,
        &job.id,
        Duration::from_secs(600),
        "the job to end",
        |j| state_of(j).is_terminal(),
    )
    .await;
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
    let rounds: Vec<u32> = done.rounds.iter().map(|r| r.round).collect();
    assert_eq!(rounds, (1..=30).collect::<Vec<_>>());
    assert_one_version_per_round(&api, &done, 30).await;
    let events = api
        .jobs()
        .list_job_events(pb::ListJobEventsRequest {
            id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    // The first launch and one per restart: a planned stop is never counted.
    assert_eq!(attempts(&events), [1; 6], "{events:#?}");
    let resumed = events
        .iter()
        .filter(|e| {
            e.reason
                .starts_with("coordinator was gone when job-scheduler restarted")
        })
        .count();
    assert_eq!(resumed, 5, "{events:#?}");

    // Nothing was launched while job-scheduler shut down: one launch per start.
    let log = std::fs::read_to_string(data.join("logs/job-scheduler.log")).expect("log");
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(count("received, shutting down"), 5, "five shutdowns: {log}");
    assert_eq!(count("coordinator launched"), 6, "{log}");
}

/// The pid of the service `up` runs as `name`, waiting (30 s at most) for a live one
/// other than `not`.
async fn service_pid(up: &Up, name: &str, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = descendant_groups(up.child.id());
        let found = cohort_integration_tests::in_groups(&groups)
            .into_iter()
            .find(|(pid, comm)| comm == name && Some(*pid) != not);
        if let Some((pid, _)) = found {
            return pid;
        }
        assert!(Instant::now() < deadline, "no new {name} within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (60 s at most) until `file` holds a line containing every one of `parts`.
async fn wait_line(file: &Path, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?} within 60 s: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohort_up_reports_every_restart_of_a_service_and_every_failed_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, config) = (dir.path().join("data"), dir.path().join("config"));
    let stderr_path = dir.path().join("up.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let up = Up::start_with(&data, &config, Stdio::from(stderr));
    let mut pid = service_pid(&up, "job-scheduler", None).await;
    for n in 1..=3 {
        cohort_runtime::process::signal_pid(pid, Signal::SIGKILL);
        wait_line(
            &stderr_path,
            &[
                "job-scheduler",
                "SIGKILL",
                &format!("restart {n})"),
                "restarted it",
            ],
        )
        .await;
        pid = service_pid(&up, "job-scheduler", Some(pid)).await;
    }
    // A restart that fails is told, with its cause, and tried again until one works.
    let key = data.join("pki/job-scheduler.key");
    let aside = data.join("pki/job-scheduler.key.aside");
    std::fs::rename(&key, &aside).expect("move the key aside");
    cohort_runtime::process::signal_pid(pid, Signal::SIGKILL);
    let failed = wait_line(
        &stderr_path,
        &["job-scheduler (signal: 9 (SIGKILL)): restart 4 failed: "],
    )
    .await;
    assert!(failed.contains("while starting"), "{failed}");
    wait_line(
        &stderr_path,
        &["job-scheduler (did not start): restart 5 failed: "],
    )
    .await;
    std::fs::rename(&aside, &key).expect("put the key back");
    // The next restart works; every one before it was reported as it failed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (text, worked) = loop {
        let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let worked = text.lines().find_map(|l| {
            let rest = l.strip_suffix(") exited; restarted it")?;
            let n: u32 = rest.rsplit_once("restart ")?.1.parse().ok()?;
            (l.contains("job-scheduler") && n > 4).then_some(n)
        });
        if let Some(n) = worked {
            break (text, n);
        }
        assert!(Instant::now() < deadline, "no restart worked: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for n in 4..worked {
        assert!(
            text.contains(&format!("restart {n} failed: ")),
            "restart {n} failed silently: {text}"
        );
    }
    // It serves again: the API answers through the proxy.
    let deadline = Instant::now() + Duration::from_secs(60);
    while up
        .api()
        .jobs()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "job-scheduler did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
