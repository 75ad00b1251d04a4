//! The proxy in front of real (fake-logic) gRPC servers over loopback,
//! exercised with the generated clients.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cohort_proto::v1::*;
use common::*;
use futures::StreamExt;
use tonic::Code;

#[tokio::test]
async fn unary_and_server_streaming_calls_reach_each_upstream() {
    let stack = Stack::start().await;
    let channel = stack.proxy.channel().await;

    let mut jobs = jobs_client::JobsClient::new(channel.clone());
    let job = within("GetJob", jobs.get_job(GetJobRequest { id: "job-7".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (job.id.as_str(), job.name.as_str()),
        ("job-7", "from-job-scheduler")
    );

    let watched: Vec<u32> = within("WatchJob", async {
        jobs.watch_job(GetJobRequest { id: "job-7".into() })
            .await
            .unwrap()
            .into_inner()
            .map(|j| j.unwrap().rounds_completed)
            .collect()
            .await
    })
    .await;
    assert_eq!(watched, vec![1, 2, 3]);

    let mut models = models_client::ModelsClient::new(channel.clone());
    let version = within(
        "GetVersion",
        models.get_version(GetVersionRequest {
            name: "digits".into(),
            version: 4,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(version.name, "digits");
    assert_eq!(version.version, 4);
    assert_eq!(version.digest, "from-model-manager");

    let mut clients = client_selector_client::ClientSelectorClient::new(channel);
    let listed = within("ListClients", clients.list_clients(ListClientsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.clients.len(), 1);
    assert_eq!(listed.clients[0].party, "party-from-client-selector");

    stack.stop().await;
}

#[tokio::test]
async fn large_download_streams_through() {
    let stack = Stack::start().await;
    let mut models = models_client::ModelsClient::new(stack.proxy.channel().await);
    let chunks = 24u32;
    let (count, bytes, ok) = within("Download", async {
        let mut stream = models
            .download(GetVersionRequest {
                name: "big".into(),
                version: chunks,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (mut count, mut bytes, mut ok) = (0u32, 0usize, true);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            ok &= chunk.data.iter().all(|b| *b == count as u8);
            bytes += chunk.data.len();
            count += 1;
        }
        (count, bytes, ok)
    })
    .await;
    assert_eq!(count, chunks);
    assert_eq!(bytes, chunks as usize * MIB);
    assert!(ok, "chunk contents arrived out of order or altered");
    stack.stop().await;
}

#[tokio::test]
async fn party_session_streams_both_ways_and_carries_the_error_status() {
    let stack = Stack::start().await;
    let mut session = party_session_client::PartySessionClient::new(stack.proxy.channel().await);

    let (tx, rx) = tokio::sync::mpsc::channel::<PartyMessage>(4);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut inbound = within("Open", session.open(outbound))
        .await
        .unwrap()
        .into_inner();

    let register = PartyMessage {
        kind: Some(party_message::Kind::Register(Register {
            party: "acme".into(),
            ..Default::default()
        })),
    };
    tx.send(register).await.unwrap();
    let reply = within("Registered", inbound.next()).await.unwrap().unwrap();
    match reply.kind {
        Some(server_message::Kind::Registered(r)) => assert_eq!(r.party, "acme"),
        other => panic!("expected Registered, got {other:?}"),
    }

    // Each message is answered before the next is sent: a true ping-pong
    // through the proxy, not a buffered batch.
    for n in 1..=5 {
        let heartbeat = PartyMessage {
            kind: Some(party_message::Kind::Heartbeat(Heartbeat {
                running_tasks: n,
                ..Default::default()
            })),
        };
        tx.send(heartbeat).await.unwrap();
        let reply = within("heartbeat reply", inbound.next())
            .await
            .unwrap()
            .unwrap();
        match reply.kind {
            Some(server_message::Kind::Cancel(c)) => assert_eq!(c.task_id, format!("hb-{n}")),
            other => panic!("expected Cancel, got {other:?}"),
        }
    }

    let fail = PartyMessage {
        kind: Some(party_message::Kind::Heartbeat(Heartbeat {
            running_tasks: FAIL_TASKS,
            ..Default::default()
        })),
    };
    tx.send(fail).await.unwrap();
    let status = within("error status", inbound.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        format!("party reported {FAIL_TASKS} tasks")
    );
    assert!(within("end of stream", inbound.next()).await.is_none());

    drop(tx);
    stack.stop().await;
}

#[tokio::test]
async fn round_calls_go_to_the_coordinator_of_their_job() {
    let stack = Stack::start().await;
    let stops = Arc::new(AtomicUsize::new(0));
    let coord_a = start_coordinator("coord-a", stops.clone()).await;
    let coord_b = start_coordinator("coord-b", stops.clone()).await;
    stack.control.set_route("job-a", &coord_a.addr.to_string());
    // Endpoints may come as URLs too.
    stack
        .control
        .set_route("job-b", &format!("http://{}", coord_b.addr));

    let mut round = round_client::RoundClient::new(stack.proxy.channel().await);
    for (job, coord) in [
        ("job-a", "coord-a"),
        ("job-b", "coord-b"),
        ("job-a", "coord-a"),
    ] {
        let ack = within(
            "SubmitEvaluation",
            round.submit_evaluation(for_job(
                job,
                SubmitEvaluationRequest {
                    task_token: "tok".into(),
                    metrics: None,
                },
            )),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(ack.message, format!("{coord} job={job} token=tok"));
    }

    // Server streaming to job-b.
    let tensors: Vec<String> = within("FetchModel", async {
        round
            .fetch_model(for_job("job-b", FetchModelRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .map(|c| c.unwrap().tensor)
            .collect()
            .await
    })
    .await;
    assert_eq!(tensors, vec!["coord-b"; 3]);

    // Client streaming to job-a.
    let parts: Vec<SubmitUpdateRequest> = (0..4)
        .map(|i| SubmitUpdateRequest {
            part: Some(submit_update_request::Part::Chunk(TensorChunk {
                offset: i,
                data: vec![1; 1024].into(),
                ..Default::default()
            })),
        })
        .collect();
    let ack = within(
        "SubmitUpdate",
        round.submit_update(for_job("job-a", futures::stream::iter(parts))),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(ack.message, "coord-a job=job-a parts=4");

    stack.stop().await;
    coord_a.stop().await;
    coord_b.stop().await;
}

#[tokio::test]
async fn round_calls_without_a_known_job_are_refused() {
    let stack = Stack::start().await;
    let mut round = round_client::RoundClient::new(stack.proxy.channel().await);

    let missing = within(
        "no metadata",
        round.submit_evaluation(SubmitEvaluationRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(
        missing.message().contains("x-cohort-job"),
        "{}",
        missing.message()
    );

    let before = stack.control.list_calls.load(Ordering::SeqCst);
    let unknown = within(
        "unknown job",
        round.submit_evaluation(for_job("job-nope", SubmitEvaluationRequest::default())),
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("job-nope"),
        "{}",
        unknown.message()
    );
    // The miss asked job-scheduler again before answering.
    assert!(stack.control.list_calls.load(Ordering::SeqCst) > before);

    stack.stop().await;
}

#[tokio::test]
async fn server_internal_services_are_refused_not_forwarded() {
    let stack = Stack::start().await;
    let stops = Arc::new(AtomicUsize::new(0));
    let coord = start_coordinator("coord", stops.clone()).await;
    stack.control.set_route("job-a", &coord.addr.to_string());
    let channel = stack.proxy.channel().await;

    let mut control = job_control_client::JobControlClient::new(channel.clone());
    let status = within("ListRoutes", control.list_routes(ListRoutesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("JobControl"),
        "{}",
        status.message()
    );
    let status = within("FinishJob", control.finish_job(FinishJobRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut selector = client_selector_client::ClientSelectorClient::new(channel.clone());
    let status = within(
        "OfferTasks",
        selector.offer_tasks(OfferTasksRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Nor may anyone outside write a party's reliability record.
    let status = within(
        "RecordTaskResults",
        selector.record_task_results(cohort_proto::v1::RecordTaskResultsRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(stack.selector.offer_calls.load(Ordering::SeqCst), 0);

    let mut coordinator =
        coordinator_control_client::CoordinatorControlClient::new(channel.clone());
    let status = within(
        "Stop",
        coordinator.stop(for_job("job-a", StopCoordinatorRequest::default())),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(stops.load(Ordering::SeqCst), 0);

    // Not a Cohort service at all.
    let mut grpc = tonic::client::Grpc::new(channel);
    within("ready", grpc.ready()).await.unwrap();
    let status = within(
        "unknown service",
        grpc.unary::<ListClientsRequest, ListClientsResponse, _>(
            tonic::Request::new(ListClientsRequest {}),
            http::uri::PathAndQuery::from_static("/acme.Secret/Get"),
            tonic_prost::ProstCodec::default(),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);

    stack.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn unreachable_upstreams_answer_unavailable_quickly() {
    let control = FakeJobControl::default();
    let job_scheduler = start_job_scheduler(control.clone()).await;
    let dead = closed_endpoint().await;
    let dead_coordinator = closed_endpoint().await;
    control.set_route("job-dead", &dead_coordinator.to_string());
    let mut config =
        cohort_proxy::Config::new(job_scheduler.endpoint(), dead.clone(), dead.clone());
    // A refused connection is answered at once: a proxy that waited for (or retried until) the
    // connect timeout instead would take a minute per call.
    config.connect_timeout = Duration::from_secs(60);
    let proxy = TestProxy::start(config).await;
    let channel = proxy.channel().await;

    let started = Instant::now();
    let mut models = models_client::ModelsClient::new(channel.clone());
    let status = within(
        "GetVersion",
        models.get_version(GetVersionRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("model-manager"),
        "{}",
        status.message()
    );

    let mut session = party_session_client::PartySessionClient::new(channel.clone());
    let status = within(
        "Open",
        session.open(futures::stream::pending::<PartyMessage>()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("client-selector"),
        "{}",
        status.message()
    );

    let mut round = round_client::RoundClient::new(channel);
    let status = within(
        "SubmitEvaluation",
        round.submit_evaluation(for_job("job-dead", SubmitEvaluationRequest::default())),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("job-dead"),
        "{}",
        status.message()
    );
    // Milliseconds when working; 10 s leaves a loaded machine its margin and still fails a
    // proxy that waits for the 60 s connect timeout (so would `within`, per call).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    proxy.stop().await;
    job_scheduler.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_answered_by_the_proxy() {
    // No upstream at all: the proxy's own services still answer.
    let dead = closed_endpoint().await;
    let proxy = TestProxy::start(cohort_proxy::Config::new(dead.clone(), dead.clone(), dead)).await;
    let channel = proxy.channel().await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = within(
        "Check",
        health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = within(
        "ServerReflectionInfo",
        reflection.server_reflection_info(futures::stream::iter([request])),
    )
    .await
    .unwrap()
    .into_inner();
    let response = within("list services", responses.next())
        .await
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert!(names.contains(&"cohort.v1.Jobs".to_string()), "{names:?}");
    assert!(names.contains(&"cohort.v1.Round".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.ends_with("JobControl")),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.ends_with("CoordinatorControl")),
        "{names:?}"
    );

    drop(responses);
    proxy.stop().await;
}

#[tokio::test]
async fn routes_added_after_start_become_reachable() {
    let stack = Stack::start().await;
    let mut round = round_client::RoundClient::new(stack.proxy.channel().await);

    // Unknown at first.
    let status = within(
        "before",
        round.submit_evaluation(for_job("job-late", SubmitEvaluationRequest::default())),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // The job starts; the very next call finds it (reload on miss), without
    // waiting for the periodic refresh.
    let coord = start_coordinator("coord-late", Arc::new(AtomicUsize::new(0))).await;
    stack.control.set_route("job-late", &coord.addr.to_string());
    let ack = within(
        "after",
        round.submit_evaluation(for_job("job-late", SubmitEvaluationRequest::default())),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(ack.message.starts_with("coord-late "), "{}", ack.message);

    // The job ends: the periodic refresh drops its route.
    stack.control.routes.lock().unwrap().clear();
    let gone = within("route removed", async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = round
                .submit_evaluation(for_job("job-late", SubmitEvaluationRequest::default()))
                .await;
            if let Err(s) = r
                && s.code() == Code::NotFound
            {
                return s;
            }
        }
    })
    .await;
    assert!(gone.message().contains("job-late"));

    stack.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn serves_before_job_scheduler_is_up_and_loads_routes_once_it_is() {
    // job-scheduler's port, bound now (so no other test can take it) but not listening until
    // job-scheduler starts: connections to it are refused meanwhile.
    let js_socket = tokio::net::TcpSocket::new_v4().unwrap();
    js_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let js_addr = js_socket.local_addr().unwrap();
    let model_manager = start_model_manager().await;
    let dead = closed_endpoint().await;
    let config = cohort_proxy::Config::new(
        cohort_proxy::Endpoint::parse(&js_addr.to_string()).unwrap(),
        model_manager.endpoint(),
        dead,
    );
    let proxy = TestProxy::start(config).await;
    let channel = proxy.channel().await;

    // Other routes work while job-scheduler is down.
    let mut models = models_client::ModelsClient::new(channel.clone());
    within(
        "GetVersion",
        models.get_version(GetVersionRequest::default()),
    )
    .await
    .unwrap();
    // Round calls cannot be resolved: UNAVAILABLE, not NOT_FOUND.
    let mut round = round_client::RoundClient::new(channel);
    let status = within(
        "round while job-scheduler down",
        round.submit_evaluation(for_job("job-a", SubmitEvaluationRequest::default())),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("job-a"), "{}", status.message());

    // job-scheduler comes up with a running job.
    let coord = start_coordinator("coord-a", Arc::new(AtomicUsize::new(0))).await;
    let control = FakeJobControl::default();
    control.set_route("job-a", &coord.addr.to_string());
    let listener = js_socket.listen(1024).unwrap();
    let job_scheduler = TestServer::start_on(listener, routes_job_scheduler(control.clone()));

    // The background loader picks it up without any call needing it.
    within("table loaded", async {
        while control.list_calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let ack = within(
        "round after job-scheduler up",
        round.submit_evaluation(for_job("job-a", SubmitEvaluationRequest::default())),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(ack.message.starts_with("coord-a "), "{}", ack.message);

    proxy.stop().await;
    job_scheduler.stop().await;
    model_manager.stop().await;
    coord.stop().await;
}

#[tokio::test]
async fn shutdown_lets_open_streams_run_for_the_grace_period() {
    let control = FakeJobControl::default();
    let job_scheduler = start_job_scheduler(control).await;
    let selector = start_client_selector(FakeClientSelector::default()).await;
    let dead = closed_endpoint().await;
    let mut config = cohort_proxy::Config::new(job_scheduler.endpoint(), dead, selector.endpoint());
    let grace = Duration::from_secs(1);
    config.shutdown_grace = grace;
    let mut proxy = TestProxy::start(config).await;
    let proxy_addr = proxy.addr;
    let mut session = party_session_client::PartySessionClient::new(proxy.channel().await);

    let (tx, rx) = tokio::sync::mpsc::channel::<PartyMessage>(4);
    let mut inbound = within(
        "Open",
        session.open(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .into_inner();
    let heartbeat = |n| PartyMessage {
        kind: Some(party_message::Kind::Heartbeat(Heartbeat {
            running_tasks: n,
            ..Default::default()
        })),
    };
    tx.send(heartbeat(1)).await.unwrap();
    within("first reply", inbound.next())
        .await
        .unwrap()
        .unwrap();

    let stopping = Instant::now();
    proxy.begin_stop();
    // No new connections...
    within("listener closed", async {
        while tokio::net::TcpStream::connect(proxy_addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // ...but the open stream still works.
    tx.send(heartbeat(2)).await.unwrap();
    let reply = within("reply while stopping", inbound.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(reply.kind, Some(server_message::Kind::Cancel(c)) if c.task_id == "hb-2"));

    // After the grace period the stream is cut and the proxy returns: not before it (a lower
    // bound no load can break), and not never (a proxy that waits for open streams to end
    // would leave `within` to give up after 10 s, ten times the grace period).
    let end = within("stream cut", inbound.next()).await;
    let cut_after = stopping.elapsed();
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    assert!(cut_after >= grace, "stream cut after {cut_after:?}");
    proxy.stop().await;

    drop(tx);
    selector.stop().await;
    job_scheduler.stop().await;
}
