//! Profiles: where the federation's proxy is, the CA that vouches for it and
//! the API token to use (written by `cohort up`, read by every other command).

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
        let p: Profile =
            toml::from_str(&text).with_context(|| format!("profile {}", path.display()))?;
        cohort_runtime::lazy_channel(&p.endpoint)
            .with_context(|| format!("profile {}: endpoint", path.display()))?;
        if let Some(token) = &p.token {
            cohort_security::ApiToken::parse(token)
                .with_context(|| format!("profile {}: token", path.display()))?;
        }
        Ok(p)
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
        Profile::load(&path)
    }
}
