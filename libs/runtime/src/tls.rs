//! Mutual TLS between server-side services, and who is calling: the peer's
//! certificate identity and the identity metadata the proxy vouches for.

use std::path::PathBuf;
use std::sync::Arc;

use cohort_core::{PartyId, Principal, Role, Scope};
use cohort_security::{Identity, TlsFiles};
use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};

use crate::RuntimeError;

/// A process's TLS identity. Server-internal services serve mutual TLS with it
/// (peers must hold a service certificate of the federation CA) and dial their
/// peers with it; parties dial the proxy with their party certificate.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This process's certificate (PEM, from `cohort cert issue`). With
    /// --tls-key and --tls-ca, connections use mutual TLS.
    #[arg(long, env = "COHORT_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "COHORT_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The federation CA certificate peers must chain to (PEM).
    #[arg(long, env = "COHORT_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> Option<TlsFiles> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        }
    }

    /// Reads and checks the files (before any port is bound); None when TLS is off.
    pub fn load(&self) -> Result<Option<Tls>, RuntimeError> {
        self.files().map(|f| Tls::load(&f)).transpose()
    }

    /// The same options as arguments, for a child process (paths only, no secrets).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, path) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if let Some(p) = path {
                args.push(flag.to_string());
                args.push(p.display().to_string());
            }
        }
        args
    }
}

/// A loaded TLS identity and the CA it trusts.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    cert_pem: Arc<Vec<u8>>,
    key_pem: Arc<Vec<u8>>,
    ca_pem: Arc<Vec<u8>>,
    identity: Identity,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the three files and checks that they parse: the certificate
    /// carries a Cohort identity and the key is a private key.
    pub fn load(files: &TlsFiles) -> Result<Tls, RuntimeError> {
        cohort_security::install_crypto_provider();
        // Each file is read once: the bytes that were checked are the bytes used.
        let (cert_pem, certs) = cohort_security::load_certs_pem(&files.cert).map_err(tls_error)?;
        let leaf = certs.first().ok_or_else(|| {
            RuntimeError::Tls(format!("{}: no certificate", files.cert.display()))
        })?;
        let identity = cohort_security::identity_of(leaf)
            .map_err(|e| RuntimeError::Tls(format!("{}: {e}", files.cert.display())))?;
        let (key_pem, _) = cohort_security::load_key_pem(&files.key).map_err(tls_error)?;
        let (ca_pem, _) = cohort_security::load_certs_pem(&files.ca).map_err(tls_error)?;
        Ok(Tls {
            files: files.clone(),
            cert_pem: Arc::new(cert_pem),
            key_pem: Arc::new(key_pem),
            ca_pem: Arc::new(ca_pem),
            identity,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Serving: client certificates are required and must chain to the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                self.cert_pem.as_slice(),
                self.key_pem.as_slice(),
            ))
            .client_ca_root(Certificate::from_pem(self.ca_pem.as_slice()))
            .timeout(std::time::Duration::from_secs(10))
    }

    /// Dialing: the server must chain to the CA; we present our certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca_pem.as_slice()))
            .identity(tonic::transport::Identity::from_pem(
                self.cert_pem.as_slice(),
                self.key_pem.as_slice(),
            ))
    }
}

fn tls_error(e: cohort_security::SecurityError) -> RuntimeError {
    RuntimeError::Tls(e.to_string())
}

/// The identity in the peer's client certificate, when the call came over mutual TLS.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<Identity> {
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    cohort_security::identity_of(leaf).ok()
}

fn metadata<'a, T>(
    req: &'a tonic::Request<T>,
    key: &str,
) -> Result<Option<&'a str>, tonic::Status> {
    match req.metadata().get(key) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| tonic::Status::invalid_argument(format!("{key} metadata is not text"))),
    }
}

/// The party the proxy authenticated by its client certificate, if any.
/// Calls that reach a service without passing the proxy carry none.
pub fn calling_party<T>(req: &tonic::Request<T>) -> Result<Option<PartyId>, tonic::Status> {
    metadata(req, cohort_proto::PARTY_METADATA_KEY)?
        .map(|p| {
            PartyId::parse(p).map_err(|_| {
                tonic::Status::unauthenticated(format!(
                    "{} metadata {p:?} is not a party name",
                    cohort_proto::PARTY_METADATA_KEY
                ))
            })
        })
        .transpose()
}

/// The holder of the API token the proxy checked, if any. None: a
/// server-internal caller (another service), which may do anything.
pub fn calling_principal<T>(req: &tonic::Request<T>) -> Result<Option<Principal>, tonic::Status> {
    let namespace = metadata(req, cohort_proto::NAMESPACE_METADATA_KEY)?;
    let role = metadata(req, cohort_proto::ROLE_METADATA_KEY)?;
    match (namespace, role) {
        (None, None) => Ok(None),
        (Some(ns), Some(role)) => {
            let scope =
                Scope::parse(ns).map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
            let role =
                Role::parse(role).map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
            Ok(Some(Principal { scope, role }))
        }
        _ => Err(tonic::Status::unauthenticated(format!(
            "{} and {} metadata come together",
            cohort_proto::NAMESPACE_METADATA_KEY,
            cohort_proto::ROLE_METADATA_KEY
        ))),
    }
}

/// The id of the API token the proxy checked, if any (it comes with
/// [`calling_principal`]; who made a call, for the audit log).
pub fn calling_token<T>(req: &tonic::Request<T>) -> Result<Option<String>, tonic::Status> {
    Ok(metadata(req, cohort_proto::TOKEN_METADATA_KEY)?.map(str::to_string))
}

/// Refuses calls over TLS whose peer is not a server-side service: a party's
/// certificate is good for the proxy, never for an internal port.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequireServicePeer;

impl<S> tower::Layer<S> for RequireServicePeer {
    type Service = RequireServicePeerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequireServicePeerService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequireServicePeerService<S> {
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for RequireServicePeerService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let identity = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().map(|c| cohort_security::identity_of(c)));
        match identity {
            Some(Ok(Identity::Service(_))) => Box::pin(self.inner.call(req)),
            other => {
                let why = match other {
                    Some(Ok(id)) => format!("{id} may not call a server-internal service"),
                    Some(Err(e)) => e.to_string(),
                    None => "a service certificate is required".to_string(),
                };
                tracing::warn!(path = %req.uri().path(), reason = %why, "refused caller");
                let status = tonic::Status::permission_denied(why);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
