//! What a running federation exposes, read from `/proc` and the disk while real processes
//! work: parties only dial out (a task-manager's one listener is its loopback health port,
//! an executor listens on nothing), and no secret (API tokens, TLS private keys, the task
//! tokens parties are given) reaches a log file, a process's command line or its
//! environment.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cohort_cli::Api;
use cohort_cli::profile::Profile;
use cohort_integration_tests::{
    Federation, TCP_ESTABLISHED, cohort_bin, descendants, digits_job, files_under,
    listening_addresses, log_files_under, socket_inodes, state_of, tcp_sockets,
};
use cohort_proto::v1 as pb;
use tokio::io::AsyncReadExt;

/// Kills the process groups a test saw under it when it ends, failed or not: `cohort demo`
/// runs its federation in a group of its own, which killing the demo does not reach.
struct KillGroupsOnDrop(BTreeSet<i32>);

impl Drop for KillGroupsOnDrop {
    fn drop(&mut self) {
        for group in &self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(*group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `/proc/<pid>/<file>` (cmdline, environ) with its NUL separators as spaces; None once the
/// process is gone.
fn proc_text(pid: u32, file: &str) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/{file}")).ok()?;
    Some(String::from_utf8_lossy(&bytes).replace('\0', " "))
}

/// The value after `flag` in a process's command line.
fn flag_value(pid: u32, flag: &str) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = bytes
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).cloned()
}

/// Whether `pid` holds a connection it opened to `peer`.
fn connected_to(pid: u32, peer: SocketAddr) -> bool {
    let Some(mine) = socket_inodes(pid) else {
        return false;
    };
    tcp_sockets(pid)
        .iter()
        .any(|s| s.state == TCP_ESTABLISHED && s.remote == peer && mine.contains(&s.inode))
}

fn read_addr(path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What the listener sampling saw of one kind of party process.
#[derive(Default, Debug)]
struct Sampled {
    /// Processes sampled (a task-manager by its party: a child it forked shows as one of it
    /// until it runs the executor), and how often.
    samples: BTreeMap<String, usize>,
    /// Processes seen holding a connection to the proxy: their sockets were really read.
    dialled_proxy: BTreeSet<String>,
    /// Listeners that should not be there, one line each: the process, what it listened
    /// on, what it may.
    violations: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parties_listen_only_on_their_loopback_health_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut demo = tokio::process::Command::new(cohort_bin())
        .args(["demo", "--clients", "2", "--rounds", "3", "--json"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start cohort demo");
    let demo_pid = demo.id().expect("pid");
    let mut stdout = demo.stdout.take().expect("stdout");
    let mut stderr = demo.stderr.take().expect("stderr");
    let output = tokio::spawn(async move {
        let (mut out, mut err) = (String::new(), String::new());
        let _ = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        (out, err)
    });
    let mut groups = KillGroupsOnDrop(BTreeSet::new());
    let own_group = nix::unistd::getpgrp().as_raw();

    let run = dir.path().join("run");
    let mut health: BTreeMap<String, SocketAddr> = BTreeMap::new();
    let mut task_managers = Sampled::default();
    let mut executors = Sampled::default();
    let mut health_checked: BTreeSet<String> = BTreeSet::new();
    // Executors live for well under a second on this data: sample often.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Ok(Some(status)) = demo.try_wait() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the demo did not finish in 240 s; sampled task-managers {task_managers:?}, \
             executors {executors:?}"
        );
        let proxy = read_addr(&run.join("proxy.addr"));
        for (pid, group, comm) in descendants(demo_pid) {
            if group != own_group {
                groups.0.insert(group);
            }
            let (sampled, key, allowed) = match comm.as_str() {
                "task-manager" => {
                    // Its health address, from the ready file `cohort demo` had it write.
                    let Some(party) = flag_value(pid, "--party") else {
                        continue;
                    };
                    if !health.contains_key(&party) {
                        let file = run.join(format!("task-manager-{party}.addr"));
                        match read_addr(&file) {
                            Some(addr) => health.insert(party.clone(), addr),
                            // Still starting: nothing to compare with yet.
                            None => continue,
                        };
                    }
                    let allowed = vec![health[&party]];
                    (&mut task_managers, party, allowed)
                }
                "executor" => (&mut executors, pid.to_string(), Vec::new()),
                _ => continue,
            };
            let Some(mut listening) = listening_addresses(pid) else {
                continue;
            };
            if proxy.is_some_and(|p| connected_to(pid, p)) {
                sampled.dialled_proxy.insert(key.clone());
            }
            *sampled.samples.entry(key).or_default() += 1;
            listening.sort();
            // Listening on nothing is no exposure: a task-manager closes its health port when
            // it is stopped, and the demo (about a second now) stops them while we sample.
            if !listening.is_empty() && listening != allowed {
                sampled.violations.push(format!(
                    "{comm} {pid} listens on {listening:?}; allowed: {allowed:?}"
                ));
            }
        }
        // The one listener allowed is health, and answers as such.
        for (party, addr) in &health {
            if health_checked.insert(party.clone()) {
                assert_serves_health(*addr).await;
            }
        }
        // Failing here stops the demo (dropped) and its federation (`groups`).
        assert!(
            task_managers.violations.is_empty() && executors.violations.is_empty(),
            "parties listen where they should not:\n{}",
            [&task_managers.violations[..], &executors.violations[..]]
                .concat()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (out, err) = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the demo's output closes")
        .expect("output reader");
    assert!(status.success(), "demo failed: {status}\n{out}\n{err}");
    let last: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("output")).expect("last line is JSON");
    assert_eq!(last["state"], "SUCCEEDED", "{last}");

    // The health port is loopback only.
    assert_eq!(
        health.len(),
        2,
        "both parties' health addresses: {health:?}"
    );
    for (party, addr) in &health {
        assert!(
            addr.ip().is_loopback(),
            "{party}'s health port is bound to {addr}, not loopback"
        );
    }
    // The samples are real: both task-managers and some executors were read, each seen
    // with a connection it dialled to the proxy.
    assert_eq!(
        task_managers.samples.len(),
        2,
        "task-managers sampled: {task_managers:?}"
    );
    assert_eq!(
        task_managers.dialled_proxy.len(),
        2,
        "task-managers seen connected to the proxy: {task_managers:?}"
    );
    assert!(
        !executors.samples.is_empty() && !executors.dialled_proxy.is_empty(),
        "no executor was sampled while connected to the proxy: {executors:?}"
    );
    eprintln!(
        "sampled {} task-manager and {} executor processes ({} of them connected to the proxy)",
        task_managers.samples.len(),
        executors.samples.len(),
        executors.dialled_proxy.len()
    );
}

/// grpc.health.v1 answers SERVING in plaintext at `addr`.
async fn assert_serves_health(addr: SocketAddr) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("health port {addr}: {e}"));
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_or_else(|e| panic!("health check at {addr}: {e}"))
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "health at {addr}"
    );
}

/// What a task file says of its task.
struct TaskFile {
    task_id: String,
    round: u64,
    party: String,
    token: String,
}

/// Reads a task file (an `ExecutorTask`); None while it is half-written.
fn read_task_file(bytes: &[u8]) -> Option<TaskFile> {
    use prost::Message;
    let task = cohort_proto::v1::ExecutorTask::decode(bytes).ok()?.task?;
    Some(TaskFile {
        task_id: task.task_id,
        round: u64::from(task.round),
        party: task.party,
        token: task.task_token,
    })
}

/// Task files (`<workspace>/tasks/<task>/task.pb`) present now under the parties' dirs.
fn task_files(parties: &Path) -> Vec<PathBuf> {
    files_under(parties)
        .into_iter()
        .filter(|f| f.ends_with("/task.pb"))
        .map(PathBuf::from)
        .collect()
}

/// The strings a leak would show of a PEM private key: every base64 line of its body (a key
/// written with escaped newlines still shows them) and the body joined.
fn pem_needles(pem: &str) -> Vec<String> {
    let lines: Vec<&str> = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    let mut needles: Vec<String> = lines
        .iter()
        .filter(|l| l.len() >= 24)
        .map(|l| l.to_string())
        .collect();
    needles.push(lines.concat());
    needles
}

fn api_with_token(fed: &Federation, token: &str) -> Api {
    Api::from_profile(&Profile {
        token: Some(token.to_string()),
        ..fed.stack.profile()
    })
    .expect("an API with the token")
}

async fn create_token(fed: &Federation, name: &str, role: pb::Role) -> pb::CreateTokenResponse {
    fed.api()
        .tokens()
        .create_token(pb::CreateTokenRequest {
            name: name.into(),
            namespace: "default".into(),
            role: role as i32,
        })
        .await
        .expect("the admin creates a token")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_a_command_line_or_an_environment() {
    // One executor process per task, each given a task file: the test reads the task
    // tokens from those files, to look for them everywhere else. Executors kept for a
    // job's tasks (the default) get the same tasks over a pipe and run the same code;
    // warm_executors.rs checks that no task file is written then.
    let fed = Federation::with_executor_per_task(2)
        .await
        .expect("federation");
    let data = fed.dir.path().to_path_buf();
    let parties = data.join("parties");

    // API tokens, each used: the job is created with a member's, read with a viewer's,
    // and a third is deleted.
    let member = create_token(&fed, "exposure-member", pb::Role::Member).await;
    let viewer = create_token(&fed, "exposure-viewer", pb::Role::Viewer).await;
    let doomed = create_token(&fed, "exposure-deleted", pb::Role::Admin).await;
    fed.api()
        .tokens()
        .delete_token(pb::DeleteTokenRequest {
            id: doomed.info.clone().expect("token info").id,
        })
        .await
        .expect("the admin deletes a token");
    let rounds = 3;
    let job = api_with_token(&fed, &member.token)
        .jobs()
        .create_job(pb::CreateJobRequest {
            spec: digits_job("exposure", rounds, 2, 2, "60s"),
        })
        .await
        .expect("a member creates a job")
        .into_inner();
    let mut api_tokens = vec![
        (
            "the admin token",
            fed.stack.admin_token.expose().to_string(),
        ),
        ("a member token", member.token),
        ("a viewer token", viewer.token.clone()),
        ("a deleted token", doomed.token),
    ];

    // While the job runs: every process's command line and environment, and the task
    // files task-manager writes for its executors (the task tokens the parties were given).
    let me = std::process::id();
    let mut seen: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut cmdlines: BTreeSet<(String, String)> = BTreeSet::new();
    let mut environs: BTreeSet<(String, String)> = BTreeSet::new();
    // Task id -> (party, round, token).
    let mut task_tokens: BTreeMap<String, (String, u64, String)> = BTreeMap::new();
    let viewer_api = api_with_token(&fed, &viewer.token);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut last_poll = tokio::time::Instant::now();
    let ended = loop {
        for (pid, _, comm) in descendants(me) {
            if let (Some(cmdline), Some(environ)) =
                (proc_text(pid, "cmdline"), proc_text(pid, "environ"))
            {
                seen.entry(comm.clone()).or_default().insert(pid);
                // Named by process, never quoted: what is searched for is secret.
                let name = format!("{comm} {pid}");
                cmdlines.insert((name.clone(), cmdline));
                environs.insert((name, environ));
            }
        }
        for file in task_files(&parties) {
            if let Some(t) = std::fs::read(&file).ok().and_then(|b| read_task_file(&b)) {
                // The file is the task's: it sits in the directory named after it.
                let dir = file.parent().and_then(Path::file_name);
                assert_eq!(
                    dir.map(|d| d.to_string_lossy().into_owned()),
                    Some(
                        t.task_id
                            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
                    ),
                    "{} holds task {}",
                    file.display(),
                    t.task_id
                );
                task_tokens.insert(t.task_id, (t.party, t.round, t.token));
            }
        }
        if last_poll.elapsed() >= Duration::from_millis(500) {
            last_poll = tokio::time::Instant::now();
            let job = viewer_api
                .jobs()
                .get_job(pb::GetJobRequest { id: job.id.clone() })
                .await
                .map(|r| r.into_inner());
            if let Ok(job) = job
                && state_of(&job).is_terminal()
            {
                break job;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job did not end in 180 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        state_of(&ended).to_string(),
        "SUCCEEDED",
        "the job: {}",
        ended.reason
    );

    // The right things were read. Every task left its directory (with its executor's log);
    // task tokens were captured for every round and party, each the coordinator's 32 random
    // bytes in hex, under the directory named after its task.
    let task_dirs: BTreeSet<PathBuf> = files_under(&parties)
        .into_iter()
        .filter(|f| f.ends_with("/executor.log"))
        .filter_map(|f| Path::new(&f).parent().map(Path::to_path_buf))
        .collect();
    assert!(
        task_dirs.len() >= 2 * 2 * rounds as usize,
        "a train and an evaluate task per party and round: {task_dirs:?}"
    );
    for (task, (_, _, token)) in &task_tokens {
        assert!(
            token.len() == 64 && token.chars().all(|c| c.is_ascii_hexdigit()),
            "task {task}'s token is no task token: {} characters",
            token.len()
        );
    }
    let captured: BTreeSet<(String, u64)> = task_tokens
        .values()
        .map(|(party, round, _)| (party.clone(), *round))
        .collect();
    let expected: BTreeSet<(String, u64)> = ["party-1", "party-2"]
        .into_iter()
        .flat_map(|p| (1..=u64::from(rounds)).map(move |r| (p.to_string(), r)))
        .collect();
    assert_eq!(
        captured,
        expected,
        "task tokens captured for every party and round ({} of {} tasks)",
        task_tokens.len(),
        task_dirs.len()
    );
    for service in [
        "job-scheduler",
        "model-manager",
        "client-selector",
        "proxy",
        "task-manager",
        "coordinator",
        "executor",
    ] {
        assert!(
            seen.contains_key(service),
            "no {service} process was read; read: {seen:?}"
        );
    }
    assert!(
        cmdlines
            .iter()
            .any(|(name, c)| name.starts_with("executor ") && c.contains("--task-file")),
        "no executor's command line was read"
    );

    // Task files go when their task ends: no token stays on the party's disk.
    let files_deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !task_files(&parties).is_empty() {
        assert!(
            tokio::time::Instant::now() < files_deadline,
            "task files left after the job: {:?}",
            task_files(&parties)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The secrets.
    let mut secrets: Vec<(String, String)> = api_tokens
        .drain(..)
        .map(|(what, token)| (what.to_string(), token))
        .collect();
    secrets.extend(
        task_tokens
            .iter()
            .map(|(task, (_, _, token))| (format!("task {task}'s token"), token.clone())),
    );
    let keys: Vec<String> = files_under(&data.join("pki"))
        .into_iter()
        .filter(|f| f.ends_with(".key"))
        .collect();
    assert!(
        keys.len() >= 1 + 5 + 2,
        "the CA's, the five services' and the two parties' keys: {keys:?}"
    );
    for key in &keys {
        let pem = std::fs::read_to_string(key).expect("key file");
        assert!(pem.contains("PRIVATE KEY-----"), "{key} is no PEM key");
        for needle in pem_needles(&pem) {
            secrets.push((format!("(a part of) the private key {key}"), needle));
        }
    }

    // Every log: the services', the task-managers', the coordinator's and every executor's.
    let logs = log_files_under(&data);
    let coordinator_log = format!("coordinator-{}.log", job.id);
    let non_empty = |suffix: &str| {
        logs.iter()
            .filter(|l| l.ends_with(suffix))
            .filter(|l| std::fs::metadata(l).is_ok_and(|m| m.len() > 0))
            .count()
    };
    for log in [
        "logs/job-scheduler.log",
        "logs/model-manager.log",
        "logs/client-selector.log",
        "logs/proxy.log",
        "logs/task-manager-party-1.log",
        "logs/task-manager-party-2.log",
        coordinator_log.as_str(),
    ] {
        assert_eq!(non_empty(log), 1, "{log} among the logs read: {logs:?}");
    }
    assert_eq!(
        non_empty("/executor.log"),
        task_dirs.len(),
        "every task's executor log has lines"
    );
    let mut texts: Vec<(String, String)> = logs
        .iter()
        .map(|l| {
            let bytes = std::fs::read(l).expect("log");
            (
                format!("the log {l}"),
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        })
        .collect();
    texts.extend(
        cmdlines
            .into_iter()
            .map(|(name, c)| (format!("the command line of {name}"), c)),
    );
    // Secrets reach processes as files (keys, task files) or hashes (the admin token's):
    // none is in an environment either.
    texts.extend(
        environs
            .into_iter()
            .map(|(name, e)| (format!("the environment of {name}"), e)),
    );
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        for (place, text) in &texts {
            if text.contains(secret.as_str()) {
                // Say where, never the secret itself.
                leaks.push(format!("{what} is in {place}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    eprintln!(
        "checked {} secrets ({} task tokens of {} tasks) against {} logs, {} command lines \
         and environments",
        secrets.len(),
        task_tokens.len(),
        task_dirs.len(),
        logs.len(),
        texts.len() - logs.len()
    );
}
