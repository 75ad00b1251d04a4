//! A real Prometheus server (Debian's `prometheus` package; the test script installs it)
//! scrapes a running federation through the file-based discovery targets its processes
//! publish, as an operator's would (issue 14). Through Prometheus' HTTP API: every target
//! is up with no scrape error, the coordinator's too while its job runs,
//! `cohort_rounds_total` equals the job's rounds, the round-duration histogram counts them,
//! and gRPC calls were counted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::{Federation, http_get, state_of, wait_clients};

// Enough rounds for the coordinator to live through a few scrapes (a second apart).
const ROUNDS: u32 = 300;
const PATIENCE: Duration = Duration::from_secs(60);

fn prometheus_bin() -> Option<PathBuf> {
    ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The server, stopped (and its data removed with the federation's directory) on drop.
struct Prometheus {
    child: tokio::process::Child,
    addr: String,
    log: PathBuf,
}

impl Prometheus {
    async fn start(bin: &Path, dir: &Path, targets: &Path) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: cohort\n    file_sd_configs:\n      - files: ['{}/*.json']\n        refresh_interval: 1s\n",
                targets.display()
            ),
        )
        .expect("write prometheus.yml");
        // A free port: bound, read and let go (Prometheus says so when it is taken since).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("prometheus.log");
        let child = tokio::process::Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let server = Prometheus { child, addr, log };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while http_get(&server.addr, "/-/ready").await.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready: {}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An API answer's `data`.
    async fn api(&self, path: &str) -> serde_json::Value {
        let body = http_get(&self.addr, path)
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer {path}: {}", self.log()));
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    /// The value of an instant query that yields one number (the sum of the series), or
    /// None while it yields nothing.
    async fn number(&self, promql: &str) -> Option<f64> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(promql)))
            .await;
        let result = data["result"].as_array()?.first()?.clone();
        result["value"][1].as_str()?.parse().ok()
    }

    /// Polls `promql` until `ok` holds, for at most a minute; returns the last value.
    async fn number_when(&self, promql: &str, ok: impl Fn(f64) -> bool) -> Option<f64> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = self.number(promql).await;
            if v.is_some_and(&ok) || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The active targets: (scrape URL, health, last error).
    async fn targets(&self) -> Vec<(String, String, String)> {
        let data = self.api("/api/v1/targets?state=active").await;
        data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|t| {
                (
                    t["scrapeUrl"].as_str().unwrap_or_default().to_string(),
                    t["health"].as_str().unwrap_or_default().to_string(),
                    t["lastError"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_scrapes_every_process_of_a_federation() {
    let Some(bin) = prometheus_bin() else {
        cohort_testkit::skip("prometheus is not installed (scripts/test.sh installs it)");
        return;
    };
    let fed = Federation::synthetic(2).await.expect("federation");
    let targets_dir = fed
        .stack
        .metrics_dir()
        .expect("metrics are on")
        .to_path_buf();
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 2
    })
    .await;
    let prometheus = Prometheus::start(&bin, fed.dir.path(), &targets_dir).await;

    // Every process of the federation is discovered and up: 4 services and 2 parties.
    let services = prometheus.number_when("count(up == 1)", |n| n >= 6.0).await;
    assert_eq!(
        services,
        Some(6.0),
        "targets: {:?}",
        prometheus.targets().await
    );

    let job = fed
        .create_job(&format!(
            "name: scraped\nmodel: {{arch: synthetic, params: 100000, layers: 2}}\n\
             data: {{dataset: synthetic}}\nrounds: {ROUNDS}\n\
             clients: {{per_round: 2, min: 2, round_timeout: 60s}}\n"
        ))
        .await
        .expect("create");
    // The job's coordinator is scraped too while it runs: its own series reach Prometheus.
    let coordinator_scraped = prometheus
        .number_when(
            &format!("count(cohort_updates_total{{job_id=\"{}\"}})", job.id),
            |n| n >= 1.0,
        )
        .await;
    assert!(
        coordinator_scraped.is_some_and(|n| n >= 1.0),
        "the coordinator was never scraped: {:?}",
        prometheus.targets().await
    );

    let ended = fed
        .wait_end(&job.id, Duration::from_secs(240))
        .await
        .expect("the job ends");
    assert_eq!(state_of(&ended), JobState::Succeeded, "{ended:?}");

    // What Prometheus read agrees with what happened.
    let rounds = prometheus
        .number_when("sum(cohort_rounds_total)", |n| n >= f64::from(ROUNDS))
        .await;
    assert_eq!(rounds, Some(f64::from(ROUNDS)), "cohort_rounds_total");
    let histogram = prometheus
        .number_when("sum(cohort_round_duration_seconds_count)", |n| {
            n >= f64::from(ROUNDS)
        })
        .await;
    assert_eq!(
        histogram,
        Some(f64::from(ROUNDS)),
        "round durations counted"
    );
    let calls = prometheus
        .number("sum(cohort_grpc_server_requests_total{grpc_code=\"OK\"})")
        .await;
    assert!(calls.is_some_and(|n| n > 0.0), "gRPC calls: {calls:?}");

    // Every process still running is up, and no scrape failed.
    assert!(prometheus.targets().await.len() >= 6);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        // The ended coordinator's target leaves with its discovery file; until then it may
        // be down. Every other target must be up with no error.
        let targets = prometheus.targets().await;
        let bad: Vec<_> = targets
            .iter()
            .filter(|(_, health, error)| health != "up" || !error.is_empty())
            .collect();
        if bad.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "targets not up or failing: {bad:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let scraped = prometheus.number("count(scrape_samples_scraped > 0)").await;
    assert!(
        scraped.is_some_and(|n| n >= 6.0),
        "targets with samples: {scraped:?}"
    );
}
