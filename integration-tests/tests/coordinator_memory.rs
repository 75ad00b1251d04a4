//! Coordinator memory is O(model), not O(model × parties): in a round where more parties than
//! the coordinator has upload slots fetch a model of tens of MB and then upload their updates
//! all at once, the coordinator's peak resident memory (VmHWM) grows by a few model copies and
//! a few MiB of stream buffers per party, far below one model per party.
//!
//! The parties are played by the test over the real protocol (party certificates of the
//! federation's CA, sessions and round calls through the proxy, mutual TLS on every hop), so
//! many of them cost the test only streaming, not a trainer each.

use std::sync::Arc;
use std::time::Duration;

use cohort_core::NamedTensor;
use cohort_integration_tests::adversary::{for_job, party_channel, party_files};
use cohort_integration_tests::{Federation, Storage, coordinator_pids, wait_clients};
use cohort_proto::v1 as pb;
use cohort_runtime::Channel;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};

/// Parties in the round, all fetching, then all uploading, at once.
const PARTIES: u64 = 16;
/// The coordinator's `--max-concurrent-uploads` in this test.
const SLOTS: u64 = 2;
/// A digits MLP 64 → 2500 → 2500 → 10: 6 440 010 f32, 25.8 MB.
const HIDDEN: u32 = 2500;
const MIB: u64 = 1 << 20;

// What the coordinator may add to its resident memory in each phase of the round.
//
// Fetches: the global model is shared; each fetch streams it chunk by chunk, holding at most
// the chunks queued for it (4 of 1 MiB), the one being encoded and the HTTP/2 and TLS send
// buffers (about 9 MiB were measured), plus slack for freed buffers the allocator keeps.
const FETCH_BUFFERS_PER_PARTY: u64 = 12 * MIB;
// Uploads: the updates being received (one per slot), the round's sum in f64 (two models),
// and slack for an update being folded after its slot was freed and for freed update buffers
// the allocator keeps for reuse (two models). An upload waiting for a slot holds only its
// first chunk, its decoder's buffer and its HTTP/2 stream window (1 MiB each).
const SUM_COPIES: u64 = 2;
const SLACK_COPIES: u64 = 2;
const WAITING_UPLOAD_BUFFERS_PER_PARTY: u64 = 4 * MIB;

const WAIT: Duration = Duration::from_secs(60);

/// A field of /proc/<pid>/status in bytes (it is given in kB).
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Uploads `bytes` as a version of `name` in 1 MiB parts (one message would exceed gRPC's
/// message size limit).
async fn upload_in_parts(fed: &Federation, name: &str, bytes: &[u8]) -> pb::ModelVersion {
    let header = pb::UploadVersionRequest {
        part: Some(pb::upload_version_request::Part::Header(pb::UploadHeader {
            name: name.to_string(),
            ..Default::default()
        })),
    };
    let parts: Vec<pb::UploadVersionRequest> = std::iter::once(header)
        .chain(
            bytes
                .chunks(cohort_fl::CHUNK_BYTES)
                .map(|c| pb::UploadVersionRequest {
                    part: Some(pb::upload_version_request::Part::Data(c.to_vec().into())),
                }),
        )
        .collect();
    timeout(
        WAIT,
        fed.models().upload_version(futures::stream::iter(parts)),
    )
    .await
    .expect("the model upload ends in time")
    .expect("model upload")
    .into_inner()
}

/// A party played by the test: a registered session that keeps sending heartbeats.
struct Party {
    name: String,
    channel: Channel,
    out: mpsc::Sender<pb::PartyMessage>,
    inbound: tonic::Streaming<pb::ServerMessage>,
    heartbeat: JoinHandle<()>,
}

impl Drop for Party {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Party {
    async fn connect(fed: &Federation, dir: &std::path::Path, name: &str) -> Party {
        let files = party_files(fed, dir, name);
        let channel = party_channel(fed, &files);
        let (out, rx) = mpsc::channel(16);
        out.send(pb::PartyMessage {
            kind: Some(pb::party_message::Kind::Register(pb::Register {
                party: name.to_string(),
                datasets: vec![pb::DatasetInfo {
                    name: "digits".into(),
                    samples: 100,
                    features: 64,
                    classes: 10,
                }],
                resources: Some(pb::Resources {
                    cpus: 1,
                    memory_bytes: 1 << 30,
                    gpus: 0,
                    max_tasks: 2,
                    free: None,
                    gpu_devices: Vec::new(),
                }),
                running_tasks: Vec::new(),
            })),
        })
        .await
        .expect("queue the registration");
        let mut inbound = timeout(
            WAIT,
            pb::party_session_client::PartySessionClient::new(channel.clone())
                .open(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .expect("the session opens in time")
        .expect("session")
        .into_inner();
        match timeout(WAIT, inbound.next()).await {
            Ok(Some(Ok(pb::ServerMessage {
                kind: Some(pb::server_message::Kind::Registered(_)),
            }))) => {}
            other => panic!("{name}: unexpected first session message: {other:?}"),
        }
        let heartbeat = tokio::spawn({
            let out = out.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let beat = pb::PartyMessage {
                        kind: Some(pb::party_message::Kind::Heartbeat(pb::Heartbeat {
                            resources: None,
                            running_tasks: 0,
                        })),
                    };
                    if out.send(beat).await.is_err() {
                        return;
                    }
                }
            }
        });
        Party {
            name: name.to_string(),
            channel,
            out,
            inbound,
            heartbeat,
        }
    }

    /// The next training offer, accepted.
    async fn accept_training(&mut self) -> pb::Task {
        let deadline = Instant::now() + WAIT;
        loop {
            let msg = timeout_at(deadline, self.inbound.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no training offer in time", self.name))
                .expect("session open")
                .expect("session message");
            let Some(pb::server_message::Kind::Offer(offer)) = msg.kind else {
                continue;
            };
            let task = offer.task.clone().expect("an offer carries its task");
            let take = task.kind == pb::TaskKind::Train as i32;
            self.out
                .send(pb::PartyMessage {
                    kind: Some(pb::party_message::Kind::OfferReply(pb::OfferReply {
                        offer_id: offer.offer_id,
                        accepted: take,
                        reason: if take { String::new() } else { "no".into() },
                    })),
                })
                .await
                .expect("answer the offer");
            if take {
                return task;
            }
        }
    }

    fn round(&self) -> pb::round_client::RoundClient<Channel> {
        pb::round_client::RoundClient::new(self.channel.clone())
    }

    /// Streams the global model and returns how many bytes of weights it had (keeping none).
    async fn fetch(&self, task: &pb::Task) -> u64 {
        let mut stream = self
            .round()
            .fetch_model(for_job(
                &task.job_id,
                pb::FetchModelRequest {
                    task_token: task.task_token.clone(),
                },
            ))
            .await
            .unwrap_or_else(|s| panic!("{}: fetch refused: {s}", self.name))
            .into_inner();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap_or_else(|s| panic!("{}: fetch broke: {s}", self.name));
            bytes += chunk.data.len() as u64;
        }
        bytes
    }

    /// Uploads `delta` as the task's update, streamed a chunk at a time.
    async fn submit(&self, task: &pb::Task, delta: Arc<Vec<NamedTensor>>) -> pb::Ack {
        let (tx, rx) = mpsc::channel(2);
        let header = pb::SubmitUpdateRequest {
            part: Some(pb::submit_update_request::Part::Header(pb::UpdateHeader {
                task_token: task.task_token.clone(),
                samples: 100,
                train: Some(pb::Metrics {
                    loss: 0.5,
                    accuracy: 0.5,
                    samples: 100,
                }),
            })),
        };
        let producer = tokio::spawn(async move {
            if tx.send(header).await.is_err() {
                return;
            }
            for chunk in cohort_fl::chunk_tensors(&delta, cohort_fl::CHUNK_BYTES) {
                let msg = pb::SubmitUpdateRequest {
                    part: Some(pb::submit_update_request::Part::Chunk(chunk)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let ack = self
            .round()
            .submit_update(for_job(
                &task.job_id,
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .await
            .unwrap_or_else(|s| panic!("{}: update refused: {s}", self.name))
            .into_inner();
        producer.abort();
        ack
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_round_with_more_parties_than_upload_slots_keeps_the_coordinator_o_model() {
    let fed = Federation::start_with(
        0,
        Storage {
            env: vec![("COHORT_MAX_CONCURRENT_UPLOADS".into(), SLOTS.to_string())],
            ..Storage::default()
        },
    )
    .await
    .expect("federation");
    let dir = tempfile::tempdir().expect("temp dir");

    // The job starts from a model of tens of MB stored in model-manager (`model.init`).
    let spec = cohort_core::spec::ModelSpec {
        arch: cohort_core::spec::Arch::Mlp,
        hidden: vec![HIDDEN, HIDDEN],
        init: None,
        name: None,
        params: None,
        layers: None,
    };
    let weights = cohort_train::init_model(&spec, 64, 10, 5).expect("weights");
    let model: u64 = weights.iter().map(|t| t.data.len() as u64 * 4).sum();
    let encoded = cohort_fl::to_safetensors(&weights).expect("safetensors");
    upload_in_parts(&fed, "big", &encoded).await;
    drop(encoded);
    // Every party sends the same small step (one copy in the test process).
    let delta: Arc<Vec<NamedTensor>> = Arc::new(
        weights
            .into_iter()
            .map(|t| NamedTensor {
                data: vec![1e-4; t.data.len()],
                ..t
            })
            .collect(),
    );

    let mut parties = Vec::new();
    for i in 0..PARTIES {
        parties.push(Party::connect(&fed, dir.path(), &format!("party-{i:02}")).await);
    }
    wait_clients(&fed.api(), WAIT, |c| {
        c.iter().filter(|c| c.connected).count() as u64 == PARTIES
    })
    .await;

    // Round 1 takes every party's update; round 2 begins only once round 1's model is stored
    // and the round recorded, so the peak read then covers all of round 1.
    let job = fed
        .create_job(&format!(
            "name: memory\n\
             model: {{arch: mlp, hidden: [{HIDDEN}, {HIDDEN}], init: \"big@1\"}}\n\
             data: {{dataset: digits}}\n\
             training: {{epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.1}}}}\n\
             rounds: 2\n\
             evaluation: {{every: 2}}\n\
             clients: {{per_round: {PARTIES}, min: {PARTIES}, round_timeout: 120s}}\n"
        ))
        .await
        .expect("create job");
    let tasks: Vec<pb::Task> = timeout(
        WAIT,
        futures::future::join_all(parties.iter_mut().map(|p| p.accept_training())),
    )
    .await
    .expect("every party is offered training");

    let pid = {
        let deadline = Instant::now() + WAIT;
        loop {
            let pids = coordinator_pids(&job.id);
            match pids[..] {
                [pid] => break pid,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => panic!("one coordinator of {} expected, found {pids:?}", job.id),
            }
        }
    };
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("coordinator environ");
    let slots_setting = format!("COHORT_MAX_CONCURRENT_UPLOADS={SLOTS}");
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == slots_setting.as_bytes()),
        "the coordinator runs with {slots_setting}"
    );
    let rss = |what: &str| status_bytes(pid, "VmRSS").unwrap_or_else(|| panic!("VmRSS {what}"));
    let peak = |what: &str| status_bytes(pid, "VmHWM").unwrap_or_else(|| panic!("VmHWM {what}"));
    let copies = |bytes: u64| bytes as f64 / model as f64;

    // Fetches: every party streams the whole model at once.
    let base = rss("before the fetches");
    assert!(
        base > model,
        "the coordinator holds the {:.1} MB model: it has {:.1} MB resident",
        mb(model),
        mb(base)
    );
    let started = Instant::now();
    let fetched = timeout(
        Duration::from_secs(120),
        futures::future::join_all(parties.iter().zip(&tasks).map(|(p, t)| p.fetch(t))),
    )
    .await
    .expect("the fetches end in time");
    assert!(
        fetched.iter().all(|b| *b == model),
        "every party fetched the whole model ({model} bytes): {fetched:?}"
    );
    let fetch_time = started.elapsed();
    let fetch_peak = peak("after the fetches");
    let fetch_bound = base + SLACK_COPIES * model + PARTIES * FETCH_BUFFERS_PER_PARTY;
    // A coordinator that copied or encoded the model for each fetch would exceed it.
    assert!(fetch_bound < base + PARTIES * model);

    // Uploads: every party sends its update at once; SLOTS of them are received at a time.
    // The peak is measured afresh from here ("5" resets VmHWM to the current VmRSS).
    let clear_refs = format!("/proc/{pid}/clear_refs");
    std::fs::write(&clear_refs, "5").unwrap_or_else(|e| panic!("{clear_refs}: {e}"));
    let upload_base = rss("before the uploads");
    let started = Instant::now();
    let acks = timeout(
        Duration::from_secs(120),
        futures::future::join_all(
            parties
                .iter()
                .zip(&tasks)
                .map(|(p, t)| p.submit(t, delta.clone())),
        ),
    )
    .await
    .expect("the uploads end in time");
    assert_eq!(acks.len() as u64, PARTIES);
    let upload_time = started.elapsed();
    let recorded = fed
        .wait_job(&job.id, WAIT, "round 1 to be recorded", |j| {
            j.rounds_completed >= 1
        })
        .await
        .expect("round 1 recorded");
    let upload_peak = peak("once round 1 is recorded");
    let round = recorded.rounds.first().expect("round 1");
    assert_eq!(
        (round.updates, round.dropped_updates, round.refused_updates),
        (PARTIES as u32, 0, 0),
        "round 1 folded every party's update"
    );
    let upload_bound = upload_base
        + (SLOTS + SUM_COPIES + SLACK_COPIES) * model
        + PARTIES * WAITING_UPLOAD_BUFFERS_PER_PARTY;
    // A coordinator that held every party's update would exceed it.
    assert!(upload_bound < upload_base + PARTIES * model);

    eprintln!(
        "coordinator memory, {PARTIES} parties, {SLOTS} upload slots, a {:.1} MB model: \
         fetches +{:.1} MB ({:.2} models; bound +{:.1} MB) in {fetch_time:.1?}, \
         uploads and round 1 +{:.1} MB ({:.2} models; bound +{:.1} MB) in {upload_time:.1?}",
        mb(model),
        mb(fetch_peak.saturating_sub(base)),
        copies(fetch_peak.saturating_sub(base)),
        mb(fetch_bound - base),
        mb(upload_peak.saturating_sub(upload_base)),
        copies(upload_peak.saturating_sub(upload_base)),
        mb(upload_bound - upload_base),
    );
    assert!(
        fetch_peak <= fetch_bound,
        "{PARTIES} fetches took the coordinator from {:.1} MB to a peak of {:.1} MB, over \
         {:.1} MB",
        mb(base),
        mb(fetch_peak),
        mb(fetch_bound)
    );
    assert!(
        upload_peak <= upload_bound,
        "{PARTIES} uploads and round 1's aggregation took the coordinator from {:.1} MB to a \
         peak of {:.1} MB ({:.2} models more), over {:.1} MB ({SLOTS} slots + \
         {SUM_COPIES} + {SLACK_COPIES} models + {PARTIES} × {} MiB)",
        mb(upload_base),
        mb(upload_peak),
        copies(upload_peak.saturating_sub(upload_base)),
        mb(upload_bound),
        WAITING_UPLOAD_BUFFERS_PER_PARTY / MIB,
    );
}
