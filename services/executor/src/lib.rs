//! executor: runs tasks for its party. Fetches the global model through the
//! proxy, trains (or evaluates) on the party's local data with candle, and
//! streams the update (new weights minus global) back in chunks, clipped and noised first
//! under local DP (`privacy.dp.local`), compressed when the job's `compression` asks
//! (`compression.rs`).
//!
//! Started by task-manager, either for one task given in a task file, or (`--serve`) for
//! the successive tasks of one job on one party, handed over its stdin
//! (`cohort_runtime::executor_pipe`), answering each on its stdout and keeping its
//! connection to the proxy between them. Holds no state from one task to the next but that
//! connection, except what a strategy keeps in the job's state directory on the party
//! (`scaffold.rs`: SCAFFOLD's client control variate; `compression.rs`: top-k's residual).
//! `--probe` (`probe.rs`) is a connectivity probe's toy task: dial the proxy as a task does,
//! call `PartySession.Check`, read the party's datasets, answer one JSON line.
//! Must not depend on server-side crates. A task's fatal error is one line (`error: ` and
//! the whole cause chain): the answer of a serving executor, or the last log line of a
//! one-task executor; task-manager reports it to the server as the task's reason.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_core::spec::Compression;
use cohort_core::{JobSpec, NamedTensor};
use cohort_fl::{CHUNK_BYTES, SyntheticModel, TensorAssembler, chunk_tensors_shared};
use cohort_proto::v1 as pb;
use cohort_runtime::{LogFormat, channel, executor_pipe, retry_unavailable};
use cohort_train::{DataFormat, Dataset};
use futures::StreamExt;
use tonic::metadata::MetadataValue;
use tracing::Instrument as _;

mod command;
mod compression;
mod probe;
mod scaffold;
mod secagg;

#[derive(Debug, clap::Parser)]
#[command(
    name = "executor",
    about = "Cohort executor for one task, or for one job's tasks"
)]
#[command(group(clap::ArgGroup::new("tasks").required(true).args(["task_file", "serve", "probe"])))]
pub struct Args {
    /// The task file written by task-manager: run this one task, then exit.
    #[arg(long, env = "COHORT_TASK_FILE")]
    pub task_file: Option<PathBuf>,
    /// Run the tasks task-manager writes to stdin, one after the other, answering each on
    /// stdout; exit when stdin closes.
    #[arg(long)]
    pub serve: bool,
    /// A connectivity probe (`cohort check --federation`): read the probe's tasks from stdin
    /// (one per dataset), reach the server through the proxy as a task does, read the
    /// datasets, answer one JSON line on stdout, exit.
    #[arg(long)]
    pub probe: bool,
    /// With --serve: exit after this many seconds without a task.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_exit_secs: u64,
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// For robustness checks only: corrupt every trained update before sending it
    /// (`sign-flip`, `scale=K`, `noise=S`). Given by task-manager's `--adversary`.
    #[arg(long, value_parser = cohort_fl::Corruption::parse)]
    pub adversary: Option<cohort_fl::Corruption>,
    /// The commands `training.runtime: command` may run on this party, as task-manager's
    /// `--allowed-commands` (a JSON list of argv prefixes); checked again here before one
    /// runs. None: no command runs.
    #[arg(long, env = "COHORT_ALLOWED_COMMANDS", value_name = "JSON", default_value = "", value_parser = cohort_core::spec::AllowedCommands::parse)]
    pub allowed_commands: cohort_core::spec::AllowedCommands,
    /// The party's certificate, key and the federation CA (from task-manager).
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
}

/// Most elements a fetched model may have (bounds memory on bad input).
const MAX_MODEL_ELEMENTS: usize = 1 << 30;

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let mut channels = Channels {
            tls: self.tls.load().context("TLS")?,
            open: None,
            adversary: self.adversary,
            allowed_commands: self.allowed_commands,
        };
        if self.probe {
            return probe::run(&mut channels).await;
        }
        if let Some(mode) = self.adversary {
            tracing::warn!(%mode, "ADVERSARY MODE: this executor corrupts every update it sends");
        }
        let Some(file) = &self.task_file else {
            return serve(&mut channels, Duration::from_secs(self.idle_exit_secs)).await;
        };
        let bytes = std::fs::read(file)
            .with_context(|| format!("--task-file: cannot read {}", file.display()))?;
        let exec: pb::ExecutorTask = prost::Message::decode(bytes.as_slice())
            .with_context(|| format!("--task-file: {} is not a task", file.display()))?;
        run_task(&mut channels, exec).await
    }
}

/// Runs the tasks that come on stdin until it closes (or none comes for `idle`), answering
/// each on stdout. A failed task is answered, not fatal: the next one may succeed.
async fn serve(channels: &mut Channels, idle: Duration) -> anyhow::Result<()> {
    let mut tasks = tokio::io::stdin();
    let mut answers = tokio::io::stdout();
    tracing::info!("serving tasks from stdin");
    loop {
        let exec = match tokio::time::timeout(idle, executor_pipe::read_task(&mut tasks)).await {
            Err(_) => {
                tracing::info!(idle_secs = idle.as_secs(), "no task came; exiting");
                return Ok(());
            }
            Ok(read) => match read.context("stdin: cannot read the next task")? {
                Some(exec) => exec,
                None => return Ok(()),
            },
        };
        let outcome = run_task(channels, exec).await.map_err(|e| {
            let line = error_line(&e);
            tracing::warn!("{line}");
            line
        });
        executor_pipe::write_answer(&mut answers, outcome)
            .await
            .context("stdout: cannot answer")?;
    }
}

/// The channel to the proxy, kept from one task to the next: a serving executor makes one
/// TLS connection, not one per task (a task naming another endpoint replaces it).
struct Channels {
    tls: Option<cohort_runtime::Tls>,
    open: Option<(String, cohort_runtime::Channel)>,
    /// Robustness checks: how this party corrupts its updates.
    adversary: Option<cohort_fl::Corruption>,
    /// What `training.runtime: command` may run here (`--allowed-commands`).
    allowed_commands: cohort_core::spec::AllowedCommands,
}

impl Channels {
    fn to(&mut self, endpoint: &str) -> anyhow::Result<cohort_runtime::Channel> {
        if let Some((open, channel)) = &self.open
            && open == endpoint
        {
            return Ok(channel.clone());
        }
        let channel = channel(endpoint, self.tls.as_ref()).context("task: endpoint")?;
        self.open = Some((endpoint.to_string(), channel.clone()));
        Ok(channel)
    }
}

/// Runs one task to its end in its span, a child of the task-manager's span for it.
async fn run_task(channels: &mut Channels, exec: pb::ExecutorTask) -> anyhow::Result<()> {
    let span = match &exec.task {
        Some(task) => {
            let span = cohort_telemetry::trace_span!(
                "execute",
                task_id = %task.task_id,
                kind = task.kind,
                round = task.round,
            );
            cohort_telemetry::set_parent_from_map(&span, &task.trace_context);
            span
        }
        None => cohort_telemetry::trace_span!("execute"),
    };
    run_task_steps(channels, exec).instrument(span).await
}

/// Model fetched, trained or evaluated, result submitted.
async fn run_task_steps(channels: &mut Channels, exec: pb::ExecutorTask) -> anyhow::Result<()> {
    let task = exec.task.context("task file: task is missing")?;
    let data = exec.data.context("task file: data is missing")?;
    let spec = JobSpec::from_json(&task.spec_json).context("task file: task.spec_json")?;
    let kind = pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified);
    if kind == pb::TaskKind::Train && channels.adversary == Some(cohort_fl::Corruption::Stall) {
        // A straggler that always times out: holds the task until it is stopped.
        tracing::warn!(task = %task.task_id, "ADVERSARY MODE (stall): this training task is never delivered");
        std::future::pending::<()>().await;
    }
    let started = Instant::now();
    let client = RoundClient::new(channels.to(&exec.endpoint)?, &task)?
        .compressing(spec.wire_compression(), &exec.state_dir);
    let served = client
        .fetch_model()
        .instrument(cohort_telemetry::trace_span!("fetch"))
        .await?;
    tracing::info!(task = %task.task_id, tensors = served.len(), "model fetched");
    let is_scaffold = spec.aggregation.strategy == cohort_core::spec::Strategy::Scaffold;
    // SCAFFOLD serves the server's control variate after the model; the update carries
    // Δc_i back in the same order.
    let served_order: Vec<String> = served.iter().map(|t| t.name.clone()).collect();
    let (global, server_c) = if is_scaffold {
        scaffold::split(served)?
    } else {
        (served, Vec::new())
    };
    if let Some(model) = SyntheticModel::of(&spec.model) {
        if let (Some(settings), Some(synthetic)) = (spec.secure_aggregation(), &data.synthetic)
            && kind == pb::TaskKind::Train
            && model.fits(&global)
        {
            // `cohort bench round` with secure aggregation: the party's update, masked.
            let update = model.update(u64::from(synthetic.index), u64::from(task.round));
            let train = pb::Metrics {
                loss: 0.0,
                accuracy: 0.0,
                samples: synthetic.samples,
            };
            let channel = channels.to(&exec.endpoint)?;
            return secagg::send_masked(channel, &task, settings, &global, update, train).await;
        }
        return synthetic_task(&client, &task, &data, kind, &global, model).await;
    }
    let command_task = command::CommandTask {
        spec: &spec,
        task: &task,
        data: &data,
        kind,
        state_dir: &exec.state_dir,
    };
    let by_command = spec.training.runtime == cohort_core::spec::Runtime::Command;
    match kind {
        pb::TaskKind::Train => {
            let mut objective = cohort_train::LocalObjective::of(&spec.aggregation);
            let client_control = if is_scaffold {
                let state = scaffold::ClientControl::in_dir(&exec.state_dir)?;
                let start = state.load(&global, task.round)?;
                if let scaffold::Origin::RolledBack { round } = start.from {
                    tracing::warn!(
                        task = %task.task_id, round,
                        "scaffold: round {round} is trained again (the coordinator resumed \
                         from an earlier checkpoint); starting from the client control \
                         variate of before it"
                    );
                }
                objective.control = Some(cohort_train::ControlVariates {
                    server: server_c,
                    client: start.client,
                });
                Some((state, start.from))
            } else {
                None
            };
            let outcome = if by_command {
                let (weights, metrics) =
                    command::train(&channels.allowed_commands, &command_task, &global)
                        .instrument(cohort_telemetry::trace_span!("train"))
                        .await?;
                cohort_train::TrainOutcome {
                    weights,
                    loss: metrics.loss,
                    accuracy: metrics.accuracy,
                    samples: usize::try_from(metrics.samples).unwrap_or(usize::MAX),
                    steps: 0,
                }
            } else {
                let dataset = load(&data, false)?;
                cohort_telemetry::trace_span!("train")
                    .in_scope(|| {
                        cohort_train::train_with(
                            &spec.model,
                            &spec.training,
                            &global,
                            &dataset,
                            task.seed,
                            &objective,
                        )
                    })
                    .context("training failed")?
            };
            let mut delta = difference(&outcome.weights, &global)?;
            if let Some(mode) = channels.adversary {
                mode.apply(&mut delta, task.seed);
                tracing::warn!(task = %task.task_id, %mode, "ADVERSARY MODE: the update sent is corrupted");
            }
            // c_i⁺ is written aside now and put in place only once the update is taken.
            let (update, pending) = match (&objective.control, &client_control) {
                (Some(control), Some((state, _))) => {
                    let next = control
                        .next(&spec.training, &global, &outcome.weights, outcome.steps)
                        .context("scaffold: the client control variate")?;
                    let pending = state.prepare(&control.client, &next.client, task.round)?;
                    (
                        scaffold::update(&served_order, delta, next.delta)?,
                        Some(pending),
                    )
                }
                _ => (delta, None),
            };
            let update = local_privacy(&spec, &task.task_id, update)?;
            tracing::info!(
                task = %task.task_id, samples = outcome.samples, loss = outcome.loss,
                proximal_mu = ?objective.proximal_mu, scaffold = is_scaffold,
                client_control = client_control.as_ref().map_or("none", |(_, from)| from.as_str()),
                steps = outcome.steps,
                accuracy = outcome.accuracy, seconds = started.elapsed().as_secs_f64(), "trained"
            );
            let train = pb::Metrics {
                loss: outcome.loss,
                accuracy: outcome.accuracy,
                samples: outcome.samples as u64,
            };
            if let Some(settings) = spec.secure_aggregation() {
                // Clipped and masked: the coordinator sees only the sum (`secagg.rs`).
                let channel = channels.to(&exec.endpoint)?;
                secagg::send_masked(channel, &task, settings, &global, update, train)
                    .instrument(cohort_telemetry::trace_span!("secure_aggregation"))
                    .await?;
            } else {
                client
                    .submit_update(update, outcome.samples as u64, train)
                    .instrument(cohort_telemetry::trace_span!("upload"))
                    .await?;
            }
            if let Some(pending) = pending {
                pending.commit()?;
            }
        }
        pb::TaskKind::Evaluate => {
            let metrics = if by_command {
                command::evaluate(&channels.allowed_commands, &command_task, &global)
                    .instrument(cohort_telemetry::trace_span!("evaluate"))
                    .await?
                    .to_pb()
            } else {
                let dataset = load(&data, true)?;
                let e = cohort_telemetry::trace_span!("evaluate")
                    .in_scope(|| cohort_train::evaluate(&spec.model, &global, &dataset))
                    .context("evaluation failed")?;
                pb::Metrics {
                    loss: e.loss,
                    accuracy: e.accuracy,
                    samples: e.samples as u64,
                }
            };
            tracing::info!(task = %task.task_id, samples = metrics.samples, loss = metrics.loss, accuracy = metrics.accuracy, "evaluated");
            client.submit_evaluation(metrics).await?;
        }
        pb::TaskKind::Unspecified => {
            bail!("task file: task.kind {} is not a task kind", task.kind)
        }
    }
    Ok(())
}

/// Local DP (`privacy.dp.local`): the update (model delta and any extras, as one vector) is
/// clipped to `clip` and noised with N(0, (z·clip)²) here, so nothing unnoised leaves the
/// party. The noise comes from the operating system's randomness, never the task's seed.
fn local_privacy(
    spec: &JobSpec,
    task_id: &str,
    mut update: Vec<NamedTensor>,
) -> anyhow::Result<Vec<NamedTensor>> {
    let Some(dp) = &spec.privacy.dp else {
        return Ok(update);
    };
    let Some(local) = cohort_fl::LocalDp::for_spec(dp) else {
        return Ok(update);
    };
    let mut rng = cohort_fl::privacy::os_noise().context("local DP")?;
    let norm = local.apply(&mut update, &mut rng);
    // What this one update gives away toward the server; rounds compose on top of it.
    let epsilon = cohort_fl::privacy::local_epsilon(dp.noise_multiplier, 1, dp.delta);
    tracing::info!(
        task = %task_id, norm, clip = local.clip, noise_std = local.noise_std,
        epsilon_this_update = epsilon, delta = dp.delta,
        "local DP: update clipped and noised before sending"
    );
    Ok(update)
}

/// A task of the synthetic workload: no training, the update `cohort_fl::synthetic` defines
/// for this party and round, made chunk by chunk as it is sent.
async fn synthetic_task(
    client: &RoundClient,
    task: &pb::Task,
    data: &pb::LocalDataset,
    kind: pb::TaskKind,
    global: &[NamedTensor],
    model: SyntheticModel,
) -> anyhow::Result<()> {
    if !model.fits(global) {
        bail!(
            "the fetched model is not the synthetic model of {} parameters in {} tensors",
            model.params,
            model.layers
        );
    }
    let Some(synthetic) = &data.synthetic else {
        bail!(
            "dataset {:?} is not synthetic (format {:?}); a synthetic model needs a dataset of \
             format \"synthetic\"",
            task.dataset,
            data.format
        );
    };
    if kind != pb::TaskKind::Train {
        bail!(
            "a synthetic model is not evaluated (task.kind {})",
            task.kind
        );
    }
    let (party, round) = (u64::from(synthetic.index), u64::from(task.round));
    client
        .submit_chunks(
            move || model.update_chunks(party, round, CHUNK_BYTES),
            synthetic.samples,
            pb::Metrics {
                loss: 0.0,
                accuracy: 0.0,
                samples: synthetic.samples,
            },
        )
        .instrument(cohort_telemetry::trace_span!("upload"))
        .await?;
    tracing::info!(task = %task.task_id, params = model.params, party, round, "synthetic update sent");
    Ok(())
}

/// The executor's final log line for a fatal error: the whole cause chain, on one line
/// (control characters, such as the newlines of a multi-line cause, become spaces).
pub fn error_line(error: &anyhow::Error) -> String {
    one_line(&format!("error: {error:#}"))
}

/// `text` with control characters (newlines, tabs, escapes) replaced by spaces.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn load(data: &pb::LocalDataset, eval: bool) -> anyhow::Result<Dataset> {
    let format: DataFormat = data.format.parse().context("task file: data.format")?;
    let scale = (data.scale > 0.0).then_some(data.scale);
    let (path, labels) = if eval && !data.eval_path.is_empty() {
        (&data.eval_path, &data.eval_labels_path)
    } else {
        (&data.path, &data.labels_path)
    };
    let labels = (!labels.is_empty()).then(|| std::path::Path::new(labels.as_str()));
    Ok(cohort_train::load_dataset(
        std::path::Path::new(path),
        format,
        labels,
        scale,
    )?)
}

/// `new - old`, tensor by tensor (same names and shapes).
fn difference(new: &[NamedTensor], old: &[NamedTensor]) -> anyhow::Result<Vec<NamedTensor>> {
    new.iter()
        .map(|n| {
            let o = old
                .iter()
                .find(|o| o.name == n.name && o.shape == n.shape)
                .with_context(|| format!("tensor {} changed shape in training", n.name))?;
            Ok(NamedTensor {
                name: n.name.clone(),
                shape: n.shape.clone(),
                data: n.data.iter().zip(&o.data).map(|(a, b)| a - b).collect(),
            })
        })
        .collect()
}

/// How long round calls are retried while the route to the coordinator
/// heals (a coordinator relaunched, a proxy restarting).
const RETRY_FOR: Duration = Duration::from_secs(30);

/// The round protocol, addressed to the task's job through the proxy.
#[derive(Clone)]
struct RoundClient {
    inner: pb::round_client::RoundClient<cohort_runtime::Channel>,
    job: MetadataValue<tonic::metadata::Ascii>,
    token: String,
    task_id: String,
    /// Draws quantisation's rounding: a rerun of the task sends the same update.
    seed: u64,
    /// The job's `compression`, and the party's state directory for the job (top-k's
    /// residual).
    compression: Option<(Compression, String)>,
}

impl RoundClient {
    fn new(channel: cohort_runtime::Channel, task: &pb::Task) -> anyhow::Result<Self> {
        Ok(Self {
            inner: pb::round_client::RoundClient::new(channel)
                .max_decoding_message_size(CHUNK_BYTES * 4)
                .max_encoding_message_size(CHUNK_BYTES * 4),
            job: task.job_id.parse().context("task file: task.job_id")?,
            token: task.task_token.clone(),
            task_id: task.task_id.clone(),
            seed: task.seed,
            compression: None,
        })
    }

    /// Updates go encoded as `method` asks (see [`RoundClient::submit_update`]).
    fn compressing(self, method: Option<Compression>, state_dir: &str) -> Self {
        Self {
            compression: method.map(|m| (m, state_dir.to_string())),
            ..self
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert(cohort_proto::JOB_METADATA_KEY, self.job.clone());
        req.set_timeout(Duration::from_secs(300));
        req
    }

    async fn fetch_model(&self) -> anyhow::Result<Vec<NamedTensor>> {
        let model = retry_unavailable("fetch model", RETRY_FOR, || {
            let mut inner = self.inner.clone();
            let req = self.request(pb::FetchModelRequest {
                task_token: self.token.clone(),
            });
            async move {
                let mut stream = inner.fetch_model(req).await?.into_inner();
                // Assembled as it arrives: the model is in memory once, not twice.
                let mut asm = TensorAssembler::new(None, MAX_MODEL_ELEMENTS);
                while let Some(chunk) = stream.next().await {
                    asm.push(chunk?)
                        .map_err(|e| tonic::Status::data_loss(e.to_string()))?;
                }
                asm.finish()
                    .map_err(|e| tonic::Status::data_loss(e.to_string()))
            }
        })
        .await
        .context("cannot fetch the model")?;
        Ok(model)
    }

    /// Sends an update: as it is (its chunks sharing its memory), or encoded as the job's
    /// `compression` asks (the encoded chunks, at most a quarter of the update, made
    /// once), top-k's residual kept once the coordinator acknowledged it.
    async fn submit_update(
        &self,
        delta: Vec<NamedTensor>,
        samples: u64,
        train: pb::Metrics,
    ) -> anyhow::Result<()> {
        if let Some((method, state_dir)) = &self.compression {
            let outgoing =
                compression::Outgoing::encode(*method, delta, state_dir, self.seed, &self.task_id)?;
            self.submit_chunks(outgoing.chunks(), samples, train)
                .await?;
            return outgoing.acknowledged();
        }
        let delta = std::sync::Arc::new(delta);
        self.submit_chunks(
            move || chunk_tensors_shared(delta.clone(), CHUNK_BYTES),
            samples,
            train,
        )
        .await
    }

    /// Streams an update made by `chunks` (called again for each retry), so no encoded copy
    /// of it is ever whole in memory.
    async fn submit_chunks<I>(
        &self,
        chunks: impl Fn() -> I,
        samples: u64,
        train: pb::Metrics,
    ) -> anyhow::Result<()>
    where
        I: Iterator<Item = pb::TensorChunk> + Send + 'static,
    {
        let header = pb::SubmitUpdateRequest {
            part: Some(pb::submit_update_request::Part::Header(pb::UpdateHeader {
                task_token: self.token.clone(),
                samples,
                train: Some(train),
            })),
        };
        retry_unavailable("submit update", RETRY_FOR, || {
            let mut inner = self.inner.clone();
            let messages =
                std::iter::once(header.clone()).chain(chunks().map(|c| pb::SubmitUpdateRequest {
                    part: Some(pb::submit_update_request::Part::Chunk(c)),
                }));
            let req = self.request(futures::stream::iter(messages));
            async move { inner.submit_update(req).await }
        })
        .await
        .context("the update was refused")?;
        Ok(())
    }

    async fn submit_evaluation(&self, metrics: pb::Metrics) -> anyhow::Result<()> {
        retry_unavailable("submit evaluation", RETRY_FOR, || {
            let mut inner = self.inner.clone();
            let req = self.request(pb::SubmitEvaluationRequest {
                task_token: self.token.clone(),
                metrics: Some(metrics),
            });
            async move { inner.submit_evaluation(req).await }
        })
        .await
        .context("the evaluation was refused")?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_error_line_holds_the_whole_chain_on_one_line() {
        let e = anyhow::anyhow!("datasets.json:\n  line 3: expected a string\r\n")
            .context("cannot load the data");
        let line = error_line(&e);
        assert_eq!(
            line,
            "error: cannot load the data: datasets.json:   line 3: expected a string  "
        );
        assert!(!line.contains('\n'), "{line}");
    }
}
