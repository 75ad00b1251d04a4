//! Client selection (issue 15) in a real federation: `clients.selection: reliability` with a
//! party that accepts every training task and never delivers (`--adversary stall`), and
//! `clients.selection: resource` with parties offering different CPUs and memory, one of them
//! none (`--cpus 0`). Each round record lists whom it drew, with their scores and what became
//! of their tasks; each model version lists the parties whose updates made it; `cohort client
//! list` shows each party's record. The tests print every figure they bound.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cohort_integration_tests::{Federation, cohort, digits_job, wait_clients};
use cohort_proto::v1 as pb;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A digits job drawing `per_round` parties a round by `selection`, with a fixed seed.
fn spec(
    name: &str,
    rounds: u32,
    per_round: u32,
    min: u32,
    timeout: &str,
    selection: &str,
) -> String {
    let base = digits_job(name, rounds, per_round, min, timeout);
    let clients =
        format!("clients: {{per_round: {per_round}, min: {min}, round_timeout: {timeout}}}");
    assert!(base.contains(&clients), "{base}");
    format!(
        "{}seed: 11\n",
        base.replace(
            &clients,
            &format!(
                "clients: {{per_round: {per_round}, min: {min}, selection: {selection}, \
                 round_timeout: {timeout}}}"
            ),
        )
    )
}

/// Each round's draws as (round, party, score, outcome).
fn draws(job: &pb::Job) -> Vec<(u32, String, f64, String)> {
    job.rounds
        .iter()
        .flat_map(|r| {
            r.selected
                .iter()
                .map(move |s| (r.round, s.party.clone(), s.score, s.outcome.clone()))
        })
        .collect()
}

/// The rounds that drew `party` for training.
fn rounds_drawing(job: &pb::Job, party: &str) -> BTreeSet<u32> {
    draws(job)
        .into_iter()
        .filter(|d| d.1 == party)
        .map(|d| d.0)
        .collect()
}

/// The job's model versions: round -> the parties its lineage names.
async fn version_parties(fed: &Federation, job: &pb::Job) -> BTreeMap<u32, Vec<String>> {
    fed.models()
        .list_versions(pb::ListVersionsRequest {
            name: job.model_name.clone(),
            job_id: job.id.clone(),
            namespace: job.namespace.clone(),
        })
        .await
        .expect("versions")
        .into_inner()
        .versions
        .into_iter()
        .map(|v| {
            let l = v.lineage.unwrap_or_default();
            (l.round, l.parties)
        })
        .collect()
}

/// Every version lists exactly the parties its round's record says finished.
async fn assert_versions_list_the_finished_parties(fed: &Federation, job: &pb::Job) {
    let versions = version_parties(fed, job).await;
    assert_eq!(versions.len(), job.rounds.len(), "one version per round");
    for r in &job.rounds {
        let finished: BTreeSet<&str> = r
            .selected
            .iter()
            .filter(|s| s.outcome == "finished")
            .map(|s| s.party.as_str())
            .collect();
        let listed: BTreeSet<&str> = versions[&r.round].iter().map(String::as_str).collect();
        assert_eq!(listed, finished, "round {}: version parties", r.round);
        assert_eq!(
            listed.len() as u32,
            r.updates,
            "round {}: one party per aggregated update",
            r.round
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliability_selection_rarely_draws_a_party_that_always_times_out() {
    const STRAGGLER: &str = "party-5";
    let fed = Federation::with_party_env(
        5,
        vec![(STRAGGLER.to_string(), env(&[("COHORT_ADVERSARY", "stall")]))],
    )
    .await
    .expect("federation");
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 5
    })
    .await;
    // 3 of 5 a round, 2 of which must deliver: a round that draws the straggler waits out
    // its timeout and goes on with the other two.
    let rounds = 20;
    let job = spec("reliable", rounds, 3, 2, "10s", "reliability");
    let (done, accuracy) = fed.run_to_success("selection: reliability", &job).await;
    assert_eq!(done.rounds_completed, rounds);

    let all = draws(&done);
    for (round, party, score, outcome) in &all {
        assert!(
            *score > 0.0 && *score < 1.0,
            "round {round}: {party}'s reliability score {score}"
        );
        if party == STRAGGLER {
            assert!(
                matches!(outcome.as_str(), "timed_out" | "failed" | "refused"),
                "round {round}: the straggler's task {outcome}"
            );
        } else {
            assert_eq!(outcome, "finished", "round {round}: {party}");
        }
    }
    assert!(
        done.rounds.iter().all(|r| r.selected.len() >= 3),
        "every round lists its draws: {all:?}"
    );
    let drawn = rounds_drawing(&done, STRAGGLER);
    let later: Vec<u32> = drawn.iter().copied().filter(|r| *r > 5).collect();
    let share = later.len() as f64 / f64::from(rounds - 5);
    eprintln!(
        "selection reliability: {STRAGGLER} (always times out) drawn in rounds {drawn:?}: \
         {} of rounds 6-{rounds} ({:.0} %); held-out accuracy {accuracy:.3}",
        later.len(),
        share * 100.0
    );
    assert!(
        !drawn.is_empty(),
        "with no history every party has the same chance"
    );
    assert!(share <= 0.2, "drawn in {later:?} of rounds 6-{rounds}");
    assert_versions_list_the_finished_parties(&fed, &done).await;
    for parties in version_parties(&fed, &done).await.values() {
        assert!(!parties.iter().any(|p| p == STRAGGLER), "{parties:?}");
    }

    // Its record says so, and only what the coordinator saw counts.
    let clients = fed
        .api()
        .selector()
        .list_clients(pb::ListClientsRequest {})
        .await
        .expect("clients")
        .into_inner()
        .clients;
    for c in &clients {
        let r = c.reliability.unwrap_or_default();
        eprintln!(
            "{}: {} finished, {} failed, {} timed out, score {:.3}",
            c.party, r.finished, r.failed, r.timed_out, r.score
        );
        if c.party == STRAGGLER {
            assert_eq!(r.finished, 0);
            assert!(r.timed_out + r.failed >= 1 && r.score < 0.5, "{r:?}");
        } else {
            assert_eq!(r.failed + r.timed_out, 0, "{}: {r:?}", c.party);
            assert!(r.finished >= 1 && r.score > 0.5, "{}: {r:?}", c.party);
        }
    }
    let total: u64 = clients
        .iter()
        .map(|c| c.reliability.unwrap_or_default().finished)
        .sum();
    let finished_draws = all.iter().filter(|d| d.3 == "finished").count() as u64;
    assert_eq!(total, finished_draws, "one result per finished task");

    // The CLI shows the record, the draws and the parties of a version.
    let profile_path = fed.dir.path().join("selection-profile.toml");
    fed.stack.profile().save(&profile_path).expect("profile");
    let (code, out, err) = cohort(&["--json", "client", "list"], &profile_path)
        .await
        .expect("client list");
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    let straggler = listed
        .as_array()
        .and_then(|a| a.iter().find(|c| c["party"] == STRAGGLER))
        .expect("the straggler is listed");
    assert_eq!(straggler["reliability"]["finished"], 0, "{straggler}");
    let (code, text, err) = cohort(&["client", "list"], &profile_path)
        .await
        .expect("client list");
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("reliability 0.") && text.contains("timed out"),
        "{text}"
    );
    let (code, text, err) = cohort(&["job", "get", &done.id], &profile_path)
        .await
        .expect("job get");
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("selected for training"), "{text}");
    assert!(text.contains(") finished"), "{text}");
    let last = format!("{}@{rounds}", done.model_name);
    let (code, text, err) = cohort(&["model", "get", &last], &profile_path)
        .await
        .expect("model get");
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("\nparties     party-"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_selection_never_draws_a_party_without_room_and_favours_the_roomier() {
    let fed = Federation::with_party_env(
        4,
        vec![
            (
                "party-1".to_string(),
                env(&[("COHORT_CPUS", "8"), ("COHORT_MEMORY", "8GiB")]),
            ),
            (
                "party-2".to_string(),
                env(&[("COHORT_CPUS", "1"), ("COHORT_MEMORY", "512MiB")]),
            ),
            (
                "party-3".to_string(),
                env(&[("COHORT_CPUS", "1"), ("COHORT_MEMORY", "512MiB")]),
            ),
            // Offers nothing: no free capacity at all.
            ("party-4".to_string(), env(&[("COHORT_CPUS", "0")])),
        ],
    )
    .await
    .expect("federation");
    wait_clients(&fed.api(), Duration::from_secs(30), |c| {
        c.iter().filter(|c| c.connected).count() == 4
    })
    .await;
    let rounds = 10;
    let job = spec("roomy", rounds, 2, 2, "60s", "resource");
    let (done, accuracy) = fed.run_to_success("selection: resource", &job).await;
    assert_eq!(done.rounds_completed, rounds);
    let count = |p: &str| rounds_drawing(&done, p).len();
    let counts: Vec<(String, usize)> = (1..=4)
        .map(|i| format!("party-{i}"))
        .map(|p| {
            let n = count(&p);
            (p, n)
        })
        .collect();
    let scores: Vec<(String, f64)> = draws(&done)
        .into_iter()
        .map(|(_, party, score, _)| (party, score))
        .collect();
    eprintln!(
        "selection resource, {rounds} rounds of 2: drawn {counts:?}; held-out accuracy \
         {accuracy:.3}; scores {scores:?}"
    );
    assert_eq!(
        count("party-4"),
        0,
        "a party with no free capacity is never drawn"
    );
    assert!(
        count("party-1") > count("party-2") && count("party-1") > count("party-3"),
        "{counts:?}"
    );
    for (party, score) in &scores {
        assert!(*score > 0.0 && *score <= 1.0, "{party}: {score}");
        if party != "party-1" {
            assert!(
                *score < 0.5,
                "{party} has an eighth of party-1's room: {score}"
            );
        }
    }
    assert!(
        done.rounds
            .iter()
            .all(|r| r.selected.iter().all(|s| s.outcome == "finished")),
        "{:?}",
        draws(&done)
    );
    assert_versions_list_the_finished_parties(&fed, &done).await;
    // Not even offered an evaluation: it was never drawn at all.
    let clients = fed
        .api()
        .selector()
        .list_clients(pb::ListClientsRequest {})
        .await
        .expect("clients")
        .into_inner()
        .clients;
    let idle = clients
        .iter()
        .find(|c| c.party == "party-4")
        .expect("party-4 is listed");
    assert_eq!(idle.tasks_offered, 0, "{idle:?}");
    let free = idle
        .resources
        .as_ref()
        .and_then(|r| r.free)
        .unwrap_or_default();
    assert_eq!(free.cpu_millis, 0, "{idle:?}");
}
