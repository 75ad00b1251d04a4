//! Opening SQLite databases from `sqlite://` URLs.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::{Result, StoreError};

/// Opens (creating if missing) the database at `url` (`sqlite://PATH` or
/// `sqlite::memory:`) in WAL mode, and applies `migrator`.
pub async fn open_sqlite(url: &str, migrator: &sqlx::migrate::Migrator) -> Result<SqlitePool> {
    if !url.starts_with("sqlite:") {
        return Err(StoreError::InvalidUrl {
            url: url.to_string(),
            message: "expected sqlite://PATH".to_string(),
        });
    }
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::InvalidUrl {
            url: url.to_string(),
            message: e.to_string(),
        })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let in_memory = url.contains(":memory:");
    let pool = SqlitePoolOptions::new()
        // One connection for in-memory databases: each connection would see its own.
        .max_connections(if in_memory { 1 } else { 4 })
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot open {url}: {e}")))?;
    migrator.run(&pool).await?;
    Ok(pool)
}
