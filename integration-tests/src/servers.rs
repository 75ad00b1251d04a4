//! Backing servers a test starts and controls itself: a private PostgreSQL
//! cluster (so a test can stop and restart it) and an S3-compatible server.
//! Binaries come from the test script (`COHORT_PG_BIN`, `COHORT_S3S_FS`);
//! without them a test skips, or fails under CI (`cohort_testkit`).
//!
//! Ports: s3s-fs binds port 0 and says which port it got. PostgreSQL cannot
//! (its port names its socket and lock files), so a cluster starts on a
//! port found free and, if another process took that port meanwhile, again
//! on a fresh one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// Whether a test that needs `var` should run: `cohort_testkit`'s one rule
/// (skipped where it is missing, a failure under CI).
pub use cohort_testkit::require_env;

/// How often a cluster start is tried, each time on a fresh port, when
/// another process took the port first.
const PG_START_ATTEMPTS: usize = 5;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// PostgreSQL refuses to run as root: run its tools as `postgres` then.
fn pg_command(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A PostgreSQL cluster of the test's own, stopped (immediately) on drop.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
}

impl PgCluster {
    /// None (test skipped) when PostgreSQL is not installed outside CI.
    pub fn start() -> Option<PgCluster> {
        let bin = PathBuf::from(require_env(
            "COHORT_PG_BIN",
            "PostgreSQL's bin directory; scripts/test.sh installs PostgreSQL",
        )?);
        Some(PgCluster::init(bin).expect("start a private PostgreSQL cluster"))
    }

    fn init(bin: PathBuf) -> anyhow::Result<PgCluster> {
        let dir = tempfile::Builder::new().prefix("cohort-pg-").tempdir()?;
        let password = format!("pw-{}", std::process::id());
        std::fs::write(dir.path().join("pwfile"), format!("{password}\n"))?;
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres"]).arg(dir.path());
                    c
                },
                "chown",
            )?;
        }
        let mut initdb = pg_command(&bin, "initdb");
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "cohort", "--auth=scram-sha-256"])
            .arg(format!("--pwfile={}", dir.path().join("pwfile").display()));
        run(initdb, "initdb")?;
        let mut cluster = PgCluster {
            bin,
            port: 0,
            dir,
            password,
        };
        for attempt in 1..=PG_START_ATTEMPTS {
            cluster.port = free_port()?;
            match cluster.start_on_port() {
                Ok(()) => return Ok(cluster),
                Err(e) if attempt < PG_START_ATTEMPTS && cluster.port_taken(&e) => {
                    eprintln!("PostgreSQL port {} was taken; another port", cluster.port)
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Starts the server again on its port (clients know it by that port).
    /// A port taken meanwhile is waited for a little: a probe for a free
    /// port holds one only for a moment.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.start_on_port() {
                Err(e) if self.port_taken(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                result => return result,
            }
        }
    }

    fn start_on_port(&self) -> anyhow::Result<()> {
        let log = self.dir.path().join("log");
        let seen = std::fs::metadata(&log).map_or(0, |m| m.len());
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.path().display()
            ))
            .arg("start");
        run(c, "pg_ctl start").map_err(|e| {
            let text = std::fs::read(&log).unwrap_or_default();
            let start = usize::try_from(seen).unwrap_or(0).min(text.len());
            e.context(format!(
                "PostgreSQL on port {}; its log: {}",
                self.port,
                String::from_utf8_lossy(&text[start..])
            ))
        })
    }

    /// Whether a failed start failed because another process holds the port.
    fn port_taken(&self, error: &anyhow::Error) -> bool {
        format!("{error:#}").contains("Address already in use")
            || std::net::TcpListener::bind(("127.0.0.1", self.port)).is_err()
    }

    /// Fast shutdown: clients are disconnected, as in an outage.
    pub fn stop_server(&self) -> anyhow::Result<()> {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        run(c, "pg_ctl stop")
    }

    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://cohort:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let mut c = pg_command(&self.bin, "createdb");
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "cohort",
            name,
        ])
        .env("PGPASSWORD", &self.password);
        run(c, "createdb")?;
        Ok(self.url(name))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = c.output();
    }
}

/// An S3-compatible server (s3s-fs) of the test's own, killed on drop.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// What s3s-fs serves: a directory per bucket.
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> Option<S3Server> {
        let bin = require_env(
            "COHORT_S3S_FS",
            "the s3s-fs binary, an S3-compatible server; scripts/test.sh installs it",
        )?;
        Some(S3Server::spawn(Path::new(&bin)).expect("start s3s-fs"))
    }

    /// Starts s3s-fs on port 0 and reads the port it got from its log line
    /// "server is running at http://ADDR".
    fn spawn(bin: &Path) -> anyhow::Result<S3Server> {
        let dir = tempfile::Builder::new().prefix("cohort-s3-").tempdir()?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root)?;
        let log_path = dir.path().join("s3s-fs.log");
        let log = std::fs::File::create(&log_path)?;
        let (access_key, secret_key) = (
            "cohort-it".to_string(),
            format!("secret-{}", std::process::id()),
        );
        let mut child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(&root)
            .env("RUST_LOG", "s3s_fs=info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn s3s-fs")?;
        const RUNNING_AT: &str = "server is running at http://";
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = text
                .split_once(RUNNING_AT)
                .and_then(|(_, rest)| rest.split_whitespace().next())
            {
                break addr.to_string();
            }
            let exited = child.try_wait()?;
            if exited.is_some() || std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "s3s-fs did not say where it listens ({}): {text}",
                    exited.map_or("30 s".to_string(), |s| s.to_string())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(S3Server {
            child,
            endpoint: format!("http://{addr}"),
            access_key,
            secret_key,
            root,
            _dir: dir,
        })
    }

    /// s3s-fs serves each top-level directory as a bucket.
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.root.join(name))?;
        Ok(())
    }

    /// Overwrites an object through the S3 API, as someone with write access to
    /// the bucket could.
    pub async fn overwrite(&self, bucket: &str, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
        let creds = aws_sdk_s3::config::Credentials::new(
            &self.access_key,
            &self.secret_key,
            None,
            None,
            "test",
        );
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(config)
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .context("overwrite object")?;
        Ok(())
    }

    /// Where s3s-fs keeps an object.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }

    /// Environment for processes that use this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("COHORT_S3_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
