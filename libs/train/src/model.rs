//! The built-in models (logreg, mlp, cnn): construction, training and evaluation with candle
//! on the device `training.device` selects (evaluation on the CPU). Weights live outside candle as [`NamedTensor`]s; every call rebuilds the
//! tensors, so nothing here keeps state between rounds. A [`LocalObjective`] adds the
//! strategy's local terms: FedProx's proximal term to the loss, SCAFFOLD's control-variate
//! correction to every step's gradient.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use cohort_core::spec::{AggregationSpec, Arch, ModelSpec, OptimizerSpec, TrainingSpec};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::scaffold::ControlVariates;
use crate::{Dataset, NamedTensor, TrainError};

/// Output channels of the two cnn convolutions (one definition, in core, which also
/// counts parameters for the server's size limit).
const CONV_CHANNELS: [usize; 2] = [
    cohort_core::spec::CNN_CHANNELS[0] as usize,
    cohort_core::spec::CNN_CHANNELS[1] as usize,
];
/// Rows per forward pass in [`evaluate`]; bounds memory on large test sets.
const EVAL_BATCH: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// Same names, shapes and order as the weights passed in.
    pub weights: Vec<NamedTensor>,
    /// Mean cross-entropy over the last epoch (measured before each step).
    pub loss: f64,
    /// Training accuracy over the last epoch (measured before each step).
    pub accuracy: f64,
    pub samples: usize,
    /// Optimiser steps taken (batches over every epoch): SCAFFOLD's K.
    pub steps: usize,
}

/// What a party's local training minimises besides the data's cross-entropy, as the job's
/// aggregation strategy asks. The default is plain training (fedavg and the server
/// optimisers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalObjective {
    /// FedProx (Li et al., 2020): μ of the proximal term μ/2·‖w − w₀‖² added to every
    /// batch's loss, w₀ being the weights training starts from (the round's global model),
    /// so each step's gradient gains μ(w − w₀). None or 0: no term, plain training.
    pub proximal_mu: Option<f64>,
    /// SCAFFOLD (Karimireddy et al., 2020): the server's and the party's control variates;
    /// every step's gradient g becomes g + c − c_i (for sgd, w ← w − η·(g + c − c_i)).
    /// After training, [`ControlVariates::next`] gives the party's next c_i.
    pub control: Option<ControlVariates>,
}

impl LocalObjective {
    /// The local objective `aggregation`'s strategy implies, without control variates
    /// (those are the party's state: the caller sets `control` for scaffold).
    pub fn of(aggregation: &AggregationSpec) -> Self {
        LocalObjective {
            proximal_mu: aggregation.proximal_mu(),
            control: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: usize,
}

struct Param {
    name: String,
    shape: Vec<usize>,
    fan_in: usize,
    is_bias: bool,
    /// Followed by a ReLU (Kaiming gain √2) rather than being the output layer.
    relu: bool,
}

struct Cnn {
    side: usize,
    second_pool: bool,
}

/// The parameters a spec implies for given input and output widths, in layer order
/// (weight then bias per layer), and the cnn geometry.
struct Layout {
    params: Vec<Param>,
    cnn: Option<Cnn>,
}

fn layout(spec: &ModelSpec, features: usize, classes: usize) -> Result<Layout, TrainError> {
    if features == 0 {
        return Err(TrainError::invalid("features", "must be at least 1"));
    }
    if classes == 0 {
        return Err(TrainError::invalid("classes", "must be at least 1"));
    }
    if spec.arch != Arch::Mlp && !spec.hidden.is_empty() {
        return Err(TrainError::invalid(
            "model.hidden",
            format!("only mlp takes hidden layers, not {:?}", spec.arch),
        ));
    }
    let mut params = Vec::new();
    let linear = |params: &mut Vec<Param>, i: usize, fan_in: usize, out: usize, relu| {
        params.push(Param {
            name: format!("fc{i}.weight"),
            shape: vec![out, fan_in],
            fan_in,
            is_bias: false,
            relu,
        });
        params.push(Param {
            name: format!("fc{i}.bias"),
            shape: vec![out],
            fan_in,
            is_bias: true,
            relu,
        });
    };
    match spec.arch {
        Arch::Logreg => {
            linear(&mut params, 0, features, classes, false);
            Ok(Layout { params, cnn: None })
        }
        Arch::Mlp => {
            if spec.hidden.is_empty() {
                return Err(TrainError::invalid(
                    "model.hidden",
                    "mlp needs at least one hidden layer, e.g. [64]",
                ));
            }
            let mut width = features;
            for (i, &h) in spec.hidden.iter().enumerate() {
                if h == 0 {
                    return Err(TrainError::invalid(
                        format!("model.hidden[{i}]"),
                        "must be at least 1",
                    ));
                }
                linear(&mut params, i, width, h as usize, true);
                width = h as usize;
            }
            linear(&mut params, spec.hidden.len(), width, classes, false);
            Ok(Layout { params, cnn: None })
        }
        Arch::Cnn => {
            let side = features.isqrt();
            if side * side != features || side < 2 {
                return Err(TrainError::invalid(
                    "model.arch",
                    format!(
                        "cnn needs square images of at least 2×2, but the data has {features} \
                         features (not a square side × side)"
                    ),
                ));
            }
            let mut in_ch = 1;
            for (i, &out) in CONV_CHANNELS.iter().enumerate() {
                let fan_in = in_ch * 9;
                params.push(Param {
                    name: format!("conv{i}.weight"),
                    shape: vec![out, in_ch, 3, 3],
                    fan_in,
                    is_bias: false,
                    relu: true,
                });
                params.push(Param {
                    name: format!("conv{i}.bias"),
                    shape: vec![out],
                    fan_in,
                    is_bias: true,
                    relu: true,
                });
                in_ch = out;
            }
            let after_first = side / 2;
            let second_pool = after_first / 2 >= 2;
            let last = if second_pool {
                after_first / 2
            } else {
                after_first
            };
            linear(&mut params, 0, in_ch * last * last, classes, false);
            Ok(Layout {
                params,
                cnn: Some(Cnn { side, second_pool }),
            })
        }
        Arch::Synthetic => Err(TrainError::invalid(
            "model.arch",
            "a synthetic model is not built or trained with candle (see cohort_fl::synthetic)",
        )),
    }
}

/// Name and shape of every parameter of the model, in layer order (weight, then bias).
pub fn param_shapes(
    spec: &ModelSpec,
    features: usize,
    classes: usize,
) -> Result<Vec<(String, Vec<usize>)>, TrainError> {
    Ok(layout(spec, features, classes)?
        .params
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect())
}

/// The number of output classes of `weights` (rows of the output layer's weight).
pub fn model_classes(spec: &ModelSpec, weights: &[NamedTensor]) -> Result<usize, TrainError> {
    let name = match spec.arch {
        Arch::Mlp => format!("fc{}.weight", spec.hidden.len()),
        Arch::Logreg | Arch::Cnn | Arch::Synthetic => "fc0.weight".to_string(),
    };
    let t = weights
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| TrainError::weights(&name, "missing (the output layer of this model)"))?;
    match t.shape.as_slice() {
        [classes, _] if *classes > 0 => Ok(*classes),
        other => Err(TrainError::weights(
            &name,
            format!("output layer must be 2-D [classes, inputs], found shape {other:?}"),
        )),
    }
}

/// Builds the model with fresh weights: Kaiming-uniform for layers followed by ReLU,
/// uniform ±1/√fan_in for the output layer, zero biases. Deterministic for a seed (candle's
/// own initialisers draw from a global RNG). Sorted by name.
pub fn init_model(
    spec: &ModelSpec,
    features: usize,
    classes: usize,
    seed: u64,
) -> Result<Vec<NamedTensor>, TrainError> {
    let layout = layout(spec, features, classes)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out: Vec<NamedTensor> = layout
        .params
        .into_iter()
        .map(|p| {
            let len = p.shape.iter().product();
            let data = if p.is_bias {
                vec![0.0; len]
            } else {
                let fan_in = p.fan_in as f32;
                let bound = if p.relu {
                    (6.0 / fan_in).sqrt()
                } else {
                    1.0 / fan_in.sqrt()
                };
                (0..len).map(|_| rng.random_range(-bound..=bound)).collect()
            };
            NamedTensor {
                name: p.name,
                shape: p.shape,
                data,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Checks that `weights` are a `spec` model for data of `features` inputs and `classes`
/// outputs: every tensor there, of the right shape, finite. The error names the tensor.
pub fn check_weights(
    spec: &ModelSpec,
    weights: &[NamedTensor],
    features: usize,
    classes: usize,
) -> Result<(), TrainError> {
    let expected = layout(spec, features, classes)?;
    let output = &expected.params[expected.params.len() - 2];
    if let Some(t) = weights.iter().find(|t| t.name == output.name)
        && t.shape != output.shape
    {
        return Err(TrainError::weights(
            &output.name,
            format!(
                "has shape {:?} but a {:?} model for {features} features and {classes} \
                 classes needs {:?}",
                t.shape, spec.arch, output.shape
            ),
        ));
    }
    match_weights(spec, weights, features).map(|_| ())
}

/// Checks `weights` against the model `spec` describes for `features` inputs; returns the
/// layout, the weights in layout order and the number of classes.
fn match_weights<'a>(
    spec: &ModelSpec,
    weights: &'a [NamedTensor],
    features: usize,
) -> Result<(Layout, Vec<&'a NamedTensor>, usize), TrainError> {
    let classes = model_classes(spec, weights)?;
    let layout = layout(spec, features, classes)?;
    let mut ordered = Vec::with_capacity(layout.params.len());
    for p in &layout.params {
        let mut found = weights.iter().filter(|t| t.name == p.name);
        let t = found.next().ok_or_else(|| {
            TrainError::weights(
                &p.name,
                format!(
                    "missing: a {:?} model for {features} features and {classes} classes \
                     needs shape {:?}",
                    spec.arch, p.shape
                ),
            )
        })?;
        if found.next().is_some() {
            return Err(TrainError::weights(&p.name, "appears more than once"));
        }
        if t.shape != p.shape {
            return Err(TrainError::weights(
                &p.name,
                format!(
                    "has shape {:?} but a {:?} model for {features} features and {classes} \
                     classes needs {:?}",
                    t.shape, spec.arch, p.shape
                ),
            ));
        }
        let len: usize = p.shape.iter().product();
        if t.data.len() != len {
            return Err(TrainError::weights(
                &p.name,
                format!(
                    "shape {:?} needs {len} values, found {}",
                    t.shape,
                    t.data.len()
                ),
            ));
        }
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(TrainError::weights(
                &p.name,
                format!("value {i} is {} (not finite)", t.data[i]),
            ));
        }
        ordered.push(t);
    }
    if let Some(extra) = weights
        .iter()
        .find(|t| !layout.params.iter().any(|p| p.name == t.name))
    {
        let expected: Vec<&str> = layout.params.iter().map(|p| p.name.as_str()).collect();
        return Err(TrainError::weights(
            &extra.name,
            format!(
                "not part of a {:?} model (expected {})",
                spec.arch,
                expected.join(", ")
            ),
        ));
    }
    Ok((layout, ordered, classes))
}

fn check_data(data: &Dataset, classes: usize) -> Result<(), TrainError> {
    if data.n == 0 {
        return Err(TrainError::invalid("data", "the dataset has no samples"));
    }
    if data.features.len() != data.n * data.d || data.labels.len() != data.n {
        return Err(TrainError::invalid(
            "data",
            format!(
                "inconsistent dataset: n={} d={} but {} feature values and {} labels",
                data.n,
                data.d,
                data.features.len(),
                data.labels.len()
            ),
        ));
    }
    if let Some(index) = data.labels.iter().position(|&l| l as usize >= classes) {
        return Err(TrainError::Label {
            index,
            label: data.labels[index],
            classes,
        });
    }
    Ok(())
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

fn conv(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let channels = b.dim(0)?;
    x.conv2d(w, 1, 1, 1, 1)?
        .broadcast_add(&b.reshape((1, channels, 1, 1))?)
}

/// 2×2 max-pool. candle's backward pass assumes the input tiles exactly, so an odd last
/// row/column is cropped first (the forward result is the same).
fn pool2(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = x.narrow(2, 0, h - h % 2)?.narrow(3, 0, w - w % 2)?;
    x.max_pool2d(2)
}

/// Logits for a batch `x` of shape [b, features]; `p` in layout order.
fn forward(layout: &Layout, p: &[Tensor], x: &Tensor) -> candle_core::Result<Tensor> {
    match &layout.cnn {
        Some(cnn) => {
            let b = x.dim(0)?;
            let h = x.reshape((b, 1, cnn.side, cnn.side))?;
            let h = pool2(&conv(&h, &p[0], &p[1])?.relu()?)?;
            let mut h = conv(&h, &p[2], &p[3])?.relu()?;
            if cnn.second_pool {
                h = pool2(&h)?;
            }
            linear(&h.flatten_from(1)?, &p[4], &p[5])
        }
        None => {
            let layers = p.len() / 2;
            let mut h = x.clone();
            for i in 0..layers {
                h = linear(&h, &p[2 * i], &p[2 * i + 1])?;
                if i + 1 < layers {
                    h = h.relu()?;
                }
            }
            Ok(h)
        }
    }
}

fn count_correct(logits: &Tensor, labels: &[u32]) -> candle_core::Result<usize> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count())
}

/// Trains `training.epochs` epochs of minibatches of `training.batch_size` (shuffled with
/// `seed`) with cross-entropy loss, starting from `weights`.
pub fn train(
    spec: &ModelSpec,
    training: &TrainingSpec,
    weights: &[NamedTensor],
    data: &Dataset,
    seed: u64,
) -> Result<TrainOutcome, TrainError> {
    train_with(
        spec,
        training,
        weights,
        data,
        seed,
        &LocalObjective::default(),
    )
}

/// [`train`] minimising `objective`: cross-entropy plus the strategy's local terms (the
/// reported loss stays the cross-entropy alone, comparable across strategies).
pub fn train_with(
    spec: &ModelSpec,
    training: &TrainingSpec,
    weights: &[NamedTensor],
    data: &Dataset,
    seed: u64,
    objective: &LocalObjective,
) -> Result<TrainOutcome, TrainError> {
    if training.epochs == 0 {
        return Err(TrainError::invalid("training.epochs", "must be at least 1"));
    }
    if training.batch_size == 0 {
        return Err(TrainError::invalid(
            "training.batch_size",
            "must be at least 1",
        ));
    }
    let lr = training.optimizer.lr();
    if !(lr.is_finite() && lr > 0.0) {
        return Err(TrainError::invalid(
            "training.optimizer.lr",
            format!("must be a positive number, got {lr}"),
        ));
    }
    let mu = match objective.proximal_mu {
        Some(mu) if !(mu.is_finite() && mu >= 0.0) => {
            return Err(TrainError::invalid(
                "aggregation.mu",
                format!("must be a finite number ≥ 0, got {mu}"),
            ));
        }
        Some(mu) if mu > 0.0 => Some(mu),
        _ => None,
    };
    let (layout, ordered, classes) = match_weights(spec, weights, data.d)?;
    check_data(data, classes)?;

    let dev = crate::select_device(training.device)?;
    let vars = ordered
        .iter()
        .map(|t| Var::from_slice(&t.data, t.shape.as_slice(), &dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // The starting weights as constants (not Vars: no gradient flows into them).
    let proximal = match mu {
        Some(mu) => Some(Proximal {
            half_mu: mu / 2.0,
            anchors: ordered
                .iter()
                .map(|t| Tensor::from_slice(&t.data, t.shape.as_slice(), &dev))
                .collect::<candle_core::Result<Vec<_>>>()?,
        }),
        None => None,
    };
    // c − c_i per parameter, in layout order, as constants.
    let correction = match &objective.control {
        Some(control) => Some(
            layout
                .params
                .iter()
                .map(|p| {
                    let values = control.correction(&p.name, &p.shape)?;
                    Ok(Tensor::from_vec(values, p.shape.as_slice(), &dev)?)
                })
                .collect::<Result<Vec<_>, TrainError>>()?,
        ),
        None => None,
    };
    let run = Run {
        layout: &layout,
        vars: &vars,
        proximal: proximal.as_ref(),
        correction: correction.as_deref(),
        data,
        epochs: training.epochs,
        batch_size: training.batch_size as usize,
        seed,
        dev: &dev,
    };
    let (loss, accuracy, steps) = match &training.optimizer {
        OptimizerSpec::Sgd { lr } => run.epochs(SGD::new(vars.clone(), *lr)?)?,
        OptimizerSpec::Adam {
            lr,
            beta1,
            beta2,
            weight_decay,
        } => run.epochs(AdamW::new(
            vars.clone(),
            ParamsAdamW {
                lr: *lr,
                beta1: *beta1,
                beta2: *beta2,
                eps: 1e-8,
                weight_decay: *weight_decay,
            },
        )?)?,
    };

    // Trained values by layout position, handed back in the caller's order.
    let trained = vars
        .iter()
        .map(|v| v.as_tensor().flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut out: Vec<NamedTensor> = weights.to_vec();
    for (p, data) in layout.params.iter().zip(trained) {
        if let Some(t) = out.iter_mut().find(|t| t.name == p.name) {
            t.data = data;
        }
    }
    Ok(TrainOutcome {
        weights: out,
        loss,
        accuracy,
        samples: data.n,
        steps,
    })
}

/// FedProx's term μ/2·‖w − w₀‖², w₀ in layout order.
struct Proximal {
    half_mu: f64,
    anchors: Vec<Tensor>,
}

impl Proximal {
    /// `loss` + μ/2·Σ (w − w₀)² over every parameter.
    fn add_to(&self, loss: &Tensor, params: &[Tensor]) -> candle_core::Result<Tensor> {
        let mut squares = Tensor::zeros((), DType::F32, loss.device())?;
        for (w, w0) in params.iter().zip(&self.anchors) {
            squares = (squares + (w - w0)?.sqr()?.sum_all()?)?;
        }
        loss + squares.affine(self.half_mu, 0.0)?
    }
}

struct Run<'a> {
    layout: &'a Layout,
    vars: &'a [Var],
    proximal: Option<&'a Proximal>,
    /// SCAFFOLD's c − c_i, in layout order.
    correction: Option<&'a [Tensor]>,
    data: &'a Dataset,
    epochs: u32,
    batch_size: usize,
    seed: u64,
    dev: &'a Device,
}

impl Run<'_> {
    /// Runs every epoch; returns mean loss and accuracy of the last one and the steps taken.
    fn epochs<O: Optimizer>(&self, mut opt: O) -> Result<(f64, f64, usize), TrainError> {
        let dev = self.dev;
        let data = self.data;
        let x = Tensor::from_slice(&data.features, (data.n, data.d), dev)?;
        let y = Tensor::from_slice(&data.labels, data.n, dev)?;
        // Var::set updates storage in place, so these handles see every step.
        let params: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut order: Vec<u32> = (0..data.n as u32).collect();
        let (mut loss_sum, mut correct, mut steps) = (0.0f64, 0usize, 0usize);
        for epoch in 1..=self.epochs {
            order.shuffle(&mut rng);
            (loss_sum, correct) = (0.0, 0);
            for batch in order.chunks(self.batch_size) {
                let idx = Tensor::from_slice(batch, batch.len(), dev)?;
                let xb = x.index_select(&idx, 0)?;
                let yb = y.index_select(&idx, 0)?;
                let logits = forward(self.layout, &params, &xb)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &yb)?;
                let value = f64::from(loss.to_scalar::<f32>()?);
                if !value.is_finite() {
                    return Err(TrainError::Diverged { epoch, loss: value });
                }
                if epoch == self.epochs {
                    loss_sum += value * batch.len() as f64;
                    let labels: Vec<u32> = batch.iter().map(|&i| data.labels[i as usize]).collect();
                    correct += count_correct(&logits, &labels)?;
                }
                let objective = match self.proximal {
                    Some(prox) => prox.add_to(&loss, &params)?,
                    None => loss,
                };
                let mut grads = objective.backward()?;
                if let Some(correction) = self.correction {
                    for (var, c) in self.vars.iter().zip(correction) {
                        let g = match grads.remove(var.as_tensor()) {
                            Some(g) => (g + c)?,
                            None => c.clone(),
                        };
                        grads.insert(var.as_tensor(), g);
                    }
                }
                opt.step(&grads)?;
                steps += 1;
            }
        }
        let n = data.n as f64;
        Ok((loss_sum / n, correct as f64 / n, steps))
    }
}

/// Cross-entropy loss and accuracy of `weights` on `data` (batched, no gradient).
pub fn evaluate(
    spec: &ModelSpec,
    weights: &[NamedTensor],
    data: &Dataset,
) -> Result<Evaluation, TrainError> {
    let (layout, ordered, classes) = match_weights(spec, weights, data.d)?;
    check_data(data, classes)?;
    let dev = Device::Cpu;
    let params = ordered
        .iter()
        .map(|t| Tensor::from_slice(&t.data, t.shape.as_slice(), &dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    for start in (0..data.n).step_by(EVAL_BATCH) {
        let end = (start + EVAL_BATCH).min(data.n);
        let xb = Tensor::from_slice(
            &data.features[start * data.d..end * data.d],
            (end - start, data.d),
            &dev,
        )?;
        let labels = &data.labels[start..end];
        let yb = Tensor::from_slice(labels, end - start, &dev)?;
        let logits = forward(&layout, &params, &xb)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &yb)?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?) * (end - start) as f64;
        correct += count_correct(&logits, labels)?;
    }
    let n = data.n as f64;
    Ok(Evaluation {
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
        samples: data.n,
    })
}
