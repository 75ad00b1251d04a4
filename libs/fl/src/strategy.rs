//! The server side of a federated strategy, behind one trait: how a round's updates are
//! combined ([`Combine`]: a mean folded as updates stream, or a robust rule over all of them,
//! held where the caller stages them), and how the combination moves the global model
//! ([`Strategy::step`]), with whatever state that step keeps from round to round (momentum,
//! moments, control variates) exposed for checkpoints.
//!
//! A strategy may serve parties more than the model: SCAFFOLD's server control variate rides
//! with it ([`Strategy::extras`]) and comes back as a delta in every update, so the
//! coordinator checks and folds the "round tensors" (the model, then the extras) as one.
//!
//! Adding a strategy: implement [`Strategy`] here and add its arm to [`for_spec`] (the one
//! registration). The coordinator's round loop does not change.

use cohort_core::NamedTensor;
use cohort_core::spec::{AggregationSpec, Strategy as StrategyName};

use crate::FlError;
use crate::buffers::Buffers;
use crate::robust::RobustRule;
use crate::server_opt::AdaptiveServer;

/// How a round's updates become one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Combine {
    /// The weighted mean, folded as updates stream in (memory O(model)).
    Mean,
    /// A rule that needs every update at once; they are held where the caller staged them.
    Robust(RobustRule),
}

/// What a step may need to know of the round besides its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundFacts {
    /// Updates combined this round (|S|).
    pub updates: u32,
    /// Parties that could have taken part (N): those holding the job's dataset.
    pub population: u32,
}

/// The server side of a federated strategy.
pub trait Strategy: Send + std::fmt::Debug {
    /// The strategy's name in the job spec.
    fn name(&self) -> &'static str;

    /// How the round's updates are combined.
    fn combine(&self) -> Combine {
        Combine::Mean
    }

    /// Tensors served to parties after the model's and expected back, as deltas, in every
    /// update (SCAFFOLD's server control variate); none for most strategies.
    fn extras(&self) -> Vec<NamedTensor> {
        Vec::new()
    }

    /// The next global model from the round tensors served (`served`: the model, then
    /// [`Strategy::extras`]) and their combination (`combined`: `served` plus the combined
    /// update, laid out the same). Returns the model's tensors only.
    fn step(
        &mut self,
        served: &[NamedTensor],
        combined: Vec<NamedTensor>,
        round: RoundFacts,
    ) -> Result<Vec<NamedTensor>, FlError>;

    /// The state the step keeps between rounds, to checkpoint with the round; None for a
    /// stateless strategy.
    fn state(&self) -> Option<Vec<NamedTensor>> {
        None
    }

    /// Takes the state from a checkpoint made by [`Strategy::state`]; refuses one that does
    /// not fit the model (and keeps the current state then).
    fn restore(&mut self, _state: &[NamedTensor]) -> Result<(), FlError> {
        Ok(())
    }
}

/// The strategy the spec names, for a model laid out as `model`: the one registration.
pub fn for_spec(spec: &AggregationSpec, model: &[NamedTensor]) -> Box<dyn Strategy> {
    if let Some(opt) = spec.server_optimizer() {
        return Box::new(Adaptive {
            name: spec.strategy.as_str(),
            server: AdaptiveServer::new(opt, model),
        });
    }
    if let Some((server_lr, momentum)) = spec.server_momentum() {
        return Box::new(Momentum::new(model, server_lr, momentum));
    }
    if let Some(server_lr) = spec.scaffold_server_lr() {
        return Box::new(Scaffold::new(model, server_lr));
    }
    let combine = match spec.strategy {
        StrategyName::Median => Combine::Robust(RobustRule::Median),
        StrategyName::TrimmedMean => Combine::Robust(RobustRule::TrimmedMean {
            beta: spec.beta.unwrap_or(AggregationSpec::DEFAULT_TRIM),
        }),
        StrategyName::Krum => {
            let (f, m) = spec.krum();
            Combine::Robust(RobustRule::Krum { f, m })
        }
        _ => Combine::Mean,
    };
    // fedprox's server is fedavg: its proximal term lives in the parties' training.
    Box::new(Plain {
        name: spec.strategy.as_str(),
        combine,
    })
}

/// The combination is the new model: fedavg, fedprox, median, trimmed mean, Krum.
#[derive(Debug)]
struct Plain {
    name: &'static str,
    combine: Combine,
}

impl Strategy for Plain {
    fn name(&self) -> &'static str {
        self.name
    }

    fn combine(&self) -> Combine {
        self.combine
    }

    fn step(
        &mut self,
        _served: &[NamedTensor],
        combined: Vec<NamedTensor>,
        _round: RoundFacts,
    ) -> Result<Vec<NamedTensor>, FlError> {
        Ok(combined)
    }
}

/// FedAdam, FedYogi, FedAdagrad: see [`AdaptiveServer`].
#[derive(Debug)]
struct Adaptive {
    name: &'static str,
    server: AdaptiveServer,
}

impl Strategy for Adaptive {
    fn name(&self) -> &'static str {
        self.name
    }

    fn step(
        &mut self,
        served: &[NamedTensor],
        combined: Vec<NamedTensor>,
        _round: RoundFacts,
    ) -> Result<Vec<NamedTensor>, FlError> {
        self.server.step(served, combined)
    }

    fn state(&self) -> Option<Vec<NamedTensor>> {
        Some(self.server.state())
    }

    fn restore(&mut self, state: &[NamedTensor]) -> Result<(), FlError> {
        self.server.restore(state)
    }
}

/// Prefix of FedAvgM's velocity tensors in its state.
pub const VELOCITY_PREFIX: &str = "server.velocity/";

/// FedAvgM (Hsu et al. 2019): server momentum over the round's mean update Δ,
/// `v ← βv + Δ; x ← x + ηv`.
#[derive(Debug)]
struct Momentum {
    server_lr: f32,
    momentum: f32,
    velocity: Buffers,
}

impl Momentum {
    fn new(model: &[NamedTensor], server_lr: f64, momentum: f64) -> Self {
        Momentum {
            server_lr: server_lr as f32,
            momentum: momentum as f32,
            velocity: Buffers::zeros(model, VELOCITY_PREFIX),
        }
    }
}

impl Strategy for Momentum {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn step(
        &mut self,
        served: &[NamedTensor],
        mut combined: Vec<NamedTensor>,
        _round: RoundFacts,
    ) -> Result<Vec<NamedTensor>, FlError> {
        self.velocity.check_layout(served, "the global model")?;
        self.velocity.check_layout(&combined, "the aggregate")?;
        let (eta, beta) = (self.server_lr, self.momentum);
        for ((x, avg), v) in served
            .iter()
            .zip(combined.iter_mut())
            .zip(self.velocity.data.iter_mut())
        {
            for ((xi, ai), vi) in x.data.iter().zip(avg.data.iter_mut()).zip(v.iter_mut()) {
                *vi = beta * *vi + (*ai - *xi);
                *ai = *xi + eta * *vi;
            }
            finite(avg, v)?;
        }
        Ok(combined)
    }

    fn state(&self) -> Option<Vec<NamedTensor>> {
        Some(self.velocity.to_tensors())
    }

    fn restore(&mut self, state: &[NamedTensor]) -> Result<(), FlError> {
        self.velocity.restore(state)
    }
}

/// Prefix of SCAFFOLD's server control variate, both in what parties are served (and send
/// back as deltas) and in the checkpointed state.
pub const CONTROL_PREFIX: &str = "scaffold.c/";

/// SCAFFOLD (Karimireddy et al. 2020) on the server: `x ← x + η·mean(Δy)` and
/// `c ← c + (|S|/N)·mean(Δc)`. The parties' own control variates live with them.
#[derive(Debug)]
struct Scaffold {
    server_lr: f32,
    control: Buffers,
}

impl Scaffold {
    fn new(model: &[NamedTensor], server_lr: f64) -> Self {
        Scaffold {
            server_lr: server_lr as f32,
            control: Buffers::zeros(model, CONTROL_PREFIX),
        }
    }
}

impl Strategy for Scaffold {
    fn name(&self) -> &'static str {
        "scaffold"
    }

    fn extras(&self) -> Vec<NamedTensor> {
        self.control.to_tensors()
    }

    fn step(
        &mut self,
        served: &[NamedTensor],
        mut combined: Vec<NamedTensor>,
        round: RoundFacts,
    ) -> Result<Vec<NamedTensor>, FlError> {
        let n = self.control.data.len();
        if served.len() != 2 * n || combined.len() != 2 * n {
            return Err(FlError::LayoutMismatch(format!(
                "scaffold: {} served and {} combined tensors, expected the model's {n} and \
                 as many control variates",
                served.len(),
                combined.len()
            )));
        }
        let combined_control = combined.split_off(n);
        self.control
            .check_layout(&served[..n], "the global model")?;
        self.control.check_layout(&combined, "the aggregate")?;
        self.control
            .check_layout(&combined_control, "the aggregate's control variates")?;
        let eta = self.server_lr;
        for (x, avg) in served[..n].iter().zip(combined.iter_mut()) {
            for (xi, ai) in x.data.iter().zip(avg.data.iter_mut()) {
                *ai = *xi + eta * (*ai - *xi);
            }
        }
        // Parties that sat the round out keep their control variates: c moves by the share
        // of the population that took part.
        let share = if round.population == 0 {
            1.0
        } else {
            (round.updates as f32 / round.population as f32).min(1.0)
        };
        for ((c, avg_c), avg) in self
            .control
            .data
            .iter_mut()
            .zip(&combined_control)
            .zip(&combined)
        {
            for (ci, ai) in c.iter_mut().zip(&avg_c.data) {
                *ci += share * (*ai - *ci);
            }
            finite(avg, c)?;
        }
        Ok(combined)
    }

    fn state(&self) -> Option<Vec<NamedTensor>> {
        Some(self.control.to_tensors())
    }

    fn restore(&mut self, state: &[NamedTensor]) -> Result<(), FlError> {
        self.control.restore(state)
    }
}

/// Refuses a step whose model or state is no longer finite.
fn finite(model: &NamedTensor, state: &[f32]) -> Result<(), FlError> {
    if crate::wire::all_finite(&model.data) && crate::wire::all_finite(state) {
        Ok(())
    } else {
        Err(FlError::NonFiniteAggregate {
            tensor: model.name.clone(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tensor(name: &str, data: &[f32]) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: vec![data.len()],
            data: data.to_vec(),
        }
    }

    fn spec(json: &str) -> AggregationSpec {
        serde_json::from_str(json).unwrap()
    }

    const FACTS: RoundFacts = RoundFacts {
        updates: 2,
        population: 4,
    };

    #[test]
    fn every_spec_strategy_has_a_server_side() {
        let model = [tensor("w", &[0.0])];
        for name in [
            "fedavg",
            "fedavgm",
            "fedprox",
            "fedadam",
            "fedyogi",
            "fedadagrad",
            "scaffold",
            "median",
            "trimmed_mean",
            "krum",
        ] {
            let s = for_spec(&spec(&format!(r#"{{"strategy": "{name}"}}"#)), &model);
            assert_eq!(s.name(), name);
            let robust = matches!(s.combine(), Combine::Robust(_));
            assert_eq!(
                robust,
                ["median", "trimmed_mean", "krum"].contains(&name),
                "{name}"
            );
            assert_eq!(s.extras().is_empty(), name != "scaffold", "{name}");
        }
    }

    #[test]
    fn fedavgm_accumulates_momentum_and_checkpoints_it() {
        let model = vec![tensor("w", &[1.0, 0.0])];
        let mut s = for_spec(
            &spec(r#"{"strategy": "fedavgm", "server_lr": 1.0, "momentum": 0.5}"#),
            &model,
        );
        // Δ = (1, -1): v = Δ, x = 1 + 1 = 2, 0 − 1 = −1.
        let next = s
            .step(&model, vec![tensor("w", &[2.0, -1.0])], FACTS)
            .unwrap();
        assert_eq!(next[0].data, vec![2.0, -1.0]);
        // Δ = 0: v = 0.5·(1, −1), x moves by it all the same.
        let again = s.step(&next, next.clone(), FACTS).unwrap();
        assert_eq!(again[0].data, vec![2.5, -1.5]);
        let state = s.state().unwrap();
        assert_eq!(state[0].name, "server.velocity/w");
        assert_eq!(state[0].data, vec![0.5, -0.5]);
        let mut resumed = for_spec(&spec(r#"{"strategy": "fedavgm"}"#), &model);
        resumed.restore(&state).unwrap();
        assert_eq!(resumed.state().unwrap(), state);
    }

    #[test]
    fn scaffold_serves_its_control_variate_and_moves_it_by_the_share_that_took_part() {
        let model = vec![tensor("w", &[1.0, 1.0])];
        let mut s = for_spec(&spec(r#"{"strategy": "scaffold"}"#), &model);
        let extras = s.extras();
        assert_eq!(extras, vec![tensor("scaffold.c/w", &[0.0, 0.0])]);
        let mut served = model.clone();
        served.extend(extras);
        // Mean Δy = (1, −1), mean Δc = (0.4, 0.8); 2 of 4 parties took part.
        let combined = vec![
            tensor("w", &[2.0, 0.0]),
            tensor("scaffold.c/w", &[0.4, 0.8]),
        ];
        let next = s.step(&served, combined, FACTS).unwrap();
        assert_eq!(next, vec![tensor("w", &[2.0, 0.0])]);
        assert_eq!(s.extras(), vec![tensor("scaffold.c/w", &[0.2, 0.4])]);
        assert_eq!(s.state().unwrap(), s.extras());
        // Without the control variates the layout is refused.
        assert!(s.step(&model, model.clone(), FACTS).is_err());
    }

    #[test]
    fn a_state_of_another_model_is_refused_and_the_current_one_kept() {
        let model = vec![tensor("w", &[1.0, 1.0])];
        let mut s = for_spec(&spec(r#"{"strategy": "scaffold"}"#), &model);
        let before = s.state().unwrap();
        assert!(s.restore(&[tensor("scaffold.c/w", &[1.0])]).is_err());
        assert!(s.restore(&[tensor("scaffold.c/v", &[1.0, 1.0])]).is_err());
        assert!(
            s.restore(&[tensor("scaffold.c/w", &[f32::NAN, 1.0])])
                .is_err()
        );
        assert_eq!(s.state().unwrap(), before);
        assert!(
            for_spec(&spec(r#"{"strategy": "fedavg"}"#), &model)
                .state()
                .is_none()
        );
    }

    #[test]
    fn a_step_that_is_not_finite_is_refused() {
        let model = vec![tensor("w", &[f32::MAX])];
        let mut s = for_spec(&spec(r#"{"strategy": "fedavgm", "momentum": 0.9}"#), &model);
        let combined = vec![tensor("w", &[f32::MAX])];
        s.step(&model, combined.clone(), FACTS).unwrap();
        let mut big = model.clone();
        big[0].data[0] = -f32::MAX;
        assert!(s.step(&big, combined, FACTS).is_err());
    }
}
