//! A real task-manager process against an in-process federation stand-in: one loopback
//! server answering PartySession (as client-selector would, through the proxy) and Round (as
//! the job's coordinator would). The test sends offers and reads the replies and task
//! statuses; accepted tasks run the real executor built next to task-manager, one process per
//! task given a task file, or (the last test) one kept for the job's tasks. The stand-in
//! can close sessions, refuse new ones (the proxy down) and hold an executor's model fetch,
//! to show that tasks outlive a session and that nothing stale runs.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cohort_core::{JobSpec, NamedTensor};
use cohort_proto::v1 as pb;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tonic::{Code, Request, Response, Status, Streaming};

/// Every wait in these tests ends by this, even on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

/// Round tokens the stand-in coordinator knows.
const SHAPE_TOKEN: &str = "token-wrong-shape";
const LONG_TOKEN: &str = "token-long-error";
/// The model fetch never answers.
const HANG_TOKEN: &str = "token-hang";
/// The model fetch waits for the test's release, then fails with `RELEASED`.
const HOLD_TOKEN: &str = "token-hold";
const RELEASED: &str = "released by the test";

/// One open party session, as the server sees it.
struct Session {
    to_party: mpsc::Sender<Result<pb::ServerMessage, Status>>,
    from_party: Streaming<pb::PartyMessage>,
    /// Read but not yet asked for.
    pending: Vec<pb::party_message::Kind>,
}

struct PartySession {
    sessions: mpsc::Sender<Session>,
    /// While set, sessions are refused (as by a proxy that is down).
    down: Arc<AtomicBool>,
}

type ServerStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::party_session_server::PartySession for PartySession {
    type OpenStream = ServerStream;

    async fn open(
        &self,
        req: Request<Streaming<pb::PartyMessage>>,
    ) -> Result<Response<ServerStream>, Status> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the proxy is down for the test"));
        }
        let (to_party, rx) = mpsc::channel(16);
        let session = Session {
            to_party,
            from_party: req.into_inner(),
            pending: Vec::new(),
        };
        self.sessions
            .send(session)
            .await
            .map_err(|_| Status::unavailable("the test is over"))?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn check(
        &self,
        _: Request<pb::PartyCheckRequest>,
    ) -> Result<Response<pb::PartyCheckResponse>, Status> {
        Err(Status::unimplemented("not part of these tests"))
    }
}

/// The job's coordinator: a model made for `hidden: [64]`, a long, multi-line refusal, no
/// answer at all, or a refusal once the test releases it.
struct Round {
    model: Arc<Vec<NamedTensor>>,
    release: watch::Receiver<bool>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::TensorChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::round_server::Round for Round {
    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        req: Request<pb::FetchModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        match req.into_inner().task_token.as_str() {
            SHAPE_TOKEN => {
                let chunks: Vec<_> = cohort_fl::chunk_tensors(&self.model, cohort_fl::CHUNK_BYTES)
                    .map(Ok)
                    .collect();
                Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
            }
            LONG_TOKEN => Err(Status::failed_precondition(format!(
                "first line\nsecond line\n{}",
                "x".repeat(3000)
            ))),
            HANG_TOKEN => std::future::pending().await,
            HOLD_TOKEN => {
                let _ = self.release.clone().wait_for(|released| *released).await;
                Err(Status::failed_precondition(RELEASED))
            }
            _ => Err(Status::permission_denied("unknown task token")),
        }
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

/// The stand-in federation.
struct Federation {
    /// Its address, for `--proxy`.
    proxy: String,
    /// Party sessions as they open.
    sessions: mpsc::Receiver<Session>,
    /// Set: new sessions are refused.
    down: Arc<AtomicBool>,
    /// Send `true`: held model fetches fail with `RELEASED`.
    release: watch::Sender<bool>,
}

async fn federation() -> Federation {
    let (sessions, incoming) = mpsc::channel(4);
    let (release, released) = watch::channel(false);
    let down = Arc::new(AtomicBool::new(false));
    let model = cohort_train::init_model(&spec("default", 2, 2, "[64]").model, 64, 10, 7).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::party_session_server::PartySessionServer::new(
                PartySession {
                    sessions,
                    down: down.clone(),
                },
            ))
            .add_service(pb::round_server::RoundServer::new(Round {
                model: Arc::new(model),
                release: released,
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Federation {
        proxy: addr,
        sessions: incoming,
        down,
        release,
    }
}

impl Federation {
    /// The next session the party opens.
    async fn next_session(&mut self) -> Session {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("the party opens a session")
            .unwrap()
    }
}

fn spec(namespace: &str, per_round: u32, min: u32, hidden: &str) -> JobSpec {
    JobSpec::parse(&format!(
        "name: trust\n\
         namespace: {namespace}\n\
         model: {{arch: mlp, hidden: {hidden}}}\n\
         data: {{dataset: digits}}\n\
         training: {{epochs: 1, batch_size: 16, optimizer: {{name: sgd, lr: 0.1}}}}\n\
         rounds: 1\n\
         clients: {{per_round: {per_round}, min: {min}}}\n"
    ))
    .unwrap()
}

fn offer(id: &str, spec_json: String, token: &str) -> pb::ServerMessage {
    offer_until(id, spec_json, token, 0, 0)
}

/// An offer to be answered by `reply_by_ms`, for a task due by `deadline_ms` (0: none).
fn offer_until(
    id: &str,
    spec_json: String,
    token: &str,
    reply_by_ms: i64,
    deadline_ms: i64,
) -> pb::ServerMessage {
    pb::ServerMessage {
        kind: Some(pb::server_message::Kind::Offer(pb::Offer {
            offer_id: id.into(),
            task: Some(pb::Task {
                task_id: format!("task-{id}"),
                job_id: "trust-abc123".into(),
                round: 1,
                kind: pb::TaskKind::Train as i32,
                party: "p1".into(),
                dataset: "digits".into(),
                task_token: token.into(),
                spec_json,
                seed: 1,
                deadline_ms,
                trace_context: Default::default(),
            }),
            reply_by_ms,
        })),
    }
}

fn cancel(task_id: &str) -> pb::ServerMessage {
    pb::ServerMessage {
        kind: Some(pb::server_message::Kind::Cancel(pb::Cancel {
            task_id: task_id.into(),
            reason: "cancelled by the test".into(),
        })),
    }
}

impl Session {
    /// The next message `pick` takes, keeping the others for later.
    async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&pb::party_message::Kind) -> Option<T>,
    ) -> T {
        if let Some(i) = self.pending.iter().position(|m| pick(m).is_some()) {
            return pick(&self.pending.remove(i)).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.from_party.next())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}: {:?}", self.pending))
                .unwrap_or_else(|| panic!("session closed before {what}"))
                .unwrap();
            let Some(kind) = msg.kind else { continue };
            match pick(&kind) {
                Some(found) => return found,
                None => self.pending.push(kind),
            }
        }
    }

    async fn send(&self, msg: pb::ServerMessage) {
        self.to_party.send(Ok(msg)).await.unwrap();
    }

    /// Reads the party's Register (returned) and registers it.
    async fn register(&mut self) -> pb::Register {
        let register = self
            .wait_for("Register", |m| match m {
                pb::party_message::Kind::Register(r) => Some(r.clone()),
                _ => None,
            })
            .await;
        self.send(pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Registered(pb::Registered {
                party: register.party.clone(),
                heartbeat_interval_ms: 60_000,
            })),
        })
        .await;
        register
    }

    /// Waits for the task's RUNNING status.
    async fn running(&mut self, task_id: &str) {
        self.wait_for(&format!("{task_id} running"), |m| match m {
            pb::party_message::Kind::TaskStatus(s)
                if s.task_id == task_id && s.phase == pb::TaskPhase::Running as i32 =>
            {
                Some(())
            }
            _ => None,
        })
        .await
    }

    /// No status of this task was read (nor is one waiting unread among those read).
    fn no_status_of(&self, task_id: &str) {
        assert!(
            !self.pending.iter().any(
                |m| matches!(m, pb::party_message::Kind::TaskStatus(s) if s.task_id == task_id)
            ),
            "{task_id} has a status: {:?}",
            self.pending
        );
    }

    async fn reply(&mut self, offer_id: &str) -> pb::OfferReply {
        self.wait_for(&format!("reply to {offer_id}"), |m| match m {
            pb::party_message::Kind::OfferReply(r) if r.offer_id == offer_id => Some(r.clone()),
            _ => None,
        })
        .await
    }

    /// The task's final status (not RUNNING).
    async fn end_of(&mut self, task_id: &str) -> pb::TaskStatus {
        self.wait_for(&format!("end of {task_id}"), |m| match m {
            pb::party_message::Kind::TaskStatus(s)
                if s.task_id == task_id && s.phase != pb::TaskPhase::Running as i32 =>
            {
                Some(s.clone())
            }
            _ => None,
        })
        .await
    }
}

/// A running task-manager; its log (stderr) goes to a file.
struct Party {
    child: tokio::process::Child,
    log: PathBuf,
    addr: String,
    dir: tempfile::TempDir,
}

impl Party {
    /// A task-manager with `flags`; one executor process per task (`--executor-idle-secs
    /// 0`) unless the flags say otherwise.
    async fn start(proxy: &str, flags: &[&str]) -> Party {
        let dir = tempfile::tempdir().unwrap();
        let (mut command, log, ready) = task_manager(dir.path(), proxy);
        if !flags.contains(&"--executor-idle-secs") {
            command.args(["--executor-idle-secs", "0"]);
        }
        let mut child = command.args(flags).spawn().unwrap();
        let addr = match cohort_runtime::wait_for_file(&ready, WAIT).await {
            Some(addr) => addr,
            None => {
                let _ = child.kill().await;
                panic!(
                    "task-manager did not become ready: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Party {
            child,
            log,
            addr,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Waits until a line of the log satisfies `line`.
    async fn wait_log(&self, what: &str, line: impl Fn(&str) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.log().lines().any(&line) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} in the log within {WAIT:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        cohort_runtime::process::signal_pid(self.child.id().unwrap(), signal);
    }

    /// The task's directory in the workspace (its task file, its executor's log).
    fn task_dir(&self, task_id: &str) -> PathBuf {
        self.dir.path().join("workspace/tasks").join(task_id)
    }

    /// The live processes task-manager started (its executors).
    fn executors(&self) -> Vec<u32> {
        let me = self.child.id().unwrap();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                // `pid (comm) state ppid ...`; comm may hold spaces, never a ')' at its end.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| {
                        let (_, rest) = stat.rsplit_once(')')?;
                        let mut fields = rest.split_whitespace();
                        let state = fields.next()?;
                        let ppid = fields.next()?.parse::<u32>().ok()?;
                        Some(ppid == me && state != "Z")
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Waits until task-manager runs `count` executors.
    async fn wait_executors(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.executors().len() != count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not {count} executor(s) within {WAIT:?}: {:?}",
                self.executors()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        cohort_runtime::process::signal_pid(
            self.child.id().unwrap(),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("task-manager stops on SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}: {}", self.log());
    }
}

fn digits_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/digits.csv")
}

/// The real executor, built next to task-manager (`cargo test -p cohort-task-manager -p
/// cohort-executor`, or the workspace).
fn executor_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_task-manager")).with_file_name("executor");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p cohort-executor`",
        bin.display()
    );
    bin
}

/// A task-manager command for party p1 in `dir` (plaintext, to the stand-in), its log file
/// and its ready file.
fn task_manager(dir: &Path, proxy: &str) -> (tokio::process::Command, PathBuf, PathBuf) {
    let datasets = dir.join("datasets.json");
    let json = serde_json::json!({
        "digits": {"path": digits_csv(), "format": "csv", "scale": 0.0625, "classes": 10}
    });
    std::fs::write(&datasets, json.to_string()).unwrap();
    let log = dir.join("task-manager.log");
    let ready = dir.join("ready");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_task-manager"));
    command
        .args(["--insecure", "--party", "p1", "--proxy", proxy])
        .arg("--datasets")
        .arg(&datasets)
        .arg("--workspace")
        .arg(dir.join("workspace"))
        .arg("--executor-bin")
        .arg(executor_bin())
        .args(["--listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .env_remove("COHORT_ACCEPT_NAMESPACES")
        .env_remove("COHORT_MIN_COHORT")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true);
    (command, log, ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_outside_the_partys_terms_are_refused_with_the_reason() {
    let mut fed = federation().await;
    let party = Party::start(&fed.proxy, &["--accept-namespaces", "team-a,team-b"]).await;
    let mut session = fed.next_session().await;
    session.register().await;
    assert!(
        party
            .log()
            .contains("accepting tasks from namespace(s) team-a, team-b"),
        "{}",
        party.log()
    );

    let refused = [
        (
            "other-namespace",
            spec("team-c", 3, 2, "[32]").to_json(),
            r#"this party does not accept tasks from namespace "team-c""#,
        ),
        (
            "cohort-of-one",
            spec("team-a", 1, 1, "[32]").to_json(),
            "clients.per_round is 1, below this party's minimum cohort of 2",
        ),
        (
            "quorum-of-one",
            spec("team-b", 3, 1, "[32]").to_json(),
            "clients.min is 1, below this party's minimum cohort of 2",
        ),
        ("bad-spec", "{}".to_string(), "malformed task: spec_json: "),
    ];
    for (id, spec_json, reason) in &refused {
        session
            .send(offer(id, spec_json.clone(), SHAPE_TOKEN))
            .await;
        let reply = session.reply(id).await;
        assert!(!reply.accepted, "{id} was accepted");
        assert!(reply.reason.contains(reason), "{id}: {}", reply.reason);
    }

    // Within its terms, the same party takes the task; the executor's fatal error comes back.
    session
        .send(offer(
            "ok",
            spec("team-a", 2, 2, "[32]").to_json(),
            SHAPE_TOKEN,
        ))
        .await;
    let reply = session.reply("ok").await;
    assert!(reply.accepted, "{}", reply.reason);
    let end = session.end_of("task-ok").await;
    assert_eq!(end.phase, pb::TaskPhase::Failed as i32, "{end:?}");
    assert!(
        end.message.starts_with(
            r#"executor exit status: 1: error: training failed: weights: tensor "fc0.weight": has shape [64, 64]"#
        ) && end.message.contains("needs [32, 64]"),
        "{}",
        end.message
    );

    // Each refusal is in the party's log at INFO, with its reason.
    let log = party.log();
    for (id, _, reason) in &refused {
        assert!(
            log.lines().any(|l| l.contains(" INFO ")
                && l.contains("offer refused")
                && l.contains(id)
                && l.contains(reason)),
            "no INFO line for {id}: {log}"
        );
    }
    party.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tasks_reason_reaches_the_server_on_one_bounded_line() {
    let mut fed = federation().await;
    let party = Party::start(&fed.proxy, &["--accept-namespaces", "*"]).await;
    let mut session = fed.next_session().await;
    session.register().await;
    assert!(
        party.log().contains("accepting tasks from every namespace"),
        "{}",
        party.log()
    );

    session
        .send(offer(
            "long",
            spec("anyone", 2, 2, "[32]").to_json(),
            LONG_TOKEN,
        ))
        .await;
    assert!(session.reply("long").await.accepted);
    let end = session.end_of("task-long").await;
    assert_eq!(end.phase, pb::TaskPhase::Failed as i32, "{end:?}");
    assert!(
        end.message
            .starts_with("executor exit status: 1: error: cannot fetch the model: ")
            && end.message.contains("first line"),
        "{}",
        end.message
    );
    assert_eq!(end.message.chars().count(), 1000, "{}", end.message);
    assert!(end.message.ends_with('…'), "{}", end.message);
    assert!(!end.message.contains(char::is_control), "{}", end.message);
    party.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_port_serves_health_only() {
    // Nothing at the proxy's address: the health port answers anyway.
    let party = Party::start("127.0.0.1:1", &[]).await;
    assert!(
        party.log().contains("accepting tasks from every namespace"),
        "{}",
        party.log()
    );
    let channel = cohort_runtime::lazy_channel(&party.addr).unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = tokio::time::timeout(
        WAIT,
        health.check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await
    .unwrap()
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
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let refused = tokio::time::timeout(WAIT, async {
        // UNIMPLEMENTED may come as the call's answer or as the stream's first item.
        let mut stream = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await?
            .into_inner();
        stream.message().await
    })
    .await
    .unwrap()
    .expect_err("reflection is not served");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused}");
    party.stop().await;
}

/// Starting with `flags` and `env` fails before anything is served, saying `says`.
async fn refused_at_start(dir: &Path, flags: &[&str], env: &[(&str, &str)], says: &str) {
    let (mut command, log, ready) = task_manager(dir, "127.0.0.1:1");
    let status = tokio::time::timeout(WAIT, command.args(flags).envs(env.iter().copied()).status())
        .await
        .expect("a bad configuration exits promptly")
        .unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{flags:?} {env:?} accepted: {err}");
    assert!(err.contains(says), "{flags:?} {env:?}: says {says}: {err}");
    assert!(!ready.exists(), "{flags:?} {env:?}: served anyway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_terms_are_refused_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let flag = |value: &'static str| ["--accept-namespaces", value];
    refused_at_start(
        dir,
        &flag("Team_A"),
        &[],
        r#"--accept-namespaces: "Team_A" is not a namespace"#,
    )
    .await;
    refused_at_start(
        dir,
        &flag("team-a,,team-b"),
        &[],
        "--accept-namespaces: an empty namespace",
    )
    .await;
    refused_at_start(
        dir,
        &flag("*,team-a"),
        &[],
        r#"--accept-namespaces: "*" already accepts every namespace"#,
    )
    .await;
    refused_at_start(
        dir,
        &[],
        &[("COHORT_ACCEPT_NAMESPACES", "team-a,-bad")],
        r#"--accept-namespaces: "-bad" is not a namespace"#,
    )
    .await;
    refused_at_start(
        dir,
        &["--min-cohort", "0"],
        &[],
        "--min-cohort: must be at least 1",
    )
    .await;
    refused_at_start(
        dir,
        &[],
        &[("COHORT_MIN_COHORT", "0")],
        "--min-cohort: must be at least 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_tasks_and_their_statuses_outlive_a_session() {
    let mut fed = federation().await;
    let party = Party::start(&fed.proxy, &["--max-tasks", "3"]).await;
    let mut session = fed.next_session().await;
    assert!(session.register().await.running_tasks.is_empty());
    for (id, token) in [("held", HOLD_TOKEN), ("kept", HANG_TOKEN)] {
        session
            .send(offer(id, spec("anyone", 2, 2, "[64]").to_json(), token))
            .await;
        let reply = session.reply(id).await;
        assert!(reply.accepted, "{id}: {}", reply.reason);
        session.running(&format!("task-{id}")).await;
    }
    party.wait_executors(2).await;

    // The server closes the session: the executors keep running, and the party's next
    // Register asks the server to keep both tasks.
    drop(session);
    let mut session = fed.next_session().await;
    let register = session.register().await;
    assert_eq!(register.running_tasks, ["task-held", "task-kept"]);
    assert_eq!(party.executors().len(), 2);

    // A third task ends on this session, but its status is lost with the session (read
    // here, never acted on): the party cannot know, and tells the next session again.
    session
        .send(offer(
            "lost",
            spec("anyone", 2, 2, "[32]").to_json(),
            SHAPE_TOKEN,
        ))
        .await;
    assert!(session.reply("lost").await.accepted);
    assert_eq!(
        session.end_of("task-lost").await.phase,
        pb::TaskPhase::Failed as i32
    );

    // The proxy goes down, and the held task ends while no session is open.
    fed.down.store(true, Ordering::SeqCst);
    drop(session);
    let closed = |log: &str| log.matches("session closed by the server").count();
    let deadline = tokio::time::Instant::now() + WAIT;
    while closed(&party.log()) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "{}", party.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fed.release.send(true).unwrap();
    party
        .wait_log("the held task's end", |l| {
            l.contains("task failed") && l.contains("task-held") && l.contains(RELEASED)
        })
        .await;
    party.wait_executors(1).await;

    // Back: the ended tasks are listed (the server may not have heard of their end), and
    // their statuses follow the registration.
    fed.down.store(false, Ordering::SeqCst);
    let mut session = fed.next_session().await;
    let register = session.register().await;
    assert_eq!(
        register.running_tasks,
        ["task-held", "task-kept", "task-lost"]
    );
    let end = session.end_of("task-held").await;
    assert_eq!(end.phase, pb::TaskPhase::Failed as i32, "{end:?}");
    assert!(
        end.message
            .starts_with("executor exit status: 1: error: cannot fetch the model: ")
            && end.message.contains(RELEASED),
        "{}",
        end.message
    );
    let end = session.end_of("task-lost").await;
    assert_eq!(end.phase, pb::TaskPhase::Failed as i32, "{end:?}");
    assert!(end.message.contains("needs [32, 64]"), "{}", end.message);

    // The other executor ran on throughout: it answers this session's cancel, here.
    session.send(cancel("task-kept")).await;
    let end = session.end_of("task-kept").await;
    assert_eq!(end.phase, pb::TaskPhase::Cancelled as i32, "{end:?}");
    party.wait_executors(0).await;
    assert!(
        party
            .log()
            .contains("sending again the task statuses the broken session may have lost"),
        "{}",
        party.log()
    );
    party.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_past_their_reply_deadline_or_their_tasks_are_refused_and_nothing_runs() {
    let mut fed = federation().await;
    let party = Party::start(&fed.proxy, &[]).await;
    let mut session = fed.next_session().await;
    session.register().await;
    let now = cohort_runtime::now_ms();
    let spec_json = spec("anyone", 2, 2, "[32]").to_json();

    session
        .send(offer_until(
            "late",
            spec_json.clone(),
            SHAPE_TOKEN,
            now - 1500,
            now + 60_000,
        ))
        .await;
    let reply = session.reply("late").await;
    assert!(!reply.accepted);
    assert!(
        reply.reason.starts_with("the offer expired (reply by ")
            && reply.reason.contains(" UTC passed ")
            && reply.reason.ends_with(" s ago)"),
        "{}",
        reply.reason
    );

    session
        .send(offer_until(
            "overdue",
            spec_json.clone(),
            SHAPE_TOKEN,
            now + 60_000,
            now - 1500,
        ))
        .await;
    let reply = session.reply("overdue").await;
    assert!(!reply.accepted);
    assert_eq!(reply.reason, "the task's deadline passed");

    // The same offer in time is taken, and its executor runs (and fails on the model).
    session
        .send(offer_until(
            "in-time",
            spec_json,
            SHAPE_TOKEN,
            now + 60_000,
            now + 120_000,
        ))
        .await;
    let reply = session.reply("in-time").await;
    assert!(reply.accepted, "{}", reply.reason);
    let end = session.end_of("task-in-time").await;
    assert_eq!(end.phase, pb::TaskPhase::Failed as i32, "{end:?}");
    assert!(end.message.contains("needs [32, 64]"), "{}", end.message);

    for task in ["task-late", "task-overdue"] {
        session.no_status_of(task);
        assert!(!party.task_dir(task).exists(), "{task} was prepared");
    }
    let log = party.log();
    assert!(
        log.lines()
            .any(|l| l.contains("executor started") && l.contains("task-in-time")),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("executor started") && !l.contains("task-in-time")),
        "{log}"
    );
    party.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_past_its_tasks_deadline_is_stopped_and_the_task_failed() {
    let mut fed = federation().await;
    let party = Party::start(&fed.proxy, &[]).await;
    let mut session = fed.next_session().await;
    session.register().await;
    // Far enough ahead to be accepted on a loaded machine.
    let deadline_ms = cohort_runtime::now_ms() + 3000;
    session
        .send(offer_until(
            "stuck",
            spec("anyone", 2, 2, "[64]").to_json(),
            HANG_TOKEN,
            deadline_ms,
            deadline_ms,
        ))
        .await;
    let reply = session.reply("stuck").await;
    assert!(reply.accepted, "{}", reply.reason);
    session.running("task-stuck").await;
    party.wait_executors(1).await;

    let end = session.end_of("task-stuck").await;
    assert_eq!(end.phase, pb::TaskPhase::Failed as i32, "{end:?}");
    assert_eq!(end.message, "the task's deadline passed");
    // Not before the grace after the deadline (10 s; the clocks agree here).
    assert!(
        cohort_runtime::now_ms() >= deadline_ms + 10_000,
        "stopped before the grace"
    );
    // The executor is gone (reaped before the status went), its task file removed.
    assert!(party.executors().is_empty(), "{:?}", party.executors());
    assert!(!party.task_dir("task-stuck").join("task.pb").exists());
    assert!(
        party
            .log()
            .contains("executor still running past the task's deadline; stopping it"),
        "{}",
        party.log()
    );
    party.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_stopped_past_an_offers_reply_deadline_runs_nothing_stale() {
    use nix::sys::signal::Signal;
    let mut fed = federation().await;
    let party = Party::start(&fed.proxy, &[]).await;
    let mut session = fed.next_session().await;
    session.register().await;
    let spec_json = spec("anyone", 2, 2, "[32]").to_json();

    // The offer reaches a stopped party and waits in its socket past the reply deadline.
    party.signal(Signal::SIGSTOP);
    let reply_by = cohort_runtime::now_ms() + 1000;
    session
        .send(offer_until(
            "stale",
            spec_json.clone(),
            SHAPE_TOKEN,
            reply_by,
            reply_by + 60_000,
        ))
        .await;
    while cohort_runtime::now_ms() <= reply_by + 500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    party.signal(Signal::SIGCONT);

    let reply = session.reply("stale").await;
    assert!(!reply.accepted, "a stale offer was taken");
    assert!(
        reply.reason.starts_with("the offer expired (reply by "),
        "{}",
        reply.reason
    );
    assert!(party.executors().is_empty(), "{:?}", party.executors());
    assert!(!party.task_dir("task-stale").exists());

    // Awake, the party takes a fresh offer: the stale one was refused for its age alone.
    let now = cohort_runtime::now_ms();
    session
        .send(offer_until(
            "fresh",
            spec_json,
            SHAPE_TOKEN,
            now + 60_000,
            now + 120_000,
        ))
        .await;
    let reply = session.reply("fresh").await;
    assert!(reply.accepted, "{}", reply.reason);
    session.end_of("task-fresh").await;
    session.no_status_of("task-stale");
    let log = party.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("executor started") && l.contains("task-stale")),
        "{log}"
    );
    party.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_s_executor_is_kept_between_its_tasks_and_ends_with_them() {
    let mut fed = federation().await;
    let party = Party::start(&fed.proxy, &["--executor-idle-secs", "30"]).await;
    let mut session = fed.next_session().await;
    session.register().await;
    let spec_json = spec("anyone", 2, 2, "[32]").to_json();

    // Two tasks of the job, one after the other, on one executor process that answers
    // each: a failed task does not end it.
    let mut kept = None;
    for id in ["first", "second"] {
        session
            .send(offer(id, spec_json.clone(), SHAPE_TOKEN))
            .await;
        assert!(session.reply(id).await.accepted);
        let end = session.end_of(&format!("task-{id}")).await;
        assert_eq!(end.phase, pb::TaskPhase::Failed as i32, "{end:?}");
        assert!(
            end.message.starts_with(
                r#"error: training failed: weights: tensor "fc0.weight": has shape [64, 64]"#
            ),
            "{}",
            end.message
        );
        party.wait_executors(1).await;
        let pid = party.executors()[0];
        assert_eq!(
            *kept.get_or_insert(pid),
            pid,
            "{id} ran on another executor"
        );
        // The task went down a pipe: nothing of it is on the disk.
        assert!(!party.task_dir(&format!("task-{id}")).exists());
    }
    assert!(
        party
            .log()
            .lines()
            .any(|l| l.contains("task-second") && l.contains("reused=true")),
        "{}",
        party.log()
    );

    // Its answer is the task's reason, on one bounded line.
    session
        .send(offer("long", spec_json.clone(), LONG_TOKEN))
        .await;
    assert!(session.reply("long").await.accepted);
    let end = session.end_of("task-long").await;
    assert!(
        end.message.starts_with("error: cannot fetch the model: ")
            && end.message.contains("first line"),
        "{}",
        end.message
    );
    assert_eq!(end.message.chars().count(), 1000, "{}", end.message);
    assert!(!end.message.contains(char::is_control), "{}", end.message);

    // A cancelled task ends its executor; the next task gets a new one.
    session
        .send(offer("stuck", spec_json.clone(), HANG_TOKEN))
        .await;
    assert!(session.reply("stuck").await.accepted);
    session.running("task-stuck").await;
    session.send(cancel("task-stuck")).await;
    let end = session.end_of("task-stuck").await;
    assert_eq!(end.phase, pb::TaskPhase::Cancelled as i32, "{end:?}");
    party.wait_executors(0).await;
    session.send(offer("after", spec_json, SHAPE_TOKEN)).await;
    assert!(session.reply("after").await.accepted);
    session.end_of("task-after").await;
    party.wait_executors(1).await;
    let fresh = party.executors()[0];
    assert_ne!(Some(fresh), kept, "the cancelled task's executor came back");

    // Stopping the task-manager stops the executor it kept.
    party.stop().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while Path::new(&format!("/proc/{fresh}")).exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "executor {fresh} outlived its task-manager"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
