//! `training.runtime: command`: the party's own program trains or evaluates, under a
//! contract of files and environment variables (README, "Bring your own training code";
//! `python/cohort_client` reads and writes it):
//!
//! | variable | what |
//! |---|---|
//! | `COHORT_TASK_KIND` | `train` or `evaluate` |
//! | `COHORT_INPUT_MODEL` | the global model, safetensors (f32) |
//! | `COHORT_OUTPUT_MODEL` | train: where to write the trained model (same tensors, f32) |
//! | `COHORT_OUTPUT_METRICS` | where to write `{"samples", "loss", "accuracy"}` (JSON) |
//! | `COHORT_DATASET` | the party's dataset entry, JSON (`datasets.json`'s, paths absolute) |
//! | `COHORT_HYPERPARAMETERS` | the task's settings, JSON (epochs, batch size, device, optimizer, seed, round, model) |
//! | `COHORT_SCRATCH_DIR` | a directory of the task's own, removed after it (also `TMPDIR`) |
//!
//! The command runs only when the party's allow-list has it (checked again here, after
//! task-manager), in a process group of its own with no other environment than these and a
//! few of the executor's (`PATH`, `HOME`, locale, Python's and CUDA's); its output lines go
//! to the executor's log. At the task's deadline (less a fifth of the time left, at most
//! 5 s, to send the result) the whole group is killed; after it exits too (nothing it
//! started outlives the task). What it wrote is checked before anything is
//! sent: the model's tensors must be the global model's, finite; metrics bounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use cohort_core::spec::AllowedCommands;
use cohort_core::{JobSpec, NamedTensor};
use cohort_proto::v1 as pb;
use tokio::io::AsyncReadExt;

/// The executor's environment variables a command sees (the rest is not passed on).
const PASSED_ON: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
];

/// Longest metrics file read.
const MAX_METRICS_BYTES: u64 = 64 * 1024;
/// Longest output line logged (longer ones are cut).
const MAX_LINE_CHARS: usize = 2000;
/// The last stderr lines kept for the failure reason.
const TAIL_LINES: usize = 3;
/// Most of the task's time kept back from the command for sending its result.
const REPORT_MARGIN: Duration = Duration::from_secs(5);
/// Most samples a command may claim (the coordinator also caps them at what was registered).
const MAX_SAMPLES: u64 = 1 << 40;

/// What the command reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Metrics {
    pub samples: u64,
    pub loss: f64,
    pub accuracy: f64,
}

impl Metrics {
    pub(crate) fn to_pb(self) -> pb::Metrics {
        pb::Metrics {
            loss: self.loss,
            accuracy: self.accuracy,
            samples: self.samples,
        }
    }
}

/// A task for the command: what it reads and where it writes.
pub(crate) struct CommandTask<'a> {
    pub spec: &'a JobSpec,
    pub task: &'a pb::Task,
    pub data: &'a pb::LocalDataset,
    pub kind: pb::TaskKind,
    /// The scratch directory goes under it (the job's state directory, or the system's
    /// temporary directory when empty).
    pub state_dir: &'a str,
}

/// Runs the job's command on `global` for a training task: the trained weights (the
/// global model's tensors, finite) and the metrics it reported.
pub(crate) async fn train(
    allowed: &AllowedCommands,
    task: &CommandTask<'_>,
    global: &[NamedTensor],
) -> anyhow::Result<(Vec<NamedTensor>, Metrics)> {
    let scratch = run(allowed, task, global).await?;
    let weights = read_model(&scratch.output_model(), global)?;
    let metrics = read_metrics(&scratch.metrics(), false)?;
    Ok((weights, metrics))
}

/// Runs the job's command on `global` for an evaluation task: the metrics it reported.
pub(crate) async fn evaluate(
    allowed: &AllowedCommands,
    task: &CommandTask<'_>,
    global: &[NamedTensor],
) -> anyhow::Result<Metrics> {
    let scratch = run(allowed, task, global).await?;
    read_metrics(&scratch.metrics(), true)
}

/// The task's scratch directory (removed when dropped).
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn input_model(&self) -> PathBuf {
        self.path().join("input.safetensors")
    }
    fn output_model(&self) -> PathBuf {
        self.path().join("output.safetensors")
    }
    fn metrics(&self) -> PathBuf {
        self.path().join("metrics.json")
    }
}

async fn run(
    allowed: &AllowedCommands,
    t: &CommandTask<'_>,
    global: &[NamedTensor],
) -> anyhow::Result<Scratch> {
    let argv = t
        .spec
        .training
        .command
        .as_deref()
        .context("training.command: missing (runtime \"command\" needs it)")?;
    // Defence in depth: task-manager refused the offer already if this party does not run it.
    if let Some(reason) = allowed.refusal(argv) {
        bail!("{reason}");
    }
    let kind = match t.kind {
        pb::TaskKind::Train => "train",
        pb::TaskKind::Evaluate => "evaluate",
        pb::TaskKind::Unspecified => {
            bail!("task file: task.kind {} is not a task kind", t.task.kind)
        }
    };
    let remaining = time_left(t.task.deadline_ms)?;
    let base = if t.state_dir.is_empty() {
        std::env::temp_dir()
    } else {
        PathBuf::from(t.state_dir)
    };
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let scratch = Scratch(
        tempfile::Builder::new()
            .prefix("command-")
            .tempdir_in(&base)
            .with_context(|| format!("cannot make a scratch directory in {}", base.display()))?,
    );
    let input = cohort_fl::to_safetensors(global).context("the global model as safetensors")?;
    std::fs::write(scratch.input_model(), input)
        .with_context(|| format!("cannot write {}", scratch.input_model().display()))?;

    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(
            PASSED_ON
                .iter()
                .filter_map(|k| Some((*k, std::env::var_os(k)?))),
        )
        .env("COHORT_TASK_KIND", kind)
        .env("COHORT_INPUT_MODEL", scratch.input_model())
        .env("COHORT_OUTPUT_METRICS", scratch.metrics())
        .env("COHORT_DATASET", dataset_json(t.task, t.data))
        .env(
            "COHORT_HYPERPARAMETERS",
            hyperparameters_json(t.spec, t.task),
        )
        .env("COHORT_SCRATCH_DIR", scratch.path())
        .env("TMPDIR", scratch.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that what it starts is killed with it.
        .process_group(0)
        .kill_on_drop(true);
    if t.kind == pb::TaskKind::Train {
        cmd.env("COHORT_OUTPUT_MODEL", scratch.output_model());
    }
    die_with_the_executor(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("training.command: cannot start {:?}", argv[0]))?;
    let group = ProcessGroup(child.id());
    tracing::info!(task = %t.task.task_id, pid = ?child.id(), program = %argv[0], kind, "command started");
    let stdout = child
        .stdout
        .take()
        .map(|s| forward(s, "stdout", t.task.task_id.clone()));
    let stderr = child
        .stderr
        .take()
        .map(|s| forward(s, "stderr", t.task.task_id.clone()));
    let waited = tokio::time::timeout(remaining, child.wait()).await;
    // Whatever it left running goes with it.
    group.kill();
    let status = match waited {
        Ok(status) => status.context("training.command: cannot wait for it")?,
        Err(_) => {
            let _ = child.kill().await;
            bail!(
                "training.command ran past the task's deadline ({:.1} s given, the rest kept \
                 for sending the result) and was killed",
                remaining.as_secs_f64()
            );
        }
    };
    let _ = match stdout {
        Some(h) => h.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let tail = match stderr {
        Some(h) => h.await.unwrap_or_default(),
        None => Vec::new(),
    };
    if !status.success() {
        let how = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => "failed".to_string(),
        };
        let last = if tail.is_empty() {
            String::new()
        } else {
            format!("; its last output on stderr: {}", tail.join(" | "))
        };
        bail!("training.command {how}{last}");
    }
    Ok(scratch)
}

/// How long the command may run: until the task's deadline, less the time to send its
/// result and have its failure heard while the round still waits (a fifth of what is left,
/// at most `REPORT_MARGIN`). No deadline given: a day, the longest round.
fn time_left(deadline_ms: i64) -> anyhow::Result<Duration> {
    if deadline_ms <= 0 {
        return Ok(Duration::from_secs(86_400));
    }
    let left = deadline_ms.saturating_sub(cohort_runtime::now_ms());
    if left <= 0 {
        bail!("the task's deadline passed before training.command could start");
    }
    let left = Duration::from_millis(left.unsigned_abs());
    Ok(left - (left / 5).min(REPORT_MARGIN))
}

/// The command's process group, killed whole.
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    fn kill(&self) {
        let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        // ESRCH (nothing left in the group) is the usual answer.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Drop for ProcessGroup {
    /// A task dropped half-way (its executor stopping) still takes the command with it.
    fn drop(&mut self) {
        self.kill();
    }
}

/// The command's first process is killed when the executor's thread that started it dies
/// (an executor killed by its task-manager), so it cannot run on unwatched.
#[allow(unsafe_code)]
fn die_with_the_executor(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl(2) is async-signal-safe; nothing is allocated between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

/// Logs a stream's lines as they come (cut to `MAX_LINE_CHARS`), returning the last few.
fn forward(
    mut stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    name: &'static str,
    task: String,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut tail: std::collections::VecDeque<String> = Default::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 8192];
        let emit = |bytes: &[u8], tail: &mut std::collections::VecDeque<String>| {
            let text = String::from_utf8_lossy(bytes);
            let line: String = crate::one_line(text.trim_end())
                .chars()
                .take(MAX_LINE_CHARS)
                .collect();
            tracing::info!(task = %task, stream = name, "command: {line}");
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            if !line.trim().is_empty() {
                tail.push_back(line.chars().take(300).collect());
            }
        };
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                emit(&line, &mut tail);
            }
            if pending.len() > MAX_LINE_CHARS * 4 {
                emit(&pending, &mut tail);
                pending.clear();
            }
        }
        if !pending.is_empty() {
            emit(&pending, &mut tail);
        }
        tail.into_iter().collect()
    })
}

/// The dataset entry as the command sees it: `datasets.json`'s fields (absent ones empty).
fn dataset_json(task: &pb::Task, data: &pb::LocalDataset) -> String {
    serde_json::json!({
        "name": task.dataset,
        "format": data.format,
        "path": data.path,
        "labels": data.labels_path,
        "eval_path": data.eval_path,
        "eval_labels": data.eval_labels_path,
        "scale": if data.scale > 0.0 { Some(data.scale) } else { None },
    })
    .to_string()
}

/// The task's settings: the job's training settings, the model, the seed and round.
fn hyperparameters_json(spec: &JobSpec, task: &pb::Task) -> String {
    serde_json::json!({
        "epochs": spec.training.epochs,
        "batch_size": spec.training.batch_size,
        "device": spec.training.device.as_str(),
        "optimizer": spec.training.optimizer,
        "proximal_mu": spec.aggregation.proximal_mu(),
        "model": spec.model,
        "seed": task.seed,
        "round": task.round,
        "task_id": task.task_id,
        "job_id": task.job_id,
    })
    .to_string()
}

/// The trained model at `path`: exactly the global model's tensors (names, shapes, f32),
/// every value finite. Errors name the tensor, and the file by its variable (the same words
/// on every party, so that the coordinator sees the tasks failed the same way).
fn read_model(path: &Path, global: &[NamedTensor]) -> anyhow::Result<Vec<NamedTensor>> {
    let expected: u64 = global.iter().map(|t| t.data.len() as u64 * 4).sum();
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("training.command wrote no model at COHORT_OUTPUT_MODEL")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    // The header names every tensor; a file far beyond the model's size is not it.
    if size > expected + (1 << 20) {
        bail!(
            "training.command's model (COHORT_OUTPUT_MODEL) is {size} bytes, far more than the model's {expected}",
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut weights = cohort_fl::from_safetensors(&bytes)
        .context("training.command's model (COHORT_OUTPUT_MODEL) is not valid safetensors")?;
    for g in global {
        let Some(w) = weights.iter().find(|w| w.name == g.name) else {
            bail!(
                "training.command's model (COHORT_OUTPUT_MODEL) lacks tensor {:?}",
                g.name
            );
        };
        if w.shape != g.shape {
            bail!(
                "training.command's model (COHORT_OUTPUT_MODEL): tensor {:?} has shape {:?}, the model's is {:?}",
                g.name,
                w.shape,
                g.shape
            );
        }
        if let Some(bad) = w.data.iter().find(|v| !v.is_finite()) {
            let what = if bad.is_nan() {
                "NaN"
            } else {
                "an infinite value"
            };
            bail!(
                "training.command's model (COHORT_OUTPUT_MODEL): tensor {:?} holds {what}",
                g.name
            );
        }
    }
    if let Some(extra) = weights
        .iter()
        .find(|w| !global.iter().any(|g| g.name == w.name))
    {
        bail!(
            "training.command's model (COHORT_OUTPUT_MODEL) has tensor {:?}, which the model does not",
            extra.name
        );
    }
    // In the global model's order.
    weights.sort_by_key(|w| global.iter().position(|g| g.name == w.name));
    Ok(weights)
}

/// The metrics at `path`: `samples` (1..2^40), `loss` (finite, ≥ 0), `accuracy` (in
/// [0, 1]); a training task's may leave out loss and accuracy (0), an evaluation's not.
fn read_metrics(path: &Path, evaluation: bool) -> anyhow::Result<Metrics> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("training.command wrote no metrics at COHORT_OUTPUT_METRICS")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_METRICS_BYTES + 1),
        &mut text,
    )
    .with_context(|| format!("cannot read {}", path.display()))?;
    let bad =
        |m: String| anyhow::anyhow!("training.command's metrics (COHORT_OUTPUT_METRICS): {m}");
    if text.len() as u64 > MAX_METRICS_BYTES {
        return Err(bad(format!("longer than {MAX_METRICS_BYTES} bytes")));
    }
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| bad("expected an object {\"samples\", \"loss\", \"accuracy\"}".into()))?;
    let samples = match object.get("samples").and_then(serde_json::Value::as_u64) {
        Some(n) if (1..=MAX_SAMPLES).contains(&n) => n,
        _ => {
            return Err(bad(format!(
                "\"samples\" must be a whole number from 1 to {MAX_SAMPLES}, got {}",
                object
                    .get("samples")
                    .map_or("nothing".into(), |v| v.to_string())
            )));
        }
    };
    let number = |field: &str| -> anyhow::Result<f64> {
        match object.get(field) {
            None if !evaluation => Ok(0.0),
            None => Err(bad(format!("\"{field}\" is missing"))),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(format!("\"{field}\" must be a number, got {v}"))),
        }
    };
    let loss = number("loss")?;
    if !(loss.is_finite() && loss >= 0.0) {
        return Err(bad(format!(
            "\"loss\" must be finite and at least 0, got {loss}"
        )));
    }
    let accuracy = number("accuracy")?;
    if !(0.0..=1.0).contains(&accuracy) {
        return Err(bad(format!(
            "\"accuracy\" must be in [0, 1], got {accuracy}"
        )));
    }
    Ok(Metrics {
        samples,
        loss,
        accuracy,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: Vec<usize>, data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape,
            data,
        }
    }

    #[test]
    fn the_output_model_must_be_the_global_models_tensors_finite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let global = vec![
            tensor("fc0.bias", vec![2], vec![0.0; 2]),
            tensor("fc0.weight", vec![2, 3], vec![0.0; 6]),
        ];
        let write = |tensors: &[NamedTensor]| {
            std::fs::write(&path, cohort_fl::to_safetensors(tensors).unwrap()).unwrap()
        };
        let err = |global: &[NamedTensor]| format!("{:#}", read_model(&path, global).unwrap_err());
        assert!(err(&global).contains("wrote no model"), "{}", err(&global));
        let mut trained = global.clone();
        trained[1].data[4] = 1.5;
        write(&trained);
        assert_eq!(read_model(&path, &global).unwrap(), trained);
        trained[1].data[2] = f32::NAN;
        write(&trained);
        assert!(
            err(&global).contains("tensor \"fc0.weight\" holds NaN"),
            "{}",
            err(&global)
        );
        trained[1].data[2] = f32::INFINITY;
        write(&trained);
        assert!(err(&global).contains("infinite"), "{}", err(&global));
        write(&[global[1].clone()]);
        assert!(
            err(&global).contains("lacks tensor \"fc0.bias\""),
            "{}",
            err(&global)
        );
        write(&[
            global[0].clone(),
            tensor("fc0.weight", vec![3, 2], vec![0.0; 6]),
        ]);
        assert!(err(&global).contains("shape [3, 2]"), "{}", err(&global));
        let mut extra = global.clone();
        extra.push(tensor("fc9.bias", vec![1], vec![0.0]));
        write(&extra);
        assert!(err(&global).contains("\"fc9.bias\""), "{}", err(&global));
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(
            err(&global).contains("not valid safetensors"),
            "{}",
            err(&global)
        );
    }

    fn job(argv: &[&str]) -> JobSpec {
        let words: Vec<String> = argv.iter().map(|w| format!("{w:?}")).collect();
        JobSpec::parse(&format!(
            "name: c\nmodel: {{arch: logreg}}\ndata: {{dataset: digits}}\n\
             training: {{runtime: command, command: [{}]}}\nclients: {{per_round: 2, min: 2}}\n",
            words.join(", ")
        ))
        .unwrap()
    }

    /// Runs `argv` as an evaluation task due in `deadline`, under an allow-list of `sh`.
    async fn evaluate_with(
        argv: &[&str],
        deadline: Duration,
        state_dir: &Path,
    ) -> anyhow::Result<Metrics> {
        let spec = job(argv);
        let task = pb::Task {
            task_id: "t1".into(),
            kind: pb::TaskKind::Evaluate as i32,
            deadline_ms: cohort_runtime::now_ms() + deadline.as_millis() as i64,
            ..Default::default()
        };
        let data = pb::LocalDataset::default();
        let t = CommandTask {
            spec: &spec,
            task: &task,
            data: &data,
            kind: pb::TaskKind::Evaluate,
            state_dir: &state_dir.display().to_string(),
        };
        let allowed = AllowedCommands::parse(r#"[["sh", "-c"]]"#).unwrap();
        let global = vec![tensor("fc0.bias", vec![2], vec![0.0; 2])];
        evaluate(&allowed, &t, &global).await
    }

    fn gone(pid: &str) -> bool {
        !Path::new(&format!("/proc/{}", pid.trim())).exists()
    }

    #[tokio::test]
    async fn a_command_reads_the_contract_and_reports_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = evaluate_with(
            &[
                "sh",
                "-c",
                "test -s \"$COHORT_INPUT_MODEL\" && test -d \"$COHORT_SCRATCH_DIR\" && \
                 test -z \"$COHORT_OUTPUT_MODEL\" && test \"$COHORT_TASK_KIND\" = evaluate && \
                 echo '{\"samples\": 7, \"loss\": 0.25, \"accuracy\": 0.5}' > \"$COHORT_OUTPUT_METRICS\"",
            ],
            Duration::from_secs(30),
            dir.path(),
        )
        .await
        .unwrap();
        assert_eq!(metrics.samples, 7);
        // The scratch directory went with the task.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_failing_command_fails_with_its_status_and_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let e = evaluate_with(
            &[
                "sh",
                "-c",
                "echo starting; echo 'cannot open the data' >&2; exit 3",
            ],
            Duration::from_secs(30),
            dir.path(),
        )
        .await
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("exited with status 3"), "{e}");
        assert!(e.contains("cannot open the data"), "{e}");
        let e = evaluate_with(&["sh", "-c", "true"], Duration::from_secs(30), dir.path())
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("wrote no metrics"), "{e:#}");
        let e = evaluate_with(&["python3", "-c", "1"], Duration::from_secs(30), dir.path())
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("--allowed-commands"), "{e:#}");
    }

    #[tokio::test]
    async fn past_its_deadline_the_whole_group_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let script = format!(
            "sleep 300 & echo $! > {p}.child; echo $$ > {p}; sleep 300",
            p = pids.display()
        );
        let started = std::time::Instant::now();
        let e = evaluate_with(&["sh", "-c", &script], Duration::from_secs(2), dir.path())
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("past the task's deadline"),
            "{e:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        let leader = std::fs::read_to_string(&pids).unwrap();
        let child = std::fs::read_to_string(pids.with_extension("child")).unwrap();
        // Killed processes are reaped by their parents (the leader by us, the child by init).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !(gone(&leader) && gone(&child)) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gone(&leader), "the command {leader} still runs");
        assert!(gone(&child), "its child {child} still runs");
    }

    #[test]
    fn metrics_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        let read = |text: &str, evaluation: bool| {
            std::fs::write(&path, text).unwrap();
            read_metrics(&path, evaluation).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            read(r#"{"samples": 10, "loss": 0.5, "accuracy": 0.9}"#, true).unwrap(),
            Metrics {
                samples: 10,
                loss: 0.5,
                accuracy: 0.9
            }
        );
        assert_eq!(read(r#"{"samples": 10}"#, false).unwrap().loss, 0.0);
        for (text, says) in [
            (r#"{"samples": 10}"#, "\"loss\" is missing"),
            (
                r#"{"samples": 0, "loss": 1, "accuracy": 0.5}"#,
                "\"samples\"",
            ),
            (
                r#"{"samples": 1.5, "loss": 1, "accuracy": 0.5}"#,
                "\"samples\"",
            ),
            (r#"{"samples": 3, "loss": -1, "accuracy": 0.5}"#, "\"loss\""),
            (
                r#"{"samples": 3, "loss": 1, "accuracy": 1.5}"#,
                "\"accuracy\"",
            ),
            (
                r#"{"samples": 3, "loss": "x", "accuracy": 0.5}"#,
                "must be a number",
            ),
            ("[1]", "expected an object"),
            ("{", "not JSON"),
        ] {
            let e = read(text, true).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        let e = read(&" ".repeat(MAX_METRICS_BYTES as usize + 1), true).unwrap_err();
        assert!(e.contains("longer than"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert!(read_metrics(&path, true).is_err());
    }
}
