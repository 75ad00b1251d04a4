//! Executors kept for a job's tasks (task-manager's default, `--executor-idle-secs 30`): on
//! each party one executor process runs the job's successive tasks, handed to it over a
//! pipe (no task file ever written); one that dies while idle is replaced; none outlives
//! its task-manager, whether that stops or is killed.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::{Federation, files_under, processes, state_of};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn spec(name: &str) -> String {
    format!(
        "name: {name}\n\
         model: {{arch: mlp, hidden: [16]}}\n\
         data: {{dataset: digits}}\n\
         training: {{epochs: 1, batch_size: 32, optimizer: {{name: sgd, lr: 0.1}}}}\n\
         rounds: 3\n\
         clients: {{per_round: 2, min: 2, round_timeout: 60s}}\n"
    )
}

/// The executor processes of `managers` (task-manager pids) now: (pid, task-manager pid).
/// Other tests' federations run beside this one: their executors are not counted.
fn executors(managers: &BTreeSet<u32>) -> BTreeSet<(u32, u32)> {
    processes()
        .into_iter()
        .filter(|(_, ppid, _, comm)| comm == "executor" && managers.contains(ppid))
        .map(|(pid, ppid, _, _)| (pid, ppid))
        .collect()
}

/// Whether `pid` still runs (a zombie does not).
fn runs(pid: u32) -> bool {
    processes().iter().any(|(p, _, _, _)| *p == pid)
}

fn task_files(parties: &Path) -> Vec<String> {
    files_under(parties)
        .into_iter()
        .filter(|f| f.ends_with("/task.pb"))
        .collect()
}

async fn run_job(
    fed: &Federation,
    managers: &BTreeSet<u32>,
    name: &str,
    seen: &mut BTreeSet<(u32, u32)>,
) {
    let parties = fed.dir.path().join("parties");
    let job = fed.create_job(&spec(name)).await.expect("create");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut polled = tokio::time::Instant::now();
    let done = loop {
        seen.extend(executors(managers));
        assert!(
            task_files(&parties).is_empty(),
            "a task reached an executor through a file: {:?}",
            task_files(&parties)
        );
        if polled.elapsed() >= Duration::from_millis(300) {
            polled = tokio::time::Instant::now();
            let job = fed.get_job(&job.id).await.expect("get");
            if state_of(&job).is_terminal() {
                break job;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} did not end in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        state_of(&done),
        JobState::Succeeded,
        "{name}: {}",
        done.reason
    );
    assert_eq!(done.rounds_completed, 3, "{name}");
}

/// Waits until none of `pids` runs.
async fn until_gone(pids: &BTreeSet<u32>, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|pid| runs(*pid)).collect();
        if alive.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: executors {alive:?} still run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_s_tasks_on_a_party_share_one_executor_that_goes_with_its_task_manager() {
    let fed = Federation::start(2).await.expect("federation");
    let managers: BTreeSet<u32> = fed
        .stack
        .pids()
        .into_iter()
        .filter(|(name, _)| name.starts_with("task-manager-"))
        .map(|(_, pid)| pid)
        .collect();
    assert_eq!(managers.len(), 2);

    // Three rounds of training and evaluation: 12 tasks, 6 per party.
    let mut seen = BTreeSet::new();
    run_job(&fed, &managers, "kept", &mut seen).await;
    for manager in &managers {
        let started = seen.iter().filter(|(_, ppid)| ppid == manager).count();
        assert!(
            (1..=2).contains(&started),
            "task-manager {manager} ran its 6 tasks on {started} executor(s), not one each: \
             {seen:?}"
        );
    }
    for party in ["party-1", "party-2"] {
        let logs = files_under(
            &fed.dir
                .path()
                .join(format!("parties/{party}/workspace/executors")),
        );
        assert!(
            !logs.is_empty() && logs.len() <= 2,
            "{party}: one log per executor: {logs:?}"
        );
        let text: String = logs
            .iter()
            .map(|l| std::fs::read_to_string(l).expect("log"))
            .collect();
        assert!(text.contains("model fetched"), "{party}: {text}");
    }

    // The executors wait for the job's next task. One killed while idle is replaced: the
    // next job runs as well.
    let idle = executors(&managers);
    assert!(!idle.is_empty(), "the executors were kept after their job");
    for (pid, _) in &idle {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    let mut seen_again = BTreeSet::new();
    run_job(&fed, &managers, "replaced", &mut seen_again).await;
    assert!(
        seen_again.iter().all(|e| !idle.contains(e)),
        "the killed executors ran nothing: {seen_again:?}"
    );

    // A task-manager that stops takes its executors along; one that is killed leaves
    // executors that see their stdin close and exit.
    let now = executors(&managers);
    let of = |manager: u32| -> BTreeSet<u32> {
        now.iter()
            .filter(|(_, ppid)| *ppid == manager)
            .map(|(pid, _)| *pid)
            .collect()
    };
    let first = fed
        .stack
        .signal("task-manager-party-1", Signal::SIGTERM)
        .expect("stop");
    let second = fed
        .stack
        .signal("task-manager-party-2", Signal::SIGKILL)
        .expect("kill");
    let (of_first, of_second) = (of(first), of(second));
    assert!(
        !of_first.is_empty() && !of_second.is_empty(),
        "both parties kept an executor: {now:?}"
    );
    until_gone(&of_first, "after its task-manager stopped").await;
    until_gone(&of_second, "after its task-manager was killed").await;
}
