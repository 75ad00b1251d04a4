//! The CLI against a running `cohort up`: a job from YAML (a file or stdin), the model
//! registry, the job's log, stopping and deleting jobs, spec validation; and without one:
//! the error contract (`--json` errors on stderr), an unreachable federation, a broken
//! profile, completions and help.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cohort_integration_tests::{cohort, cohort_bin, descendant_groups, in_groups};
use cohort_proto::v1 as pb;
use serde_json::Value;
use sha2::Digest;

/// `cohort up` as a child process; SIGTERM and group kill on drop.
struct Up {
    child: std::process::Child,
    profile: PathBuf,
    _dir: tempfile::TempDir,
}

impl Up {
    fn start(clients: u32) -> Up {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new(cohort_bin())
            .args([
                "up",
                "--json",
                "--listen",
                "127.0.0.1:0",
                "--clients",
                &clients.to_string(),
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            // Keep the user's default profile untouched.
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
            .recv_timeout(Duration::from_secs(60))
            .expect("cohort up reports it is up");
        let v: Value = serde_json::from_str(&line).expect("JSON line");
        assert_eq!(v["event"], "up", "{v}");
        let profile = PathBuf::from(v["profile"].as_str().expect("profile path"));
        assert!(profile.is_file());
        // Where to look and what to sign in with.
        let dashboard = v["dashboard"].as_str().expect("the dashboard's URL");
        assert!(dashboard.starts_with("https://127.0.0.1:"), "{dashboard}");
        let token_file = v["admin_token_file"]
            .as_str()
            .expect("the admin token's file");
        assert!(Path::new(token_file).is_file(), "{token_file}");
        assert!(
            dir.path().join("config/cohort/profile.toml").is_file(),
            "up also writes the default profile"
        );
        Up {
            child,
            profile,
            _dir: dir,
        }
    }

    fn pgid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        cohort_runtime::process::signal_pid(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(Instant::now() < deadline, "cohort up did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // Also the federation's own process group(s), whatever state the test left.
        for g in descendant_groups(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(g),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pgid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// Runs `cohort --profile PROFILE ARGS` with `input` on its stdin: (exit code, stdout, stderr).
async fn cohort_with_stdin(args: &[&str], profile: &Path, input: &str) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(cohort_bin())
        .arg("--profile")
        .arg(profile)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start cohort");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(input.as_bytes())
        .await
        .expect("write stdin");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("cohort finished in time")
        .expect("cohort output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The one JSON error line a failed `--json` command leaves on stderr.
fn json_error(stderr: &str) -> Value {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {stderr}");
    let v: Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("stderr is not JSON ({e}): {stderr}"));
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"].clone()
}

async fn json_of(args: &[&str], profile: &Path) -> Value {
    let (code, out, err) = cohort(args, profile).await.expect("run cohort");
    assert_eq!(code, 0, "cohort {args:?} failed: {err}");
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("cohort {args:?} printed no JSON ({e}): {out}"))
}

async fn wait_for(profile: &Path, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let job = json_of(&["--json", "job", "get", id], profile).await;
        if pred(&job) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// Seeded: without a seed the initial model and the data order are random, and a rare start
// learns too little in four short rounds for the accuracy check.
const JOB: &str = "name: yaml-job
namespace: research
model:
  arch: mlp
  hidden: [32]
data:
  dataset: digits
training:
  epochs: 1
  batch_size: 16
  optimizer: {name: sgd, lr: 0.1}
rounds: 4
clients:
  per_round: 3
  min: 2
  round_timeout: 30s
seed: 3
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yaml_job_under_cohort_up_succeeds_and_its_models_download_verified() {
    let mut up = Up::start(3);
    let profile = up.profile.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("job.yaml");
    std::fs::write(&spec, JOB).expect("write spec");

    let created = json_of(
        &[
            "--json",
            "job",
            "create",
            "-f",
            spec.to_str().expect("path"),
        ],
        &profile,
    )
    .await;
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["state"], "QUEUED");
    assert_eq!(created["namespace"], "research");

    // Following the log from the start: it ends by itself when the job does.
    let follow = {
        let (profile, id) = (profile.clone(), id.clone());
        tokio::spawn(
            async move { cohort(&["--json", "job", "logs", "--follow", &id], &profile).await },
        )
    };
    let (code, out, err) = cohort(&["--json", "job", "watch", &id], &profile)
        .await
        .expect("watch");
    assert_eq!(code, 0, "watch exits 0 on SUCCEEDED: {err}");
    let last: Value =
        serde_json::from_str(out.lines().last().expect("watch output")).expect("JSON");
    assert_eq!(last["state"], "SUCCEEDED", "{last}");
    assert_eq!(last["rounds_completed"], 4);

    // One version per round, with its metrics and lineage.
    let versions = json_of(&["--json", "model", "list", "--job", &id], &profile).await;
    let versions = versions.as_array().expect("array");
    assert_eq!(versions.len(), 4, "{versions:?}");
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["round"], i as u64 + 1);
        assert_eq!(v["job_id"], id.as_str());
        let acc = v["metrics"]["accuracy"]
            .as_f64()
            .expect("accuracy recorded");
        assert!((0.0..=1.0).contains(&acc));
        assert!(v["metrics"]["samples"].as_u64().expect("samples") > 0);
    }
    let last_accuracy = versions[3]["metrics"]["accuracy"].as_f64().expect("acc");
    assert!(last_accuracy > 0.5, "{versions:?}");
    eprintln!("accuracy after round 4: {last_accuracy}");

    // Download verifies, and the file's sha256 is the listed digest. The model lives in the
    // job's namespace; the admin token's own ("*") reads "default" unless told.
    let name = versions[3]["name"].as_str().expect("name");
    let version = versions[3]["version"].as_u64().expect("version");
    let out_file = dir.path().join("model.safetensors");
    let got = json_of(
        &[
            "--json",
            "model",
            "download",
            &format!("{name}@{version}"),
            "-o",
            out_file.to_str().expect("path"),
            "--namespace",
            "research",
        ],
        &profile,
    )
    .await;
    let bytes = std::fs::read(&out_file).expect("downloaded file");
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    assert_eq!(digest, versions[3]["digest"].as_str().expect("digest"));
    assert_eq!(got["digest"].as_str(), Some(digest.as_str()));
    let tensors = cohort_fl_check(&bytes);
    assert!(tensors >= 4, "an mlp has weights and biases per layer");

    // `model get` reads the job's namespace when told.
    let (code, _, err) = cohort(&["--json", "model", "get", name], &profile)
        .await
        .expect("get");
    assert_eq!(code, 1, "not in the default namespace");
    assert_eq!(json_error(&err)["code"], "not_found");
    let got = json_of(
        &["--json", "model", "get", name, "--namespace", "research"],
        &profile,
    )
    .await;
    assert_eq!(got["version"], version, "the latest: {got}");

    // The job reports its last and best rounds.
    let job = json_of(&["--json", "job", "get", &id], &profile).await;
    assert_eq!(job["last_round"], 4, "{job}");
    assert!(
        (1..=4).contains(&job["best_round"].as_u64().unwrap_or(0)),
        "{job}"
    );
    let (code, text, err) = cohort(&["job", "get", &id], &profile).await.expect("get");
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("last round  4"), "{text}");

    // Events record every transition with a reason.
    let (code, out, _) = cohort(&["--json", "job", "logs", &id], &profile)
        .await
        .expect("logs");
    assert_eq!(code, 0);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON"))
        .collect();
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "state")
        .map(|e| e["to"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(states, ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]);
    let (code, followed, err) = follow.await.expect("join").expect("logs --follow");
    assert_eq!(code, 0, "{err}");
    // It printed each entry once, in order, up to (at least) the job's end.
    assert!(
        out.starts_with(&followed),
        "followed:\n{followed}\nlog:\n{out}"
    );
    assert!(
        followed.lines().any(|l| l.contains("\"to\":\"SUCCEEDED\"")),
        "{followed}"
    );
    let (code, table, _) = cohort(&["job", "logs", &id], &profile).await.expect("logs");
    assert_eq!(code, 0);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("TIME"), "{table}");
    assert_eq!(lines.len(), events.len() + 1, "{table}");
    assert!(
        lines.iter().any(|l| l.contains("RUNNING -> SUCCEEDED")),
        "{table}"
    );

    // Listing filters by namespace and state.
    let listed = json_of(
        &[
            "--json",
            "job",
            "list",
            "--namespace",
            "research",
            "--state",
            "succeeded",
        ],
        &profile,
    )
    .await;
    assert_eq!(listed.as_array().map(|a| a.len()), Some(1));
    let none = json_of(&["--json", "job", "list", "--namespace", "other"], &profile).await;
    assert_eq!(none.as_array().map(|a| a.len()), Some(0));

    // Every party took part: a task's status reaches client-selector after its update reached
    // the coordinator, so the counts may trail the job's end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let clients = json_of(&["--json", "client", "list"], &profile).await;
        let all_counted = clients.as_array().is_some_and(|c| {
            c.len() == 3
                && c.iter()
                    .all(|c| c["connected"] == true && c["tasks_succeeded"].as_u64() > Some(0))
        });
        if all_counted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "parties not all connected with a task succeeded: {clients}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Ending `up` stops every process it started.
    let mut groups = descendant_groups(up.child.id());
    assert!(!groups.is_empty());
    groups.push(up.pgid());
    let status = up.stop();
    assert!(status.success(), "{status}");
    // Its last step is a SIGKILL to its process group, which takes effect (and the orphans are
    // reaped) a moment after `up` exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = in_groups(&groups);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Parses a safetensors file and returns its tensor count.
fn cohort_fl_check(bytes: &[u8]) -> usize {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("header length")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header");
    header
        .as_object()
        .map(|o| o.keys().filter(|k| *k != "__metadata__").count())
        .unwrap_or(0)
}

/// From the job's STOPPING entry to its STOPPED one, by the server's timestamps.
async fn stop_took(profile: &Path, id: &str) -> Duration {
    cohort_security::install_crypto_provider();
    let api = cohort_cli::Api::connect(Some(profile)).expect("profile");
    let events = tokio::time::timeout(
        Duration::from_secs(30),
        api.jobs().list_job_events(pb::ListJobEventsRequest {
            id: id.to_string(),
            after_seq: 0,
        }),
    )
    .await
    .expect("job log within 30 s")
    .expect("job log")
    .into_inner()
    .events;
    let at = |state: pb::JobState| {
        events
            .iter()
            .find(|e| e.kind.is_empty() && e.to == state as i32)
            .map(|e| e.time_ms)
            .unwrap_or_else(|| panic!("no {state:?} entry: {events:?}"))
    };
    let ms = at(pb::JobState::Stopped) - at(pb::JobState::Stopping);
    Duration::from_millis(u64::try_from(ms).expect("STOPPED after STOPPING"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_takes_a_running_job_to_stopped_within_seconds_and_delete_removes_it() {
    let up = Up::start(2);
    let profile = up.profile.clone();
    // The spec comes from stdin.
    let spec = JOB
        .replace("rounds: 4", "rounds: 500")
        .replace("per_round: 3", "per_round: 2")
        .replace("yaml-job", "long-job");
    let (code, out, err) =
        cohort_with_stdin(&["--json", "job", "create", "-f", "-"], &profile, &spec).await;
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(created["name"], "long-job", "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    wait_for(&profile, &id, "a completed round", |j| {
        j["rounds_completed"].as_u64() >= Some(1)
    })
    .await;

    // A running job cannot be deleted.
    let (code, _, err) = cohort(&["job", "delete", &id], &profile)
        .await
        .expect("delete");
    assert_ne!(code, 0);
    assert!(err.contains("stop it"), "{err}");

    let stopping = json_of(&["--json", "job", "stop", &id], &profile).await;
    assert_eq!(stopping["state"], "STOPPING", "{stopping}");
    let stopped = wait_for(&profile, &id, "STOPPED", |j| j["state"] == "STOPPED").await;
    assert!(stopped["rounds_completed"].as_u64() < Some(500));
    // The coordinator itself stopped, mid-round: had it ignored the request, job-scheduler
    // would have terminated it after its 10 s stop grace and said so in the reason.
    let reason = stopped["reason"].as_str().unwrap_or_default();
    assert!(!reason.contains("terminated"), "{stopped}");
    // Timed by job-scheduler's own log, not by CLI processes started on a loaded machine.
    let took = stop_took(&profile, &id).await;
    assert!(took < Duration::from_secs(10), "stop took {took:?}");

    let (code, _, err) = cohort(&["job", "delete", &id], &profile)
        .await
        .expect("delete");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cohort(&["job", "get", &id], &profile).await.expect("get");
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_refused_naming_the_field_and_nothing_is_stored() {
    let up = Up::start(0);
    let profile = up.profile.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    // (spec, field at fault, the line of its key)
    let cases = [
        (
            JOB.replace("  epochs: 1\n", "  epochs: 1\n  epoch: 2\n"),
            "training.epoch",
            10,
        ),
        (
            JOB.replace("lr: 0.1", "lr: -0.1"),
            "training.optimizer.lr",
            11,
        ),
        (JOB.replace("min: 2", "min: 5"), "clients.min", 15),
        (
            JOB.replace("arch: mlp", "arch: transformer"),
            "model.arch",
            4,
        ),
        (format!("{JOB}colour: blue\n"), "colour", 18),
    ];
    for (i, (spec, field, line)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&path, spec).expect("write");
        let (code, _, err) = cohort(
            &["job", "create", "-f", path.to_str().expect("path")],
            &profile,
        )
        .await
        .expect("create");
        assert_ne!(code, 0, "{field}: accepted");
        assert!(
            err.contains(&format!("{field}: ")),
            "error for {field} names it: {err}"
        );
        assert_eq!(err.matches(field).count(), 1, "{field} named once: {err}");
        assert!(err.contains(&format!("(line {line})")), "{err}");
        assert!(err.contains("InvalidArgument"), "{err}");

        // The same under --json: one JSON line on stderr, with the code and the field.
        let (code, out, err) =
            cohort_with_stdin(&["--json", "job", "create", "-f", "-"], &profile, spec).await;
        assert_eq!(code, 1, "{err}");
        assert_eq!(out, "", "nothing on stdout");
        let e = json_error(&err);
        assert_eq!(e["code"], "invalid_argument", "{e}");
        assert_eq!(e["field"], *field, "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("(line {line})")),
            "{e}"
        );
    }
    // Other answers of the server take the same shape, with their own code.
    let (code, _, err) = cohort(&["--json", "job", "get", "nosuchjob-abc"], &profile)
        .await
        .expect("get");
    assert_eq!(code, 1);
    let e = json_error(&err);
    assert!(
        matches!(e["code"].as_str(), Some("not_found" | "invalid_argument")),
        "{e}"
    );

    // The server's version comes through the profile's proxy.
    let (code, out, err) = cohort(&["--json", "version"], &profile)
        .await
        .expect("version");
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(v["cli"], env!("CARGO_PKG_VERSION"), "{v}");
    assert_eq!(v["server"], env!("CARGO_PKG_VERSION"), "{v}");
    let listed = json_of(&["--json", "job", "list"], &profile).await;
    assert_eq!(
        listed.as_array().map(|a| a.len()),
        Some(0),
        "nothing was stored"
    );
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("file").permissions().mode() & 0o777
}

fn identity_in(cert: &Path) -> cohort_security::Identity {
    let certs = cohort_security::load_certs(cert).expect("certificate");
    cohort_security::identity_of(&certs[0]).expect("identity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_tokens_and_revocation_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_str().expect("path");
    let none = dir.path().join("no-profile.toml");

    // A CA, offline; not replaced by accident.
    json_of(&["--json", "cert", "init", "--dir", pki_arg], &none).await;
    assert_eq!(mode_of(&pki.join("ca.key")), 0o600);
    let (code, _, err) = cohort(&["cert", "init", "--dir", pki_arg], &none)
        .await
        .expect("run");
    assert_ne!(code, 0);
    assert!(err.contains("--force"), "{err}");

    // Party and service certificates carry their names.
    let party = json_of(
        &[
            "--json",
            "cert",
            "issue",
            "--party",
            "acme",
            "--dir",
            pki_arg,
            "--validity",
            "30days",
        ],
        &none,
    )
    .await;
    let cert = PathBuf::from(party["cert"].as_str().expect("cert path"));
    assert_eq!(
        identity_in(&cert),
        cohort_security::Identity::Party("acme".into())
    );
    assert_eq!(mode_of(&pki.join("acme.key")), 0o600);
    json_of(
        &[
            "--json",
            "cert",
            "issue",
            "--service",
            "proxy",
            "--dns",
            "proxy.example.org",
            "--dns",
            "10.0.0.7",
            "--dir",
            pki_arg,
        ],
        &none,
    )
    .await;
    assert_eq!(
        identity_in(&pki.join("proxy.crt")),
        cohort_security::Identity::Service("proxy".into())
    );
    for (args, field) in [
        (
            vec!["cert", "issue", "--party", "Not A Name", "--dir", pki_arg],
            "party",
        ),
        (
            vec!["cert", "issue", "--service", "proxy", "--dir", pki_arg],
            "--dns",
        ),
        (
            vec!["cert", "issue", "--party", "x", "--dir", "/nonexistent"],
            "cert init",
        ),
    ] {
        let (code, _, err) = cohort(&args, &none).await.expect("run");
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(field), "{args:?}: {err}");
        assert!(!err.contains("PRIVATE KEY"), "{err}");
    }

    // Against a running federation: a viewer token, and a revoked party.
    let up = Up::start(2);
    let admin = up.profile.clone();
    let created = json_of(
        &[
            "--json",
            "token",
            "create",
            "--namespace",
            "research",
            "--role",
            "viewer",
            "--name",
            "auditor",
        ],
        &admin,
    )
    .await;
    let secret = created["token"].as_str().expect("token").to_string();
    let listed = json_of(&["--json", "token", "list"], &admin).await;
    assert!(
        listed
            .as_array()
            .expect("list")
            .iter()
            .any(|t| t["id"] == created["id"]),
        "{listed}"
    );
    assert!(
        !listed.to_string().contains(&secret),
        "a listed token shows its secret"
    );
    let mut profile: toml::Value =
        toml::from_str(&std::fs::read_to_string(&admin).expect("profile")).expect("toml");
    assert_eq!(mode_of(&admin), 0o600, "the profile holds a token");
    profile["token"] = toml::Value::String(secret);
    let viewer = dir.path().join("viewer.toml");
    std::fs::write(&viewer, toml::to_string(&profile).expect("toml")).expect("write");
    json_of(&["--json", "job", "list"], &viewer).await;
    let spec = dir.path().join("job.yaml");
    std::fs::write(&spec, JOB).expect("spec");
    let (code, _, err) = cohort(
        &["job", "create", "-f", spec.to_str().expect("path")],
        &viewer,
    )
    .await
    .expect("run");
    assert_ne!(code, 0);
    assert!(err.contains("viewer"), "{err}");

    let revoked = json_of(&["--json", "client", "revoke", "party-1"], &admin).await;
    assert_eq!(revoked["revoked"], true, "{revoked}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let clients = json_of(&["--json", "client", "list"], &admin).await;
        let p1 = clients
            .as_array()
            .expect("list")
            .iter()
            .find(|c| c["party"] == "party-1")
            .cloned()
            .expect("party-1 listed");
        if p1["connected"] == false {
            assert_eq!(p1["revoked"], true);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "party-1 still connected: {p1}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(up);
}

/// A loopback port that refuses connections for as long as the socket is kept: bound, so no
/// other test can take it, but not listening.
fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let port = socket.local_addr().expect("addr").port();
    (socket, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_follow_the_json_contract_and_every_command_has_help() {
    let dir = tempfile::tempdir().expect("tempdir");
    let none = dir.path().join("no-profile.toml");

    let (code, out, err) = cohort(&["--json", "job", "list", "--bogus"], &none)
        .await
        .expect("run");
    assert_eq!(code, 2, "{err}");
    assert_eq!(out, "");
    let e = json_error(&err);
    assert_eq!(e["code"], "usage", "{e}");
    assert_eq!(e["field"], "--bogus", "{e}");
    // Without --json, clap's own text.
    let (code, _, err) = cohort(&["job", "list", "--bogus"], &none)
        .await
        .expect("run");
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: unexpected argument '--bogus'"),
        "{err}"
    );
    assert!(err.contains("Usage: cohort job list"), "{err}");

    // Our own checks of arguments are usage errors too (made before any call).
    let profile = dir.path().join("profile.toml");
    let (_closed, port) = closed_port();
    std::fs::write(&profile, format!("endpoint = \"127.0.0.1:{port}\"\n")).expect("write");
    let (code, _, err) = cohort(&["--json", "job", "list", "--state", "sleepy"], &profile)
        .await
        .expect("run");
    assert_eq!(code, 1);
    let e = json_error(&err);
    assert_eq!(
        (e["code"].as_str(), e["field"].as_str()),
        (Some("usage"), Some("--state")),
        "{e}"
    );

    // A local failure: the profile named does not exist.
    let (code, _, err) = cohort(&["--json", "job", "list"], &none)
        .await
        .expect("run");
    assert_eq!(code, 1);
    let e = json_error(&err);
    assert_eq!(e["code"], "local", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("no-profile.toml"),
        "{e}"
    );

    let (code, out, err) = cohort(&["help", "job", "create"], &none)
        .await
        .expect("run");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"-\" reads it from stdin"), "{out}");
    let (code, out, _) = cohort(&["help", "version"], &none).await.expect("run");
    assert_eq!(code, 0);
    assert!(out.contains("--client"), "{out}");

    let (code, out, err) = cohort(&["completions", "bash"], &none).await.expect("run");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("_cohort()"),
        "a bash completion function: {out}"
    );
    assert!(out.contains("logs"), "{out}");
    let (code, _, err) = cohort(&["--json", "completions", "tcsh"], &none)
        .await
        .expect("run");
    assert_eq!(code, 2);
    assert_eq!(json_error(&err)["field"], "SHELL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_federation_is_named_with_its_profile_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = dir.path().join("profile.toml");
    let (_closed, port) = closed_port();
    let endpoint = format!("127.0.0.1:{port}");
    std::fs::write(&profile, format!("endpoint = \"{endpoint}\"\n")).expect("write");
    let named = format!(
        "cannot reach the federation at {endpoint} (profile {}): connection refused",
        profile.display()
    );

    // `version` still tells the CLI's version, and why the server's is unknown.
    let started = Instant::now();
    let (code, out, err) = cohort(&["version"], &profile).await.expect("run");
    assert_eq!(code, 1, "the server's version is unknown");
    assert_eq!(out, format!("cohort {}\n", env!("CARGO_PKG_VERSION")));
    assert!(err.contains(&named), "{err}");
    assert!(err.contains("the server's version is unknown"), "{err}");
    let (code, out, err) = cohort(&["--json", "version"], &profile).await.expect("run");
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(v["cli"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["server"], Value::Null);
    let e = json_error(&err);
    assert_eq!(e["code"], "unavailable", "{e}");
    assert!(e["message"].as_str().unwrap_or("").contains(&named), "{e}");
    let (code, out, _) = cohort(&["version", "--client"], &profile)
        .await
        .expect("run");
    assert_eq!(code, 0);
    assert!(out.starts_with("cohort "), "{out}");

    // `job watch` says so at once rather than retrying for a minute.
    let (code, _, err) = cohort(&["--json", "job", "watch", "some-job"], &profile)
        .await
        .expect("run");
    assert_eq!(code, 1);
    let e = json_error(&err);
    assert_eq!(e["code"], "unavailable", "{e}");
    assert_eq!(e["message"], named.as_str(), "{e}");
    let (code, _, err) = cohort(&["job", "logs", "--follow", "some-job"], &profile)
        .await
        .expect("run");
    assert_eq!(code, 1);
    assert!(err.contains(&named), "{err}");
    // Six CLI runs: seconds on a loaded machine, where a `watch` that retried would take a
    // minute on its own.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_profile_is_named_without_its_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = dir.path().join("profile.toml");
    let token = "cohort_Zm9yZ2VkLXNlY3JldC10aGF0LW11c3Qtbm90LWxlYWsxMjM0NTY3";
    for broken in [
        format!("endpoint = \"127.0.0.1:7070\"\ntoken = {token}\n"),
        format!("endpoint = \"127.0.0.1:7070\"\ntoken = \"{token}\n"),
        format!("endpoint = \"127.0.0.1:7070\"\ntoken = 7{token}\n"),
    ] {
        std::fs::write(&profile, &broken).expect("write");
        for json in [false, true] {
            let args: &[&str] = if json {
                &["--json", "job", "list"]
            } else {
                &["job", "list"]
            };
            let (code, out, err) = cohort(args, &profile).await.expect("run");
            assert_eq!(code, 1, "{err}");
            assert!(
                !err.contains(&token[7..]) && !out.contains(&token[7..]),
                "token leaked: {err}"
            );
            assert!(err.contains(&profile.display().to_string()), "{err}");
            assert!(err.contains("line 2, key `token`"), "{err}");
            if json {
                let e = json_error(&err);
                assert_eq!(
                    (e["code"].as_str(), e["field"].as_str()),
                    (Some("local"), Some("token"))
                );
            }
        }
    }
}
