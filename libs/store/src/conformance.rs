//! The behaviour every store backend must share, written once against the
//! store traits and run against each backend.
//!
//! Each check is a `pub async fn` taking a fresh, empty store; it panics when
//! the backend misbehaves. The macros [`job_store_conformance!`],
//! [`model_store_conformance!`] and [`client_store_conformance!`] stamp out
//! one `#[tokio::test]` per check, so a failure names the backend (the test file
//! and module) and the check (the test name).
//!
//! [`job_store_conformance!`]: crate::job_store_conformance
//! [`model_store_conformance!`]: crate::model_store_conformance
//! [`client_store_conformance!`]: crate::client_store_conformance
//!
//! # Running the suite against a backend
//!
//! In an integration test file of this crate (`tests/conformance_<backend>.rs`):
//!
//! ```ignore
//! use std::sync::Arc;
//! use cohort_store::conformance::Fresh;
//! use cohort_store::jobs::JobStore;
//!
//! /// A fresh, empty store per test, or None to skip (server not configured).
//! async fn fresh_jobs() -> Option<Fresh<dyn JobStore>> {
//!     let db = TempDatabase::create().await?; // whatever the backend needs
//!     let store = cohort_store::open_job_store(&db.url, &Default::default()).await.unwrap();
//!     Some(Fresh::new(store, db)) // `db` is dropped (and cleaned up) after the test
//! }
//!
//! cohort_store::job_store_conformance!(jobs, fresh_jobs());
//! // likewise model_store_conformance!(models, ...) and client_store_conformance!(clients, ...)
//! ```
//!
//! The first argument names the generated test module (`jobs::stale_update_conflicts`,
//! ...); the second is an expression, evaluated once per test inside it (it sees
//! the file's items), giving a future of `Option<Fresh<dyn Trait>>`.

// Test support: a failed expectation is a failed check, so it panics.
#![allow(clippy::unwrap_used)]

use std::any::Any;
use std::sync::Arc;

/// A fresh, empty store for one check, with what must outlive it.
pub struct Fresh<S: ?Sized> {
    pub store: Arc<S>,
    /// Dropped after the store: a temporary directory, a test database that
    /// removes itself on drop, ...
    pub guard: Box<dyn Any + Send>,
}

impl<S: ?Sized> Fresh<S> {
    pub fn new(store: Arc<S>, guard: impl Any + Send) -> Self {
        Self {
            store,
            guard: Box::new(guard),
        }
    }
}

#[doc(hidden)]
/// `migrator` cut down to its first migration, recording in `table`: a database as the first
/// release left it, for each SQL backend's upgrade test.
pub fn first_release(
    mut migrator: sqlx::migrate::Migrator,
    table: &'static str,
) -> sqlx::migrate::Migrator {
    migrator.migrations = std::borrow::Cow::Owned(migrator.migrations[..1].to_vec());
    migrator.dangerous_set_table_name(table);
    migrator
}

#[macro_export]
macro_rules! __store_conformance_tests {
    ($module:ident, $fresh:expr, $suite:ident, [$($check:ident),* $(,)?]) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let Some(fresh) = $fresh.await else {
                        return;
                    };
                    $crate::conformance::$suite::$check(fresh.store.clone()).await;
                    drop(fresh);
                }
            )*
        }
    };
}

/// One test per [`jobs`] check; see the module docs.
#[macro_export]
macro_rules! job_store_conformance {
    ($module:ident, $fresh:expr) => {
        $crate::__store_conformance_tests!(
            $module,
            $fresh,
            jobs,
            [
                create_get_round_trip,
                missing_job_is_not_found,
                duplicate_insert_conflicts,
                stale_update_conflicts,
                update_writes_fields_and_records_state_changes,
                events_are_ordered,
                racing_transitions_record_one_event,
                concurrent_updates_lose_no_increment,
                pages_are_stable_under_concurrent_inserts,
                list_filters,
                jobs_in_states_oldest_first,
                jobs_are_counted_by_state,
                record_round_is_idempotent,
                concurrent_record_round_counts_once,
                delete_cascades,
                round_outcomes_round_trip,
                round_eval_coverage_round_trips,
                round_bytes_round_trip,
                round_selections_round_trip,
                round_privacy_round_trips,
                notes_follow_the_events_with_the_jobs_state,
                notes_are_bounded_per_job,
                concurrent_notes_and_transitions_keep_seqs_unique,
                tokens_insert_get_list_delete,
                tokens_missing_are_not_found,
                tokens_duplicate_id_or_hash_conflicts,
                tokens_ensure_is_idempotent,
                tokens_concurrent_ensure_stores_one,
                audit_appends_and_lists_oldest_first,
                audit_filters_by_namespace_and_time,
                audit_pages_are_stable_under_concurrent_appends,
                audit_fields_are_bounded,
            ]
        );
    };
}

/// One test per [`models`] check; see the module docs.
#[macro_export]
macro_rules! model_store_conformance {
    ($module:ident, $fresh:expr) => {
        $crate::__store_conformance_tests!(
            $module,
            $fresh,
            models,
            [
                versions_number_from_one_per_name,
                missing_versions_are_not_found,
                latest_is_the_highest,
                concurrent_inserts_get_distinct_consecutive_versions,
                nan_metrics_round_trip,
                list_filters_by_name_and_job,
                out_of_range_values_are_refused,
                namespace_is_stored,
                same_name_in_two_namespaces_is_two_models,
                reads_never_cross_namespaces,
                list_filters_by_namespace,
                concurrent_inserts_in_one_namespace_number_from_one,
                concurrent_first_inserts_in_two_namespaces_number_apart,
                a_jobs_round_is_stored_once,
                concurrent_inserts_of_one_round_store_one_version,
                parties_round_trip,
            ]
        );
    };
}

/// One test per [`clients`] check; see the module docs.
#[macro_export]
macro_rules! client_store_conformance {
    ($module:ident, $fresh:expr) => {
        $crate::__store_conformance_tests!(
            $module,
            $fresh,
            clients,
            [
                upsert_get_round_trip,
                reregistration_replaces_holdings_and_keeps_history,
                missing_client_is_not_found,
                touch_never_moves_back,
                concurrent_count_task_loses_nothing,
                task_results_are_counted_and_weigh_recent_ones_more,
                concurrent_task_results_lose_nothing,
                concurrent_first_registrations,
                list_is_ordered_by_party,
                revoke_before_register,
                revoke_keeps_the_first_time,
                reregistration_and_touch_keep_the_revocation,
                concurrent_revocations_create_one_record,
            ]
        );
    };
}

/// Checks of [`JobStore`](crate::jobs::JobStore).
pub mod jobs {
    use std::collections::HashSet;
    use std::sync::Arc;

    use cohort_core::{JobId, JobState};

    use crate::StoreError;
    use crate::audit::{
        AuditFilter, AuditRecord, MAX_FIELD_CHARS, MAX_REASON_CHARS, NewAuditEntry,
    };
    use crate::jobs::{
        JobEventRecord, JobFilter, JobNote, JobRecord, JobStore, RoundRecord, SelectedParty,
    };
    use crate::tokens::{NewToken, TokenRecord};

    pub fn job(name: &str, namespace: &str) -> JobRecord {
        JobRecord {
            id: JobId::generate(name),
            name: name.into(),
            namespace: namespace.into(),
            spec_json: "{}".into(),
            state: JobState::Queued,
            reason: "created".into(),
            rounds_total: 3,
            rounds_completed: 0,
            coordinator_endpoint: None,
            coordinator_pid: None,
            launch_attempts: 0,
            created_at_ms: 1,
            updated_at_ms: 1,
            version: 1,
        }
    }

    pub fn round(n: u32) -> RoundRecord {
        RoundRecord {
            round: n,
            eval_loss: 0.5 / f64::from(n),
            eval_accuracy: 0.9,
            eval_samples: 10 * u64::from(n),
            train_loss: 0.6,
            updates: 2,
            model_version: n,
            duration_ms: 3,
            refused_updates: n % 3,
            dropped_updates: n % 2,
            task_failures: n + 1,
            robust_accuracy: 0.8 + 0.01 * f64::from(n),
            eval_parties: n + 2,
            eval_parties_expected: 2 * n + 3,
            // Beyond u32 and different from each other, so a backend that
            // truncates or swaps them fails every round check.
            bytes_to_parties: 3_000_000_000 + u64::from(n),
            bytes_from_parties: 5_000_000_000 + 7 * u64::from(n),
            bytes_from_parties_uncompressed: 9_000_000_000 + 11 * u64::from(n),
            // Different per round, so a backend that mixes rounds up fails.
            selected: (0..n % 4)
                .map(|i| SelectedParty {
                    party: format!("party-{}", n + i),
                    score: 1.0 / f64::from(n + i + 1),
                    outcome: ["finished", "timed_out", "refused"][i as usize % 3].to_string(),
                })
                .collect(),
            // Different per round, like the rest.
            dp_epsilon: 0.25 * f64::from(n) + 1e-9,
            dp_sampling_rate: 1.0 / f64::from(n + 1),
        }
    }

    /// A log entry; `i` makes it distinct.
    pub fn note(kind: &str, i: u32) -> JobNote {
        JobNote {
            kind: kind.into(),
            round: i,
            party: format!("party-{i}"),
            task_id: format!("t-r{i}-{i:08x}"),
            message: format!("task failed: \"reason\" ✓ {i}"),
        }
    }

    fn assert_not_found<T: std::fmt::Debug>(r: crate::Result<T>, id: &JobId, call: &str) {
        match r {
            Err(StoreError::NotFound { id: got, .. }) => {
                assert_eq!(got, id.as_str(), "{call}: NotFound names the job")
            }
            other => panic!("{call}: expected NotFound, got {other:?}"),
        }
    }

    async fn all_ids(s: &dyn JobStore, filter: &JobFilter, page_size: u32) -> Vec<JobId> {
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = s
                .list_jobs(filter, page_size, token.as_deref())
                .await
                .unwrap();
            assert!(page.items.len() <= page_size as usize);
            seen.extend(page.items.into_iter().map(|j| j.id));
            match page.next_token {
                Some(t) => token = Some(t),
                None => return seen,
            }
        }
    }

    pub async fn create_get_round_trip(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created by test").await.unwrap();
        assert_eq!(s.get_job(&j.id).await.unwrap(), j);
        let events = s.list_events(&j.id, 0).await.unwrap();
        assert_eq!(events.len(), 1, "insert records the first event");
        assert_eq!(
            (events[0].seq, events[0].from, events[0].to),
            (1, None, JobState::Queued)
        );
        assert_eq!(events[0].reason, "created by test");
        assert_eq!(events[0].time_ms, j.created_at_ms);

        // Every field survives, whatever version the caller passed.
        let mut k = job("b", "team-b");
        k.state = JobState::Running;
        k.reason = "it's \"running\" ✓".into();
        k.spec_json = r#"{"name":"ünïcode","rounds":7}"#.into();
        k.rounds_total = 7;
        k.rounds_completed = 2;
        k.coordinator_endpoint = Some("127.0.0.1:5000".into());
        k.coordinator_pid = Some(u32::MAX);
        k.launch_attempts = 4;
        k.created_at_ms = 1_700_000_000_000;
        k.updated_at_ms = 1_700_000_000_001;
        k.version = 42;
        s.insert_job(&k, "adopted").await.unwrap();
        let got = s.get_job(&k.id).await.unwrap();
        assert_eq!(got, JobRecord { version: 1, ..k });
    }

    pub async fn missing_job_is_not_found(s: Arc<dyn JobStore>) {
        let j = job("ghost", "default");
        assert_not_found(s.get_job(&j.id).await, &j.id, "get_job");
        assert_not_found(s.update_job(&j, 2).await, &j.id, "update_job");
        assert_not_found(
            s.record_round(&j.id, &round(1), 2).await,
            &j.id,
            "record_round",
        );
        assert_not_found(s.delete_job(&j.id).await, &j.id, "delete_job");
        assert_not_found(
            s.append_notes(&j.id, &[note("note", 1)], 10, 2).await,
            &j.id,
            "append_notes",
        );
        assert!(s.list_events(&j.id, 0).await.unwrap().is_empty());
        assert!(s.list_rounds(&j.id).await.unwrap().is_empty());
    }

    pub async fn duplicate_insert_conflicts(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let mut again = j.clone();
        again.name = "other".into();
        match s.insert_job(&again, "again").await {
            Err(StoreError::Conflict(m)) => assert!(m.contains(j.id.as_str()), "{m}"),
            other => panic!("expected Conflict, got {other:?}"),
        }
        assert_eq!(
            s.get_job(&j.id).await.unwrap().name,
            "a",
            "first insert kept"
        );
        assert_eq!(s.list_events(&j.id, 0).await.unwrap().len(), 1);
    }

    pub async fn stale_update_conflicts(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let mut read = s.get_job(&j.id).await.unwrap();
        read.state = JobState::Starting;
        read.reason = "launching".into();
        let stored = s.update_job(&read, 5).await.unwrap();
        assert_eq!(stored.version, 2);
        // A writer holding the old version loses instead of overwriting.
        let mut stale = read.clone();
        stale.state = JobState::Failed;
        stale.reason = "stale".into();
        match s.update_job(&stale, 6).await {
            Err(StoreError::Conflict(m)) => assert!(m.contains(j.id.as_str()), "{m}"),
            other => panic!("expected Conflict, got {other:?}"),
        }
        assert_eq!(s.get_job(&j.id).await.unwrap(), stored);
        assert_eq!(s.list_events(&j.id, 0).await.unwrap().len(), 2);
    }

    pub async fn update_writes_fields_and_records_state_changes(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let mut next = j.clone();
        next.reason = "same state".into();
        next.spec_json = r#"{"v":2}"#.into();
        next.rounds_completed = 1;
        next.coordinator_endpoint = Some("10.0.0.1:7000".into());
        next.coordinator_pid = Some(4242);
        next.launch_attempts = 2;
        let stored = s.update_job(&next, 50).await.unwrap();
        assert_eq!(
            stored,
            JobRecord {
                version: 2,
                updated_at_ms: 50,
                ..next.clone()
            }
        );
        assert_eq!(
            s.get_job(&j.id).await.unwrap(),
            stored,
            "update returns what it stored"
        );
        assert_eq!(
            s.list_events(&j.id, 0).await.unwrap().len(),
            1,
            "no event without a state change"
        );
        let mut running = stored.clone();
        running.state = JobState::Running;
        running.reason = "coordinator ready".into();
        running.coordinator_endpoint = None;
        running.coordinator_pid = None;
        let stored = s.update_job(&running, 60).await.unwrap();
        assert_eq!(stored.version, 3);
        assert_eq!(stored.coordinator_endpoint, None);
        assert_eq!(stored.coordinator_pid, None);
        let events = s.list_events(&j.id, 0).await.unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].seq, 2);
        assert_eq!(events[1].time_ms, 60);
        assert_eq!(events[1].from, Some(JobState::Queued));
        assert_eq!(events[1].to, JobState::Running);
        assert_eq!(events[1].reason, "coordinator ready");
    }

    pub async fn events_are_ordered(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let path = [
            JobState::Starting,
            JobState::Running,
            JobState::Stopping,
            JobState::Stopped,
        ];
        let mut cur = j.clone();
        for (i, state) in path.iter().enumerate() {
            cur.state = *state;
            cur.reason = format!("step {i}");
            cur = s.update_job(&cur, 10 + i as i64).await.unwrap();
        }
        let events = s.list_events(&j.id, 0).await.unwrap();
        assert_eq!(events.len(), path.len() + 1);
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "seq counts from 1 without gaps");
        }
        for pair in events.windows(2) {
            assert_eq!(
                pair[1].from,
                Some(pair[0].to),
                "each event starts where the last ended"
            );
            assert!(pair[1].time_ms >= pair[0].time_ms);
        }
        assert_eq!(events[3].reason, "step 2");
        assert_eq!(events.last().map(|e| e.to), Some(JobState::Stopped));
    }

    pub async fn racing_transitions_record_one_event(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (s, mut mine) = (s.clone(), j.clone());
                mine.state = JobState::Starting;
                mine.reason = format!("launcher {i}");
                tokio::spawn(async move { s.update_job(&mine, 10 + i).await })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("expected success or Conflict, got {e}"),
            }
        }
        assert_eq!(won, 1, "one writer wins the version");
        assert_eq!(s.get_job(&j.id).await.unwrap().version, 2);
        assert_eq!(s.list_events(&j.id, 0).await.unwrap().len(), 2);
    }

    pub async fn concurrent_updates_lose_no_increment(s: Arc<dyn JobStore>) {
        const WRITERS: u32 = 16;
        const EACH: u32 = 5;
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (s, id) = (s.clone(), j.id.clone());
                tokio::spawn(async move {
                    let mut conflicts = 0u32;
                    for _ in 0..EACH {
                        loop {
                            let mut cur = s.get_job(&id).await.unwrap();
                            cur.launch_attempts += 1;
                            match s.update_job(&cur, 2).await {
                                Ok(_) => break,
                                Err(StoreError::Conflict(_)) => conflicts += 1,
                                Err(e) => panic!("update_job: {e}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let end = s.get_job(&j.id).await.unwrap();
        assert_eq!(end.launch_attempts, WRITERS * EACH, "no lost update");
        assert_eq!(end.version, 1 + i64::from(WRITERS * EACH));
        assert_eq!(s.list_events(&j.id, 0).await.unwrap().len(), 1);
    }

    pub async fn pages_are_stable_under_concurrent_inserts(s: Arc<dyn JobStore>) {
        let mut originals = Vec::new();
        for i in 0..30 {
            let j = job(&format!("orig{i}"), "default");
            s.insert_job(&j, "created").await.unwrap();
            originals.push(j.id);
        }
        let inserter = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..30 {
                    let j = job(&format!("late{i}"), "default");
                    s.insert_job(&j, "created").await.unwrap();
                    ids.push(j.id);
                    tokio::task::yield_now().await;
                }
                ids
            })
        };
        let seen = all_ids(s.as_ref(), &JobFilter::default(), 4).await;
        let late = inserter.await.unwrap();
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "no job on two pages");
        let seen_originals: Vec<_> = seen.iter().filter(|id| originals.contains(id)).collect();
        assert_eq!(
            seen_originals,
            originals.iter().collect::<Vec<_>>(),
            "every original job exactly once, oldest first"
        );
        let mut all = originals.clone();
        all.extend(late);
        assert_eq!(all_ids(s.as_ref(), &JobFilter::default(), 7).await, all);
    }

    pub async fn list_filters(s: Arc<dyn JobStore>) {
        let mut ids = Vec::new();
        for i in 0..7 {
            let mut j = job(&format!("j{i}"), if i % 2 == 0 { "even" } else { "odd" });
            if i % 3 == 0 {
                j.state = JobState::Running;
            }
            s.insert_job(&j, "created").await.unwrap();
            ids.push(j);
        }
        let pick = |f: &dyn Fn(&JobRecord) -> bool| -> Vec<JobId> {
            ids.iter().filter(|j| f(j)).map(|j| j.id.clone()).collect()
        };
        let filter = |ns: Option<&str>, state: Option<JobState>| JobFilter {
            namespace: ns.map(str::to_string),
            state,
        };
        assert_eq!(
            all_ids(s.as_ref(), &filter(None, None), 3).await,
            pick(&|_| true)
        );
        assert_eq!(
            all_ids(s.as_ref(), &filter(Some("odd"), None), 2).await,
            pick(&|j| j.namespace == "odd")
        );
        assert_eq!(
            all_ids(s.as_ref(), &filter(None, Some(JobState::Running)), 1).await,
            pick(&|j| j.state == JobState::Running)
        );
        assert_eq!(
            all_ids(
                s.as_ref(),
                &filter(Some("even"), Some(JobState::Queued)),
                50
            )
            .await,
            pick(&|j| j.namespace == "even" && j.state == JobState::Queued)
        );
        let none = s
            .list_jobs(&filter(Some("nobody"), None), 10, None)
            .await
            .unwrap();
        assert!(none.items.is_empty() && none.next_token.is_none());
        let one_page = s.list_jobs(&JobFilter::default(), 7, None).await.unwrap();
        assert_eq!(one_page.items.len(), 7);
        assert!(
            one_page.next_token.is_none(),
            "no token after the last page"
        );
        assert!(
            s.list_jobs(&JobFilter::default(), 3, Some("x"))
                .await
                .is_err(),
            "a malformed page token is refused"
        );
    }

    pub async fn jobs_in_states_oldest_first(s: Arc<dyn JobStore>) {
        let states = [
            JobState::Running,
            JobState::Queued,
            JobState::Starting,
            JobState::Succeeded,
            JobState::Running,
            JobState::Starting,
        ];
        let mut jobs = Vec::new();
        for (i, state) in states.iter().enumerate() {
            let mut j = job(&format!("j{i}"), "default");
            j.state = *state;
            s.insert_job(&j, "created").await.unwrap();
            jobs.push(j);
        }
        let got: Vec<_> = s
            .jobs_in_states(&[JobState::Starting, JobState::Running])
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        let want: Vec<_> = jobs
            .iter()
            .filter(|j| matches!(j.state, JobState::Starting | JobState::Running))
            .map(|j| j.id.clone())
            .collect();
        assert_eq!(got, want);
        assert!(s.jobs_in_states(&[]).await.unwrap().is_empty());
        assert!(
            s.jobs_in_states(&[JobState::Deleting])
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn jobs_are_counted_by_state(s: Arc<dyn JobStore>) {
        assert!(s.count_jobs_by_state().await.unwrap().is_empty());
        let states = [
            JobState::Running,
            JobState::Queued,
            JobState::Running,
            JobState::Failed,
            JobState::Running,
        ];
        for (i, state) in states.iter().enumerate() {
            // Namespaces do not matter: the count is the whole store's.
            let mut j = job(
                &format!("c{i}"),
                if i % 2 == 0 { "default" } else { "other" },
            );
            j.state = *state;
            s.insert_job(&j, "created").await.unwrap();
        }
        let mut got = s.count_jobs_by_state().await.unwrap();
        got.sort_by_key(|(state, _)| state.as_str());
        assert_eq!(
            got,
            [
                (JobState::Failed, 1),
                (JobState::Queued, 1),
                (JobState::Running, 3)
            ]
        );
    }

    pub async fn record_round_is_idempotent(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let after = s.record_round(&j.id, &round(1), 7).await.unwrap();
        assert_eq!(after.rounds_completed, 1);
        assert_eq!(after.version, 2);
        assert_eq!(after.updated_at_ms, 7);
        assert_eq!(s.get_job(&j.id).await.unwrap(), after);
        let again = s.record_round(&j.id, &round(1), 8).await.unwrap();
        assert_eq!(again, after, "a repeated report changes nothing");
        let mut different = round(1);
        different.eval_accuracy = 0.1;
        s.record_round(&j.id, &different, 9).await.unwrap();
        // Out of order: round 3 then round 2; completed never goes back.
        let r3 = s.record_round(&j.id, &round(3), 10).await.unwrap();
        assert_eq!(r3.rounds_completed, 3);
        let r2 = s.record_round(&j.id, &round(2), 11).await.unwrap();
        assert_eq!(r2.rounds_completed, 3);
        assert_eq!(
            s.list_rounds(&j.id).await.unwrap(),
            vec![round(1), round(2), round(3)],
            "first report of each round kept, ordered by round"
        );
        assert_eq!(
            s.list_events(&j.id, 0).await.unwrap().len(),
            1,
            "rounds are not events"
        );
    }

    pub async fn concurrent_record_round_counts_once(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (s, id) = (s.clone(), j.id.clone());
                tokio::spawn(async move { s.record_round(&id, &round(1), 100 + i).await })
            })
            .collect();
        for t in tasks {
            let rec = t.await.unwrap().unwrap();
            assert_eq!(rec.rounds_completed, 1);
            assert_eq!(rec.version, 2, "every reporter sees the one recording");
        }
        assert_eq!(s.list_rounds(&j.id).await.unwrap(), vec![round(1)]);
    }

    pub async fn delete_cascades(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        let other = job("b", "default");
        for x in [&j, &other] {
            s.insert_job(x, "created").await.unwrap();
            let mut next = x.clone();
            next.state = JobState::Starting;
            s.update_job(&next, 2).await.unwrap();
            s.record_round(&x.id, &round(1), 3).await.unwrap();
            let full = [note("task_failed", 1), note("note", 2)];
            assert_eq!(s.append_notes(&x.id, &full, 2, 4).await.unwrap(), 2);
        }
        s.delete_job(&j.id).await.unwrap();
        assert_not_found(s.get_job(&j.id).await, &j.id, "get_job after delete");
        assert!(
            s.list_events(&j.id, 0).await.unwrap().is_empty(),
            "events deleted"
        );
        assert!(
            s.list_rounds(&j.id).await.unwrap().is_empty(),
            "rounds deleted"
        );
        assert_not_found(s.delete_job(&j.id).await, &j.id, "second delete_job");
        assert_eq!(
            s.list_events(&other.id, 0).await.unwrap().len(),
            4,
            "others untouched"
        );
        assert_eq!(s.list_rounds(&other.id).await.unwrap().len(), 1);
        // The id is free again, with a fresh history.
        s.insert_job(&j, "recreated").await.unwrap();
        let events = s.list_events(&j.id, 0).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].seq, events[0].reason.as_str()), (1, "recreated"));
        assert!(s.list_rounds(&j.id).await.unwrap().is_empty());
        assert_eq!(
            s.append_notes(&j.id, &[note("note", 3)], 2, 5)
                .await
                .unwrap(),
            1,
            "a recreated job's log starts empty"
        );
        let listed = all_ids(s.as_ref(), &JobFilter::default(), 10).await;
        assert_eq!(listed, vec![other.id.clone(), j.id.clone()]);
    }

    pub async fn round_outcomes_round_trip(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let mut r1 = round(1);
        (r1.dropped_updates, r1.task_failures, r1.robust_accuracy) = (u32::MAX, 7, 0.0);
        let mut r2 = round(2);
        (r2.dropped_updates, r2.task_failures, r2.robust_accuracy) = (0, 0, 1.0);
        let mut r3 = round(3);
        r3.robust_accuracy = f64::NAN;
        for r in [&r1, &r2, &r3] {
            s.record_round(&j.id, r, 5).await.unwrap();
        }
        let got = s.list_rounds(&j.id).await.unwrap();
        assert_eq!(got[..2], [r1, r2]);
        assert!(
            got[2].robust_accuracy.is_nan(),
            "NaN survives: {:?}",
            got[2]
        );
        assert_eq!(
            RoundRecord {
                robust_accuracy: 0.0,
                ..got[2].clone()
            },
            RoundRecord {
                robust_accuracy: 0.0,
                ..r3
            }
        );
    }

    pub async fn round_eval_coverage_round_trips(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let coverage = [(0, 0), (0, 5), (3, 5), (u32::MAX, u32::MAX)];
        let mut want = Vec::new();
        for (i, (parties, expected)) in coverage.into_iter().enumerate() {
            let mut r = round(i as u32 + 1);
            (r.eval_parties, r.eval_parties_expected) = (parties, expected);
            s.record_round(&j.id, &r, 5).await.unwrap();
            want.push(r);
        }
        assert_eq!(s.list_rounds(&j.id).await.unwrap(), want);
        // A repeated report with other coverage changes nothing.
        let mut again = want[2].clone();
        (again.eval_parties, again.eval_parties_expected) = (5, 5);
        s.record_round(&j.id, &again, 6).await.unwrap();
        assert_eq!(s.list_rounds(&j.id).await.unwrap()[2], want[2]);
    }

    pub async fn round_bytes_round_trip(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let max = i64::MAX as u64;
        let bytes = [
            (0, 0, 0),
            (3_000_000_000, 7, 28),
            (1, 3_000_000_000, 12_000_000_000),
            (max, max - 1, max - 2),
        ];
        let mut want = Vec::new();
        for (i, (to, from, dense)) in bytes.into_iter().enumerate() {
            let mut r = round(i as u32 + 1);
            (
                r.bytes_to_parties,
                r.bytes_from_parties,
                r.bytes_from_parties_uncompressed,
            ) = (to, from, dense);
            s.record_round(&j.id, &r, 5).await.unwrap();
            want.push(r);
        }
        assert_eq!(s.list_rounds(&j.id).await.unwrap(), want);
        // Above the databases' 63-bit range: refused, naming the field, and
        // nothing is recorded.
        for (to, from, dense, field) in [
            (max + 1, 0, 0, "bytes_to_parties"),
            (0, u64::MAX, 0, "bytes_from_parties"),
            (0, 0, max + 1, "bytes_from_parties_uncompressed"),
        ] {
            let mut r = round(9);
            (
                r.bytes_to_parties,
                r.bytes_from_parties,
                r.bytes_from_parties_uncompressed,
            ) = (to, from, dense);
            match s.record_round(&j.id, &r, 6).await {
                Err(StoreError::Corrupt { message, .. }) => {
                    assert!(message.contains(field), "names {field}: {message}")
                }
                other => panic!("{field}: expected Corrupt, got {other:?}"),
            }
        }
        assert_eq!(s.list_rounds(&j.id).await.unwrap(), want);
        assert_eq!(s.get_job(&j.id).await.unwrap().rounds_completed, 4);
    }

    pub async fn round_selections_round_trip(s: Arc<dyn JobStore>) {
        let j = job("selected", "default");
        s.insert_job(&j, "created").await.unwrap();
        let mut r = round(1);
        r.selected = vec![
            SelectedParty {
                party: "Z.lab".into(),
                score: 0.083_333_333_333_333_33,
                outcome: "timed_out".into(),
            },
            SelectedParty {
                party: "a_party".into(),
                score: 1797.0,
                outcome: "finished".into(),
            },
            // Drawn twice in one round (again after a failure).
            SelectedParty {
                party: "Z.lab".into(),
                score: 0.0,
                outcome: "refused".into(),
            },
        ];
        s.record_round(&j.id, &r, 10).await.unwrap();
        let r2 = RoundRecord {
            selected: Vec::new(),
            ..round(2)
        };
        s.record_round(&j.id, &r2, 11).await.unwrap();
        assert_eq!(s.list_rounds(&j.id).await.unwrap(), vec![r.clone(), r2]);
        // A score that is not finite is refused, naming the round; nothing is written.
        let mut bad = round(3);
        bad.selected[0].score = f64::NAN;
        let err = s
            .record_round(&j.id, &bad, 12)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("selected") && err.contains("round 3"), "{err}");
        assert_eq!(s.list_rounds(&j.id).await.unwrap().len(), 2);
        assert_eq!(s.get_job(&j.id).await.unwrap().rounds_completed, 2);
    }

    pub async fn round_privacy_round_trips(s: Arc<dyn JobStore>) {
        let j = job("private", "default");
        s.insert_job(&j, "created").await.unwrap();
        // No DP; a figure to the last bit; no noise (ε infinite); every party (q = 1).
        let figures = [
            (0.0, 0.0),
            (7.903_850_223_578_231, 2.0 / 3.0),
            (f64::INFINITY, 0.5),
            (1e-300, 1.0),
        ];
        let mut want = Vec::new();
        for (i, (epsilon, q)) in figures.into_iter().enumerate() {
            let mut r = round(i as u32 + 1);
            (r.dp_epsilon, r.dp_sampling_rate) = (epsilon, q);
            s.record_round(&j.id, &r, 5).await.unwrap();
            want.push(r);
        }
        assert_eq!(s.list_rounds(&j.id).await.unwrap(), want);
        // What means nothing is refused, naming the field; nothing is written.
        for (epsilon, q, field) in [
            (f64::NAN, 0.5, "dp_epsilon"),
            (-1.0, 0.5, "dp_epsilon"),
            (1.0, 1.5, "dp_sampling_rate"),
            (1.0, f64::NAN, "dp_sampling_rate"),
        ] {
            let mut r = round(9);
            (r.dp_epsilon, r.dp_sampling_rate) = (epsilon, q);
            match s.record_round(&j.id, &r, 6).await {
                Err(StoreError::Corrupt { message, .. }) => {
                    assert!(message.contains(field), "names {field}: {message}")
                }
                other => panic!("{field}: expected Corrupt, got {other:?}"),
            }
        }
        assert_eq!(s.list_rounds(&j.id).await.unwrap(), want);
    }

    pub async fn notes_follow_the_events_with_the_jobs_state(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let mut running = j.clone();
        running.state = JobState::Running;
        running.reason = "coordinator ready".into();
        let running = s.update_job(&running, 10).await.unwrap();
        let notes = [
            note("task_failed", 1),
            note("party_left_out", 2),
            note("note", 0),
        ];
        assert_eq!(s.append_notes(&j.id, &notes, 100, 20).await.unwrap(), 3);
        assert_eq!(
            s.get_job(&j.id).await.unwrap(),
            running,
            "notes leave the job record (and its version) alone"
        );
        let mut stopping = running.clone();
        stopping.state = JobState::Stopping;
        stopping.reason = "stopped by user".into();
        s.update_job(&stopping, 30).await.unwrap();

        let events = s.list_events(&j.id, 0).await.unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
        for (e, n) in events[2..5].iter().zip(&notes) {
            assert_eq!(
                e,
                &JobEventRecord {
                    seq: e.seq,
                    time_ms: 20,
                    from: Some(JobState::Running),
                    to: JobState::Running,
                    reason: n.message.clone(),
                    kind: n.kind.clone(),
                    round: n.round,
                    party: n.party.clone(),
                    task_id: n.task_id.clone(),
                }
            );
        }
        let last = &events[5];
        assert_eq!(
            (last.from, last.to, last.kind.as_str(), last.round),
            (Some(JobState::Running), JobState::Stopping, "", 0),
            "a state change after notes is an ordinary one"
        );
        assert!(
            events[..2]
                .iter()
                .all(|e| e.kind.is_empty() && e.party.is_empty() && e.task_id.is_empty())
        );

        let tail = s.list_events(&j.id, 4).await.unwrap();
        assert_eq!(tail, events[4..].to_vec(), "only events after seq 4");
        assert!(s.list_events(&j.id, 6).await.unwrap().is_empty());
        assert!(s.list_events(&j.id, u64::MAX).await.unwrap().is_empty());
        assert_eq!(s.append_notes(&j.id, &[], 100, 40).await.unwrap(), 0);
        assert_eq!(s.list_events(&j.id, 0).await.unwrap().len(), 6);
    }

    pub async fn notes_are_bounded_per_job(s: Arc<dyn JobStore>) {
        let j = job("a", "default");
        let other = job("b", "default");
        for x in [&j, &other] {
            s.insert_job(x, "created").await.unwrap();
        }
        let batch = |from: u32, n: u32| -> Vec<JobNote> {
            (from..from + n)
                .map(|i| note("update_refused", i))
                .collect()
        };
        assert_eq!(s.append_notes(&j.id, &batch(0, 3), 5, 2).await.unwrap(), 3);
        assert_eq!(
            s.append_notes(&j.id, &batch(3, 4), 5, 3).await.unwrap(),
            2,
            "only what fits is stored"
        );
        assert_eq!(s.append_notes(&j.id, &batch(7, 1), 5, 4).await.unwrap(), 0);
        // State changes do not count against the bound and still go in.
        let mut next = j.clone();
        next.state = JobState::Starting;
        s.update_job(&next, 5).await.unwrap();
        let events = s.list_events(&j.id, 0).await.unwrap();
        let rounds: Vec<u32> = events
            .iter()
            .filter(|e| !e.kind.is_empty())
            .map(|e| e.round)
            .collect();
        assert_eq!(rounds, [0, 1, 2, 3, 4], "the first five kept, in order");
        assert_eq!(events.len(), 7);
        assert_eq!(events[6].to, JobState::Starting);
        // A larger bound makes room again; other jobs have their own.
        assert_eq!(s.append_notes(&j.id, &batch(8, 3), 6, 6).await.unwrap(), 1);
        assert_eq!(
            s.append_notes(&other.id, &batch(0, 4), 5, 7).await.unwrap(),
            4
        );
    }

    pub async fn concurrent_notes_and_transitions_keep_seqs_unique(s: Arc<dyn JobStore>) {
        const WRITERS: u32 = 8;
        const CALLS: u32 = 5;
        const MAX: u64 = 60;
        let j = job("a", "default");
        s.insert_job(&j, "created").await.unwrap();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (s, id) = (s.clone(), j.id.clone());
                tokio::spawn(async move {
                    let mut stored = 0u32;
                    for c in 0..CALLS {
                        let notes = [note("note", w * 100 + c), note("note", w * 100 + 50 + c)];
                        stored += s.append_notes(&id, &notes, MAX, 10).await.unwrap();
                    }
                    stored
                })
            })
            .collect();
        let path = [
            JobState::Starting,
            JobState::Running,
            JobState::Stopping,
            JobState::Stopped,
        ];
        for state in path {
            loop {
                let mut cur = s.get_job(&j.id).await.unwrap();
                cur.state = state;
                cur.reason = format!("to {state}");
                match s.update_job(&cur, 11).await {
                    Ok(_) => break,
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => panic!("update_job: {e}"),
                }
            }
            tokio::task::yield_now().await;
        }
        let mut stored = 0;
        for w in writers {
            stored += w.await.unwrap();
        }
        let offered = u64::from(WRITERS * CALLS * 2);
        assert_eq!(
            u64::from(stored),
            offered.min(MAX),
            "what the calls said they stored"
        );
        let events = s.list_events(&j.id, 0).await.unwrap();
        let notes = events.iter().filter(|e| !e.kind.is_empty()).count();
        assert_eq!(notes as u64, offered.min(MAX), "what is stored");
        assert_eq!(
            events.len() - notes,
            1 + path.len(),
            "every transition recorded"
        );
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "seqs are unique and without gaps");
        }
        // Each note carries the state the job was in when it was appended.
        let mut state = JobState::Queued;
        for e in &events {
            if e.kind.is_empty() {
                assert_eq!(e.from.unwrap_or(state), state, "seq {}", e.seq);
                state = e.to;
            } else {
                assert_eq!((e.from, e.to), (Some(state), state), "seq {}", e.seq);
            }
        }
        assert_eq!(state, JobState::Stopped);
    }

    /// A job with one event and one round, as the first release's schema
    /// stores them (the same SQL on SQLite and PostgreSQL), for the upgrade
    /// tests; [`check_first_release_job`] then reads them through the store.
    pub const FIRST_RELEASE_JOB_ROWS: [&str; 3] = [
        "INSERT INTO jobs (id, name, namespace, spec_json, state, reason, rounds_total, \
         rounds_completed, created_at_ms, updated_at_ms) \
         VALUES ('old-abc123', 'old', 'default', '{}', 'RUNNING', 'coordinator ready', 3, 1, 1, 2)",
        "INSERT INTO job_events (job_id, seq, time_ms, from_state, to_state, reason) \
         VALUES ('old-abc123', 1, 1, NULL, 'RUNNING', 'created')",
        "INSERT INTO job_rounds (job_id, round, eval_loss, eval_accuracy, eval_samples, \
         train_loss, updates, model_version, duration_ms) \
         VALUES ('old-abc123', 1, 0.5, 0.75, 10, 0.6, 2, 1, 3)",
    ];

    /// The rows of [`FIRST_RELEASE_JOB_ROWS`] after the upgrade: what later
    /// columns add reads as nothing (evaluation coverage 0 of 0, 0 bytes),
    /// the job takes log entries, and new rounds keep every field.
    pub async fn check_first_release_job(s: &dyn JobStore) {
        let id = JobId::parse("old-abc123").unwrap();
        let job = s.get_job(&id).await.unwrap();
        assert_eq!((job.state, job.rounds_completed), (JobState::Running, 1));
        let rounds = s.list_rounds(&id).await.unwrap();
        assert_eq!(rounds.len(), 1);
        let r = &rounds[0];
        assert_eq!((r.round, r.eval_accuracy, r.updates), (1, 0.75, 2));
        assert_eq!(
            (
                r.refused_updates,
                r.dropped_updates,
                r.task_failures,
                r.robust_accuracy
            ),
            (0, 0, 0, 0.0)
        );
        assert_eq!((r.eval_parties, r.eval_parties_expected), (0, 0));
        assert_eq!((r.bytes_to_parties, r.bytes_from_parties), (0, 0));
        assert_eq!(r.bytes_from_parties_uncompressed, 0);
        let events = s.list_events(&id, 0).await.unwrap();
        assert_eq!(
            events,
            vec![JobEventRecord {
                seq: 1,
                time_ms: 1,
                from: None,
                to: JobState::Running,
                reason: "created".into(),
                kind: String::new(),
                round: 0,
                party: String::new(),
                task_id: String::new(),
            }]
        );
        assert_eq!(
            s.append_notes(&id, &[note("task_failed", 2)], 1, 9)
                .await
                .unwrap(),
            1
        );
        let added = s.list_events(&id, 1).await.unwrap();
        assert_eq!(added.len(), 1);
        assert_eq!(
            (added[0].seq, added[0].from, added[0].kind.as_str()),
            (2, Some(JobState::Running), "task_failed")
        );
        assert_eq!(
            s.append_notes(&id, &[note("note", 3)], 1, 9).await.unwrap(),
            0,
            "the bound counts from the upgrade"
        );
        let r2 = round(2);
        s.record_round(&id, &r2, 10).await.unwrap();
        assert_eq!(s.list_rounds(&id).await.unwrap()[1], r2);
    }

    // API tokens: every job store holds them (`JobStore: TokenStore`).

    /// A distinct lowercase hex sha256 per `n`.
    pub fn token_hash(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    pub fn new_token(id: &str, n: u8, namespace: &str, role: &str) -> NewToken {
        NewToken {
            id: id.to_string(),
            name: format!("token {id} ✓"),
            sha256: token_hash(n),
            namespace: namespace.to_string(),
            role: role.to_string(),
        }
    }

    fn assert_token_not_found<T: std::fmt::Debug>(r: crate::Result<T>, call: &str) -> String {
        match r {
            Err(StoreError::NotFound { what, id }) => {
                assert_eq!(what, "token", "{call}");
                id
            }
            other => panic!("{call}: expected NotFound, got {other:?}"),
        }
    }

    pub async fn tokens_insert_get_list_delete(s: Arc<dyn JobStore>) {
        let a = s
            .insert_token(new_token("tok-a", 1, "team-a", "member"), 20)
            .await
            .unwrap();
        assert_eq!(
            a,
            TokenRecord {
                id: "tok-a".into(),
                name: "token tok-a ✓".into(),
                sha256: token_hash(1),
                namespace: "team-a".into(),
                role: "member".into(),
                created_at_ms: 20,
            }
        );
        let all = s
            .insert_token(new_token("tok-Z", 2, "*", "admin"), 10)
            .await
            .unwrap();
        let b = s
            .insert_token(new_token("tok-b", 3, "team-b", "viewer"), 20)
            .await
            .unwrap();
        let a2 = s
            .insert_token(new_token("tok-B", 4, "team-a", "viewer"), 20)
            .await
            .unwrap();
        assert_eq!(s.token_by_sha256(&token_hash(3)).await.unwrap(), b);
        assert_eq!(s.token_by_sha256(&token_hash(1)).await.unwrap(), a);
        assert_eq!(s.get_token("tok-b").await.unwrap(), b);
        assert_eq!(
            s.get_token("tok-B").await.unwrap(),
            a2,
            "ids are case-sensitive"
        );
        // By creation time, then id bytewise ("tok-B" < "tok-a" < "tok-b").
        assert_eq!(
            s.list_tokens(None).await.unwrap(),
            vec![all.clone(), a2.clone(), a.clone(), b.clone()]
        );
        assert_eq!(
            s.list_tokens(Some("team-a")).await.unwrap(),
            vec![a2.clone(), a.clone()]
        );
        assert_eq!(
            s.list_tokens(Some("*")).await.unwrap(),
            vec![all.clone()],
            "a namespace filter is exact: \"*\" lists the tokens for all namespaces"
        );
        assert!(s.list_tokens(Some("nobody")).await.unwrap().is_empty());

        s.delete_token("tok-a").await.unwrap();
        assert_token_not_found(s.token_by_sha256(&token_hash(1)).await, "deleted token");
        assert_token_not_found(s.get_token("tok-a").await, "deleted token by id");
        assert_eq!(s.list_tokens(None).await.unwrap(), vec![all, a2, b.clone()]);
        // The id and the hash are free again.
        let again = s
            .insert_token(new_token("tok-a", 1, "team-c", "admin"), 30)
            .await
            .unwrap();
        assert_eq!(s.token_by_sha256(&token_hash(1)).await.unwrap(), again);
        // Tokens and jobs live side by side.
        let j = job("a", "team-b");
        s.insert_job(&j, "created").await.unwrap();
        s.delete_job(&j.id).await.unwrap();
        assert_eq!(s.token_by_sha256(&token_hash(3)).await.unwrap(), b);
    }

    pub async fn tokens_missing_are_not_found(s: Arc<dyn JobStore>) {
        assert_token_not_found(s.token_by_sha256(&token_hash(9)).await, "token_by_sha256");
        let id = assert_token_not_found(s.get_token("ghost").await, "get_token");
        assert_eq!(id, "ghost", "NotFound names the token");
        let id = assert_token_not_found(s.delete_token("ghost").await, "delete_token");
        assert_eq!(id, "ghost", "NotFound names the token");
        assert!(s.list_tokens(None).await.unwrap().is_empty());
        s.insert_token(new_token("t", 1, "default", "viewer"), 1)
            .await
            .unwrap();
        assert_token_not_found(s.token_by_sha256(&token_hash(2)).await, "other hash");
        assert_token_not_found(s.delete_token("T").await, "ids are case-sensitive");
    }

    pub async fn tokens_duplicate_id_or_hash_conflicts(s: Arc<dyn JobStore>) {
        let first = s
            .insert_token(new_token("tok", 1, "team-a", "member"), 1)
            .await
            .unwrap();
        for (what, t) in [
            ("same id", new_token("tok", 2, "team-b", "viewer")),
            ("same hash", new_token("other", 1, "team-b", "viewer")),
            ("both", new_token("tok", 1, "team-a", "member")),
        ] {
            match s.insert_token(t, 2).await {
                Err(StoreError::Conflict(m)) => {
                    assert!(
                        !m.contains(&token_hash(1)),
                        "{what}: hash printed whole: {m}"
                    )
                }
                other => panic!("{what}: expected Conflict, got {other:?}"),
            }
        }
        assert_eq!(s.list_tokens(None).await.unwrap(), vec![first]);
    }

    pub async fn tokens_ensure_is_idempotent(s: Arc<dyn JobStore>) {
        let boot = s
            .ensure_token(new_token("boot", 5, "*", "admin"), 100)
            .await
            .unwrap();
        assert_eq!(boot, new_token("boot", 5, "*", "admin").record(100));
        assert_eq!(s.token_by_sha256(&token_hash(5)).await.unwrap(), boot);
        // Every start ensures it again, maybe with other details: the stored
        // token stays as it is.
        let mut again = new_token("boot-2", 5, "team-a", "viewer");
        again.name = "renamed".into();
        assert_eq!(s.ensure_token(again, 200).await.unwrap(), boot);
        assert_eq!(
            s.ensure_token(new_token("boot", 5, "*", "admin"), 300)
                .await
                .unwrap(),
            boot
        );
        assert_eq!(s.list_tokens(None).await.unwrap(), vec![boot.clone()]);
        // A new hash under a taken id is refused, and so is inserting the hash.
        assert!(matches!(
            s.ensure_token(new_token("boot", 6, "*", "admin"), 400)
                .await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            s.insert_token(new_token("fresh", 5, "*", "admin"), 400)
                .await,
            Err(StoreError::Conflict(_))
        ));
        let other = s
            .ensure_token(new_token("other", 6, "team-a", "member"), 500)
            .await
            .unwrap();
        assert_eq!(other.created_at_ms, 500);
        assert_eq!(s.list_tokens(None).await.unwrap(), vec![boot, other]);
    }

    pub async fn tokens_concurrent_ensure_stores_one(s: Arc<dyn JobStore>) {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.ensure_token(new_token(&format!("boot-{i}"), 7, "*", "admin"), 100 + i)
                        .await
                })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap().unwrap());
        }
        let stored = s.list_tokens(None).await.unwrap();
        assert_eq!(stored.len(), 1, "one token: {stored:?}");
        for g in got {
            assert_eq!(g, stored[0], "every caller gets the stored token");
        }
    }

    // The audit log: every job store holds it (`JobStore: AuditStore`).

    /// An entry of `action` on `object_id` in `namespace` by token `actor`.
    pub fn audit_entry(
        action: &str,
        object_id: &str,
        namespace: &str,
        actor: &str,
    ) -> NewAuditEntry {
        NewAuditEntry {
            actor_kind: "token".into(),
            actor_id: actor.into(),
            actor_name: format!("name of {actor} ✓"),
            action: action.into(),
            object_kind: action.split('.').next().unwrap_or("").into(),
            object_id: object_id.into(),
            namespace: namespace.into(),
            outcome: "ok".into(),
            reason: String::new(),
        }
    }

    /// Every entry `filter` selects, page by page (`size` per page).
    pub async fn all_audit(s: &dyn JobStore, filter: &AuditFilter, size: u32) -> Vec<AuditRecord> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..10_000 {
            let page = s.list_audit(filter, size, token.as_deref()).await.unwrap();
            assert!(
                page.items.len() <= size.max(1) as usize,
                "page over its size"
            );
            all.extend(page.items);
            match page.next_token {
                Some(t) => token = Some(t),
                None => return all,
            }
        }
        panic!("paging did not end");
    }

    pub async fn audit_appends_and_lists_oldest_first(s: Arc<dyn JobStore>) {
        let everything = AuditFilter::default();
        assert!(
            s.list_audit(&everything, 10, None)
                .await
                .unwrap()
                .items
                .is_empty()
        );
        let mut denied = audit_entry("job.stop", "j-1", "team-a", "tok-v");
        denied.outcome = "permission_denied".into();
        denied.reason = "a viewer may not stop jobs".into();
        let first = s
            .append_audit(audit_entry("job.create", "j-1", "team-a", "tok-a"), 100)
            .await
            .unwrap();
        let second = s.append_audit(denied.clone(), 90).await.unwrap();
        assert_eq!(
            second,
            AuditRecord {
                id: second.id,
                time_ms: 90,
                actor_kind: "token".into(),
                actor_id: "tok-v".into(),
                actor_name: "name of tok-v ✓".into(),
                action: "job.stop".into(),
                object_kind: "job".into(),
                object_id: "j-1".into(),
                namespace: "team-a".into(),
                outcome: "permission_denied".into(),
                reason: "a viewer may not stop jobs".into(),
            }
        );
        assert!(
            second.id > first.id,
            "ids grow: {} then {}",
            first.id,
            second.id
        );
        let mut party = audit_entry("party.revoke", "p-3", "*", "admin-1");
        party.object_kind = "party".into();
        let third = s.append_audit(party, 110).await.unwrap();
        // Insertion order, whatever the clocks said.
        let page = s.list_audit(&everything, 10, None).await.unwrap();
        assert_eq!(page.items, vec![first, second, third]);
        assert_eq!(page.next_token, None);
        // Jobs and tokens live beside it, untouched.
        assert!(s.list_tokens(None).await.unwrap().is_empty());
        assert!(matches!(
            s.list_audit(&everything, 10, Some("not a token")).await,
            Err(StoreError::Conflict(_))
        ));
    }

    pub async fn audit_filters_by_namespace_and_time(s: Arc<dyn JobStore>) {
        let a1 = s
            .append_audit(audit_entry("job.create", "j-1", "team-a", "t1"), 1_000)
            .await
            .unwrap();
        let b1 = s
            .append_audit(audit_entry("job.create", "j-2", "team-b", "t2"), 2_000)
            .await
            .unwrap();
        let all = s
            .append_audit(audit_entry("token.create", "t9", "*", "t1"), 3_000)
            .await
            .unwrap();
        let a2 = s
            .append_audit(audit_entry("job.delete", "j-1", "team-a", "t1"), 4_000)
            .await
            .unwrap();
        let in_ns = |ns: &str| AuditFilter {
            namespace: Some(ns.to_string()),
            since_ms: None,
        };
        assert_eq!(
            all_audit(&*s, &in_ns("team-a"), 10).await,
            vec![a1.clone(), a2.clone()]
        );
        assert_eq!(all_audit(&*s, &in_ns("team-b"), 10).await, vec![b1.clone()]);
        assert_eq!(
            all_audit(&*s, &in_ns("*"), 10).await,
            vec![all.clone()],
            "a namespace filter is exact: \"*\" is the entries about every namespace"
        );
        assert!(
            all_audit(&*s, &in_ns("team-A"), 10).await.is_empty(),
            "case-sensitive"
        );
        let since = |ms: i64, ns: Option<&str>| AuditFilter {
            namespace: ns.map(str::to_string),
            since_ms: Some(ms),
        };
        assert_eq!(
            all_audit(&*s, &since(2_000, None), 10).await,
            vec![b1, all, a2.clone()],
            "since is inclusive"
        );
        assert_eq!(
            all_audit(&*s, &since(2_001, Some("team-a")), 10).await,
            vec![a2]
        );
        assert!(all_audit(&*s, &since(4_001, None), 10).await.is_empty());
        assert_eq!(all_audit(&*s, &since(0, Some("team-a")), 10).await[0], a1);
    }

    pub async fn audit_pages_are_stable_under_concurrent_appends(s: Arc<dyn JobStore>) {
        let mut before = Vec::new();
        for i in 0..23 {
            let ns = if i % 3 == 0 { "team-b" } else { "team-a" };
            before.push(
                s.append_audit(audit_entry("job.create", &format!("j-{i}"), ns, "t"), i)
                    .await
                    .unwrap(),
            );
        }
        // Page through while others append: every entry that existed is seen
        // once, in order, and nothing repeats.
        let writer = {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    s.append_audit(
                        audit_entry("job.stop", &format!("late-{i}"), "team-a", "w"),
                        100 + i,
                    )
                    .await
                    .unwrap();
                }
            })
        };
        let filter = AuditFilter {
            namespace: Some("team-a".into()),
            since_ms: None,
        };
        let seen = all_audit(&*s, &filter, 4).await;
        writer.await.unwrap();
        let ids: Vec<u64> = seen.iter().map(|r| r.id).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(ids, sorted, "oldest first, no repeats");
        let want: Vec<AuditRecord> = before
            .into_iter()
            .filter(|r| r.namespace == "team-a")
            .collect();
        assert_eq!(
            &seen[..want.len()],
            &want[..],
            "every earlier entry, in order"
        );
        assert!(seen[want.len()..].iter().all(|r| r.action == "job.stop"));
        // After the writer: all of them, with a page size of one too.
        let everything = all_audit(&*s, &filter, 1).await;
        assert_eq!(everything.len(), want.len() + 20);
        let pairs: HashSet<(String, String)> = everything
            .iter()
            .map(|r| (r.action.clone(), r.object_id.clone()))
            .collect();
        assert_eq!(pairs.len(), everything.len(), "each entry once");
    }

    pub async fn audit_fields_are_bounded(s: Arc<dyn JobStore>) {
        let long = NewAuditEntry {
            actor_name: "ü".repeat(MAX_FIELD_CHARS * 3),
            object_id: "x".repeat(MAX_FIELD_CHARS + 1),
            reason: "why ".repeat(MAX_REASON_CHARS),
            ..audit_entry("job.create", "", "team-a", "t")
        };
        let stored = s.append_audit(long, 5).await.unwrap();
        assert_eq!(stored.actor_name, "ü".repeat(MAX_FIELD_CHARS));
        assert_eq!(stored.object_id, "x".repeat(MAX_FIELD_CHARS));
        assert_eq!(stored.reason.chars().count(), MAX_REASON_CHARS);
        let listed = s
            .list_audit(&AuditFilter::default(), 1, None)
            .await
            .unwrap();
        assert_eq!(listed.items, vec![stored]);
    }
}

/// Checks of [`ModelStore`](crate::models::ModelStore).
pub mod models {
    use std::sync::Arc;

    use crate::StoreError;
    use crate::models::{ModelStore, ModelVersionRecord, NewModelVersion, StoredVersion};

    /// The namespace of [`new_version`]'s versions.
    pub const NS: &str = "default";

    /// A version of `name` in namespace [`NS`], round 3 of `job` (a job's
    /// round is stored once: see [`in_round`]).
    pub fn new_version(name: &str, job: &str) -> NewModelVersion {
        new_version_in(name, job, NS)
    }

    /// `v` as round `round` of its job.
    pub fn in_round(v: NewModelVersion, round: u32) -> NewModelVersion {
        NewModelVersion { round, ..v }
    }

    /// Inserts `v`, which must be stored as a new version: its record.
    pub async fn insert_new(
        s: &dyn ModelStore,
        v: NewModelVersion,
        now_ms: i64,
    ) -> ModelVersionRecord {
        let stored = s.insert_version(v, now_ms).await.unwrap();
        assert!(stored.created, "expected a new version, got {stored:?}");
        stored.record
    }

    pub fn new_version_in(name: &str, job: &str, namespace: &str) -> NewModelVersion {
        NewModelVersion {
            namespace: namespace.to_string(),
            name: name.to_string(),
            digest: "ab".repeat(32),
            size_bytes: 1234,
            job_id: job.to_string(),
            round: 3,
            parent_version: 0,
            loss: 0.5,
            accuracy: 0.75,
            samples: 100,
            parties: vec!["party-1".to_string(), "party-2".to_string()],
        }
    }

    /// The record of an insert that must have stored a new version.
    fn new_record(r: crate::Result<StoredVersion>) -> ModelVersionRecord {
        let stored = r.unwrap();
        assert!(stored.created, "expected a new version, got {stored:?}");
        stored.record
    }

    /// The answer, as text, to reading `name@version` (0: the latest) in
    /// `namespace`, which must be a miss.
    async fn miss(s: &dyn ModelStore, namespace: &str, name: &str, version: u32) -> String {
        let r = if version == 0 {
            s.latest_version(namespace, name).await
        } else {
            s.get_version(namespace, name, version).await
        };
        match r {
            Err(e @ StoreError::NotFound { .. }) => e.to_string(),
            other => panic!("{namespace}/{name}@{version}: expected NotFound, got {other:?}"),
        }
    }

    pub async fn versions_number_from_one_per_name(s: Arc<dyn ModelStore>) {
        let v1 = insert_new(&*s, new_version("mnist", "job-a"), 1000).await;
        let want = new_version("mnist", "job-a");
        assert_eq!(
            v1,
            ModelVersionRecord {
                name: want.name,
                version: 1,
                digest: want.digest,
                size_bytes: want.size_bytes,
                job_id: want.job_id,
                round: want.round,
                parent_version: want.parent_version,
                loss: want.loss,
                accuracy: want.accuracy,
                samples: want.samples,
                created_at_ms: 1000,
                namespace: want.namespace,
                parties: want.parties,
            }
        );
        let mut second = new_version("mnist", "job-a");
        second.parent_version = 1;
        second.round = 4;
        second.size_bytes = u64::from(u32::MAX) + 1;
        let v2 = insert_new(&*s, second, 2000).await;
        assert_eq!(
            (v2.version, v2.parent_version, v2.round, v2.created_at_ms),
            (2, 1, 4, 2000)
        );
        assert_eq!(v2.size_bytes, u64::from(u32::MAX) + 1);
        let other = insert_new(&*s, new_version("cifar", "job-b"), 3000).await;
        assert_eq!(other.version, 1, "numbering is per name");
        assert_eq!(s.get_version(NS, "mnist", 1).await.unwrap(), v1);
        assert_eq!(s.get_version(NS, "mnist", 2).await.unwrap(), v2);
    }

    pub async fn missing_versions_are_not_found(s: Arc<dyn ModelStore>) {
        match s.get_version(NS, "nope", 7).await {
            Err(StoreError::NotFound { id, .. }) => assert_eq!(id, "nope@7"),
            other => panic!("expected NotFound, got {other:?}"),
        }
        match s.latest_version(NS, "nope").await {
            Err(StoreError::NotFound { id, .. }) => assert_eq!(id, "nope"),
            other => panic!("expected NotFound, got {other:?}"),
        }
        insert_new(&*s, new_version("nope", "j"), 1).await;
        match s.get_version(NS, "nope", 2).await {
            Err(StoreError::NotFound { id, .. }) => assert_eq!(id, "nope@2"),
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert!(matches!(
            s.get_version(NS, "nope", 0).await,
            Err(StoreError::NotFound { .. })
        ));
    }

    pub async fn latest_is_the_highest(s: Arc<dyn ModelStore>) {
        let mut last = None;
        for i in 0..4 {
            let v = in_round(new_version("m", "j"), i as u32 + 1);
            last = Some(insert_new(&*s, v, i).await);
        }
        insert_new(&*s, new_version("n", "j"), 9).await;
        assert_eq!(Some(s.latest_version(NS, "m").await.unwrap()), last);
        assert_eq!(s.latest_version(NS, "m").await.unwrap().version, 4);
    }

    pub async fn concurrent_inserts_get_distinct_consecutive_versions(s: Arc<dyn ModelStore>) {
        // Both names are new: the first inserts race to create the model too.
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let s = s.clone();
                let name = if i % 3 == 0 { "b" } else { "a" };
                let v = in_round(new_version(name, "job"), i as u32 + 1);
                tokio::spawn(async move { s.insert_version(v, i).await })
            })
            .collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for t in tasks {
            let rec = new_record(t.await.unwrap());
            if rec.name == "a" {
                a.push(rec.version)
            } else {
                b.push(rec.version)
            }
        }
        a.sort();
        b.sort();
        assert_eq!(a, (1..=16).collect::<Vec<_>>());
        assert_eq!(b, (1..=8).collect::<Vec<_>>());
        assert_eq!(
            s.list_versions(Some("a"), None, None).await.unwrap().len(),
            16
        );
    }

    pub async fn nan_metrics_round_trip(s: Arc<dyn ModelStore>) {
        let mut v = new_version("diverged", "");
        v.loss = f64::NAN;
        let rec = insert_new(&*s, v, 1).await;
        assert!(rec.loss.is_nan());
        assert_eq!(rec.accuracy, 0.75);
        let read = s.get_version(NS, "diverged", 1).await.unwrap();
        assert!(read.loss.is_nan());
        assert_eq!(read.job_id, "");
    }

    pub async fn list_filters_by_name_and_job(s: Arc<dyn ModelStore>) {
        for (round, (name, job)) in [
            ("m2", "j1"),
            ("m1", "j1"),
            ("m1", "j2"),
            ("m2", "j2"),
            ("m1", "j1"),
        ]
        .into_iter()
        .enumerate()
        {
            insert_new(&*s, in_round(new_version(name, job), round as u32 + 1), 1).await;
        }
        let key = |r: &ModelVersionRecord| (r.name.clone(), r.version, r.job_id.clone());
        let list = |name: Option<&'static str>, job: Option<&'static str>| {
            let s = s.clone();
            async move {
                s.list_versions(name, job, None)
                    .await
                    .unwrap()
                    .iter()
                    .map(key)
                    .collect::<Vec<_>>()
            }
        };
        let k = |n: &str, v: u32, j: &str| (n.to_string(), v, j.to_string());
        assert_eq!(
            list(None, None).await,
            vec![
                k("m1", 1, "j1"),
                k("m1", 2, "j2"),
                k("m1", 3, "j1"),
                k("m2", 1, "j1"),
                k("m2", 2, "j2"),
            ]
        );
        assert_eq!(list(Some("m1"), None).await.len(), 3);
        assert_eq!(
            list(None, Some("j2")).await,
            vec![k("m1", 2, "j2"), k("m2", 2, "j2")]
        );
        assert_eq!(
            list(Some("m1"), Some("j1")).await,
            vec![k("m1", 1, "j1"), k("m1", 3, "j1")]
        );
        assert!(list(Some("none"), None).await.is_empty());
    }

    pub async fn out_of_range_values_are_refused(s: Arc<dyn ModelStore>) {
        let mut v = new_version("huge", "j");
        v.size_bytes = u64::MAX;
        match s.insert_version(v, 1).await {
            Err(e) => assert!(e.to_string().contains("size_bytes"), "names the field: {e}"),
            Ok(r) => panic!("stored an unrepresentable size: {r:?}"),
        }
        assert!(matches!(
            s.latest_version(NS, "huge").await,
            Err(StoreError::NotFound { .. })
        ));
        // The refused insert used no version number.
        let ok = insert_new(&*s, new_version("huge", "j"), 2).await;
        assert_eq!(ok.version, 1);
    }

    pub async fn namespace_is_stored(s: Arc<dyn ModelStore>) {
        let v1 = insert_new(&*s, in_round(new_version_in("mnist", "j", "team-a"), 1), 1).await;
        assert_eq!((v1.namespace.as_str(), v1.version), ("team-a", 1));
        let v2 = insert_new(&*s, in_round(new_version_in("mnist", "j", "team-a"), 2), 2).await;
        assert_eq!((v2.namespace.as_str(), v2.version), ("team-a", 2));
        assert_eq!(s.get_version("team-a", "mnist", 1).await.unwrap(), v1);
        assert_eq!(s.latest_version("team-a", "mnist").await.unwrap(), v2);
        assert_eq!(
            s.list_versions(None, None, None).await.unwrap(),
            vec![v1, v2]
        );
    }

    pub async fn same_name_in_two_namespaces_is_two_models(s: Arc<dyn ModelStore>) {
        // Interleaved: each model numbers its own versions from 1.
        let mut got = Vec::new();
        for (i, ns) in ["team-a", "team-b", "team-a", "team-b", "team-b"]
            .into_iter()
            .enumerate()
        {
            let mut v = in_round(
                new_version_in("shared", &format!("job-{ns}"), ns),
                i as u32 + 1,
            );
            v.digest = format!("{i:064x}");
            let rec = insert_new(&*s, v, i as i64).await;
            assert_eq!(rec.namespace, ns);
            got.push((rec.namespace.clone(), rec.version));
        }
        let ns_version = |ns: &str, v: u32| (ns.to_string(), v);
        assert_eq!(
            got,
            [
                ns_version("team-a", 1),
                ns_version("team-b", 1),
                ns_version("team-a", 2),
                ns_version("team-b", 2),
                ns_version("team-b", 3),
            ]
        );
        let a1 = s.get_version("team-a", "shared", 1).await.unwrap();
        let b1 = s.get_version("team-b", "shared", 1).await.unwrap();
        assert_eq!(
            (a1.digest, b1.digest),
            (format!("{:064x}", 0), format!("{:064x}", 1)),
            "each namespace reads its own version 1"
        );
        assert_eq!(
            s.latest_version("team-a", "shared").await.unwrap().version,
            2
        );
        assert_eq!(
            s.latest_version("team-b", "shared").await.unwrap().version,
            3
        );
        let listed = |ns: &'static str| {
            let s = s.clone();
            async move {
                s.list_versions(Some("shared"), None, Some(ns))
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.namespace, r.version, r.job_id))
                    .collect::<Vec<_>>()
            }
        };
        let row = |ns: &str, v: u32| (ns.to_string(), v, format!("job-{ns}"));
        assert_eq!(listed("team-a").await, [row("team-a", 1), row("team-a", 2)]);
        assert_eq!(
            listed("team-b").await,
            [row("team-b", 1), row("team-b", 2), row("team-b", 3)]
        );
        // Without a namespace filter: by namespace, then name and version.
        let all: Vec<_> = s
            .list_versions(Some("shared"), None, None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.namespace, r.version, r.job_id))
            .collect();
        assert_eq!(
            all,
            [
                row("team-a", 1),
                row("team-a", 2),
                row("team-b", 1),
                row("team-b", 2),
                row("team-b", 3)
            ]
        );
    }

    pub async fn reads_never_cross_namespaces(s: Arc<dyn ModelStore>) {
        // What another namespace answers before the model exists anywhere...
        let before = [
            miss(&*s, "intruders", "secret", 1).await,
            miss(&*s, "intruders", "secret", 0).await,
        ];
        assert_eq!(
            before,
            [
                "model version \"secret@1\" not found",
                "model \"secret\" not found"
            ]
        );
        for round in [1, 2] {
            let v = in_round(new_version_in("secret", "j", "secret-team"), round);
            insert_new(&*s, v, 1).await;
        }
        // ...it answers after, word for word: no existence oracle.
        for ns in ["intruders", "default", "secret-team2", "Secret-team"] {
            assert_eq!(
                [
                    miss(&*s, ns, "secret", 1).await,
                    miss(&*s, ns, "secret", 0).await
                ],
                before,
                "{ns}"
            );
            assert!(
                s.list_versions(Some("secret"), None, Some(ns))
                    .await
                    .unwrap()
                    .is_empty(),
                "{ns}"
            );
        }
        // A version beyond the owner's latest is missing there too, and the
        // answer names neither namespace.
        let beyond = miss(&*s, "secret-team", "secret", 3).await;
        assert_eq!(beyond, "model version \"secret@3\" not found");
        // The owner's model is untouched: an intruder's first version of the
        // name is its own model's version 1.
        let intruder = insert_new(&*s, new_version_in("secret", "j", "intruders"), 3).await;
        assert_eq!(
            (intruder.namespace.as_str(), intruder.version),
            ("intruders", 1)
        );
        assert_eq!(
            s.latest_version("secret-team", "secret")
                .await
                .unwrap()
                .version,
            2
        );
    }

    pub async fn list_filters_by_namespace(s: Arc<dyn ModelStore>) {
        for (name, job, ns) in [
            ("m1", "j1", "a"),
            ("m2", "j1", "b"),
            ("m1", "j2", "a"),
            ("m3", "j2", "b"),
            ("m4", "j1", "a"),
            ("m1", "j3", "b"),
        ] {
            insert_new(&*s, new_version_in(name, job, ns), 1).await;
        }
        let list =
            |name: Option<&'static str>, job: Option<&'static str>, ns: Option<&'static str>| {
                let s = s.clone();
                async move {
                    s.list_versions(name, job, ns)
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| format!("{}@{} {} {}", r.name, r.version, r.job_id, r.namespace))
                        .collect::<Vec<_>>()
                }
            };
        assert_eq!(
            list(None, None, Some("a")).await,
            ["m1@1 j1 a", "m1@2 j2 a", "m4@1 j1 a"]
        );
        assert_eq!(
            list(None, None, Some("b")).await,
            ["m1@1 j3 b", "m2@1 j1 b", "m3@1 j2 b"]
        );
        assert_eq!(list(None, Some("j1"), Some("b")).await, ["m2@1 j1 b"]);
        assert_eq!(list(Some("m1"), Some("j2"), Some("a")).await, ["m1@2 j2 a"]);
        assert_eq!(list(Some("m1"), None, Some("b")).await, ["m1@1 j3 b"]);
        assert!(list(Some("m2"), None, Some("a")).await.is_empty());
        assert!(list(None, None, Some("c")).await.is_empty());
        assert!(
            list(None, None, Some("A")).await.is_empty(),
            "case-sensitive"
        );
        assert_eq!(list(None, None, None).await.len(), 6);
    }

    pub async fn concurrent_inserts_in_one_namespace_number_from_one(s: Arc<dyn ModelStore>) {
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let s = s.clone();
                let name = if i % 2 == 0 { "x" } else { "y" };
                let v = in_round(new_version_in(name, "job", "team"), i as u32 + 1);
                tokio::spawn(async move { s.insert_version(v, i).await })
            })
            .collect();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for t in tasks {
            let rec = new_record(t.await.unwrap());
            assert_eq!(rec.namespace, "team");
            if rec.name == "x" {
                x.push(rec.version)
            } else {
                y.push(rec.version)
            }
        }
        x.sort();
        y.sort();
        assert_eq!(x, (1..=10).collect::<Vec<_>>());
        assert_eq!(y, (1..=10).collect::<Vec<_>>());
        assert_eq!(
            s.list_versions(None, None, Some("team"))
                .await
                .unwrap()
                .len(),
            20
        );
    }

    pub async fn concurrent_first_inserts_in_two_namespaces_number_apart(s: Arc<dyn ModelStore>) {
        // First inserts of one name from two namespaces race: each namespace
        // creates its own model, and no two versions of a model share a number.
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let s = s.clone();
                let ns = if i % 3 == 0 { "b" } else { "a" };
                let v = in_round(new_version_in("contested", "job", ns), i as u32 + 1);
                tokio::spawn(async move { s.insert_version(v, i).await })
            })
            .collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for t in tasks {
            let rec = new_record(t.await.unwrap());
            match rec.namespace.as_str() {
                "a" => a.push(rec.version),
                "b" => b.push(rec.version),
                other => panic!("stored in namespace {other:?}"),
            }
        }
        a.sort();
        b.sort();
        assert_eq!(a, (1..=16).collect::<Vec<_>>());
        assert_eq!(b, (1..=8).collect::<Vec<_>>());
        for (ns, n) in [("a", 16), ("b", 8)] {
            let listed = s
                .list_versions(Some("contested"), None, Some(ns))
                .await
                .unwrap();
            assert_eq!(listed.len(), n, "{ns}");
            assert_eq!(
                s.latest_version(ns, "contested").await.unwrap().version,
                n as u32,
                "{ns}"
            );
        }
    }

    pub async fn parties_round_trip(s: Arc<dyn ModelStore>) {
        // In the coordinator's order (not sorted), names of every allowed character.
        let parties: Vec<String> = ["zeta", "Alpha.lab", "b_2", "hospital-a", "10"]
            .map(String::from)
            .to_vec();
        let v = NewModelVersion {
            parties: parties.clone(),
            ..in_round(new_version("m", "job-a"), 1)
        };
        let first = insert_new(&*s, v, 10).await;
        assert_eq!(first.parties, parties);
        assert_eq!(s.get_version(NS, "m", 1).await.unwrap(), first);
        assert_eq!(s.latest_version(NS, "m").await.unwrap(), first);
        assert_eq!(
            s.round_version(NS, "m", "job-a", 1).await.unwrap(),
            Some(first.clone())
        );
        // A retried round keeps the parties it was stored with.
        let retry = NewModelVersion {
            parties: vec!["mallory".to_string()],
            ..in_round(new_version("m", "job-a"), 1)
        };
        assert_eq!(s.insert_version(retry, 20).await.unwrap().record, first);
        // An upload has none.
        let upload = NewModelVersion {
            parties: Vec::new(),
            ..in_round(new_version("m", ""), 0)
        };
        let second = insert_new(&*s, upload, 30).await;
        assert!(second.parties.is_empty());
        let listed = s.list_versions(Some("m"), None, None).await.unwrap();
        assert_eq!(listed, vec![first, second]);
    }

    pub async fn a_jobs_round_is_stored_once(s: Arc<dyn ModelStore>) {
        let first = insert_new(&*s, in_round(new_version("m", "job-a"), 1), 10).await;
        // The round again, as a retried upload with other bytes and metrics
        // would send it: the stored version is the answer, unchanged.
        let retry = NewModelVersion {
            digest: "cd".repeat(32),
            size_bytes: 99,
            loss: 0.1,
            accuracy: 0.2,
            samples: 3,
            ..in_round(new_version("m", "job-a"), 1)
        };
        let again = s.insert_version(retry, 20).await.unwrap();
        assert_eq!(
            again,
            StoredVersion {
                record: first.clone(),
                created: false
            }
        );
        assert_eq!(
            s.list_versions(None, None, None).await.unwrap(),
            vec![first.clone()]
        );
        // The next round is a new version; versions without a job, or of
        // round 0, append every time.
        let second = insert_new(&*s, in_round(new_version("m", "job-a"), 2), 30).await;
        assert_eq!(second.version, 2);
        let mut appended = Vec::new();
        for v in [
            in_round(new_version("m", ""), 1),
            in_round(new_version("m", ""), 1),
            in_round(new_version("m", "job-a"), 0),
            in_round(new_version("m", "job-a"), 0),
        ] {
            appended.push(insert_new(&*s, v, 40).await.version);
        }
        assert_eq!(appended, [3, 4, 5, 6]);
        // Round 1 of another job, model or namespace is a version of its own,
        // and each of those is stored once too.
        for (v, version) in [
            (in_round(new_version("m", "job-b"), 1), 7),
            (in_round(new_version("n", "job-a"), 1), 1),
            (in_round(new_version_in("m", "job-a", "team-b"), 1), 1),
        ] {
            let stored = insert_new(&*s, v.clone(), 50).await;
            assert_eq!(stored.version, version, "{v:?}");
            let again = s.insert_version(v, 60).await.unwrap();
            assert_eq!(
                again,
                StoredVersion {
                    record: stored,
                    created: false
                }
            );
        }
        assert_eq!(s.latest_version(NS, "m").await.unwrap().version, 7);
        let round = |ns: &'static str, name: &'static str, job: &'static str, round: u32| {
            let s = s.clone();
            async move { s.round_version(ns, name, job, round).await.unwrap() }
        };
        assert_eq!(round(NS, "m", "job-a", 1).await, Some(first));
        assert_eq!(round(NS, "m", "job-a", 2).await, Some(second));
        assert_eq!(round(NS, "m", "job-b", 1).await.map(|r| r.version), Some(7));
        assert_eq!(round(NS, "m", "job-a", 3).await, None);
        assert_eq!(round(NS, "m", "", 1).await, None, "no job: not a round");
        assert_eq!(
            round(NS, "m", "job-a", 0).await,
            None,
            "round 0: not a round"
        );
        assert_eq!(round("team-c", "m", "job-a", 1).await, None);
        assert_eq!(
            round("team-b", "m", "job-a", 1).await.map(|r| r.namespace),
            Some("team-b".into())
        );
    }

    pub async fn concurrent_inserts_of_one_round_store_one_version(s: Arc<dyn ModelStore>) {
        const ROUNDS: u32 = 4;
        const RETRIES: usize = 8;
        const UPLOADS: usize = 4;
        let mut numbers = Vec::new();
        for round in 1..=ROUNDS {
            // Retries of one round (each with its own bytes) race with user
            // uploads of the same model, all let go at once.
            let start = Arc::new(tokio::sync::Barrier::new(RETRIES + UPLOADS));
            let tasks: Vec<_> = (0..RETRIES + UPLOADS)
                .map(|i| {
                    let (s, start) = (s.clone(), start.clone());
                    let mut v = if i < UPLOADS {
                        new_version("m", "")
                    } else {
                        in_round(new_version("m", "job-a"), round)
                    };
                    v.digest = format!("{i:064x}");
                    tokio::spawn(async move {
                        start.wait().await;
                        s.insert_version(v, i as i64).await
                    })
                })
                .collect();
            let mut retries = Vec::new();
            for t in tasks {
                let stored = t.await.unwrap().unwrap();
                if stored.record.job_id.is_empty() {
                    assert!(stored.created, "user uploads append: {stored:?}");
                    numbers.push(stored.record.version);
                } else {
                    retries.push(stored);
                }
            }
            let created: Vec<_> = retries.iter().filter(|r| r.created).collect();
            assert_eq!(
                created.len(),
                1,
                "round {round}: one insert stores it: {retries:?}"
            );
            let winner = created[0].record.clone();
            assert_eq!(retries.len(), RETRIES);
            assert!(
                retries.iter().all(|r| r.record == winner),
                "round {round}: every insert answers the stored version: {retries:?}"
            );
            assert_eq!(
                s.round_version(NS, "m", "job-a", round).await.unwrap(),
                Some(winner.clone())
            );
            numbers.push(winner.version);
        }
        // The inserts that found their round took no number: no gaps.
        numbers.sort();
        let total = ROUNDS * (1 + UPLOADS as u32);
        assert_eq!(numbers, (1..=total).collect::<Vec<_>>());
        let rounds: Vec<u32> = s
            .list_versions(Some("m"), Some("job-a"), None)
            .await
            .unwrap()
            .iter()
            .map(|r| r.round)
            .collect();
        assert_eq!(rounds.len(), ROUNDS as usize, "one version per round");
        assert_eq!(
            s.list_versions(None, None, None).await.unwrap().len(),
            total as usize
        );
    }

    /// The first models migration that scopes names by namespace.
    const SCOPED_NAMES_MIGRATION: i64 = 3;
    /// The first models migration that stores a job's round once.
    const ROUND_ONCE_MIGRATION: i64 = 4;

    /// `migrator` cut down to the migrations before `version`.
    fn before(mut migrator: sqlx::migrate::Migrator, version: i64) -> sqlx::migrate::Migrator {
        let before: Vec<_> = migrator
            .migrations
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect();
        assert!(
            before.len() < migrator.migrations.len(),
            "migration {version} is there"
        );
        migrator.migrations = std::borrow::Cow::Owned(before);
        migrator.dangerous_set_table_name("_sqlx_migrations_models");
        migrator
    }

    #[doc(hidden)]
    /// The models `migrator` cut down to the migrations before a job's
    /// rounds were stored once: a database as that release left it, for each
    /// SQL backend's upgrade test.
    pub fn before_rounds_stored_once(migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
        before(migrator, ROUND_ONCE_MIGRATION)
    }

    #[doc(hidden)]
    /// Rows as a database from [`before_rounds_stored_once`] may hold them,
    /// as SQL statements to run in order: in team-a, `m` has round 1 of
    /// job-a three times (versions 1, 2 and 4), its round 2 (3) and a user
    /// upload (5); in team-b, `n` has round 1 of job-a (1). `counters`: the
    /// models table has PostgreSQL's `last_version` column.
    pub fn rows_with_repeated_rounds(counters: bool) -> Vec<String> {
        let model = |name: &str, namespace: &str, last: i64| {
            if counters {
                format!(
                    "INSERT INTO models (namespace, name, created_at_ms, last_version) \
                     VALUES ('{namespace}', '{name}', 1, {last})"
                )
            } else {
                format!(
                    "INSERT INTO models (namespace, name, created_at_ms) \
                     VALUES ('{namespace}', '{name}', 1)"
                )
            }
        };
        let version = |ns: &str, name: &str, v: u32, job: &str, round: u32| {
            format!(
                "INSERT INTO model_versions (namespace, name, version, digest, size_bytes, \
                 job_id, round, parent_version, loss, accuracy, samples, created_at_ms) \
                 VALUES ('{ns}', '{name}', {v}, 'd{v}', {v}, '{job}', {round}, 0, 0.5, 0.5, 7, {v})"
            )
        };
        vec![
            model("m", "team-a", 5),
            model("n", "team-b", 1),
            version("team-a", "m", 1, "job-a", 1),
            version("team-a", "m", 2, "job-a", 1),
            version("team-a", "m", 3, "job-a", 2),
            version("team-a", "m", 4, "job-a", 1),
            version("team-a", "m", 5, "", 1),
            version("team-b", "n", 1, "job-a", 1),
        ]
    }

    #[doc(hidden)]
    /// Checks a store opened on [`rows_with_repeated_rounds`]: every version
    /// is kept, a round's earliest version is the one it answers, and from
    /// now on rounds are stored once.
    pub async fn repeated_rounds_survive(s: Arc<dyn ModelStore>) {
        let listed = s.list_versions(None, None, None).await.unwrap();
        assert!(
            listed.iter().all(|r| r.parties.is_empty()),
            "versions from before parties were kept have none"
        );
        let all: Vec<_> = listed
            .into_iter()
            .map(|r| {
                format!(
                    "{}/{}@{} {} r{} {}",
                    r.namespace, r.name, r.version, r.job_id, r.round, r.digest
                )
            })
            .collect();
        assert_eq!(
            all,
            [
                "team-a/m@1 job-a r1 d1",
                "team-a/m@2 job-a r1 d2",
                "team-a/m@3 job-a r2 d3",
                "team-a/m@4 job-a r1 d4",
                "team-a/m@5  r1 d5",
                "team-b/n@1 job-a r1 d1",
            ]
        );
        let m1 = s.get_version("team-a", "m", 1).await.unwrap();
        assert_eq!(
            s.round_version("team-a", "m", "job-a", 1).await.unwrap(),
            Some(m1.clone()),
            "the earliest version of a repeated round"
        );
        let retry =
            |ns: &str, name: &str, round: u32| in_round(new_version_in(name, "job-a", ns), round);
        let again = s.insert_version(retry("team-a", "m", 1), 10).await.unwrap();
        assert_eq!(
            again,
            StoredVersion {
                record: m1,
                created: false
            }
        );
        let m3 = s.get_version("team-a", "m", 3).await.unwrap();
        assert_eq!(
            s.insert_version(retry("team-a", "m", 2), 11).await.unwrap(),
            StoredVersion {
                record: m3,
                created: false
            }
        );
        let n1 = s.get_version("team-b", "n", 1).await.unwrap();
        assert_eq!(
            s.insert_version(retry("team-b", "n", 1), 12).await.unwrap(),
            StoredVersion {
                record: n1,
                created: false
            }
        );
        // Numbering goes on; new rounds are stored once, user uploads append.
        let m6 = insert_new(&*s, retry("team-a", "m", 3), 13).await;
        assert_eq!(m6.version, 6);
        assert!(
            !s.insert_version(retry("team-a", "m", 3), 14)
                .await
                .unwrap()
                .created
        );
        assert_eq!(
            insert_new(&*s, new_version_in("m", "", "team-a"), 15)
                .await
                .version,
            7
        );
        assert_eq!(s.list_versions(None, None, None).await.unwrap().len(), 8);
    }

    #[doc(hidden)]
    /// The models `migrator` cut down to the migrations before names were
    /// scoped by namespace: a database as that release left it, for each SQL
    /// backend's upgrade test.
    pub fn before_scoped_names(migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
        before(migrator, SCOPED_NAMES_MIGRATION)
    }

    #[doc(hidden)]
    /// Rows as a database from [`before_scoped_names`] holds them, as SQL
    /// statements to run in order: `m` in team-a (versions 1, 2) and `n` in
    /// team-b (1). `counters`: the models table has PostgreSQL's
    /// `last_version` column.
    pub fn rows_before_scoped_names(counters: bool) -> Vec<String> {
        let model = |name: &str, created: i64, namespace: &str, last: i64| {
            if counters {
                format!(
                    "INSERT INTO models (name, created_at_ms, namespace, last_version) \
                     VALUES ('{name}', {created}, '{namespace}', {last})"
                )
            } else {
                format!(
                    "INSERT INTO models (name, created_at_ms, namespace) \
                     VALUES ('{name}', {created}, '{namespace}')"
                )
            }
        };
        let version = |values: &str| {
            format!(
                "INSERT INTO model_versions (name, version, digest, size_bytes, job_id, round, \
                 parent_version, loss, accuracy, samples, created_at_ms, namespace) \
                 VALUES ({values})"
            )
        };
        vec![
            model("m", 1, "team-a", 2),
            model("n", 2, "team-b", 1),
            version("'m', 1, 'a1', 10, 'job-a', 1, 0, 0.5, 0.25, 7, 3, 'team-a'"),
            version("'m', 2, 'a2', 20, 'job-a', 2, 1, 0.4, 0.5, 7, 4, 'team-a'"),
            version("'n', 1, 'b1', 30, 'job-b', 1, 0, 0.3, 0.75, 9, 5, 'team-b'"),
        ]
    }

    #[doc(hidden)]
    /// Checks a store opened on [`rows_before_scoped_names`]: every version
    /// is there, in its namespace, and numbering goes on per (namespace, name).
    pub async fn rows_from_before_scoped_names_survive(s: Arc<dyn ModelStore>) {
        let row = |ns: &str, name: &str, version: u32, digest: &str| {
            (
                ns.to_string(),
                name.to_string(),
                version,
                digest.to_string(),
            )
        };
        let all: Vec<_> = s
            .list_versions(None, None, None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.namespace, r.name, r.version, r.digest))
            .collect();
        assert_eq!(
            all,
            [
                row("team-a", "m", 1, "a1"),
                row("team-a", "m", 2, "a2"),
                row("team-b", "n", 1, "b1"),
            ]
        );
        let a2 = s.get_version("team-a", "m", 2).await.unwrap();
        assert_eq!(
            (
                a2.size_bytes,
                a2.job_id.as_str(),
                a2.round,
                a2.parent_version
            ),
            (20, "job-a", 2, 1)
        );
        assert_eq!(
            (a2.loss, a2.accuracy, a2.samples, a2.created_at_ms),
            (0.4, 0.5, 7, 4)
        );
        assert_eq!(s.latest_version("team-a", "m").await.unwrap(), a2);
        assert!(matches!(
            s.latest_version("team-b", "m").await,
            Err(StoreError::NotFound { .. })
        ));
        let a3 = insert_new(&*s, new_version_in("m", "j", "team-a"), 10).await;
        assert_eq!(a3.version, 3, "team-a's m goes on from its last version");
        let b1 = insert_new(&*s, new_version_in("m", "j", "team-b"), 11).await;
        assert_eq!(b1.version, 1, "the name is free in team-b");
        let n2 = insert_new(&*s, new_version_in("n", "j", "team-b"), 12).await;
        assert_eq!(n2.version, 2);
    }
}

/// Checks of [`ClientStore`](crate::clients::ClientStore).
pub mod clients {
    use std::sync::Arc;

    use cohort_core::PartyId;

    use crate::StoreError;
    use crate::clients::{
        ClientRecord, ClientStats, ClientStore, DatasetEntry, Reliability, ResourcesEntry,
        TaskOutcome, TaskResult,
    };

    fn party(name: &str) -> PartyId {
        PartyId::parse(name).unwrap()
    }

    fn datasets(samples: u64) -> Vec<DatasetEntry> {
        vec![
            DatasetEntry {
                name: "digits".into(),
                samples,
                features: 64,
                classes: 10,
            },
            DatasetEntry {
                name: "mnist".into(),
                samples: u64::from(u32::MAX) + 7,
                features: 784,
                classes: 10,
            },
        ]
    }

    fn resources(cpus: u32) -> ResourcesEntry {
        ResourcesEntry {
            cpus,
            memory_bytes: 64 << 30,
            gpus: 1,
            max_tasks: 2,
        }
    }

    pub async fn upsert_get_round_trip(s: Arc<dyn ClientStore>) {
        let p = party("hospital-a");
        let rec = s
            .upsert_client(&p, &datasets(10), &resources(8), 1)
            .await
            .unwrap();
        assert_eq!(rec.party, p);
        assert_eq!(rec.datasets, datasets(10));
        assert_eq!(rec.resources, resources(8));
        assert_eq!((rec.first_seen_ms, rec.last_seen_ms), (1, 1));
        assert_eq!(rec.revoked_at_ms, None);
        assert_eq!(rec.stats, ClientStats::default());
        assert_eq!(rec.reliability, Reliability::default());
        assert_eq!(s.get_client(&p).await.unwrap(), rec);
        let empty = s
            .upsert_client(&party("empty"), &[], &ResourcesEntry::default(), 2)
            .await
            .unwrap();
        assert!(empty.datasets.is_empty());
    }

    pub async fn reregistration_replaces_holdings_and_keeps_history(s: Arc<dyn ClientStore>) {
        let p = party("hospital-a");
        s.upsert_client(&p, &datasets(10), &resources(8), 1)
            .await
            .unwrap();
        s.count_task(&p, TaskOutcome::Offered).await.unwrap();
        let rec = s
            .upsert_client(&p, &datasets(20), &resources(4), 5)
            .await
            .unwrap();
        assert_eq!(rec.datasets, datasets(20));
        assert_eq!(rec.resources, resources(4));
        assert_eq!((rec.first_seen_ms, rec.last_seen_ms), (1, 5));
        assert_eq!(
            rec.stats.tasks_offered, 1,
            "stats survive a re-registration"
        );
        assert_eq!(s.list_clients().await.unwrap(), vec![rec]);
    }

    pub async fn missing_client_is_not_found(s: Arc<dyn ClientStore>) {
        let ghost = party("ghost");
        for (call, r) in [
            ("get_client", s.get_client(&ghost).await.map(|_| ())),
            ("touch", s.touch(&ghost, 1).await),
            (
                "count_task",
                s.count_task(&ghost, TaskOutcome::Accepted).await,
            ),
            (
                "record_task_result",
                s.record_task_result(&ghost, TaskResult::Finished, 1).await,
            ),
        ] {
            match r {
                Err(StoreError::NotFound { id, .. }) => assert_eq!(id, "ghost", "{call}"),
                other => panic!("{call}: expected NotFound, got {other:?}"),
            }
        }
        assert!(s.list_clients().await.unwrap().is_empty());
    }

    pub async fn touch_never_moves_back(s: Arc<dyn ClientStore>) {
        let p = party("p1");
        s.upsert_client(&p, &[], &resources(1), 10).await.unwrap();
        s.touch(&p, 20).await.unwrap();
        assert_eq!(s.get_client(&p).await.unwrap().last_seen_ms, 20);
        s.touch(&p, 15).await.unwrap();
        let rec = s.get_client(&p).await.unwrap();
        assert_eq!((rec.first_seen_ms, rec.last_seen_ms), (10, 20));
    }

    pub async fn concurrent_count_task_loses_nothing(s: Arc<dyn ClientStore>) {
        const EACH: u64 = 12;
        let p = party("busy");
        s.upsert_client(&p, &[], &resources(1), 1).await.unwrap();
        let outcomes = [
            TaskOutcome::Offered,
            TaskOutcome::Accepted,
            TaskOutcome::Succeeded,
            TaskOutcome::Failed,
        ];
        let mut tasks = Vec::new();
        for (k, outcome) in outcomes.iter().enumerate() {
            // A different count per outcome catches a write to the wrong column.
            for _ in 0..EACH + k as u64 {
                let (s, p, o) = (s.clone(), p.clone(), *outcome);
                tasks.push(tokio::spawn(async move { s.count_task(&p, o).await }));
            }
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            s.get_client(&p).await.unwrap().stats,
            ClientStats {
                tasks_offered: EACH,
                tasks_accepted: EACH + 1,
                tasks_succeeded: EACH + 2,
                tasks_failed: EACH + 3,
            }
        );
    }

    /// Stored reliability equals the reference arithmetic (`Reliability::after`), up to
    /// the rounding of the backend's doubles.
    fn assert_reliability_close(got: &Reliability, want: &Reliability, what: &str) {
        assert_eq!(
            (got.finished, got.failed, got.timed_out, got.last_result_ms),
            (
                want.finished,
                want.failed,
                want.timed_out,
                want.last_result_ms
            ),
            "{what}: counts and time"
        );
        for (name, g, w) in [
            ("recent_finished", got.recent_finished, want.recent_finished),
            (
                "recent_unfinished",
                got.recent_unfinished,
                want.recent_unfinished,
            ),
        ] {
            assert!((g - w).abs() < 1e-9, "{what}: {name} {g} vs {w}");
        }
    }

    pub async fn task_results_are_counted_and_weigh_recent_ones_more(s: Arc<dyn ClientStore>) {
        let p = party("hospital-a");
        let other = party("hospital-b");
        s.upsert_client(&p, &datasets(10), &resources(8), 1)
            .await
            .unwrap();
        s.upsert_client(&other, &[], &resources(1), 1)
            .await
            .unwrap();
        let mut want = Reliability::default();
        for (result, at) in [
            (TaskResult::Finished, 10),
            (TaskResult::Finished, 20),
            (TaskResult::TimedOut, 30),
            (TaskResult::Failed, 25),
            (TaskResult::Finished, 40),
        ] {
            s.record_task_result(&p, result, at).await.unwrap();
            want = want.after(result, at);
        }
        assert_eq!((want.finished, want.failed, want.timed_out), (3, 1, 1));
        assert_eq!(want.last_result_ms, 40, "the time never moves back");
        let rec = s.get_client(&p).await.unwrap();
        assert_reliability_close(&rec.reliability, &want, "after five results");
        // 1 + 0.9^3 + 0.9^4 of finished, 0.9 + 0.9^2 of the others.
        assert!((rec.reliability.recent_finished - 2.3851).abs() < 1e-9);
        assert!((rec.reliability.recent_unfinished - 1.71).abs() < 1e-9);
        assert_eq!(
            rec.stats,
            ClientStats::default(),
            "the party's own counters are apart"
        );
        assert_eq!(
            s.get_client(&other).await.unwrap().reliability,
            Reliability::default(),
            "another party is untouched"
        );
        // Registering again, being seen and revoked keep the history.
        let again = s
            .upsert_client(&p, &datasets(20), &resources(4), 50)
            .await
            .unwrap();
        assert_reliability_close(&again.reliability, &want, "re-registered");
        s.touch(&p, 60).await.unwrap();
        let revoked = s.revoke_client(&p, 70).await.unwrap();
        assert_reliability_close(&revoked.reliability, &want, "revoked");
        let listed = s.list_clients().await.unwrap();
        assert_reliability_close(&listed[0].reliability, &want, "listed");
    }

    pub async fn concurrent_task_results_lose_nothing(s: Arc<dyn ClientStore>) {
        const EACH: u64 = 8;
        let p = party("busy");
        s.upsert_client(&p, &[], &resources(1), 1).await.unwrap();
        let results = [
            TaskResult::Finished,
            TaskResult::Failed,
            TaskResult::TimedOut,
        ];
        let mut tasks = Vec::new();
        for (k, result) in results.iter().enumerate() {
            // A different count per result catches a write to the wrong column.
            for i in 0..EACH + k as u64 {
                let (s, p, r) = (s.clone(), p.clone(), *result);
                tasks.push(tokio::spawn(async move {
                    s.record_task_result(&p, r, 100 + i as i64).await
                }));
            }
        }
        // Party-reported counters race them on the same row.
        for _ in 0..EACH {
            let (s, p) = (s.clone(), p.clone());
            tasks.push(tokio::spawn(async move {
                s.count_task(&p, TaskOutcome::Succeeded).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let rec = s.get_client(&p).await.unwrap();
        let r = &rec.reliability;
        assert_eq!(
            (r.finished, r.failed, r.timed_out),
            (EACH, EACH + 1, EACH + 2)
        );
        assert_eq!(rec.stats.tasks_succeeded, EACH);
        assert_eq!(r.last_result_ms, 100 + EACH as i64 + 1);
        // Whatever the order, the recent counts add up to 1 + 0.9 + ... + 0.9^(n-1).
        let n = (3 * EACH + 3) as i32;
        let total = (1.0 - crate::clients::RELIABILITY_DECAY.powi(n))
            / (1.0 - crate::clients::RELIABILITY_DECAY);
        let got = r.recent_finished + r.recent_unfinished;
        assert!((got - total).abs() < 1e-9, "{got} vs {total}");
        assert!(r.recent_finished > 0.0 && r.recent_unfinished > 0.0);
    }

    pub async fn concurrent_first_registrations(s: Arc<dyn ClientStore>) {
        let p = party("newcomer");
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    s.upsert_client(&p, &datasets(i), &resources(1), 100 + i as i64)
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let all = s.list_clients().await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].stats, ClientStats::default());
    }

    pub async fn list_is_ordered_by_party(s: Arc<dyn ClientStore>) {
        // Bytewise order: upper case before lower case.
        for name in ["b-party", "Z.lab", "a_party", "B-party", "10"] {
            s.upsert_client(&party(name), &[], &resources(1), 1)
                .await
                .unwrap();
        }
        let names: Vec<_> = s
            .list_clients()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.party.to_string())
            .collect();
        assert_eq!(names, ["10", "B-party", "Z.lab", "a_party", "b-party"]);
    }

    pub async fn revoke_before_register(s: Arc<dyn ClientStore>) {
        let p = party("late");
        assert_eq!(s.list_revoked().await.unwrap(), vec![]);
        let rec = s.revoke_client(&p, 5).await.unwrap();
        assert_eq!(
            rec,
            ClientRecord {
                party: p.clone(),
                datasets: vec![],
                resources: ResourcesEntry::default(),
                first_seen_ms: 5,
                last_seen_ms: 5,
                revoked_at_ms: Some(5),
                stats: ClientStats::default(),
                reliability: Reliability::default(),
            }
        );
        assert_eq!(s.get_client(&p).await.unwrap(), rec);
        assert_eq!(s.list_clients().await.unwrap(), vec![rec]);
        s.count_task(&p, TaskOutcome::Offered).await.unwrap();
        assert_eq!(s.get_client(&p).await.unwrap().stats.tasks_offered, 1);
    }

    pub async fn revoke_keeps_the_first_time(s: Arc<dyn ClientStore>) {
        let p = party("hospital-a");
        let other = party("hospital-b");
        s.upsert_client(&p, &datasets(10), &resources(8), 1)
            .await
            .unwrap();
        s.upsert_client(&other, &[], &resources(1), 1)
            .await
            .unwrap();
        let first = s.revoke_client(&p, 10).await.unwrap();
        assert_eq!(first.revoked_at_ms, Some(10));
        assert_eq!(first.datasets, datasets(10), "holdings stay");
        assert_eq!((first.first_seen_ms, first.last_seen_ms), (1, 1));
        for (at, call) in [(20, "a later revoke"), (5, "an earlier revoke")] {
            let again = s.revoke_client(&p, at).await.unwrap();
            assert_eq!(again, first, "{call} changes nothing");
        }
        assert_eq!(s.get_client(&p).await.unwrap(), first);
        assert_eq!(s.get_client(&other).await.unwrap().revoked_at_ms, None);
        assert_eq!(s.list_revoked().await.unwrap(), vec![p.clone()]);
        // Bytewise order, registered or not.
        s.revoke_client(&party("Z.lab"), 30).await.unwrap();
        s.revoke_client(&party("a_party"), 31).await.unwrap();
        assert_eq!(
            s.list_revoked().await.unwrap(),
            vec![party("Z.lab"), party("a_party"), p]
        );
    }

    pub async fn reregistration_and_touch_keep_the_revocation(s: Arc<dyn ClientStore>) {
        let p = party("p1");
        s.revoke_client(&p, 3).await.unwrap();
        let rec = s
            .upsert_client(&p, &datasets(20), &resources(4), 9)
            .await
            .unwrap();
        assert_eq!(rec.revoked_at_ms, Some(3), "registering never lifts it");
        assert_eq!(rec.datasets, datasets(20));
        assert_eq!(rec.resources, resources(4));
        assert_eq!((rec.first_seen_ms, rec.last_seen_ms), (3, 9));
        s.touch(&p, 12).await.unwrap();
        s.count_task(&p, TaskOutcome::Failed).await.unwrap();
        let rec = s.get_client(&p).await.unwrap();
        assert_eq!((rec.last_seen_ms, rec.revoked_at_ms), (12, Some(3)));
        assert_eq!(s.list_clients().await.unwrap(), vec![rec]);
    }

    pub async fn concurrent_revocations_create_one_record(s: Arc<dyn ClientStore>) {
        // Revocations and first registrations of a new party race.
        let p = party("contested");
        let revokes: Vec<_> = (0..8)
            .map(|i| {
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move { s.revoke_client(&p, 100 + i).await })
            })
            .collect();
        let registrations: Vec<_> = (0..4)
            .map(|i| {
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    s.upsert_client(&p, &datasets(i), &resources(1), 200 + i as i64)
                        .await
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in revokes {
            times.push(t.await.unwrap().unwrap().revoked_at_ms);
        }
        for t in registrations {
            t.await.unwrap().unwrap();
        }
        let all = s.list_clients().await.unwrap();
        assert_eq!(all.len(), 1);
        let revoked = all[0].revoked_at_ms;
        assert!(
            matches!(revoked, Some(t) if (100..108).contains(&t)),
            "{revoked:?}"
        );
        assert!(
            times.iter().all(|t| *t == revoked),
            "every revocation returns the first: {times:?}"
        );
        assert_eq!(all[0].stats, ClientStats::default());
    }
}
