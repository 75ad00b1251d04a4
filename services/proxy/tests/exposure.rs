//! What the proxy reveals to a caller without credentials: reflection (v1
//! and v1alpha) lists and describes only the public services, health answers
//! per public service name. The proxy serves TLS with credentials checked,
//! in front of upstreams that are all down (it answers these itself).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use prost::Message;
use prost_types::FileDescriptorProto;
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const PUBLIC_SERVICES: [&str; 11] = [
    "cohort.v1.Audit",
    "cohort.v1.ClientSelector",
    "cohort.v1.Jobs",
    "cohort.v1.Models",
    "cohort.v1.PartySession",
    "cohort.v1.Round",
    "cohort.v1.SecureAggregation",
    "cohort.v1.Tokens",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Server-internal services, methods and types: none may be described.
const INTERNAL_SYMBOLS: [&str; 12] = [
    "cohort.v1.Auth",
    "cohort.v1.JobControl",
    "cohort.v1.CoordinatorControl",
    "cohort.v1.JobControl.ListRoutes",
    "cohort.v1.Auth.Authenticate",
    "cohort.v1.ClientSelector.OfferTasks",
    "cohort.v1.AuthenticateRequest",
    "cohort.v1.GetAssignmentRequest",
    "cohort.v1.JobControl.RecordAudit",
    "cohort.v1.RecordAuditRequest",
    "cohort.v1.ClientSelector.RecordTaskResults",
    "cohort.v1.RecordTaskResultsRequest",
];

/// One question to a reflection service.
enum Ask {
    ListServices,
    Symbol(String),
    File(String),
}

/// Its answer: service names, file descriptors, or the error code.
#[derive(Debug)]
enum Answer {
    Services(Vec<String>),
    Files(Vec<FileDescriptorProto>),
    Error(Code),
}

/// The same client for both reflection API versions (same messages, two packages).
macro_rules! reflection_client {
    ($name:ident, $pb:path) => {
        async fn $name(channel: cohort_runtime::Channel, ask: Ask) -> Answer {
            use pb::server_reflection_client::ServerReflectionClient;
            use pb::server_reflection_request::MessageRequest;
            use pb::server_reflection_response::MessageResponse;
            use $pb as pb;
            let message_request = match ask {
                Ask::ListServices => MessageRequest::ListServices(String::new()),
                Ask::Symbol(s) => MessageRequest::FileContainingSymbol(s),
                Ask::File(f) => MessageRequest::FileByFilename(f),
            };
            let request = pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(message_request),
            };
            let mut client = ServerReflectionClient::new(channel);
            let first = within("reflection", async {
                let mut stream = client
                    .server_reflection_info(futures::stream::iter([request]))
                    .await?
                    .into_inner();
                stream.message().await
            })
            .await;
            match first {
                Err(status) => Answer::Error(status.code()),
                Ok(None) => panic!("reflection stream ended without an answer"),
                Ok(Some(response)) => match response.message_response {
                    Some(MessageResponse::ListServicesResponse(list)) => {
                        let mut names: Vec<String> =
                            list.service.into_iter().map(|s| s.name).collect();
                        names.sort();
                        Answer::Services(names)
                    }
                    Some(MessageResponse::FileDescriptorResponse(files)) => Answer::Files(
                        files
                            .file_descriptor_proto
                            .iter()
                            .map(|raw| FileDescriptorProto::decode(raw.as_slice()).unwrap())
                            .collect(),
                    ),
                    Some(MessageResponse::ErrorResponse(e)) => {
                        Answer::Error(Code::from_i32(e.error_code))
                    }
                    other => panic!("unexpected reflection answer {other:?}"),
                },
            }
        }
    };
}

reflection_client!(ask_v1, tonic_reflection::pb::v1);
reflection_client!(ask_v1alpha, tonic_reflection::pb::v1alpha);

fn services_in(files: &[FileDescriptorProto]) -> Vec<String> {
    files
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{}.{}", f.package(), s.name()))
        })
        .collect()
}

async fn tls_proxy(tls: &TlsFixture, health_only: Option<TcpListener>) -> TestProxy {
    let dead = closed_endpoint().await;
    let mut config = cohort_proxy::Config::new(dead.clone(), dead.clone(), dead);
    config.security = tls.security();
    TestProxy::start_with_health(config, health_only).await
}

#[tokio::test]
async fn reflection_without_credentials_shows_only_public_services() {
    let tls = TlsFixture::new();
    let proxy = tls_proxy(&tls, None).await;
    let channel = tls.channel(proxy.addr);

    for version in ["v1", "v1alpha"] {
        let ask = |question| {
            let channel = channel.clone();
            async move {
                match version {
                    "v1" => ask_v1(channel, question).await,
                    _ => ask_v1alpha(channel, question).await,
                }
            }
        };
        let Answer::Services(listed) = ask(Ask::ListServices).await else {
            panic!("{version}: no service list");
        };
        assert_eq!(listed, PUBLIC_SERVICES, "{version}");

        for symbol in INTERNAL_SYMBOLS {
            let answer = ask(Ask::Symbol(symbol.to_string())).await;
            assert!(
                matches!(answer, Answer::Error(Code::NotFound)),
                "{version}: {symbol} answered {answer:?}"
            );
        }

        // The file that holds Jobs also holds Auth and JobControl in the
        // protos: what is served of it has only the public ones.
        let Answer::Files(by_symbol) = ask(Ask::Symbol("cohort.v1.Jobs".to_string())).await else {
            panic!("{version}: cohort.v1.Jobs not described");
        };
        assert_eq!(
            services_in(&by_symbol),
            ["cohort.v1.Jobs", "cohort.v1.Tokens", "cohort.v1.Audit"],
            "{version}"
        );
        let jobs_file = by_symbol[0].name().to_string();
        let Answer::Files(by_name) = ask(Ask::File(jobs_file.clone())).await else {
            panic!("{version}: {jobs_file} not served by name");
        };
        assert_eq!(by_name, by_symbol, "{version}");

        // Only the public methods of a partly public service.
        let Answer::Files(selector) =
            ask(Ask::Symbol("cohort.v1.ClientSelector".to_string())).await
        else {
            panic!("{version}: ClientSelector not described");
        };
        let methods: Vec<&str> = selector[0]
            .service
            .iter()
            .find(|s| s.name() == "ClientSelector")
            .unwrap()
            .method
            .iter()
            .map(|m| m.name())
            .collect();
        assert_eq!(
            methods,
            ["ListClients", "RevokeClient", "ProbeParties"],
            "{version}"
        );

        // What a client does next (grpcurl describe): every listed service
        // resolves, and so does every file it imports.
        for service in PUBLIC_SERVICES {
            let Answer::Files(files) = ask(Ask::Symbol(service.to_string())).await else {
                panic!("{version}: {service} listed but not described");
            };
            for dependency in &files[0].dependency {
                let answer = ask(Ask::File(dependency.clone())).await;
                assert!(
                    matches!(answer, Answer::Files(_)),
                    "{version}: {service} imports {dependency}: {answer:?}"
                );
            }
        }
    }
    proxy.stop().await;
}

async fn check(channel: cohort_runtime::Channel, service: &str) -> Result<i32, Code> {
    let mut health = HealthClient::new(channel);
    within(
        "health Check",
        health.check(HealthCheckRequest {
            service: service.to_string(),
        }),
    )
    .await
    .map(|r| r.into_inner().status)
    .map_err(|s| s.code())
}

#[tokio::test]
async fn health_answers_per_public_service_name_on_both_ports() {
    let tls = TlsFixture::new();
    let health_only = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_addr = health_only.local_addr().unwrap();
    let proxy = tls_proxy(&tls, Some(health_only)).await;
    let plaintext = cohort_runtime::lazy_channel(&health_addr.to_string()).unwrap();

    let serving = Ok(ServingStatus::Serving as i32);
    for (port, channel) in [("TLS", tls.channel(proxy.addr)), ("health-only", plaintext)] {
        assert_eq!(check(channel.clone(), "").await, serving, "{port}");
        for service in PUBLIC_SERVICES {
            assert_eq!(
                check(channel.clone(), service).await,
                serving,
                "{port}: {service}"
            );
        }
        for unknown in ["cohort.v1.Auth", "cohort.v1.JobControl", "no.such.Service"] {
            assert_eq!(
                check(channel.clone(), unknown).await,
                Err(Code::NotFound),
                "{port}: {unknown}"
            );
        }
    }
    proxy.stop().await;
}
