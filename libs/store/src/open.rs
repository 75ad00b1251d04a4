//! Opening a store by URL: `sqlite:` (embedded), `postgres://` /
//! `postgresql://` and `mongodb://` / `mongodb+srv://`.
//!
//! URLs carry passwords, so every message or log line that names a database
//! goes through [`redact_url`]. Every store opened here is wrapped in
//! [`Measured`], so every service's store calls show on `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use crate::clients::{ClientStore, SqliteClientStore};
use crate::jobs::{JobStore, SqliteJobStore};
use crate::measured::{Measured, Pool};
use crate::models::{ModelStore, SqliteModelStore};
use crate::postgres::{PgClientStore, PgJobStore, PgModelStore};
use crate::{Result, StoreError};

/// Connection pool settings, exposed by every service as flags.
#[derive(Debug, Clone)]
pub struct DatabaseOptions {
    /// Most connections one store's pool holds open.
    pub max_connections: u32,
    /// How long opening a store may try to reach its database.
    pub connect_timeout: Duration,
    /// How long a call may wait for a pooled connection (including
    /// reconnecting) before it fails with `Unavailable`.
    pub acquire_timeout: Duration,
}

impl Default for DatabaseOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            connect_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

impl DatabaseOptions {
    /// `max_connections`, and one timeout both for opening and for waiting on
    /// a pooled connection (the services' `--database-connect-timeout`).
    pub fn new(max_connections: u32, connect_timeout: Duration) -> Self {
        Self {
            max_connections,
            connect_timeout,
            acquire_timeout: connect_timeout,
        }
    }
}

const ACCEPTED: &str =
    "expected sqlite://PATH, postgres://, postgresql://, mongodb:// or mongodb+srv://";

enum Backend {
    Sqlite,
    Postgres,
    Mongo,
}

fn backend(url: &str) -> Result<Backend> {
    let lower = url.get(..14).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else if lower.starts_with("mongodb://") || lower.starts_with("mongodb+srv://") {
        Ok(Backend::Mongo)
    } else {
        Err(StoreError::InvalidUrl {
            url: redact_url(url),
            message: ACCEPTED.to_string(),
        })
    }
}

/// Opens job-scheduler's store at `url`, applying its migrations.
pub async fn open_job_store(url: &str, opts: &DatabaseOptions) -> Result<Arc<dyn JobStore>> {
    let (inner, backend, pool): (Arc<dyn JobStore>, _, _) = match backend(url)? {
        Backend::Sqlite => {
            let s = SqliteJobStore::open_with(url, opts).await?;
            let pool = Pool::Sqlite(s.pool.clone());
            (Arc::new(s), "sqlite", Some(pool))
        }
        Backend::Postgres => {
            let s = PgJobStore::open(url, opts).await?;
            let pool = Pool::Postgres(s.pool.clone());
            (Arc::new(s), "postgres", Some(pool))
        }
        Backend::Mongo => (
            crate::mongo::open_job_store(url, opts).await?,
            "mongodb",
            None,
        ),
    };
    Ok(Arc::new(Measured::new(inner, backend, "jobs", pool)))
}

/// Opens model-manager's store at `url`, applying its migrations.
pub async fn open_model_store(url: &str, opts: &DatabaseOptions) -> Result<Arc<dyn ModelStore>> {
    let (inner, backend, pool): (Arc<dyn ModelStore>, _, _) = match backend(url)? {
        Backend::Sqlite => {
            let s = SqliteModelStore::open_with(url, opts).await?;
            let pool = Pool::Sqlite(s.pool.clone());
            (Arc::new(s), "sqlite", Some(pool))
        }
        Backend::Postgres => {
            let s = PgModelStore::open(url, opts).await?;
            let pool = Pool::Postgres(s.pool.clone());
            (Arc::new(s), "postgres", Some(pool))
        }
        Backend::Mongo => (
            crate::mongo::open_model_store(url, opts).await?,
            "mongodb",
            None,
        ),
    };
    Ok(Arc::new(Measured::new(inner, backend, "models", pool)))
}

/// Opens client-selector's store at `url`, applying its migrations.
pub async fn open_client_store(url: &str, opts: &DatabaseOptions) -> Result<Arc<dyn ClientStore>> {
    let (inner, backend, pool): (Arc<dyn ClientStore>, _, _) = match backend(url)? {
        Backend::Sqlite => {
            let s = SqliteClientStore::open_with(url, opts).await?;
            let pool = Pool::Sqlite(s.pool.clone());
            (Arc::new(s), "sqlite", Some(pool))
        }
        Backend::Postgres => {
            let s = PgClientStore::open(url, opts).await?;
            let pool = Pool::Postgres(s.pool.clone());
            (Arc::new(s), "postgres", Some(pool))
        }
        Backend::Mongo => (
            crate::mongo::open_client_store(url, opts).await?,
            "mongodb",
            None,
        ),
    };
    Ok(Arc::new(Measured::new(inner, backend, "clients", pool)))
}

/// Query parameters whose values are secrets.
fn secret_param(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.contains("token")
        || key == "authmechanismproperties"
}

/// The URL with any password replaced by "***", for logs and errors.
///
/// Also hides secret query parameters (`?password=...`). Works on malformed
/// URLs too, erring towards hiding more: a message must never show a password.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // No authority (`sqlite:path`, `sqlite::memory:`): only parameters.
        return redact_query(url);
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    // The userinfo ends at the last '@' of the authority. A password with an
    // unescaped '/', '?' or '#' makes the authority look shorter: then take the
    // last '@' anywhere, hiding too much rather than too little.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end]
        .rfind('@')
        .or_else(|| rest.rfind('@').filter(|&i| rest[..i].contains(':')));
    let Some(at) = at else {
        return format!("{scheme}{}", redact_query(rest));
    };
    let (userinfo, host_and_more) = rest.split_at(at);
    let userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_string(),
    };
    format!("{scheme}{userinfo}{}", redact_query(host_and_more))
}

fn redact_query(s: &str) -> String {
    let Some(q) = s.find('?') else {
        return s.to_string();
    };
    let (head, query) = s.split_at(q + 1);
    let (query, fragment) = match query.find('#') {
        Some(h) => query.split_at(h),
        None => (query, ""),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if secret_param(k) => format!("{k}=***"),
            _ => p.to_string(),
        })
        .collect();
    format!("{head}{}{fragment}", params.join("&"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        for (url, want) in [
            (
                "postgres://cohort:s3cret@db:5432/cohort",
                "postgres://cohort:***@db:5432/cohort",
            ),
            ("postgres://cohort@db/cohort", "postgres://cohort@db/cohort"),
            ("postgres://db/cohort", "postgres://db/cohort"),
            (
                "postgresql://u:p%40ss@db/x?sslmode=disable&password=two",
                "postgresql://u:***@db/x?sslmode=disable&password=***",
            ),
            (
                "mongodb://admin:pw@h1:27017,h2:27017/db?replicaSet=rs0",
                "mongodb://admin:***@h1:27017,h2:27017/db?replicaSet=rs0",
            ),
            (
                "mongodb+srv://u:pw@cluster.example.com/?authMechanismProperties=AWS_SESSION_TOKEN:t",
                "mongodb+srv://u:***@cluster.example.com/?authMechanismProperties=***",
            ),
            // Unescaped '@' and '/' in the password: still hidden.
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            ("postgres://u:pa/ss@db/x", "postgres://u:***@db/x"),
            (
                "sqlite:///var/lib/cohort/jobs.db",
                "sqlite:///var/lib/cohort/jobs.db",
            ),
            ("sqlite::memory:", "sqlite::memory:"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "redacting {url}");
        }
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused_without_the_password() {
        let opts = DatabaseOptions::default();
        for url in ["mysql://root:hunter2@db/x", "db.example.com", ""] {
            let err = match open_job_store(url, &opts).await {
                Err(e) => e,
                Ok(_) => panic!("{url} opened"),
            };
            let text = err.to_string();
            assert!(matches!(err, StoreError::InvalidUrl { .. }), "{text}");
            assert!(
                text.contains("postgres://") && text.contains("sqlite://"),
                "{text}"
            );
            assert!(!text.contains("hunter2"), "{text}");
        }
        let err = open_client_store("postgres://u:hunter2@db:notaport/x", &opts)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn mongodb_urls_dispatch_to_the_mongodb_backend() {
        let opts = DatabaseOptions {
            connect_timeout: Duration::from_secs(2),
            ..DatabaseOptions::default()
        };
        let err = open_model_store("mongodb://u:hunter2@127.0.0.1:1/x", &opts)
            .await
            .err()
            .unwrap();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
