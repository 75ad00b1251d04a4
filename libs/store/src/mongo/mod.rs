//! MongoDB implementations of the store traits (`mongodb://` and
//! `mongodb+srv://` URLs; the database is the URL's path, `cohort` if none).
//!
//! No multi-document transactions: they need a replica set, and one code path
//! that works on a standalone server too is easier to trust. Instead every
//! change that must be atomic is one single-document write:
//!
//! - A job's transition and its event are one update of the job document: the
//!   event goes into the document's `pending_events` (with `event_seq`, its
//!   per-job number, in the same write) and is then copied to `job_events` and
//!   pulled out. A crash between leaves it pending; readers merge both places
//!   and the next write to the job (or the next open) copies it out. Rounds
//!   work the same way (`rounds_done` and `pending_rounds` in the job
//!   document), which also makes `record_round` idempotent and atomic.
//! - Events and rounds point at the job document's `_id`, not at the job id,
//!   so history a crashed `delete_job` left behind never shows up under a job
//!   later created with the same id.
//! - Job `seq` (insertion order, for keyset paging) comes from a counter
//!   document (`counters`, `$inc`); model versions are `latest + 1` guarded by
//!   the unique `(namespace, name, version)` index, retried when a concurrent
//!   insert took the number, so numbering has no gaps even when a write fails.
//!   A job's round is claimed the same way, by a partial unique
//!   `(namespace, name, job_id, round)` index: the insert that loses finds the
//!   winner's version. Versions from before carry a `round_duplicate` flag
//!   given at open (true for later copies of a round, kept outside the index).
//! - A model is identified by `(namespace, name)` (unique indexes on both
//!   collections; the name-only indexes of older databases are dropped at
//!   open). Documents from before namespaces are given `default` at open (and
//!   read as such).
//! - API tokens are one document each (`api_tokens`, unique `id` and
//!   `sha256`); `ensure_token` is an upsert keyed by the hash.
//! - Audit entries are one document each (`audit_log`), numbered by the
//!   `audit_log` counter document (unique `seq`). Numbers are taken before the
//!   insert, so a listing racing two appends may see the later one first; the
//!   entry it missed is still listed by a listing that starts after it.
//! - A revocation is an upsert that matches only an unrevoked party (or
//!   creates one); on a revoked party it fails on the unique index and the
//!   first revocation stays.
//!
//! Integers are stored as 64-bit (`u64` values beyond `i64::MAX` are refused;
//! reads also take doubles holding an exact integer), floats as doubles (NaN
//! included). Listings by name are sorted bytewise here, as SQLite's, whatever
//! collation a collection was given.

mod audit;
mod clients;
mod jobs;
mod models;
mod tokens;

pub use clients::MongoClientStore;
pub use jobs::MongoJobStore;
pub use models::MongoModelStore;

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::oid::ObjectId;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, ConnectionString, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use tokio::time::Instant;

use crate::clients::ClientStore;
use crate::jobs::JobStore;
use crate::models::ModelStore;
use crate::open::DatabaseOptions;
use crate::{Result, StoreError, redact_url};

/// The database used when the URL names none.
pub const DEFAULT_DATABASE: &str = "cohort";

/// Opens job-scheduler's store at `url`, creating its collections and indexes.
pub async fn open_job_store(url: &str, opts: &DatabaseOptions) -> Result<Arc<dyn JobStore>> {
    Ok(Arc::new(MongoJobStore::open(url, opts).await?))
}

/// Opens model-manager's store at `url`, creating its collections and indexes.
pub async fn open_model_store(url: &str, opts: &DatabaseOptions) -> Result<Arc<dyn ModelStore>> {
    Ok(Arc::new(MongoModelStore::open(url, opts).await?))
}

/// Opens client-selector's store at `url`, creating its collections and indexes.
pub async fn open_client_store(url: &str, opts: &DatabaseOptions) -> Result<Arc<dyn ClientStore>> {
    Ok(Arc::new(MongoClientStore::open(url, opts).await?))
}

/// Parses `url` without touching the network: the connection string and the
/// database it names (`cohort` if none).
pub(crate) fn parse_url(url: &str) -> Result<(ConnectionString, String)> {
    let conn = ConnectionString::parse(url).map_err(|e| StoreError::InvalidUrl {
        url: redact_url(url),
        // The driver's messages name what is wrong, never the password;
        // scrub anyway in case one day they quote it.
        message: Secret::of_url(url).scrub(e.kind.to_string()),
    })?;
    let name = conn
        .default_database
        .clone()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE.to_string());
    Ok((conn, name))
}

/// A password to keep out of messages.
#[derive(Clone, Default)]
pub(crate) struct Secret(Option<String>);

impl Secret {
    fn of_conn(conn: &ConnectionString) -> Self {
        Secret(
            conn.credential
                .as_ref()
                .and_then(|c| c.password.clone())
                .filter(|p| !p.is_empty()),
        )
    }

    /// Best effort for URLs the driver refuses: the text between the last ':'
    /// of the userinfo and its '@'.
    fn of_url(url: &str) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let userinfo = rest.rfind('@').map_or("", |at| &rest[..at]);
        Secret(
            userinfo
                .split_once(':')
                .map(|(_, p)| p.to_string())
                .filter(|p| !p.is_empty()),
        )
    }

    pub(crate) fn scrub(&self, message: String) -> String {
        match &self.0 {
            Some(p) if message.contains(p.as_str()) => message.replace(p.as_str(), "***"),
            _ => message,
        }
    }
}

/// An open database, with what its error messages need.
pub(crate) struct Db {
    database: Database,
    /// The URL with its password hidden.
    url: String,
    secret: Secret,
}

impl Db {
    /// Connects to `url` and checks, within `opts.connect_timeout`, that the
    /// server answers.
    pub(crate) async fn open(url: &str, opts: &DatabaseOptions) -> Result<Db> {
        let redacted = redact_url(url);
        let (conn, name) = parse_url(url)?;
        let secret = Secret::of_conn(&conn);
        let deadline = Instant::now() + opts.connect_timeout;
        // Parsing resolves mongodb+srv:// names, so it is bounded too.
        let mut options = match tokio::time::timeout_at(deadline, ClientOptions::parse(conn)).await
        {
            Ok(Ok(options)) => options,
            Ok(Err(e)) if matches!(*e.kind, ErrorKind::InvalidArgument { .. }) => {
                return Err(StoreError::InvalidUrl {
                    url: redacted,
                    message: secret.scrub(describe(&e)),
                });
            }
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot resolve {redacted}: {}",
                    secret.scrub(describe(&e))
                )));
            }
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot resolve {redacted} within {:?}",
                    opts.connect_timeout
                )));
            }
        };
        options.max_pool_size = Some(opts.max_connections.max(1));
        options.connect_timeout = Some(opts.connect_timeout);
        // How long an operation waits for a usable server: the pool's
        // acquire timeout in the SQL backends.
        options.server_selection_timeout = Some(opts.acquire_timeout);
        let client = Client::with_options(options).map_err(|e| StoreError::InvalidUrl {
            url: redacted.clone(),
            message: secret.scrub(describe(&e)),
        })?;
        let db = Db {
            database: client.database(&name),
            url: redacted,
            secret,
        };
        db.ping(deadline, opts.connect_timeout).await?;
        Ok(db)
    }

    /// Pings until the server answers, an error says waiting is useless, or
    /// `deadline` passes.
    async fn ping(&self, deadline: Instant, timeout: Duration) -> Result<()> {
        let mut last: Option<String> = None;
        loop {
            let ping = self.database.run_command(doc! {"ping": 1});
            match tokio::time::timeout_at(deadline, ping).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if is_transient(&e) => last = Some(self.secret.scrub(describe(&e))),
                Ok(Err(e)) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot open {}: {}",
                        self.url,
                        self.secret.scrub(describe(&e))
                    )));
                }
                Err(_) => break,
            }
            if Instant::now() + Duration::from_millis(100) >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(StoreError::Unavailable(format!(
            "cannot reach {} within {timeout:?}: {}",
            self.url,
            last.as_deref().unwrap_or("no answer")
        )))
    }

    pub(crate) fn collection(&self, name: &str) -> Collection<Document> {
        self.database.collection(name)
    }

    /// Creates collection `name` if missing, and its indexes (`true`: unique).
    /// Both are idempotent, so replicas may open the same database at once.
    pub(crate) async fn ensure_collection(
        &self,
        name: &str,
        indexes: &[(Document, bool)],
    ) -> Result<()> {
        const NAMESPACE_EXISTS: i32 = 48;
        match self.database.create_collection(name).await {
            Ok(()) => {}
            Err(e) if matches!(&*e.kind, ErrorKind::Command(c) if c.code == NAMESPACE_EXISTS) => {}
            Err(e) => return Err(self.setup_error(e, &format!("creating collection {name}"))),
        }
        let coll = self.collection(name);
        for (keys, unique) in indexes {
            // No options at all on plain indexes, so the spec matches one
            // created by hand with the same keys.
            let options = unique.then(|| IndexOptions::builder().unique(true).build());
            let model = IndexModel::builder()
                .keys(keys.clone())
                .options(options)
                .build();
            coll.create_index(model)
                .await
                .map_err(|e| self.setup_error(e, &format!("creating index {keys} on {name}")))?;
        }
        Ok(())
    }

    fn setup_error(&self, e: MongoError, doing: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "{doing} in {}: {}",
            self.url,
            self.secret.scrub(describe(&e))
        ))
    }

    /// The store error for `e`, met while working on record `what` `id`.
    pub(crate) fn error(&self, e: MongoError, what: &'static str, id: &str) -> StoreError {
        map_error(&e, what, id, &self.secret)
    }
}

/// Duplicate key: 11000, and the codes older servers and mongos used.
const DUPLICATE_KEY: [i32; 3] = [11000, 11001, 12582];

pub(crate) fn is_duplicate_key(e: &MongoError) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => DUPLICATE_KEY.contains(&w.code),
        ErrorKind::Command(c) => DUPLICATE_KEY.contains(&c.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|ws| !ws.is_empty() && ws.iter().all(|w| DUPLICATE_KEY.contains(&w.code))),
        _ => false,
    }
}

/// Worth waiting for at open: no server selectable yet, or the network.
fn is_transient(e: &MongoError) -> bool {
    matches!(
        &*e.kind,
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
    )
}

/// Duplicate keys are conflicts, undecodable documents corrupt records; the
/// rest (network, server selection, server errors) may pass on a retry.
pub(crate) fn map_error(
    e: &MongoError,
    what: &'static str,
    id: &str,
    secret: &Secret,
) -> StoreError {
    let message = secret.scrub(describe(e));
    if is_duplicate_key(e) {
        return StoreError::Conflict(format!("{what} {id}: {message}"));
    }
    match &*e.kind {
        ErrorKind::BsonDeserialization(_) => StoreError::Corrupt {
            what,
            id: id.to_string(),
            message,
        },
        _ => StoreError::Unavailable(format!("{what} {id}: {message}")),
    }
}

/// The error without the driver's label and server-response dump.
fn describe(e: &MongoError) -> String {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => format!(
            "write error {} ({}): {}",
            w.code,
            w.code_name.as_deref().unwrap_or("?"),
            w.message
        ),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => format!(
            "write concern error {} ({}): {}",
            w.code, w.code_name, w.message
        ),
        kind => kind.to_string(),
    }
}

pub(crate) use crate::to_i64;

/// Typed reads of a stored document; failures are `Corrupt`, naming the
/// record and the field.
pub(crate) struct Fields<'a> {
    doc: &'a Document,
    what: &'static str,
    id: &'a str,
    /// Where `doc` sits in its record (`datasets.`), for messages.
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(doc: &'a Document, what: &'static str, id: &'a str) -> Self {
        Fields {
            doc,
            what,
            id,
            prefix: "",
        }
    }

    /// The fields of `doc`, a part of this record at `prefix`.
    pub(crate) fn nested(&self, doc: &'a Document, prefix: &'a str) -> Fields<'a> {
        Fields {
            doc,
            what: self.what,
            id: self.id,
            prefix,
        }
    }

    pub(crate) fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            what: self.what,
            id: self.id.to_string(),
            message,
        }
    }

    fn wrong(&self, field: &str, want: &str, got: &Bson) -> StoreError {
        self.corrupt(format!(
            "{}{field}: expected {want}, found {:?}",
            self.prefix,
            got.element_type()
        ))
    }

    fn get(&self, field: &str) -> Result<&'a Bson> {
        self.doc
            .get(field)
            .ok_or_else(|| self.corrupt(format!("{}{field} is missing", self.prefix)))
    }

    pub(crate) fn str(&self, field: &str) -> Result<&'a str> {
        match self.get(field)? {
            Bson::String(s) => Ok(s),
            other => Err(self.wrong(field, "a string", other)),
        }
    }

    /// Null and missing are None.
    pub(crate) fn opt_str(&self, field: &str) -> Result<Option<String>> {
        match self.doc.get(field) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong(field, "a string or null", other)),
        }
    }

    pub(crate) fn int(&self, field: &str) -> Result<i64> {
        let v = self.get(field)?;
        int_value(v).ok_or_else(|| self.wrong(field, "an integer", v))
    }

    /// Null and missing are None.
    pub(crate) fn opt_int(&self, field: &str) -> Result<Option<i64>> {
        match self.doc.get(field) {
            None | Some(Bson::Null) => Ok(None),
            Some(v) => int_value(v)
                .map(Some)
                .ok_or_else(|| self.wrong(field, "an integer or null", v)),
        }
    }

    /// A non-negative integer that must fit `T`.
    pub(crate) fn uint<T: TryFrom<i64>>(&self, field: &str) -> Result<T> {
        let v = self.int(field)?;
        self.fit(field, v)
    }

    pub(crate) fn fit<T: TryFrom<i64>>(&self, field: &str, v: i64) -> Result<T> {
        T::try_from(v)
            .map_err(|_| self.corrupt(format!("{}{field} out of range: {v}", self.prefix)))
    }

    /// Doubles (NaN included); integers widen; null reads as NaN.
    pub(crate) fn float(&self, field: &str) -> Result<f64> {
        match self.get(field)? {
            Bson::Double(f) => Ok(*f),
            Bson::Null => Ok(f64::NAN),
            Bson::Int32(i) => Ok(f64::from(*i)),
            Bson::Int64(i) => Ok(*i as f64),
            other => Err(self.wrong(field, "a number", other)),
        }
    }

    /// Null and missing are None; integers widen.
    pub(crate) fn opt_float(&self, field: &str) -> Result<Option<f64>> {
        match self.doc.get(field) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::Double(f)) => Ok(Some(*f)),
            Some(Bson::Int32(i)) => Ok(Some(f64::from(*i))),
            Some(Bson::Int64(i)) => Ok(Some(*i as f64)),
            Some(other) => Err(self.wrong(field, "a number or null", other)),
        }
    }

    /// An array of strings; missing is empty.
    pub(crate) fn strs(&self, field: &str) -> Result<Vec<String>> {
        let items = match self.doc.get(field) {
            None => return Ok(Vec::new()),
            Some(Bson::Array(items)) => items,
            Some(other) => return Err(self.wrong(field, "an array", other)),
        };
        items
            .iter()
            .map(|item| match item {
                Bson::String(s) => Ok(s.clone()),
                other => Err(self.wrong(field, "an array of strings", other)),
            })
            .collect()
    }

    pub(crate) fn oid(&self, field: &str) -> Result<ObjectId> {
        match self.get(field)? {
            Bson::ObjectId(o) => Ok(*o),
            other => Err(self.wrong(field, "an ObjectId", other)),
        }
    }

    pub(crate) fn doc(&self, field: &str) -> Result<&'a Document> {
        match self.get(field)? {
            Bson::Document(d) => Ok(d),
            other => Err(self.wrong(field, "a document", other)),
        }
    }

    /// An array of documents; missing is empty.
    pub(crate) fn docs(&self, field: &str) -> Result<Vec<&'a Document>> {
        let items = match self.doc.get(field) {
            None => return Ok(Vec::new()),
            Some(Bson::Array(items)) => items,
            Some(other) => return Err(self.wrong(field, "an array", other)),
        };
        items
            .iter()
            .map(|item| match item {
                Bson::Document(d) => Ok(d),
                other => Err(self.wrong(field, "an array of documents", other)),
            })
            .collect()
    }

    /// An array of integers; missing is empty.
    pub(crate) fn ints(&self, field: &str) -> Result<Vec<i64>> {
        let items = match self.doc.get(field) {
            None => return Ok(Vec::new()),
            Some(Bson::Array(items)) => items,
            Some(other) => return Err(self.wrong(field, "an array", other)),
        };
        items
            .iter()
            .map(|item| {
                int_value(item).ok_or_else(|| self.wrong(field, "an array of integers", item))
            })
            .collect()
    }
}

/// Int32 and Int64; also doubles holding an exact integer, as documents
/// edited by hand (mongosh writes numbers beyond 32 bits as doubles) or
/// written by other tools may.
fn int_value(v: &Bson) -> Option<i64> {
    /// 2^53: beyond it a double no longer holds every integer.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match v {
        Bson::Int64(i) => Some(*i),
        Bson::Int32(i) => Some(i64::from(*i)),
        Bson::Double(f) if f.fract() == 0.0 && f.abs() <= EXACT => Some(*f as i64),
        _ => None,
    }
}

/// For calls that cannot return `None` (upserts returning the document after).
pub(crate) fn no_document(what: &'static str, id: &str) -> StoreError {
    StoreError::Unavailable(format!("{what} {id}: the server returned no document"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mongo_error(kind: ErrorKind) -> MongoError {
        MongoError::from(kind)
    }

    fn write_error(code: i32, message: &str) -> MongoError {
        let w = mongodb::bson::from_document(doc! {"code": code, "errmsg": message}).unwrap();
        mongo_error(ErrorKind::Write(WriteFailure::WriteError(w)))
    }

    #[test]
    fn database_comes_from_the_url_path() {
        for (url, want) in [
            ("mongodb://db:27017/jobs", "jobs"),
            ("mongodb://db:27017", DEFAULT_DATABASE),
            ("mongodb://db:27017/", DEFAULT_DATABASE),
            (
                "mongodb://u:p@h1,h2/reg?replicaSet=rs0&authSource=admin",
                "reg",
            ),
            ("mongodb://db/?w=majority", DEFAULT_DATABASE),
            ("mongodb://db/my%2Ddb", "my-db"),
        ] {
            let (_, name) = parse_url(url).unwrap();
            assert_eq!(name, want, "{url}");
        }
    }

    #[test]
    fn malformed_urls_are_refused_without_the_password() {
        for url in [
            "mongodb://u:hunter2@db:notaport/x",
            "mongodb://u:hunter2@db/bad$name",
            "mongodb://u:hunter2@db/x?maxPoolSize=lots",
            "mongodb+srv://u:hunter2@db:27017/x",
            "mongodb://u:hun@ter2@db/x",
        ] {
            match parse_url(url) {
                Err(e @ StoreError::InvalidUrl { .. }) => {
                    let text = e.to_string();
                    assert!(
                        !text.contains("hunter2") && !text.contains("ter2"),
                        "{text}"
                    );
                    assert!(text.contains("***") || !url.contains('@'), "{text}");
                }
                Err(e) => panic!("{url}: expected InvalidUrl, got {e:?}"),
                Ok(_) => panic!("{url}: accepted"),
            }
        }
    }

    #[test]
    fn secrets_are_scrubbed_from_messages() {
        let (conn, _) = parse_url("mongodb://cohort:s%40cret@db/x").unwrap();
        let secret = Secret::of_conn(&conn);
        assert_eq!(
            secret.scrub("auth failed for s@cret".to_string()),
            "auth failed for ***"
        );
        assert_eq!(
            Secret::of_url("mongodb://u:pw@db/x").scrub("x pw y".into()),
            "x *** y"
        );
        assert_eq!(Secret::default().scrub("pw".into()), "pw");
        // No password, nothing to hide.
        let (conn, _) = parse_url("mongodb://cohort@db/x").unwrap();
        assert_eq!(Secret::of_conn(&conn).scrub("cohort".into()), "cohort");
    }

    #[test]
    fn duplicate_keys_are_conflicts_naming_the_record() {
        let e = write_error(
            11000,
            "E11000 duplicate key error collection: cohort.jobs index: id_1",
        );
        assert!(is_duplicate_key(&e));
        match map_error(&e, "job", "train-abc", &Secret::default()) {
            StoreError::Conflict(m) => {
                assert!(m.contains("job train-abc"), "{m}");
                assert!(m.contains("E11000"), "{m}");
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
        let cmd = mongodb::bson::from_document(
            doc! {"code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000"},
        )
        .unwrap();
        let e = mongo_error(ErrorKind::Command(cmd));
        assert!(matches!(
            map_error(&e, "client", "p", &Secret::default()),
            StoreError::Conflict(_)
        ));
        // Other write errors are not conflicts.
        let e = write_error(121, "Document failed validation");
        assert!(!is_duplicate_key(&e));
        assert!(matches!(
            map_error(&e, "job", "j", &Secret::default()),
            StoreError::Unavailable(_)
        ));
    }

    #[test]
    fn network_errors_are_unavailable_and_scrubbed() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused: hunter2");
        let e = mongo_error(ErrorKind::Io(Arc::new(io)));
        assert!(is_transient(&e));
        let secret = Secret(Some("hunter2".into()));
        match map_error(&e, "model version", "m@1", &secret) {
            StoreError::Unavailable(m) => {
                assert!(m.contains("model version m@1"), "{m}");
                assert!(!m.contains("hunter2"), "{m}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn undecodable_documents_are_corrupt() {
        let de = mongodb::bson::from_document::<String>(doc! {"a": 1}).unwrap_err();
        let e = mongo_error(ErrorKind::BsonDeserialization(de));
        assert!(matches!(
            map_error(&e, "job", "j", &Secret::default()),
            StoreError::Corrupt { what: "job", .. }
        ));
    }

    #[test]
    fn fields_read_strictly_and_name_the_field() {
        let d = doc! {
            "s": "x", "i32": 7i32, "i64": 1i64 << 40, "neg": -1i64, "nan": f64::NAN,
            "null": Bson::Null, "n": 2i64, "arr": [1i64, 2i32], "docs": [{"a": 1}],
            "bad_arr": ["x"], "whole": 4294967296.0, "frac": 2.5, "huge": 1e300,
        };
        let f = Fields::new(&d, "job", "j1");
        assert_eq!(f.str("s").unwrap(), "x");
        assert_eq!(f.int("i32").unwrap(), 7);
        assert_eq!(f.int("i64").unwrap(), 1 << 40);
        assert!(f.float("nan").unwrap().is_nan());
        assert!(f.float("null").unwrap().is_nan());
        assert_eq!(f.float("n").unwrap(), 2.0);
        assert_eq!(f.opt_str("null").unwrap(), None);
        assert_eq!(f.opt_str("absent").unwrap(), None);
        assert_eq!(f.opt_int("null").unwrap(), None);
        assert_eq!(f.ints("arr").unwrap(), vec![1, 2]);
        assert_eq!(
            f.int("whole").unwrap(),
            1 << 32,
            "an exact double is an integer"
        );
        assert!(f.ints("absent").unwrap().is_empty());
        assert_eq!(f.docs("docs").unwrap().len(), 1);
        for (field, err) in [
            ("s", f.int("s").err()),
            ("neg", f.uint::<u32>("neg").err()),
            ("i64", f.uint::<u32>("i64").err()),
            ("absent", f.str("absent").err()),
            ("i32", f.str("i32").err()),
            ("bad_arr", f.ints("bad_arr").err()),
            ("s", f.opt_int("s").err()),
            ("frac", f.int("frac").err()),
            ("huge", f.int("huge").err()),
        ] {
            match err {
                Some(StoreError::Corrupt { what, id, message }) => {
                    assert_eq!((what, id.as_str()), ("job", "j1"));
                    assert!(message.contains(field), "{message}");
                }
                other => panic!("{field}: expected Corrupt, got {other:?}"),
            }
        }
        let inner = doc! {"cpus": "many"};
        let nested = f.nested(&inner, "resources.");
        let err = nested.int("cpus").unwrap_err().to_string();
        assert!(err.contains("resources.cpus"), "{err}");
    }

    #[test]
    fn u64_beyond_i64_is_refused_naming_the_field() {
        assert_eq!(to_i64(5, "samples", "model version", "m").unwrap(), 5);
        let err = to_i64(u64::MAX, "size_bytes", "model version", "m").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert!(err.to_string().contains("size_bytes"), "{err}");
    }
}
