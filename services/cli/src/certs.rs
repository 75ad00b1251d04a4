//! `cohort cert`: the federation CA and the certificates of parties and
//! services, written as PEM files (keys mode 0600). Works offline.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use cohort_security::{CertAuthority, CertifiedKey, Validity};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create the federation CA (ca.crt, ca.key) in --dir.
    Init {
        /// Where to write ca.crt and ca.key.
        #[arg(long, default_value = "cohort-pki")]
        dir: PathBuf,
        /// How long the CA is valid.
        #[arg(long, default_value = "3650days", value_parser = humantime::parse_duration)]
        validity: std::time::Duration,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a party or a service certificate signed by the CA in --dir.
    Issue {
        /// A party (a client side): the certificate is its identity.
        #[arg(long, conflicts_with = "service", required_unless_present = "service")]
        party: Option<String>,
        /// A server-side service (proxy, job-scheduler, ...): serves and dials.
        #[arg(long)]
        service: Option<String>,
        /// DNS names or IP addresses the service is reached at (repeatable).
        #[arg(long, requires = "service")]
        dns: Vec<String>,
        /// The CA's directory; the new files go there too unless --out says otherwise.
        #[arg(long, default_value = "cohort-pki")]
        dir: PathBuf,
        /// Where to write NAME.crt and NAME.key.
        #[arg(long)]
        out: Option<PathBuf>,
        /// How long the certificate is valid.
        #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
        validity: std::time::Duration,
    },
}

pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// Writes `name.crt` and `name.key` into `dir`; returns their paths.
pub fn write_pair(
    dir: &Path,
    name: &str,
    pair: &CertifiedKey,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    cohort_security::write_cert(&cert, &pair.cert_pem)?;
    cohort_security::write_key(&key, &pair.key_pem)?;
    Ok((cert, key))
}

/// Creates the CA in `dir`, or loads the one there.
pub fn init_or_load_ca(dir: &Path, validity: std::time::Duration) -> anyhow::Result<CertAuthority> {
    let (cert, key) = ca_paths(dir);
    if cert.exists() || key.exists() {
        return CertAuthority::load(&cert, &key).context("the existing CA");
    }
    let ca = CertAuthority::generate("Cohort federation CA", Validity::for_duration(validity))?;
    cohort_security::write_cert(&cert, ca.cert_pem())?;
    cohort_security::write_key(&key, ca.key_pem())?;
    Ok(ca)
}

pub fn run(cmd: CertCommand, json: bool) -> anyhow::Result<i32> {
    match cmd {
        CertCommand::Init {
            dir,
            validity,
            force,
        } => {
            let (cert, key) = ca_paths(&dir);
            if (cert.exists() || key.exists()) && !force {
                bail!(
                    "{} already holds a CA; pass --force to replace it (certificates it issued stop being trusted)",
                    dir.display()
                );
            }
            let ca =
                CertAuthority::generate("Cohort federation CA", Validity::for_duration(validity))?;
            cohort_security::write_cert(&cert, ca.cert_pem())?;
            cohort_security::write_key(&key, ca.key_pem())?;
            if json {
                println!("{}", json!({"ca_cert": cert, "ca_key": key}));
            } else {
                println!("CA certificate: {}", cert.display());
                println!(
                    "CA key:         {} (keep it offline if you can)",
                    key.display()
                );
            }
        }
        CertCommand::Issue {
            party,
            service,
            dns,
            dir,
            out,
            validity,
        } => {
            let (cert, key) = ca_paths(&dir);
            let ca = CertAuthority::load(&cert, &key).with_context(|| {
                format!("--dir {}: run `cohort cert init` first", dir.display())
            })?;
            let validity = Validity::for_duration(validity);
            let (name, pair) = match (party, service) {
                (Some(p), None) => {
                    let pair = ca.issue_party(&p, validity).context("--party")?;
                    (p, pair)
                }
                (None, Some(s)) => {
                    if dns.is_empty() {
                        bail!("--dns: a service needs at least one DNS name or IP address");
                    }
                    let pair = ca.issue_service(&s, &dns, validity).context("--service")?;
                    (s, pair)
                }
                _ => bail!("pass exactly one of --party and --service"),
            };
            let out = out.unwrap_or(dir);
            let (cert, key) = write_pair(&out, &name, &pair)?;
            if json {
                println!("{}", json!({"name": name, "cert": cert, "key": key}));
            } else {
                println!("certificate: {}", cert.display());
                println!("key:         {} (mode 0600)", key.display());
            }
        }
    }
    Ok(0)
}
