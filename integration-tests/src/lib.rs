//! Multi-process tests of the whole federation: real binaries talking gRPC
//! over loopback, with faults injected by signals.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the
//! project's test script does that. Every process a test starts belongs to a
//! process group that is killed when the test's handle drops.

pub mod adversary;
pub mod fake_kube;
pub mod resume;
pub mod secagg_adversary;
pub mod servers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use cohort_cli::stack::{PartyData, Stack, StackConfig};
use cohort_cli::{Api, AuthChannel};
use cohort_core::JobState;
use cohort_proto::v1 as pb;

/// target/debug (or whichever profile built this test).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test binary>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    assert!(
        dir.join("cohort").is_file() && dir.join("executor").is_file(),
        "binaries are missing in {}: run `cargo build --workspace --bins` first",
        dir.display()
    );
    dir
}

pub fn cohort_bin() -> PathBuf {
    bin_dir().join("cohort")
}

/// A federation started in-process from the real binaries, torn down on drop.
pub struct Federation {
    pub stack: Stack,
    pub dir: tempfile::TempDir,
}

/// Where a federation keeps its metadata and models (default: embedded).
#[derive(Default, Clone)]
pub struct Storage {
    pub database_url: Option<String>,
    pub blob_url: Option<String>,
    pub env: Vec<(String, String)>,
}

impl Federation {
    pub async fn start(parties: u32) -> anyhow::Result<Federation> {
        Federation::start_with(parties, Storage::default()).await
    }

    pub async fn start_with(parties: u32, storage: Storage) -> anyhow::Result<Federation> {
        let digits = PartyData::Digits {
            alpha: 0.5,
            seed: 42,
        };
        Federation::start_as(parties, storage, digits, Vec::new()).await
    }

    /// Parties holding Dirichlet(`alpha`) shards of the digits, split by `seed`.
    pub async fn digits_at(parties: u32, alpha: f64, seed: u64) -> anyhow::Result<Federation> {
        let digits = PartyData::Digits { alpha, seed };
        Federation::start_as(parties, Storage::default(), digits, Vec::new()).await
    }

    /// Parties that start a new executor process for every task, given a task file
    /// (`--executor-idle-secs 0`), instead of keeping one per job.
    pub async fn with_executor_per_task(parties: u32) -> anyhow::Result<Federation> {
        let digits = PartyData::Digits {
            alpha: 0.5,
            seed: 42,
        };
        let env = vec![("COHORT_EXECUTOR_IDLE_SECS".to_string(), "0".to_string())];
        Federation::start_as(parties, Storage::default(), digits, env).await
    }

    /// Parties holding only the synthetic dataset (`cohort bench round`'s workload).
    pub async fn synthetic(parties: u32) -> anyhow::Result<Federation> {
        Federation::start_as(
            parties,
            Storage::default(),
            PartyData::Synthetic,
            Vec::new(),
        )
        .await
    }

    /// Synthetic parties, every process (services, coordinators, parties, executors) given
    /// `env` too.
    pub async fn synthetic_with_env(
        parties: u32,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Federation> {
        let storage = Storage {
            env: env.clone(),
            ..Storage::default()
        };
        Federation::start_as(parties, storage, PartyData::Synthetic, env).await
    }

    async fn start_as(
        parties: u32,
        storage: Storage,
        party_data: PartyData,
        party_env: Vec<(String, String)>,
    ) -> anyhow::Result<Federation> {
        Federation::start_full(parties, storage, party_data, party_env, Vec::new()).await
    }

    /// Digits parties, one of which (`party`) runs its task-manager with
    /// `--adversary MODE`: it corrupts every update it sends.
    pub async fn with_adversary(
        parties: u32,
        party: &str,
        mode: &str,
    ) -> anyhow::Result<Federation> {
        Federation::with_adversary_at(parties, party, mode, 0.5).await
    }

    /// [`Federation::with_adversary`] over Dirichlet(`alpha`) shards of the digits.
    pub async fn with_adversary_at(
        parties: u32,
        party: &str,
        mode: &str,
        alpha: f64,
    ) -> anyhow::Result<Federation> {
        let digits = PartyData::Digits { alpha, seed: 42 };
        let overrides = vec![(
            party.to_string(),
            vec![("COHORT_ADVERSARY".to_string(), mode.to_string())],
        )];
        Federation::start_full(parties, Storage::default(), digits, Vec::new(), overrides).await
    }

    /// Digits parties, each named in `overrides` (`party-3`) started with that environment
    /// on top (e.g. `COHORT_CPUS`, `COHORT_ADVERSARY`).
    pub async fn with_party_env(
        parties: u32,
        overrides: Vec<(String, Vec<(String, String)>)>,
    ) -> anyhow::Result<Federation> {
        let digits = PartyData::Digits {
            alpha: 0.5,
            seed: 42,
        };
        Federation::start_full(parties, Storage::default(), digits, Vec::new(), overrides).await
    }

    /// Digits parties (Dirichlet(0.5), split 42) with extra environment: `service_env` for
    /// every service (coordinators take their tunables from job-scheduler's), `party_env`
    /// for every party and its executors, `party_overrides` for single parties after it.
    pub async fn digits_with_env(
        parties: u32,
        service_env: Vec<(String, String)>,
        party_env: Vec<(String, String)>,
        party_overrides: Vec<(String, Vec<(String, String)>)>,
    ) -> anyhow::Result<Federation> {
        let digits = PartyData::Digits {
            alpha: 0.5,
            seed: 42,
        };
        let storage = Storage {
            env: service_env,
            ..Storage::default()
        };
        Federation::start_full(parties, storage, digits, party_env, party_overrides).await
    }

    async fn start_full(
        parties: u32,
        storage: Storage,
        party_data: PartyData,
        party_env: Vec<(String, String)>,
        party_overrides: Vec<(String, Vec<(String, String)>)>,
    ) -> anyhow::Result<Federation> {
        let dir = tempfile::Builder::new().prefix("cohort-it-").tempdir()?;
        let stack = Stack::start(&StackConfig {
            bin_dir: Some(bin_dir()),
            data_dir: dir.path().to_path_buf(),
            parties,
            proxy_listen: "127.0.0.1:0".into(),
            proxy_names: Vec::new(),
            database_url: storage.database_url,
            blob_url: storage.blob_url,
            service_env: storage.env,
            party_data,
            party_env,
            party_overrides,
            // Every test federation serves metrics: the endpoints are exercised by all.
            metrics: true,
        })
        .await?;
        Ok(Federation { stack, dir })
    }

    /// The public API through the proxy, as the federation's admin (TLS + token).
    pub fn api(&self) -> Api {
        Api::from_profile(&self.stack.profile()).expect("the stack's profile")
    }

    pub fn jobs(&self) -> pb::jobs_client::JobsClient<AuthChannel> {
        self.api().jobs()
    }

    pub fn models(&self) -> pb::models_client::ModelsClient<AuthChannel> {
        self.api().models()
    }

    pub async fn create_job(&self, spec: &str) -> anyhow::Result<pb::Job> {
        Ok(self
            .jobs()
            .create_job(pb::CreateJobRequest {
                spec: spec.to_string(),
            })
            .await?
            .into_inner())
    }

    pub async fn get_job(&self, id: &str) -> anyhow::Result<pb::Job> {
        Ok(self
            .jobs()
            .get_job(pb::GetJobRequest { id: id.to_string() })
            .await?
            .into_inner())
    }

    /// Polls until `pred` holds for the job (tolerating a restarting scheduler).
    pub async fn wait_job(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&pb::Job) -> bool,
    ) -> anyhow::Result<pb::Job> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        loop {
            match self.get_job(id).await {
                Ok(j) if pred(&j) => return Ok(j),
                Ok(j) => {
                    if state_of(&j).is_terminal() && !pred(&j) {
                        bail!(
                            "job {id} ended {} ({}) while waiting for {what}",
                            state_of(&j),
                            j.reason
                        );
                    }
                    last = Some(j)
                }
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out waiting for {what}; last seen: {:?}",
                    last.map(|j| (state_of(&j), j.rounds_completed, j.reason))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Version `version` of the job's model, downloaded through the proxy.
    pub async fn model_version(
        &self,
        job: &pb::Job,
        version: u32,
    ) -> anyhow::Result<Vec<cohort_core::NamedTensor>> {
        self.api().job_model(job, version).await
    }

    /// Waits for the job to reach a final state.
    pub async fn wait_end(&self, id: &str, timeout: Duration) -> anyhow::Result<pb::Job> {
        self.wait_job(id, timeout, "the job to end", |j| state_of(j).is_terminal())
            .await
    }

    pub async fn events(&self, id: &str) -> anyhow::Result<Vec<pb::JobEvent>> {
        Ok(self
            .jobs()
            .list_job_events(pb::ListJobEventsRequest {
                id: id.to_string(),
                after_seq: 0,
            })
            .await?
            .into_inner()
            .events)
    }
}

impl Federation {
    /// Accuracy of the job's last model on the held-out digits samples no party trains
    /// on, measured here: what a forged evaluation cannot move.
    /// Creates the job `spec`, waits (at most 4 minutes) for its end, asserts it SUCCEEDED
    /// (`what` names it in the failure) and returns it with its held-out accuracy.
    pub async fn run_to_success(&self, what: &str, spec: &str) -> (pb::Job, f64) {
        let created = self
            .create_job(spec)
            .await
            .unwrap_or_else(|e| panic!("{what}: create: {e}"));
        let done = self
            .wait_end(&created.id, Duration::from_secs(240))
            .await
            .unwrap_or_else(|e| panic!("{what}: the job does not end: {e}"));
        assert_eq!(
            state_of(&done),
            JobState::Succeeded,
            "{what}: {}",
            done.reason
        );
        let accuracy = self
            .heldout_accuracy(&done)
            .await
            .unwrap_or_else(|e| panic!("{what}: held-out accuracy: {e}"));
        (done, accuracy)
    }

    pub async fn heldout_accuracy(&self, job: &pb::Job) -> anyhow::Result<f64> {
        let spec = cohort_core::JobSpec::from_json(&job.spec_json)?;
        // Version 0: the latest.
        let weights = self.api().job_model(job, 0).await?;
        let path = self.dir.path().join("heldout-digits.csv");
        std::fs::write(&path, cohort_cli::data::DIGITS_CSV)?;
        let all = cohort_train::load_dataset(
            &path,
            cohort_train::DataFormat::Csv,
            None,
            Some(1.0 / 16.0),
        )?;
        // The split `cohort up` deals from (seed 42): its test part is never trained on.
        let (_, test_idx) =
            cohort_train::split_train_test(&all.labels, cohort_cli::data::TEST_FRACTION, 42);
        let test = all.subset(&test_idx);
        Ok(cohort_train::evaluate(&spec.model, &weights, &test)?.accuracy)
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        // Stop everything even if the test failed half-way: kill the group.
        if let Some(pgid) = self.stack.pgid() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The job's state as a domain value (QUEUED for an unknown wire value).
pub fn state_of(j: &pb::Job) -> JobState {
    let name = pb::JobState::try_from(j.state)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_string())
        .unwrap_or_default();
    name.parse().unwrap_or(JobState::Queued)
}

/// A small, fast job on the bundled digits data.
pub fn digits_job(
    name: &str,
    rounds: u32,
    per_round: u32,
    min: u32,
    round_timeout: &str,
) -> String {
    format!(
        "name: {name}\n\
         model: {{arch: mlp, hidden: [32]}}\n\
         data: {{dataset: digits}}\n\
         training: {{epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.1}}}}\n\
         rounds: {rounds}\n\
         clients: {{per_round: {per_round}, min: {min}, round_timeout: {round_timeout}}}\n"
    )
}

/// A digits mlp (64 features, 10 classes) with these hidden widths, as safetensors; the
/// weights differ with `seed`.
pub fn digits_mlp(hidden: &[u32], seed: u64) -> Vec<u8> {
    let model = cohort_core::spec::ModelSpec {
        arch: cohort_core::spec::Arch::Mlp,
        hidden: hidden.to_vec(),
        init: None,
        name: None,
        params: None,
        layers: None,
    };
    let weights = cohort_train::init_model(&model, 64, 10, seed).expect("weights");
    cohort_fl::to_safetensors(&weights).expect("safetensors")
}

/// Uploads `bytes` as a new version of `name` in the namespace `api`'s token belongs to.
pub async fn upload_model(
    api: &Api,
    name: &str,
    bytes: Vec<u8>,
) -> Result<pb::ModelVersion, tonic::Status> {
    let parts = vec![
        pb::UploadVersionRequest {
            part: Some(pb::upload_version_request::Part::Header(pb::UploadHeader {
                name: name.to_string(),
                ..Default::default()
            })),
        },
        pb::UploadVersionRequest {
            part: Some(pb::upload_version_request::Part::Data(bytes.into())),
        },
    ];
    api.models()
        .upload_version(futures::stream::iter(parts))
        .await
        .map(|r| r.into_inner())
}

/// The job's model versions: exactly one per round 1..=`rounds`, each the child of the one
/// before (no round stored twice, none missing, the lineage unbroken).
pub async fn assert_one_version_per_round(api: &Api, job: &pb::Job, rounds: u32) {
    let versions = api
        .models()
        .list_versions(pb::ListVersionsRequest {
            name: job.model_name.clone(),
            job_id: job.id.clone(),
            namespace: job.namespace.clone(),
        })
        .await
        .expect("versions")
        .into_inner()
        .versions;
    let lineage: Vec<(u32, u32, u32)> = versions
        .iter()
        .map(|v| {
            let l = v.lineage.clone().unwrap_or_default();
            (v.version, l.round, l.parent_version)
        })
        .collect();
    let expected: Vec<(u32, u32, u32)> = (1..=rounds).map(|r| (r, r, r - 1)).collect();
    assert_eq!(lineage, expected, "versions as (version, round, parent)");
}

/// A federation of `parties` whose services keep their metadata in a private PostgreSQL
/// cluster the test may stop and start; None (the test skips) where PostgreSQL is missing.
pub async fn on_postgres(parties: u32) -> Option<(servers::PgCluster, Federation)> {
    let pg = servers::PgCluster::start()?;
    let url = pg.create_database("cohort").expect("database");
    let fed = Federation::start_with(
        parties,
        Storage {
            database_url: Some(url),
            ..Storage::default()
        },
    )
    .await
    .expect("federation on PostgreSQL");
    Some((pg, fed))
}

/// Every process on the machine: (pid, ppid, pgid, comm).
pub fn processes() -> Vec<(u32, u32, i32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if rest.len() < 4 || rest[0] == "Z" {
            continue;
        }
        let (Ok(ppid), Ok(pgid)) = (rest[1].parse(), rest[2].parse()) else {
            continue;
        };
        out.push((pid, ppid, pgid, comm));
    }
    out
}

/// Processes in any of these process groups.
pub fn in_groups(groups: &[i32]) -> Vec<(u32, String)> {
    processes()
        .into_iter()
        .filter(|(_, _, g, _)| groups.contains(g))
        .map(|(p, _, _, c)| (p, c))
        .collect()
}

/// Runs the `cohort` CLI, returning (exit code, stdout, stderr).
pub async fn cohort(args: &[&str], profile: &Path) -> anyhow::Result<(i32, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(cohort_bin())
            .arg("--profile")
            .arg(profile)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("cohort CLI timed out")??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Process groups of `root`'s descendants (not `root`'s own).
pub fn descendant_groups(root: u32) -> Vec<i32> {
    let mut groups: Vec<i32> = descendants(root).into_iter().map(|(_, g, _)| g).collect();
    groups.sort();
    groups.dedup();
    groups
}

/// Every file below `dir` (recursively); empty when it cannot be read.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Polls the federation's parties until `pred` holds; panics after `timeout`.
pub async fn wait_clients(
    api: &Api,
    timeout: Duration,
    pred: impl Fn(&[pb::ClientInfo]) -> bool,
) -> Vec<pb::ClientInfo> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let clients = api
            .selector()
            .list_clients(pb::ListClientsRequest {})
            .await
            .map(|r| r.into_inner().clients)
            .unwrap_or_default();
        if pred(&clients) {
            return clients;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "parties never reached the expected state: {clients:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pids of the running coordinators of `job_id` (their command line names the job).
pub fn coordinator_pids(job_id: &str) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|(_, _, _, comm)| comm == "coordinator")
        .filter(|(pid, _, _, _)| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .map(|c| c.contains(job_id))
                .unwrap_or(false)
        })
        .map(|(pid, _, _, _)| pid)
        .collect()
}

/// One row of `/proc/<pid>/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    /// The kernel's TCP state: 0x01 ESTABLISHED, 0x0A LISTEN, ...
    pub state: u8,
    pub inode: u64,
}

pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0A;

/// The TCP sockets of the network namespace `pid` is in (IPv4 and IPv6); empty when the
/// process is gone.
pub fn tcp_sockets(pid: u32) -> Vec<TcpSocket> {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        out.extend(text.lines().skip(1).filter_map(parse_tcp_row));
    }
    out
}

/// `sl local_address rem_address st ... inode ...`: addresses as hex words in host byte order.
fn parse_tcp_row(line: &str) -> Option<TcpSocket> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    let addr = |col: &str| -> Option<std::net::SocketAddr> {
        let (ip, port) = col.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let words: Vec<u32> = (0..ip.len() / 8)
            .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
            .collect::<Option<_>>()?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let ip: std::net::IpAddr = match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
            16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
            _ => return None,
        };
        Some(std::net::SocketAddr::new(ip, port))
    };
    Some(TcpSocket {
        local: addr(cols.get(1)?)?,
        remote: addr(cols.get(2)?)?,
        state: u8::from_str_radix(cols.get(3)?, 16).ok()?,
        inode: cols.get(9)?.parse().ok()?,
    })
}

/// Inodes of the sockets `pid` holds open; None when its descriptors cannot be read (it
/// ended, or is not ours).
pub fn socket_inodes(pid: u32) -> Option<std::collections::BTreeSet<u64>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        dir.flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect(),
    )
}

/// The TCP addresses `pid` listens on; None when its descriptors cannot be read.
pub fn listening_addresses(pid: u32) -> Option<Vec<std::net::SocketAddr>> {
    let mine = socket_inodes(pid)?;
    let listening = tcp_sockets(pid)
        .into_iter()
        .filter(|s| s.state == TCP_LISTEN && mine.contains(&s.inode))
        .map(|s| s.local)
        .collect();
    // The process may have ended between the two reads: then its answer is unknown.
    socket_inodes(pid).map(|_| listening)
}

/// Every file below `dir` whose name ends with `.log`.
pub fn log_files_under(dir: &Path) -> Vec<String> {
    files_under(dir)
        .into_iter()
        .filter(|f| f.ends_with(".log"))
        .collect()
}

/// `root`'s descendants now, not `root` itself: (pid, process group, comm).
pub fn descendants(root: u32) -> Vec<(u32, i32, String)> {
    let procs = processes();
    let mut tree = std::collections::BTreeSet::from([root]);
    let mut grew = true;
    while grew {
        grew = false;
        for (pid, ppid, _, _) in &procs {
            if tree.contains(ppid) && tree.insert(*pid) {
                grew = true;
            }
        }
    }
    procs
        .into_iter()
        .filter(|(pid, _, _, _)| *pid != root && tree.contains(pid))
        .map(|(pid, _, group, comm)| (pid, group, comm))
        .collect()
}

/// GET over HTTP/1.1; the body of a 200 answer, None otherwise (or on no answer in 10 s).
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    let exchange = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        Some(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()??;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // Small bodies come whole; a chunked one is unchunked here.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(unchunk(body));
    }
    Some(body.to_string())
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
