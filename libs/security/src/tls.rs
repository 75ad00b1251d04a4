//! rustls configurations for mutual TLS inside the federation. Both use the
//! ring provider explicitly: our binaries also link aws-lc-rs, so relying on
//! the process default would depend on who called `install_crypto_provider`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{SecurityError, load_certs, load_key};

/// Installs ring as rustls' process-wide crypto provider. Idempotent: a
/// provider installed earlier (by us or anyone) is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Files of one TLS identity and the CA that peers must chain to.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// A client may connect without a certificate, but one it presents must verify.
    Optional,
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, SecurityError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(ca)? {
        store.add(cert).map_err(|e| SecurityError::InvalidFile {
            what: "CA certificate file",
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

fn tls_err(what: String) -> impl FnOnce(rustls::Error) -> SecurityError {
    move |source| SecurityError::Tls { what, source }
}

/// Server config: our certificate chain and key; client certificates verified
/// against `files.ca`; ALPN `h2`.
pub fn server_config(files: &TlsFiles, auth: ClientAuth) -> Result<ServerConfig, SecurityError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider.clone());
    let verifier = match auth {
        ClientAuth::Required => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| SecurityError::InvalidFile {
        what: "CA certificate file",
        path: files.ca.clone(),
        reason: e.to_string(),
    })?;
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions".to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(tls_err(format!(
            "certificate {} with key {}",
            files.cert.display(),
            files.key.display()
        )))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Client config trusting only `ca`; presents `identity` (certificate and key
/// paths) when given; ALPN `h2`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, SecurityError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions".to_string()))?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(tls_err(format!(
                "certificate {} with key {}",
                cert.display(),
                key.display()
            )))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};

    use super::*;
    use crate::{
        CertAuthority, CertifiedKey, DEFAULT_VALIDITY, Identity, Validity, identity_of, write_cert,
        write_key,
    };

    struct Fixture {
        dir: tempfile::TempDir,
        ca: CertAuthority,
        server: TlsFiles,
    }

    fn valid() -> Validity {
        Validity::for_duration(DEFAULT_VALIDITY)
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let ca = CertAuthority::generate("Cohort test CA", valid()).unwrap();
            let svc = ca
                .issue_service("proxy", &["localhost".into(), "127.0.0.1".into()], valid())
                .unwrap();
            let server = Fixture::files(&dir, "proxy", &svc, &ca);
            Fixture { dir, ca, server }
        }

        /// Writes a certified key and the CA; returns their paths.
        fn files(
            dir: &tempfile::TempDir,
            name: &str,
            ck: &CertifiedKey,
            ca: &CertAuthority,
        ) -> TlsFiles {
            let files = TlsFiles {
                cert: dir.path().join(format!("{name}.crt")),
                key: dir.path().join(format!("{name}.key")),
                ca: dir.path().join(format!("{name}-ca.crt")),
            };
            write_cert(&files.cert, &ck.cert_pem).unwrap();
            write_key(&files.key, &ck.key_pem).unwrap();
            write_cert(&files.ca, ca.cert_pem()).unwrap();
            files
        }

        fn client(&self, name: &str, ck: &CertifiedKey) -> TlsFiles {
            Fixture::files(&self.dir, name, ck, &self.ca)
        }
    }

    #[derive(Debug, PartialEq)]
    enum Side {
        Client,
        Server,
    }

    /// Runs a handshake over in-memory buffers. On success returns the
    /// identity of the client certificate the server saw, if any.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
        host: &str,
    ) -> Result<Option<Identity>, (Side, rustls::Error)> {
        let name = ServerName::try_from(host.to_string()).unwrap();
        let mut c = ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().map_err(|e| (Side::Server, e))?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().map_err(|e| (Side::Client, e))?;
            }
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
                assert_eq!(s.alpn_protocol(), Some(&b"h2"[..]));
                return Ok(s
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|leaf| identity_of(leaf).unwrap()));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn party_certificate_is_accepted_and_identified() {
        install_crypto_provider();
        install_crypto_provider(); // idempotent
        let fx = Fixture::new();
        let party = fx.client("party", &fx.ca.issue_party("hospital-a", valid()).unwrap());
        let client = client_config(&party.ca, Some((&party.cert, &party.key))).unwrap();
        for auth in [ClientAuth::Required, ClientAuth::Optional] {
            let server = server_config(&fx.server, auth).unwrap();
            let seen = handshake(client.clone(), server, "localhost").unwrap();
            assert_eq!(seen, Some(Identity::Party("hospital-a".into())));
        }
        // The service certificate's IP SAN works as a server name too, and a
        // service may act as a client.
        let server = server_config(&fx.server, ClientAuth::Required).unwrap();
        let svc = client_config(&fx.server.ca, Some((&fx.server.cert, &fx.server.key))).unwrap();
        let seen = handshake(svc, server, "127.0.0.1").unwrap();
        assert_eq!(seen, Some(Identity::Service("proxy".into())));
    }

    #[test]
    fn no_client_certificate_needs_optional() {
        let fx = Fixture::new();
        let client = client_config(&fx.server.ca, None).unwrap();
        let required = server_config(&fx.server, ClientAuth::Required).unwrap();
        let (side, err) = handshake(client.clone(), required, "localhost").unwrap_err();
        assert_eq!(side, Side::Server);
        assert!(
            matches!(err, rustls::Error::NoCertificatesPresented),
            "{err:?}"
        );
        let optional = server_config(&fx.server, ClientAuth::Optional).unwrap();
        assert_eq!(handshake(client, optional, "localhost").unwrap(), None);
    }

    #[test]
    fn client_certificate_from_another_ca_is_refused() {
        let fx = Fixture::new();
        let other = CertAuthority::generate("Other CA", valid()).unwrap();
        let ck = other.issue_party("hospital-a", valid()).unwrap();
        // The client trusts our CA (so the server is fine) but presents a foreign certificate.
        let foreign = Fixture::files(&fx.dir, "foreign", &ck, &fx.ca);
        let client = client_config(&foreign.ca, Some((&foreign.cert, &foreign.key))).unwrap();
        for auth in [ClientAuth::Required, ClientAuth::Optional] {
            let server = server_config(&fx.server, auth).unwrap();
            let (side, err) = handshake(client.clone(), server, "localhost").unwrap_err();
            assert_eq!(side, Side::Server, "{auth:?}");
            assert!(
                matches!(
                    err,
                    rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn expired_certificates_are_refused() {
        let fx = Fixture::new();
        let now = SystemTime::now();
        let expired = Validity {
            not_before: now - Duration::from_secs(2 * 86_400),
            not_after: now - Duration::from_secs(86_400),
        };
        let party = fx.client(
            "old-party",
            &fx.ca.issue_party("hospital-a", expired).unwrap(),
        );
        let client = client_config(&party.ca, Some((&party.cert, &party.key))).unwrap();
        let server = server_config(&fx.server, ClientAuth::Optional).unwrap();
        let (side, err) = handshake(client, server, "localhost").unwrap_err();
        assert_eq!(side, Side::Server);
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                )
            ),
            "{err:?}"
        );

        // An expired server certificate is refused by the client.
        let svc = fx
            .ca
            .issue_service("proxy", &["localhost".into()], expired)
            .unwrap();
        let old_server = fx.client("old-proxy", &svc);
        let server = server_config(&old_server, ClientAuth::Optional).unwrap();
        let client = client_config(&fx.server.ca, None).unwrap();
        let (side, _) = handshake(client, server, "localhost").unwrap_err();
        assert_eq!(side, Side::Client);
    }

    #[test]
    fn client_refuses_server_from_another_ca() {
        let fx = Fixture::new();
        let other = CertAuthority::generate("Other CA", valid()).unwrap();
        let svc = other
            .issue_service("proxy", &["localhost".into()], valid())
            .unwrap();
        let rogue = Fixture::files(&fx.dir, "rogue", &svc, &other);
        let server = server_config(&rogue, ClientAuth::Optional).unwrap();
        // The client trusts only our CA.
        let client = client_config(&fx.server.ca, None).unwrap();
        let (side, err) = handshake(client, server, "localhost").unwrap_err();
        assert_eq!(side, Side::Client);
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
    }

    #[test]
    fn wrong_server_name_and_party_as_server_are_refused() {
        let fx = Fixture::new();
        let client = client_config(&fx.server.ca, None).unwrap();
        let server = server_config(&fx.server, ClientAuth::Optional).unwrap();
        let (side, _) = handshake(client.clone(), server, "elsewhere").unwrap_err();
        assert_eq!(side, Side::Client);

        // A party certificate lacks serverAuth, so it cannot impersonate a service.
        let party = fx.client(
            "party-srv",
            &fx.ca.issue_party("localhost", valid()).unwrap(),
        );
        let server = server_config(&party, ClientAuth::Optional).unwrap();
        let (side, _) = handshake(client, server, "localhost").unwrap_err();
        assert_eq!(side, Side::Client);
    }

    #[test]
    fn config_errors_name_the_files() {
        let fx = Fixture::new();
        let bad = TlsFiles {
            cert: fx.server.cert.clone(),
            key: fx.dir.path().join("missing.key"),
            ca: fx.server.ca.clone(),
        };
        let err = server_config(&bad, ClientAuth::Required)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.key"), "{err}");

        // A key that does not match the certificate.
        let other = fx.ca.issue_party("x", valid()).unwrap();
        let other_key = fx.dir.path().join("other.key");
        write_key(&other_key, &other.key_pem).unwrap();
        let mismatched = TlsFiles {
            key: other_key,
            ..fx.server.clone()
        };
        let err = server_config(&mismatched, ClientAuth::Required)
            .unwrap_err()
            .to_string();
        assert!(err.contains("other.key"), "{err}");
        assert!(!err.contains(&other.key_pem), "{err}");

        let err = client_config(&fx.dir.path().join("nope.crt"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.crt"), "{err}");
    }
}
