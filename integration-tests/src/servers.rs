//! Backing servers a test starts and controls itself: a private PostgreSQL
//! cluster (so a test can stop and restart it) and an S3-compatible server.
//! Binaries come from the test script (`COHORT_PG_BIN`, `COHORT_S3S_FS`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// Whether a test that needs `var` should run. In CI a missing server is a
/// failure; elsewhere the test says it skipped.
pub fn require_env(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set: scripts/test.sh must provide {what} in CI")
        }
        _ => {
            eprintln!("skipped: {var} is not set (run scripts/test.sh to get {what})");
            None
        }
    }
}

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
        let bin = PathBuf::from(require_env("COHORT_PG_BIN", "PostgreSQL")?);
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
        let cluster = PgCluster {
            bin,
            port: free_port()?,
            dir,
            password,
        };
        cluster.start_server()?;
        Ok(cluster)
    }

    pub fn start_server(&self) -> anyhow::Result<()> {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "30", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.path().display()
            ))
            .arg("start");
        run(c, "pg_ctl start")
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
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> Option<S3Server> {
        let bin = require_env("COHORT_S3S_FS", "an S3-compatible server")?;
        Some(S3Server::spawn(Path::new(&bin)).expect("start s3s-fs"))
    }

    fn spawn(bin: &Path) -> anyhow::Result<S3Server> {
        let dir = tempfile::Builder::new().prefix("cohort-s3-").tempdir()?;
        let port = free_port()?;
        let (access_key, secret_key) = (
            "cohort-it".to_string(),
            format!("secret-{}", std::process::id()),
        );
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("spawn s3s-fs")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("s3s-fs did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
            _dir: dir,
        })
    }

    /// s3s-fs serves each top-level directory as a bucket.
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self._dir.path().join(name))?;
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
        self._dir.path().join(bucket).join(key)
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
