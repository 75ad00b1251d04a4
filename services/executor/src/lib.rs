//! executor: runs one task for its party. Fetches the global model through the
//! proxy, trains (or evaluates) on the party's local data with candle, and
//! streams the update (new weights minus global) back in chunks.
//!
//! Started by task-manager with a task file; holds no state of its own. Must
//! not depend on server-side crates. Its last log line, when it fails, is its fatal error on
//! one line (`error: ` and the whole cause chain): task-manager reports that line to the
//! server as the task's reason.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_core::{JobSpec, NamedTensor};
use cohort_fl::{CHUNK_BYTES, SyntheticModel, TensorAssembler, chunk_tensors_shared};
use cohort_proto::v1 as pb;
use cohort_runtime::{LogFormat, channel, retry_unavailable};
use cohort_train::{DataFormat, Dataset};
use futures::StreamExt;
use tonic::metadata::MetadataValue;

#[derive(Debug, clap::Parser)]
#[command(name = "executor", about = "Cohort executor for one task")]
pub struct Args {
    /// The task file written by task-manager.
    #[arg(long, env = "COHORT_TASK_FILE")]
    pub task_file: PathBuf,
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The party's certificate, key and the federation CA (from task-manager).
    #[command(flatten)]
    pub tls: cohort_runtime::TlsArgs,
}

/// Most elements a fetched model may have (bounds memory on bad input).
const MAX_MODEL_ELEMENTS: usize = 1 << 30;

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let bytes = std::fs::read(&self.task_file)
            .with_context(|| format!("--task-file: cannot read {}", self.task_file.display()))?;
        let exec: pb::ExecutorTask = prost::Message::decode(bytes.as_slice())
            .with_context(|| format!("--task-file: {} is not a task", self.task_file.display()))?;
        let task = exec.task.context("task file: task is missing")?;
        let data = exec.data.context("task file: data is missing")?;
        let spec = JobSpec::from_json(&task.spec_json).context("task file: task.spec_json")?;
        let kind = pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified);
        let started = Instant::now();
        let tls = self.tls.load().context("TLS")?;
        let client = RoundClient::new(&exec.endpoint, &task, tls.as_ref())?;
        let global = client.fetch_model().await?;
        tracing::info!(task = %task.task_id, tensors = global.len(), "model fetched");
        if let Some(model) = SyntheticModel::of(&spec.model) {
            return synthetic_task(&client, &task, &data, kind, &global, model).await;
        }
        match kind {
            pb::TaskKind::Train => {
                let dataset = load(&data, false)?;
                let outcome =
                    cohort_train::train(&spec.model, &spec.training, &global, &dataset, task.seed)
                        .context("training failed")?;
                let delta = difference(&outcome.weights, &global)?;
                tracing::info!(
                    task = %task.task_id, samples = outcome.samples, loss = outcome.loss,
                    accuracy = outcome.accuracy, seconds = started.elapsed().as_secs_f64(), "trained"
                );
                client
                    .submit_update(
                        delta,
                        outcome.samples as u64,
                        pb::Metrics {
                            loss: outcome.loss,
                            accuracy: outcome.accuracy,
                            samples: outcome.samples as u64,
                        },
                    )
                    .await?;
            }
            pb::TaskKind::Evaluate => {
                let dataset = load(&data, true)?;
                let e = cohort_train::evaluate(&spec.model, &global, &dataset)
                    .context("evaluation failed")?;
                tracing::info!(task = %task.task_id, samples = e.samples, loss = e.loss, accuracy = e.accuracy, "evaluated");
                client
                    .submit_evaluation(pb::Metrics {
                        loss: e.loss,
                        accuracy: e.accuracy,
                        samples: e.samples as u64,
                    })
                    .await?;
            }
            pb::TaskKind::Unspecified => {
                bail!("task file: task.kind {} is not a task kind", task.kind)
            }
        }
        Ok(())
    }
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
    inner: pb::round_client::RoundClient<tonic::transport::Channel>,
    job: MetadataValue<tonic::metadata::Ascii>,
    token: String,
}

impl RoundClient {
    fn new(
        endpoint: &str,
        task: &pb::Task,
        tls: Option<&cohort_runtime::Tls>,
    ) -> anyhow::Result<Self> {
        let channel = channel(endpoint, tls).context("task file: endpoint")?;
        Ok(Self {
            inner: pb::round_client::RoundClient::new(channel)
                .max_decoding_message_size(CHUNK_BYTES * 4)
                .max_encoding_message_size(CHUNK_BYTES * 4),
            job: task.job_id.parse().context("task file: task.job_id")?,
            token: task.task_token.clone(),
        })
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

    async fn submit_update(
        &self,
        delta: Vec<NamedTensor>,
        samples: u64,
        train: pb::Metrics,
    ) -> anyhow::Result<()> {
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
