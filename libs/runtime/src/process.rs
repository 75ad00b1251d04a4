//! Child processes: spawning with logs to a file, graceful termination, liveness.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::RuntimeError;

/// Spawns `cmd` with stdout and stderr appended to `log` (created if missing).
/// The child is killed if the handle is dropped without being waited on.
pub fn spawn_logged(mut cmd: Command, program: &str, log: &Path) -> Result<Child, RuntimeError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| RuntimeError::WriteFile {
            path: log.to_path_buf(),
            source,
        })?;
    let err = file.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    cmd.spawn().map_err(|source| RuntimeError::Spawn {
        program: program.to_string(),
        source,
    })
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL. Returns once the child is reaped.
pub async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Whether a process with this pid exists (and is not a zombie we could see).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    if kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    // A zombie still answers kill(0); /proc says what state it is in.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends a signal to a pid, ignoring a process that is already gone.
pub fn signal_pid(pid: u32, signal: Signal) {
    if pid > 0 && pid <= i32::MAX as u32 {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
}

/// The directory of the running executable: sibling binaries live there.
pub fn sibling_binary(name: &str) -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| std::path::PathBuf::from(name))
}
