//! Server optimisers: FedAdam, FedYogi and FedAdagrad (Reddi et al., "Adaptive Federated
//! Optimization", 2021, Algorithm 2). The round's weighted mean of updates (FedAvg's model
//! minus the global) is the pseudo-gradient Δ; the server keeps a first moment m and a second
//! moment v per parameter and moves the global model by `η·m / (√v + τ)`:
//!
//! ```text
//! m ← β₁m + (1−β₁)Δ
//! v ← β₂v + (1−β₂)Δ²            (adam)
//! v ← v − (1−β₂)Δ² sign(v − Δ²)  (yogi)
//! v ← v + Δ²                     (adagrad)
//! x ← x + η·m / (√v + τ)
//! ```
//!
//! m starts at 0 and v at τ² (the paper's v₋₁ ≥ τ²). The state is two tensors per tensor of
//! the model, named `server.m/NAME` and `server.v/NAME` ([`AdaptiveServer::state`]), so that it
//! can be checkpointed with the round's model and restored when a coordinator resumes.

use cohort_core::NamedTensor;
use cohort_core::spec::{SecondMoment, ServerOptimizer};

use crate::FlError;
use crate::buffers::Buffers;

/// Prefix of the first moment's tensors in [`AdaptiveServer::state`].
pub const FIRST_MOMENT_PREFIX: &str = "server.m/";
/// Prefix of the second moment's tensors in [`AdaptiveServer::state`].
pub const SECOND_MOMENT_PREFIX: &str = "server.v/";

/// A server optimiser with its moments, one pair of buffers per tensor of the model.
#[derive(Debug, Clone)]
pub struct AdaptiveServer {
    opt: ServerOptimizer,
    m: Buffers,
    v: Buffers,
}

impl AdaptiveServer {
    /// Fresh moments for a model laid out as `global`.
    pub fn new(opt: ServerOptimizer, global: &[NamedTensor]) -> Self {
        let v0 = (opt.tau * opt.tau) as f32;
        AdaptiveServer {
            opt,
            m: Buffers::zeros(global, FIRST_MOMENT_PREFIX),
            v: Buffers::filled(global, SECOND_MOMENT_PREFIX, v0),
        }
    }

    /// The next global model from `global` and FedAvg's model `averaged` (global plus the
    /// round's weighted mean update), made in `averaged`'s memory.
    pub fn step(
        &mut self,
        global: &[NamedTensor],
        mut averaged: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>, FlError> {
        self.m.check_layout(global, "the global model")?;
        self.m.check_layout(&averaged, "the aggregate")?;
        let ServerOptimizer {
            rule,
            server_lr,
            beta1,
            beta2,
            tau,
        } = self.opt;
        let (eta, b1, b2, tau) = (server_lr as f32, beta1 as f32, beta2 as f32, tau as f32);
        for (((x, avg), m), v) in global
            .iter()
            .zip(averaged.iter_mut())
            .zip(self.m.data.iter_mut())
            .zip(self.v.data.iter_mut())
        {
            let mut finite = true;
            for (((xi, ai), mi), vi) in x
                .data
                .iter()
                .zip(avg.data.iter_mut())
                .zip(m.iter_mut())
                .zip(v.iter_mut())
            {
                let delta = *ai - *xi;
                let sq = delta * delta;
                *mi = b1 * *mi + (1.0 - b1) * delta;
                *vi = match rule {
                    SecondMoment::Adam => b2 * *vi + (1.0 - b2) * sq,
                    SecondMoment::Yogi => *vi - (1.0 - b2) * sq * (*vi - sq).signum(),
                    SecondMoment::Adagrad => *vi + sq,
                };
                // Yogi's v can only shrink towards Δ²; it stays ≥ 0 up to rounding.
                *vi = vi.max(0.0);
                *ai = *xi + eta * *mi / (vi.sqrt() + tau);
                finite &= ai.is_finite() && mi.is_finite() && vi.is_finite();
            }
            if !finite {
                return Err(FlError::NonFiniteAggregate {
                    tensor: avg.name.clone(),
                });
            }
        }
        Ok(averaged)
    }

    /// The moments as tensors (`server.m/NAME`, `server.v/NAME`), to checkpoint.
    pub fn state(&self) -> Vec<NamedTensor> {
        let mut out = self.m.to_tensors();
        out.extend(self.v.to_tensors());
        out
    }

    /// Takes the moments from a checkpoint made by [`AdaptiveServer::state`] for the same
    /// model; refuses one that does not match it (a tensor missing, of another shape, or
    /// not finite) and keeps the current moments then.
    pub fn restore(&mut self, state: &[NamedTensor]) -> Result<(), FlError> {
        let m = self.m.read(state)?;
        let v = self.v.read(state)?;
        if v.iter().flatten().any(|x| *x < 0.0) {
            return Err(FlError::LayoutMismatch(
                "server state: a second moment is negative".into(),
            ));
        }
        self.m.data = m;
        self.v.data = v;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: vec![data.len()],
            data,
        }
    }

    fn opt(rule: SecondMoment) -> ServerOptimizer {
        ServerOptimizer {
            rule,
            server_lr: 0.5,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.01,
        }
    }

    /// Algorithm 2 of the paper for one coordinate, in f64, `rounds` times.
    fn reference(rule: SecondMoment, x0: f64, deltas: &[f64]) -> f64 {
        let (eta, b1, b2, tau) = (0.5, 0.9, 0.99, 0.01);
        let (mut x, mut m, mut v) = (x0, 0.0, tau * tau);
        for d in deltas {
            m = b1 * m + (1.0 - b1) * d;
            v = match rule {
                SecondMoment::Adam => b2 * v + (1.0 - b2) * d * d,
                SecondMoment::Yogi => v - (1.0 - b2) * d * d * (v - d * d).signum(),
                SecondMoment::Adagrad => v + d * d,
            };
            x += eta * m / (v.sqrt() + tau);
        }
        x
    }

    #[test]
    fn each_rule_follows_the_paper_round_after_round() {
        let deltas = [0.3, -0.1, 0.25, 0.0, -0.4];
        for rule in [
            SecondMoment::Adam,
            SecondMoment::Yogi,
            SecondMoment::Adagrad,
        ] {
            let mut global = vec![tensor("w", vec![1.0, -2.0])];
            let mut server = AdaptiveServer::new(opt(rule), &global);
            for d in deltas {
                let averaged = vec![tensor(
                    "w",
                    global[0].data.iter().map(|x| x + d as f32).collect(),
                )];
                global = server.step(&global, averaged).expect("step");
            }
            for (i, x0) in [1.0, -2.0].into_iter().enumerate() {
                let want = reference(rule, x0, &deltas);
                let got = f64::from(global[0].data[i]);
                assert!((got - want).abs() < 1e-4, "{rule:?}[{i}]: {got} vs {want}");
            }
        }
    }

    #[test]
    fn restored_state_continues_exactly_where_it_was_checkpointed() {
        let global = vec![tensor("a", vec![0.0; 3]), tensor("b", vec![1.0])];
        let step = |server: &mut AdaptiveServer, g: &[NamedTensor], d: f32| {
            let averaged: Vec<NamedTensor> = g
                .iter()
                .map(|t| tensor(&t.name, t.data.iter().map(|x| x + d).collect()))
                .collect();
            server.step(g, averaged).expect("step")
        };
        let mut first = AdaptiveServer::new(opt(SecondMoment::Adam), &global);
        let g1 = step(&mut first, &global, 0.2);
        let checkpoint = first.state();
        assert_eq!(checkpoint.len(), 4);
        assert!(checkpoint.iter().any(|t| t.name == "server.v/b"));
        let g2 = step(&mut first, &g1, -0.1);

        let mut resumed = AdaptiveServer::new(opt(SecondMoment::Adam), &global);
        resumed.restore(&checkpoint).expect("restore");
        assert_eq!(resumed.state(), checkpoint);
        assert_eq!(step(&mut resumed, &g1, -0.1), g2);

        // A state of another model is refused, and the moments stay as they were.
        let mut other = checkpoint.clone();
        other.retain(|t| t.name != "server.m/a");
        assert!(resumed.restore(&other).is_err());
        other = checkpoint.clone();
        other[0].data[0] = f32::NAN;
        assert!(resumed.restore(&other).is_err());
        assert_eq!(resumed.state(), first.state());
    }

    #[test]
    fn a_step_that_would_not_be_finite_is_refused() {
        let global = vec![tensor("w", vec![f32::MAX])];
        let mut server = AdaptiveServer::new(
            ServerOptimizer {
                server_lr: 10.0,
                ..opt(SecondMoment::Adagrad)
            },
            &global,
        );
        let averaged = vec![tensor("w", vec![f32::MAX])];
        // Δ = 0 moves nothing; a model at the edge stays finite.
        let same = server.step(&global, averaged).expect("step");
        assert_eq!(same[0].data[0], f32::MAX);
        let mut server = AdaptiveServer::new(opt(SecondMoment::Adam), &global);
        let err = server
            .step(&global, vec![tensor("w", vec![-f32::MAX])])
            .expect_err("overflow");
        assert!(matches!(err, FlError::NonFiniteAggregate { .. }), "{err}");
        let err = server
            .step(&global, vec![tensor("x", vec![0.0])])
            .expect_err("layout");
        assert!(matches!(err, FlError::LayoutMismatch(_)), "{err}");
    }
}
