//! The federation's certificate authority: a self-signed ECDSA P-256 CA that
//! issues party (client) and service (server + client) certificates.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::SecurityError;
use crate::files::{certs_from_pem, read_pem_string, write_cert, write_key};
use crate::identity::{Identity, is_party_name};

/// How long issued certificates (and a generated CA) are valid unless told otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Backdating of `not_before`, so peers with slightly slow clocks accept a fresh certificate.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// 9999-12-31T23:59:59Z, the last instant an X.509 GeneralizedTime can hold.
const MAX_UNIX_SECS: u64 = 253_402_300_799;

/// Validity window of an issued certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From five minutes ago (clock skew) until `d` from now.
    pub fn for_duration(d: Duration) -> Validity {
        let now = SystemTime::now();
        let max = UNIX_EPOCH + Duration::from_secs(MAX_UNIX_SECS);
        Validity {
            not_before: now.checked_sub(CLOCK_SKEW).unwrap_or(now),
            not_after: now.checked_add(d).map_or(max, |t| t.min(max)),
        }
    }

    fn to_rcgen(self) -> Result<(OffsetDateTime, OffsetDateTime), SecurityError> {
        if self.not_after <= self.not_before {
            return Err(SecurityError::invalid(
                "validity",
                "not_after must be later than not_before",
            ));
        }
        Ok((to_datetime(self.not_before)?, to_datetime(self.not_after)?))
    }
}

fn to_datetime(t: SystemTime) -> Result<OffsetDateTime, SecurityError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| SecurityError::invalid("validity", "times before 1970 are not supported"))?
        .as_secs();
    if secs > MAX_UNIX_SECS {
        return Err(SecurityError::invalid(
            "validity",
            "times after year 9999 are not supported",
        ));
    }
    // Within range by the check above; X.509 times have whole seconds anyway.
    OffsetDateTime::from_unix_timestamp(secs as i64)
        .map_err(|e| SecurityError::invalid("validity", e.to_string()))
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertifiedKey {
    /// Writes the certificate (0644) and the key (0600).
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), SecurityError> {
        write_cert(cert_path, &self.cert_pem)?;
        write_key(key_path, &self.key_pem)
    }
}

/// The federation's certificate authority.
pub struct CertAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn gen_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> SecurityError {
    let what = what.into();
    move |e| SecurityError::Generate {
        what,
        reason: e.to_string(),
    }
}

fn new_key(what: &str) -> Result<KeyPair, SecurityError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err(format!("key for {what}")))
}

/// A random positive 128-bit serial: unique without any issuance state.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn subject(field: &'static str, cn: &str) -> Result<DistinguishedName, SecurityError> {
    // ub-common-name is 64 characters (RFC 5280).
    if cn.is_empty() || cn.chars().count() > 64 || cn.chars().any(char::is_control) {
        return Err(SecurityError::invalid(
            field,
            "must be 1-64 characters without control characters",
        ));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    Ok(dn)
}

/// A DNS name for a SAN: LDH labels, optionally a leading `*.` wildcard.
fn is_dns_name(s: &str) -> bool {
    let host = s.strip_prefix("*.").unwrap_or(s);
    !host.is_empty()
        && s.len() <= 253
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

fn uri_san(id: &Identity) -> Result<SanType, SecurityError> {
    let uri = id.uri();
    let ia5 = uri
        .as_str()
        .try_into()
        .map_err(|e: rcgen::Error| SecurityError::invalid("name", e.to_string()))?;
    Ok(SanType::URI(ia5))
}

impl CertAuthority {
    /// A new self-signed CA: CA:TRUE (path length 0), keyCertSign + cRLSign, ECDSA P-256.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, SecurityError> {
        let (not_before, not_after) = validity.to_rcgen()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("common name", common_name)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = new_key("CA")?;
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("CA certificate"))?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA certificate and its PKCS#8 key; checks that the certificate is a
    /// CA and that the key belongs to it.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, SecurityError> {
        const CERT: &str = "CA certificate";
        const KEY: &str = "CA private key";
        let cert_pem = read_pem_string(cert_path, CERT)?;
        let key_pem = read_pem_string(key_path, KEY)?;
        let bad_cert = |reason: String| SecurityError::InvalidFile {
            what: CERT,
            path: cert_path.to_path_buf(),
            reason,
        };
        let der = certs_from_pem(cert_pem.as_bytes(), cert_path, CERT)?
            .into_iter()
            .next()
            .ok_or_else(|| bad_cert("no CERTIFICATE section".to_string()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| SecurityError::InvalidFile {
            what: KEY,
            path: key_path.to_path_buf(),
            reason: "not a PKCS#8 PEM private key (PRIVATE KEY) of a supported algorithm"
                .to_string(),
        })?;

        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| bad_cert(format!("not an X.509 certificate: {e}")))?;
        let is_ca = parsed
            .basic_constraints()
            .map_err(|e| bad_cert(e.to_string()))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(bad_cert(
                "not a CA certificate (basicConstraints CA:TRUE)".to_string(),
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(SecurityError::InvalidFile {
                what: KEY,
                path: key_path.to_path_buf(),
                reason: format!("does not belong to the certificate {}", cert_path.display()),
            });
        }
        // rcgen panics on an empty RDN set; refuse it here instead.
        if parsed
            .subject()
            .iter()
            .any(|rdn| rdn.iter().next().is_none())
        {
            return Err(bad_cert("empty RDN in the subject".to_string()));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| bad_cert(format!("cannot issue with it: {e}")))?;
        Ok(CertAuthority {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// Writes the CA certificate (0644) and key (0600).
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), SecurityError> {
        write_cert(cert_path, &self.cert_pem)?;
        write_key(key_path, &self.key_pem)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key: a secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Party certificate: CN=name, SAN URI spiffe://cohort.local/party/NAME, EKU clientAuth.
    pub fn issue_party(
        &self,
        name: &str,
        validity: Validity,
    ) -> Result<CertifiedKey, SecurityError> {
        if !is_party_name(name) {
            return Err(SecurityError::invalid(
                "party",
                "name must be 1-64 of letters, digits, '-', '_' and '.' (not \".\" or \"..\")",
            ));
        }
        let id = Identity::Party(name.to_string());
        self.issue(
            &id,
            vec![uri_san(&id)?],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )
    }

    /// Service certificate: CN=name, SAN URI spiffe://cohort.local/service/NAME plus a
    /// SAN per `dns` entry (IP addresses become IP SANs), EKU serverAuth and clientAuth.
    pub fn issue_service(
        &self,
        name: &str,
        dns: &[String],
        validity: Validity,
    ) -> Result<CertifiedKey, SecurityError> {
        if !cohort_core::is_dns_label(name) {
            return Err(SecurityError::invalid(
                "service",
                "name must be a DNS label: 1-63 of [a-z0-9-], alphanumeric at both ends",
            ));
        }
        let id = Identity::Service(name.to_string());
        let mut sans = vec![uri_san(&id)?];
        for entry in dns {
            let san = if let Ok(ip) = entry.parse::<IpAddr>() {
                SanType::IpAddress(ip)
            } else if is_dns_name(entry) {
                SanType::DnsName(
                    entry
                        .as_str()
                        .try_into()
                        .map_err(|e: rcgen::Error| SecurityError::invalid("dns", e.to_string()))?,
                )
            } else {
                let shown: String = entry.chars().take(80).collect();
                return Err(SecurityError::invalid(
                    "dns",
                    format!("{shown:?} is neither an IP address nor a DNS name"),
                ));
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        self.issue(
            &id,
            sans,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    fn issue(
        &self,
        id: &Identity,
        sans: Vec<SanType>,
        eku: &[ExtendedKeyUsagePurpose],
        validity: Validity,
    ) -> Result<CertifiedKey, SecurityError> {
        let (not_before, not_after) = validity.to_rcgen()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("name", id.name())?;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = eku.to_vec();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = new_key(&id.to_string())?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err(format!("certificate for {id}")))?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::extensions::GeneralName;
    use x509_parser::parse_x509_certificate;

    use super::*;
    use crate::{identity_of, load_certs};

    fn der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    fn new_ca() -> CertAuthority {
        CertAuthority::generate("Cohort test CA", Validity::for_duration(DEFAULT_VALIDITY)).unwrap()
    }

    #[test]
    fn shareable_across_threads() {
        fn check<T: Send + Sync>() {}
        check::<CertAuthority>();
        check::<CertifiedKey>();
    }

    #[test]
    fn ca_is_a_p256_ca() {
        let ca = new_ca();
        let der = der(ca.cert_pem());
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert_eq!(
            cert.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );
        assert!(cert.verify_signature(None).is_ok());
        assert!(format!("{ca:?}").contains("<redacted>"));
        assert!(!format!("{ca:?}").contains(ca.key_pem()));
    }

    #[test]
    fn party_certificate() {
        let ca = new_ca();
        let ck = ca
            .issue_party("hospital_a.eu-1", Validity::for_duration(DEFAULT_VALIDITY))
            .unwrap();
        let der = der(&ck.cert_pem);
        assert_eq!(
            identity_of(&der).unwrap(),
            Identity::Party("hospital_a.eu-1".into())
        );
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "hospital_a.eu-1"
        );
        let ca_der = der_of(&ca);
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());

        let debug = format!("{ck:?}");
        assert!(debug.contains("<redacted>") && !debug.contains(&ck.key_pem));
    }

    fn der_of(ca: &CertAuthority) -> Vec<u8> {
        der(ca.cert_pem())
    }

    #[test]
    fn service_certificate_has_ip_and_dns_sans() {
        let ca = new_ca();
        let dns = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
            "proxy.cohort.svc".to_string(),
        ];
        let ck = ca
            .issue_service("proxy", &dns, Validity::for_duration(DEFAULT_VALIDITY))
            .unwrap();
        let der = der(&ck.cert_pem);
        assert_eq!(
            identity_of(&der).unwrap(),
            Identity::Service("proxy".into())
        );
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(names.contains(&GeneralName::URI("spiffe://cohort.local/service/proxy")));
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::DNSName("proxy.cohort.svc")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        let v6: [u8; 16] = std::net::Ipv6Addr::LOCALHOST.octets();
        assert!(names.contains(&GeneralName::IPAddress(&v6)));
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
    }

    #[test]
    fn bad_names_are_invalid_arguments() {
        let ca = new_ca();
        let v = Validity::for_duration(DEFAULT_VALIDITY);
        let kind = |e: SecurityError| cohort_core::HasKind::kind(&e);
        for bad in ["", "a b", "..", "x/y", &"a".repeat(65)] {
            let err = ca.issue_party(bad, v).unwrap_err();
            assert!(err.to_string().contains("party"), "{err}");
            assert_eq!(kind(err), cohort_core::ErrorKind::InvalidArgument);
        }
        for bad in ["Proxy", "-a", "a.b", ""] {
            let err = ca.issue_service(bad, &[], v).unwrap_err();
            assert!(err.to_string().contains("service"), "{err}");
        }
        for bad in [
            "", "a b", "-a.com", "a..b", "ex ample", "*", "a.*.b", "é.com",
        ] {
            let err = ca
                .issue_service("proxy", &[bad.to_string()], v)
                .unwrap_err();
            assert!(err.to_string().starts_with("invalid dns:"), "{err}");
            assert_eq!(kind(err), cohort_core::ErrorKind::InvalidArgument);
        }
        assert!(
            ca.issue_service("proxy", &["*.cohort.svc".to_string()], v)
                .is_ok()
        );
        let backwards = Validity {
            not_before: v.not_after,
            not_after: v.not_before,
        };
        let err = ca.issue_party("a", backwards).unwrap_err();
        assert!(err.to_string().contains("validity"), "{err}");
        assert!(CertAuthority::generate("", v).is_err());
    }

    #[test]
    fn validity_window() {
        let before = SystemTime::now();
        let v = Validity::for_duration(Duration::from_secs(60));
        assert!(v.not_before <= before - Duration::from_secs(299));
        assert!(v.not_after >= before + Duration::from_secs(60));
        // Absurd durations clamp to the end of X.509 time instead of failing.
        let v = Validity::for_duration(Duration::MAX);
        assert!(new_ca().issue_party("a", v).is_ok());
    }

    #[test]
    fn cert_without_our_uri_is_refused() {
        let key = KeyPair::generate().unwrap();
        let plain = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let err = identity_of(plain.der()).unwrap_err();
        assert_eq!(
            cohort_core::HasKind::kind(&err),
            cohort_core::ErrorKind::PermissionDenied
        );

        let two = |uris: [&str; 2]| {
            let mut p = CertificateParams::default();
            p.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI((*u).try_into().unwrap()))
                .collect();
            identity_of(p.self_signed(&key).unwrap().der())
        };
        assert!(
            two([
                "spiffe://cohort.local/party/a",
                "spiffe://cohort.local/party/b"
            ])
            .is_err()
        );
        assert!(
            two([
                "spiffe://cohort.local/party/a",
                "spiffe://evil.example/party/a"
            ])
            .is_err()
        );
        assert_eq!(
            two(["spiffe://cohort.local/party/a", "https://example.com/a"]).unwrap(),
            Identity::Party("a".into())
        );
        assert!(two(["spiffe://cohort.local/party/a b", "https://example.com/a"]).is_err());
    }

    #[test]
    fn load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        let ca = new_ca();
        ca.write(&cert, &key).unwrap();
        let loaded = CertAuthority::load(&cert, &key).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.key_pem(), ca.key_pem());
        assert_eq!(load_certs(&cert).unwrap().len(), 1);

        // A certificate issued by the loaded CA chains to the original.
        let ck = loaded
            .issue_party("a", Validity::for_duration(DEFAULT_VALIDITY))
            .unwrap();
        let leaf = der(&ck.cert_pem);
        let (_, leaf) = parse_x509_certificate(&leaf).unwrap();
        let ca_der = der_of(&ca);
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
        assert!(leaf.verify_signature(Some(ca_cert.public_key())).is_ok());

        // A key from another CA, or a leaf certificate, is refused, naming the file.
        let other = dir.path().join("other.key");
        write_key(&other, new_ca().key_pem()).unwrap();
        let err = CertAuthority::load(&cert, &other).unwrap_err().to_string();
        assert!(
            err.contains("other.key") && err.contains("does not belong"),
            "{err}"
        );
        let leaf_crt = dir.path().join("leaf.crt");
        write_cert(&leaf_crt, &ck.cert_pem).unwrap();
        let leaf_key = dir.path().join("leaf.key");
        write_key(&leaf_key, &ck.key_pem).unwrap();
        let err = CertAuthority::load(&leaf_crt, &leaf_key)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("leaf.crt") && err.contains("not a CA"),
            "{err}"
        );
        let err = CertAuthority::load(&dir.path().join("nope.crt"), &key)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read CA certificate ") && err.contains("nope.crt"),
            "{err}"
        );
    }
}
