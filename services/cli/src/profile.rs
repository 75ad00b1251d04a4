//! Profiles: where the federation's proxy is (written by `cohort up`, read by
//! every other command).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The proxy, host:port.
    pub endpoint: String,
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
        Ok(p)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = toml::to_string(self)?;
        cohort_runtime::write_atomic(path, text.as_bytes())?;
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
