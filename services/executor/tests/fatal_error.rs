//! The executor's fatal error is its last log line, on one line, naming the real cause: a real
//! executor process runs a task against an in-process Round server (what the proxy would route
//! to the job's coordinator) that serves a model of the wrong shape.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_core::{JobSpec, NamedTensor};
use cohort_proto::v1 as pb;
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

const JOB: &str = "wrong-shape-abc123";
const TOKEN: &str = "task-token-1";

/// Serves one fixed model; remembers who fetched it.
struct FixedModel {
    model: Vec<NamedTensor>,
    /// (task token, x-cohort-job) of each fetch.
    fetches: Arc<Mutex<Vec<(String, String)>>>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::TensorChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::round_server::Round for FixedModel {
    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        req: Request<pb::FetchModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let job = req
            .metadata()
            .get(cohort_proto::JOB_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let token = req.into_inner().task_token;
        self.fetches.lock().unwrap().push((token, job));
        let chunks: Vec<_> = cohort_fl::chunk_tensors(&self.model, cohort_fl::CHUNK_BYTES)
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn submit_update(
        &self,
        _req: Request<Streaming<pb::SubmitUpdateRequest>>,
    ) -> Result<Response<pb::Ack>, Status> {
        Err(Status::failed_precondition("no update expected"))
    }

    async fn submit_evaluation(
        &self,
        _req: Request<pb::SubmitEvaluationRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        Err(Status::failed_precondition("no evaluation expected"))
    }
}

fn spec(hidden: &str) -> JobSpec {
    JobSpec::parse(&format!(
        "name: wrong-shape\n\
         model: {{arch: mlp, hidden: {hidden}}}\n\
         data: {{dataset: digits}}\n\
         training: {{epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.1}}}}\n\
         rounds: 1\n\
         clients: {{per_round: 2, min: 2}}\n"
    ))
    .unwrap()
}

fn digits_csv() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/digits.csv")
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_of_the_wrong_shape_is_the_last_line_naming_the_tensor() {
    // The job trains hidden [32]; the model served was made for hidden [64].
    let served = cohort_train::init_model(&spec("[64]").model, 64, 10, 7).unwrap();
    let fetches = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::round_server::RoundServer::new(FixedModel {
                model: served,
                fetches: fetches.clone(),
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let task_file = dir.path().join("task.pb");
    let task = pb::ExecutorTask {
        task: Some(pb::Task {
            task_id: "task-1".into(),
            job_id: JOB.into(),
            round: 1,
            kind: pb::TaskKind::Train as i32,
            party: "p1".into(),
            dataset: "digits".into(),
            task_token: TOKEN.into(),
            spec_json: spec("[32]").to_json(),
            seed: 1,
            deadline_ms: 0,
            trace_context: Default::default(),
        }),
        endpoint,
        data: Some(pb::LocalDataset {
            path: digits_csv(),
            format: "csv".into(),
            scale: 1.0 / 16.0,
            ..Default::default()
        }),
        state_dir: String::new(),
    };
    std::fs::write(&task_file, prost::Message::encode_to_vec(&task)).unwrap();

    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_executor"))
            .arg("--task-file")
            .arg(&task_file)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the executor ends within 60 s")
    .unwrap();
    server.abort();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        *fetches.lock().unwrap(),
        vec![(TOKEN.to_string(), JOB.to_string())],
        "the model was fetched with the task's token, for its job"
    );
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
    assert!(last.starts_with("error: training failed: "), "{stderr}");
    assert!(
        last.contains(r#"tensor "fc0.weight": has shape [64, 64]"#)
            && last.contains("needs [32, 64]"),
        "the last line names the tensor and both shapes: {last}"
    );
}
