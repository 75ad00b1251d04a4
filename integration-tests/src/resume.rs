//! A coordinator killed mid-job, and what its successor says it restored: the shared steps
//! of the tests that check a job resumes with its checkpointed server state (fedadam's
//! moments, SCAFFOLD's control variate) or privacy budget.

use std::time::Duration;

use cohort_core::JobState;
use cohort_proto::v1 as pb;
use nix::sys::signal::Signal;

use crate::{Federation, coordinator_pids, state_of};

/// What a relaunched coordinator logged when it restored the strategy's server state: the
/// round it resumed after, the digest of the state as restored (encoded again) and the
/// digest of the version it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub round: u32,
    pub digest: String,
    pub stored: String,
}

impl Federation {
    /// Waits until job `id` completed `rounds` rounds, kills its one coordinator with
    /// SIGKILL, and waits for the job (run on by a relaunched coordinator) to succeed.
    pub async fn kill_coordinator_after(&self, id: &str, rounds: u32) -> pb::Job {
        self.wait_job(id, Duration::from_secs(120), "rounds done", |j| {
            j.rounds_completed >= rounds
        })
        .await
        .expect("the job progresses");
        let coordinators = coordinator_pids(id);
        assert_eq!(coordinators.len(), 1, "one coordinator for the job");
        cohort_runtime::process::signal_pid(coordinators[0], Signal::SIGKILL);
        let done = self
            .wait_end(id, Duration::from_secs(180))
            .await
            .expect("the job ends");
        assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.reason);
        done
    }

    /// The one restore of the strategy's server state job `id`'s coordinators logged.
    pub fn restored_server_state(&self, id: &str) -> Restored {
        let log_path = self
            .dir
            .path()
            .join(format!("server/work/coordinators/coordinator-{id}.log"));
        let log = std::fs::read_to_string(&log_path).expect("coordinator log");
        let restored: Vec<Restored> = log
            .lines()
            .filter(|l| l.contains("server optimiser state restored"))
            .filter_map(|l| {
                let field = |name: &str| {
                    let rest = l.split_once(&format!("{name}="))?.1;
                    Some(rest.split_whitespace().next()?.to_string())
                };
                Some(Restored {
                    round: field("round")?.parse().ok()?,
                    digest: field("digest")?,
                    stored: field("stored")?,
                })
            })
            .collect();
        let [restored] = &restored[..] else {
            panic!("one restore in the coordinator's log: {restored:?}\n{log}");
        };
        restored.clone()
    }

    /// The versions of job `id`'s server-state model, asserting there is one per round of
    /// `rounds`.
    pub async fn server_states(&self, id: &str, rounds: u32) -> Vec<pb::ModelVersion> {
        let versions = self
            .models()
            .list_versions(pb::ListVersionsRequest {
                name: format!("{id}-server-state"),
                job_id: id.to_string(),
                namespace: String::new(),
            })
            .await
            .expect("list the server states")
            .into_inner()
            .versions;
        let of: Vec<u32> = versions
            .iter()
            .filter_map(|v| v.lineage.as_ref().map(|l| l.round))
            .collect();
        assert_eq!(
            of,
            (1..=rounds).collect::<Vec<_>>(),
            "one server state per round"
        );
        versions
    }
}
