//! Runs the whole federation on one machine as separate processes: the four
//! server services and N parties (`cohort up` and `cohort demo`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use cohort_security::{ApiToken, Validity};

use crate::data::DIGITS_CSV;
use crate::profile::Profile;

pub struct StackConfig {
    /// Where the service binaries are (default: next to this executable).
    pub bin_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub parties: u32,
    /// Proxy address; port 0 picks a free one.
    pub proxy_listen: String,
    /// More DNS names or addresses in the proxy's certificate (what remote
    /// parties dial); loopback and the listen address are always in it.
    pub proxy_names: Vec<String>,
    /// Metadata database shared by the server services (default: one SQLite
    /// file each under the data directory).
    pub database_url: Option<String>,
    /// Blob store of model-manager (default: the data directory).
    pub blob_url: Option<String>,
    /// More environment for the server services (e.g. S3 endpoint and credentials).
    pub service_env: Vec<(String, String)>,
    /// What the parties hold.
    pub party_data: PartyData,
    /// More environment for the task-managers (e.g. `COHORT_EXECUTOR_IDLE_SECS`).
    pub party_env: Vec<(String, String)>,
    /// More environment for one party's task-manager only, by party name (`party-3`),
    /// after `party_env` (e.g. `COHORT_ADVERSARY` for a robustness check).
    pub party_overrides: Vec<(String, Vec<(String, String)>)>,
    /// Every process serves Prometheus metrics on a loopback port and publishes it as a
    /// file-based discovery target in `<data dir>/run/metrics` (coordinators too).
    pub metrics: bool,
}

/// The data each local party is given.
#[derive(Debug, Clone, Copy)]
pub enum PartyData {
    /// A shard of the bundled digits: Dirichlet(`alpha`) label skew, split by `seed`.
    Digits { alpha: f64, seed: u64 },
    /// Only the synthetic dataset `synthetic` (`cohort bench round`): party `party-<i+1>`
    /// with index i and weight 100 + i.
    Synthetic,
}

struct Service {
    name: String,
    binary: String,
    /// Arguments, with `--listen` fixed to the address first bound, so a
    /// restarted service comes back where its peers expect it.
    args: Vec<String>,
    /// Passed by environment, not argument: URLs may carry passwords.
    env: Vec<(String, String)>,
    child: Child,
    /// Times `revive` found it ended and started it again.
    restarts: u32,
    /// The last restart failed (it ended while starting, or was not ready in time): an
    /// end found next is that of the failed start, not of a running service.
    restart_failed: bool,
}

/// The running processes, stopped in reverse order of start by `shutdown`.
pub struct Stack {
    services: Vec<Service>,
    /// Every process we start (and their children) shares this process group.
    pgid: Option<i32>,
    pub proxy: String,
    pub data_dir: PathBuf,
    bin_dir: PathBuf,
    /// The CA, certificates and the admin token (`<data dir>/pki`).
    pub pki: PathBuf,
    pub admin_token: ApiToken,
    /// Where metrics targets are published, when metrics are served.
    metrics_dir: Option<PathBuf>,
}

/// How long the local CA lives; certificates are issued afresh at every start.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn bin_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match explicit {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot find the cohort binary's directory")?
            .parent()
            .context("cohort binary has no directory")?
            .to_path_buf(),
    };
    for name in [
        "job-scheduler",
        "model-manager",
        "client-selector",
        "proxy",
        "coordinator",
        "task-manager",
        "executor",
    ] {
        if !dir.join(name).is_file() {
            bail!(
                "{} is missing in {}; build every binary (cargo build --workspace --bins)",
                name,
                dir.display()
            );
        }
    }
    Ok(dir)
}

impl Stack {
    pub async fn start(cfg: &StackConfig) -> anyhow::Result<Stack> {
        let bin_dir = bin_dir(cfg.bin_dir.as_deref())?;
        let server = cfg.data_dir.join("server");
        let logs = cfg.data_dir.join("logs");
        for d in [&server, &logs, &cfg.data_dir.join("run")] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let pki = cfg.data_dir.join("pki");
        let admin_token = load_or_create_token(&pki.join("admin.token"))?;
        let mut stack = Stack {
            services: Vec::new(),
            pgid: None,
            proxy: String::new(),
            data_dir: cfg.data_dir.clone(),
            bin_dir,
            pki,
            admin_token,
            metrics_dir: cfg
                .metrics
                .then(|| cfg.data_dir.join("run").join("metrics")),
        };
        let result = stack.start_all(cfg, &server).await;
        if let Err(e) = result {
            stack.shutdown().await;
            return Err(e);
        }
        Ok(stack)
    }

    /// The Prometheus file-based discovery directory (`<data dir>/run/metrics`), when
    /// every process serves metrics.
    pub fn metrics_dir(&self) -> Option<&Path> {
        self.metrics_dir.as_deref()
    }

    /// Each process's metrics URL as it published it: (process, URL), by process name.
    pub fn metrics_urls(&self) -> Vec<(String, String)> {
        let Some(dir) = &self.metrics_dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut urls: Vec<(String, String)> = entries
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                let name = path.file_stem()?.to_str()?.to_string();
                let text = std::fs::read_to_string(&path).ok()?;
                let groups: serde_json::Value = serde_json::from_str(&text).ok()?;
                let target = groups.get(0)?.get("targets")?.get(0)?.as_str()?.to_string();
                Some((name, format!("http://{target}/metrics")))
            })
            .collect();
        urls.sort();
        urls
    }

    /// The web dashboard, served by the proxy on its own port (the CA is `pki/ca.crt`).
    pub fn dashboard_url(&self) -> String {
        let (host, port) = self.proxy.rsplit_once(':').unwrap_or((&self.proxy, "443"));
        // A wildcard listen address is not one a browser can dial.
        let host = match host {
            "0.0.0.0" | "[::]" | "" => "localhost",
            host => host,
        };
        format!("https://{host}:{port}/")
    }

    /// The file holding the admin token (owner-only), to paste into the dashboard.
    pub fn admin_token_path(&self) -> PathBuf {
        self.pki.join("admin.token")
    }

    /// The profile other commands use to reach this federation as its admin.
    pub fn profile(&self) -> Profile {
        Profile {
            endpoint: self.proxy.clone(),
            ca_cert: Some(self.pki.join("ca.crt")),
            token: Some(self.admin_token.expose().to_string()),
        }
    }

    async fn start_all(&mut self, cfg: &StackConfig, server: &Path) -> anyhow::Result<()> {
        let ca = crate::certs::init_or_load_ca(&self.pki, CA_VALIDITY)?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Keys and the admin token live here: owner only.
            std::fs::set_permissions(&self.pki, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot restrict {}", self.pki.display()))?;
        }
        let validity = Validity::for_duration(cohort_security::DEFAULT_VALIDITY);
        let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        names.extend(cfg.proxy_names.iter().cloned());
        if let Some((host, _)) = cfg.proxy_listen.rsplit_once(':') {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if !host.is_empty()
                && host != "0.0.0.0"
                && host != "::"
                && !names.iter().any(|n| n == host)
            {
                names.push(host.to_string());
            }
        }
        let ca_cert = self.pki.join("ca.crt").display().to_string();
        // Paths only: the keys stay in files readable by their owner.
        let tls_env = |cert: PathBuf, key: PathBuf| {
            vec![
                ("COHORT_TLS_CERT".to_string(), cert.display().to_string()),
                ("COHORT_TLS_KEY".to_string(), key.display().to_string()),
                ("COHORT_TLS_CA".to_string(), ca_cert.clone()),
            ]
        };
        let service_tls = |name: &str| -> anyhow::Result<Vec<(String, String)>> {
            let pair = ca.issue_service(name, &names, validity)?;
            let (cert, key) = crate::certs::write_pair(&self.pki, name, &pair)?;
            Ok(tls_env(cert, key))
        };
        let tls_of: Vec<(&str, Vec<(String, String)>)> =
            ["model-manager", "client-selector", "job-scheduler", "proxy"]
                .into_iter()
                .map(|n| service_tls(n).map(|env| (n, env)))
                .collect::<anyhow::Result<_>>()?;
        let coordinator_tls = {
            let pair = ca.issue_service("coordinator", &names, validity)?;
            let (cert, key) = crate::certs::write_pair(&self.pki, "coordinator", &pair)?;
            [
                (
                    "COHORT_COORDINATOR_TLS_CERT".to_string(),
                    cert.display().to_string(),
                ),
                (
                    "COHORT_COORDINATOR_TLS_KEY".to_string(),
                    key.display().to_string(),
                ),
            ]
        };
        let tls = |name: &str| {
            tls_of
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, env)| env.clone())
                .unwrap_or_default()
        };
        let db = |name: &str, service: &str| {
            let url = cfg
                .database_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", server.join(name).display()));
            let mut env = cfg.service_env.clone();
            env.push(("COHORT_DATABASE_URL".to_string(), url));
            env.extend(tls(service));
            env
        };
        let blobs = cfg
            .blob_url
            .clone()
            .unwrap_or_else(|| format!("file://{}", server.join("blobs").display()));
        let mut mm_env = db("models.db", "model-manager");
        mm_env.push(("COHORT_BLOB_URL".to_string(), blobs));
        let model_manager = self
            .spawn_named("model-manager", "model-manager", &[], mm_env)
            .await?;
        let client_selector = self
            .spawn_named(
                "client-selector",
                "client-selector",
                &[],
                db("clients.db", "client-selector"),
            )
            .await?;
        let work = server.join("work").display().to_string();
        let job_scheduler = self
            .spawn_named(
                "job-scheduler",
                "job-scheduler",
                &[
                    "--model-manager",
                    &model_manager,
                    "--client-selector",
                    &client_selector,
                    "--work-dir",
                    &work,
                ],
                {
                    let mut env = db("jobs.db", "job-scheduler");
                    env.push((
                        "COHORT_ADMIN_TOKEN_SHA256".to_string(),
                        self.admin_token.sha256(),
                    ));
                    // Coordinators have their own identity: model-manager lets them act only
                    // for their job's namespace.
                    env.extend(coordinator_tls.iter().cloned());
                    if let Some(dir) = &self.metrics_dir {
                        env.push((
                            "COHORT_COORDINATOR_METRICS_DIR".to_string(),
                            dir.display().to_string(),
                        ));
                    }
                    env
                },
            )
            .await?;
        // client-selector records revocations, and model-manager users' uploads,
        // in job-scheduler's audit log, and job-scheduler hands both addresses to
        // coordinators: each needs the other's, and each reports its own only once
        // bound (port 0, read back). So both start first and start again knowing
        // job-scheduler's, on their pinned ports, before the proxy or any party
        // can reach them.
        for name in ["client-selector", "model-manager"] {
            self.restart_with(name, &["--job-scheduler", &job_scheduler])
                .await?;
        }
        let proxy = self
            .spawn_named(
                "proxy",
                "proxy",
                &[
                    "--listen",
                    &cfg.proxy_listen,
                    "--job-scheduler",
                    &job_scheduler,
                    "--model-manager",
                    &model_manager,
                    "--client-selector",
                    &client_selector,
                    "--internal-tls",
                ],
                [cfg.service_env.clone(), tls("proxy")].concat(),
            )
            .await?;
        self.proxy = proxy.clone();
        let root = cfg.data_dir.join("parties");
        let parties = match cfg.party_data {
            PartyData::Synthetic => crate::data::write_synthetic_parties(&root, cfg.parties)?,
            PartyData::Digits { alpha, seed } => {
                crate::data::write_party_data(&root, cfg.parties, alpha, seed, DIGITS_CSV)?
            }
        };
        for p in &parties {
            let pair = ca.issue_party(&p.name, validity)?;
            let (cert, key) =
                crate::certs::write_pair(&self.pki, &format!("party-{}", p.name), &pair)?;
            let datasets = p.datasets_json.display().to_string();
            let workspace = p.dir.join("workspace").display().to_string();
            self.spawn_named(
                &format!("task-manager-{}", p.name),
                "task-manager",
                &[
                    "--party",
                    &p.name,
                    "--proxy",
                    &proxy,
                    "--datasets",
                    &datasets,
                    "--workspace",
                    &workspace,
                ],
                {
                    let mut env = tls_env(cert, key);
                    // Parties refuse cohorts smaller than two (their own update would be
                    // published as the global model); a one-party federation on one machine
                    // shares nothing with anyone, so its party takes them.
                    if cfg.parties == 1 {
                        env.push(("COHORT_MIN_COHORT".to_string(), "1".to_string()));
                    }
                    env.extend(cfg.party_env.iter().cloned());
                    for (name, extra) in &cfg.party_overrides {
                        if *name == p.name {
                            env.extend(extra.iter().cloned());
                        }
                    }
                    env
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Starts one service and waits for its ready file (its bound address).
    async fn spawn_named(
        &mut self,
        name: &str,
        binary: &str,
        args: &[&str],
        env: Vec<(String, String)>,
    ) -> anyhow::Result<String> {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if !args.iter().any(|a| a == "--listen") {
            args.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        if let Some(dir) = &self.metrics_dir {
            args.extend([
                "--metrics-listen".to_string(),
                "127.0.0.1:0".to_string(),
                "--metrics-target-file".to_string(),
                dir.join(format!("{name}.json")).display().to_string(),
            ]);
        }
        let (child, addr) = self
            .launch(name, binary, &args, &env, OnSlowStart::Kill)
            .await?;
        let addr = addr.with_context(|| format!("{name} did not report its address"))?;
        // Pin the port for restarts.
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = addr.clone();
        }
        self.services.push(Service {
            name: name.to_string(),
            binary: binary.to_string(),
            args,
            env,
            child,
            restarts: 0,
            restart_failed: false,
        });
        Ok(addr)
    }

    /// Starts `binary` and waits for its ready file: the address, or None when it still
    /// starts after 30 s and `slow` says to keep it.
    async fn launch(
        &mut self,
        name: &str,
        binary: &str,
        args: &[String],
        env: &[(String, String)],
        slow: OnSlowStart,
    ) -> anyhow::Result<(Child, Option<String>)> {
        let ready = self.data_dir.join("run").join(format!("{name}.addr"));
        let _ = std::fs::remove_file(&ready);
        let log_path = self.data_dir.join("logs").join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut cmd = Command::new(self.bin_dir.join(binary));
        // Each process is a service of its own in traces (named after its binary).
        cmd.env_remove("OTEL_SERVICE_NAME");
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .process_group(self.pgid.unwrap_or(0));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        if self.pgid.is_none() {
            self.pgid = child.id().map(|p| p as i32);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = std::fs::read_to_string(&ready)
                && !addr.trim().is_empty()
            {
                return Ok((child, Some(addr.trim().to_string())));
            }
            if let Ok(Some(status)) = child.try_wait() {
                let tail = tail_of(&log_path, 5);
                bail!(
                    "{name} exited ({status}) while starting; its log {} ends with:\n{tail}",
                    log_path.display()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                if slow == OnSlowStart::Keep {
                    return Ok((child, None));
                }
                let _ = child.kill().await;
                bail!(
                    "{name} did not become ready within 30s; see {}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` to one service (e.g. SIGKILL to simulate a crash).
    pub fn signal(&self, name: &str, signal: Signal) -> anyhow::Result<u32> {
        let s = self
            .services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name}"))?;
        let pid = s
            .child
            .id()
            .with_context(|| format!("{name} is not running"))?;
        cohort_runtime::process::signal_pid(pid, signal);
        Ok(pid)
    }

    /// Starts a service that ended again, with the same arguments and address. One that
    /// runs but is not ready within 30 s (waiting for its database, say) is kept running
    /// (it serves once ready) and the error says so.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self
            .services
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no service {name}"))?;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.services[i].child.wait()).await;
        let (binary, args, env) = (
            self.services[i].binary.clone(),
            self.services[i].args.clone(),
            self.services[i].env.clone(),
        );
        let (child, addr) = self
            .launch(name, &binary, &args, &env, OnSlowStart::Keep)
            .await?;
        self.services[i].child = child;
        if addr.is_none() {
            bail!(
                "{name} is not ready within 30s; it keeps starting (see {})",
                self.data_dir
                    .join("logs")
                    .join(format!("{name}.log"))
                    .display()
            );
        }
        Ok(())
    }

    /// Stops a service and starts it again with `extra` arguments added (same
    /// address).
    async fn restart_with(&mut self, name: &str, extra: &[&str]) -> anyhow::Result<()> {
        let s = self
            .services
            .iter_mut()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name}"))?;
        s.child
            .kill()
            .await
            .with_context(|| format!("cannot stop {name} to restart it"))?;
        s.args.extend(extra.iter().map(|a| a.to_string()));
        self.restart(name).await
    }

    /// Restarts services that exited on their own; returns those restarted, as
    /// "name (how it ended, restart n)". Every restart that fails is reported on stderr
    /// with its cause, each time: the next call tries again.
    pub async fn revive(&mut self) -> Vec<String> {
        let dead: Vec<(String, String, u32)> = self
            .services
            .iter_mut()
            .filter_map(|s| match s.child.try_wait() {
                Ok(Some(status)) => {
                    s.restarts += 1;
                    let how = if s.restart_failed {
                        "did not start".to_string()
                    } else {
                        status.to_string()
                    };
                    Some((s.name.clone(), how, s.restarts))
                }
                _ => None,
            })
            .collect();
        let mut restarted = Vec::new();
        for (name, how, n) in dead {
            let result = self.restart(&name).await;
            if let Some(s) = self.services.iter_mut().find(|s| s.name == name) {
                s.restart_failed = result.is_err();
            }
            match result {
                Ok(()) => restarted.push(format!("{name} ({how}, restart {n})")),
                Err(e) => eprintln!("warning: {name} ({how}): restart {n} failed: {e:#}"),
            }
        }
        restarted
    }

    /// Pids of the services (not their children), for tests and diagnostics.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.services
            .iter()
            .filter_map(|s| s.child.id().map(|p| (s.name.clone(), p)))
            .collect()
    }

    pub fn pgid(&self) -> Option<i32> {
        self.pgid
    }

    /// Stops parties first, then the server side; then anything left in the
    /// process group (coordinators, executors).
    pub async fn shutdown(&mut self) {
        while let Some(mut s) = self.services.pop() {
            cohort_runtime::process::terminate(&mut s.child, Duration::from_secs(5)).await;
        }
        if let Some(pgid) = self.pgid.take() {
            let group = Pid::from_raw(pgid);
            if killpg(group, Signal::SIGTERM).is_ok() {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                while tokio::time::Instant::now() < deadline && killpg(group, None).is_ok() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = killpg(group, Signal::SIGKILL);
            }
        }
    }
}

/// What `launch` does with a service that runs but is not ready in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnSlowStart {
    /// Kill it and fail (a first start: its address is needed).
    Kill,
    /// Keep it (a restart: its address is pinned already).
    Keep,
}

fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The admin token of this data directory: kept in a 0600 file so `up` can
/// be run again on the same data; job-scheduler only ever sees its hash.
fn load_or_create_token(path: &Path) -> anyhow::Result<ApiToken> {
    match std::fs::read_to_string(path) {
        Ok(text) => ApiToken::parse(&text).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = ApiToken::generate();
            cohort_security::write_key(path, token.expose())?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
