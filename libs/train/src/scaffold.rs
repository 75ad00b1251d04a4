//! SCAFFOLD's party side (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
//! Federated Learning", 2020, Algorithm 1 with option II): the control variates a party
//! trains with — every local step follows g + c − c_i, c the server's, c_i the party's — and
//! the party's next control variate, c_i⁺ = c_i − c + (x − y)/(K·η), K the steps taken, η
//! the learning rate, x the global model and y the trained one. Pure compute: where c_i is
//! kept between rounds is the executor's business.

use cohort_core::spec::{OptimizerSpec, TrainingSpec};

use crate::{NamedTensor, TrainError};

/// The two control variates of one round: one tensor per model tensor, same names and
/// shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVariates {
    /// c: the server's, fetched with the global model.
    pub server: Vec<NamedTensor>,
    /// c_i: this party's, from its previous round (zeros before its first).
    pub client: Vec<NamedTensor>,
}

/// The party's control variate after a round of local training.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlUpdate {
    /// c_i⁺, in the model's tensor order: what the party keeps for its next round.
    pub client: Vec<NamedTensor>,
    /// Δc_i = c_i⁺ − c_i, in the same order: what the party sends beside its model delta.
    pub delta: Vec<NamedTensor>,
}

/// Zeros of `model`'s layout: the control variate of a party that has not trained yet.
pub fn zero_control(model: &[NamedTensor]) -> Vec<NamedTensor> {
    model
        .iter()
        .map(|t| NamedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: vec![0.0; t.data.len()],
        })
        .collect()
}

impl ControlVariates {
    /// c − c_i for the tensor `name` of shape `shape`: what is added to its gradient at
    /// every step.
    pub(crate) fn correction(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, TrainError> {
        let c = find(&self.server, "server control variate", name, shape)?;
        let ci = find(&self.client, "client control variate", name, shape)?;
        Ok(c.iter().zip(ci).map(|(c, ci)| c - ci).collect())
    }

    /// SCAFFOLD option II: c_i⁺ = c_i − c + (x − y)/(K·η), for `global` (x) trained into
    /// `trained` (y) by `steps` (K) sgd steps of `training`'s learning rate η. With the
    /// corrected steps y = x − η·Σ(g_k + c − c_i), so c_i⁺ is the mean of the K plain
    /// gradients. Only sgd: an adaptive optimiser's step is not η times the gradient, so
    /// (x − y)/(K·η) would estimate nothing.
    pub fn next(
        &self,
        training: &TrainingSpec,
        global: &[NamedTensor],
        trained: &[NamedTensor],
        steps: usize,
    ) -> Result<ControlUpdate, TrainError> {
        let lr = match training.optimizer {
            OptimizerSpec::Sgd { lr } if lr.is_finite() && lr > 0.0 => lr,
            OptimizerSpec::Sgd { lr } => {
                return Err(TrainError::invalid(
                    "training.optimizer.lr",
                    format!("must be a positive number, got {lr}"),
                ));
            }
            OptimizerSpec::Adam { .. } => {
                return Err(TrainError::invalid(
                    "training.optimizer",
                    "scaffold's control variates need sgd (the step of adam is not lr × \
                     the gradient)",
                ));
            }
        };
        if steps == 0 {
            return Err(TrainError::invalid(
                "steps",
                "no local step was taken, so there is no gradient to estimate",
            ));
        }
        let scale = 1.0 / (steps as f64 * lr);
        let (mut client, mut delta) = (Vec::new(), Vec::new());
        for x in global {
            let y = find(trained, "trained model", &x.name, &x.shape)?;
            let c = find(&self.server, "server control variate", &x.name, &x.shape)?;
            let ci = find(&self.client, "client control variate", &x.name, &x.shape)?;
            let mut next = Vec::with_capacity(x.data.len());
            let mut moved = Vec::with_capacity(x.data.len());
            for i in 0..x.data.len() {
                // In f64: (x − y) is small beside x, and 1/(Kη) may be large.
                let d = -f64::from(c[i]) + (f64::from(x.data[i]) - f64::from(y[i])) * scale;
                let n = f64::from(ci[i]) + d;
                if !(d.is_finite() && n.is_finite() && (n as f32).is_finite()) {
                    return Err(TrainError::weights(
                        &x.name,
                        format!("the client control variate's value {i} is not finite"),
                    ));
                }
                next.push(n as f32);
                moved.push(d as f32);
            }
            client.push(NamedTensor {
                name: x.name.clone(),
                shape: x.shape.clone(),
                data: next,
            });
            delta.push(NamedTensor {
                name: x.name.clone(),
                shape: x.shape.clone(),
                data: moved,
            });
        }
        Ok(ControlUpdate { client, delta })
    }
}

/// The values of tensor `name` in `tensors`, checked to have `shape`; `which` names the set
/// in errors.
fn find<'a>(
    tensors: &'a [NamedTensor],
    which: &str,
    name: &str,
    shape: &[usize],
) -> Result<&'a [f32], TrainError> {
    let t = tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| TrainError::weights(name, format!("the {which} has no such tensor")))?;
    let len: usize = shape.iter().product();
    if t.shape != shape || t.data.len() != len {
        return Err(TrainError::weights(
            name,
            format!(
                "the {which} has shape {:?} ({} values) but the model's is {shape:?}",
                t.shape,
                t.data.len()
            ),
        ));
    }
    Ok(&t.data)
}
