//! The store conformance suite on MongoDB, plus what only MongoDB has: history
//! a crash left in a job document, a lost sequence counter, and errors at
//! open.
//!
//! The server comes from `COHORT_TEST_MONGODB_URL` (e.g.
//! `mongodb://127.0.0.1:27017`, or with credentials of a user that may create
//! databases); each test uses a database of its own and drops it afterwards.
//! No MongoDB server can be installed on the machines this project is built
//! on, so scripts/test.sh runs the tests that need one (module
//! `mongodb_server`) only where that variable is set, and otherwise leaves
//! them out, saying so. Run without it anyway, they report themselves
//! skipped, and fail under CI (`cohort_testkit`): a missing server never
//! passes there.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cohort_core::JobState;
use cohort_store::clients::ClientStore;
use cohort_store::conformance::Fresh;
use cohort_store::jobs::JobStore;
use cohort_store::models::ModelStore;
use cohort_store::{DatabaseOptions, StoreError, mongo};
use mongodb::bson::doc;

const URL_VAR: &str = "COHORT_TEST_MONGODB_URL";

/// A database of its own on the test server, dropped on drop (best effort).
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// None when no server is configured (the test skips; under CI it fails).
    fn create() -> Option<TestDb> {
        let server = cohort_testkit::require_env(
            URL_VAR,
            "a MongoDB server's URL; none can be installed on this project's machines, so \
             scripts/test.sh leaves these tests out",
        )?;
        let name = format!("cohort_t_{:016x}", rand::random::<u64>());
        let url = with_database(&server, &name);
        Some(TestDb { name, url })
    }

    async fn raw(&self) -> mongodb::Database {
        mongodb::Client::with_uri_str(&self.url)
            .await
            .unwrap()
            .database(&self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(client) = mongodb::Client::with_uri_str(&url).await {
                    let _ = client.database(&name).drop().await;
                    client.shutdown().await;
                }
            });
        })
        .join();
    }
}

/// `url` naming database `db`. Credentials keep authenticating where they
/// did: against the URL's database (or `admin`) unless `authSource` says.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let start = base.find("://").map_or(0, |i| i + 3);
    let host = base[start..].rfind('@').map_or(start, |i| start + i + 1);
    let (hosts_end, old_db) = match base[host..].find('/') {
        Some(i) => (host + i, &base[host + i + 1..]),
        None => (base.len(), ""),
    };
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let has_user = host > start;
    let has_auth_source = params
        .iter()
        .any(|p| p.to_ascii_lowercase().starts_with("authsource="));
    if has_user && !has_auth_source {
        let source = if old_db.is_empty() { "admin" } else { old_db };
        params.push(format!("authSource={source}"));
    }
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    format!("{}/{db}{query}", &base[..hosts_end])
}

fn options() -> DatabaseOptions {
    // Small pools: many tests share one server.
    DatabaseOptions {
        max_connections: 5,
        ..DatabaseOptions::default()
    }
}

async fn fresh_jobs() -> Option<Fresh<dyn JobStore>> {
    let db = TestDb::create()?;
    let store = mongo::open_job_store(&db.url, &options()).await.unwrap();
    Some(Fresh::new(store, db))
}

async fn fresh_models() -> Option<Fresh<dyn ModelStore>> {
    let db = TestDb::create()?;
    let store = mongo::open_model_store(&db.url, &options()).await.unwrap();
    Some(Fresh::new(store, db))
}

async fn fresh_clients() -> Option<Fresh<dyn ClientStore>> {
    let db = TestDb::create()?;
    let store = mongo::open_client_store(&db.url, &options()).await.unwrap();
    Some(Fresh::new(store, db))
}

#[test]
fn test_urls_name_the_test_database() {
    for (url, want) in [
        ("mongodb://127.0.0.1:27017", "mongodb://127.0.0.1:27017/t"),
        ("mongodb://h:1/", "mongodb://h:1/t"),
        ("mongodb://h:1/x?w=majority", "mongodb://h:1/t?w=majority"),
        (
            "mongodb://u:p@h1,h2/?replicaSet=rs0",
            "mongodb://u:p@h1,h2/t?replicaSet=rs0&authSource=admin",
        ),
        ("mongodb://u:p@h/app", "mongodb://u:p@h/t?authSource=app"),
        (
            "mongodb://u:p@h/app?authSource=admin",
            "mongodb://u:p@h/t?authSource=admin",
        ),
    ] {
        assert_eq!(with_database(url, "t"), want, "{url}");
    }
}

// Needs no server: nothing listens on port 1.
#[tokio::test]
async fn unreachable_server_fails_within_the_timeout_without_the_password() {
    let opts = DatabaseOptions {
        connect_timeout: Duration::from_secs(1),
        acquire_timeout: Duration::from_secs(1),
        ..DatabaseOptions::default()
    };
    let url = "mongodb://cohort:hunter2@127.0.0.1:1/x?serverSelectionTimeoutMS=60000";
    let started = Instant::now();
    let err = match mongo::open_client_store(url, &opts).await {
        Err(e) => e,
        Ok(_) => panic!("opened {url}"),
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        text.contains("cohort:***@127.0.0.1:1"),
        "names the URL: {text}"
    );
}

#[tokio::test]
async fn malformed_urls_are_invalid_without_the_password() {
    for url in [
        "mongodb://u:hunter2@db:notaport/x",
        "mongodb://u:hunter2@db/x?maxPoolSize=many",
        "mongodb://u:hunter2@db/bad$name",
    ] {
        let err = match mongo::open_job_store(url, &DatabaseOptions::default()).await {
            Err(e) => e,
            Ok(_) => panic!("opened {url}"),
        };
        let text = err.to_string();
        assert!(
            matches!(err, StoreError::InvalidUrl { .. }),
            "{url}: {text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
}

/// Every test that needs a server: scripts/test.sh leaves them out of the run
/// (nextest counts them skipped) when `COHORT_TEST_MONGODB_URL` is unset.
/// Run anyway without it, each reports itself skipped, or fails under CI.
mod mongodb_server {
    use super::*;

    cohort_store::job_store_conformance!(jobs, fresh_jobs());
    cohort_store::model_store_conformance!(models, fresh_models());
    cohort_store::client_store_conformance!(clients, fresh_clients());

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn history_a_crash_left_in_the_job_document_is_listed_and_copied_out() {
        let Some(db) = TestDb::create() else {
            return;
        };
        let store = mongo::open_job_store(&db.url, &options()).await.unwrap();
        let job = cohort_store::conformance::jobs::job("a", "default");
        store.insert_job(&job, "created").await.unwrap();
        // What a transition and a round look like after their one write, when
        // the process died before copying them out.
        let raw = db.raw().await;
        let jobs = raw.collection::<mongodb::bson::Document>("jobs");
        let pending = |d: &mongodb::bson::Document, field: &str| d.get_array(field).unwrap().len();
        let stored = jobs
            .find_one(doc! {"id": job.id.as_str()})
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pending(&stored, "pending_events"), 0, "copied out at once");
        let first = raw
            .collection::<mongodb::bson::Document>("job_events")
            .find_one(doc! {"job_id": job.id.as_str()})
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.get_str("reason").unwrap(), "created");
        let res = jobs
            .update_one(
                doc! {"id": job.id.as_str()},
                doc! {
                    "$set": {"state": "STARTING", "reason": "launching", "event_seq": 2i64},
                    "$inc": {"version": 1i64},
                    "$push": {
                        "pending_events": {"seq": 2i64, "time_ms": 5i64, "from": "QUEUED",
                            "to": "STARTING", "reason": "launching"},
                        "rounds_done": 1i64,
                        "pending_rounds": {"round": 1i64, "eval_loss": 0.5, "eval_accuracy": 0.9,
                            "eval_samples": 10i64, "train_loss": 0.6, "updates": 2i64,
                            "model_version": 1i64, "duration_ms": 3i64},
                    },
                },
            )
            .await
            .unwrap();
        assert_eq!(res.modified_count, 1);
        let events = store.list_events(&job.id, 0).await.unwrap();
        assert_eq!(events.len(), 2, "the pending event is listed");
        assert_eq!((events[1].seq, events[1].to), (2, JobState::Starting));
        assert_eq!(store.list_rounds(&job.id).await.unwrap().len(), 1);
        // A round reported again is still recognised.
        let again = store
            .record_round(&job.id, &cohort_store::conformance::jobs::round(1), 9)
            .await
            .unwrap();
        assert_eq!(again.version, 2, "a repeated round changes nothing");

        // Reopening copies it out.
        drop(store);
        let store = mongo::open_job_store(&db.url, &options()).await.unwrap();
        let left = jobs
            .find_one(doc! {"id": job.id.as_str()})
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pending(&left, "pending_events"), 0, "copied out at open");
        assert_eq!(pending(&left, "pending_rounds"), 0, "copied out at open");
        assert_eq!(store.list_events(&job.id, 0).await.unwrap(), events);
        let mut next = store.get_job(&job.id).await.unwrap();
        next.state = JobState::Running;
        store.update_job(&next, 10).await.unwrap();
        let events = store.list_events(&job.id, 0).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        // Log entries number on from there, and are copied out at once too.
        let note = cohort_store::conformance::jobs::note("task_failed", 1);
        assert_eq!(
            store.append_notes(&job.id, &[note], 10, 11).await.unwrap(),
            1
        );
        let added = store.list_events(&job.id, 3).await.unwrap();
        assert_eq!(
            (added.len(), added[0].seq, added[0].kind.as_str()),
            (1, 4, "task_failed")
        );
        let after = jobs
            .find_one(doc! {"id": job.id.as_str()})
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pending(&after, "pending_events"), 0, "copied out at once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn listing_order_survives_a_lost_counter_and_reopening() {
        let Some(db) = TestDb::create() else {
            return;
        };
        let store = mongo::open_job_store(&db.url, &options()).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..3 {
            let j = cohort_store::conformance::jobs::job(&format!("j{i}"), "default");
            store.insert_job(&j, "created").await.unwrap();
            ids.push(j.id);
        }
        drop(store);
        db.raw()
            .await
            .collection::<mongodb::bson::Document>("counters")
            .drop()
            .await
            .unwrap();
        let store = mongo::open_job_store(&db.url, &options()).await.unwrap();
        let j = cohort_store::conformance::jobs::job("late", "default");
        store.insert_job(&j, "created").await.unwrap();
        ids.push(j.id);
        let page = store
            .list_jobs(&Default::default(), 10, None)
            .await
            .unwrap();
        assert_eq!(
            page.items.into_iter().map(|j| j.id).collect::<Vec<_>>(),
            ids
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn three_stores_share_one_database_and_reopen() {
        let Some(db) = TestDb::create() else {
            return;
        };
        let opts = options();
        for round in [1, 2] {
            let (jobs, models, clients) = tokio::join!(
                mongo::open_job_store(&db.url, &opts),
                mongo::open_model_store(&db.url, &opts),
                mongo::open_client_store(&db.url, &opts),
            );
            let (jobs, models, clients) = (jobs.unwrap(), models.unwrap(), clients.unwrap());
            jobs.insert_job(&cohort_store::conformance::jobs::job("a", "default"), "c")
                .await
                .unwrap();
            let v = cohort_store::conformance::models::in_round(
                cohort_store::conformance::models::new_version("m", "j"),
                round,
            );
            cohort_store::conformance::models::insert_new(&*models, v, 1).await;
            let party = cohort_core::PartyId::parse("p").unwrap();
            clients
                .upsert_client(&party, &[], &Default::default(), 1)
                .await
                .unwrap();
        }
        let models = mongo::open_model_store(&db.url, &options()).await.unwrap();
        assert_eq!(
            models.latest_version("default", "m").await.unwrap().version,
            2
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn models_from_before_scoped_names_upgrade() {
        use futures::TryStreamExt;
        use mongodb::bson::Document;
        use mongodb::options::IndexOptions;
        use mongodb::{Collection, IndexModel};

        let Some(db) = TestDb::create() else {
            return;
        };
        let raw = db.raw().await;
        let models: Collection<Document> = raw.collection("models");
        let versions: Collection<Document> = raw.collection("model_versions");
        // The indexes and documents the release before scoped names left.
        for (coll, keys, unique) in [
            (&models, doc! {"name": 1}, true),
            (&versions, doc! {"name": 1, "version": 1}, true),
            (&versions, doc! {"job_id": 1}, false),
            (
                &versions,
                doc! {"namespace": 1, "name": 1, "version": 1},
                false,
            ),
        ] {
            let options = unique.then(|| IndexOptions::builder().unique(true).build());
            coll.create_index(IndexModel::builder().keys(keys).options(options).build())
                .await
                .unwrap();
        }
        models
            .insert_many([
                doc! {"name": "m", "created_at_ms": 1i64, "namespace": "team-a"},
                doc! {"name": "n", "created_at_ms": 2i64, "namespace": "team-b"},
            ])
            .await
            .unwrap();
        // As `rows_before_scoped_names` has them for the SQL backends.
        let version = |name: &str, v: i64, digest: &str, size: i64, loss: f64, accuracy: f64| {
            let (job, ns, samples) = if name == "m" {
                ("job-a", "team-a", 7i64)
            } else {
                ("job-b", "team-b", 9i64)
            };
            let created_at_ms = if name == "m" { v + 2 } else { 5 };
            doc! {
                "name": name, "version": v, "digest": digest, "size_bytes": size,
                "job_id": job, "round": v, "parent_version": v - 1, "loss": loss,
                "accuracy": accuracy, "samples": samples, "created_at_ms": created_at_ms,
                "namespace": ns,
            }
        };
        versions
            .insert_many([
                version("m", 1, "a1", 10, 0.5, 0.25),
                version("m", 2, "a2", 20, 0.4, 0.5),
                version("n", 1, "b1", 30, 0.3, 0.75),
            ])
            .await
            .unwrap();

        let store = mongo::open_model_store(&db.url, &options()).await.unwrap();
        cohort_store::conformance::models::rows_from_before_scoped_names_survive(store).await;
        // Names are no longer unique across namespaces; the new keys are.
        for (coll, gone) in [
            (&models, doc! {"name": 1}),
            (&versions, doc! {"name": 1, "version": 1}),
        ] {
            let keys: Vec<Document> = coll
                .list_indexes()
                .await
                .unwrap()
                .try_collect::<Vec<IndexModel>>()
                .await
                .unwrap()
                .into_iter()
                .map(|i| i.keys)
                .collect();
            assert!(!keys.contains(&gone), "{gone} is still there: {keys:?}");
        }
        // Reopening (a replica starting later) finds nothing left to change.
        mongo::open_model_store(&db.url, &options()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn models_with_repeated_rounds_upgrade() {
        use futures::TryStreamExt;
        use mongodb::bson::Document;
        use mongodb::options::IndexOptions;
        use mongodb::{Collection, IndexModel};

        let Some(db) = TestDb::create() else {
            return;
        };
        let raw = db.raw().await;
        let models: Collection<Document> = raw.collection("models");
        let versions: Collection<Document> = raw.collection("model_versions");
        // The indexes and documents the release before rounds were stored once
        // left: as `rows_with_repeated_rounds` has them for the SQL backends.
        for (coll, keys, unique) in [
            (&models, doc! {"namespace": 1, "name": 1}, true),
            (
                &versions,
                doc! {"namespace": 1, "name": 1, "version": -1},
                true,
            ),
            (&versions, doc! {"job_id": 1}, false),
        ] {
            let options = unique.then(|| IndexOptions::builder().unique(true).build());
            coll.create_index(IndexModel::builder().keys(keys).options(options).build())
                .await
                .unwrap();
        }
        models
            .insert_many([
                doc! {"namespace": "team-a", "name": "m", "created_at_ms": 1i64},
                doc! {"namespace": "team-b", "name": "n", "created_at_ms": 1i64},
            ])
            .await
            .unwrap();
        let version = |ns: &str, name: &str, v: i64, job: &str, round: i64| {
            doc! {
                "namespace": ns, "name": name, "version": v, "digest": format!("d{v}"),
                "size_bytes": v, "job_id": job, "round": round, "parent_version": 0i64,
                "loss": 0.5, "accuracy": 0.5, "samples": 7i64, "created_at_ms": v,
            }
        };
        versions
            .insert_many([
                version("team-a", "m", 1, "job-a", 1),
                version("team-a", "m", 2, "job-a", 1),
                version("team-a", "m", 3, "job-a", 2),
                version("team-a", "m", 4, "job-a", 1),
                version("team-a", "m", 5, "", 1),
                version("team-b", "n", 1, "job-a", 1),
            ])
            .await
            .unwrap();

        let store = mongo::open_model_store(&db.url, &options()).await.unwrap();
        let flagged: Vec<i64> = versions
            .find(doc! {"round_duplicate": true})
            .sort(doc! {"version": 1})
            .await
            .unwrap()
            .try_collect::<Vec<Document>>()
            .await
            .unwrap()
            .iter()
            .map(|d| d.get_i64("version").unwrap())
            .collect();
        assert_eq!(flagged, [2, 4], "later copies of a round are flagged");
        assert_eq!(
            versions
                .count_documents(doc! {"round_duplicate": {"$exists": false}})
                .await
                .unwrap(),
            0,
            "every version carries the flag"
        );
        cohort_store::conformance::models::repeated_rounds_survive(store).await;
        // The index holds a round to one version even for writers that bypass
        // the store; versions outside jobs' rounds are not held by it.
        let mut copy = version("team-a", "m", 99, "job-a", 2);
        copy.insert("round_duplicate", false);
        let err = versions.insert_one(copy.clone()).await.unwrap_err();
        assert!(err.to_string().contains("E11000"), "{err}");
        copy.insert("round", 0i64);
        versions.insert_one(copy).await.unwrap();
        // Reopening (a replica starting later) finds nothing left to change.
        mongo::open_model_store(&db.url, &options()).await.unwrap();
    }
}
