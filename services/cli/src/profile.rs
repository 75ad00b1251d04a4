//! Profiles: where the federation's proxy is, the CA that vouches for it and
//! the API token to use (written by `cohort up`, read by every other command).
//!
//! A profile holds a secret, so its errors name the file, the line and the key, and never
//! quote a value from it.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The proxy, host:port.
    pub endpoint: String,
    /// The federation CA certificate the proxy's certificate must chain to.
    /// Absent: plaintext (only for a proxy started with --insecure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// The API token (a secret: the file is written mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("endpoint", &self.endpoint)
            .field("ca_cert", &self.ca_cert)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A profile file that cannot be used: where, and what is wrong, without its values.
#[derive(Debug)]
pub struct ProfileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    /// The key at fault, when known (and one that may be shown).
    pub key: Option<String>,
    pub problem: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "profile {}", self.path.display())?;
        match (self.line, &self.key) {
            (Some(line), Some(key)) => write!(f, ": line {line}, key `{key}`")?,
            (Some(line), None) => write!(f, ": line {line}")?,
            (None, Some(key)) => write!(f, ": key `{key}`")?,
            (None, None) => {}
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ProfileError {}

const KEYS: [&str; 3] = ["endpoint", "ca_cert", "token"];

/// Longest unknown key an error repeats: a longer one may be a pasted secret.
const MAX_SHOWN_KEY_LEN: usize = 24;

/// `$XDG_CONFIG_HOME/cohort/profile.toml` (or `~/.config/cohort/profile.toml`).
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("cohort").join("profile.toml"))
}

impl Profile {
    pub fn load(path: &Path) -> anyhow::Result<Profile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read profile {}", path.display()))?;
        let error = |key: &str, problem: String| ProfileError {
            path: path.to_path_buf(),
            line: key_line(&text, key),
            key: Some(key.to_string()),
            problem,
        };
        let p = Profile::parse(&text).map_err(|(line, key, problem)| ProfileError {
            path: path.to_path_buf(),
            line,
            key,
            problem,
        })?;
        if let Err(e) = cohort_runtime::lazy_channel(&p.endpoint) {
            return Err(error("endpoint", e.to_string()).into());
        }
        if let Some(token) = &p.token
            && let Err(e) = cohort_security::ApiToken::parse(token)
        {
            return Err(error("token", e.to_string()).into());
        }
        Ok(p)
    }

    /// Reads a profile's TOML: (line, key, problem) when it cannot.
    fn parse(text: &str) -> Result<Profile, (Option<usize>, Option<String>, String)> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e.span().map(|s| line_of(text, s.start));
            // Name the key of the broken line only if it is one of ours: the line is broken,
            // so what looks like a key may be anything, a token included.
            let key = line
                .and_then(|l| text.lines().nth(l - 1))
                .and_then(|l| KEYS.into_iter().find(|k| starts_with_key(l, k)))
                .map(str::to_string);
            (line, key, format!("not valid TOML: {}", scrub(e.message())))
        })?;
        let mut profile = Profile {
            endpoint: String::new(),
            ca_cert: None,
            token: None,
        };
        for (key, value) in &table {
            let line = key_line(text, key);
            let Some(known) = KEYS.into_iter().find(|k| k == key) else {
                let shown = (key.len() <= MAX_SHOWN_KEY_LEN).then(|| key.clone());
                let problem = format!("unknown key (expected one of {})", KEYS.join(", "));
                return Err((line, shown, problem));
            };
            let Some(value) = value.as_str() else {
                let problem = format!("must be a string, not {}", value.type_str());
                return Err((line, Some(known.to_string()), problem));
            };
            match known {
                "endpoint" => profile.endpoint = value.to_string(),
                "ca_cert" => profile.ca_cert = Some(PathBuf::from(value)),
                _ => profile.token = Some(value.to_string()),
            }
        }
        if !table.contains_key("endpoint") {
            return Err((None, Some("endpoint".into()), "is missing".into()));
        }
        Ok(profile)
    }

    /// Writes the profile readable by its owner only: it holds a token.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self)?;
        cohort_security::write_key(path, &text)
            .with_context(|| format!("cannot write profile {}", path.display()))?;
        Ok(())
    }

    /// `--profile`, else `COHORT_PROFILE` (clap fills both into `explicit`), else the default.
    pub fn resolve(explicit: Option<&Path>) -> anyhow::Result<Profile> {
        Profile::load(&Profile::resolve_path(explicit)?)
    }

    /// Which profile file `resolve` reads.
    pub fn resolve_path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => default_path().context("no profile: pass --profile or set COHORT_PROFILE")?,
        };
        if !path.exists() && explicit.is_none() {
            anyhow::bail!(
                "no profile at {}: start a federation with `cohort up`, or pass --profile",
                path.display()
            );
        }
        Ok(path)
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Whether `line` assigns `key` (bare or quoted), e.g. `token = ...` or `"token"=...`.
fn starts_with_key(line: &str, key: &str) -> bool {
    let line = line.trim_start();
    let rest = [
        line.strip_prefix(key),
        line.strip_prefix(&format!("\"{key}\"")),
        line.strip_prefix(&format!("'{key}'")),
    ]
    .into_iter()
    .flatten()
    .next();
    rest.is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t', '=']))
}

/// The 1-based line where `key` is assigned.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| starts_with_key(l, key))
        .map(|i| i + 1)
}

/// The parser's words, without any quoted text longer than a token of syntax: it may be
/// from the file.
fn scrub(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    let mut out = String::new();
    let mut rest = first;
    while let Some(open) = rest.find(['`', '"', '\'']) {
        let quote = rest[open..].chars().next().unwrap_or('`');
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(quote) {
            Some(close) if close <= 2 => {
                out.push_str(&rest[open..open + close + 2]);
                rest = &after[close + 1..];
            }
            Some(close) => {
                out.push_str("`…`");
                rest = &after[close + 1..];
            }
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "cohort_S3cr3tT0kenValueThatMustNeverBeShown0123456789";

    /// Loads `text` as a profile file (inside a runtime: loading checks the endpoint by
    /// making a channel) and returns the error's text.
    fn load_err(text: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profile.toml");
        std::fs::write(&path, text).expect("write");
        let e = Profile::load(&path).expect_err("refused");
        let shown = format!("{e:#} {e:?}");
        assert!(shown.contains(path.to_str().expect("path")), "{shown}");
        format!("{e:#}")
    }

    #[tokio::test]
    async fn broken_lines_name_file_line_and_key_but_never_the_value() {
        let cases = [
            (
                format!("endpoint = \"127.0.0.1:7070\"\ntoken = {TOKEN}\n"),
                2,
            ),
            (
                format!("endpoint = \"127.0.0.1:7070\"\ntoken = \"{TOKEN}\n"),
                2,
            ),
            (format!("endpoint = \"127.0.0.1:7070\"\ntoken {TOKEN}\n"), 2),
            (
                format!("endpoint = \"127.0.0.1:7070\"\n\ntoken = '{TOKEN}' x\n"),
                3,
            ),
            (
                format!("token = [\"{TOKEN}\"]\nendpoint = \"127.0.0.1:7070\"\n"),
                1,
            ),
            (
                format!(
                    "endpoint = \"127.0.0.1:7070\"\ntoken = \"{TOKEN}\" # x\ntoken = \"{TOKEN}\"\n"
                ),
                3,
            ),
        ];
        for (text, line) in cases {
            let e = load_err(&text);
            assert!(!e.contains("S3cr3t"), "the token leaked: {e}");
            assert!(e.contains(&format!("line {line}, key `token`")), "{e}");
        }
    }

    #[tokio::test]
    async fn a_pasted_secret_is_not_repeated_as_a_key() {
        let e = load_err(&format!("endpoint = \"127.0.0.1:7070\"\n{TOKEN}\n"));
        assert!(!e.contains("S3cr3t"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = load_err(&format!("endpoint = \"127.0.0.1:7070\"\n{TOKEN} = 1\n"));
        assert!(!e.contains("S3cr3t"), "{e}");
        assert!(e.contains("line 2: unknown key"), "{e}");
        let e = load_err("endpoint = \"127.0.0.1:7070\"\ntokn = \"x\"\n");
        assert!(e.contains("line 2, key `tokn`: unknown key"), "{e}");
    }

    #[tokio::test]
    async fn bad_values_are_refused_without_being_quoted() {
        let e = load_err("endpoint = \"127.0.0.1:7070\"\ntoken = \"cohort_short\"\n");
        assert!(e.contains("line 2, key `token`"), "{e}");
        assert!(!e.contains("cohort_short"), "{e}");
        let e = load_err("token = 12345678901\nendpoint = \"127.0.0.1:7070\"\n");
        assert!(e.contains("line 1, key `token`: must be a string"), "{e}");
        assert!(!e.contains("12345678901"), "{e}");
        let e = load_err("ca_cert = \"ca.crt\"\n");
        assert!(e.contains("key `endpoint`: is missing"), "{e}");
    }

    #[tokio::test]
    async fn a_good_profile_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profile.toml");
        let p = Profile {
            endpoint: "127.0.0.1:7070".into(),
            ca_cert: Some(dir.path().join("ca.crt")),
            token: Some(cohort_security::ApiToken::generate().expose().to_string()),
        };
        p.save(&path).expect("save");
        assert_eq!(Profile::load(&path).expect("load"), p);
    }
}
