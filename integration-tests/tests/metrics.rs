//! Prometheus metrics of a running federation (issue 14): every process publishes its
//! `/metrics` endpoint as a file-based discovery target, serves the text format that
//! `promtool check metrics` accepts, and counts what really happened — the job's rounds,
//! the coordinator's updates and bytes, the parties' sessions and offers, gRPC calls by
//! code. `promtool` comes from Debian's `prometheus` package (the test script installs it).
//! The chart's Grafana dashboard queries only metrics that the federation's pages show.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::{Federation, http_get, state_of, wait_clients};

const ROUNDS: u32 = 200;

fn promtool() -> Option<PathBuf> {
    ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Every published target: file stem (the process) → address.
fn targets(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let groups: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}: {text}", path.display()));
        let target = groups[0]["targets"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{} names no target: {text}", path.display()));
        out.insert(name.to_string(), target.to_string());
    }
    out
}

async fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics")
        .await
        .unwrap_or_else(|| panic!("{addr}: no page of metrics (200) within 10 s"))
}

/// The sum of every sample of `name` whose labels contain each of `labels`.
fn value(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| v.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Scrapes `process` until `name{labels}` satisfies `ok`, for at most 30 s; returns that
/// page. For figures recorded after what the test waited for: a party records a task's end
/// once its executor answers, the proxy a call once its answer passed, both of which may
/// come after the job's end.
async fn page_when(
    dir: &Path,
    process: &str,
    name: &str,
    labels: &[&str],
    ok: impl Fn(f64) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let addr = targets(dir)
            .get(process)
            .cloned()
            .unwrap_or_else(|| panic!("{process} published no metrics target"));
        let page = scrape(&addr).await;
        if ok(value(&page, name, labels)) || tokio::time::Instant::now() >= deadline {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The metric names a page exposes: every family of a `# TYPE` line, and for a histogram
/// or summary its `_bucket`, `_sum` and `_count` series too.
fn families(page: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in page.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            if matches!(kind, "histogram" | "summary") {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            out.insert(name.to_string());
        }
    }
    out
}

/// The `cohort_` metric names a PromQL expression refers to: identifiers outside string
/// literals (a label value may look like a name), so `by (le)`, functions and Grafana's
/// `$__rate_interval` are left out by the prefix.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if matches!(c, '"' | '\'' | '`') {
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' && c != '`' {
                    escaped = true;
                } else if d == c {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut end = start + c.len_utf8();
            while let Some(&(i, d)) = chars.peek() {
                if !(d.is_ascii_alphanumeric() || d == '_' || d == ':') {
                    break;
                }
                end = i + d.len_utf8();
                chars.next();
            }
            let word = &expr[start..end];
            if word.starts_with("cohort_") {
                out.insert(word.to_string());
            }
        } else if c.is_ascii_digit() {
            // A number (0.95, 1e3) is not the start of a name.
            while chars
                .peek()
                .is_some_and(|&(_, d)| d.is_ascii_alphanumeric() || d == '.')
            {
                chars.next();
            }
        }
    }
    out
}

/// Every `expr` of the chart's dashboard (panels, rows' panels, wherever they nest).
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/cohort-server/dashboards/cohort.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// Dashboard metrics a clean synthetic job cannot show, with why, each checked against the
/// source that registers it: synthetic models are not evaluated, and a store error needs a
/// failing store.
const SHOWN_ONLY_ON_EVENTS: &[(&str, &str, &str)] = &[
    (
        "cohort_round_accuracy_ratio",
        "\"round_accuracy_ratio\"",
        include_str!("../../services/coordinator/src/metrics.rs"),
    ),
    (
        "cohort_round_loss",
        "\"round_loss\"",
        include_str!("../../services/coordinator/src/metrics.rs"),
    ),
    (
        "cohort_store_errors_total",
        "\"store_errors_total\"",
        include_str!("../../libs/store/src/measured.rs"),
    ),
];

#[test]
fn promql_names_and_page_families_are_read_right() {
    let names = promql_metrics(
        r#"histogram_quantile(0.95, sum by (le) (rate(cohort_a_seconds_bucket{x="cohort_not_a_metric"}[$__rate_interval]))) / on() cohort_b:rate5m + 1e3 * cohort_c"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["cohort_a_seconds_bucket", "cohort_b:rate5m", "cohort_c"]
    );
    let page = "# HELP cohort_h_seconds h\n# TYPE cohort_h_seconds histogram\n\
                cohort_h_seconds_bucket{le=\"1\"} 1\n# TYPE cohort_g gauge\ncohort_g 2\n";
    let seen = families(page);
    for name in [
        "cohort_h_seconds_bucket",
        "cohort_h_seconds_count",
        "cohort_g",
    ] {
        assert!(seen.contains(name), "{name}: {seen:?}");
    }
    assert!(!seen.contains("cohort_g_count"));
    // The dashboard asks for something, and each exemption is registered where it says.
    assert!(dashboard_exprs().len() >= 10);
    for (name, registered, source) in SHOWN_ONLY_ON_EVENTS {
        assert!(
            source.contains(registered),
            "{name} is no longer registered"
        );
    }
}

async fn promtool_accepts(promtool: &Path, process: &str, page: &str) {
    use tokio::io::AsyncWriteExt;
    let mut check = tokio::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start promtool");
    let mut stdin = check.stdin.take().expect("stdin");
    stdin
        .write_all(page.as_bytes())
        .await
        .expect("feed promtool");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), check.wait_with_output())
        .await
        .expect("promtool in time")
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics refuses {process}'s metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_metrics_that_count_what_happened() {
    let promtool = promtool();
    if promtool.is_none() {
        cohort_testkit::skip("promtool is not installed (scripts/test.sh installs prometheus)");
    }
    let fed = Federation::synthetic(2).await.expect("federation");
    let dir = fed
        .stack
        .metrics_dir()
        .expect("metrics are on")
        .to_path_buf();
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 2
    })
    .await;
    let services = targets(&dir);
    for process in [
        "proxy",
        "job-scheduler",
        "model-manager",
        "client-selector",
        "task-manager-party-1",
        "task-manager-party-2",
    ] {
        assert!(services.contains_key(process), "{process}: {services:?}");
    }

    let job = fed
        .create_job(&format!(
            "name: metrics\nmodel: {{arch: synthetic, params: 1000, layers: 2}}\n\
             data: {{dataset: synthetic}}\nrounds: {ROUNDS}\n\
             clients: {{per_round: 2, min: 2, round_timeout: 60s}}\n"
        ))
        .await
        .expect("create");

    // The job's coordinator publishes its own target while it runs: its updates and bytes
    // are counted there, with the job's id.
    let coordinator = format!("coordinator-{}", job.id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let coordinator_page = loop {
        if let Some(addr) = targets(&dir).get(&coordinator).cloned() {
            let page = scrape(&addr).await;
            let job_label = format!("job_id=\"{}\"", job.id);
            // A round's train phase is timed once its updates are folded and the strategy
            // has stepped: after the updates are counted, not with them.
            let accepted = value(
                &page,
                "cohort_updates_total",
                &[&job_label, "outcome=\"accepted\""],
            );
            let trained = value(
                &page,
                "cohort_round_phase_duration_seconds_count",
                &[&job_label, "phase=\"train\""],
            );
            if accepted >= 2.0 && trained >= 1.0 {
                break page;
            }
        }
        let current = fed.get_job(&job.id).await.expect("get job");
        assert!(
            !matches!(
                state_of(&current),
                JobState::Succeeded | JobState::Failed | JobState::Stopped
            ),
            "the job ended before its coordinator's metrics could be read: {current:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator's metrics never showed a trained round"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let job_label = format!("job_id=\"{}\"", job.id);
    for direction in ["to_parties", "from_parties"] {
        let bytes = value(
            &coordinator_page,
            "cohort_update_bytes_total",
            &[&job_label, &format!("direction=\"{direction}\"")],
        );
        // 1000 float32 parameters per party and round, at least one round.
        assert!(bytes >= 8000.0, "{direction}: {bytes}\n{coordinator_page}");
    }
    assert!(
        value(
            &coordinator_page,
            "cohort_round_phase_duration_seconds_count",
            &[&job_label, "phase=\"train\""]
        ) >= 1.0,
        "{coordinator_page}"
    );
    assert!(
        value(
            &coordinator_page,
            "cohort_grpc_server_requests_total",
            &["grpc_method=\"SubmitUpdate\"", "grpc_code=\"OK\""]
        ) >= 2.0,
        "{coordinator_page}"
    );
    if let Some(promtool) = &promtool {
        promtool_accepts(promtool, &coordinator, &coordinator_page).await;
    }
    let mut seen = families(&coordinator_page);

    // A party with a real certificate fetching with a forged task token is refused and
    // counted: the dashboard's refused-calls panel then has a series to show.
    let certs = tempfile::tempdir().expect("tempdir");
    let files = cohort_integration_tests::adversary::party_files(&fed, certs.path(), "prober");
    let mut round = cohort_proto::v1::round_client::RoundClient::new(
        cohort_integration_tests::adversary::party_channel(&fed, &files),
    );
    let forged = round
        .fetch_model(cohort_integration_tests::adversary::for_job(
            &job.id,
            cohort_proto::v1::FetchModelRequest {
                task_token: "forged".into(),
            },
        ))
        .await;
    match forged {
        Err(status) => assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}"),
        Ok(_) => panic!("a forged task token fetched the model"),
    }
    let refused = page_when(
        &dir,
        &coordinator,
        "cohort_round_calls_refused_total",
        &[&job_label, "reason=\"permission_denied\""],
        |n| n >= 1.0,
    )
    .await;
    assert!(
        value(
            &refused,
            "cohort_round_calls_refused_total",
            &[&job_label, "reason=\"permission_denied\""]
        ) >= 1.0,
        "{refused}"
    );
    seen.extend(families(&refused));

    let job = fed
        .wait_end(&job.id, Duration::from_secs(300))
        .await
        .expect("the job ends");
    assert_eq!(state_of(&job), JobState::Succeeded, "{}", job.reason);
    // Gone with its coordinator.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while targets(&dir).contains_key(&coordinator) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator's target outlived it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut pages = BTreeMap::new();
    for (process, addr) in targets(&dir) {
        let page = scrape(&addr).await;
        if let Some(promtool) = &promtool {
            promtool_accepts(promtool, &process, &page).await;
        }
        assert!(
            value(&page, "cohort_process_resident_memory_bytes", &[]) > 0.0,
            "{process}: {page}"
        );
        seen.extend(families(&page));
        pages.insert(process, page);
    }
    // Every metric the chart's dashboard queries is one this federation's processes export.
    let mut missing = BTreeSet::new();
    for expr in dashboard_exprs() {
        for name in promql_metrics(&expr) {
            let on_event = SHOWN_ONLY_ON_EVENTS.iter().any(|(n, ..)| *n == name);
            if !seen.contains(&name) && !on_event {
                missing.insert(name);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no process exports: {missing:?}\nexported: {seen:?}"
    );
    let scheduler = &pages["job-scheduler"];
    assert_eq!(
        value(scheduler, "cohort_rounds_total", &[]),
        f64::from(ROUNDS),
        "{scheduler}"
    );
    assert_eq!(
        value(scheduler, "cohort_round_duration_seconds_count", &[]),
        f64::from(ROUNDS)
    );
    // Read from the store every few seconds: wait for the count that includes this job.
    let succeeded = ["state=\"succeeded\""];
    let page = page_when(&dir, "job-scheduler", "cohort_jobs", &succeeded, |n| {
        n == 1.0
    })
    .await;
    assert_eq!(value(&page, "cohort_jobs", &succeeded), 1.0, "{page}");
    assert_eq!(value(&page, "cohort_jobs", &["state=\"running\""]), 0.0);
    let selector = &pages["client-selector"];
    assert_eq!(value(selector, "cohort_clients_connected", &[]), 2.0);
    assert!(
        value(
            selector,
            "cohort_party_sessions_total",
            &["event=\"opened\""]
        ) >= 2.0
    );
    assert!(
        value(selector, "cohort_offers_total", &["answer=\"accepted\""]) >= f64::from(2 * ROUNDS),
        "{selector}"
    );
    // Each party took every round's task, and its executors reported through it.
    let trained = ["kind=\"train\"", "outcome=\"succeeded\""];
    for party in ["task-manager-party-1", "task-manager-party-2"] {
        let page = &page_when(&dir, party, "cohort_party_tasks_total", &trained, |n| {
            n >= f64::from(ROUNDS)
        })
        .await;
        assert_eq!(
            value(page, "cohort_party_tasks_total", &trained),
            f64::from(ROUNDS),
            "{party}: {page}"
        );
        assert_eq!(
            value(page, "cohort_party_offers_total", &["answer=\"accepted\""]),
            f64::from(ROUNDS),
            "{party}"
        );
        assert_eq!(
            value(
                page,
                "cohort_executor_start_duration_seconds_count",
                &["launcher=\"warm\""]
            ),
            f64::from(ROUNDS),
            "{party}"
        );
    }
    let submitted = ["grpc_method=\"SubmitUpdate\"", "grpc_code=\"OK\""];
    let proxy = &page_when(
        &dir,
        "proxy",
        "cohort_grpc_server_requests_total",
        &submitted,
        |n| n >= f64::from(2 * ROUNDS),
    )
    .await;
    assert!(
        value(proxy, "cohort_grpc_server_requests_total", &submitted) >= f64::from(2 * ROUNDS),
        "{proxy}"
    );
    assert!(
        value(
            proxy,
            "cohort_grpc_server_request_duration_seconds_count",
            &["grpc_method=\"CreateJob\""]
        ) >= 1.0
    );
    let mut fed = fed;
    fed.stack.shutdown().await;
}
