//! API tokens: `cohort_` + 43 characters of unpadded base64url (32 random bytes).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::SecurityError;

const PREFIX: &str = "cohort_";
const RANDOM_BYTES: usize = 32;
const ENCODED_LEN: usize = 43;

/// An API token: the secret a user holds. Debug is redacted and there is no
/// Display, so it cannot end up in a log line by accident.
#[derive(Clone)]
pub struct ApiToken(String);

impl ApiToken {
    /// 32 bytes from `rand::rng()`, a CSPRNG seeded (and reseeded) from the OS.
    pub fn generate() -> ApiToken {
        let mut bytes = [0u8; RANDOM_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        ApiToken(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Trims surrounding whitespace and checks the shape; errors never echo the input.
    pub fn parse(s: &str) -> Result<ApiToken, SecurityError> {
        let s = s.trim();
        let bad = |reason| SecurityError::Token {
            field: "API token",
            reason,
        };
        let body = s
            .strip_prefix(PREFIX)
            .ok_or(bad("must start with \"cohort_\""))?;
        if body.len() != ENCODED_LEN {
            return Err(bad(
                "must be \"cohort_\" followed by 43 base64url characters",
            ));
        }
        // Decoding also rejects non-canonical final characters, so each secret
        // has exactly one spelling (and one hash).
        match URL_SAFE_NO_PAD.decode(body) {
            Ok(bytes) if bytes.len() == RANDOM_BYTES => Ok(ApiToken(s.to_string())),
            _ => Err(bad(
                "must be \"cohort_\" followed by 43 base64url characters",
            )),
        }
    }

    /// The secret itself, for writing to a profile file or a header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Lowercase hex SHA-256 of the token: what is stored and looked up.
    pub fn sha256(&self) -> String {
        token_sha256(&self.0)
    }
}

impl PartialEq for ApiToken {
    /// Constant-time, so comparing against a secret leaks no prefix length.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for ApiToken {}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// Lowercase hex SHA-256 of a token string. Tokens carry 256 random bits, so a
/// plain hash is a sufficient at-rest protection (no slow KDF needed).
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Parses an HTTP `authorization` header value `Bearer <token>` (scheme
/// case-insensitive). Errors never echo the value.
pub fn bearer_token(header_value: &str) -> Result<ApiToken, SecurityError> {
    let value = header_value.trim();
    let token = value
        .get(..6)
        .filter(|scheme| scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|_| value.get(6..))
        .filter(|rest| rest.starts_with([' ', '\t']))
        .ok_or(SecurityError::Token {
            field: "authorization header",
            reason: "expected \"Bearer <token>\"",
        })?;
    ApiToken::parse(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_round_trip() {
        let t = ApiToken::generate();
        assert!(t.expose().starts_with("cohort_"));
        assert_eq!(t.expose().len(), 7 + 43);
        assert_eq!(ApiToken::parse(t.expose()).unwrap(), t);
        assert_eq!(ApiToken::parse(&format!("  {}\n", t.expose())).unwrap(), t);
        assert_ne!(ApiToken::generate(), t);
    }

    #[test]
    fn bad_shapes_are_refused_without_echo() {
        let good = ApiToken::generate().expose().to_string();
        let body = &good[7..];
        let cases = [
            String::new(),
            "cohort_".to_string(),
            body.to_string(),
            format!("Cohort_{body}"),
            format!("{good}A"),
            good[..good.len() - 1].to_string(),
            format!("cohort_{}+", &body[..42]),
            format!("cohort_{}=", &body[..42]),
            format!("cohort_{} ", &body[..42]).replace(' ', "\u{e9}"),
            // 'B' in the last place sets bits past the 256th: non-canonical.
            format!("cohort_{}B", "A".repeat(42)),
        ];
        for case in cases {
            let err = ApiToken::parse(&case).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("invalid API token"), "{msg}");
            if case.len() > 10 {
                assert!(!msg.contains(&case), "{msg}");
            }
            assert_eq!(
                cohort_core::HasKind::kind(&err),
                cohort_core::ErrorKind::PermissionDenied
            );
        }
        assert!(ApiToken::parse(&format!("cohort_{}A", "A".repeat(42))).is_ok());
    }

    #[test]
    fn debug_redacts() {
        let t = ApiToken::generate();
        let d = format!("{t:?}");
        assert_eq!(d, "ApiToken(<redacted>)");
    }

    #[test]
    fn sha256_is_stable_hex() {
        // echo -n abc | sha256sum
        assert_eq!(
            token_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let t = ApiToken::generate();
        let h = t.sha256();
        assert_eq!(h, t.sha256());
        assert_eq!(h, token_sha256(t.expose()));
        assert_eq!(h.len(), 64);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
    }

    #[test]
    fn bearer() {
        let t = ApiToken::generate();
        for header in [
            format!("Bearer {}", t.expose()),
            format!("bearer {}", t.expose()),
            format!("BEARER   {} ", t.expose()),
            format!("Bearer\t{}", t.expose()),
        ] {
            assert_eq!(bearer_token(&header).unwrap(), t, "{header}");
        }
        for header in [
            String::new(),
            "Bearer".to_string(),
            "Bearer ".to_string(),
            t.expose().to_string(),
            format!("Basic {}", t.expose()),
            format!("Bearer{}", t.expose()),
            format!("Bearer {} extra", t.expose()),
            "Bearé x".to_string(),
        ] {
            let err = bearer_token(&header).unwrap_err().to_string();
            assert!(!err.contains(t.expose()), "{err}");
        }
        let err = bearer_token("Basic x").unwrap_err().to_string();
        assert!(err.contains("authorization header"), "{err}");
    }
}
