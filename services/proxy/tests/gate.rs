//! The proxy's door (`gate.rs`) in-process with TLS on, in front of recording upstreams:
//! identity metadata a caller sends never reaches a service (only what the gate verified
//! does), a checked API token is trusted for the cache's TTL and asked about again after it,
//! and a revoked party's calls are refused and its open connection closed.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::v1::*;
use cohort_proto::{
    NAMESPACE_METADATA_KEY, PARTY_METADATA_KEY, ROLE_METADATA_KEY, TOKEN_METADATA_KEY,
};
use cohort_security::{ApiToken, CertAuthority, TlsFiles, Validity};
use common::{FakeJobControl, TestProxy, TestServer, WAIT, closed_endpoint, for_job, within};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status, Streaming};

type Res<T> = Result<Response<T>, Status>;

const JOB: &str = "digits-x1";

// ---- what the upstreams received ------------------------------------------

/// The identity metadata of one call as an upstream received it (every value of each key).
#[derive(Debug, Clone, PartialEq, Default)]
struct Received {
    call: &'static str,
    party: Vec<String>,
    namespace: Vec<String>,
    role: Vec<String>,
    token: Vec<String>,
    authorization: bool,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Received>>>);

impl Recorder {
    fn record<T>(&self, call: &'static str, req: &Request<T>) {
        let all = |key: &str| -> Vec<String> {
            req.metadata()
                .get_all(key)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect()
        };
        self.0.lock().unwrap().push(Received {
            call,
            party: all(PARTY_METADATA_KEY),
            namespace: all(NAMESPACE_METADATA_KEY),
            role: all(ROLE_METADATA_KEY),
            token: all(TOKEN_METADATA_KEY),
            authorization: req.metadata().get("authorization").is_some(),
        });
    }

    fn calls(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }

    fn of(&self, call: &str) -> Vec<Received> {
        self.calls()
            .into_iter()
            .filter(|r| r.call == call)
            .collect()
    }
}

fn unimplemented<T>() -> Res<T> {
    Err(Status::unimplemented("not in this fake"))
}

// ---- job-scheduler: Jobs (recording) and Auth (tokens the test can delete) -----

struct RecordingJobs(Recorder);

#[tonic::async_trait]
impl jobs_server::Jobs for RecordingJobs {
    type WatchJobStream = BoxStream<'static, Result<Job, Status>>;

    async fn create_job(&self, _: Request<CreateJobRequest>) -> Res<Job> {
        unimplemented()
    }
    async fn get_job(&self, req: Request<GetJobRequest>) -> Res<Job> {
        self.0.record("GetJob", &req);
        Ok(Response::new(Job {
            id: req.into_inner().id,
            ..Default::default()
        }))
    }
    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Res<ListJobsResponse> {
        unimplemented()
    }
    async fn watch_job(&self, _: Request<GetJobRequest>) -> Res<Self::WatchJobStream> {
        unimplemented()
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

/// Token sha256 -> (namespace, role); counts the lookups the proxy makes.
#[derive(Clone, Default)]
struct FakeAuth {
    tokens: Arc<Mutex<HashMap<String, (String, Role)>>>,
    lookups: Arc<AtomicUsize>,
}

impl FakeAuth {
    fn issue(&self, namespace: &str, role: Role) -> ApiToken {
        let token = ApiToken::generate();
        self.tokens
            .lock()
            .unwrap()
            .insert(token.sha256(), (namespace.to_string(), role));
        token
    }

    fn delete(&self, token: &ApiToken) {
        self.tokens.lock().unwrap().remove(&token.sha256());
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl auth_server::Auth for FakeAuth {
    async fn authenticate(&self, req: Request<AuthenticateRequest>) -> Res<Principal> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let sha256 = req.into_inner().token_sha256;
        match self.tokens.lock().unwrap().get(&sha256) {
            Some((namespace, role)) => Ok(Response::new(Principal {
                namespace: namespace.clone(),
                role: *role as i32,
                token_id: "t1".into(),
            })),
            None => Err(Status::not_found("no such token")),
        }
    }
}

// ---- client-selector: party sessions (recording) and the revoked list --------

#[derive(Clone, Default)]
struct FakeSelector {
    sessions: Recorder,
    revoked: Arc<Mutex<HashSet<String>>>,
}

impl FakeSelector {
    fn set_revoked(&self, party: &str, revoked: bool) {
        let mut set = self.revoked.lock().unwrap();
        if revoked {
            set.insert(party.to_string());
        } else {
            set.remove(party);
        }
    }
}

#[tonic::async_trait]
impl party_session_server::PartySession for FakeSelector {
    type OpenStream = BoxStream<'static, Result<ServerMessage, Status>>;

    /// Register -> Registered; Heartbeat{n} -> Cancel{"hb-n"}; open until the party ends it.
    async fn open(&self, req: Request<Streaming<PartyMessage>>) -> Res<Self::OpenStream> {
        self.sessions.record("Open", &req);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                let kind = match msg.kind {
                    Some(party_message::Kind::Register(r)) => {
                        server_message::Kind::Registered(Registered {
                            party: r.party,
                            heartbeat_interval_ms: 1000,
                        })
                    }
                    Some(party_message::Kind::Heartbeat(h)) => {
                        server_message::Kind::Cancel(Cancel {
                            task_id: format!("hb-{}", h.running_tasks),
                            reason: String::new(),
                        })
                    }
                    _ => continue,
                };
                if tx
                    .send(Ok(ServerMessage { kind: Some(kind) }))
                    .await
                    .is_err()
                {
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

#[tonic::async_trait]
impl client_selector_server::ClientSelector for FakeSelector {
    async fn list_clients(&self, _: Request<ListClientsRequest>) -> Res<ListClientsResponse> {
        unimplemented()
    }
    async fn revoke_client(&self, _: Request<RevokeClientRequest>) -> Res<ClientInfo> {
        unimplemented()
    }
    async fn list_revoked(&self, _: Request<ListRevokedRequest>) -> Res<ListRevokedResponse> {
        let parties = self.revoked.lock().unwrap().iter().cloned().collect();
        Ok(Response::new(ListRevokedResponse { parties }))
    }
    async fn describe_dataset(&self, _: Request<DescribeDatasetRequest>) -> Res<DatasetSummary> {
        unimplemented()
    }
    async fn offer_tasks(&self, _: Request<OfferTasksRequest>) -> Res<OfferTasksResponse> {
        unimplemented()
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

// ---- a coordinator (recording) --------------------------------------------

struct RecordingRound(Recorder);

#[tonic::async_trait]
impl round_server::Round for RecordingRound {
    type FetchModelStream = BoxStream<'static, Result<TensorChunk, Status>>;

    async fn fetch_model(&self, _: Request<FetchModelRequest>) -> Res<Self::FetchModelStream> {
        unimplemented()
    }
    async fn submit_update(&self, _: Request<Streaming<SubmitUpdateRequest>>) -> Res<Ack> {
        unimplemented()
    }
    async fn submit_evaluation(&self, req: Request<SubmitEvaluationRequest>) -> Res<Ack> {
        self.0.record("SubmitEvaluation", &req);
        Ok(Response::new(Ack::default()))
    }
}

// ---- the federation's certificates and the door ------------------------------

/// A federation CA with the proxy's certificate (for 127.0.0.1) and party certificates.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertAuthority,
    proxy: TlsFiles,
}

impl Pki {
    fn new() -> Self {
        cohort_security::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate("test-ca", validity()).unwrap();
        cohort_security::write_cert(&dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        let pair = ca
            .issue_service("proxy", &["127.0.0.1".to_string()], validity())
            .unwrap();
        let proxy = files(dir.path(), "proxy");
        pair.write(&proxy.cert, &proxy.key).unwrap();
        Self { dir, ca, proxy }
    }

    /// TLS at the door, client certificates optional (users send tokens), upstreams plaintext.
    fn security(&self) -> cohort_proxy::Security {
        let server =
            cohort_security::server_config(&self.proxy, cohort_security::ClientAuth::Optional)
                .unwrap();
        cohort_proxy::Security::Tls {
            server: Arc::new(server),
            upstream: None,
        }
    }

    /// A channel presenting the certificate of party `name`.
    fn party(&self, name: &str, proxy: SocketAddr) -> cohort_runtime::Channel {
        let pair = self.ca.issue_party(name, validity()).unwrap();
        let party = files(self.dir.path(), name);
        pair.write(&party.cert, &party.key).unwrap();
        let tls = cohort_runtime::Tls::load(&party).unwrap();
        cohort_runtime::channel(&proxy.to_string(), Some(&tls)).unwrap()
    }

    /// A channel that checks the proxy's certificate and presents none (a user's).
    fn user(&self, proxy: SocketAddr) -> cohort_runtime::Channel {
        cohort_runtime::server_authenticated_channel(
            &proxy.to_string(),
            self.ca.cert_pem().as_bytes(),
        )
        .unwrap()
    }
}

fn validity() -> Validity {
    Validity::for_duration(Duration::from_secs(3600))
}

fn files(dir: &std::path::Path, name: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join("ca.crt"),
    }
}

/// The recording upstreams and the proxy, with TLS on, in front of them.
struct Door {
    pki: Pki,
    auth: FakeAuth,
    selector: FakeSelector,
    jobs: Recorder,
    round: Recorder,
    proxy: TestProxy,
    _upstreams: Vec<TestServer>,
}

impl Door {
    async fn open(token_cache_ttl: Duration) -> Self {
        let pki = Pki::new();
        let (auth, selector, jobs, round) = Default::default();
        let control = FakeJobControl::default();
        let coordinator = TestServer::start(tonic::service::Routes::new(
            round_server::RoundServer::new(RecordingRound(Recorder::clone(&round))),
        ))
        .await;
        control.set_route(JOB, &coordinator.addr.to_string());
        let job_scheduler = TestServer::start(
            tonic::service::Routes::new(jobs_server::JobsServer::new(RecordingJobs(
                Recorder::clone(&jobs),
            )))
            .add_service(auth_server::AuthServer::new(FakeAuth::clone(&auth)))
            .add_service(job_control_server::JobControlServer::new(control)),
        )
        .await;
        let client_selector = TestServer::start(
            tonic::service::Routes::new(party_session_server::PartySessionServer::new(
                FakeSelector::clone(&selector),
            ))
            .add_service(client_selector_server::ClientSelectorServer::new(
                FakeSelector::clone(&selector),
            )),
        )
        .await;
        let mut config = cohort_proxy::Config::new(
            job_scheduler.endpoint(),
            closed_endpoint().await,
            client_selector.endpoint(),
        );
        config.security = pki.security();
        config.token_cache_ttl = token_cache_ttl;
        // How often the revoked parties (and routes) are reloaded.
        config.refresh_interval = Duration::from_millis(200);
        // Open sessions need not hold the test up at its end.
        config.shutdown_grace = Duration::from_millis(200);
        let proxy = TestProxy::start(config).await;
        Self {
            pki,
            auth,
            selector,
            jobs,
            round,
            proxy,
            _upstreams: vec![coordinator, job_scheduler, client_selector],
        }
    }

    fn party(&self, name: &str) -> cohort_runtime::Channel {
        self.pki.party(name, self.proxy.addr)
    }

    fn user(&self) -> cohort_runtime::Channel {
        self.pki.user(self.proxy.addr)
    }
}

/// Adds `authorization: Bearer <token>` to a request.
fn bearer<T>(token: &ApiToken, mut req: Request<T>) -> Request<T> {
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.expose()).parse().unwrap(),
    );
    req
}

/// Adds every identity header, twice, with values a hostile caller would like to be trusted.
fn forged<T>(mut req: Request<T>) -> Request<T> {
    for (key, values) in [
        (PARTY_METADATA_KEY, ["hospital-b", "admin-party"]),
        (NAMESPACE_METADATA_KEY, ["team-b", "*"]),
        (ROLE_METADATA_KEY, ["admin", "admin"]),
        (TOKEN_METADATA_KEY, ["admin-token", "t0"]),
    ] {
        for value in values {
            req.metadata_mut().append(key, value.parse().unwrap());
        }
    }
    req
}

async fn get_job(channel: &cohort_runtime::Channel, req: Request<GetJobRequest>) -> Res<Job> {
    let mut jobs = jobs_client::JobsClient::new(channel.clone());
    within("GetJob", jobs.get_job(req)).await
}

async fn submit_evaluation(
    channel: &cohort_runtime::Channel,
    req: Request<SubmitEvaluationRequest>,
) -> Res<Ack> {
    let mut round = round_client::RoundClient::new(channel.clone());
    within("SubmitEvaluation", round.submit_evaluation(req)).await
}

fn job_request(token: &ApiToken) -> Request<GetJobRequest> {
    bearer(token, Request::new(GetJobRequest { id: JOB.into() }))
}

fn evaluation() -> Request<SubmitEvaluationRequest> {
    for_job(JOB, SubmitEvaluationRequest::default())
}

fn register(party: &str) -> PartyMessage {
    PartyMessage {
        kind: Some(party_message::Kind::Register(Register {
            party: party.into(),
            ..Default::default()
        })),
    }
}

fn heartbeat(n: u32) -> PartyMessage {
    PartyMessage {
        kind: Some(party_message::Kind::Heartbeat(Heartbeat {
            resources: None,
            running_tasks: n,
        })),
    }
}

/// An open party session: what it sends and what it receives.
struct Session {
    out: mpsc::Sender<PartyMessage>,
    inbound: Streaming<ServerMessage>,
}

impl Session {
    async fn open(channel: &cohort_runtime::Channel, party: &str, forge: bool) -> Session {
        let (out, rx) = mpsc::channel(4);
        out.send(register(party)).await.unwrap();
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if forge {
            req = forged(req);
        }
        let mut client = party_session_client::PartySessionClient::new(channel.clone());
        let inbound = within("PartySession.Open", client.open(req))
            .await
            .unwrap()
            .into_inner();
        let mut session = Session { out, inbound };
        match session.next().await {
            Ok(Some(ServerMessage {
                kind: Some(server_message::Kind::Registered(r)),
            })) => assert_eq!(r.party, party),
            other => panic!("{party}: no Registered answer: {other:?}"),
        }
        session
    }

    async fn next(&mut self) -> Result<Option<ServerMessage>, Status> {
        within("a session message", self.inbound.message()).await
    }

    /// Sends a heartbeat and expects its echo: the connection is still open.
    async fn still_open(&mut self, n: u32) {
        self.out.send(heartbeat(n)).await.unwrap();
        match self.next().await {
            Ok(Some(ServerMessage {
                kind: Some(server_message::Kind::Cancel(c)),
            })) => assert_eq!(c.task_id, format!("hb-{n}")),
            other => panic!("heartbeat {n} not echoed: {other:?}"),
        }
    }
}

// ---- the tests ----------------------------------------------------------------

#[tokio::test]
async fn identity_metadata_a_caller_sends_never_reaches_a_service() {
    let door = Door::open(Duration::from_secs(10)).await;
    let token = door.auth.issue("team-a", Role::Member);
    let user = door.user();
    let party = door.party("hospital-a");

    // A user (token of team-a, member) claiming a party, another namespace and admin.
    get_job(&user, forged(job_request(&token))).await.unwrap();
    assert_eq!(
        door.jobs.calls(),
        [Received {
            call: "GetJob",
            party: vec![],
            namespace: vec!["team-a".into()],
            role: vec!["member".into()],
            token: vec!["t1".into()],
            authorization: false,
        }],
        "job-scheduler must see the token's namespace, role and id only, and no token"
    );

    // A party (certificate of hospital-a) claiming another party, a namespace and a role:
    // on a round call routed to a coordinator and on its session with client-selector.
    submit_evaluation(&party, forged(evaluation()))
        .await
        .unwrap();
    let mut session = Session::open(&party, "hospital-a", true).await;
    session.still_open(1).await;
    let as_party = |call| Received {
        call,
        party: vec!["hospital-a".into()],
        ..Default::default()
    };
    assert_eq!(door.round.calls(), [as_party("SubmitEvaluation")]);
    assert_eq!(door.selector.sessions.calls(), [as_party("Open")]);

    // Forged identity is no credential: a party calling a user API without a token, and a
    // user calling a party API without a certificate, are refused before any service.
    let refused = get_job(
        &party,
        forged(Request::new(GetJobRequest { id: JOB.into() })),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = submit_evaluation(&user, forged(bearer(&token, evaluation())))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(door.jobs.calls().len(), 1, "{:?}", door.jobs.calls());
    assert_eq!(door.round.calls().len(), 1, "{:?}", door.round.calls());
    door.proxy.stop().await;
}

#[tokio::test]
async fn a_checked_token_is_trusted_for_the_cache_ttl_without_asking_again() {
    // A TTL no test run outlives: every answer after the first comes from the cache.
    let door = Door::open(Duration::from_secs(600)).await;
    let user = door.user();
    let member = door.auth.issue("team-a", Role::Member);
    let viewer = door.auth.issue("team-b", Role::Viewer);

    get_job(&user, job_request(&member)).await.unwrap();
    assert_eq!(door.auth.lookups(), 1);
    // Deleted in job-scheduler: still trusted until the TTL is over (the documented cost).
    door.auth.delete(&member);
    for _ in 0..3 {
        get_job(&user, job_request(&member)).await.unwrap();
    }
    assert_eq!(door.auth.lookups(), 1, "answered from the cache");

    // Each token has its own entry: another token is looked up, once.
    get_job(&user, job_request(&viewer)).await.unwrap();
    get_job(&user, job_request(&viewer)).await.unwrap();
    assert_eq!(door.auth.lookups(), 2);
    let seen: Vec<(Vec<String>, Vec<String>)> = door
        .jobs
        .of("GetJob")
        .into_iter()
        .map(|r| (r.namespace, r.role))
        .collect();
    let member_seen = (vec!["team-a".to_string()], vec!["member".to_string()]);
    let viewer_seen = (vec!["team-b".to_string()], vec!["viewer".to_string()]);
    assert_eq!(
        seen,
        [vec![member_seen; 4], vec![viewer_seen.clone(), viewer_seen]].concat(),
        "each cached answer carries its own token's identity"
    );
    door.proxy.stop().await;
}

#[tokio::test]
async fn after_the_cache_ttl_a_token_is_checked_again() {
    let ttl = Duration::from_millis(500);
    let door = Door::open(ttl).await;
    let user = door.user();
    let kept = door.auth.issue("team-a", Role::Admin);
    let deleted = door.auth.issue("team-a", Role::Member);

    get_job(&user, job_request(&kept)).await.unwrap();
    get_job(&user, job_request(&deleted)).await.unwrap();
    assert_eq!(door.auth.lookups(), 2);
    door.auth.delete(&deleted);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;

    // Past the TTL each token is asked about again: the kept one still works, the deleted
    // one is refused as any invalid token is.
    get_job(&user, job_request(&kept)).await.unwrap();
    assert_eq!(door.auth.lookups(), 3, "the kept token is checked again");
    let refused = get_job(&user, job_request(&deleted)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(refused.message(), "the API token is not valid");
    assert_eq!(door.auth.lookups(), 4, "the deleted token is checked again");
    assert_eq!(
        door.jobs.of("GetJob").len(),
        3,
        "the refused call went nowhere"
    );
    door.proxy.stop().await;
}

#[tokio::test]
async fn a_revoked_party_is_refused_and_its_open_connection_closed() {
    let door = Door::open(Duration::from_secs(10)).await;
    let revoked = door.party("hospital-a");
    let other = door.party("hospital-b");
    let mut revoked_session = Session::open(&revoked, "hospital-a", false).await;
    let mut other_session = Session::open(&other, "hospital-b", false).await;
    submit_evaluation(&revoked, evaluation()).await.unwrap();

    door.selector.set_revoked("hospital-a", true);
    let since = tokio::time::Instant::now();
    // The open session ends: its connection is closed under it (no clean end of stream).
    match revoked_session.next().await {
        Err(status) => eprintln!(
            "revoked party's session closed after {:?} (reload every 200 ms): {status}",
            since.elapsed()
        ),
        Ok(message) => panic!("the revoked party's session goes on: {message:?}"),
    }
    // Only that party's connection: another party's session goes on.
    other_session.still_open(2).await;

    // New calls of the revoked party (on a new connection) are refused at the door.
    let revoked = door.party("hospital-a");
    let before = (
        door.round.calls().len(),
        door.selector.sessions.calls().len(),
    );
    let refused = submit_evaluation(&revoked, evaluation()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(refused.message(), "party hospital-a is revoked");
    let (out, rx) = mpsc::channel(1);
    out.send(register("hospital-a")).await.unwrap();
    let mut client = party_session_client::PartySessionClient::new(revoked.clone());
    let refused = within(
        "PartySession.Open",
        client.open(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        (
            door.round.calls().len(),
            door.selector.sessions.calls().len()
        ),
        before,
        "no service heard from the revoked party"
    );
    submit_evaluation(&other, evaluation()).await.unwrap();

    // Revocation is a name in client-selector's list: taken off it, the party is let in again.
    door.selector.set_revoked("hospital-a", false);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match submit_evaluation(&revoked, evaluation()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::PermissionDenied => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still refused after reinstatement: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("unexpected answer: {s:?}"),
        }
    }
    // The connection it opened while revoked is closed when it is revoked again.
    let mut session = Session::open(&revoked, "hospital-a", false).await;
    door.selector.set_revoked("hospital-a", true);
    let closed = session.next().await;
    assert!(
        closed.is_err(),
        "revoked again, its session goes on: {closed:?}"
    );
    door.proxy.stop().await;
}
