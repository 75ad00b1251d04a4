//! PostgreSQL implementations of the store traits (`postgres://` URLs).
//!
//! Each store applies its own migrations (history in `_sqlx_migrations_jobs`,
//! `_models`, `_clients`), so the three services may share one database.
//! Pools check a connection before handing it out, so after the server
//! restarts or drops sessions the stores reconnect by themselves; meanwhile
//! calls fail with `StoreError::Unavailable`.

mod audit;
mod clients;
mod jobs;
mod models;
mod tokens;

pub use clients::PgClientStore;
pub use jobs::PgJobStore;
pub use models::PgModelStore;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use tokio::time::Instant;

use crate::{DatabaseOptions, Result, StoreError, redact_url};

/// Reaches the database at `url` within `opts.connect_timeout`, applies
/// `migrator` and returns a pool for the store.
pub(crate) async fn open_pool(
    url: &str,
    migrator: &Migrator,
    opts: &DatabaseOptions,
) -> Result<PgPool> {
    let connect = PgConnectOptions::from_str(url).map_err(|e| StoreError::InvalidUrl {
        url: redact_url(url),
        message: e.to_string(),
    })?;
    // Reach the server first, for an error that says why it cannot be.
    let conn = connect_within(url, &connect, opts.connect_timeout).await?;
    let _ = conn.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(opts.max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(opts.acquire_timeout)
        // A ping before each use keeps connections the server dropped from
        // being handed out: the pool opens a fresh one instead.
        .test_before_acquire(true)
        .connect_lazy_with(connect);
    // sqlx's PostgreSQL migrator holds pg_advisory_lock (keyed by the database
    // name) while it migrates, so replicas starting together apply each
    // migration once. A failed run skips the unlock: closing the pool ends
    // the session that holds the lock.
    if let Err(e) = migrator.run(&pool).await {
        pool.close().await;
        return Err(StoreError::Unavailable(format!(
            "migrating {}: {e}",
            redact_url(url)
        )));
    }
    Ok(pool)
}

/// One connection, retrying while the server refuses or is starting up, for
/// at most `timeout`.
async fn connect_within(
    url: &str,
    connect: &PgConnectOptions,
    timeout: Duration,
) -> Result<PgConnection> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(50);
    let mut last: Option<String> = None;
    loop {
        match tokio::time::timeout_at(deadline, PgConnection::connect_with(connect)).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) if retry_connect(&e) => last = Some(e.to_string()),
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to {}: {e}",
                    redact_url(url)
                )));
            }
            Err(_) => break,
        }
        let now = Instant::now();
        if now + backoff >= deadline {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    Err(StoreError::Unavailable(format!(
        "cannot connect to {} within {timeout:?}: {}",
        redact_url(url),
        last.as_deref().unwrap_or("no answer")
    )))
}

/// Refused connections and a server starting up or full may pass soon.
fn retry_connect(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("53300") | Some("57P03"))
        }
        _ => false,
    }
}

/// The migrator of one store, recording its history in `table`.
pub(crate) fn with_history_table(mut migrator: Migrator, table: &'static str) -> Migrator {
    migrator.dangerous_set_table_name(table);
    migrator
}

pub(crate) fn column<'r, T>(row: &'r PgRow, field: &str, what: &'static str, id: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(field).map_err(|e| StoreError::Corrupt {
        what,
        id: id.to_string(),
        message: format!("column {field}: {e}"),
    })
}

pub(crate) use crate::to_i64;
