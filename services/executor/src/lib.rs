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
use cohort_fl::{CHUNK_BYTES, TensorAssembler, chunk_tensors};
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
                        &delta,
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
        let chunks = retry_unavailable("fetch model", RETRY_FOR, || {
            let mut inner = self.inner.clone();
            let req = self.request(pb::FetchModelRequest {
                task_token: self.token.clone(),
            });
            async move {
                let mut stream = inner.fetch_model(req).await?.into_inner();
                let mut chunks = Vec::new();
                while let Some(chunk) = stream.next().await {
                    chunks.push(chunk?);
                }
                Ok(chunks)
            }
        })
        .await
        .context("cannot fetch the model")?;
        let mut asm = TensorAssembler::new(None, MAX_MODEL_ELEMENTS);
        for chunk in chunks {
            asm.push(chunk)?;
        }
        Ok(asm.finish()?)
    }

    async fn submit_update(
        &self,
        delta: &[NamedTensor],
        samples: u64,
        train: pb::Metrics,
    ) -> anyhow::Result<()> {
        let header = pb::SubmitUpdateRequest {
            part: Some(pb::submit_update_request::Part::Header(pb::UpdateHeader {
                task_token: self.token.clone(),
                samples,
                train: Some(train),
            })),
        };
        let chunks = chunk_tensors(delta, CHUNK_BYTES).map(|c| pb::SubmitUpdateRequest {
            part: Some(pb::submit_update_request::Part::Chunk(c)),
        });
        let messages: Vec<_> = std::iter::once(header).chain(chunks).collect();
        retry_unavailable("submit update", RETRY_FOR, || {
            let mut inner = self.inner.clone();
            let req = self.request(futures::stream::iter(messages.clone()));
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
