//! `training.runtime: command` (issue 17): parties train and evaluate with their own
//! program under the COHORT_* contract. The numpy logistic regression of
//! `python/examples/numpy_logreg.py` trains digits on 3 parties to at least 0.85 held-out
//! accuracy, while a fourth party whose `--allowed-commands` is empty refuses every offer,
//! its reason in the job's log, and the rounds go on without it. A command that crashes,
//! one that writes NaN and one that runs past its deadline each fail their tasks with that
//! reason, and leave no process behind (each writes its pids; /proc is looked at).
//!
//! Needs a Python with numpy, safetensors and `python/cohort_client` installed, named by
//! `COHORT_TEST_PYTHON` (scripts/test-services.sh makes one); skipped without it (failed
//! under CI).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_integration_tests::{Federation, files_under, state_of};
use cohort_proto::v1 as pb;

/// The test's Python (with numpy, safetensors, cohort_client), or None (skipped).
fn python() -> Option<String> {
    cohort_testkit::require_env(
        "COHORT_TEST_PYTHON",
        "a Python with numpy, safetensors and python/cohort_client, made by \
         scripts/test-services.sh",
    )
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn numpy_example() -> String {
    repo_root()
        .join("python/examples/numpy_logreg.py")
        .display()
        .to_string()
}

/// A digits logistic regression job run by `command`.
fn command_job(name: &str, command: &[String], rounds: u32, clients: &str) -> String {
    let words: Vec<String> = command.iter().map(|w| format!("{w:?}")).collect();
    format!(
        "name: {name}\n\
         model: {{arch: logreg}}\n\
         data: {{dataset: digits}}\n\
         training: {{runtime: command, command: [{}], epochs: 3, batch_size: 16, \
         optimizer: {{name: sgd, lr: 0.5}}}}\n\
         rounds: {rounds}\n\
         seed: 5\n\
         clients: {clients}\n",
        words.join(", ")
    )
}

fn allow(commands: &[&[String]]) -> (String, String) {
    let list: Vec<&[String]> = commands.to_vec();
    (
        "COHORT_ALLOWED_COMMANDS".to_string(),
        serde_json::to_string(&list).expect("JSON"),
    )
}

/// Polls the job's log until an entry satisfies `pred`; panics with the log after `timeout`.
async fn wait_event(
    fed: &Federation,
    id: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&pb::JobEvent) -> bool,
) -> pb::JobEvent {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let events = fed.events(id).await.unwrap_or_default();
        if let Some(e) = events.iter().find(|e| pred(e)) {
            return e.clone();
        }
        if tokio::time::Instant::now() >= deadline {
            let log: Vec<String> = events
                .iter()
                .map(|e| format!("{} {} {}", e.kind, e.party, e.reason))
                .collect();
            panic!("timed out waiting for {what}; the job's log: {log:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numpy_logistic_regression_trains_digits_and_a_party_that_runs_no_command_refuses() {
    let Some(python) = python() else { return };
    let command = vec![python.clone(), numpy_example()];
    let fed = Federation::digits_with_env(
        4,
        Vec::new(),
        vec![allow(&[&command])],
        vec![(
            "party-4".to_string(),
            vec![("COHORT_ALLOWED_COMMANDS".to_string(), "[]".to_string())],
        )],
    )
    .await
    .expect("federation");
    // All four are offered every round; three suffice.
    let spec = command_job(
        "numpy-logreg",
        &command,
        10,
        "{per_round: 4, min: 3, round_timeout: 60s}",
    );
    let (job, accuracy) = fed.run_to_success("numpy logreg", &spec).await;
    let events = fed.events(&job.id).await.expect("events");
    let refusals: Vec<&pb::JobEvent> = events
        .iter()
        .filter(|e| {
            e.party == "party-4" && e.reason.contains("did not take the train offer: refused:")
        })
        .collect();
    eprintln!(
        "numpy logreg by command, 3 of 4 parties, {} rounds: held-out accuracy {accuracy:.3}; \
         party-4's refusal: {:?}",
        job.rounds_completed,
        refusals.first().map(|e| &e.reason)
    );
    assert!(
        accuracy >= 0.85,
        "held-out accuracy {accuracy:.3} is below 0.85"
    );
    assert!(
        !refusals.is_empty()
            && refusals
                .iter()
                .all(|e| e.reason.contains("runs no training command")),
        "party-4's refusal, with its reason, is in the job's log: {events:#?}"
    );
    assert!(
        job.rounds.iter().all(|r| r.updates == 3),
        "every round goes on with the 3 parties that run it: {:?}",
        job.rounds
    );
    let evaluated = job
        .rounds
        .iter()
        .filter(|r| r.evaluation.as_ref().is_some_and(|m| m.samples > 0))
        .count();
    assert!(evaluated > 0, "the command evaluates too: {:?}", job.rounds);
    assert!(
        events.iter().all(|e| e.kind != "task_failed"),
        "no task failed: {events:#?}"
    );
    // The command's own output is in its party's executor log.
    let logs = files_under(&fed.dir.path().join("parties/party-1"));
    let said = logs
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|text| text.contains("command: train: ") && text.contains("stream=\"stdout\""));
    assert!(
        said,
        "party-1's executor log has the command's stdout: {logs:?}"
    );
}

/// A script for a failing command: `body` runs after the pid (and, with a child, the
/// child's) is written to `<dir>/<name>.pids`.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(format!("{name}.py"));
    let pids = dir.join(format!("{name}.pids"));
    let text = format!(
        "import os, sys, subprocess\n\
         child = subprocess.Popen(['sleep', '600'])\n\
         with open({pids:?} + '.' + str(os.getpid()), 'w') as f:\n\
         \x20   f.write(f'{{os.getpid()}} {{child.pid}}')\n\
         {body}\n",
        pids = pids.display().to_string(),
    );
    std::fs::write(&path, text).expect("write the script");
    path.display().to_string()
}

/// The pids every run of the `name` script wrote.
fn pids_of(dir: &Path, name: &str) -> Vec<String> {
    let prefix = format!("{name}.pids.");
    files_under(dir)
        .into_iter()
        .filter(|f| {
            Path::new(f)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// Waits (at most 15 s) until none of `pids` runs; zombies count as gone.
async fn assert_gone(pids: &[String], what: &str) {
    assert!(!pids.is_empty(), "{what}: the command wrote no pids");
    let running = || -> Vec<String> {
        pids.iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    // Field 3, after the parenthesised name: Z is a zombie.
                    .and_then(|s| {
                        s.rsplit(')')
                            .next()
                            .map(|r| !r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(false)
            })
            .cloned()
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !running().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        running().is_empty(),
        "{what}: processes {:?} still run",
        running()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_nan_and_overrunning_commands_fail_their_tasks_and_leave_no_process() {
    let Some(python) = python() else { return };
    let scripts = tempfile::tempdir().expect("tempdir");
    let dir = scripts.path();
    let crash = vec![
        python.clone(),
        script(
            dir,
            "crash",
            "print('loading the data', flush=True)\n\
             sys.stderr.write('Traceback: ValueError: the data is bad\\n')\n\
             sys.exit(3)",
        ),
    ];
    let nan = vec![
        python.clone(),
        script(
            dir,
            "nan",
            "import numpy as np\n\
             from cohort_client import Task\n\
             from safetensors.numpy import save_file\n\
             task = Task.from_env()\n\
             model = task.load_model()\n\
             model['fc0.weight'][0, 0] = np.nan\n\
             save_file(model, task.output_model)\n\
             task.write_metrics(samples=10, loss=1.0, accuracy=0.5)",
        ),
    ];
    let overrun = vec![
        python.clone(),
        script(dir, "overrun", "import time\ntime.sleep(600)"),
    ];
    let fed = Federation::digits_with_env(
        2,
        Vec::new(),
        vec![allow(&[&crash, &nan, &overrun])],
        Vec::new(),
    )
    .await
    .expect("federation");
    let cases: [(&str, &Vec<String>, &str, &str); 3] = [
        ("crash", &crash, "60s", "exited with status 3"),
        ("nan", &nan, "60s", "holds NaN"),
        ("overrun", &overrun, "8s", "ran past the task's deadline"),
    ];
    for (name, command, timeout, reason) in cases {
        let spec = command_job(
            name,
            command,
            1,
            &format!("{{per_round: 2, min: 2, round_timeout: {timeout}}}"),
        );
        let job = fed.create_job(&spec).await.expect("create");
        let failed = wait_event(&fed, &job.id, Duration::from_secs(90), name, |e| {
            e.kind == "task_failed" && e.reason.contains(reason)
        })
        .await;
        eprintln!("{name}: task failed: {}", failed.reason);
        if name == "crash" {
            assert!(
                failed.reason.contains("the data is bad"),
                "the reason carries the command's last words: {}",
                failed.reason
            );
        }
        assert_gone(&pids_of(dir, name), name).await;
        let done = fed
            .wait_end(&job.id, Duration::from_secs(90))
            .await
            .expect("the job ends");
        eprintln!("{name}: job {} ({})", state_of(&done), done.reason);
        assert_ne!(
            state_of(&done),
            cohort_core::JobState::Succeeded,
            "{name}: no round can succeed"
        );
    }
}

/// `python` with `args`, the repository's cohort_client first on its path; its output on
/// failure.
fn run_python(python: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(python)
        .args(args)
        .env("PYTHONPATH", repo_root().join("python/cohort_client"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{python} {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn the_python_package_keeps_the_contract() {
    let Some(python) = python() else { return };
    let tests = repo_root().join("python/cohort_client/tests");
    run_python(
        &python,
        &[
            "-m",
            "unittest",
            "discover",
            "-s",
            &tests.display().to_string(),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_torch_example_compiles_and_trains_where_torch_is_installed() {
    let Some(python) = python() else { return };
    let torch_example = repo_root().join("python/examples/torch_mlp.py");
    let source = std::fs::read_to_string(&torch_example).expect("the torch example");
    // Compiled without writing bytecode into the repository.
    let check = format!(
        "compile(open({:?}).read(), 'torch_mlp.py', 'exec')",
        torch_example.display().to_string()
    );
    run_python(&python, &["-c", &check]).unwrap_or_else(|e| panic!("{e}"));
    assert!(source.contains("Task.from_env()"));
    if run_python(&python, &["-c", "import torch"]).is_err() {
        eprintln!("torch is not installed for {python}: the PyTorch example is compiled only");
        return;
    }
    let command = vec![python.clone(), torch_example.display().to_string()];
    let fed = Federation::digits_with_env(3, Vec::new(), vec![allow(&[&command])], Vec::new())
        .await
        .expect("federation");
    let words: Vec<String> = command.iter().map(|w| format!("{w:?}")).collect();
    let spec = format!(
        "name: torch-mlp\n\
         model: {{arch: mlp, hidden: [32]}}\n\
         data: {{dataset: digits}}\n\
         training: {{runtime: command, command: [{}], epochs: 2, batch_size: 32, \
         optimizer: {{name: adam, lr: 0.01}}}}\n\
         rounds: 10\n\
         seed: 5\n\
         clients: {{per_round: 3, min: 3, round_timeout: 120s}}\n",
        words.join(", ")
    );
    let (_, accuracy) = fed.run_to_success("torch mlp", &spec).await;
    eprintln!("torch mlp by command, 3 parties, 10 rounds: held-out accuracy {accuracy:.3}");
    assert!(accuracy >= 0.85, "held-out accuracy {accuracy:.3}");
}
