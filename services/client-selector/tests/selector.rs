//! client-selector over real gRPC on loopback, with SQLite in a temporary
//! directory and fake parties: real PartySession streams, driven by the test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use cohort_client_selector::registry::{PARTY_DISCONNECTED, task_seed};
use cohort_client_selector::{Args, RegistrationLimits, Settings, serve_in_process};
use cohort_core::PartyId;
use cohort_proto::v1::client_selector_client::ClientSelectorClient;
use cohort_proto::v1::party_session_client::PartySessionClient;
use cohort_proto::v1::*;
use cohort_store::clients::SqliteClientStore;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tonic::Code;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {DEADLINE:?}"))
}

/// Polls `check` until it returns Some, or panics after the deadline.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(what, async {
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
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    selector: ClientSelectorClient<Channel>,
    _stop: oneshot::Sender<()>,
}

async fn start(limits: RegistrationLimits) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("clients.db").display());
    let store = Arc::new(SqliteClientStore::open(&url).await.unwrap());
    let settings = Settings {
        // Long enough that no test session ends for silence.
        heartbeat_interval: Duration::from_secs(60),
        limits,
    };
    let (addr, stop) = serve_in_process(store, settings).await.unwrap();
    let selector = within(
        "connect",
        ClientSelectorClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap();
    Server {
        _dir: dir,
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
/// of the test and recorded.
struct FakeParty {
    name: String,
    out: mpsc::Sender<PartyMessage>,
    offers: Arc<Mutex<Vec<Offer>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl FakeParty {
    async fn register(
        addr: SocketAddr,
        name: &str,
        datasets: Vec<DatasetInfo>,
    ) -> Result<(mpsc::Sender<PartyMessage>, tonic::Streaming<ServerMessage>), tonic::Status> {
        let mut client = PartySessionClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (out, rx) = mpsc::channel(256);
        out.send(message(party_message::Kind::Register(Register {
            party: name.into(),
            datasets,
            resources: None,
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
        let (out, mut inbound) = Self::register(addr, name, datasets).await.unwrap();
        let offers = Arc::new(Mutex::new(Vec::new()));
        let (seen, replies) = (offers.clone(), out.clone());
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                if let Some(server_message::Kind::Offer(offer)) = msg.kind {
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
            }
        });
        Self {
            name: name.into(),
            out,
            offers,
            reader,
        }
    }

    fn offers(&self) -> Vec<Offer> {
        self.offers.lock().unwrap().clone()
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
    assert_eq!(settings.limits, RegistrationLimits::default());
    assert_eq!(
        settings.limits,
        RegistrationLimits {
            max_datasets: 64,
            max_samples: 1_000_000_000,
            max_features: 1_000_000,
            max_classes: 100_000,
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
        }
    );
    for (flag, value) in [
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
    let server = start(RegistrationLimits::default()).await;
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
