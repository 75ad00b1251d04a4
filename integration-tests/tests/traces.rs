//! OpenTelemetry traces of a running federation (issue 14): with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, every process exports its spans over OTLP/gRPC to a
//! real receiver (the official `opentelemetry-proto` service, served here), and W3C trace
//! context crosses every hop: one round of a job is one trace holding the coordinator's
//! round, client-selector's offer, the task-manager's task, the executor's work and the
//! proxy's forwarding of its calls, each span's parent being the one that caused it, across
//! processes. A CLI command is one trace through the proxy into job-scheduler. Log lines
//! carry the trace id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_core::JobState;
use cohort_integration_tests::{Federation, cohort_bin, log_files_under, state_of, wait_clients};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

const ROUNDS: u32 = 3;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace: hex::encode(&span.trace_id),
                        id: hex::encode(&span.span_id),
                        parent: hex::encode(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves the receiver on a loopback port until the guard drops.
async fn start_receiver() -> (Receiver, String, tokio::sync::oneshot::Sender<()>) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the OTLP receiver");
    let addr = listener.local_addr().expect("its address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    (receiver, format!("http://{addr}"), stop)
}

/// The spans of each trace.
fn by_trace(spans: &[Span]) -> BTreeMap<String, Vec<Span>> {
    let mut out: BTreeMap<String, Vec<Span>> = BTreeMap::new();
    for s in spans {
        out.entry(s.trace.clone()).or_default().push(s.clone());
    }
    out
}

/// The traces of rounds of `job`: round number → that round's spans.
fn round_traces(spans: &[Span], job: &str) -> BTreeMap<u32, Vec<Vec<Span>>> {
    let mut out: BTreeMap<u32, Vec<Vec<Span>>> = BTreeMap::new();
    for (_, trace) in by_trace(spans) {
        for root in trace.iter().filter(|s| {
            s.name == "round"
                && s.service == "coordinator"
                && s.attributes.get("job_id").map(String::as_str) == Some(job)
        }) {
            if let Some(round) = root.attributes.get("round").and_then(|r| r.parse().ok()) {
                out.entry(round).or_default().push(trace.clone());
            }
        }
    }
    out
}

const SERVICES_IN_A_ROUND: [&str; 7] = [
    "coordinator",
    "job-scheduler",
    "client-selector",
    "task-manager",
    "executor",
    "proxy",
    "model-manager",
];

/// Whether a round's trace has arrived whole (spans come in batches, each when it ends):
/// every service's spans, both parties' tasks and executions, every parent.
fn complete(trace: &[Span]) -> bool {
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    let count = |service: &str, name: &str| {
        trace
            .iter()
            .filter(|s| s.service == service && s.name.ends_with(name))
            .count()
    };
    SERVICES_IN_A_ROUND.iter().all(|s| services.contains(s))
        && count("task-manager", "task") >= 2
        && count("executor", "execute") >= 2
        && count("coordinator", "Round/SubmitUpdate") >= 2
        && count("job-scheduler", "JobControl/ReportRound") >= 1
        && trace
            .iter()
            .all(|s| s.parent.is_empty() || parent_of(trace, s).is_some())
}

fn parent_of<'a>(trace: &'a [Span], span: &Span) -> Option<&'a Span> {
    trace.iter().find(|p| p.id == span.parent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_round_crosses_every_process() {
    let (receiver, endpoint, _stop) = start_receiver().await;
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint.clone()),
        // Spans leave within a fifth of a second of ending.
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "200".to_string()),
    ];
    let fed = Federation::synthetic_with_env(2, env)
        .await
        .expect("federation");
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 2
    })
    .await;

    // The job is created with the CLI, itself traced: CLI → proxy → job-scheduler.
    let spec = fed.dir.path().join("traced.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: traced\nmodel: {{arch: synthetic, params: 1000, layers: 2}}\n\
             data: {{dataset: synthetic}}\nrounds: {ROUNDS}\n\
             clients: {{per_round: 2, min: 2, round_timeout: 60s}}\n"
        ),
    )
    .expect("write the spec");
    let profile = fed.dir.path().join("traced-profile.toml");
    fed.stack
        .profile()
        .save(&profile)
        .expect("write the profile");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(cohort_bin())
            .arg("--profile")
            .arg(&profile)
            .args(["--json", "job", "create", "-f"])
            .arg(&spec)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the CLI in time")
    .expect("the CLI runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "job create: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON job");
    let job_id = created["id"].as_str().expect("job id").to_string();
    let job = fed
        .wait_end(&job_id, Duration::from_secs(120))
        .await
        .expect("the job ends");
    assert_eq!(state_of(&job), JobState::Succeeded, "{job:?}");

    // Spans arrive in batches: wait, with a deadline, until every round's trace is whole.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = receiver.spans();
        let rounds = round_traces(&spans, &job_id);
        let whole = (1..=ROUNDS).all(|r| {
            rounds
                .get(&r)
                .is_some_and(|t| t.len() == 1 && complete(&t[0]))
        });
        let cli_seen = spans.iter().any(|s| s.service == "cohort-cli");
        if (whole && cli_seen) || tokio::time::Instant::now() >= deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let rounds = round_traces(&spans, &job_id);
    for round in 1..=ROUNDS {
        let traces = rounds
            .get(&round)
            .unwrap_or_else(|| panic!("no trace for round {round}"));
        assert_eq!(traces.len(), 1, "round {round} is one trace");
        let trace = &traces[0];
        let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
        for service in SERVICES_IN_A_ROUND {
            assert!(
                services.contains(service),
                "round {round}: no span of {service}: {services:?}"
            );
        }
        // One root, and every other span's parent is in the same trace.
        let roots: Vec<&Span> = trace.iter().filter(|s| s.parent.is_empty()).collect();
        assert_eq!(roots.len(), 1, "round {round}: roots {roots:#?}");
        assert_eq!(roots[0].name, "round");
        for span in trace.iter().filter(|s| !s.parent.is_empty()) {
            assert!(
                parent_of(trace, span).is_some(),
                "round {round}: {} of {} has no parent in the trace",
                span.name,
                span.service
            );
        }
        // The chain across processes, hop by hop.
        let expect_parent = |child_service: &str,
                             child: &str,
                             parent_service: &str,
                             parent: &str| {
            let children: Vec<&Span> = trace
                .iter()
                .filter(|s| s.service == child_service && s.name.ends_with(child))
                .collect();
            assert!(
                !children.is_empty(),
                "round {round}: no {child} of {child_service}"
            );
            for c in children {
                let p = parent_of(trace, c).expect("a parent");
                assert!(
                    p.service == parent_service && p.name.ends_with(parent),
                    "round {round}: {child} of {child_service} has parent {} of {}, not {parent} of {parent_service}",
                    p.name,
                    p.service
                );
            }
        };
        expect_parent("coordinator", "offer", "coordinator", "train");
        expect_parent(
            "client-selector",
            "ClientSelector/OfferTasks",
            "coordinator",
            "offer",
        );
        expect_parent(
            "client-selector",
            "offer",
            "client-selector",
            "ClientSelector/OfferTasks",
        );
        expect_parent("task-manager", "task", "client-selector", "offer");
        expect_parent("executor", "execute", "task-manager", "task");
        expect_parent("proxy", "Round/FetchModel", "executor", "fetch");
        expect_parent("proxy", "Round/SubmitUpdate", "executor", "upload");
        expect_parent(
            "coordinator",
            "Round/SubmitUpdate",
            "proxy",
            "Round/SubmitUpdate",
        );
        expect_parent(
            "coordinator",
            "Round/FetchModel",
            "proxy",
            "Round/FetchModel",
        );
        expect_parent(
            "model-manager",
            "Models/UploadVersion",
            "coordinator",
            "checkpoint",
        );
        expect_parent(
            "job-scheduler",
            "JobControl/ReportRound",
            "coordinator",
            "round",
        );
    }

    // The CLI's command: one trace from the CLI through the proxy into job-scheduler.
    let cli = spans
        .iter()
        .find(|s| s.service == "cohort-cli" && s.name == "cohort job create")
        .unwrap_or_else(|| {
            panic!(
                "no CLI span: {:?}",
                spans
                    .iter()
                    .map(|s| (&s.service, &s.name))
                    .collect::<BTreeSet<_>>()
            )
        });
    let trace = &by_trace(&spans)[&cli.trace];
    let proxy = trace
        .iter()
        .find(|s| s.service == "proxy" && s.name.ends_with("Jobs/CreateJob"))
        .expect("the proxy's span of CreateJob");
    assert_eq!(proxy.parent, cli.id, "the proxy's span is the CLI's child");
    let scheduler = trace
        .iter()
        .find(|s| s.service == "job-scheduler" && s.name.ends_with("Jobs/CreateJob"))
        .expect("job-scheduler's span of CreateJob");
    assert_eq!(
        scheduler.parent, proxy.id,
        "job-scheduler's span is the proxy's child"
    );

    // Logs carry trace and span ids: the coordinator's line for a round names its trace.
    let round_trace = &rounds[&1][0][0].trace;
    let logs = log_files_under(fed.dir.path());
    let marked = logs.iter().any(|path| {
        std::fs::read_to_string(path).is_ok_and(|text| {
            text.lines().any(|l| {
                l.contains("round complete")
                    && (l.contains(&format!("trace_id={round_trace}"))
                        || l.contains(&format!("\"trace_id\":\"{round_trace}\"")))
            })
        })
    });
    assert!(
        marked,
        "no log line of round 1 carries its trace id {round_trace}"
    );
}
