//! Small real gRPC servers standing in for the server-side services, and
//! helpers to run them and the proxy over loopback.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::v1::*;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

type Res<T> = Result<Response<T>, Status>;
type Stream<T> = BoxStream<'static, Result<T, Status>>;

fn unimplemented<T>() -> Res<T> {
    Err(Status::unimplemented("not in this fake"))
}

/// A tonic server on loopback; `stop` shuts it down (dropping aborts it).
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(routes: tonic::service::Routes) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, routes)
    }

    pub fn start_on(listener: TcpListener, routes: tonic::service::Routes) -> Self {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> cohort_proxy::Endpoint {
        cohort_proxy::Endpoint::parse(&self.addr.to_string()).unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take()
            && tokio::time::timeout(WAIT, task).await.is_err()
        {
            panic!("test server at {} did not stop", self.addr);
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The proxy, in-process, on loopback.
pub struct TestProxy {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), cohort_proxy::ProxyError>>>,
}

impl TestProxy {
    pub async fn start(config: cohort_proxy::Config) -> Self {
        Self::start_with_health(config, None).await
    }

    /// Also serves plaintext health on `health_only`.
    pub async fn start_with_health(
        config: cohort_proxy::Config,
        health_only: Option<TcpListener>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(cohort_proxy::serve_with_health(
            config,
            listener,
            health_only,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(2));
        tokio::time::timeout(WAIT, ep.connect())
            .await
            .expect("connect to proxy timed out")
            .unwrap()
    }

    /// Starts shutting down without waiting for it to finish.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("proxy did not stop")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A federation CA and a proxy certificate for 127.0.0.1, on disk.
pub struct TlsFixture {
    _dir: tempfile::TempDir,
    pub ca_pem: String,
    pub files: cohort_security::TlsFiles,
}

impl TlsFixture {
    pub fn new() -> Self {
        cohort_security::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let validity = cohort_security::Validity::for_duration(Duration::from_secs(3600));
        let ca = cohort_security::CertAuthority::generate("test-ca", validity).unwrap();
        let proxy = ca
            .issue_service("proxy", &["127.0.0.1".to_string()], validity)
            .unwrap();
        let files = cohort_security::TlsFiles {
            cert: dir.path().join("proxy.crt"),
            key: dir.path().join("proxy.key"),
            ca: dir.path().join("ca.crt"),
        };
        proxy.write(&files.cert, &files.key).unwrap();
        cohort_security::write_cert(&files.ca, ca.cert_pem()).unwrap();
        Self {
            ca_pem: ca.cert_pem().to_string(),
            files,
            _dir: dir,
        }
    }

    /// TLS at the door with credentials checked (no client certificate
    /// required to connect: users send tokens).
    pub fn security(&self) -> cohort_proxy::Security {
        let server =
            cohort_security::server_config(&self.files, cohort_security::ClientAuth::Optional)
                .unwrap();
        cohort_proxy::Security::Tls {
            server: Arc::new(server),
            upstream: None,
        }
    }

    /// A channel that checks the proxy's certificate and presents none.
    pub fn channel(&self, addr: SocketAddr) -> cohort_runtime::Channel {
        cohort_runtime::server_authenticated_channel(&addr.to_string(), self.ca_pem.as_bytes())
            .unwrap()
    }
}

/// Bounds a future by [`WAIT`].
pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
}

/// Adds `x-cohort-job` metadata.
pub fn for_job<T>(job: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(cohort_proto::JOB_METADATA_KEY, job.parse().unwrap());
    req
}

// ---- job-scheduler -------------------------------------------------------

pub struct FakeJobs;

#[tonic::async_trait]
impl jobs_server::Jobs for FakeJobs {
    type WatchJobStream = Stream<Job>;

    async fn create_job(&self, _: Request<CreateJobRequest>) -> Res<Job> {
        unimplemented()
    }
    async fn get_job(&self, req: Request<GetJobRequest>) -> Res<Job> {
        Ok(Response::new(Job {
            id: req.into_inner().id,
            name: "from-job-scheduler".into(),
            ..Default::default()
        }))
    }
    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Res<ListJobsResponse> {
        unimplemented()
    }
    async fn watch_job(&self, req: Request<GetJobRequest>) -> Res<Self::WatchJobStream> {
        let id = req.into_inner().id;
        let jobs = (1..=3).map(move |n| {
            Ok(Job {
                id: id.clone(),
                rounds_completed: n,
                ..Default::default()
            })
        });
        Ok(Response::new(futures::stream::iter(jobs).boxed()))
    }
    async fn stop_job(&self, _: Request<StopJobRequest>) -> Res<Job> {
        unimplemented()
    }
    async fn delete_job(&self, _: Request<GetJobRequest>) -> Res<DeleteJobResponse> {
        unimplemented()
    }
    async fn list_job_events(
        &self,
        _: Request<ListJobEventsRequest>,
    ) -> Res<ListJobEventsResponse> {
        unimplemented()
    }
    async fn get_server_info(&self, _: Request<GetServerInfoRequest>) -> Res<ServerInfo> {
        unimplemented()
    }
}

/// Serves `ListRoutes` from a table the test can change.
#[derive(Clone, Default)]
pub struct FakeJobControl {
    pub routes: Arc<Mutex<Vec<(String, String)>>>,
    pub list_calls: Arc<AtomicUsize>,
}

impl FakeJobControl {
    pub fn set_route(&self, job: &str, endpoint: &str) {
        let mut routes = self.routes.lock().unwrap();
        routes.retain(|(j, _)| j != job);
        routes.push((job.into(), endpoint.into()));
    }
}

#[tonic::async_trait]
impl job_control_server::JobControl for FakeJobControl {
    async fn get_assignment(&self, _: Request<GetAssignmentRequest>) -> Res<Assignment> {
        unimplemented()
    }
    async fn coordinator_ready(&self, _: Request<CoordinatorReadyRequest>) -> Res<Job> {
        unimplemented()
    }
    async fn report_round(&self, _: Request<ReportRoundRequest>) -> Res<Job> {
        unimplemented()
    }
    async fn finish_job(&self, _: Request<FinishJobRequest>) -> Res<Job> {
        unimplemented()
    }
    async fn record_events(&self, _: Request<RecordEventsRequest>) -> Res<RecordEventsResponse> {
        unimplemented()
    }
    async fn record_audit(&self, _: Request<RecordAuditRequest>) -> Res<RecordAuditResponse> {
        unimplemented()
    }
    async fn list_routes(&self, _: Request<ListRoutesRequest>) -> Res<ListRoutesResponse> {
        self.list_calls.fetch_add(1, Ordering::SeqCst);
        let routes = self
            .routes
            .lock()
            .unwrap()
            .iter()
            .map(|(job_id, endpoint)| Route {
                job_id: job_id.clone(),
                endpoint: endpoint.clone(),
            })
            .collect();
        Ok(Response::new(ListRoutesResponse { routes }))
    }
}

/// job-scheduler: Jobs plus JobControl (whose ListRoutes the proxy reads).
pub async fn start_job_scheduler(control: FakeJobControl) -> TestServer {
    TestServer::start(routes_job_scheduler(control)).await
}

pub fn routes_job_scheduler(control: FakeJobControl) -> tonic::service::Routes {
    tonic::service::Routes::new(jobs_server::JobsServer::new(FakeJobs))
        .add_service(job_control_server::JobControlServer::new(control))
}

// ---- model-manager -------------------------------------------------------

pub struct FakeModels;

pub const MIB: usize = 1 << 20;

#[tonic::async_trait]
impl models_server::Models for FakeModels {
    type DownloadStream = Stream<DataChunk>;

    async fn upload_version(
        &self,
        _: Request<Streaming<UploadVersionRequest>>,
    ) -> Res<ModelVersion> {
        unimplemented()
    }
    async fn list_versions(&self, _: Request<ListVersionsRequest>) -> Res<ListVersionsResponse> {
        unimplemented()
    }
    async fn get_version(&self, req: Request<GetVersionRequest>) -> Res<ModelVersion> {
        let req = req.into_inner();
        Ok(Response::new(ModelVersion {
            name: req.name,
            version: req.version,
            digest: "from-model-manager".into(),
            ..Default::default()
        }))
    }
    /// `version` 1 MiB chunks, chunk i filled with byte i.
    async fn download(&self, req: Request<GetVersionRequest>) -> Res<Self::DownloadStream> {
        let chunks = req.into_inner().version;
        let stream = futures::stream::iter(0..chunks).map(|i| {
            Ok(DataChunk {
                data: vec![i as u8; MIB].into(),
            })
        });
        Ok(Response::new(stream.boxed()))
    }
}

// ---- client-selector -----------------------------------------------------

#[derive(Clone, Default)]
pub struct FakeClientSelector {
    pub offer_calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl client_selector_server::ClientSelector for FakeClientSelector {
    async fn list_clients(&self, _: Request<ListClientsRequest>) -> Res<ListClientsResponse> {
        Ok(Response::new(ListClientsResponse {
            clients: vec![ClientInfo {
                party: "party-from-client-selector".into(),
                connected: true,
                ..Default::default()
            }],
        }))
    }
    async fn revoke_client(&self, _: Request<RevokeClientRequest>) -> Res<ClientInfo> {
        unimplemented()
    }
    async fn list_revoked(&self, _: Request<ListRevokedRequest>) -> Res<ListRevokedResponse> {
        unimplemented()
    }
    async fn describe_dataset(&self, _: Request<DescribeDatasetRequest>) -> Res<DatasetSummary> {
        unimplemented()
    }
    async fn offer_tasks(&self, _: Request<OfferTasksRequest>) -> Res<OfferTasksResponse> {
        self.offer_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(OfferTasksResponse::default()))
    }
    async fn task_states(&self, _: Request<TaskStatesRequest>) -> Res<TaskStatesResponse> {
        unimplemented()
    }
    async fn cancel_job_tasks(
        &self,
        _: Request<CancelJobTasksRequest>,
    ) -> Res<CancelJobTasksResponse> {
        unimplemented()
    }
    async fn record_task_results(
        &self,
        _: Request<cohort_proto::v1::RecordTaskResultsRequest>,
    ) -> Res<cohort_proto::v1::RecordTaskResultsResponse> {
        unimplemented()
    }
    async fn probe_parties(
        &self,
        _: Request<cohort_proto::v1::ProbePartiesRequest>,
    ) -> Res<cohort_proto::v1::ProbePartiesResponse> {
        unimplemented()
    }
}

/// Echoes the party's stream: Register -> Registered, Heartbeat{n} ->
/// Cancel{"hb-n"}; Heartbeat with 99 running tasks ends it with an error.
pub struct FakePartySession;

pub const FAIL_TASKS: u32 = 99;

#[tonic::async_trait]
impl party_session_server::PartySession for FakePartySession {
    type OpenStream = Stream<ServerMessage>;

    async fn open(&self, req: Request<Streaming<PartyMessage>>) -> Res<Self::OpenStream> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                let reply = match msg.kind {
                    Some(party_message::Kind::Register(r)) => {
                        Ok(server_message::Kind::Registered(Registered {
                            party: r.party,
                            heartbeat_interval_ms: 1000,
                        }))
                    }
                    Some(party_message::Kind::Heartbeat(h)) if h.running_tasks == FAIL_TASKS => {
                        Err(Status::failed_precondition(format!(
                            "party reported {FAIL_TASKS} tasks"
                        )))
                    }
                    Some(party_message::Kind::Heartbeat(h)) => {
                        Ok(server_message::Kind::Cancel(Cancel {
                            task_id: format!("hb-{}", h.running_tasks),
                            reason: String::new(),
                        }))
                    }
                    _ => Err(Status::invalid_argument("unexpected message")),
                };
                let end = reply.is_err();
                let reply = reply.map(|kind| ServerMessage { kind: Some(kind) });
                if tx.send(reply).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        ))
    }
    async fn check(
        &self,
        _: Request<cohort_proto::v1::PartyCheckRequest>,
    ) -> Res<cohort_proto::v1::PartyCheckResponse> {
        unimplemented()
    }
}

pub async fn start_client_selector(selector: FakeClientSelector) -> TestServer {
    TestServer::start(
        tonic::service::Routes::new(party_session_server::PartySessionServer::new(
            FakePartySession,
        ))
        .add_service(client_selector_server::ClientSelectorServer::new(selector)),
    )
    .await
}

// ---- coordinators --------------------------------------------------------

/// A coordinator that names itself in every answer.
pub struct FakeRound {
    pub name: String,
}

fn job_of<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(cohort_proto::JOB_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tonic::async_trait]
impl round_server::Round for FakeRound {
    type FetchModelStream = Stream<TensorChunk>;

    async fn fetch_model(&self, req: Request<FetchModelRequest>) -> Res<Self::FetchModelStream> {
        let name = self.name.clone();
        let chunks = (0..3u64).map(move |i| {
            Ok(TensorChunk {
                tensor: name.clone(),
                offset: i,
                ..Default::default()
            })
        });
        let _ = req;
        Ok(Response::new(futures::stream::iter(chunks).boxed()))
    }
    async fn submit_update(&self, req: Request<Streaming<SubmitUpdateRequest>>) -> Res<Ack> {
        let job = job_of(&req);
        let mut parts = req.into_inner();
        let mut count = 0;
        while let Some(part) = parts.next().await {
            part?;
            count += 1;
        }
        Ok(Response::new(Ack {
            message: format!("{} job={job} parts={count}", self.name),
        }))
    }
    async fn submit_evaluation(&self, req: Request<SubmitEvaluationRequest>) -> Res<Ack> {
        let job = job_of(&req);
        let token = req.into_inner().task_token;
        Ok(Response::new(Ack {
            message: format!("{} job={job} token={token}", self.name),
        }))
    }
}

pub struct FakeCoordinatorControl {
    pub stop_calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl coordinator_control_server::CoordinatorControl for FakeCoordinatorControl {
    async fn stop(&self, _: Request<StopCoordinatorRequest>) -> Res<Ack> {
        self.stop_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(Ack::default()))
    }
}

pub async fn start_coordinator(name: &str, stop_calls: Arc<AtomicUsize>) -> TestServer {
    TestServer::start(
        tonic::service::Routes::new(round_server::RoundServer::new(FakeRound {
            name: name.into(),
        }))
        .add_service(coordinator_control_server::CoordinatorControlServer::new(
            FakeCoordinatorControl { stop_calls },
        )),
    )
    .await
}

pub async fn start_model_manager() -> TestServer {
    TestServer::start(tonic::service::Routes::new(
        models_server::ModelsServer::new(FakeModels),
    ))
    .await
}

/// A loopback address nobody listens on (bound, then released).
pub async fn closed_endpoint() -> cohort_proxy::Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    cohort_proxy::Endpoint::parse(&addr.to_string()).unwrap()
}

/// The three upstreams plus the proxy in front of them.
pub struct Stack {
    pub control: FakeJobControl,
    pub selector: FakeClientSelector,
    pub job_scheduler: TestServer,
    pub model_manager: TestServer,
    pub client_selector: TestServer,
    pub proxy: TestProxy,
}

impl Stack {
    pub async fn start() -> Self {
        let control = FakeJobControl::default();
        let selector = FakeClientSelector::default();
        let job_scheduler = start_job_scheduler(control.clone()).await;
        let model_manager = start_model_manager().await;
        let client_selector = start_client_selector(selector.clone()).await;
        let config = cohort_proxy::Config::new(
            job_scheduler.endpoint(),
            model_manager.endpoint(),
            client_selector.endpoint(),
        );
        let proxy = TestProxy::start(config).await;
        Self {
            control,
            selector,
            job_scheduler,
            model_manager,
            client_selector,
            proxy,
        }
    }

    pub async fn stop(self) {
        self.proxy.stop().await;
        self.job_scheduler.stop().await;
        self.model_manager.stop().await;
        self.client_selector.stop().await;
    }
}
