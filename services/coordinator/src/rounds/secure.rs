//! A round's training under secure aggregation (`privacy.secure_aggregation`): the tasks are
//! offered once, then the round loop closes the protocol's phases one after the other —
//! advertising, key sharing, masked input, unmasking — each when every party still in it
//! took the step, its task ended, or the phase's deadline passed (50 %, 60 %, 85 % and 100 %
//! of `clients.round_timeout`: training happens before advertising). A party whose task
//! ends is not waited for; parties that shared keys but sent no whole masked update are
//! dropped and their masks removed with the survivors' shares. Fewer than t parties at any
//! step fail the round naming the threshold. The unmasked mean of the survivors' clipped
//! updates takes the place of FedAvg's weighted mean in the strategy's step.

use std::sync::Arc;

use cohort_core::{NamedTensor, TaskKind};
use cohort_fl::RoundFacts;
use cohort_proto::v1 as pb;
use cohort_secagg::SecAggError;
use tokio::time::Instant;

use super::{Cohort, Failure, JobRun, TASK_POLL, Trained, failure_summary, lock};
use crate::round_state::{Note, NoteKind};
use crate::secagg::{Member, SecAgg};

/// (party, task id, reason) of each task that ended without finishing the protocol.
type Failures = Vec<(String, String, String)>;

impl JobRun {
    pub(super) async fn train_secure(
        &self,
        round: u32,
        cohort: &Cohort,
        deadline: Instant,
        secagg: &Arc<SecAgg>,
    ) -> Result<Trained, Failure> {
        let clients = &self.spec.clients;
        let started = Instant::now();
        let total = deadline.saturating_duration_since(started);
        let by = |share: f64| started + total.mul_f64(share);
        let global = self.state.global();
        let len: usize = global.iter().map(|t| t.data.len()).sum();
        let mut failures = Failures::new();
        secagg
            .open(round, len)
            .map_err(|e| self.secure_failed(round, secagg, &e, &failures))?;
        let least = clients.min.max(secagg.threshold as u32);
        let accepted = self
            .offer_until(
                round,
                TaskKind::Train,
                clients.per_round,
                least,
                deadline,
                Vec::new(),
                cohort,
            )
            .await
            .inspect_err(|_| secagg.fail("the round was stopped"))?;
        if (accepted.len() as u32) < least {
            let why = format!(
                "quorum not met: {} of the required {least} parties (clients.min, and \
                 privacy.secagg_threshold t={}) accepted the task within clients.round_timeout {}",
                accepted.len(),
                secagg.threshold,
                humantime::format_duration(clients.round_timeout),
            );
            secagg.fail(&why);
            return Err(self.round_failed(round, why));
        }
        let mut tasks: Vec<(String, String)> = accepted
            .iter()
            .map(|a| (a.party.clone(), a.task_id.clone()))
            .collect();

        self.await_step(
            round,
            secagg,
            &tasks,
            by(0.5),
            |m| m.advertised,
            &mut failures,
        )
        .await?;
        let roster = secagg
            .close_advertising()
            .map_err(|e| self.secure_failed(round, secagg, &e, &failures))?;
        tracing::info!(
            round,
            parties = roster.len(),
            threshold = secagg.threshold,
            "secure aggregation: roster closed"
        );
        tasks.retain(|(p, _)| roster.position(p).is_some());

        self.await_step(round, secagg, &tasks, by(0.6), |m| m.shared, &mut failures)
            .await?;
        let sharers = secagg
            .close_sharing()
            .map_err(|e| self.secure_failed(round, secagg, &e, &failures))?;
        tasks.retain(|(p, _)| sharers.contains(p));

        self.await_step(round, secagg, &tasks, by(0.85), |m| m.masked, &mut failures)
            .await?;
        let request = secagg
            .close_masking()
            .map_err(|e| self.secure_failed(round, secagg, &e, &failures))?;
        tracing::info!(round, survivors = request.survivors.len(), dropped = ?request.dropped, "secure aggregation: masked input closed");
        for party in &request.dropped {
            self.state.note(Note {
                kind: NoteKind::UpdateDropped,
                round,
                party: party.clone(),
                task_id: String::new(),
                message: "secure aggregation: shared its keys but sent no whole masked update; \
                          its masks are removed with the survivors' shares"
                    .into(),
            });
        }
        tasks.retain(|(p, _)| request.survivors.contains(p));

        self.await_step(
            round,
            secagg,
            &tasks,
            deadline,
            |m| m.answered,
            &mut failures,
        )
        .await?;
        let unmasking = Instant::now();
        let (aggregate, train_loss) = secagg
            .finish()
            .map_err(|e| self.secure_failed(round, secagg, &e, &failures))?;
        // Settles the round's draws; nothing was folded into its FedAvg.
        let _ = self.state.finish_training();
        let updates = aggregate.contributors().len() as u32;
        tracing::info!(
            round,
            updates,
            dropped = request.dropped.len(),
            unmask_seconds = unmasking.elapsed().as_secs_f64(),
            mean_error_bound = aggregate.mean_error_bound(),
            "secure aggregation: the survivors' sum unmasked"
        );
        if updates < clients.min {
            return Err(self.round_failed(
                round,
                format!(
                    "quorum not met: {updates} masked update(s) summed, clients.min is {}{}",
                    clients.min,
                    failure_summary(&failures)
                ),
            ));
        }
        // served + the unweighted mean of the survivors' clipped updates (under DP: their
        // noisy sum over clients.per_round, DP-FedAvg's fixed denominator).
        let denominator = secagg.denominator.map_or(updates as usize, |d| d as usize);
        let (encoding, sum) = (aggregate.encoding(), aggregate.ring_sum());
        let mut combined = Vec::with_capacity(global.len());
        let mut offset = 0;
        for t in global.iter() {
            let mut mean = vec![0f32; t.data.len()];
            let end = (offset + mean.len()).min(sum.len());
            encoding.decode_mean_into(&sum[offset.min(end)..end], denominator, &mut mean);
            offset += t.data.len();
            let data: Vec<f32> = t.data.iter().zip(&mean).map(|(g, m)| g + m).collect();
            if data.iter().any(|x| !x.is_finite()) {
                return Err(self.round_failed(
                    round,
                    format!(
                        "aggregation failed: tensor {} is not finite with the mean update",
                        t.name
                    ),
                ));
            }
            combined.push(NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data,
            });
        }
        let facts = RoundFacts {
            updates,
            population: cohort.holders.max(updates),
        };
        let (model, extras) = {
            let mut strategy = lock(&self.strategy);
            let strategy = strategy
                .as_mut()
                .ok_or_else(|| self.round_failed(round, "no strategy was started".into()))?;
            let model = strategy.step(&global, combined, facts).map_err(|e| {
                self.round_failed(round, format!("the {} step failed: {e}", strategy.name()))
            })?;
            (model, strategy.extras())
        };
        self.state.set_model(model, extras);
        Ok(Trained {
            updates,
            train_loss,
            dropped: request.dropped.len() as u32,
            task_failures: failures.len() as u32,
        })
    }

    /// The round fails with the protocol's reason (naming t when too few parties remain);
    /// waiting parties are told.
    fn secure_failed(
        &self,
        round: u32,
        secagg: &SecAgg,
        e: &SecAggError,
        failures: &Failures,
    ) -> Failure {
        let why = match e {
            SecAggError::ThresholdNotMet { .. } => format!(
                "secure aggregation (privacy.secagg_threshold t={}): {e}{}",
                secagg.threshold,
                failure_summary(failures)
            ),
            _ => format!("secure aggregation: {e}{}", failure_summary(failures)),
        };
        secagg.fail(&why);
        let _ = self.state.finish_training();
        self.round_failed(round, why)
    }

    /// Waits until every party of `tasks` took the step `done` says, or its task ended
    /// (noted with its party's reason), or `until`.
    async fn await_step(
        &self,
        round: u32,
        secagg: &SecAgg,
        tasks: &[(String, String)],
        until: Instant,
        done: impl Fn(&Member) -> bool,
        failures: &mut Failures,
    ) -> Result<(), Failure> {
        let mut changed = secagg.watch();
        let mut next_poll = Instant::now();
        loop {
            if let Some(r) = self.stop_reason() {
                secagg.fail(&r);
                return Err(Failure::Stopped(r));
            }
            let members = secagg.members();
            let pending: Vec<&(String, String)> = tasks
                .iter()
                .filter(|(p, _)| members.get(p).is_none_or(|m| !done(m) && !m.gone))
                .collect();
            if pending.is_empty() || Instant::now() >= until {
                return Ok(());
            }
            if Instant::now() >= next_poll {
                next_poll = Instant::now() + TASK_POLL;
                let mut c = self.clients.selector.clone();
                let ids = pending.iter().map(|(_, id)| id.clone()).collect();
                if let Ok(states) = c.task_states(pb::TaskStatesRequest { task_ids: ids }).await {
                    let states = states.into_inner();
                    for (party, id) in &pending {
                        let ended = matches!(
                            states
                                .phases
                                .get(id)
                                .and_then(|p| pb::TaskPhase::try_from(*p).ok()),
                            Some(
                                pb::TaskPhase::Failed
                                    | pb::TaskPhase::Cancelled
                                    | pb::TaskPhase::Succeeded
                            )
                        );
                        if !ended {
                            continue;
                        }
                        let reason = self.note_task_failed(round, party, id, &states.messages);
                        tracing::warn!(round, %party, task = %id, %reason, phase = ?secagg.phase(), "secure aggregation: a party's task ended");
                        failures.push((party.clone(), id.clone(), reason));
                        secagg.mark_gone(party);
                    }
                    continue;
                }
            }
            let wait = next_poll
                .min(until)
                .saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(wait, changed.changed()).await;
        }
    }
}
