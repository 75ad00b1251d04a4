//! The job's privacy budget under `privacy.dp`: the RDP accountant over the rounds whose
//! model was released, each at the sampling rate of its cohort (q = clients.per_round ÷
//! the parties holding the dataset when it was offered, at most 1). A relaunched
//! coordinator replays the rates job-scheduler recorded, so ε carries on where it was.
//!
//! Before each round the budget says whether the round may run: with
//! `privacy.dp.target_epsilon`, not when it would take ε past the target. No I/O.

use cohort_core::JobSpec;
use cohort_core::spec::DpSpec;
use cohort_fl::Accountant;

/// What the job has spent and may still spend.
#[derive(Debug, Clone)]
pub struct Budget {
    delta: f64,
    target: Option<f64>,
    accountant: Accountant,
}

/// A round that would overspend: the job ends before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhausted {
    /// Rounds released before it.
    pub released: u32,
    /// ε now and with the round.
    pub spent: f64,
    pub would_be: f64,
}

impl Budget {
    /// The budget after the rounds recorded so far, given the rate each was accounted at
    /// (`None`: recorded without one, taken as q = 1, the most it can have cost).
    pub fn resume(dp: &DpSpec, recorded: impl IntoIterator<Item = Option<f64>>) -> Budget {
        let mut accountant = Accountant::new(dp.noise_multiplier);
        for q in recorded {
            accountant.compose(q.filter(|q| *q > 0.0).unwrap_or(1.0), 1);
        }
        Budget {
            delta: dp.delta,
            target: dp.target_epsilon,
            accountant,
        }
    }

    /// The sampling rate of a round offered to `per_round` of `eligible` parties; 1 when
    /// no party is known to be eligible (the most it can be).
    pub fn sampling_rate(per_round: u32, eligible: u32) -> f64 {
        if eligible == 0 {
            return 1.0;
        }
        (f64::from(per_round) / f64::from(eligible)).min(1.0)
    }

    /// ε at the spec's δ so far.
    pub fn spent(&self) -> f64 {
        self.accountant.epsilon(self.delta)
    }

    /// Rounds accounted for.
    pub fn released(&self) -> u32 {
        self.accountant.steps()
    }

    /// Whether a round at rate `q` stays within `target_epsilon`.
    pub fn allows(&self, q: f64) -> Result<(), Exhausted> {
        let Some(target) = self.target else {
            return Ok(());
        };
        let would_be = self.accountant.epsilon_after(q, self.delta);
        if would_be <= target {
            return Ok(());
        }
        Err(Exhausted {
            released: self.released(),
            spent: self.spent(),
            would_be,
        })
    }

    /// Accounts for a released round at rate `q`; returns ε after it.
    pub fn spend(&mut self, q: f64) -> f64 {
        self.accountant.compose(q, 1);
        self.spent()
    }

    pub fn delta(&self) -> f64 {
        self.delta
    }

    pub fn target(&self) -> Option<f64> {
        self.target
    }
}

impl Exhausted {
    /// Why the job ends, naming the budget.
    pub fn reason(&self, round: u32, q: f64, target: f64, delta: f64) -> String {
        if self.released == 0 {
            format!(
                "privacy.dp.target_epsilon: one round at sampling rate {q:.3} already spends \
                 ε = {:.3} (δ = {delta:e}), over the budget {target}; no round was run",
                self.would_be
            )
        } else {
            format!(
                "privacy budget reached: round {round} would take ε to {:.3} (δ = {delta:e}, \
                 sampling rate {q:.3}), over privacy.dp.target_epsilon {target}; stopped \
                 after {} round(s) at ε = {:.3}",
                self.would_be, self.released, self.spent
            )
        }
    }
}

/// The job's budget as the round loop uses it: None without `privacy.dp`.
#[derive(Debug, Default)]
pub struct RoundBudget {
    budget: Option<Budget>,
    /// The sampling rate of the round under way.
    rate: f64,
}

/// The job ends before a round: SUCCEEDED once rounds were released, FAILED if none could be.
pub struct Ended {
    pub failed: bool,
    pub reason: String,
}

impl RoundBudget {
    /// The budget of `spec`'s job after the rounds recorded before (their rates, in order).
    pub fn for_job(spec: &JobSpec, recorded: impl IntoIterator<Item = Option<f64>>) -> Self {
        RoundBudget {
            budget: spec
                .privacy
                .dp
                .as_ref()
                .map(|dp| Budget::resume(dp, recorded)),
            rate: 1.0,
        }
    }

    /// Before round `round`, offered to `per_round` of `eligible` parties: whether it may run.
    pub fn before_round(&mut self, round: u32, per_round: u32, eligible: u32) -> Result<(), Ended> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        self.rate = Budget::sampling_rate(per_round, eligible);
        budget.allows(self.rate).map_err(|e| Ended {
            failed: e.released == 0,
            reason: e.reason(
                round,
                self.rate,
                budget.target().unwrap_or(f64::INFINITY),
                budget.delta(),
            ),
        })
    }

    /// The round's model was released: (ε after it, its sampling rate); None without DP.
    pub fn released(&mut self) -> Option<(f64, f64)> {
        let budget = self.budget.as_mut()?;
        Some((budget.spend(self.rate), self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp(target: Option<f64>) -> DpSpec {
        DpSpec {
            clip: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            target_epsilon: target,
            local: false,
        }
    }

    #[test]
    fn the_budget_stops_before_the_round_that_would_exceed_it() {
        let q = Budget::sampling_rate(2, 3);
        assert!((q - 2.0 / 3.0).abs() < 1e-12);
        let target = cohort_fl::privacy::epsilon(q, 1.0, 4, 1e-5) + 1e-9;
        let mut budget = Budget::resume(&dp(Some(target)), []);
        let mut rounds = 0;
        while budget.allows(q).is_ok() {
            budget.spend(q);
            rounds += 1;
        }
        assert_eq!(rounds, 4);
        let e = budget.allows(q).unwrap_err();
        assert_eq!(e.released, 4);
        assert!(e.spent <= target && e.would_be > target);
        let why = e.reason(5, q, target, 1e-5);
        assert!(why.contains("privacy.dp.target_epsilon"), "{why}");
        assert!(why.contains("round 5"), "{why}");
    }

    #[test]
    fn a_resumed_budget_replays_the_recorded_rates() {
        let mut live = Budget::resume(&dp(None), []);
        for q in [0.5, 1.0, 0.25] {
            live.spend(q);
        }
        let resumed = Budget::resume(&dp(None), [Some(0.5), Some(1.0), Some(0.25)]);
        assert_eq!(resumed.spent(), live.spent());
        assert_eq!(resumed.released(), 3);
        // A rate that was not recorded counts as the worst.
        let unknown = Budget::resume(&dp(None), [None]);
        assert_eq!(
            unknown.spent(),
            Budget::resume(&dp(None), [Some(1.0)]).spent()
        );
        // Without a target every round may run.
        assert!(live.allows(1.0).is_ok());
        assert_eq!(Budget::sampling_rate(3, 0), 1.0);
        assert_eq!(Budget::sampling_rate(5, 3), 1.0);
    }

    #[test]
    fn a_first_round_over_the_budget_names_the_field() {
        let budget = Budget::resume(&dp(Some(0.01)), []);
        let e = budget.allows(1.0).unwrap_err();
        let why = e.reason(1, 1.0, 0.01, 1e-5);
        assert!(why.starts_with("privacy.dp.target_epsilon"), "{why}");
    }
}
