//! Security at the federation's door, with the real binaries over loopback:
//! parties must hold a client certificate of the federation CA, users an API
//! token scoped to a namespace and a role, and round calls are bound to the
//! party a task was offered to. Each test asserts the refusal itself.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use cohort_cli::Api;
use cohort_cli::profile::Profile;
use cohort_integration_tests::{
    Federation, Storage, TCP_ESTABLISHED, digits_job, log_files_under, state_of, tcp_sockets,
    wait_clients,
};
use cohort_proto::v1 as pb;
use cohort_runtime::Channel;
use cohort_security::{CertAuthority, TlsFiles, Validity};
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::codegen::http::Uri;
use tonic::codegen::{BoxFuture, Service};

const WAIT: Duration = Duration::from_secs(20);

fn ca(fed: &Federation) -> CertAuthority {
    let pki = &fed.stack.pki;
    CertAuthority::load(&pki.join("ca.crt"), &pki.join("ca.key")).expect("the federation CA")
}

/// Writes a party certificate issued by `ca` and returns its TLS files.
fn party_files(
    dir: &Path,
    ca: &CertAuthority,
    ca_cert: &Path,
    name: &str,
    validity: Validity,
) -> TlsFiles {
    let pair = ca.issue_party(name, validity).expect("issue");
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    cohort_security::write_cert(&cert, &pair.cert_pem).expect("test step");
    cohort_security::write_key(&key, &pair.key_pem).expect("test step");
    TlsFiles {
        cert,
        key,
        ca: ca_cert.to_path_buf(),
    }
}

fn fresh() -> Validity {
    Validity::for_duration(Duration::from_secs(3600))
}

/// A channel to the proxy presenting `files` as the client certificate.
fn party_channel(fed: &Federation, files: &TlsFiles) -> Channel {
    let tls = cohort_runtime::Tls::load(files).expect("party TLS files");
    cohort_runtime::channel(&fed.stack.proxy, Some(&tls)).expect("channel")
}

fn digits_register(party: &str) -> pb::PartyMessage {
    pb::PartyMessage {
        kind: Some(pb::party_message::Kind::Register(pb::Register {
            party: party.to_string(),
            datasets: vec![pb::DatasetInfo {
                name: "digits".into(),
                samples: 300,
                features: 64,
                classes: 10,
            }],
            resources: Some(pb::Resources {
                cpus: 1,
                memory_bytes: 1 << 30,
                gpus: 0,
                max_tasks: 4,
                free: None,
                gpu_devices: Vec::new(),
            }),
            running_tasks: Vec::new(),
        })),
    }
}

/// A party played by the test: its session stream and a way to answer.
struct ScriptedParty {
    name: String,
    channel: Channel,
    out: mpsc::Sender<pb::PartyMessage>,
    inbound: tonic::Streaming<pb::ServerMessage>,
}

async fn open_session(
    channel: Channel,
    register_as: &str,
) -> Result<
    (
        mpsc::Sender<pb::PartyMessage>,
        tonic::Streaming<pb::ServerMessage>,
    ),
    tonic::Status,
> {
    let (out, rx) = mpsc::channel(16);
    out.send(digits_register(register_as))
        .await
        .expect("test step");
    let mut inbound = pb::party_session_client::PartySessionClient::new(channel)
        .open(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The first answer is Registered, or the refusal.
    match tokio::time::timeout(WAIT, inbound.next()).await {
        Ok(Some(Ok(pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Registered(_)),
        }))) => Ok((out, inbound)),
        Ok(Some(Err(s))) => Err(s),
        other => panic!("unexpected first session message: {other:?}"),
    }
}

impl ScriptedParty {
    async fn connect(fed: &Federation, files: &TlsFiles, name: &str) -> ScriptedParty {
        let channel = party_channel(fed, files);
        let (out, inbound) = open_session(channel.clone(), name).await.expect("session");
        ScriptedParty {
            name: name.to_string(),
            channel,
            out,
            inbound,
        }
    }

    /// The next offer of `kind`, accepted. Other offers are refused.
    async fn accept_next(&mut self, kind: pb::TaskKind) -> pb::Task {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.inbound.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no {kind:?} offer in time", self.name))
                .expect("session open")
                .expect("session message");
            let Some(pb::server_message::Kind::Offer(offer)) = msg.kind else {
                continue;
            };
            let task = offer.task.clone().expect("task");
            let take = task.kind == kind as i32;
            self.out
                .send(pb::PartyMessage {
                    kind: Some(pb::party_message::Kind::OfferReply(pb::OfferReply {
                        offer_id: offer.offer_id,
                        accepted: take,
                        reason: if take {
                            String::new()
                        } else {
                            "scripted".into()
                        },
                    })),
                })
                .await
                .expect("test step");
            if take {
                return task;
            }
        }
    }

    fn round(&self) -> pb::round_client::RoundClient<Channel> {
        pb::round_client::RoundClient::new(self.channel.clone())
    }
}

fn for_job<T>(job: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        cohort_proto::JOB_METADATA_KEY,
        job.parse().expect("job id as metadata"),
    );
    req.set_timeout(Duration::from_secs(30));
    req
}

async fn fetch(
    party: &ScriptedParty,
    task: &pb::Task,
) -> Result<Vec<cohort_core::NamedTensor>, tonic::Status> {
    let mut stream = party
        .round()
        .fetch_model(for_job(
            &task.job_id,
            pb::FetchModelRequest {
                task_token: task.task_token.clone(),
            },
        ))
        .await?
        .into_inner();
    let mut asm = cohort_fl::TensorAssembler::new(None, 1 << 24);
    while let Some(chunk) = stream.next().await {
        asm.push(chunk?).expect("chunk");
    }
    Ok(asm.finish().expect("model"))
}

async fn submit(
    party: &ScriptedParty,
    job: &str,
    token: &str,
    delta: &[cohort_core::NamedTensor],
) -> Result<(), tonic::Status> {
    let header = pb::SubmitUpdateRequest {
        part: Some(pb::submit_update_request::Part::Header(pb::UpdateHeader {
            task_token: token.to_string(),
            samples: 100,
            train: Some(pb::Metrics {
                loss: 1.0,
                accuracy: 0.5,
                samples: 100,
            }),
        })),
    };
    let chunks =
        cohort_fl::chunk_tensors(delta, cohort_fl::CHUNK_BYTES).map(|c| pb::SubmitUpdateRequest {
            part: Some(pb::submit_update_request::Part::Chunk(c)),
        });
    let messages: Vec<_> = std::iter::once(header).chain(chunks).collect();
    party
        .round()
        .submit_update(for_job(job, futures::stream::iter(messages)))
        .await
        .map(|_| ())
}

fn code_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("the call must be refused");
    (s.code(), s.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn party_certificates_are_checked_at_the_door() {
    let fed = Federation::start(0).await.expect("federation");
    let dir = tempfile::tempdir().expect("test step");
    let ca_cert = fed.stack.pki.join("ca.crt");
    let real_ca = ca(&fed);

    // No client certificate at all: TLS works (users connect like this), the party API refuses.
    let pem = std::fs::read(&ca_cert).expect("test step");
    let anonymous =
        cohort_runtime::server_authenticated_channel(&fed.stack.proxy, &pem).expect("test step");
    let (code, msg) = code_of(open_session(anonymous.clone(), "alice").await);
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    assert!(msg.contains("client certificate"), "{msg}");
    let (code, msg) = code_of(
        pb::round_client::RoundClient::new(anonymous)
            .fetch_model(for_job("some-job", pb::FetchModelRequest::default()))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{msg}");

    // A certificate from another CA: the handshake itself fails.
    let other_ca = CertAuthority::generate("not the federation", fresh()).expect("test step");
    let other_dir = dir.path().join("other");
    let foreign = party_files(&other_dir, &other_ca, &ca_cert, "alice", fresh());
    let (code, msg) = code_of(open_session(party_channel(&fed, &foreign), "alice").await);
    assert_handshake_refused(&fed, code, &msg, 1).await;

    // An expired certificate of the right CA: refused as well.
    let day = Duration::from_secs(24 * 3600);
    let expired = Validity {
        not_before: SystemTime::now() - 2 * day,
        not_after: SystemTime::now() - day,
    };
    let stale = party_files(dir.path(), &real_ca, &ca_cert, "carol", expired);
    let (code, msg) = code_of(open_session(party_channel(&fed, &stale), "carol").await);
    // Refused; the proxy logs refused handshakes at most once per 10 s (a hostile client must
    // not flood its log), so this one is counted in the next line rather than logged now.
    assert_handshake_refused(&fed, code, &msg, 1).await;

    // A valid certificate registering under another party's name.
    let alice = party_files(dir.path(), &real_ca, &ca_cert, "alice", fresh());
    let (code, msg) = code_of(open_session(party_channel(&fed, &alice), "bob").await);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("alice"), "{msg}");

    // A party certificate is no API token.
    let (code, msg) = code_of(
        pb::jobs_client::JobsClient::new(party_channel(&fed, &alice))
            .list_jobs(pb::ListJobsRequest::default())
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{msg}");

    // Nothing of the refused ones was registered; alice under her own name is fine.
    let _alice = ScriptedParty::connect(&fed, &alice, "alice").await;
    let clients = fed
        .api()
        .selector()
        .list_clients(pb::ListClientsRequest {})
        .await
        .expect("test step")
        .into_inner()
        .clients;
    let names: Vec<&str> = clients.iter().map(|c| c.party.as_str()).collect();
    assert_eq!(names, vec!["alice"], "{names:?}");

    // Server-internal ports serve mutual TLS for service certificates only:
    // a party that reaches one directly gets nothing, with or without its certificate.
    let internal = std::fs::read_to_string(fed.dir.path().join("run/client-selector.addr"))
        .expect("client-selector address");
    let alice_tls = cohort_runtime::Tls::load(&alice).expect("alice's files");
    let direct = cohort_runtime::channel(internal.trim(), Some(&alice_tls)).expect("channel");
    let (code, msg) = code_of(
        pb::client_selector_client::ClientSelectorClient::new(direct)
            .list_revoked(pb::ListRevokedRequest {})
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("party alice"), "{msg}");
    let plain = cohort_runtime::lazy_channel(internal.trim()).expect("channel");
    let refused = pb::client_selector_client::ClientSelectorClient::new(plain)
        .list_revoked(pb::ListRevokedRequest {})
        .await;
    assert!(refused.is_err(), "plaintext reached an internal port");
}

/// The call died in the TLS handshake (the client sees a broken or cancelled
/// connection) and the proxy logged a refused handshake, `count` so far.
async fn assert_handshake_refused(fed: &Federation, code: Code, msg: &str, count: usize) {
    assert!(
        matches!(code, Code::Unavailable | Code::Cancelled | Code::Unknown),
        "{code:?}: {msg}"
    );
    let log = fed.dir.path().join("logs/proxy.log");
    wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("TLS handshake refused")
            .count()
            >= count
    })
    .await;
}

fn api_with_token(fed: &Federation, token: Option<String>) -> Api {
    Api::from_profile(&Profile {
        token,
        ..fed.stack.profile()
    })
    .expect("test step")
}

/// A new token of `role` in `namespace`: an API acting with it, and the secret itself.
async fn create_token(fed: &Federation, namespace: &str, role: pb::Role) -> (Api, String) {
    let created = fed
        .api()
        .tokens()
        .create_token(pb::CreateTokenRequest {
            name: format!("{namespace}-{role:?}"),
            namespace: namespace.into(),
            role: role as i32,
        })
        .await
        .expect("admin creates a token")
        .into_inner();
    (
        api_with_token(fed, Some(created.token.clone())),
        created.token,
    )
}

fn spec_in(namespace: &str, name: &str) -> String {
    format!(
        "namespace: {namespace}\n{}",
        digits_job(name, 1, 1, 1, "5s")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_tokens_are_scoped_by_namespace_and_role() {
    let fed = Federation::start_with(
        0,
        Storage {
            env: vec![("COHORT_TOKEN_CACHE_TTL".into(), "1s".into())],
            ..Storage::default()
        },
    )
    .await
    .expect("federation");

    // Missing and unknown tokens.
    let (code, msg) = code_of(
        api_with_token(&fed, None)
            .jobs()
            .list_jobs(pb::ListJobsRequest::default())
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    let forged = cohort_security::ApiToken::generate().expose().to_string();
    let (code, msg) = code_of(
        api_with_token(&fed, Some(forged.clone()))
            .jobs()
            .list_jobs(pb::ListJobsRequest::default())
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    assert!(!msg.contains(&forged), "a token must not be echoed: {msg}");

    let (member_a, member_a_secret) = create_token(&fed, "team-a", pb::Role::Member).await;
    let (viewer_a, viewer_a_secret) = create_token(&fed, "team-a", pb::Role::Viewer).await;
    let (member_b, member_b_secret) = create_token(&fed, "team-b", pb::Role::Member).await;

    let job = member_a
        .jobs()
        .create_job(pb::CreateJobRequest {
            spec: spec_in("team-a", "secret-a"),
        })
        .await
        .expect("a member creates a job in its namespace")
        .into_inner();
    let get = |id: &str| pb::GetJobRequest { id: id.to_string() };

    // Another namespace's token: the job does not exist for it.
    for result in [
        member_b.jobs().get_job(get(&job.id)).await.map(|_| ()),
        member_b
            .jobs()
            .stop_job(pb::StopJobRequest {
                id: job.id.clone(),
                reason: "nope".into(),
            })
            .await
            .map(|_| ()),
        member_b.jobs().delete_job(get(&job.id)).await.map(|_| ()),
        member_b
            .jobs()
            .list_job_events(pb::ListJobEventsRequest {
                id: job.id.clone(),
                after_seq: 0,
            })
            .await
            .map(|_| ()),
    ] {
        let (code, msg) = code_of(result);
        assert_eq!(code, Code::NotFound, "{msg}");
    }
    let listed = member_b
        .jobs()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("test step")
        .into_inner()
        .jobs;
    assert!(listed.is_empty(), "team-b sees {listed:?}");
    let listed = member_b
        .jobs()
        .list_jobs(pb::ListJobsRequest {
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("test step")
        .into_inner()
        .jobs;
    assert!(listed.is_empty(), "team-b sees {listed:?}");
    let (code, msg) = code_of(
        member_a
            .jobs()
            .create_job(pb::CreateJobRequest {
                spec: spec_in("team-b", "sneaky"),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");

    // Identity metadata sent by a caller is thrown away at the door.
    let mut spoofed = tonic::Request::new(get(&job.id));
    for (key, value) in [
        (cohort_proto::NAMESPACE_METADATA_KEY, "*"),
        (cohort_proto::ROLE_METADATA_KEY, "admin"),
        (cohort_proto::PARTY_METADATA_KEY, "alice"),
    ] {
        spoofed
            .metadata_mut()
            .insert(key, value.parse().expect("metadata"));
    }
    let (code, msg) = code_of(member_b.jobs().get_job(spoofed).await);
    assert_eq!(code, Code::NotFound, "{msg}");

    // A viewer reads but cannot create or stop.
    let seen = viewer_a
        .jobs()
        .get_job(get(&job.id))
        .await
        .expect("test step")
        .into_inner();
    assert_eq!(seen.id, job.id);
    let (code, msg) = code_of(
        viewer_a
            .jobs()
            .stop_job(pb::StopJobRequest {
                id: job.id.clone(),
                reason: "viewer".into(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    let (code, msg) = code_of(
        viewer_a
            .jobs()
            .create_job(pb::CreateJobRequest {
                spec: spec_in("team-a", "viewer-job"),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    let state = state_of(
        &viewer_a
            .jobs()
            .get_job(get(&job.id))
            .await
            .expect("test step")
            .into_inner(),
    );
    assert!(
        !state.is_terminal(),
        "the viewer's stop must not have stopped it: {state}"
    );

    // Only admins handle tokens and parties.
    let (code, msg) = code_of(
        member_a
            .tokens()
            .create_token(pb::CreateTokenRequest {
                name: "x".into(),
                namespace: "team-a".into(),
                role: pb::Role::Admin as i32,
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    let (admin_a, admin_a_secret) = create_token(&fed, "team-a", pb::Role::Admin).await;
    let (code, msg) = code_of(
        admin_a
            .tokens()
            .create_token(pb::CreateTokenRequest {
                name: "x".into(),
                namespace: "team-b".into(),
                role: pb::Role::Viewer as i32,
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    let (code, msg) = code_of(
        admin_a
            .selector()
            .revoke_client(pb::RevokeClientRequest {
                party: "anyone".into(),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");

    // The member of team-a stops its own job.
    member_a
        .jobs()
        .stop_job(pb::StopJobRequest {
            id: job.id.clone(),
            reason: "done".into(),
        })
        .await
        .expect("a member stops its job");

    // A deleted token stops working (after the proxy's cache, 1 s here).
    let tokens = fed
        .api()
        .tokens()
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .expect("admin lists tokens")
        .into_inner()
        .tokens;
    let viewer_id = tokens
        .iter()
        .find(|t| t.namespace == "team-a" && t.role == pb::Role::Viewer as i32)
        .map(|t| t.id.clone())
        .expect("the viewer's token is listed");
    fed.api()
        .tokens()
        .delete_token(pb::DeleteTokenRequest { id: viewer_id })
        .await
        .expect("admin deletes a token");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match viewer_a.jobs().get_job(get(&job.id)).await {
            Err(s) if s.code() == Code::Unauthenticated => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a deleted token still works: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    // Tokens are stored as hashes only: none of the secrets CreateToken returned is in the
    // jobs database (its hash is: the right file was read) or in any log.
    let server = fed.dir.path().join("server");
    let mut db = std::fs::read(server.join("jobs.db")).expect("jobs.db");
    db.extend(std::fs::read(server.join("jobs.db-wal")).unwrap_or_default());
    let db = String::from_utf8_lossy(&db);
    let logs = log_files_under(fed.dir.path());
    assert!(
        logs.iter().any(|l| l.ends_with("logs/job-scheduler.log"))
            && logs.iter().any(|l| l.ends_with("logs/proxy.log")),
        "{logs:?}"
    );
    let secrets = [
        ("team-a member", &member_a_secret),
        ("team-a viewer", &viewer_a_secret),
        ("team-b member", &member_b_secret),
        ("team-a admin", &admin_a_secret),
    ];
    for (which, secret) in secrets {
        assert!(
            db.contains(&cohort_security::token_sha256(secret)),
            "{which}"
        );
        assert!(
            !db.contains(secret.as_str()),
            "the {which} token is in jobs.db"
        );
        for log in &logs {
            let text = std::fs::read_to_string(log).expect("log");
            assert!(
                !text.contains(secret.as_str()),
                "the {which} token is in {log}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_token_stops_working_within_the_default_cache_time() {
    // The proxy's default token cache time: 10 s (no COHORT_TOKEN_CACHE_TTL here).
    let fed = Federation::start(0).await.expect("federation");
    let (member, _) = create_token(&fed, "team-a", pb::Role::Member).await;
    let list = || async {
        member
            .jobs()
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .map(|_| ())
    };
    list().await.expect("a new token works");
    let tokens = fed
        .api()
        .tokens()
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .expect("admin lists tokens")
        .into_inner()
        .tokens;
    let id = tokens
        .iter()
        .find(|t| t.namespace == "team-a")
        .map(|t| t.id.clone())
        .expect("the token is listed");
    fed.api()
        .tokens()
        .delete_token(pb::DeleteTokenRequest { id })
        .await
        .expect("admin deletes the token");
    let deleted = tokio::time::Instant::now();
    // The proxy trusts what it checked (before the delete) for the cache time, then asks
    // again. 3 s of slack: each try is a round trip through the proxy and job-scheduler, on
    // a loaded two-core machine.
    let bound = Duration::from_secs(10 + 3);
    loop {
        match list().await {
            Ok(()) => assert!(
                deleted.elapsed() < bound,
                "a deleted token still works {:?} after its deletion",
                deleted.elapsed()
            ),
            Err(s) if s.code() == Code::Unauthenticated => break,
            Err(s) => panic!("neither accepted nor refused as unauthenticated: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Refused for good, not only once.
    for _ in 0..3 {
        let (code, msg) = code_of(list().await);
        assert_eq!(code, Code::Unauthenticated, "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_calls_are_bound_to_the_selected_party() {
    let fed = Federation::start(0).await.expect("federation");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_cert = fed.stack.pki.join("ca.crt");
    let real_ca = ca(&fed);
    let mut parties = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let files = party_files(dir.path(), &real_ca, &ca_cert, name, fresh());
        parties.push(ScriptedParty::connect(&fed, &files, name).await);
    }

    // Two of the three are selected; the third plays the intruder.
    let job = fed
        .create_job(&digits_job("bound", 1, 2, 2, "60s"))
        .await
        .expect("job");
    let offers: Vec<(usize, pb::Task)> = {
        let mut pending: futures::stream::FuturesUnordered<_> = parties
            .iter_mut()
            .enumerate()
            .map(|(i, p)| async move { (i, p.accept_next(pb::TaskKind::Train).await) })
            .collect();
        let mut offers = Vec::new();
        while offers.len() < 2 {
            offers.push(pending.next().await.expect("two offers"));
        }
        offers
    };
    let (first, task) = offers[0].clone();
    let (second, second_task) = offers[1].clone();
    let intruder = (0..3)
        .find(|i| *i != first && *i != second)
        .expect("one left out");
    let model = fetch(&parties[first], &task)
        .await
        .expect("a selected party fetches");
    let zero: Vec<cohort_core::NamedTensor> = model
        .iter()
        .map(|t| cohort_core::NamedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: vec![0.0; t.data.len()],
        })
        .collect();

    // The intruder holds a valid certificate but was not selected.
    let (code, msg) = code_of(fetch(&parties[intruder], &task).await);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    let (code, msg) =
        code_of(submit(&parties[intruder], &task.job_id, &task.task_token, &zero).await);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains(&parties[intruder].name), "{msg}");
    let invented = "x".repeat(43);
    let (code, msg) = code_of(submit(&parties[intruder], &task.job_id, &invented, &zero).await);
    assert_eq!(code, Code::PermissionDenied, "{msg}");

    // A selected party's update counts once (the round still waits for the other).
    submit(&parties[first], &task.job_id, &task.task_token, &zero)
        .await
        .expect("the selected party's update");
    let (code, msg) = code_of(submit(&parties[first], &task.job_id, &task.task_token, &zero).await);
    assert_eq!(code, Code::AlreadyExists, "{msg}");
    fetch(&parties[second], &second_task)
        .await
        .expect("the other selected party fetches");
    submit(
        &parties[second],
        &second_task.job_id,
        &second_task.task_token,
        &zero,
    )
    .await
    .expect("the other selected party's update");

    // Everyone evaluates; then the round is recorded with the refusals counted.
    futures::future::join_all(parties.iter_mut().map(|p| async move {
        let eval = p.accept_next(pb::TaskKind::Evaluate).await;
        p.round()
            .submit_evaluation(for_job(
                &eval.job_id,
                pb::SubmitEvaluationRequest {
                    task_token: eval.task_token.clone(),
                    metrics: Some(pb::Metrics {
                        loss: 1.0,
                        accuracy: 0.5,
                        samples: 50,
                    }),
                },
            ))
            .await
            .expect("evaluation");
    }))
    .await;
    let done = fed
        .wait_end(&job.id, Duration::from_secs(60))
        .await
        .expect("job end");
    assert_eq!(state_of(&done).to_string(), "SUCCEEDED", "{}", done.reason);
    let round = done.rounds.first().expect("round 1");
    assert_eq!(round.updates, 2);
    // Exactly the refusals provoked above: the intruder's fetch, its two submits, and the
    // selected party's second submit.
    assert_eq!(round.refused_updates, 4, "refusals counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_party_is_disconnected_and_refused() {
    // Three parties: after one is revoked, a round still has the two parties take the
    // smallest cohort parties accept by default.
    let fed = Federation::start(3).await.expect("federation");
    let api = fed.api();
    let connected = |clients: &[pb::ClientInfo], name: &str| {
        clients.iter().any(|c| c.party == name && c.connected)
    };
    let clients = wait_clients(&api, WAIT, |c| {
        connected(c, "party-1") && connected(c, "party-2")
    })
    .await;
    assert!(clients.iter().all(|c| !c.revoked));

    // A second connection of party-1 (as an executor of it would hold), watched in /proc:
    // after one refused round call it stays open.
    let party_cert = TlsFiles {
        cert: fed.stack.pki.join("party-party-1.crt"),
        key: fed.stack.pki.join("party-party-1.key"),
        ca: fed.stack.pki.join("ca.crt"),
    };
    let (watched, local_port) = watched_party_channel(&fed, &party_cert).await;
    let proxy_port: u16 = fed
        .stack
        .proxy
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("proxy port");
    let established = || {
        tcp_sockets(std::process::id()).iter().any(|s| {
            s.local.port() == local_port
                && s.remote.port() == proxy_port
                && s.state == TCP_ESTABLISHED
        })
    };
    assert!(established(), "the watched connection is open");

    let revoking = tokio::time::Instant::now();
    let revoked = api
        .selector()
        .revoke_client(pb::RevokeClientRequest {
            party: "party-1".into(),
        })
        .await
        .expect("admin revokes")
        .into_inner();
    assert!(revoked.revoked);
    // The proxy reloads the revoked parties every 2 s and then closes their connections at
    // once. 3 s of slack on top: the reload's round trip, waking the connection's watcher
    // and this poll, all on a loaded two-core machine. A proxy that leaves the connection
    // to its keep-alive (20 s) or to the party is far beyond it.
    let bound = Duration::from_secs(2 + 3);
    while established() {
        assert!(
            revoking.elapsed() < bound,
            "party-1's connection is still open {:?} after its revocation",
            revoking.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(watched);

    // Its session ends, and its task-manager keeps being refused when it redials.
    let clients = wait_clients(&api, WAIT, |c| !connected(c, "party-1")).await;
    assert!(clients.iter().any(|c| c.party == "party-1" && c.revoked));
    assert!(connected(&clients, "party-2"), "{clients:?}");
    let log = fed.dir.path().join("logs/task-manager-party-1.log");
    wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("revoked")
    })
    .await;

    // Its certificate is still valid, but it does not get in.
    let (code, msg) = code_of(open_session(party_channel(&fed, &party_cert), "party-1").await);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("revoked"), "{msg}");

    // The federation goes on with the others.
    let job = fed
        .create_job(&digits_job("after-revoke", 2, 2, 2, "20s"))
        .await
        .expect("test step");
    let done = fed
        .wait_end(&job.id, Duration::from_secs(90))
        .await
        .expect("test step");
    assert_eq!(state_of(&done).to_string(), "SUCCEEDED", "{}", done.reason);
}

/// Dials the proxy over one TCP connection whose local port it records.
#[derive(Clone)]
struct RecordingConnector {
    proxy: String,
    ports: Arc<Mutex<Vec<u16>>>,
}

impl Service<Uri> for RecordingConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (proxy, ports) = (self.proxy.clone(), self.ports.clone());
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(&proxy).await?;
            ports
                .lock()
                .expect("ports")
                .push(stream.local_addr()?.port());
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A channel to the proxy as the party of `files`, connected (one refused round call went
/// through it), and the local port of its one TCP connection.
async fn watched_party_channel(fed: &Federation, files: &TlsFiles) -> (Channel, u16) {
    let tls = cohort_runtime::Tls::load(files).expect("party TLS files");
    let ports = Arc::new(Mutex::new(Vec::new()));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", fed.stack.proxy))
        .expect("endpoint")
        .tls_config(tls.client_config())
        .expect("TLS")
        .connect_with_connector_lazy(RecordingConnector {
            proxy: fed.stack.proxy.clone(),
            ports: ports.clone(),
        });
    let refused = pb::round_client::RoundClient::new(channel.clone())
        .fetch_model(for_job("no-such-job", pb::FetchModelRequest::default()))
        .await;
    assert!(refused.is_err(), "a round call for no job: {refused:?}");
    let ports = ports.lock().expect("ports").clone();
    let [port] = ports[..] else {
        panic!("one connection: {ports:?}");
    };
    (Channel::new(channel), port)
}

async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
