//! Identifiers: validated newtypes, so a bad id is caught where it enters.

use std::fmt;

use rand::Rng;

/// True for a DNS-1123 label: 1–63 of [a-z0-9-], alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

macro_rules! id_type {
    ($name:ident, $what:literal, $check:expr) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, crate::CoreError> {
                let check: fn(&str) -> bool = $check;
                if check(s) {
                    Ok(Self(s.to_string()))
                } else {
                    Err(crate::CoreError::InvalidId {
                        what: $what,
                        value: s.chars().take(80).collect(),
                    })
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(JobId, "job id", is_dns_label);
id_type!(PartyId, "party name", is_party_name);

/// Party names: 1–64 of letters, digits, '-', '_' and '.'.
pub fn is_party_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl JobId {
    /// A fresh id: the job name plus a random suffix, still a DNS label.
    pub fn generate(name: &str) -> JobId {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        let suffix: String = (0..6)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        JobId(format!("{name}-{suffix}"))
    }

    /// An id that is a function of `key` (same key, same id): the job name plus six
    /// characters of a hash of the key. For creates that may be retried after a crash with
    /// no memory of the first try (a FederatedJob's uid as the key): the retry finds the job
    /// under the same id instead of making a second one. FNV-1a, so the id does not change
    /// between builds or platforms.
    pub fn derived(name: &str, key: &str) -> JobId {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        let suffix: String = (0..6)
            .map(|_| {
                let c = ALPHABET[(hash % 36) as usize] as char;
                hash /= 36;
                c
            })
            .collect();
        JobId(format!("{name}-{suffix}"))
    }
}

/// A random hex token of `bytes` bytes of entropy (task tokens, offer ids).
pub fn random_token(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("digits-fedavg"));
        assert!(is_dns_label("a1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("A"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    #[test]
    fn generated_job_ids_are_valid() {
        let id = JobId::generate("digits");
        assert!(JobId::parse(id.as_str()).is_ok());
        assert!(id.as_str().starts_with("digits-"));
        assert_ne!(JobId::generate("x"), JobId::generate("x"));
    }

    #[test]
    fn derived_job_ids_depend_on_the_key_only() {
        let a = JobId::derived("digits", "k8s:ns/a/0b7c-uid");
        assert_eq!(a, JobId::derived("digits", "k8s:ns/a/0b7c-uid"));
        assert_ne!(a, JobId::derived("digits", "k8s:ns/a/0b7d-uid"));
        assert!(JobId::parse(a.as_str()).is_ok());
        // Stable across builds: a restarted job-scheduler must find the same id.
        assert_eq!(JobId::derived("x", "").as_str(), "x-fe74et");
    }

    #[test]
    fn party_names() {
        assert!(PartyId::parse("hospital_a.eu-1").is_ok());
        assert!(PartyId::parse("a b").is_err());
    }
}
