//! Identities carried in certificates as SPIFFE-style SAN URIs:
//! `spiffe://cohort.local/party/NAME` and `spiffe://cohort.local/service/NAME`.

use std::fmt;

use x509_parser::extensions::GeneralName;

use crate::SecurityError;

/// The trust domain of every Cohort identity URI.
pub const TRUST_DOMAIN: &str = "cohort.local";

const URI_PREFIX: &str = "spiffe://cohort.local/";

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Party(String),
    Service(String),
}

impl Identity {
    pub fn name(&self) -> &str {
        match self {
            Identity::Party(n) | Identity::Service(n) => n,
        }
    }

    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Party(n) => format!("{URI_PREFIX}party/{n}"),
            Identity::Service(n) => format!("{URI_PREFIX}service/{n}"),
        }
    }

    /// Parses `spiffe://cohort.local/{party|service}/NAME`, checking the name.
    pub fn from_uri(uri: &str) -> Result<Identity, SecurityError> {
        let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(|| {
            SecurityError::identity(format!(
                "{} is not in trust domain {TRUST_DOMAIN}",
                shown(uri)
            ))
        })?;
        let (kind, name) = rest.split_once('/').ok_or_else(|| {
            SecurityError::identity(format!("{} has no /party/ or /service/ path", shown(uri)))
        })?;
        match kind {
            "party" if is_party_name(name) => Ok(Identity::Party(name.to_string())),
            "service" if cohort_core::is_dns_label(name) => Ok(Identity::Service(name.to_string())),
            "party" | "service" => Err(SecurityError::identity(format!(
                "{} has an invalid {kind} name",
                shown(uri)
            ))),
            _ => Err(SecurityError::identity(format!(
                "{} is neither a party nor a service",
                shown(uri)
            ))),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Party(n) => write!(f, "party {n}"),
            Identity::Service(n) => write!(f, "service {n}"),
        }
    }
}

/// `cohort_core`'s party names, less "." and "..", which URI path
/// normalisation would turn into another identity.
pub(crate) fn is_party_name(name: &str) -> bool {
    cohort_core::ids::is_party_name(name) && name != "." && name != ".."
}

/// Peer-supplied text in messages: quoted, escaped and bounded.
fn shown(s: &str) -> String {
    const MAX: usize = 120;
    if s.chars().count() > MAX {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}...")
    } else {
        format!("{s:?}")
    }
}

/// Reads the identity from a DER certificate: exactly one `spiffe://` SAN URI,
/// in our trust domain, with a valid party or service name.
///
/// This does not verify the certificate; call it on certificates rustls has
/// already verified against the federation CA.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, SecurityError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| SecurityError::identity(format!("not an X.509 certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(SecurityError::identity(
            "trailing bytes after the certificate",
        ));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SecurityError::identity(format!("bad subjectAltName extension: {e}")))?
        .ok_or_else(|| SecurityError::identity("no subjectAltName extension"))?;
    // Any spiffe URI counts, so a second one in a foreign trust domain makes the
    // certificate ambiguous rather than being ignored.
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u)
            if u.get(..9)
                .is_some_and(|p| p.eq_ignore_ascii_case("spiffe://")) =>
        {
            Some(*u)
        }
        _ => None,
    });
    let uri = uris
        .next()
        .ok_or_else(|| SecurityError::identity(format!("no {URI_PREFIX} URI in subjectAltName")))?;
    if uris.next().is_some() {
        return Err(SecurityError::identity(
            "more than one spiffe:// URI in subjectAltName",
        ));
    }
    Identity::from_uri(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip_and_display() {
        for id in [
            Identity::Party("hospital_a.eu-1".into()),
            Identity::Service("job-scheduler".into()),
        ] {
            assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        }
        assert_eq!(Identity::Party("a".into()).to_string(), "party a");
        assert_eq!(
            Identity::Service("proxy".into()).to_string(),
            "service proxy"
        );
    }

    #[test]
    fn bad_uris_are_refused() {
        for uri in [
            "spiffe://other.domain/party/a",
            "spiffe://cohort.local/party/",
            "spiffe://cohort.local/party/a/b",
            "spiffe://cohort.local/party/..",
            "spiffe://cohort.local/service/Proxy",
            "spiffe://cohort.local/admin/a",
            "spiffe://cohort.local/party",
        ] {
            let err = Identity::from_uri(uri).unwrap_err();
            assert_eq!(
                cohort_core::HasKind::kind(&err),
                cohort_core::ErrorKind::PermissionDenied,
                "{uri}"
            );
        }
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(identity_of(b"not a certificate").is_err());
    }
}
