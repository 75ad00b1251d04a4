//! client-selector over real gRPC on loopback, with a real store (SQLite in a
//! temporary directory; for the database outage, a private PostgreSQL
//! cluster the test stops and starts) and fake parties: real PartySession
//! streams, driven by the test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use cohort_client_selector::registry::{
    MAX_LISTED_TASKS, PARTY_DISCONNECTED, PARTY_RECONNECTED_WITHOUT_IT, task_seed,
};
use cohort_client_selector::{Args, RegistrationLimits, Settings, serve_in_process};
use cohort_core::PartyId;
use cohort_proto::v1::client_selector_client::ClientSelectorClient;
use cohort_proto::v1::party_session_client::PartySessionClient;
use cohort_proto::v1::*;
use cohort_store::clients::{ClientStore, SqliteClientStore};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tonic::Code;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(20);

/// The default `--reconnect-grace`.
const GRACE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(DEADLINE, what, fut).await
}

async fn within_for<T>(deadline: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {deadline:?}"))
}

/// Polls `check` until it returns Some, or panics after the deadline.
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_for(DEADLINE, what, check).await
}

async fn eventually_for<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within_for(deadline, what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

struct Server {
    _dir: Option<tempfile::TempDir>,
    addr: SocketAddr,
    selector: ClientSelectorClient<Channel>,
    _stop: oneshot::Sender<()>,
}

async fn start(limits: RegistrationLimits) -> Server {
    start_with(limits, GRACE).await
}

async fn start_with(limits: RegistrationLimits, reconnect_grace: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("clients.db").display());
    let store = Arc::new(SqliteClientStore::open(&url).await.unwrap());
    let settings = Settings {
        // Long enough that no test session ends for silence.
        heartbeat_interval: Duration::from_secs(60),
        reconnect_grace,
        limits,
    };
    let mut server = serve(store, settings).await;
    server._dir = Some(dir);
    server
}

async fn serve(store: Arc<dyn ClientStore>, settings: Settings) -> Server {
    let (addr, stop) = serve_in_process(store, settings).await.unwrap();
    let selector = within(
        "connect",
        ClientSelectorClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap();
    Server {
        _dir: None,
        addr,
        selector,
        _stop: stop,
    }
}

fn dataset(name: &str, samples: u64, features: u32, classes: u32) -> DatasetInfo {
    DatasetInfo {
        name: name.into(),
        samples,
        features,
        classes,
    }
}

fn message(kind: party_message::Kind) -> PartyMessage {
    PartyMessage { kind: Some(kind) }
}

/// How a fake party answers offers.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Accept,
    Silent,
}

/// A party: a real PartySession stream whose offers are answered by a task
/// of the test and recorded, as are the Cancels it is sent.
struct FakeParty {
    name: String,
    out: mpsc::Sender<PartyMessage>,
    offers: Arc<Mutex<Vec<Offer>>>,
    cancels: Arc<Mutex<Vec<Cancel>>>,
    reader: tokio::task::JoinHandle<()>,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
}

type Session = (mpsc::Sender<PartyMessage>, tonic::Streaming<ServerMessage>);

impl FakeParty {
    async fn register(
        addr: SocketAddr,
        name: &str,
        datasets: Vec<DatasetInfo>,
    ) -> Result<Session, tonic::Status> {
        Self::register_listing(addr, name, datasets, vec![]).await
    }

    /// Registers saying the party still runs `running_tasks`.
    async fn register_listing(
        addr: SocketAddr,
        name: &str,
        datasets: Vec<DatasetInfo>,
        running_tasks: Vec<String>,
    ) -> Result<Session, tonic::Status> {
        Self::register_full(addr, name, datasets, running_tasks, None).await
    }

    async fn register_full(
        addr: SocketAddr,
        name: &str,
        datasets: Vec<DatasetInfo>,
        running_tasks: Vec<String>,
        resources: Option<Resources>,
    ) -> Result<Session, tonic::Status> {
        let mut client = PartySessionClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (out, rx) = mpsc::channel(256);
        out.send(message(party_message::Kind::Register(Register {
            party: name.into(),
            datasets,
            resources,
            running_tasks,
        })))
        .await
        .unwrap();
        let mut inbound = within(
            "Open",
            client.open(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await?
        .into_inner();
        match within("Registered", inbound.next()).await {
            Some(Ok(ServerMessage {
                kind: Some(server_message::Kind::Registered(r)),
            })) => assert_eq!(r.party, name),
            Some(Err(status)) => return Err(status),
            other => panic!("expected Registered, got {other:?}"),
        }
        Ok((out, inbound))
    }

    async fn connect(addr: SocketAddr, name: &str, datasets: Vec<DatasetInfo>) -> Self {
        Self::answering(addr, name, datasets, Answer::Accept).await
    }

    async fn answering(
        addr: SocketAddr,
        name: &str,
        datasets: Vec<DatasetInfo>,
        answer: Answer,
    ) -> Self {
        Self::open(addr, name, datasets, answer, vec![]).await
    }

    /// Registers again after a lost session, listing the tasks it still runs.
    async fn rejoin(
        addr: SocketAddr,
        name: &str,
        datasets: Vec<DatasetInfo>,
        running_tasks: &[&str],
    ) -> Self {
        let listed = running_tasks.iter().map(|s| s.to_string()).collect();
        Self::open(addr, name, datasets, Answer::Accept, listed).await
    }

    async fn open(
        addr: SocketAddr,
        name: &str,
        datasets: Vec<DatasetInfo>,
        answer: Answer,
        running_tasks: Vec<String>,
    ) -> Self {
        Self::open_full(addr, name, datasets, answer, running_tasks, None).await
    }

    /// A party that registers `resources` (with what is free in them).
    async fn with_resources(
        addr: SocketAddr,
        name: &str,
        answer: Answer,
        resources: Resources,
    ) -> Self {
        Self::open_full(addr, name, digits(), answer, vec![], Some(resources)).await
    }

    async fn open_full(
        addr: SocketAddr,
        name: &str,
        datasets: Vec<DatasetInfo>,
        answer: Answer,
        running_tasks: Vec<String>,
        resources: Option<Resources>,
    ) -> Self {
        let (out, mut inbound) =
            Self::register_full(addr, name, datasets, running_tasks, resources)
                .await
                .unwrap();
        let offers = Arc::new(Mutex::new(Vec::new()));
        let cancels = Arc::new(Mutex::new(Vec::new()));
        let (seen, cancelled, replies) = (offers.clone(), cancels.clone(), out.clone());
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                match msg.kind {
                    Some(server_message::Kind::Offer(offer)) => {
                        seen.lock().unwrap().push(offer.clone());
                        if answer == Answer::Accept {
                            let reply = OfferReply {
                                offer_id: offer.offer_id,
                                accepted: true,
                                reason: String::new(),
                            };
                            let _ = replies
                                .send(message(party_message::Kind::OfferReply(reply)))
                                .await;
                        }
                    }
                    Some(server_message::Kind::Cancel(c)) => cancelled.lock().unwrap().push(c),
                    _ => {}
                }
            }
        });
        Self {
            name: name.into(),
            out,
            offers,
            cancels,
            reader,
            heartbeats: None,
        }
    }

    /// Sends a heartbeat every `interval` until the party disconnects.
    fn beat_every(&mut self, interval: Duration) {
        let out = self.out.clone();
        self.heartbeats = Some(tokio::spawn(async move {
            loop {
                let beat = party_message::Kind::Heartbeat(Heartbeat {
                    resources: None,
                    running_tasks: 1,
                });
                if out.send(message(beat)).await.is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        }));
    }

    fn offers(&self) -> Vec<Offer> {
        self.offers.lock().unwrap().clone()
    }

    fn cancels(&self) -> Vec<Cancel> {
        self.cancels.lock().unwrap().clone()
    }

    async fn send(&self, kind: party_message::Kind) {
        self.out.send(message(kind)).await.unwrap();
    }

    async fn status(&self, task_id: &str, phase: TaskPhase, text: &str) {
        self.send(party_message::Kind::TaskStatus(TaskStatus {
            task_id: task_id.into(),
            phase: phase as i32,
            message: text.into(),
        }))
        .await;
    }

    /// Ends the session as a crashed party would: the stream closes.
    fn disconnect(self) {
        self.reader.abort();
        if let Some(h) = &self.heartbeats {
            h.abort();
        }
        drop(self.out);
    }
}

fn offer_request(round: u32, count: u32, seed: u64) -> OfferTasksRequest {
    OfferTasksRequest {
        job_id: "job-1".into(),
        round,
        kind: TaskKind::Train as i32,
        dataset: "digits".into(),
        count,
        selection: "random".into(),
        template: Some(Task {
            seed,
            ..Default::default()
        }),
        reply_timeout_ms: 5_000,
        exclude: vec![],
        task_tokens: (0..count).map(|i| format!("{i:0>40}")).collect(),
        features: 0,
        classes: 0,
        gpus: 0,
    }
}

async fn offer(server: &Server, req: OfferTasksRequest) -> OfferTasksResponse {
    within("OfferTasks", server.selector.clone().offer_tasks(req))
        .await
        .unwrap()
        .into_inner()
}

async fn task_states(server: &Server, ids: &[&str]) -> TaskStatesResponse {
    within(
        "TaskStates",
        server.selector.clone().task_states(TaskStatesRequest {
            task_ids: ids.iter().map(|s| s.to_string()).collect(),
        }),
    )
    .await
    .unwrap()
    .into_inner()
}

/// The accepted task of `party` in a response.
fn task_of<'a>(resp: &'a OfferTasksResponse, party: &str) -> &'a AcceptedTask {
    resp.accepted
        .iter()
        .find(|a| a.party == party)
        .unwrap_or_else(|| panic!("{party} did not accept: {resp:?}"))
}

/// The seed in the offer `party` received for `task_id`.
fn seed_of(party: &FakeParty, task_id: &str) -> u64 {
    party
        .offers()
        .iter()
        .filter_map(|o| o.task.as_ref())
        .find(|t| t.task_id == task_id)
        .unwrap_or_else(|| panic!("{} saw no offer of {task_id}", party.name))
        .seed
}

#[tokio::test]
async fn a_registration_over_any_bound_is_refused_naming_the_field() {
    let server = start(RegistrationLimits::default()).await;
    let ok = || dataset("digits", 1_000, 64, 10);
    let cases: Vec<(Vec<DatasetInfo>, &str, &str)> = vec![
        (
            vec![ok(), dataset("big", 1_000_000_001, 64, 10)],
            "register.datasets[1].samples",
            "1000000000",
        ),
        (
            vec![dataset("none", 0, 64, 10)],
            "register.datasets[0].samples",
            "1000000000",
        ),
        (
            (0..65)
                .map(|i| dataset(&format!("d{i}"), 10, 4, 2))
                .collect(),
            "register.datasets",
            "64",
        ),
        (
            vec![dataset(&"n".repeat(129), 10, 4, 2)],
            "register.datasets[0].name",
            "128",
        ),
        (
            vec![ok(), dataset("../etc", 10, 4, 2)],
            "register.datasets[1].name",
            "128",
        ),
        (
            vec![dataset("wide", 10, 1_000_001, 2)],
            "register.datasets[0].features",
            "1000000",
        ),
        (
            vec![dataset("many", 10, 4, 100_001)],
            "register.datasets[0].classes",
            "100000",
        ),
        (
            vec![dataset("one", 10, 4, 1)],
            "register.datasets[0].classes",
            "100000",
        ),
        (
            vec![ok(), ok()],
            "register.datasets[1].name",
            "listed twice",
        ),
    ];
    for (i, (datasets, field, limit)) in cases.into_iter().enumerate() {
        let name = format!("greedy-{i}");
        let status = FakeParty::register(server.addr, &name, datasets)
            .await
            .map(|_| ())
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            status.message()
        );
        assert!(
            status.message().contains(limit),
            "{field}: {}",
            status.message()
        );
    }
    // Exactly at every bound is accepted.
    let mut at_limits: Vec<DatasetInfo> = (0..63)
        .map(|i| dataset(&format!("d{i}"), 10, 4, 2))
        .collect();
    at_limits.push(dataset(&"n".repeat(128), 1_000_000_000, 1_000_000, 100_000));
    let honest = FakeParty::connect(server.addr, "honest", at_limits).await;
    // Refused parties were never recorded; the accepted one was.
    let listed = within(
        "ListClients",
        server.selector.clone().list_clients(ListClientsRequest {}),
    )
    .await
    .unwrap()
    .into_inner();
    let names: Vec<&str> = listed.clients.iter().map(|c| c.party.as_str()).collect();
    assert_eq!(names, ["honest"]);
    assert_eq!(listed.clients[0].datasets.len(), 64);
    drop(honest);
}

#[tokio::test]
async fn configured_limits_replace_the_defaults() {
    let server = start(RegistrationLimits {
        max_datasets: 1,
        max_samples: 500,
        max_features: 8,
        max_classes: 3,
        ..RegistrationLimits::default()
    })
    .await;
    for (datasets, field) in [
        (
            vec![dataset("a", 501, 8, 3)],
            "register.datasets[0].samples",
        ),
        (
            vec![dataset("a", 500, 9, 3)],
            "register.datasets[0].features",
        ),
        (
            vec![dataset("a", 500, 8, 4)],
            "register.datasets[0].classes",
        ),
        (
            vec![dataset("a", 1, 1, 2), dataset("b", 1, 1, 2)],
            "register.datasets",
        ),
    ] {
        let status = FakeParty::register(server.addr, "p", datasets)
            .await
            .map(|_| ())
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    FakeParty::register(server.addr, "p", vec![dataset("a", 500, 8, 3)])
        .await
        .unwrap();
}

#[test]
fn limit_flags_have_defaults_and_are_checked_at_start() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["client-selector", "--database-url", "sqlite://unused.db"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    };
    let settings = parse(&[]).settings().unwrap();
    assert_eq!(settings.reconnect_grace, GRACE);
    assert_eq!(settings.limits, RegistrationLimits::default());
    assert_eq!(
        settings.limits,
        RegistrationLimits {
            max_datasets: 64,
            max_samples: 1_000_000_000,
            max_features: 1_000_000,
            max_classes: 100_000,
            max_cpus: 65_536,
            max_memory_bytes: 1 << 50,
            max_gpus: 4096,
            max_tasks: 4096,
        }
    );
    let set = parse(&[
        "--max-dataset-samples",
        "7",
        "--max-datasets-per-party",
        "2",
        "--max-dataset-features",
        "3",
        "--max-dataset-classes",
        "4",
    ])
    .settings()
    .unwrap();
    assert_eq!(
        set.limits,
        RegistrationLimits {
            max_datasets: 2,
            max_samples: 7,
            max_features: 3,
            max_classes: 4,
            ..RegistrationLimits::default()
        }
    );
    let no_grace = parse(&["--reconnect-grace", "0s"]).settings().unwrap();
    assert_eq!(no_grace.reconnect_grace, Duration::ZERO);
    for (flag, value) in [
        ("--reconnect-grace", "61m"),
        ("--max-dataset-samples", "0"),
        ("--max-datasets-per-party", "0"),
        ("--max-dataset-features", "0"),
        ("--max-dataset-classes", "1"),
    ] {
        let err = parse(&[flag, value]).settings().unwrap_err().to_string();
        assert!(err.starts_with(flag), "{flag}: {err}");
    }
}

#[tokio::test]
async fn describe_dataset_lists_every_holder_and_takes_the_majority_shape() {
    let mut server = start(RegistrationLimits::default()).await;
    // Registered out of order; the odd one out has the most samples.
    let _c = FakeParty::connect(server.addr, "party-c", vec![dataset("digits", 200, 64, 10)]).await;
    let _a = FakeParty::connect(server.addr, "party-a", vec![dataset("digits", 100, 64, 10)]).await;
    let _b = FakeParty::connect(
        server.addr,
        "party-b",
        vec![dataset("digits", 5_000, 3, 10), dataset("other", 1, 1, 2)],
    )
    .await;
    let summary = within(
        "DescribeDataset",
        server.selector.describe_dataset(DescribeDatasetRequest {
            name: "digits".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(summary.name, "digits");
    assert_eq!((summary.features, summary.classes), (64, 10));
    assert_eq!((summary.parties, summary.samples), (3, 5_300));
    let holders: Vec<(&str, u64, u32, u32)> = summary
        .holders
        .iter()
        .map(|h| (h.party.as_str(), h.samples, h.features, h.classes))
        .collect();
    assert_eq!(
        holders,
        [
            ("party-a", 100, 64, 10),
            ("party-b", 5_000, 3, 10),
            ("party-c", 200, 64, 10),
        ]
    );

    let missing = within(
        "DescribeDataset",
        server.selector.describe_dataset(DescribeDatasetRequest {
            name: "mnist".into(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn offer_tasks_with_a_shape_offers_only_parties_whose_data_fits() {
    let server = start(RegistrationLimits::default()).await;
    let a = FakeParty::connect(server.addr, "party-a", vec![dataset("digits", 100, 64, 10)]).await;
    let b = FakeParty::connect(
        server.addr,
        "party-b",
        vec![dataset("digits", 5_000, 3, 10)],
    )
    .await;
    let c = FakeParty::connect(server.addr, "party-c", vec![dataset("digits", 200, 64, 9)]).await;

    let mut req = offer_request(1, 3, 0);
    req.features = 64;
    req.classes = 10;
    let resp = offer(&server, req).await;
    let accepted: BTreeSet<&str> = resp.accepted.iter().map(|t| t.party.as_str()).collect();
    assert_eq!(accepted, BTreeSet::from(["party-a"]));
    assert_eq!(task_of(&resp, "party-a").samples, 100);
    assert!(resp.refused.is_empty(), "{:?}", resp.refused);
    assert!(b.offers().is_empty(), "party-b was offered a task");
    assert!(c.offers().is_empty(), "party-c was offered a task");

    // Features alone: party-c's 9 classes are not asked about.
    let mut req = offer_request(2, 3, 0);
    req.features = 64;
    let resp = offer(&server, req).await;
    let accepted: BTreeSet<&str> = resp.accepted.iter().map(|t| t.party.as_str()).collect();
    assert_eq!(accepted, BTreeSet::from(["party-a", "party-c"]));
    assert!(b.offers().is_empty(), "party-b was offered a task");

    // Without a shape everyone holding the dataset is a candidate.
    let resp = offer(&server, offer_request(3, 3, 0)).await;
    assert_eq!(resp.accepted.len(), 3, "{resp:?}");
    assert_eq!(b.offers().len(), 1);
    assert_eq!((a.offers().len(), c.offers().len()), (3, 2));
}

#[tokio::test]
async fn task_states_carry_the_reason_a_party_gave_and_disconnects() {
    // No reconnect grace: a task fails when its party's session ends.
    let server = start_with(RegistrationLimits::default(), Duration::ZERO).await;
    let a = FakeParty::connect(server.addr, "party-a", vec![dataset("digits", 100, 64, 10)]).await;
    let b = FakeParty::connect(server.addr, "party-b", vec![dataset("digits", 100, 64, 10)]).await;
    let resp = offer(&server, offer_request(1, 2, 0)).await;
    let task_a = task_of(&resp, "party-a").task_id.clone();
    let task_b = task_of(&resp, "party-b").task_id.clone();

    let before = task_states(&server, &[&task_a, &task_b, "job-1-r1-nope"]).await;
    assert_eq!(before.phases[&task_a], TaskPhase::Running as i32);
    assert_eq!(
        before.phases["job-1-r1-nope"],
        TaskPhase::Unspecified as i32
    );
    assert!(before.messages.is_empty(), "{:?}", before.messages);

    // party-b forges a failure of party-a's task and of an unknown one,
    // then reports its own (a session's messages are handled in order).
    b.status(&task_a, TaskPhase::Failed, "forged").await;
    b.status("job-1-r1-nope", TaskPhase::Failed, "forged").await;
    let reason = "tensor \"fc0.weight\" has shape [64, 64], the model needs [32, 64]";
    b.status(&task_b, TaskPhase::Failed, reason).await;
    let states = eventually("party-b's failure", || async {
        let s = task_states(&server, &[&task_a, &task_b, "job-1-r1-nope"]).await;
        (s.phases[&task_b] == TaskPhase::Failed as i32).then_some(s)
    })
    .await;
    assert_eq!(states.messages[&task_b], reason);
    assert_eq!(states.phases[&task_a], TaskPhase::Running as i32);
    assert_eq!(
        states.phases["job-1-r1-nope"],
        TaskPhase::Unspecified as i32
    );
    assert_eq!(states.messages.len(), 1, "{:?}", states.messages);

    // A long reason is kept up to 1000 bytes, cut between characters.
    let long = format!("x{}", "é".repeat(2_000));
    a.status(&task_a, TaskPhase::Cancelled, &long).await;
    let kept = eventually("party-a's cancellation", || async {
        let s = task_states(&server, &[&task_a]).await;
        s.messages.get(&task_a).cloned()
    })
    .await;
    assert_eq!(kept.len(), 999);
    assert!(long.starts_with(&kept));

    // A task whose party's session ends fails with that reason.
    let resp = offer(&server, offer_request(2, 1, 0)).await;
    let lost = resp.accepted[0].task_id.clone();
    let lost_party = resp.accepted[0].party.clone();
    let (gone, stays) = if lost_party == "party-a" {
        (a, b)
    } else {
        (b, a)
    };
    gone.disconnect();
    let message = eventually("the disconnect", || async {
        let s = task_states(&server, &[&lost]).await;
        (s.phases[&lost] == TaskPhase::Failed as i32).then(|| s.messages.get(&lost).cloned())
    })
    .await;
    assert_eq!(message.as_deref(), Some(PARTY_DISCONNECTED));
    drop(stays);
}

#[tokio::test]
async fn an_offer_is_answered_only_by_the_party_it_went_to() {
    let server = start(RegistrationLimits::default()).await;
    let silent = FakeParty::answering(
        server.addr,
        "party-a",
        vec![dataset("digits", 100, 64, 10)],
        Answer::Silent,
    )
    .await;
    let hostile = FakeParty::answering(server.addr, "party-b", vec![], Answer::Silent).await;
    // A flood of replies to offers that do not exist, and of statuses for
    // tasks that do not exist, changes nothing.
    for i in 0..2_000 {
        hostile
            .send(party_message::Kind::OfferReply(OfferReply {
                offer_id: format!("offer-{i}"),
                accepted: true,
                reason: String::new(),
            }))
            .await;
        hostile
            .status(&format!("job-1-r1-{i}"), TaskPhase::Failed, "x")
            .await;
    }
    let mut req = offer_request(1, 1, 0);
    req.reply_timeout_ms = 3_000;
    let offering = tokio::spawn({
        let server_selector = server.selector.clone();
        async move {
            within("OfferTasks", server_selector.clone().offer_tasks(req))
                .await
                .unwrap()
                .into_inner()
        }
    });
    let offer_id = eventually("the offer to party-a", || async {
        silent.offers().first().map(|o| o.offer_id.clone())
    })
    .await;
    hostile
        .send(party_message::Kind::OfferReply(OfferReply {
            offer_id,
            accepted: true,
            reason: String::new(),
        }))
        .await;
    let resp = within("OfferTasks", offering).await.unwrap();
    assert!(resp.accepted.is_empty(), "{resp:?}");
    assert!(
        resp.refused["party-a"].starts_with("no answer within"),
        "{resp:?}"
    );
    let states = task_states(
        &server,
        &(0..2_000)
            .map(|i| format!("job-1-r1-{i}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    assert!(states.messages.is_empty());
    assert!(
        states
            .phases
            .values()
            .all(|p| *p == TaskPhase::Unspecified as i32)
    );
}

#[tokio::test]
async fn a_job_seed_gives_each_party_the_same_seed_per_round_on_every_run() {
    let server = start(RegistrationLimits::default()).await;
    let a = FakeParty::connect(server.addr, "party-a", vec![dataset("digits", 100, 64, 10)]).await;
    let b = FakeParty::connect(server.addr, "party-b", vec![dataset("digits", 100, 64, 10)]).await;
    let seeds = |resp: &OfferTasksResponse| {
        (
            seed_of(&a, &task_of(resp, "party-a").task_id),
            seed_of(&b, &task_of(resp, "party-b").task_id),
        )
    };

    let first = seeds(&offer(&server, offer_request(1, 2, 42)).await);
    let again = seeds(&offer(&server, offer_request(1, 2, 42)).await);
    assert_eq!(first, again, "same job seed, party and round");
    assert_ne!(first.0, first.1, "two parties got one seed");
    let train = TaskKind::Train as i32;
    let party_a = PartyId::parse("party-a").unwrap();
    assert_eq!(first.0, task_seed(42, &party_a, 1, train));

    let next_round = seeds(&offer(&server, offer_request(2, 2, 42)).await);
    assert_ne!(next_round.0, first.0);
    assert_ne!(next_round.1, first.1);
    let other_job = seeds(&offer(&server, offer_request(1, 2, 43)).await);
    assert_ne!(other_job.0, first.0);

    // Without a job seed each offer draws a fresh one.
    let random = seeds(&offer(&server, offer_request(1, 2, 0)).await);
    let random_again = seeds(&offer(&server, offer_request(1, 2, 0)).await);
    assert_ne!(random.0, random_again.0);
    assert_ne!(random.1, random_again.1);
}

async fn list_clients(server: &Server) -> Result<Vec<ClientInfo>, tonic::Status> {
    within(
        "ListClients",
        server.selector.clone().list_clients(ListClientsRequest {}),
    )
    .await
    .map(|r| r.into_inner().clients)
}

/// `name`'s record, once `check` holds for it.
async fn client_when(
    server: &Server,
    name: &str,
    what: &str,
    deadline: Duration,
    check: impl Fn(&ClientInfo) -> bool,
) -> ClientInfo {
    eventually_for(deadline, what, || async {
        let clients = list_clients(server).await.ok()?;
        clients.into_iter().find(|c| c.party == name && check(c))
    })
    .await
}

/// Waits until client-selector has noticed that `name`'s session ended.
async fn wait_disconnected(server: &Server, name: &str) {
    client_when(server, name, "the session's end", DEADLINE, |c| {
        !c.connected
    })
    .await;
}

/// Each task's (phase, message).
async fn phases(server: &Server, ids: &[&str]) -> Vec<(TaskPhase, Option<String>)> {
    let states = task_states(server, ids).await;
    ids.iter()
        .map(|id| {
            (
                TaskPhase::try_from(states.phases[*id]).unwrap(),
                states.messages.get(*id).cloned(),
            )
        })
        .collect()
}

fn digits() -> Vec<DatasetInfo> {
    vec![dataset("digits", 100, 64, 10)]
}

/// Offers one more task and waits for the answer: a party's session handles
/// its messages in order, so once `party` has accepted, everything it sent
/// before has been handled.
async fn flush(server: &Server, party: &str, round: u32) {
    let mut req = offer_request(round, 1, 0);
    req.job_id = "job-flush".into();
    req.exclude = list_clients(server)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.party)
        .filter(|p| p != party)
        .collect();
    let resp = offer(server, req).await;
    task_of(&resp, party);
}

#[tokio::test]
async fn a_party_back_within_the_grace_keeps_the_tasks_it_lists_and_fails_the_rest() {
    let server = start(RegistrationLimits::default()).await;
    let a = FakeParty::connect(server.addr, "party-a", digits()).await;
    let b = FakeParty::connect(server.addr, "party-b", digits()).await;
    let first = offer(&server, offer_request(1, 2, 0)).await;
    let kept = task_of(&first, "party-a").task_id.clone();
    let others = task_of(&first, "party-b").task_id.clone();
    let second = offer(&server, offer_request(2, 2, 0)).await;
    let forgotten = task_of(&second, "party-a").task_id.clone();

    a.disconnect();
    wait_disconnected(&server, "party-a").await;
    // Away: its tasks still run, and no offer reaches it.
    assert_eq!(
        phases(&server, &[&kept, &forgotten]).await,
        [(TaskPhase::Running, None), (TaskPhase::Running, None)]
    );
    let third = offer(&server, offer_request(3, 2, 0)).await;
    let accepted: Vec<&str> = third.accepted.iter().map(|t| t.party.as_str()).collect();
    assert_eq!(accepted, ["party-b"], "{third:?}");
    assert!(third.refused.is_empty(), "{third:?}");

    // Back, listing one of its tasks, party-b's and one nobody has. The
    // tasks are settled before Registered is sent, so no polling is needed.
    let a = FakeParty::rejoin(
        server.addr,
        "party-a",
        digits(),
        &[&kept, &others, "job-1-r9-nope"],
    )
    .await;
    assert_eq!(
        phases(&server, &[&kept, &forgotten, &others, "job-1-r9-nope"]).await,
        [
            (TaskPhase::Running, None),
            (
                TaskPhase::Failed,
                Some(PARTY_RECONNECTED_WITHOUT_IT.to_string())
            ),
            (TaskPhase::Running, None),
            (TaskPhase::Unspecified, None),
        ]
    );

    // The new session finishes the kept task, and it counts; listing
    // party-b's task gave party-a no hold on it.
    a.status(&others, TaskPhase::Succeeded, "").await;
    a.status(&kept, TaskPhase::Succeeded, "").await;
    let done = eventually("the kept task's success", || async {
        let p = phases(&server, &[&kept, &others]).await;
        (p[0].0 == TaskPhase::Succeeded).then_some(p)
    })
    .await;
    assert_eq!(done[1], (TaskPhase::Running, None));
    let counted = client_when(&server, "party-a", "party-a's counters", DEADLINE, |c| {
        c.tasks_succeeded == 1 && c.tasks_offered == 2
    })
    .await;
    assert_eq!(counted.tasks_failed, 0);
    assert!(counted.connected);
    assert!(a.cancels().is_empty(), "{:?}", a.cancels());
    let b_record = client_when(&server, "party-b", "party-b's counters", DEADLINE, |c| {
        c.tasks_offered == 3
    })
    .await;
    assert_eq!(b_record.tasks_succeeded, 0);
    drop(b);
}

#[tokio::test]
async fn a_party_away_past_the_grace_fails_its_tasks_and_no_other_party_can_adopt_them() {
    let grace = Duration::from_secs(1);
    let server = start_with(RegistrationLimits::default(), grace).await;
    let a = FakeParty::connect(server.addr, "party-a", digits()).await;
    let b = FakeParty::connect(server.addr, "party-b", digits()).await;
    let first = offer(&server, offer_request(1, 2, 0)).await;
    let task_a = task_of(&first, "party-a").task_id.clone();
    let task_b = task_of(&first, "party-b").task_id.clone();

    let b_left = Instant::now();
    b.disconnect();
    wait_disconnected(&server, "party-b").await;
    assert_eq!(
        phases(&server, &[&task_b]).await,
        [(TaskPhase::Running, None)]
    );
    // party-a drops too, and comes back claiming party-b's task as its own.
    let a_left = Instant::now();
    a.disconnect();
    wait_disconnected(&server, "party-a").await;
    let a = FakeParty::rejoin(server.addr, "party-a", digits(), &[&task_a, &task_b]).await;
    a.status(&task_b, TaskPhase::Succeeded, "").await;

    let failed = eventually("party-b's task to fail", || async {
        let p = phases(&server, &[&task_b]).await.remove(0);
        (p.0 != TaskPhase::Running).then_some(p)
    })
    .await;
    assert_eq!(
        failed,
        (TaskPhase::Failed, Some(PARTY_DISCONNECTED.to_string()))
    );
    assert!(b_left.elapsed() >= grace, "failed before the grace ended");
    // party-a came back in time: its task outlives its own grace.
    tokio::time::sleep(
        (a_left + grace + Duration::from_millis(500)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert_eq!(
        phases(&server, &[&task_a]).await,
        [(TaskPhase::Running, None)]
    );

    // party-b returns still running its failed task: it is told to stop,
    // and what it reports then does not change the failure.
    let b = FakeParty::rejoin(server.addr, "party-b", digits(), &[&task_b]).await;
    let cancel = eventually("the Cancel", || async { b.cancels().first().cloned() }).await;
    assert_eq!(
        (cancel.task_id.as_str(), cancel.reason.as_str()),
        (task_b.as_str(), PARTY_DISCONNECTED)
    );
    b.status(&task_b, TaskPhase::Cancelled, "cancelled").await;
    flush(&server, "party-b", 2).await;
    assert_eq!(
        phases(&server, &[&task_b]).await,
        [(TaskPhase::Failed, Some(PARTY_DISCONNECTED.to_string()))]
    );
    assert!(a.cancels().is_empty(), "{:?}", a.cancels());
}

#[tokio::test]
async fn a_job_cancelled_while_its_party_is_away_ends_at_once_and_the_party_is_told_on_return() {
    let server = start(RegistrationLimits::default()).await;
    let a = FakeParty::connect(server.addr, "party-a", digits()).await;
    let resp = offer(&server, offer_request(1, 1, 0)).await;
    let task = task_of(&resp, "party-a").task_id.clone();
    a.disconnect();
    wait_disconnected(&server, "party-a").await;

    let reason = "job cancelled by an administrator";
    let cancelled = within(
        "CancelJobTasks",
        server
            .selector
            .clone()
            .cancel_job_tasks(CancelJobTasksRequest {
                job_id: "job-1".into(),
                reason: reason.into(),
            }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(cancelled.cancelled, 1);
    assert_eq!(
        phases(&server, &[&task]).await,
        [(TaskPhase::Cancelled, Some(reason.to_string()))]
    );

    let a = FakeParty::rejoin(server.addr, "party-a", digits(), &[&task]).await;
    let cancel = eventually("the Cancel", || async { a.cancels().first().cloned() }).await;
    assert_eq!(
        (cancel.task_id.as_str(), cancel.reason.as_str()),
        (task.as_str(), reason)
    );
    // A success reported after the cancel changes nothing.
    a.status(&task, TaskPhase::Succeeded, "").await;
    flush(&server, "party-a", 2).await;
    assert_eq!(
        phases(&server, &[&task]).await,
        [(TaskPhase::Cancelled, Some(reason.to_string()))]
    );
    assert_eq!(a.cancels().len(), 1);
}

#[tokio::test]
async fn a_register_listing_too_many_or_too_long_task_ids_is_refused() {
    let server = start(RegistrationLimits::default()).await;
    let too_many = (0..=MAX_LISTED_TASKS).map(|i| format!("t{i}")).collect();
    let status = FakeParty::register_listing(server.addr, "p", digits(), too_many)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("register.running_tasks: ")
            && status.message().contains("1024"),
        "{}",
        status.message()
    );
    let long = vec!["ok".to_string(), "t".repeat(257)];
    let status = FakeParty::register_listing(server.addr, "p", digits(), long)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("register.running_tasks[1]: "),
        "{}",
        status.message()
    );
    let at_limit = (0..MAX_LISTED_TASKS)
        .map(|i| format!("{i:0>256}"))
        .collect();
    FakeParty::register_listing(server.addr, "p", digits(), at_limit)
        .await
        .unwrap();
}

/// A PostgreSQL cluster of the test's own (a few lines of
/// integration-tests/src/servers.rs), so that the test can stop and start it.
/// Stopped immediately on drop.
struct PgCluster {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
}

impl PgCluster {
    /// None (the test skips) without `COHORT_PG_BIN`, except in CI.
    fn start() -> Option<PgCluster> {
        let bin = std::path::PathBuf::from(cohort_testkit::require_env(
            "COHORT_PG_BIN",
            "PostgreSQL's bin directory; scripts/test.sh installs PostgreSQL",
        )?);
        let dir = tempfile::Builder::new()
            .prefix("cohort-pg-")
            .tempdir()
            .unwrap();
        let password = format!("pw-{}", std::process::id());
        std::fs::write(dir.path().join("pwfile"), format!("{password}\n")).unwrap();
        if is_root() {
            let mut chown = std::process::Command::new("chown");
            chown.args(["-R", "postgres"]).arg(dir.path());
            run(chown, "chown");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = PgCluster {
            bin,
            dir,
            port,
            password,
        };
        let mut initdb = cluster.command("initdb");
        initdb
            .arg("-D")
            .arg(cluster.dir.path().join("data"))
            .args(["-U", "cohort", "--auth=scram-sha-256"])
            .arg(format!(
                "--pwfile={}",
                cluster.dir.path().join("pwfile").display()
            ));
        run(initdb, "initdb");
        cluster.start_server();
        Some(cluster)
    }

    /// PostgreSQL refuses to run as root: its tools run as `postgres` then.
    fn command(&self, tool: &str) -> std::process::Command {
        if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            std::process::Command::new(self.bin.join(tool))
        }
    }

    fn start_server(&self) {
        let mut c = self.command("pg_ctl");
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
        run(c, "pg_ctl start");
    }

    /// Fast shutdown: clients are disconnected, as in an outage.
    fn stop_server(&self) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        run(c, "pg_ctl stop");
    }

    /// Creates the database `clients`; returns its URL.
    fn create_database(&self) -> String {
        let mut c = self.command("createdb");
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "cohort", "clients"])
            .env("PGPASSWORD", &self.password);
        run(c, "createdb");
        format!(
            "postgres://cohort:{}@127.0.0.1:{}/clients",
            self.password, self.port
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = c.output();
    }
}

/// Whether this process runs as root (`/proc/self` belongs to the effective
/// user).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

fn run(mut cmd: std::process::Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Offers one task and waits for the answer; also says how long that took.
async fn offer_timed(server: &Server, round: u32) -> (OfferTasksResponse, Duration) {
    let started = Instant::now();
    let resp = offer(server, offer_request(round, 1, 0)).await;
    (resp, started.elapsed())
}

/// Offers `party` a task, which it accepts within the 5 s reply deadline,
/// and reports it done; TaskStates says so.
async fn offer_and_succeed_within_the_reply_deadline(
    server: &Server,
    party: &FakeParty,
    round: u32,
) {
    let (resp, took) = offer_timed(server, round).await;
    assert_eq!(resp.accepted.len(), 1, "round {round}: {resp:?}");
    assert!(
        took < Duration::from_secs(5),
        "round {round}: the offer took {took:?}, past its 5 s reply deadline"
    );
    let task = resp.accepted[0].task_id.clone();
    party.status(&task, TaskPhase::Succeeded, "").await;
    eventually("the success, in memory", || async {
        let p = phases(server, &[&task]).await;
        (p[0].0 == TaskPhase::Succeeded).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_sessions_flow_and_the_counters_catch_up_when_it_returns() {
    let Some(pg) = tokio::task::spawn_blocking(PgCluster::start).await.unwrap() else {
        return;
    };
    let pg = Arc::new(pg);
    let url = {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.create_database())
            .await
            .unwrap()
    };
    // The services' default pool timeout: with the database down, each store
    // call takes this long to fail.
    let options = cohort_store::DatabaseOptions::default();
    assert!(options.acquire_timeout >= Duration::from_secs(10));
    let store = cohort_store::postgres::PgClientStore::open(&url, &options)
        .await
        .unwrap();
    let server = serve(
        Arc::new(store),
        Settings {
            heartbeat_interval: Duration::from_secs(1),
            reconnect_grace: GRACE,
            limits: RegistrationLimits::default(),
        },
    )
    .await;
    let mut a = FakeParty::connect(server.addr, "party-a", digits()).await;
    a.beat_every(Duration::from_millis(250));
    let (before, _) = offer_timed(&server, 1).await;
    a.status(&before.accepted[0].task_id, TaskPhase::Succeeded, "")
        .await;
    client_when(
        &server,
        "party-a",
        "counters before the outage",
        DEADLINE,
        |c| c.tasks_offered == 1 && c.tasks_succeeded == 1,
    )
    .await;

    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop_server())
            .await
            .unwrap();
    }
    let stopped_ms = cohort_runtime::now_ms();
    // A newcomer cannot be checked against the revocations: refused, and
    // only after a store timeout, while the open session goes on.
    let newcomer = tokio::spawn({
        let addr = server.addr;
        async move {
            FakeParty::register(addr, "party-b", digits())
                .await
                .map(|_| ())
        }
    });
    offer_and_succeed_within_the_reply_deadline(&server, &a, 2).await;
    let refused = within("the newcomer's refusal", newcomer)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // Past a store timeout: heartbeats kept the session open.
    offer_and_succeed_within_the_reply_deadline(&server, &a, 3).await;
    let (_, took) = offer_timed(&server, 4).await;
    assert!(took < Duration::from_secs(5), "{took:?}");

    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.start_server())
            .await
            .unwrap();
    }
    // Everything counted during the outage reaches the store: a write under
    // way may take a pool timeout to fail, then the writer backs off.
    let caught_up = client_when(
        &server,
        "party-a",
        "counters after the outage",
        Duration::from_secs(60),
        |c| c.tasks_offered == 4 && c.tasks_succeeded == 3,
    )
    .await;
    assert_eq!(caught_up.tasks_failed, 0);
    assert!(caught_up.last_seen_ms > stopped_ms);
    assert!(caught_up.connected);
}

/// `cpus` CPUs, `memory_gib` GiB and 2 task slots, of which `free_cpu_millis` and
/// `free_memory_gib` are free.
fn resources(cpus: u32, memory_gib: u64, free_cpu_millis: u32, free_memory_gib: u64) -> Resources {
    Resources {
        cpus,
        memory_bytes: memory_gib << 30,
        gpus: 0,
        max_tasks: 2,
        free: Some(FreeResources {
            cpu_millis: free_cpu_millis,
            memory_bytes: free_memory_gib << 30,
            gpus: 0,
        }),
        gpu_devices: vec![],
    }
}

fn result(task_id: &str, party: &str, result: TaskResult) -> TaskResultReport {
    TaskResultReport {
        task_id: task_id.into(),
        party: party.into(),
        result: result as i32,
    }
}

async fn record_results(
    server: &Server,
    job_id: &str,
    results: Vec<TaskResultReport>,
) -> Result<RecordTaskResultsResponse, tonic::Status> {
    within(
        "RecordTaskResults",
        server
            .selector
            .clone()
            .record_task_results(RecordTaskResultsRequest {
                job_id: job_id.into(),
                round: 1,
                results,
            }),
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn task_results_count_once_and_only_for_the_jobs_own_tasks_of_the_party_named() {
    let server = start(RegistrationLimits::default()).await;
    let a = FakeParty::connect(server.addr, "a", digits()).await;
    let b = FakeParty::connect(server.addr, "b", digits()).await;
    let resp = offer(&server, offer_request(1, 2, 7)).await;
    let (ta, tb) = (task_of(&resp, "a"), task_of(&resp, "b"));
    // The offer says whom it drew, with their weights (1 each: random).
    let mut drawn: Vec<(&str, f64)> = resp
        .selected
        .iter()
        .map(|s| (s.party.as_str(), s.score))
        .collect();
    drawn.sort_by(|x, y| x.0.cmp(y.0));
    assert_eq!(drawn, [("a", 1.0), ("b", 1.0)]);
    // A party's own word (success) is not its reliability record.
    a.status(&ta.task_id, TaskPhase::Succeeded, "").await;
    flush(&server, "a", 2).await;
    let got = record_results(
        &server,
        "job-1",
        vec![
            // Another party's task, another job's, an unknown one, no result.
            result(&tb.task_id, "a", TaskResult::Finished),
            result("job-1-r1-nope", "a", TaskResult::Finished),
            result(&ta.task_id, "a", TaskResult::Unspecified),
        ],
    )
    .await
    .unwrap();
    assert_eq!((got.recorded, got.ignored), (0, 3));
    let elsewhere = record_results(
        &server,
        "job-2",
        vec![result(&ta.task_id, "a", TaskResult::Finished)],
    )
    .await
    .unwrap();
    assert_eq!((elsewhere.recorded, elsewhere.ignored), (0, 1));
    let reports = vec![
        result(&ta.task_id, "a", TaskResult::Finished),
        result(&tb.task_id, "b", TaskResult::TimedOut),
    ];
    let got = record_results(&server, "job-1", reports.clone())
        .await
        .unwrap();
    assert_eq!((got.recorded, got.ignored), (2, 0));
    // Reported again (a retried call): nothing more.
    let again = record_results(&server, "job-1", reports).await.unwrap();
    assert_eq!((again.recorded, again.ignored), (0, 2));
    let clients = list_clients(&server).await.unwrap();
    let record = |name: &str| {
        let c = clients.iter().find(|c| c.party == name).unwrap();
        let r = c.reliability.unwrap();
        (r.finished, r.failed, r.timed_out, r.score)
    };
    assert_eq!(record("a"), (1, 0, 0, 2.0 / 3.0));
    assert_eq!(record("b"), (0, 0, 1, 1.0 / 3.0));
    let a_info = clients.iter().find(|c| c.party == "a").unwrap();
    assert_eq!(
        a_info.tasks_succeeded, 1,
        "the party's own counter is apart"
    );
    // Only coordinators record: a call carrying a party's identity is refused.
    let mut req = tonic::Request::new(RecordTaskResultsRequest {
        job_id: "job-1".into(),
        round: 1,
        results: vec![],
    });
    req.metadata_mut()
        .insert("x-cohort-party", "a".parse().unwrap());
    let status = server
        .selector
        .clone()
        .record_task_results(req)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Bounded.
    let many = vec![result(&ta.task_id, "a", TaskResult::Finished); 10_001];
    let status = record_results(&server, "job-1", many).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("results"),
        "{}",
        status.message()
    );
    drop((a, b));
}

#[tokio::test]
async fn resource_selection_never_draws_a_party_without_room_and_favours_the_roomier() {
    let server = start(RegistrationLimits::default()).await;
    // Silent parties: every offer is drawn and unanswered, so nothing runs and capacity
    // stays as reported.
    let _big =
        FakeParty::with_resources(server.addr, "big", Answer::Silent, resources(4, 8, 4000, 8))
            .await;
    let _small = FakeParty::with_resources(
        server.addr,
        "small",
        Answer::Silent,
        resources(1, 2, 1000, 2),
    )
    .await;
    let _full = FakeParty::with_resources(
        server.addr,
        "full",
        Answer::Silent,
        resources(64, 512, 0, 512),
    )
    .await;
    // Claims beyond what it registered are cut to it: 1 CPU, 1 GiB.
    let _boaster = FakeParty::with_resources(
        server.addr,
        "boaster",
        Answer::Silent,
        Resources {
            free: Some(FreeResources {
                cpu_millis: u32::MAX,
                memory_bytes: u64::MAX,
                gpus: 0,
            }),
            ..resources(1, 1, 0, 0)
        },
    )
    .await;
    let mut first = std::collections::BTreeMap::<String, u32>::new();
    let draws = 40;
    for i in 0..draws {
        let mut req = offer_request(1, 1, 1000 + i);
        req.selection = "resource".into();
        req.reply_timeout_ms = 100;
        let resp = offer(&server, req).await;
        assert_eq!(resp.selected.len(), 1, "{resp:?}");
        let drawn = &resp.selected[0];
        let want = match drawn.party.as_str() {
            "big" => 1.0,
            // (1/4 CPU + 2/8 memory) / 2.
            "small" => 0.25,
            // (1/4 + 1/8) / 2.
            "boaster" => 0.1875,
            other => panic!("{other} has no room yet was drawn"),
        };
        assert!((drawn.score - want).abs() < 1e-9, "{drawn:?}");
        *first.entry(drawn.party.clone()).or_default() += 1;
    }
    eprintln!("resource selection, {draws} draws of one: {first:?}");
    let big = first.get("big").copied().unwrap_or(0);
    let small = first.get("small").copied().unwrap_or(0);
    // Chances 1/1.4375 and 0.25/1.4375: 28 and 7 of 40 expected.
    assert!(big > 2 * small, "{first:?}");
    // Without any room at all, nobody is drawn.
    let mut req = offer_request(1, 1, 5);
    req.selection = "resource".into();
    req.exclude = vec!["big".into(), "small".into(), "boaster".into()];
    assert!(offer(&server, req).await.selected.is_empty());
}

/// A party with `gpus` GPUs, all free, described as `name`.
fn gpu_resources(gpus: u32, name: &str) -> Resources {
    Resources {
        gpus,
        free: Some(FreeResources {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            gpus,
        }),
        gpu_devices: (0..gpus)
            .map(|_| GpuInfo {
                name: name.into(),
                memory_bytes: 80 << 30,
            })
            .collect(),
        ..resources(2, 4, 2000, 4)
    }
}

#[tokio::test]
async fn a_cuda_job_is_offered_only_to_parties_with_a_free_gpu_and_says_why_of_the_others() {
    let server = start(RegistrationLimits::default()).await;
    let gpu = FakeParty::with_resources(
        server.addr,
        "gpu",
        Answer::Accept,
        gpu_resources(1, "NVIDIA H100"),
    )
    .await;
    let cpu =
        FakeParty::with_resources(server.addr, "cpu", Answer::Accept, gpu_resources(0, "")).await;
    // Two asked, one can have it: only the GPU party is offered; the other is named.
    for round in 1..=3 {
        let resp = offer(
            &server,
            OfferTasksRequest {
                gpus: 1,
                ..offer_request(round, 2, 0)
            },
        )
        .await;
        let offered: Vec<&str> = resp.selected.iter().map(|s| s.party.as_str()).collect();
        assert_eq!(offered, vec!["gpu"], "{resp:?}");
        task_of(&resp, "gpu");
        let why = resp
            .refused
            .get("cpu")
            .unwrap_or_else(|| panic!("{resp:?}"));
        assert!(why.contains("training.device is cuda"), "{why}");
        assert!(why.contains("no free GPU"), "{why}");
    }
    assert!(
        cpu.offers().is_empty(),
        "the party without a GPU saw an offer"
    );
    assert_eq!(gpu.offers().len(), 3);
    // Without the need, both are offered.
    let resp = offer(&server, offer_request(4, 2, 0)).await;
    assert_eq!(resp.accepted.len(), 2, "{resp:?}");
    assert!(resp.refused.is_empty(), "{resp:?}");
    // `cohort client list` sees the GPU's model and memory.
    let clients = list_clients(&server).await.unwrap();
    let listed = clients.iter().find(|c| c.party == "gpu").unwrap();
    let res = listed.resources.as_ref().unwrap();
    assert_eq!(res.gpus, 1);
    assert_eq!(
        res.gpu_devices,
        vec![GpuInfo {
            name: "NVIDIA H100".into(),
            memory_bytes: 80 << 30
        }]
    );
}

#[tokio::test]
async fn a_registration_describing_more_gpus_than_it_counts_is_refused() {
    let server = start(RegistrationLimits::default()).await;
    let mut res = gpu_resources(1, "NVIDIA H100");
    res.gpus = 0;
    let err = FakeParty::register_full(server.addr, "liar", digits(), vec![], Some(res))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("register.resources.gpu_devices:"),
        "{}",
        err.message()
    );
}
