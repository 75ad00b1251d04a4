//! Launchers start and stop one coordinator per running job (DESIGN §1).
//!
//! `LocalLauncher` runs coordinators as child processes. Exits, expected or
//! not, are reported on a channel; job-scheduler decides what they mean.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cohort_core::JobId;
use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

use crate::RuntimeError;
use crate::process::{pid_alive, signal_pid, spawn_logged};

/// Where a coordinator finds the services it talks to.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub job_scheduler: String,
    pub model_manager: String,
    pub client_selector: String,
}

/// A coordinator process ended.
#[derive(Debug, Clone)]
pub struct CoordinatorExit {
    pub job_id: JobId,
    /// How it ended, for the job's event log ("exit status 1", "killed by SIGKILL").
    pub description: String,
}

#[async_trait]
pub trait Launcher: Send + Sync + 'static {
    /// Starts the job's coordinator with the job's (validated) spec as JSON, which the
    /// coordinator is given as a file (`--job-spec`). Returns its pid where there is one.
    async fn launch(&self, job_id: &JobId, spec_json: &str) -> Result<Option<u32>, RuntimeError>;
    /// Watches a coordinator started by an earlier run of job-scheduler.
    /// Returns false if it is already gone.
    async fn adopt(&self, job_id: &JobId, pid: Option<u32>) -> bool;
    /// Terminates the job's coordinator: SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, job_id: &JobId, grace: Duration);
    /// Stops every coordinator this launcher watches (on shutdown).
    async fn stop_all(&self, grace: Duration);
}

struct Running {
    pid: Option<u32>,
    /// Dropping or firing this ends the watcher; used to stop a child.
    stop: Option<oneshot::Sender<Duration>>,
}

/// Coordinators as child processes of job-scheduler.
pub struct LocalLauncher {
    binary: PathBuf,
    config: CoordinatorConfig,
    log_dir: PathBuf,
    extra_args: Vec<String>,
    running: Arc<Mutex<HashMap<JobId, Running>>>,
    exits: mpsc::UnboundedSender<CoordinatorExit>,
}

impl LocalLauncher {
    pub fn new(
        binary: PathBuf,
        config: CoordinatorConfig,
        log_dir: PathBuf,
        extra_args: Vec<String>,
        exits: mpsc::UnboundedSender<CoordinatorExit>,
    ) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&log_dir).map_err(|source| RuntimeError::WriteFile {
            path: log_dir.clone(),
            source,
        })?;
        Ok(Self {
            binary,
            config,
            log_dir,
            extra_args,
            running: Arc::default(),
            exits,
        })
    }

    fn forget(running: &Mutex<HashMap<JobId, Running>>, job_id: &JobId) {
        if let Ok(mut map) = running.lock() {
            map.remove(job_id);
        }
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            _ => "ended".to_string(),
        },
        Err(e) => format!("could not be waited on: {e}"),
    }
}

#[async_trait]
impl Launcher for LocalLauncher {
    async fn launch(&self, job_id: &JobId, spec_json: &str) -> Result<Option<u32>, RuntimeError> {
        // The spec holds no secrets; it sits beside the coordinator's log.
        let spec = self.log_dir.join(format!("coordinator-{job_id}.spec.json"));
        std::fs::write(&spec, spec_json).map_err(|source| RuntimeError::WriteFile {
            path: spec.clone(),
            source,
        })?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--job-spec")
            .arg(&spec)
            .arg("--job-id")
            .arg(job_id.as_str())
            .arg("--job-scheduler")
            .arg(&self.config.job_scheduler)
            .arg("--model-manager")
            .arg(&self.config.model_manager)
            .arg("--client-selector")
            .arg(&self.config.client_selector)
            .args(&self.extra_args);
        let log = self.log_dir.join(format!("coordinator-{job_id}.log"));
        let program = self.binary.display().to_string();
        let mut child = spawn_logged(cmd, &program, &log)?;
        let pid = child.id();
        let (stop_tx, mut stop_rx) = oneshot::channel::<Duration>();
        if let Ok(mut map) = self.running.lock() {
            map.insert(
                job_id.clone(),
                Running {
                    pid,
                    stop: Some(stop_tx),
                },
            );
        }
        let running = self.running.clone();
        let exits = self.exits.clone();
        let job = job_id.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                grace = &mut stop_rx => {
                    if let Ok(grace) = grace {
                        crate::process::terminate(&mut child, grace).await;
                    }
                    child.wait().await
                }
            };
            LocalLauncher::forget(&running, &job);
            let _ = exits.send(CoordinatorExit {
                job_id: job,
                description: describe(status),
            });
        });
        tracing::info!(job = %job_id, pid = ?pid, log = %log.display(), "coordinator launched");
        Ok(pid)
    }

    async fn adopt(&self, job_id: &JobId, pid: Option<u32>) -> bool {
        let Some(pid) = pid.filter(|p| pid_alive(*p)) else {
            return false;
        };
        let (stop_tx, mut stop_rx) = oneshot::channel::<Duration>();
        if let Ok(mut map) = self.running.lock() {
            map.insert(
                job_id.clone(),
                Running {
                    pid: Some(pid),
                    stop: Some(stop_tx),
                },
            );
        }
        let running = self.running.clone();
        let exits = self.exits.clone();
        let job = job_id.clone();
        // Not our child: poll for its end.
        tokio::spawn(async move {
            let mut stop_deadline: Option<tokio::time::Instant> = None;
            loop {
                if !pid_alive(pid) {
                    break;
                }
                if let Ok(grace) = stop_rx.try_recv() {
                    signal_pid(pid, Signal::SIGTERM);
                    stop_deadline = Some(tokio::time::Instant::now() + grace);
                }
                if stop_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    signal_pid(pid, Signal::SIGKILL);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            LocalLauncher::forget(&running, &job);
            let _ = exits.send(CoordinatorExit {
                job_id: job,
                description: "exited (adopted process)".to_string(),
            });
        });
        tracing::info!(job = %job_id, pid, "adopted running coordinator");
        true
    }

    async fn stop(&self, job_id: &JobId, grace: Duration) {
        let stop = self
            .running
            .lock()
            .ok()
            .and_then(|mut map| map.get_mut(job_id).and_then(|r| r.stop.take()));
        if let Some(stop) = stop {
            let _ = stop.send(grace);
        }
    }

    async fn stop_all(&self, grace: Duration) {
        let (jobs, pids): (Vec<JobId>, Vec<Option<u32>>) = self
            .running
            .lock()
            .map(|map| map.iter().map(|(j, r)| (j.clone(), r.pid)).unzip())
            .unwrap_or_default();
        for job in &jobs {
            self.stop(job, grace).await;
        }
        // Wait for them to go, bounded by the grace period plus a little.
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline && pids.iter().flatten().any(|p| pid_alive(*p))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
