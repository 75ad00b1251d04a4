//! `cohort check` run as a process against a real federation: with a party's own files every
//! step passes; a certificate of another CA, a proxy dialled by a name its certificate does
//! not hold, an unreadable dataset and a revoked party each fail the step that names the
//! problem, with a hint and exit code 1; `--federation` reports every connected party: those
//! whose executor reached the server as that party and read its datasets, one whose executor
//! cannot start, one whose executor cannot reach the server (the CA file it is given changed
//! on disk after its task-manager started), one that is stopped and does not answer; no
//! probe's executor outlives the probe.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_cli::stack::{PartyData, Stack, StackConfig};
use cohort_integration_tests::{bin_dir, cohort, descendants, wait_clients};
use cohort_proto::v1 as pb;
use nix::sys::signal::Signal;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

struct Party {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    datasets: PathBuf,
}

fn party_files(stack: &Stack, data_dir: &Path, name: &str) -> Party {
    Party {
        cert: stack.pki.join(format!("party-{name}.crt")),
        key: stack.pki.join(format!("party-{name}.key")),
        ca: stack.pki.join("ca.crt"),
        datasets: data_dir.join(format!("parties/{name}/datasets.json")),
    }
}

/// `cohort --json check` as a party: (exit code, the report's steps by name, stderr).
async fn check(
    profile: &Path,
    proxy: &str,
    party: &str,
    files: &Party,
) -> (
    i32,
    Vec<(String, Option<bool>, String, Option<String>)>,
    Value,
) {
    let args = [
        "--json",
        "check",
        "--proxy",
        proxy,
        "--party",
        party,
        "--tls-cert",
        files.cert.to_str().expect("path"),
        "--tls-key",
        files.key.to_str().expect("path"),
        "--tls-ca",
        files.ca.to_str().expect("path"),
        "--datasets",
        files.datasets.to_str().expect("path"),
    ];
    let (code, stdout, stderr) = cohort(&args, profile).await.expect("cohort check runs");
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}): {stdout}\nstderr: {stderr}"));
    let steps = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().expect("name").to_string(),
                s["ok"].as_bool(),
                s["detail"].as_str().expect("detail").to_string(),
                s["hint"].as_str().map(str::to_string),
            )
        })
        .collect();
    (code, steps, report)
}

fn step<'a>(
    steps: &'a [(String, Option<bool>, String, Option<String>)],
    name: &str,
) -> &'a (String, Option<bool>, String, Option<String>) {
    steps
        .iter()
        .find(|s| s.0 == name)
        .unwrap_or_else(|| panic!("no step {name}: {steps:?}"))
}

/// Every step that did not pass, by name.
fn failed(steps: &[(String, Option<bool>, String, Option<String>)]) -> Vec<&str> {
    steps
        .iter()
        .filter(|s| s.1 == Some(false))
        .map(|s| s.0.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cohort_check_names_what_keeps_a_party_out() {
    let dir = tempfile::Builder::new()
        .prefix("cohort-it-check-")
        .tempdir()
        .expect("tempdir");
    // party-4's --tls-ca: the federation's CA through a link, until the test swaps it.
    let party4_ca = dir.path().join("party-4-ca.crt");
    std::os::unix::fs::symlink(dir.path().join("pki/ca.crt"), &party4_ca).expect("link");
    // On every address, so that 127.0.0.2 reaches it too: a name its certificate lacks. The
    // local parties dial the address it listens on, so its certificate names that.
    let mut stack = Stack::start(&StackConfig {
        bin_dir: Some(bin_dir()),
        data_dir: dir.path().to_path_buf(),
        parties: 4,
        proxy_listen: "0.0.0.0:0".into(),
        proxy_names: vec!["0.0.0.0".into()],
        database_url: None,
        blob_url: None,
        service_env: Vec::new(),
        party_data: PartyData::Digits {
            alpha: 0.5,
            seed: 42,
        },
        party_env: Vec::new(),
        // party-3's executor cannot run (it exits 1): it answers probes, not ready.
        party_overrides: vec![
            (
                "party-3".into(),
                vec![("COHORT_EXECUTOR_BIN".into(), "/bin/false".into())],
            ),
            (
                "party-4".into(),
                vec![("COHORT_TLS_CA".into(), party4_ca.display().to_string())],
            ),
        ],
        metrics: false,
    })
    .await
    .expect("federation");
    let port = stack
        .proxy
        .rsplit_once(':')
        .expect("host:port")
        .1
        .to_string();
    let localhost = format!("localhost:{port}");
    // The admin's profile names the proxy by a name its certificate holds.
    let profile = dir.path().join("profile.toml");
    let admin = cohort_cli::profile::Profile {
        endpoint: localhost.clone(),
        ..stack.profile()
    };
    admin.save(&profile).expect("profile");
    let api = cohort_cli::Api::from_profile(&admin).expect("api");
    wait_clients(&api, WAIT, |c| {
        c.iter().filter(|c| c.connected).count() == 4
    })
    .await;
    let party1 = party_files(&stack, dir.path(), "party-1");

    // Everything in order: every step passes, exit 0.
    let (code, steps, report) = check(&profile, &localhost, "party-1", &party1).await;
    assert_eq!(failed(&steps), Vec::<&str>::new(), "{report}");
    assert!(steps.iter().all(|s| s.1 == Some(true)), "{report}");
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["ok"], true);
    for name in [
        "certificate",
        "dns",
        "tcp",
        "tls",
        "proxy-name",
        "client-certificate",
        "not-revoked",
        "party",
        "clock",
        "dataset digits",
    ] {
        step(&steps, name);
    }
    assert!(step(&steps, "party").2.contains("party-1"), "{report}");
    assert!(
        step(&steps, "dataset digits").2.contains("64 features"),
        "{report}"
    );

    // The human form: one line per step with its mark.
    let (code, stdout, _) = cohort(
        &[
            "check",
            "--proxy",
            &localhost,
            "--tls-cert",
            party1.cert.to_str().expect("path"),
            "--tls-key",
            party1.key.to_str().expect("path"),
            "--tls-ca",
            party1.ca.to_str().expect("path"),
        ],
        &profile,
    )
    .await
    .expect("cohort check runs");
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("✓ proxy-name")),
        "{stdout}"
    );

    // A proxy dialled by an address its certificate does not name (it names 127.0.0.1 and
    // localhost): the name fails, told apart from the CA, and the checks after it still run.
    let (code, steps, report) =
        check(&profile, &format!("127.0.0.2:{port}"), "party-1", &party1).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(failed(&steps), ["proxy-name"], "{report}");
    let (_, _, detail, hint) = step(&steps, "proxy-name");
    assert!(
        detail.contains("127.0.0.2") && detail.contains("localhost"),
        "{detail}"
    );
    assert!(
        hint.as_deref().unwrap_or("").contains("--proxy-name"),
        "{hint:?}"
    );
    assert_eq!(step(&steps, "tls").1, Some(true), "{report}");
    // In the human form, the failed step and its fix, exit 1.
    let wrong = format!("127.0.0.2:{port}");
    let (code, stdout, _) = cohort(
        &[
            "check",
            "--proxy",
            &wrong,
            "--party",
            "party-1",
            "--tls-cert",
            party1.cert.to_str().expect("path"),
            "--tls-key",
            party1.key.to_str().expect("path"),
            "--tls-ca",
            party1.ca.to_str().expect("path"),
            "--datasets",
            party1.datasets.to_str().expect("path"),
        ],
        &profile,
    )
    .await
    .expect("cohort check runs");
    assert_eq!(code, 1, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("✗ proxy-name"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        lines
            .get(at + 1)
            .is_some_and(|l| l.trim_start().starts_with("fix: dial the proxy")),
        "{stdout}"
    );
    assert!(lines.iter().any(|l| l.starts_with("✓ clock")), "{stdout}");

    // A certificate of another CA (and that CA as --tls-ca): the proxy's certificate does not
    // chain to it, and the TLS step says so.
    let other = dir.path().join("other-pki");
    let other_dir = other.to_str().expect("path");
    let (code, out, err) = cohort(&["cert", "init", "--dir", other_dir], &profile)
        .await
        .expect("cert init");
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cohort(
        &["cert", "issue", "--party", "party-1", "--dir", other_dir],
        &profile,
    )
    .await
    .expect("cert issue");
    assert_eq!(code, 0, "{out}{err}");
    let foreign = Party {
        cert: other.join("party-1.crt"),
        key: other.join("party-1.key"),
        ca: other.join("ca.crt"),
        datasets: party1.datasets.clone(),
    };
    let (code, steps, report) = check(&profile, &localhost, "party-1", &foreign).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(failed(&steps), ["tls"], "{report}");
    assert!(
        step(&steps, "tls")
            .2
            .contains("not signed by the CA in --tls-ca"),
        "{report}"
    );
    assert_eq!(
        step(&steps, "client-certificate").1,
        None,
        "skipped: {report}"
    );
    // The foreign certificate with the federation's CA: the proxy refuses the certificate.
    let foreign_cert = Party {
        ca: party1.ca.clone(),
        ..foreign
    };
    let (code, steps, report) = check(&profile, &localhost, "party-1", &foreign_cert).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(failed(&steps), ["client-certificate"], "{report}");
    assert!(
        step(&steps, "client-certificate")
            .3
            .as_deref()
            .unwrap_or("")
            .contains("federation's CA"),
        "{report}"
    );

    // A dataset whose file is missing, beside a good one: only the missing one fails.
    let good = serde_json::from_str::<Value>(
        &std::fs::read_to_string(&party1.datasets).expect("datasets.json"),
    )
    .expect("json");
    let mut entries = good.as_object().expect("object").clone();
    let base = party1.datasets.parent().expect("party dir");
    for entry in entries.values_mut() {
        for field in ["path", "eval_path"] {
            if let Some(p) = entry[field].as_str() {
                entry[field] = Value::from(base.join(p).display().to_string());
            }
        }
    }
    entries.insert(
        "lost".into(),
        serde_json::json!({"format": "csv", "path": dir.path().join("missing.csv")}),
    );
    let broken = dir.path().join("broken-datasets.json");
    std::fs::write(&broken, Value::Object(entries).to_string()).expect("write");
    let with_broken = Party {
        datasets: broken,
        ..party_files(&stack, dir.path(), "party-1")
    };
    let (code, steps, report) = check(&profile, &localhost, "party-1", &with_broken).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(failed(&steps), ["dataset lost"], "{report}");
    assert!(
        step(&steps, "dataset lost").2.contains("missing.csv"),
        "{report}"
    );
    assert_eq!(step(&steps, "dataset digits").1, Some(true), "{report}");

    // The server side: every connected party is probed. party-4's CA file now holds another
    // CA (its task-manager read the right one at its start and stays connected): its
    // executor, given that file as a task's would be, cannot reach the server.
    let swapped = dir.path().join("party-4-ca.crt.new");
    std::fs::copy(other.join("ca.crt"), &swapped).expect("copy the other CA");
    std::fs::rename(&swapped, &party4_ca).expect("swap party-4's CA file");
    let federation = |args: Vec<&'static str>| {
        let profile = profile.clone();
        async move {
            cohort(&args, &profile)
                .await
                .expect("cohort check --federation runs")
        }
    };
    let federation_json = |timeout: &'static str| {
        let run = federation(vec![
            "--json",
            "check",
            "--federation",
            "--timeout",
            timeout,
        ]);
        async move {
            let (code, stdout, stderr) = run.await;
            let report: Value =
                serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"));
            (code, report)
        }
    };
    let by_party = |report: &Value| -> Vec<(String, Option<bool>, String, Value)> {
        report["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().expect("name").to_string(),
                    s["ok"].as_bool(),
                    s["detail"].as_str().expect("detail").to_string(),
                    s["probe"].clone(),
                )
            })
            .collect()
    };
    let no_probe_executor_left = || {
        let left: Vec<_> = descendants(std::process::id())
            .into_iter()
            .filter(|(_, _, comm)| comm == "executor")
            .collect();
        assert_eq!(left, [], "a probe's executor outlived the probe");
    };
    let (code, report) = federation_json("20s").await;
    no_probe_executor_left();
    assert_eq!(code, 1, "{report}");
    let parties = by_party(&report);
    let names: Vec<&str> = parties.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "party party-1",
            "party party-2",
            "party party-3",
            "party party-4"
        ],
        "{report}"
    );
    // Their executors reached the server as themselves and read their one dataset.
    for (name, ok, detail, probe) in &parties[..2] {
        let party = name.trim_start_matches("party ");
        assert_eq!(*ok, Some(true), "{report}");
        assert!(
            detail.starts_with("answered in ")
                && detail.contains(&format!(
                    "executor started, reached the server as {party} ("
                ))
                && detail.ends_with("1/1 datasets read"),
            "{report}"
        );
        let executor = &probe["executor"];
        assert_eq!(probe["answered"], true, "{report}");
        assert_eq!(executor["started"], true, "{report}");
        assert_eq!(executor["reached_server"], true, "{report}");
        assert_eq!(executor["server_saw_party"], party, "{report}");
        assert_eq!(
            (&executor["datasets"], &executor["datasets_readable"]),
            (&Value::from(1), &Value::from(1)),
            "{report}"
        );
        assert_eq!(executor["error"], Value::Null, "{report}");
        assert!(executor["round_trip_ms"].as_u64().is_some(), "{report}");
    }
    // party-3 answers; its executor does not start.
    let (_, ok, detail, probe) = &parties[2];
    assert_eq!(*ok, Some(false), "{report}");
    assert!(
        detail.contains("executor did not run the probe") && detail.contains("/bin/false"),
        "{report}"
    );
    assert_eq!(probe["answered"], true, "{report}");
    assert_eq!(probe["executor"]["started"], false, "{report}");
    // party-4 answers; its executor started and says why it did not reach the server.
    let (_, ok, detail, probe) = &parties[3];
    assert_eq!(*ok, Some(false), "{report}");
    assert!(
        detail.contains("executor started, did not reach the server")
            && detail.contains("cannot reach the server through the proxy"),
        "{report}"
    );
    let executor = &probe["executor"];
    assert_eq!(
        (&executor["started"], &executor["reached_server"]),
        (&Value::from(true), &Value::from(false)),
        "{report}"
    );
    let error = executor["error"].as_str().unwrap_or_default();
    assert!(
        error.to_lowercase().contains("certificate"),
        "the executor's own error names the certificate: {report}"
    );
    // Its task-manager is still connected: only its executor is cut off.
    assert_eq!(probe["answered"], true, "{report}");

    // The human form: a line per party, the failed ones with their fix; exit 1.
    let (code, stdout, _) = federation(vec!["check", "--federation", "--timeout", "20s"]).await;
    no_probe_executor_left();
    eprintln!("cohort check --federation:\n{stdout}");
    assert_eq!(code, 1, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.iter().any(
            |l| l.starts_with("✓ party party-1") && l.contains("reached the server as party-1")
        ),
        "{stdout}"
    );
    let at = lines
        .iter()
        .position(|l| l.starts_with("✗ party party-4"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        lines
            .get(at + 1)
            .is_some_and(|l| l.trim_start().starts_with("fix: the executor dials")),
        "{stdout}"
    );

    // A party that is connected but does not answer (its task-manager stopped; its session
    // outlives a short probe: client-selector waits three 5 s heartbeats): reported
    // unanswered.
    stack
        .signal("task-manager-party-2", Signal::SIGSTOP)
        .expect("stop party-2");
    let (code, report) = federation_json("3s").await;
    stack
        .signal("task-manager-party-2", Signal::SIGCONT)
        .expect("continue party-2");
    assert_eq!(code, 1, "{report}");
    let parties = by_party(&report);
    assert_eq!(parties[0].1, Some(true), "{report}");
    assert_eq!(parties[1].0, "party party-2", "{report}");
    assert_eq!(parties[1].1, Some(false), "{report}");
    assert!(parties[1].2.contains("no answer within 3s"), "{report}");
    assert_eq!(parties[1].3["answered"], false, "{report}");

    // Probing the parties is for admins of every namespace: a namespace's admin is refused,
    // as the error contract says (one JSON error on stderr, exit 1).
    let created = api
        .tokens()
        .create_token(pb::CreateTokenRequest {
            name: "team-a-admin".into(),
            namespace: "team-a".into(),
            role: pb::Role::Admin as i32,
        })
        .await
        .expect("admin makes a token")
        .into_inner();
    let team_profile = dir.path().join("team-a.toml");
    cohort_cli::profile::Profile {
        token: Some(created.token),
        ..admin.clone()
    }
    .save(&team_profile)
    .expect("profile");
    let (code, stdout, stderr) = cohort(&["--json", "check", "--federation"], &team_profile)
        .await
        .expect("cohort check --federation runs");
    assert_eq!((code, stdout.as_str()), (1, ""), "{stderr}");
    let error: Value = serde_json::from_str(stderr.trim()).expect("one JSON error");
    assert_eq!(error["error"]["code"], "permission_denied", "{stderr}");

    // Revoked: the proxy's gate (or client-selector, until the gate reloads its list)
    // refuses the party, and the check names the revocation.
    api.selector()
        .revoke_client(pb::RevokeClientRequest {
            party: "party-2".into(),
        })
        .await
        .expect("admin revokes");
    let party2 = party_files(&stack, dir.path(), "party-2");
    let (code, steps, report) = check(&profile, &localhost, "party-2", &party2).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(failed(&steps), ["not-revoked"], "{report}");
    assert!(
        step(&steps, "not-revoked").2.contains("revoked"),
        "{report}"
    );
    assert!(
        step(&steps, "not-revoked")
            .3
            .as_deref()
            .unwrap_or("")
            .contains("cohort client revoke"),
        "{report}"
    );

    // --federation once party-2 is gone: it is no longer listed.
    wait_clients(&api, WAIT, |c| {
        c.iter().any(|c| c.party == "party-2" && !c.connected)
    })
    .await;
    let (_, report) = federation_json("20s").await;
    let names: Vec<String> = by_party(&report).into_iter().map(|p| p.0).collect();
    assert_eq!(
        names,
        ["party party-1", "party party-3", "party party-4"],
        "{report}"
    );

    stack.shutdown().await;
}
