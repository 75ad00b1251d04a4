//! Connection limits at the door, against the real proxy over loopback:
//! silent clients are dropped after the handshake deadline, connections over
//! the limit are closed while the open ones keep working, and streams,
//! headers and unanswered keepalives are bounded per connection.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_proto::v1::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits for the proxy to close `stream`: EOF or a reset, never data (a
/// served connection would get the server's HTTP/2 SETTINGS first).
async fn closed_by_proxy(mut stream: TcpStream) {
    let mut buf = [0u8; 64];
    let read = within("the proxy closing the connection", stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection was served, not closed: {read:?}"
    );
}

async fn get_job(channel: cohort_runtime::Channel, id: &str) -> Result<Job, tonic::Status> {
    let mut jobs = jobs_client::JobsClient::new(channel);
    within("GetJob", jobs.get_job(GetJobRequest { id: id.into() }))
        .await
        .map(|r| r.into_inner())
}

/// Polls `attempt` until it succeeds (the proxy frees a slot when the
/// connection task ends, a moment after the peer sees the close).
async fn eventually<F, Fut>(what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !attempt().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn health_serving(channel: cohort_runtime::Channel) -> bool {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = health.check(tonic_health::pb::HealthCheckRequest::default());
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Ok(_))
    )
}

#[tokio::test]
async fn a_client_that_never_starts_tls_is_dropped_after_the_handshake_timeout() {
    let tls = TlsFixture::new();
    let dead = closed_endpoint().await;
    let mut config = cohort_proxy::Config::new(dead.clone(), dead.clone(), dead);
    config.security = tls.security();
    let timeout = Duration::from_millis(500);
    config.limits.handshake_timeout = timeout;
    let proxy = TestProxy::start(config).await;

    let started = Instant::now();
    let silent = TcpStream::connect(proxy.addr).await.unwrap();
    closed_by_proxy(silent).await;
    assert!(
        started.elapsed() >= timeout,
        "closed after {:?}, before the handshake timeout",
        started.elapsed()
    );

    // TLS done, but no HTTP/2 preface: dropped the same way.
    let started = Instant::now();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        cohort_security::client_config(&tls.files.ca, None).unwrap(),
    ));
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls_only = within("TLS handshake", connector.connect(name, tcp))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let end = within(
        "the proxy closing the TLS connection",
        tls_only.read(&mut buf),
    )
    .await;
    assert!(matches!(end, Ok(0) | Err(_)), "served: {end:?}");
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());

    // A real client is served meanwhile.
    eventually("a TLS client served", || {
        health_serving(tls.channel(proxy.addr))
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_silent_plaintext_client_is_dropped_too() {
    let dead = closed_endpoint().await;
    let mut config = cohort_proxy::Config::new(dead.clone(), dead.clone(), dead);
    let timeout = Duration::from_millis(300);
    config.limits.handshake_timeout = timeout;
    let proxy = TestProxy::start(config).await;
    let started = Instant::now();
    closed_by_proxy(TcpStream::connect(proxy.addr).await.unwrap()).await;
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    proxy.stop().await;
}

/// A proxy in front of the fake upstreams, with `limits` changed by `tune`.
async fn stack_with(tune: impl FnOnce(&mut cohort_proxy::ConnectionLimits)) -> Stack {
    let mut stack = Stack::start().await;
    let mut config = cohort_proxy::Config::new(
        stack.job_scheduler.endpoint(),
        stack.model_manager.endpoint(),
        stack.client_selector.endpoint(),
    );
    tune(&mut config.limits);
    let default_proxy = std::mem::replace(&mut stack.proxy, TestProxy::start(config).await);
    default_proxy.stop().await;
    stack
}

async fn connect(addr: SocketAddr) -> cohort_runtime::Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    cohort_runtime::Channel::new(within("connect", endpoint.connect()).await.unwrap())
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_while_open_ones_keep_working() {
    let stack = stack_with(|l| l.max_connections = 2).await;
    let addr = stack.proxy.addr;
    let first = connect(addr).await;
    let second = connect(addr).await;
    assert_eq!(get_job(first.clone(), "a").await.unwrap().id, "a");
    assert_eq!(get_job(second.clone(), "b").await.unwrap().id, "b");

    // Over the limit: closed at once, again and again.
    for _ in 0..3 {
        closed_by_proxy(TcpStream::connect(addr).await.unwrap()).await;
    }
    assert_eq!(get_job(first.clone(), "c").await.unwrap().id, "c");
    assert_eq!(get_job(second.clone(), "d").await.unwrap().id, "d");

    // One leaves: its slot goes to the next client.
    drop(first);
    eventually("a new client served once a slot is free", || async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2));
        let Ok(Ok(channel)) =
            tokio::time::timeout(Duration::from_secs(2), endpoint.connect()).await
        else {
            return false;
        };
        let mut jobs = jobs_client::JobsClient::new(channel);
        let call = jobs.get_job(GetJobRequest { id: "e".into() });
        matches!(
            tokio::time::timeout(Duration::from_secs(2), call).await,
            Ok(Ok(_))
        )
    })
    .await;
    assert_eq!(get_job(second, "f").await.unwrap().id, "f");
    stack.stop().await;
}

#[tokio::test]
async fn streams_per_connection_are_bounded() {
    let stack = stack_with(|l| l.max_concurrent_streams = 2).await;
    let channel = connect(stack.proxy.addr).await;

    // Two long-lived party sessions take both streams of the connection.
    let open_session = || {
        let channel = channel.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<PartyMessage>(1);
            let mut session = party_session_client::PartySessionClient::new(channel);
            let responses = within(
                "Open",
                session.open(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await
            .unwrap()
            .into_inner();
            (tx, responses)
        }
    };
    let held = [open_session().await, open_session().await];

    // A third call on the same connection waits for a free stream ...
    let mut waiting = tokio::spawn(get_job(channel.clone(), "third"));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "a third stream ran beside two open ones"
    );
    // ... and runs once one session ends.
    let [first, second] = held;
    drop(first);
    let job = within("the third call", waiting).await.unwrap().unwrap();
    assert_eq!(job.id, "third");
    drop(second);
    stack.stop().await;
}

#[tokio::test]
async fn oversized_metadata_is_refused_and_the_connection_goes_on() {
    let stack = stack_with(|l| l.max_header_list_size = 4096).await;
    let channel = connect(stack.proxy.addr).await;
    let call = |bytes: usize| {
        let channel = channel.clone();
        async move {
            let mut request = tonic::Request::new(GetJobRequest { id: "h".into() });
            request
                .metadata_mut()
                .insert("x-padding", "p".repeat(bytes).parse().unwrap());
            let mut jobs = jobs_client::JobsClient::new(channel);
            within("GetJob", jobs.get_job(request)).await
        }
    };
    assert!(call(1024).await.is_ok());
    let refused = call(8 * 1024).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(call(1024).await.is_ok());
    stack.stop().await;
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_disconnected() {
    let dead = closed_endpoint().await;
    let mut config = cohort_proxy::Config::new(dead.clone(), dead.clone(), dead);
    config.limits.keepalive_interval = Duration::from_secs(1);
    config.limits.keepalive_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start(config).await;

    // An HTTP/2 client that says hello, then never answers anything.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    stream
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let started = Instant::now();
    let mut received = 0usize;
    let mut buf = [0u8; 1024];
    within("the proxy dropping a peer that ignores PINGs", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(received > 0, "the connection was never served");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "dropped after {:?}, before a PING could go unanswered",
        started.elapsed()
    );
    proxy.stop().await;
}
