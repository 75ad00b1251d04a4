//! `cohort check`: can this party join the federation, and (`--federation`) do the connected
//! parties answer?
//!
//! A party's check runs on the party's machine with task-manager's own flags (`--proxy`,
//! `--tls-cert`, `--tls-key`, `--tls-ca`, `--party`, `--datasets`, and their `COHORT_*`
//! variables) and goes step by step: the certificate (a party's, naming `--party`, valid
//! now), DNS, TCP, the TLS handshake (the proxy's certificate chains to `--tls-ca`), whether
//! that certificate names the host dialled (told apart from a wrong CA: the name is checked
//! after the chain, and the check goes on without it), `PartySession.Check` through the
//! proxy's gate (this certificate accepted, the party not revoked, the name the server takes
//! it for, the server's clock), then each dataset of `datasets.json` read with the shape it
//! claims. A step that needs one that failed is skipped. Nothing is registered.
//!
//! `--federation` asks client-selector, with the profile's admin token, to probe every
//! connected party over its session (`ClientSelector.ProbeParties`): each task-manager starts
//! its executor on a toy EVALUATE task, which dials the proxy as a task does, calls
//! `PartySession.Check` and reads the party's datasets; the report says, per party, whether
//! it answered and how fast, whether its executor started, the party the server took the
//! executor for and that call's round trip, and how many datasets it read (executor Pods are
//! not probed). Each party's step carries these fields in `--json` as `probe`.
//!
//! Every step passes or fails with a hint; `--json` prints one object
//! `{"ok", "steps": [{"name", "ok", "detail", "hint"}]}` (`ok` null: skipped); the exit code
//! is 1 when any step did not pass.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cohort_proto::v1 as pb;
use cohort_security::{Identity, TlsFiles};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpStream;
use tonic::Code;

use crate::Api;
use crate::error::usage;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The federation's proxy, host:port (task-manager's --proxy).
    #[arg(long, env = "COHORT_PROXY")]
    pub proxy: Option<String>,
    /// The party's certificate (task-manager's --tls-cert).
    #[arg(long, env = "COHORT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (task-manager's --tls-key).
    #[arg(long, env = "COHORT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The federation CA certificate (task-manager's --tls-ca).
    #[arg(long, env = "COHORT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This party's name (task-manager's --party): the certificate must name it.
    #[arg(long, env = "COHORT_PARTY")]
    pub party: Option<String>,
    /// The party's datasets.json (task-manager's --datasets): every dataset is read.
    #[arg(long, env = "COHORT_DATASETS")]
    pub datasets: Option<PathBuf>,
    /// Server side, through the profile's proxy with an admin token of "*": probe every
    /// connected party (its task-manager starts its executor on a toy task that reaches the
    /// server through the proxy and reads the datasets) and report who answered, how fast,
    /// and what each executor did. The party flags are ignored.
    #[arg(long)]
    pub federation: bool,
    /// How long each network step may take; with --federation, how long parties have to answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The largest difference between this machine's clock and the server's that passes
    /// (offers carry a reply-by time: a party whose clock runs ahead refuses them as expired).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub max_skew: Duration,
}

/// One step's outcome; `ok` is None when it was skipped because a step it needs failed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    pub name: String,
    pub ok: Option<bool>,
    pub detail: String,
    pub hint: Option<String>,
    /// `--federation`: what the party answered, field by field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<serde_json::Value>,
}

#[derive(Default)]
struct Steps(Vec<Step>);

impl Steps {
    fn pass(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Some(true), detail.into(), None);
    }

    fn fail(&mut self, name: &str, detail: impl Into<String>, hint: impl Into<String>) {
        self.push(name, Some(false), detail.into(), Some(hint.into()));
    }

    fn skip(&mut self, names: &[&str], because: &str) {
        for name in names {
            let detail = format!("not checked: {because} failed");
            self.push(name, None, detail, None);
        }
    }

    fn push(&mut self, name: &str, ok: Option<bool>, detail: String, hint: Option<String>) {
        self.0.push(Step {
            name: name.to_string(),
            ok,
            detail,
            hint,
            probe: None,
        });
    }
}

/// Runs the check and prints its report; the exit code is 1 when a step did not pass.
pub async fn run(a: CheckArgs, profile: Option<&Path>, json: bool) -> anyhow::Result<i32> {
    let steps = if a.federation {
        federation(Api::connect(profile)?, a.timeout).await?
    } else {
        party(&a).await?
    };
    let ok = steps.iter().all(|s| s.ok == Some(true));
    if json {
        println!("{}", json!({"ok": ok, "steps": steps}));
    } else {
        print_human(&steps);
    }
    Ok(if ok { 0 } else { 1 })
}

fn print_human(steps: &[Step]) {
    let width = steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in steps {
        let mark = match s.ok {
            Some(true) => "✓",
            Some(false) => "✗",
            None => "-",
        };
        println!("{mark} {:width$}  {}", s.name, s.detail);
        if let Some(hint) = &s.hint {
            println!("  {:width$}  fix: {hint}", "");
        }
    }
}

// ---- a party's check ----------------------------------------------------------------

const NETWORK_STEPS: &[&str] = &["dns", "tcp", "tls", "proxy-name"];
const SERVER_STEPS: &[&str] = &["client-certificate", "not-revoked", "party", "clock"];

async fn party(a: &CheckArgs) -> anyhow::Result<Vec<Step>> {
    let required = |value: &Option<PathBuf>, flag: &str, what: &str| {
        value
            .clone()
            .ok_or_else(|| usage(flag, format!("required ({what}; task-manager's {flag})")))
    };
    let proxy = a.proxy.clone().ok_or_else(|| {
        usage(
            "--proxy",
            "required (the federation's proxy, host:port; task-manager's --proxy), or --federation",
        )
    })?;
    let files = TlsFiles {
        cert: required(&a.tls_cert, "--tls-cert", "the party's certificate")?,
        key: required(&a.tls_key, "--tls-key", "its private key")?,
        ca: required(&a.tls_ca, "--tls-ca", "the federation CA certificate")?,
    };
    let (host, port) = split_host_port(&proxy).map_err(|m| usage("--proxy", m))?;
    let mut steps = Steps::default();

    // DNS and TCP do not need the certificate: they run whatever it is.
    let client = certificate(&mut steps, &files, a.party.as_deref());
    network(&mut steps, client.as_ref(), &proxy, &host, port, a).await;
    if let Some(path) = &a.datasets {
        datasets(&mut steps, path);
    }
    Ok(steps.0)
}

/// What the certificate step hands on: the party it names and a TLS config presenting it.
struct Client {
    party: String,
    config: Arc<ClientConfig>,
    /// What the config's verifier saw of the proxy's certificate.
    seen: Arc<Mutex<Seen>>,
}

fn certificate(steps: &mut Steps, files: &TlsFiles, party: Option<&str>) -> Option<Client> {
    const STEP: &str = "certificate";
    let tls = match cohort_runtime::Tls::load(files) {
        Ok(tls) => tls,
        Err(e) => {
            steps.fail(
                STEP,
                e.to_string(),
                "--tls-cert, --tls-key and --tls-ca must be the PEM files `cohort cert issue \
                 --party NAME` wrote and the federation's ca.crt, readable by this user",
            );
            return None;
        }
    };
    let name = match tls.identity() {
        Identity::Party(name) => name.clone(),
        other => {
            steps.fail(
                STEP,
                format!("the certificate is {}, not a party's", other.uri()),
                "parties need a party certificate: `cohort cert issue --party NAME` on the CA's \
                 machine",
            );
            return None;
        }
    };
    if let Some(party) = party
        && party != name
    {
        steps.fail(
            STEP,
            format!("the certificate is for party {name}, not {party} (--party)"),
            format!(
                "use the certificate issued for {party} (`cohort cert issue --party {party}`), \
                 or --party {name}"
            ),
        );
        return None;
    }
    let validity = match validity(&files.cert) {
        Ok(v) => v,
        Err(e) => {
            steps.fail(
                STEP,
                e,
                "reissue the certificate: `cohort cert issue --party NAME`",
            );
            return None;
        }
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now < validity.not_before || now > validity.not_after {
        steps.fail(
            STEP,
            format!(
                "the certificate is valid from {} to {}; this machine's clock says it is not now",
                validity.from, validity.until
            ),
            "reissue it (`cohort cert issue --party NAME`), or set this machine's clock (NTP)",
        );
        return None;
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let config = match client_config(files, seen.clone()) {
        Ok(c) => c,
        Err(e) => {
            steps.fail(STEP, e, "--tls-cert and --tls-key must belong together");
            return None;
        }
    };
    steps.pass(
        STEP,
        format!("{}, valid until {}", tls.identity().uri(), validity.until),
    );
    Some(Client {
        party: name,
        config,
        seen,
    })
}

struct Validity {
    not_before: i64,
    not_after: i64,
    from: String,
    until: String,
}

fn validity(cert: &Path) -> Result<Validity, String> {
    let certs = cohort_security::load_certs(cert).map_err(|e| e.to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| format!("{}: no certificate", cert.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", cert.display()))?;
    let v = parsed.validity();
    Ok(Validity {
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
        from: v.not_before.to_string(),
        until: v.not_after.to_string(),
    })
}

async fn network(
    steps: &mut Steps,
    client: Option<&Client>,
    proxy: &str,
    host: &str,
    port: u16,
    a: &CheckArgs,
) {
    // dns
    let started = Instant::now();
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(a.timeout, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                steps.fail(
                    "dns",
                    format!("{host} does not resolve: {e}"),
                    "check the host name in --proxy and this machine's DNS (/etc/resolv.conf, \
                     /etc/hosts)",
                );
                steps.skip(&NETWORK_STEPS[1..], "dns");
                steps.skip(SERVER_STEPS, "dns");
                return;
            }
            Err(_) => {
                steps.fail(
                    "dns",
                    format!("resolving {host} took longer than {:?}", a.timeout),
                    "check this machine's DNS servers (/etc/resolv.conf)",
                );
                steps.skip(&NETWORK_STEPS[1..], "dns");
                steps.skip(SERVER_STEPS, "dns");
                return;
            }
        };
    let listed = addrs
        .iter()
        .map(|a| a.ip().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    steps.pass(
        "dns",
        format!("{host} is {listed} ({} ms)", started.elapsed().as_millis()),
    );

    // tcp: the first address that answers, as a channel would.
    let mut reached = None;
    let mut refusals = Vec::new();
    for addr in &addrs {
        let started = Instant::now();
        match tokio::time::timeout(a.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                reached = Some((*addr, stream, started.elapsed()));
                break;
            }
            Ok(Err(e)) => refusals.push(format!("{addr}: {e}")),
            Err(_) => refusals.push(format!("{addr}: no answer within {:?}", a.timeout)),
        }
    }
    let Some((addr, stream, took)) = reached else {
        steps.fail(
            "tcp",
            refusals.join("; "),
            "the proxy does not listen there or a firewall drops the connection: check the \
             port in --proxy, that the proxy runs, and that this machine may connect out to it",
        );
        steps.skip(&NETWORK_STEPS[2..], "tcp");
        steps.skip(SERVER_STEPS, "tcp");
        return;
    };
    steps.pass(
        "tcp",
        format!("connected to {addr} ({} ms)", took.as_millis()),
    );

    // tls, and whether the proxy's certificate names the host dialled
    let Some(client) = client else {
        steps.skip(&NETWORK_STEPS[2..], "certificate");
        steps.skip(SERVER_STEPS, "certificate");
        return;
    };
    let Ok(server_name) = ServerName::try_from(host.to_string()) else {
        steps.fail(
            "tls",
            format!("{host} is not a DNS name or an address"),
            "--proxy must be host:port",
        );
        steps.skip(&NETWORK_STEPS[3..], "tls");
        steps.skip(SERVER_STEPS, "tls");
        return;
    };
    *client.seen.lock().unwrap_or_else(|p| p.into_inner()) = Seen::default();
    let connector = tokio_rustls::TlsConnector::from(client.config.clone());
    let started = Instant::now();
    let handshake =
        tokio::time::timeout(a.timeout, connector.connect(server_name.clone(), stream)).await;
    let seen = std::mem::take(&mut *client.seen.lock().unwrap_or_else(|p| p.into_inner()));
    let mut stream = match handshake {
        Ok(Ok(tls)) => {
            let version = tls
                .get_ref()
                .1
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("TLS");
            let server = seen
                .leaf
                .as_deref()
                .and_then(|der| cohort_security::identity_of(der).ok())
                .map_or_else(|| "its certificate".to_string(), |id| id.uri());
            steps.pass(
                "tls",
                format!(
                    "{version} with {server}, which chains to --tls-ca ({} ms)",
                    started.elapsed().as_millis()
                ),
            );
            tls
        }
        Ok(Err(e)) => {
            let (detail, hint) = handshake_failure(&e);
            steps.fail("tls", detail, hint);
            steps.skip(&NETWORK_STEPS[3..], "tls");
            steps.skip(SERVER_STEPS, "tls");
            return;
        }
        Err(_) => {
            steps.fail(
                "tls",
                format!("no TLS handshake within {:?}", a.timeout),
                "is --proxy the proxy's TLS port? something there accepts connections but does \
                 not answer TLS",
            );
            steps.skip(&NETWORK_STEPS[3..], "tls");
            steps.skip(SERVER_STEPS, "tls");
            return;
        }
    };
    let names = seen
        .leaf
        .as_deref()
        .map(dns_and_ip_names)
        .unwrap_or_default();
    match seen.wrong_name {
        false => steps.pass(
            "proxy-name",
            format!("the proxy's certificate names {host}"),
        ),
        true => steps.fail(
            "proxy-name",
            format!(
                "the proxy's certificate does not name {host}; it names {}",
                if names.is_empty() {
                    "no host".to_string()
                } else {
                    names.join(", ")
                }
            ),
            format!(
                "dial the proxy by a name its certificate holds (--proxy NAME:{port}), or have \
                 the federation's operator add {host} to it (`cohort up --proxy-name {host}`, or \
                 reissue the proxy's certificate with that name)"
            ),
        ),
    }

    // Under TLS 1.3 the client's handshake ends before the server has judged the client's
    // certificate: its verdict comes with the first bytes read.
    match peer_accepts(&mut stream, a.timeout).await {
        Ok(()) => steps.pass(
            "client-certificate",
            format!(
                "the proxy accepted the certificate of party {}",
                client.party
            ),
        ),
        Err(why) => {
            steps.fail(
                "client-certificate",
                format!("the proxy refused this certificate: {why}"),
                CLIENT_CERT_HINT,
            );
            steps.skip(&SERVER_STEPS[1..], "client-certificate");
            return;
        }
    }
    drop(stream);
    server_steps(steps, client, proxy, addr, server_name, a).await;
}

/// Speaks first on an established TLS connection (the HTTP/2 preface and an empty SETTINGS
/// frame) and reads the answer: the server's SETTINGS when it took the certificate, an
/// alert or the connection's end when it did not.
async fn peer_accepts(
    stream: &mut tokio_rustls::client::TlsStream<TcpStream>,
    timeout: Duration,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    let exchange = async {
        stream.write_all(PREFACE).await?;
        stream.write_all(&EMPTY_SETTINGS).await?;
        stream.flush().await?;
        let mut first = [0u8; 9];
        stream.read(&mut first).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("it closed the connection".into()),
        Ok(Err(e)) => Err(
            match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(rustls::Error::AlertReceived(alert)) => format!("TLS alert {alert:?}"),
                _ => e.to_string(),
            },
        ),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// What a failed handshake says, and what to do about it.
fn handshake_failure(e: &std::io::Error) -> (String, String) {
    let tls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => (
            format!("the proxy's certificate is not signed by the CA in --tls-ca ({e})"),
            "--tls-ca must be the federation's CA certificate (ca.crt from the federation's \
             operator, the CA that issued the proxy's certificate)"
                .into(),
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        )) => (
            format!("the proxy's certificate is not valid now ({e})"),
            "check this machine's clock (NTP); if it is right, the proxy's certificate must be \
             reissued"
                .into(),
        ),
        Some(rustls::Error::AlertReceived(alert)) => (
            format!("the proxy ended the handshake: {alert:?} (it refused this certificate)"),
            CLIENT_CERT_HINT.into(),
        ),
        Some(other) => (
            format!("TLS handshake failed: {other}"),
            "is --proxy the proxy's TLS port?".into(),
        ),
        None => (
            format!("TLS handshake failed: {e}"),
            "is --proxy the proxy's TLS port? the proxy may also have closed the connection \
             (too many connections, or a handshake deadline)"
                .into(),
        ),
    }
}

const CLIENT_CERT_HINT: &str = "the proxy accepts certificates issued by the federation's CA \
     only: have the certificate issued with that CA (`cohort cert issue --party NAME` on the CA's \
     machine), and use the key that belongs to it";

/// `PartySession.Check` through the proxy's gate, over a connection that ignores a wrong
/// name (that is reported already): is the party not revoked, whom the server takes it for,
/// and the clock.
async fn server_steps(
    steps: &mut Steps,
    client: &Client,
    proxy: &str,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    a: &CheckArgs,
) {
    let config = client.config.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (config, name) = (config.clone(), server_name.clone());
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{proxy}")) {
        Ok(e) => e.connect_timeout(a.timeout).timeout(a.timeout),
        Err(e) => {
            steps.fail("not-revoked", e.to_string(), "--proxy must be host:port");
            steps.skip(&SERVER_STEPS[2..], "not-revoked");
            return;
        }
    };
    let sent = SystemTime::now();
    let started = Instant::now();
    let answer = match endpoint.connect_with_connector(connector).await {
        Ok(channel) => pb::party_session_client::PartySessionClient::new(channel)
            .check(pb::PartyCheckRequest {})
            .await
            .map(tonic::Response::into_inner),
        Err(e) => Err(tonic::Status::unavailable(error_chain(&e))),
    };
    let round_trip = started.elapsed();
    let status = match answer {
        Ok(answer) => {
            steps.pass(
                "not-revoked",
                format!("party {} is not revoked", client.party),
            );
            party_and_clock(steps, client, &answer, sent, round_trip, a);
            return;
        }
        Err(status) => status,
    };
    let detail = error_chain(&status);
    match status.code() {
        Code::PermissionDenied if status.message().contains("revoked") => {
            steps.fail(
                "not-revoked",
                detail,
                "an administrator revoked this party (`cohort client revoke`); a revoked name \
                 stays refused whatever its certificate: ask the federation's operator",
            );
            steps.skip(&SERVER_STEPS[2..], "not-revoked");
        }
        Code::Unimplemented => {
            steps.pass("not-revoked", "the proxy's gate let the call through");
            steps.fail(
                "party",
                format!("the server does not know PartySession.Check: {detail}"),
                "the federation runs a version older than this `cohort`: its operator can \
                 upgrade it, or run a `cohort check` of the server's version",
            );
            steps.skip(&SERVER_STEPS[3..], "party");
        }
        Code::PermissionDenied | Code::Unauthenticated => {
            steps.fail("not-revoked", detail, CLIENT_CERT_HINT);
            steps.skip(&SERVER_STEPS[2..], "not-revoked");
        }
        _ => {
            steps.fail(
                "not-revoked",
                format!("PartySession.Check through the proxy failed: {detail}"),
                "the proxy took the certificate but the call did not go through: is the \
                 federation up (the proxy reaches client-selector)? the proxy's logs say why",
            );
            steps.skip(&SERVER_STEPS[2..], "not-revoked");
        }
    }
}

fn party_and_clock(
    steps: &mut Steps,
    client: &Client,
    answer: &pb::PartyCheckResponse,
    sent: SystemTime,
    round_trip: Duration,
    a: &CheckArgs,
) {
    if answer.party == client.party {
        steps.pass(
            "party",
            format!("the server takes this machine for party {}", answer.party),
        );
    } else {
        steps.fail(
            "party",
            format!(
                "the certificate names {}, the server took the call for {:?}",
                client.party, answer.party
            ),
            "something between this machine and the proxy presents another certificate (a \
             TLS-intercepting proxy?): parties must reach the Cohort proxy directly",
        );
    }
    // The server's clock was read somewhere in the round trip: compare it with its middle.
    let middle = sent + round_trip / 2;
    let local_ms = middle
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let skew_ms = answer.server_time_ms - local_ms;
    let uncertainty_ms = (round_trip.as_millis() / 2) as i64;
    let ahead = if skew_ms >= 0 { "ahead of" } else { "behind" };
    let detail = format!(
        "the server's clock is {} ms {ahead} this machine's (±{uncertainty_ms} ms)",
        skew_ms.abs()
    );
    if skew_ms.abs() <= a.max_skew.as_millis() as i64 + uncertainty_ms {
        steps.pass("clock", detail);
    } else {
        steps.fail(
            "clock",
            format!("{detail}, more than --max-skew {:?}", a.max_skew),
            "set this machine's clock from NTP (`timedatectl set-ntp true`, chrony): offers \
             carry a reply-by time and certificates a validity, both read against this clock",
        );
    }
}

fn datasets(steps: &mut Steps, path: &Path) {
    use cohort_train::party_datasets as pd;
    let entries = match pd::entries(path) {
        Ok(e) => e,
        Err(e) => {
            steps.fail(
                "datasets",
                e.to_string(),
                "--datasets must be a readable JSON file mapping dataset names to {\"path\", \
                 \"format\", ...} (README: datasets.json)",
            );
            return;
        }
    };
    if entries.is_empty() {
        steps.fail(
            "datasets",
            format!("{} names no dataset", path.display()),
            "a party registers its datasets: name at least one",
        );
        return;
    }
    for (name, entry) in entries {
        let step = format!("dataset {name}");
        let format = entry.format.clone();
        match pd::check(path, &name, entry) {
            Ok(d) => {
                let place = d
                    .entry
                    .path
                    .as_ref()
                    .map(|p| format!(", {}", p.display()))
                    .unwrap_or_default();
                steps.pass(
                    &step,
                    format!(
                        "{} samples, {} features, {} classes ({format}{place})",
                        d.shape.samples, d.shape.features, d.shape.classes
                    ),
                );
            }
            Err(e) => steps.fail(
                &step,
                format!("{}: {e}", path.display()),
                format!(
                    "each file of {name:?} must exist, be readable by the user task-manager runs \
                     as and be {format} with the shape datasets.json claims (task-manager refuses \
                     to start otherwise)"
                ),
            ),
        }
    }
}

/// "host:port" (or "[v6]:port"), a scheme allowed in front as task-manager allows it.
fn split_host_port(proxy: &str) -> Result<(String, u16), String> {
    let rest = proxy
        .split_once("://")
        .map_or(proxy, |(_, rest)| rest)
        .trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{proxy:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{proxy:?}: the port is not a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{proxy:?} has no host"));
    }
    Ok((host.to_string(), port))
}

/// The DNS names and addresses a certificate's subjectAltName holds.
fn dns_and_ip_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

// ---- TLS: the CA decides, the name is noted ---------------------------------------------

/// What the verifier saw of the proxy's certificate in the last handshake.
#[derive(Default)]
struct Seen {
    leaf: Option<Vec<u8>>,
    /// The certificate chains to the CA but does not name the host dialled.
    wrong_name: bool,
}

/// webpki's verification with one difference: a certificate that chains to the CA but does
/// not name the host is noted, not refused, so the checks after it still run. webpki checks
/// the chain before the name, so a name error means the chain verified.
#[derive(Debug)]
struct NoteWrongName {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Seen>>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seen")
            .field("wrong_name", &self.wrong_name)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for NoteWrongName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.leaf = Some(end_entity.to_vec());
        match result {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                seen.wrong_name = true;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn client_config(files: &TlsFiles, seen: Arc<Mutex<Seen>>) -> Result<Arc<ClientConfig>, String> {
    cohort_security::install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in cohort_security::load_certs(&files.ca).map_err(|e| e.to_string())? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", files.ca.display()))?;
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("{}: {e}", files.ca.display()))?;
    let certs = cohort_security::load_certs(&files.cert).map_err(|e| e.to_string())?;
    let key = cohort_security::load_key(&files.key).map_err(|e| e.to_string())?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoteWrongName { inner, seen }))
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("{} with {}: {e}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

// ---- the federation's check ---------------------------------------------------------------

async fn federation(api: Api, timeout: Duration) -> anyhow::Result<Vec<Step>> {
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let mut selector = api.selector();
    let call = selector.probe_parties(pb::ProbePartiesRequest { timeout_ms });
    // client-selector waits at most 60 s for the parties; the call gets 10 s more for
    // itself (the proxy, a loaded machine).
    let bound = timeout.min(Duration::from_secs(60)) + Duration::from_secs(10);
    let answer = tokio::time::timeout(bound, call)
        .await
        .map_err(|_| {
            tonic::Status::deadline_exceeded(format!(
                "client-selector did not report the probes within {bound:?}"
            ))
        })??
        .into_inner();
    let mut steps = Steps::default();
    if answer.parties.is_empty() {
        steps.fail(
            "parties",
            "no party is connected",
            "start the parties' task-managers; `cohort check` on a party's machine says why it \
             cannot connect",
        );
    }
    for p in answer.parties {
        party_probe(&mut steps, p);
    }
    Ok(steps.0)
}

/// One party's probe as a step: its detail says what its task-manager and executor did, its
/// `probe` holds the same field by field.
fn party_probe(steps: &mut Steps, p: pb::PartyProbe) {
    let step = format!("party {}", p.party);
    let fields = json!({
        "answered": p.answered,
        "round_trip_ms": p.answered.then_some(p.round_trip_ms),
        "executor": p.executor.as_ref().map(|e| json!({
            "probed": !e.in_pods,
            "started": e.started,
            "reached_server": e.reached_server,
            "server_saw_party": e.server_saw_party,
            "round_trip_ms": e.round_trip_ms,
            "datasets": e.datasets,
            "datasets_readable": e.datasets_readable,
            "took_ms": e.took_ms,
            "error": (!e.error.is_empty()).then_some(&e.error),
        })),
        "message": p.message,
    });
    let answered = format!("answered in {} ms", p.round_trip_ms);
    let (detail, hint) = match (&p.executor, p.answered) {
        (_, false) => (
            p.message.clone(),
            Some(
                "run `cohort check` on that party's machine; its task-manager may be stuck, or \
                 older than the server (it ignores probes)",
            ),
        ),
        (Some(e), true) if e.in_pods => (format!("{answered}; executor pods: not probed"), None),
        (Some(e), true) => executor_outcome(&p.party, e, &answered, p.ok),
        // A task-manager older than the executor's probe: it says only whether it is ready.
        (None, true) if p.ok => (format!("{answered}: {}", p.message), None),
        (None, true) => (
            format!("{answered}, not ready: {}", p.message),
            Some(
                "the party cannot start its executor: check task-manager's --executor-bin on that machine",
            ),
        ),
    };
    match hint {
        None => steps.pass(&step, detail),
        Some(hint) => steps.fail(&step, detail, hint),
    }
    if let Some(last) = steps.0.last_mut() {
        last.probe = Some(fields);
    }
}

/// A probed executor's outcome: the detail, and the hint when it did not do what a task needs.
fn executor_outcome(
    party: &str,
    e: &pb::ExecutorProbe,
    answered: &str,
    ok: bool,
) -> (String, Option<&'static str>) {
    let datasets = format!("{}/{} datasets read", e.datasets_readable, e.datasets);
    if !e.started && e.error.contains("did not answer within") {
        return (
            format!("{answered}; executor did not answer in time: {}", e.error),
            Some(
                "task-manager stopped its executor at the probe's deadline (four fifths of \
                 --timeout): try a longer --timeout; if it still does not answer, run `cohort \
                 check` on that machine with task-manager's flags",
            ),
        );
    }
    if !e.started {
        return (
            format!("{answered}; executor did not run the probe: {}", e.error),
            Some(
                "task-manager could not run its executor on that machine: check its \
                 --executor-bin (an executor older than task-manager does not know --probe)",
            ),
        );
    }
    if !e.reached_server {
        return (
            format!(
                "{answered}; executor started, did not reach the server: {}",
                e.error
            ),
            Some(
                "the executor dials task-manager's --proxy with its --tls-cert, --tls-key and \
                 --tls-ca as they are on disk now (task-manager read them at its start): run \
                 `cohort check` on that machine with task-manager's flags",
            ),
        );
    }
    let reached = format!(
        "executor started, reached the server as {} ({} ms)",
        e.server_saw_party, e.round_trip_ms
    );
    if e.server_saw_party != party {
        return (
            format!("{answered}; {reached}, not as {party}"),
            Some(
                "something between that machine and the proxy presents another certificate (a \
                 TLS-intercepting proxy?), or the executor is given another party's files",
            ),
        );
    }
    if e.datasets_readable < e.datasets || !e.error.is_empty() || !ok {
        return (
            format!("{answered}; {reached}, {datasets}: {}", e.error),
            Some(
                "each dataset's files must stay readable by the user task-manager runs as, in \
                 the format and shape it registered: `cohort check --datasets` on that machine \
                 names the bad one",
            ),
        );
    }
    (format!("{answered}; {reached}, {datasets}"), None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn proxy_addresses_split_as_task_manager_takes_them() {
        assert_eq!(
            split_host_port("localhost:7070").unwrap(),
            ("localhost".to_string(), 7070)
        );
        assert_eq!(
            split_host_port("https://proxy.example:443/").unwrap(),
            ("proxy.example".to_string(), 443)
        );
        assert_eq!(
            split_host_port("[::1]:7070").unwrap(),
            ("::1".to_string(), 7070)
        );
        for bad in ["localhost", ":7070", "host:port"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_partys_probe_is_a_step_with_its_fields() {
        let mut steps = Steps::default();
        let answered =
            |party: &str, ok: bool, executor: Option<pb::ExecutorProbe>| pb::PartyProbe {
                party: party.into(),
                answered: true,
                ok,
                round_trip_ms: 9,
                message: "ready".into(),
                executor,
            };
        let pods = pb::ExecutorProbe {
            in_pods: true,
            ..Default::default()
        };
        party_probe(&mut steps, answered("pods", true, Some(pods)));
        // A task-manager older than the executor's probe.
        party_probe(&mut steps, answered("old", true, None));
        let reached = pb::ExecutorProbe {
            started: true,
            reached_server: true,
            server_saw_party: "other".into(),
            round_trip_ms: 4,
            datasets: 2,
            datasets_readable: 2,
            ..Default::default()
        };
        party_probe(&mut steps, answered("seen-as-other", false, Some(reached)));
        let unread = pb::ExecutorProbe {
            started: true,
            reached_server: true,
            server_saw_party: "unread".into(),
            datasets: 2,
            datasets_readable: 1,
            error: "error: dataset \"b\": b.csv: no such file".into(),
            ..Default::default()
        };
        party_probe(&mut steps, answered("unread", false, Some(unread)));
        let stopped = pb::ExecutorProbe {
            error: "executor /bin/executor did not answer within 800ms; stopped".into(),
            ..Default::default()
        };
        party_probe(&mut steps, answered("slow", false, Some(stopped)));
        party_probe(
            &mut steps,
            pb::PartyProbe {
                party: "silent".into(),
                message: "no answer within 5s".into(),
                ..Default::default()
            },
        );
        let s = &steps.0;
        assert_eq!(s[0].ok, Some(true));
        assert_eq!(s[0].detail, "answered in 9 ms; executor pods: not probed");
        assert_eq!(s[0].probe.as_ref().unwrap()["executor"]["probed"], false);
        assert_eq!(s[1].ok, Some(true));
        assert_eq!(s[1].detail, "answered in 9 ms: ready");
        assert_eq!(s[1].probe.as_ref().unwrap()["executor"], Value::Null);
        assert_eq!(s[2].ok, Some(false));
        assert!(
            s[2].detail
                .ends_with("as other (4 ms), not as seen-as-other")
        );
        assert_eq!(s[3].ok, Some(false));
        assert!(
            s[3].detail
                .contains("1/2 datasets read: error: dataset \"b\"")
        );
        assert!(s[3].hint.as_deref().unwrap().contains("--datasets"));
        assert_eq!(s[4].ok, Some(false));
        assert!(s[4].detail.contains("did not answer in time"));
        assert!(s[4].hint.as_deref().unwrap().contains("longer --timeout"));
        assert_eq!(s[5].ok, Some(false));
        assert_eq!(s[5].detail, "no answer within 5s");
        let silent = s[5].probe.as_ref().unwrap();
        assert_eq!(
            (&silent["answered"], &silent["round_trip_ms"]),
            (&Value::Bool(false), &Value::Null)
        );
    }

    #[tokio::test]
    async fn what_needs_a_failed_step_is_skipped_and_the_rest_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let missing = |name: &str| Some(dir.path().join(name));
        let args = CheckArgs {
            // RFC 6761: .invalid never resolves.
            proxy: Some("proxy.invalid:7070".into()),
            tls_cert: missing("party.crt"),
            tls_key: missing("party.key"),
            tls_ca: missing("ca.crt"),
            party: None,
            datasets: missing("datasets.json"),
            federation: false,
            timeout: Duration::from_secs(5),
            max_skew: Duration::from_secs(1),
        };
        let steps = party(&args).await.unwrap();
        let outcome: Vec<(&str, Option<bool>)> =
            steps.iter().map(|s| (s.name.as_str(), s.ok)).collect();
        assert_eq!(
            outcome,
            [
                ("certificate", Some(false)),
                ("dns", Some(false)),
                ("tcp", None),
                ("tls", None),
                ("proxy-name", None),
                ("client-certificate", None),
                ("not-revoked", None),
                ("party", None),
                ("clock", None),
                ("datasets", Some(false)),
            ]
        );
        assert!(steps[0].detail.contains("party.crt"), "{:?}", steps[0]);
        assert!(steps[1].detail.contains("proxy.invalid"), "{:?}", steps[1]);
        assert!(
            steps
                .iter()
                .all(|s| s.hint.is_some() == (s.ok == Some(false)))
        );
    }
}
