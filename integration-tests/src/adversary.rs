//! A hostile party for trust tests: a real party certificate of the federation's CA and the
//! real protocol (session through the proxy, offers, round calls), then misbehaviour — claims
//! it cannot back, updates no training makes, uploads that stall, forged evaluations.
//!
//! It runs as a task of the test process; everything it tried and what the federation
//! answered is recorded for the test to assert on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_core::NamedTensor;
use cohort_proto::v1 as pb;
use cohort_runtime::Channel;
use cohort_security::{CertAuthority, TlsFiles, Validity};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::Federation;

/// What the adversary sends instead of a trained update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateKind {
    /// Every value `v` (e.g. f32::MAX).
    Constant(f32),
    /// Values of alternating sign with this L2 norm in all.
    Noise { norm: f32 },
    /// The header, then nothing: the upload stalls until the federation gives up on it.
    Stall,
    /// The header and the first chunk, then nothing.
    StallAfterFirstChunk,
    /// Small finite values, but one NaN in the middle chunk.
    NanHalfway,
    /// Small finite values, but the tensor that starts halfway declares a wrong shape.
    WrongShapeHalfway,
    /// Small finite values, compressed as this party chooses (whatever the job's spec asks).
    Compressed(cohort_core::spec::Compression),
    /// Under secure aggregation: shares in another party's name, then the keys of the round
    /// before (`secagg_adversary.rs`).
    SecAggCheat,
}

/// How the adversary behaves.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Datasets it registers (name, samples, features, classes).
    pub datasets: Vec<(String, u64, u32, u32)>,
    /// Samples claimed in update headers (None: the registered count).
    pub claimed_samples: Option<u64>,
    pub update: UpdateKind,
    /// Evaluation it reports: (samples, loss, accuracy); None: evaluation offers are refused.
    pub evaluation: Option<(u64, f64, f64)>,
}

impl Behaviour {
    /// The synthetic dataset of `cohort bench round`'s parties, with this weight.
    pub fn synthetic(samples: u64, update: UpdateKind) -> Behaviour {
        Behaviour {
            datasets: vec![("synthetic".into(), samples, 1, 2)],
            claimed_samples: None,
            update,
            evaluation: None,
        }
    }

    /// Digits as the honest parties hold it, with this many samples claimed.
    pub fn digits(samples: u64, update: UpdateKind) -> Behaviour {
        Behaviour {
            datasets: vec![("digits".into(), samples, 64, 10)],
            claimed_samples: None,
            update,
            evaluation: None,
        }
    }
}

/// What happened to one of the adversary's tasks.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub job_id: String,
    pub round: u32,
    pub kind: pb::TaskKind,
    /// The federation's answer to the delivery (Ok, or the refusal's code and message).
    pub answer: Result<(), (tonic::Code, String)>,
}

/// A running adversary.
pub struct Adversary {
    pub name: String,
    pub files: TlsFiles,
    channel: Channel,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    /// Tasks offered to it, with their tokens (for aiming calls elsewhere).
    pub tasks: Arc<Mutex<Vec<pb::Task>>>,
    session: tokio::task::JoinHandle<()>,
}

impl Drop for Adversary {
    fn drop(&mut self) {
        self.session.abort();
    }
}

/// Issues a party certificate of the federation's CA into `dir`.
pub fn party_files(fed: &Federation, dir: &std::path::Path, name: &str) -> TlsFiles {
    let pki = &fed.stack.pki;
    let ca = CertAuthority::load(&pki.join("ca.crt"), &pki.join("ca.key")).expect("the CA");
    let pair = ca
        .issue_party(name, Validity::for_duration(Duration::from_secs(3600)))
        .expect("issue a party certificate");
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    cohort_security::write_cert(&cert, &pair.cert_pem).expect("write certificate");
    cohort_security::write_key(&key, &pair.key_pem).expect("write key");
    TlsFiles {
        cert,
        key,
        ca: pki.join("ca.crt"),
    }
}

/// A channel to the proxy presenting the party's certificate.
pub fn party_channel(fed: &Federation, files: &TlsFiles) -> Channel {
    let tls = cohort_runtime::Tls::load(files).expect("party TLS files");
    cohort_runtime::channel(&fed.stack.proxy, Some(&tls)).expect("channel")
}

impl Adversary {
    /// Connects as `name` and registers; returns the registration's refusal, if any.
    pub async fn connect(
        fed: &Federation,
        dir: &std::path::Path,
        name: &str,
        behaviour: Behaviour,
    ) -> Result<Adversary, tonic::Status> {
        let files = party_files(fed, dir, name);
        let channel = party_channel(fed, &files);
        let (out, rx) = mpsc::channel(64);
        out.send(register(name, &behaviour))
            .await
            .map_err(|_| tonic::Status::internal("session closed"))?;
        let mut inbound = pb::party_session_client::PartySessionClient::new(channel.clone())
            .open(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        match tokio::time::timeout(Duration::from_secs(20), inbound.next()).await {
            Ok(Some(Ok(pb::ServerMessage {
                kind: Some(pb::server_message::Kind::Registered(_)),
            }))) => {}
            Ok(Some(Err(s))) => return Err(s),
            other => {
                return Err(tonic::Status::internal(format!(
                    "unexpected first session message: {other:?}"
                )));
            }
        }
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let session = tokio::spawn(serve(
            channel.clone(),
            out,
            inbound,
            behaviour,
            attempts.clone(),
            tasks.clone(),
        ));
        Ok(Adversary {
            name: name.to_string(),
            files,
            channel,
            attempts,
            tasks,
            session,
        })
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// The round API through the proxy, as this party.
    pub fn round(&self) -> pb::round_client::RoundClient<Channel> {
        pb::round_client::RoundClient::new(self.channel.clone())
    }
}

fn register(name: &str, b: &Behaviour) -> pb::PartyMessage {
    pb::PartyMessage {
        kind: Some(pb::party_message::Kind::Register(pb::Register {
            party: name.to_string(),
            datasets: b
                .datasets
                .iter()
                .map(|(n, samples, features, classes)| pb::DatasetInfo {
                    name: n.clone(),
                    samples: *samples,
                    features: *features,
                    classes: *classes,
                })
                .collect(),
            resources: Some(pb::Resources {
                cpus: 1,
                memory_bytes: 1 << 30,
                gpus: 0,
                max_tasks: 8,
                free: None,
                gpu_devices: Vec::new(),
            }),
            running_tasks: Vec::new(),
        })),
    }
}

/// A round call addressed to `job` (the proxy routes on it).
pub fn for_job<T>(job: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = job.parse() {
        req.metadata_mut().insert(cohort_proto::JOB_METADATA_KEY, v);
    }
    req.set_timeout(Duration::from_secs(120));
    req
}

async fn serve(
    channel: Channel,
    out: mpsc::Sender<pb::PartyMessage>,
    mut inbound: tonic::Streaming<pb::ServerMessage>,
    behaviour: Behaviour,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    tasks: Arc<Mutex<Vec<pb::Task>>>,
) {
    let heartbeat = {
        let out = out.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let hb = pb::PartyMessage {
                    kind: Some(pb::party_message::Kind::Heartbeat(pb::Heartbeat {
                        resources: None,
                        running_tasks: 0,
                    })),
                };
                if out.send(hb).await.is_err() {
                    return;
                }
            }
        })
    };
    while let Some(Ok(msg)) = inbound.next().await {
        let Some(pb::server_message::Kind::Offer(offer)) = msg.kind else {
            continue;
        };
        let Some(task) = offer.task.clone() else {
            continue;
        };
        let kind = pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified);
        let take = match kind {
            pb::TaskKind::Train => true,
            pb::TaskKind::Evaluate => behaviour.evaluation.is_some(),
            pb::TaskKind::Unspecified => false,
        };
        let reply = pb::PartyMessage {
            kind: Some(pb::party_message::Kind::OfferReply(pb::OfferReply {
                offer_id: offer.offer_id,
                accepted: take,
                reason: if take { String::new() } else { "no".into() },
            })),
        };
        if out.send(reply).await.is_err() {
            break;
        }
        if !take {
            continue;
        }
        if let Ok(mut t) = tasks.lock() {
            t.push(task.clone());
        }
        let (channel, out, behaviour, attempts) = (
            channel.clone(),
            out.clone(),
            behaviour.clone(),
            attempts.clone(),
        );
        tokio::spawn(async move {
            let answer = run_task(&channel, &task, kind, &behaviour).await;
            let phase = if answer.is_ok() {
                pb::TaskPhase::Succeeded
            } else {
                pb::TaskPhase::Failed
            };
            if let Ok(mut a) = attempts.lock() {
                a.push(Attempt {
                    job_id: task.job_id.clone(),
                    round: task.round,
                    kind,
                    answer: answer.clone(),
                });
            }
            let _ = out
                .send(pb::PartyMessage {
                    kind: Some(pb::party_message::Kind::TaskStatus(pb::TaskStatus {
                        task_id: task.task_id.clone(),
                        phase: phase as i32,
                        message: match answer {
                            Ok(()) => String::new(),
                            Err((_, m)) => m,
                        },
                    })),
                })
                .await;
        });
    }
    heartbeat.abort();
}

async fn run_task(
    channel: &Channel,
    task: &pb::Task,
    kind: pb::TaskKind,
    b: &Behaviour,
) -> Result<(), (tonic::Code, String)> {
    let mut round = pb::round_client::RoundClient::new(channel.clone());
    let refusal = |s: tonic::Status| (s.code(), s.message().to_string());
    if kind == pb::TaskKind::Evaluate {
        let (samples, loss, accuracy) = b.evaluation.unwrap_or((1, 0.0, 1.0));
        return round
            .submit_evaluation(for_job(
                &task.job_id,
                pb::SubmitEvaluationRequest {
                    task_token: task.task_token.clone(),
                    metrics: Some(pb::Metrics {
                        loss,
                        accuracy,
                        samples,
                    }),
                },
            ))
            .await
            .map(|_| ())
            .map_err(refusal);
    }
    if b.update == UpdateKind::SecAggCheat {
        return crate::secagg_adversary::cheat(channel, task).await;
    }
    let global = fetch(&mut round, task).await.map_err(refusal)?;
    let registered = b
        .datasets
        .iter()
        .find(|d| d.0 == task.dataset)
        .map(|d| d.1)
        .unwrap_or(1);
    let samples = b.claimed_samples.unwrap_or(registered);
    let header = pb::SubmitUpdateRequest {
        part: Some(pb::submit_update_request::Part::Header(pb::UpdateHeader {
            task_token: task.task_token.clone(),
            samples,
            train: Some(pb::Metrics {
                loss: 0.01,
                accuracy: 1.0,
                samples,
            }),
        })),
    };
    let delta = forge(&global, b.update);
    let mut chunks: Vec<pb::TensorChunk> = match b.update {
        UpdateKind::Compressed(method) => {
            cohort_fl::compress::encode(method, delta, None, 1)
                .map_err(|e| (tonic::Code::Internal, format!("cannot encode: {e}")))?
                .chunks
        }
        _ => cohort_fl::chunk_tensors(&delta, 4096).collect(),
    };
    let middle = chunks.len() / 2;
    match b.update {
        UpdateKind::NanHalfway => {
            let mut data = chunks[middle].data.to_vec();
            data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            chunks[middle].data = data.into();
        }
        UpdateKind::WrongShapeHalfway => {
            if let Some(start) = chunks[middle..].iter_mut().find(|c| !c.shape.is_empty()) {
                start.shape.push(2);
            }
        }
        _ => {}
    }
    let chunks: Vec<pb::SubmitUpdateRequest> = chunks
        .into_iter()
        .map(|c| pb::SubmitUpdateRequest {
            part: Some(pb::submit_update_request::Part::Chunk(c)),
        })
        .collect();
    let (tx, rx) = mpsc::channel(4);
    let stall = b.update;
    tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return;
        }
        let send = match stall {
            UpdateKind::Stall => 0,
            UpdateKind::StallAfterFirstChunk => 1,
            _ => chunks.len(),
        };
        for c in chunks.into_iter().take(send) {
            if tx.send(c).await.is_err() {
                return;
            }
        }
        if matches!(stall, UpdateKind::Stall | UpdateKind::StallAfterFirstChunk) {
            // Keep the stream open, sending nothing, until the server gives up.
            tokio::time::sleep(Duration::from_secs(600)).await;
            drop(tx);
        }
    });
    round
        .submit_update(for_job(
            &task.job_id,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .map(|_| ())
        .map_err(refusal)
}

async fn fetch(
    round: &mut pb::round_client::RoundClient<Channel>,
    task: &pb::Task,
) -> Result<Vec<NamedTensor>, tonic::Status> {
    let mut stream = round
        .fetch_model(for_job(
            &task.job_id,
            pb::FetchModelRequest {
                task_token: task.task_token.clone(),
            },
        ))
        .await?
        .into_inner();
    let mut asm = cohort_fl::TensorAssembler::new(None, 1 << 26);
    while let Some(chunk) = stream.next().await {
        asm.push(chunk?)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
    }
    asm.finish()
        .map_err(|e| tonic::Status::internal(e.to_string()))
}

/// The update the adversary sends for `global`.
pub fn forge(global: &[NamedTensor], kind: UpdateKind) -> Vec<NamedTensor> {
    let total: usize = global.iter().map(|t| t.data.len()).sum();
    let per_value = match kind {
        UpdateKind::Noise { norm } => norm / (total.max(1) as f32).sqrt(),
        UpdateKind::Constant(v) => v,
        UpdateKind::Stall | UpdateKind::StallAfterFirstChunk | UpdateKind::SecAggCheat => 0.0,
        UpdateKind::NanHalfway | UpdateKind::WrongShapeHalfway | UpdateKind::Compressed(_) => 1e-3,
    };
    global
        .iter()
        .map(|t| NamedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: (0..t.data.len())
                .map(|i| match kind {
                    UpdateKind::Noise { .. } if i % 2 == 1 => -per_value,
                    _ => per_value,
                })
                .collect(),
        })
        .collect()
}
