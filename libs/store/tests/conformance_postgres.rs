//! The store conformance suite on PostgreSQL, plus fault tests: connections
//! killed under a running store, the database lost and back, unreachable
//! servers at open, and concurrent replicas migrating one database.
//!
//! The server comes from `COHORT_TEST_POSTGRES_URL`, an admin URL such as
//! `postgres://cohort:secret@127.0.0.1:5433/postgres`; each test creates its
//! own database and drops it afterwards. Unset, the tests skip, except under
//! `CI`, where they fail (`cohort_testkit`): the test script must provide
//! PostgreSQL. The server must check passwords (scripts/test.sh's cluster uses
//! scram-sha-256): a server that trusts every login fails the wrong-password
//! test.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use cohort_core::{JobState, PartyId};
use cohort_store::clients::ClientStore;
use cohort_store::conformance::Fresh;
use cohort_store::jobs::JobStore;
use cohort_store::models::ModelStore;
use cohort_store::{DatabaseOptions, StoreError, redact_url};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A database of its own on the test server, dropped on drop (best effort).
struct TestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDb {
    /// None when no server is configured (the test skips; under CI it fails).
    async fn create() -> Option<TestDb> {
        let admin_url = cohort_testkit::require_env(
            "COHORT_TEST_POSTGRES_URL",
            "a PostgreSQL admin URL, tests create their own databases; scripts/test.sh \
             starts a server",
        )?;
        let name = format!("cohort_t_{:016x}", rand::random::<u64>());
        let mut admin = admin_connection(&admin_url).await;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = admin.close().await;
        let url = with_database(&admin_url, &name);
        Some(TestDb {
            admin_url,
            name,
            url,
        })
    }

    /// Ends every session on this database but the caller's; how many.
    async fn terminate_connections(&self) -> i64 {
        let mut admin = admin_connection(&self.admin_url).await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        let _ = admin.close().await;
        n
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut c) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut c)
                    .await;
                    let _ = c.close().await;
                }
            });
        })
        .join();
    }
}

async fn admin_connection(admin_url: &str) -> PgConnection {
    PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", redact_url(admin_url)))
}

/// `url` naming database `db` instead.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let start = base.find("://").map_or(0, |i| i + 3);
    let host = base[start..].rfind('@').map_or(start, |i| start + i + 1);
    let end = base[host..].find('/').map_or(base.len(), |i| host + i);
    format!("{}/{db}{query}", &base[..end])
}

/// `url` with its host and port replaced by `addr`.
fn with_address(url: &str, addr: SocketAddr) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let host = url[start..].rfind('@').map_or(start, |i| start + i + 1);
    let end = url[host..].find(['/', '?']).map_or(url.len(), |i| host + i);
    format!("{}{addr}{}", &url[..host], &url[end..])
}

/// `url` with its password replaced by `password`.
fn with_password(url: &str, password: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let Some(at) = url[start..].rfind('@').map(|i| start + i) else {
        return url.to_string();
    };
    let user = url[start..at].split(':').next().unwrap_or("");
    format!("{}{user}:{password}{}", &url[..start], &url[at..])
}

fn password_of(url: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let at = start + url[start..].rfind('@')?;
    let (_, pw) = url[start..at].split_once(':')?;
    Some(pw.to_string())
}

fn options() -> DatabaseOptions {
    // Small pools: many tests share one server.
    DatabaseOptions {
        max_connections: 5,
        ..DatabaseOptions::default()
    }
}

async fn fresh_jobs() -> Option<Fresh<dyn JobStore>> {
    let db = TestDb::create().await?;
    let store = cohort_store::open_job_store(&db.url, &options())
        .await
        .unwrap();
    Some(Fresh::new(store, db))
}

async fn fresh_models() -> Option<Fresh<dyn ModelStore>> {
    let db = TestDb::create().await?;
    let store = cohort_store::open_model_store(&db.url, &options())
        .await
        .unwrap();
    Some(Fresh::new(store, db))
}

async fn fresh_clients() -> Option<Fresh<dyn ClientStore>> {
    let db = TestDb::create().await?;
    let store = cohort_store::open_client_store(&db.url, &options())
        .await
        .unwrap();
    Some(Fresh::new(store, db))
}

cohort_store::job_store_conformance!(jobs, fresh_jobs());
cohort_store::model_store_conformance!(models, fresh_models());
cohort_store::client_store_conformance!(clients, fresh_clients());

/// How much longer than its timeout a call may take on a loaded machine. The
/// timeouts tested are 1-2 s, so a store that ignored them for the 10 s
/// default (or never gave up) still fails.
const SLACK: Duration = Duration::from_secs(5);

/// Ok, or Unavailable; anything else fails the test.
fn ok_or_unavailable<T>(call: &str, r: cohort_store::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(StoreError::Unavailable(_)) => None,
        Err(e) => panic!("{call}: expected success or Unavailable, got {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_stores_share_one_database_and_replicas_migrate_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    // Replicas of all three services starting together on one database.
    let opens: Vec<JoinHandle<()>> = (0..6)
        .flat_map(|_| {
            let (a, b, c) = (db.url.clone(), db.url.clone(), db.url.clone());
            [
                tokio::spawn(async move {
                    cohort_store::open_job_store(&a, &options()).await.unwrap();
                }),
                tokio::spawn(async move {
                    cohort_store::open_model_store(&b, &options())
                        .await
                        .unwrap();
                }),
                tokio::spawn(async move {
                    cohort_store::open_client_store(&c, &options())
                        .await
                        .unwrap();
                }),
            ]
        })
        .collect();
    for o in opens {
        o.await.unwrap();
    }
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    for (table, migrator) in [
        (
            "_sqlx_migrations_jobs",
            sqlx::migrate!("./migrations/postgres/jobs"),
        ),
        (
            "_sqlx_migrations_models",
            sqlx::migrate!("./migrations/postgres/models"),
        ),
        (
            "_sqlx_migrations_clients",
            sqlx::migrate!("./migrations/postgres/clients"),
        ),
    ] {
        let applied: Vec<(i64, bool)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT version, success FROM {table} ORDER BY version"
        )))
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let want: Vec<(i64, bool)> = migrator.iter().map(|m| (m.version, true)).collect();
        assert!(want.len() >= 2, "{table}: the upgrade migrations are there");
        assert_eq!(applied, want, "{table}: each migration applied once");
    }
    let default_table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        default_table, None,
        "no store uses the shared history table"
    );
    let _ = conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrades_keep_existing_rows() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    for m in [
        cohort_store::conformance::first_release(
            sqlx::migrate!("./migrations/postgres/jobs"),
            "_sqlx_migrations_jobs",
        ),
        cohort_store::conformance::first_release(
            sqlx::migrate!("./migrations/postgres/models"),
            "_sqlx_migrations_models",
        ),
        cohort_store::conformance::first_release(
            sqlx::migrate!("./migrations/postgres/clients"),
            "_sqlx_migrations_clients",
        ),
    ] {
        m.run(&pool).await.unwrap();
    }
    for stmt in [
        "INSERT INTO models (name, created_at_ms, last_version) VALUES ('old', 1, 1)",
        "INSERT INTO model_versions (name, version, digest, size_bytes, job_id, round, \
         parent_version, loss, accuracy, samples, created_at_ms) \
         VALUES ('old', 1, 'ab', 1, 'j', 1, 0, 0.5, 0.5, 1, 1)",
        "INSERT INTO clients (party, datasets_json, resources_json, first_seen_ms, last_seen_ms) \
         VALUES ('p', '[]', '{\"cpus\":1,\"memory_bytes\":2,\"gpus\":0,\"max_tasks\":1}', 1, 2)",
        "INSERT INTO client_stats (party, tasks_offered) VALUES ('p', 3)",
    ] {
        sqlx::query(stmt).execute(&pool).await.unwrap();
    }
    pool.close().await;

    let models = cohort_store::open_model_store(&db.url, &options())
        .await
        .unwrap();
    let v1 = models.get_version("default", "old", 1).await.unwrap();
    assert_eq!(v1.namespace, "default", "existing models are in default");
    // Round 1 of job j is stored: a retry finds it; round 3 is new.
    let old_round = cohort_store::conformance::models::in_round(
        cohort_store::conformance::models::new_version("old", "j"),
        1,
    );
    let again = models.insert_version(old_round, 2).await.unwrap();
    assert_eq!((again.record, again.created), (v1.clone(), false));
    let v2 = cohort_store::conformance::models::insert_new(
        &*models,
        cohort_store::conformance::models::new_version("old", "j"),
        2,
    )
    .await;
    assert_eq!((v2.version, v2.namespace.as_str()), (2, "default"));
    // Another namespace's model of the same name is a model of its own.
    let elsewhere = cohort_store::conformance::models::new_version_in("old", "j", "team-a");
    let other = cohort_store::conformance::models::insert_new(&*models, elsewhere, 3).await;
    assert_eq!((other.version, other.namespace.as_str()), (1, "team-a"));
    assert_eq!(
        models
            .list_versions(None, None, Some("default"))
            .await
            .unwrap(),
        vec![v1, v2]
    );

    let clients = cohort_store::open_client_store(&db.url, &options())
        .await
        .unwrap();
    let party = PartyId::parse("p").unwrap();
    let rec = clients.get_client(&party).await.unwrap();
    assert_eq!(
        (rec.revoked_at_ms, rec.last_seen_ms, rec.stats.tasks_offered),
        (None, 2, 3)
    );
    let revoked = clients.revoke_client(&party, 9).await.unwrap();
    assert_eq!(
        (revoked.revoked_at_ms, revoked.resources.cpus),
        (Some(9), 1)
    );

    let jobs = cohort_store::open_job_store(&db.url, &options())
        .await
        .unwrap();
    let t = cohort_store::conformance::jobs::new_token("t", 1, "*", "admin");
    let stored = jobs.insert_token(t, 5).await.unwrap();
    assert_eq!(jobs.token_by_sha256(&stored.sha256).await.unwrap(), stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_from_before_scoped_names_upgrade() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    cohort_store::conformance::models::before_scoped_names(sqlx::migrate!(
        "./migrations/postgres/models"
    ))
    .run(&pool)
    .await
    .unwrap();
    for stmt in cohort_store::conformance::models::rows_before_scoped_names(true) {
        sqlx::query(AssertSqlSafe(stmt))
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;

    let models = cohort_store::open_model_store(&db.url, &options())
        .await
        .unwrap();
    cohort_store::conformance::models::rows_from_before_scoped_names_survive(models).await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let keys: Vec<(String, String)> = sqlx::query_as(
        "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE conrelid IN ('models'::regclass, 'model_versions'::regclass) \
         AND contype IN ('p', 'f') ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        keys,
        [
            (
                "model_versions".to_string(),
                "FOREIGN KEY (namespace, name) REFERENCES models(namespace, name)".to_string()
            ),
            (
                "model_versions".to_string(),
                "PRIMARY KEY (namespace, name, version)".to_string()
            ),
            (
                "models".to_string(),
                "PRIMARY KEY (namespace, name)".to_string()
            ),
        ]
    );
    let _ = conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_with_repeated_rounds_upgrade() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    cohort_store::conformance::models::before_rounds_stored_once(sqlx::migrate!(
        "./migrations/postgres/models"
    ))
    .run(&pool)
    .await
    .unwrap();
    for stmt in cohort_store::conformance::models::rows_with_repeated_rounds(true) {
        sqlx::query(AssertSqlSafe(stmt))
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;

    let models = cohort_store::open_model_store(&db.url, &options())
        .await
        .unwrap();
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let flagged: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, version FROM model_versions WHERE round_duplicate \
         ORDER BY namespace, name, version",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(flagged, [("m".to_string(), 2), ("m".to_string(), 4)]);
    cohort_store::conformance::models::repeated_rounds_survive(models).await;
    // The index holds a round to one version even for writers that bypass
    // the store; versions outside jobs' rounds are not held by it.
    let insert = |round: u32| {
        format!(
            "INSERT INTO model_versions (namespace, name, version, digest, size_bytes, job_id, \
             round, parent_version, loss, accuracy, samples, created_at_ms) \
             VALUES ('team-a', 'm', 99, 'x', 1, 'job-a', {round}, 0, 0, 0, 0, 0)"
        )
    };
    match sqlx::query(AssertSqlSafe(insert(2)))
        .execute(&mut conn)
        .await
    {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            assert_eq!(e.constraint(), Some("model_versions_job_round"), "{e}")
        }
        other => panic!("expected a unique violation, got {other:?}"),
    }
    sqlx::query(AssertSqlSafe(insert(0)))
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
}

/// A jobs database as the first release left it reads and takes log entries after the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_upgrades_keep_events_and_rounds() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    cohort_store::conformance::first_release(
        sqlx::migrate!("./migrations/postgres/jobs"),
        "_sqlx_migrations_jobs",
    )
    .run(&pool)
    .await
    .unwrap();
    for stmt in cohort_store::conformance::jobs::FIRST_RELEASE_JOB_ROWS {
        sqlx::query(stmt).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let jobs = cohort_store::open_job_store(&db.url, &options())
        .await
        .unwrap();
    cohort_store::conformance::jobs::check_first_release_job(jobs.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_reconnect_after_their_connections_are_terminated() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let opts = DatabaseOptions {
        acquire_timeout: Duration::from_secs(3),
        ..options()
    };
    let jobs = cohort_store::open_job_store(&db.url, &opts).await.unwrap();
    let models = cohort_store::open_model_store(&db.url, &opts)
        .await
        .unwrap();
    let clients = cohort_store::open_client_store(&db.url, &opts)
        .await
        .unwrap();
    let job = cohort_store::conformance::jobs::job("a", "default");
    jobs.insert_job(&job, "created").await.unwrap();
    models
        .insert_version(cohort_store::conformance::models::new_version("m", "j"), 1)
        .await
        .unwrap();
    let party = PartyId::parse("p1").unwrap();
    clients
        .upsert_client(&party, &[], &Default::default(), 1)
        .await
        .unwrap();

    let killed = db.terminate_connections().await;
    assert!(killed >= 3, "each pool held a connection ({killed} ended)");

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut unavailable = 0;
    loop {
        let j = ok_or_unavailable("get_job", jobs.get_job(&job.id).await);
        let m = ok_or_unavailable(
            "latest_version",
            models.latest_version("default", "m").await,
        );
        let c = ok_or_unavailable("get_client", clients.get_client(&party).await);
        if let (Some(j), Some(m), Some(c)) = (&j, &m, &c) {
            assert_eq!(
                (j.id.clone(), m.version, c.party.clone()),
                (job.id.clone(), 1, party.clone())
            );
            break;
        }
        unavailable += [j.is_none(), m.is_none(), c.is_none()]
            .iter()
            .filter(|u| **u)
            .count();
        assert!(
            Instant::now() < deadline,
            "stores did not reconnect within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("after pg_terminate_backend: {unavailable} calls were Unavailable before success");
    let mut next = jobs.get_job(&job.id).await.unwrap();
    next.state = JobState::Starting;
    assert_eq!(jobs.update_job(&next, 2).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_while_connections_are_killed_fail_cleanly() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let opts = DatabaseOptions {
        acquire_timeout: Duration::from_secs(2),
        ..options()
    };
    let jobs = cohort_store::open_job_store(&db.url, &opts).await.unwrap();
    let job = cohort_store::conformance::jobs::job("a", "default");
    jobs.insert_job(&job, "created").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Returns how many sessions it ended: none would leave nothing tested.
    let killer = {
        let stop = stop.clone();
        let db_name = db.name.clone();
        let admin_url = db.admin_url.clone();
        tokio::spawn(async move {
            let mut admin = admin_connection(&admin_url).await;
            let mut killed = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let ended: Result<i64, _> = sqlx::query_scalar(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                     FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&db_name)
                .fetch_one(&mut admin)
                .await;
                killed += ended.unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            killed
        })
    };
    // Read-modify-write increments while sessions die under them.
    let acked = Arc::new(AtomicU32::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (jobs, id, stop, acked) =
                (jobs.clone(), job.id.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut failures = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let Some(mut cur) = ok_or_unavailable("get_job", jobs.get_job(&id).await)
                    else {
                        failures += 1;
                        continue;
                    };
                    cur.launch_attempts += 1;
                    match jobs.update_job(&cur, 2).await {
                        Ok(_) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        // Another worker won, or our commit landed but its
                        // answer was lost with the connection.
                        Err(StoreError::Conflict(_)) | Err(StoreError::Unavailable(_)) => {
                            failures += 1
                        }
                        Err(e) => panic!("update_job: expected Conflict or Unavailable, got {e:?}"),
                    }
                }
                failures
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let killed = killer.await.unwrap();
    let mut failures = 0;
    for w in workers {
        failures += w.await.unwrap();
    }
    let acked = acked.load(Ordering::Relaxed);
    eprintln!(
        "under repeated pg_terminate_backend ({killed} sessions ended): {acked} updates \
         acknowledged, {failures} failed cleanly"
    );
    assert!(
        killed > 0,
        "the killer ended no session: nothing was tested"
    );

    // Once sessions stop dying the pool reconnects and updates go through
    // again: one writer now, so each must be acknowledged and stored.
    const AFTER: u32 = 3;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut updated = 0;
    while updated < AFTER {
        assert!(
            Instant::now() < deadline,
            "{updated} of {AFTER} updates went through within 10 s of the kills ending"
        );
        let Some(mut cur) = ok_or_unavailable("get_job", jobs.get_job(&job.id).await) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        cur.launch_attempts += 1;
        match jobs.update_job(&cur, 3).await {
            Ok(stored) => {
                assert_eq!(stored.launch_attempts, cur.launch_attempts, "{stored:?}");
                updated += 1;
            }
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("update_job with no other writer: {e:?}"),
        }
    }
    let end = jobs.get_job(&job.id).await.unwrap();
    assert!(
        u32::try_from(end.version - 1).unwrap() == end.launch_attempts,
        "every stored update incremented once: {end:?}"
    );
    assert!(
        end.launch_attempts >= acked + AFTER,
        "an acknowledged update was lost: {acked} + {AFTER} acknowledged, {end:?}"
    );
}

/// A TCP relay to the database that can be cut, as if the server went away,
/// and restored. It keeps its port throughout (nothing else can take it
/// meanwhile): while cut, it closes each connection as soon as it accepts it.
struct Relay {
    addr: SocketAddr,
    commands: tokio::sync::mpsc::Sender<(bool, tokio::sync::oneshot::Sender<()>)>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (commands, mut requests) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let mut up = true;
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { return };
                        while conns.try_join_next().is_some() {}
                        if !up {
                            continue;
                        }
                        conns.spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        });
                    }
                    request = requests.recv() => {
                        let Some((now_up, done)): Option<(bool, tokio::sync::oneshot::Sender<()>)> =
                            request
                        else {
                            return;
                        };
                        up = now_up;
                        if !up {
                            // Every relayed connection is closed before `cut` returns.
                            conns.abort_all();
                            while conns.join_next().await.is_some() {}
                        }
                        let _ = done.send(());
                    }
                }
            }
        });
        Relay {
            addr,
            commands,
            task,
        }
    }

    async fn set_up(&self, up: bool) {
        let (done, acked) = tokio::sync::oneshot::channel();
        self.commands.send((up, done)).await.unwrap();
        acked.await.unwrap();
    }

    async fn cut(&self) {
        self.set_up(false).await
    }

    async fn restore(&self) {
        self.set_up(true).await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_lost_while_running_is_unavailable_then_recovers() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let target = PgConnectOptions::from_str(&db.url).unwrap();
    if target.get_socket().is_some() {
        cohort_testkit::skip("the test server is reached over a unix socket, not TCP");
        return;
    }
    let target: SocketAddr = tokio::net::lookup_host((target.get_host(), target.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let relay = Relay::start(target).await;
    let url = with_address(&db.url, relay.addr);
    let opts = DatabaseOptions {
        acquire_timeout: Duration::from_secs(1),
        ..options()
    };
    let jobs = cohort_store::open_job_store(&url, &opts).await.unwrap();
    let job = cohort_store::conformance::jobs::job("a", "default");
    jobs.insert_job(&job, "created").await.unwrap();

    relay.cut().await;
    for _ in 0..3 {
        let start = Instant::now();
        match jobs.get_job(&job.id).await {
            Err(StoreError::Unavailable(m)) => {
                if let Some(pw) = password_of(&db.url) {
                    assert!(!m.contains(&pw), "password in {m}");
                }
            }
            other => panic!("database gone: expected Unavailable, got {other:?}"),
        }
        eprintln!("database gone: Unavailable after {:?}", start.elapsed());
        assert!(
            start.elapsed() < opts.acquire_timeout + SLACK,
            "gave up after {:?}, acquire timeout {:?}",
            start.elapsed(),
            opts.acquire_timeout
        );
    }

    relay.restore().await;
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    let got = loop {
        if let Some(j) = ok_or_unavailable("get_job", jobs.get_job(&job.id).await) {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery within 10 s of the database returning"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("database back: recovered after {:?}", back.elapsed());
    assert_eq!(got.id, job.id);
    let mut next = got;
    next.state = JobState::Starting;
    jobs.update_job(&next, 3).await.unwrap();
}

#[tokio::test]
async fn open_at_a_closed_port_is_unavailable_within_the_timeout() {
    // Bound but never listening: connections are refused, and nobody else
    // can take the port while the socket is kept.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let url = format!("postgres://cohort:hunter2-secret@127.0.0.1:{port}/cohort");
    let opts = DatabaseOptions {
        connect_timeout: Duration::from_secs(2),
        ..DatabaseOptions::default()
    };
    let start = Instant::now();
    let err = cohort_store::open_job_store(&url, &opts)
        .await
        .err()
        .unwrap();
    let elapsed = start.elapsed();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
    assert!(elapsed < opts.connect_timeout + SLACK, "took {elapsed:?}");
    assert!(
        text.contains(&format!("postgres://cohort:***@127.0.0.1:{port}/cohort")),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    eprintln!("closed port, after {elapsed:?}: {text}");
}

#[tokio::test]
async fn open_against_a_silent_server_times_out() {
    // Accepts connections (the kernel does) but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("postgresql://cohort:hunter2-secret@{addr}/cohort");
    let opts = DatabaseOptions {
        connect_timeout: Duration::from_millis(1500),
        ..DatabaseOptions::default()
    };
    for open in 0..3 {
        let start = Instant::now();
        let err = match open {
            0 => cohort_store::open_job_store(&url, &opts).await.err(),
            1 => cohort_store::open_model_store(&url, &opts).await.err(),
            _ => cohort_store::open_client_store(&url, &opts).await.err(),
        }
        .unwrap();
        let elapsed = start.elapsed();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
        assert!(
            elapsed >= opts.connect_timeout,
            "gave up early: {elapsed:?}"
        );
        assert!(elapsed < opts.connect_timeout + SLACK, "took {elapsed:?}");
        assert!(
            text.contains(&addr.to_string()) && text.contains("***"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
    drop(listener);
}

/// The test server must check passwords: one that trusts every login
/// (`trust` in pg_hba.conf) would let a wrong password in, and this test
/// fails then rather than checking nothing.
#[tokio::test]
async fn wrong_password_is_reported_without_it() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let url = with_password(&db.url, "wrong-hunter2");
    let err = match cohort_store::open_job_store(&url, &options()).await {
        Err(e) => e,
        Ok(_) => panic!(
            "a wrong password was let in: the test server must authenticate logins \
             (scripts/test.sh's cluster uses scram-sha-256), not trust them"
        ),
    };
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
    assert!(
        text.contains("password authentication failed"),
        "says why: {text}"
    );
    assert!(!text.contains("wrong-hunter2"), "{text}");
    assert!(text.contains(&db.name), "names the database: {text}");
    eprintln!("wrong password: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlocks_are_reported_as_conflict() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let mut a = PgConnection::connect(&db.url).await.unwrap();
    let mut b = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut a).await.unwrap();
    sqlx::query("BEGIN").execute(&mut b).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(1)")
        .execute(&mut a)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(2)")
        .execute(&mut b)
        .await
        .unwrap();
    let first = tokio::spawn(async move {
        let r = sqlx::query("SELECT pg_advisory_xact_lock(2)")
            .execute(&mut a)
            .await;
        (r, a)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = sqlx::query("SELECT pg_advisory_xact_lock(1)")
        .execute(&mut b)
        .await;
    // Ends b's transaction, victim or not, so a's wait ends too.
    let _ = sqlx::query("ROLLBACK").execute(&mut b).await;
    let (first, _a) = first.await.unwrap();
    let victim = match (first, second) {
        (Err(e), _) | (_, Err(e)) => e,
        _ => panic!("no deadlock detected"),
    };
    match StoreError::from(victim) {
        StoreError::Conflict(m) => assert!(m.contains("deadlock"), "{m}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
}

#[test]
fn url_helpers() {
    assert_eq!(
        with_database("postgres://u:p@h:5433/postgres?sslmode=disable", "x"),
        "postgres://u:p@h:5433/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    assert_eq!(
        with_address("postgres://u:p@h:5433/x", "127.0.0.1:9".parse().unwrap()),
        "postgres://u:p@127.0.0.1:9/x"
    );
    assert_eq!(
        with_password("postgres://u:p@h/x", "q"),
        "postgres://u:q@h/x"
    );
    assert_eq!(with_password("postgres://u@h/x", "q"), "postgres://u:q@h/x");
    assert_eq!(password_of("postgres://u:p@h/x").as_deref(), Some("p"));
    assert_eq!(password_of("postgres://u@h/x"), None);
}
