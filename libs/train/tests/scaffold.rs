//! SCAFFOLD's party side with real candle training on digits: the corrected step
//! (g + c − c_i), the next control variate (option II) and whole rounds simulated in process.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use cohort_core::spec::{Arch, ModelSpec, OptimizerSpec, TrainingSpec};
use cohort_train::{
    ControlVariates, DataFormat, Dataset, LocalObjective, NamedTensor, evaluate, init_model,
    load_dataset, partition_dirichlet, split_train_test, train, train_with, zero_control,
};

fn digits() -> (Dataset, Dataset) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/digits.csv");
    let ds = load_dataset(&path, DataFormat::Csv, None, Some(1.0 / 16.0)).unwrap();
    let (train_idx, test_idx) = split_train_test(&ds.labels, 0.2, 42);
    (ds.subset(&train_idx), ds.subset(&test_idx))
}

fn model(arch: Arch, hidden: &[u32]) -> ModelSpec {
    ModelSpec {
        arch,
        hidden: hidden.to_vec(),
        init: None,
        name: None,
        params: None,
        layers: None,
    }
}

fn sgd(epochs: u32, batch_size: u32, lr: f64) -> TrainingSpec {
    TrainingSpec {
        epochs,
        batch_size,
        optimizer: OptimizerSpec::Sgd { lr },
        ..TrainingSpec::default()
    }
}

/// Deterministic values of `like`'s layout, different for each `salt`.
fn filled(like: &[NamedTensor], salt: f32) -> Vec<NamedTensor> {
    like.iter()
        .map(|t| NamedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: (0..t.data.len())
                .map(|i| 0.05 * ((i as f32) * 0.37 + salt).sin())
                .collect(),
        })
        .collect()
}

fn scaffold(server: Vec<NamedTensor>, client: Vec<NamedTensor>) -> LocalObjective {
    LocalObjective {
        proximal_mu: None,
        control: Some(ControlVariates { server, client }),
    }
}

fn assert_close(a: &[NamedTensor], b: &[NamedTensor], tolerance: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape), "{what}");
        for (i, (p, q)) in x.data.iter().zip(&y.data).enumerate() {
            assert!(
                (p - q).abs() <= tolerance,
                "{what}: {}[{i}]: {p} vs {q}",
                x.name
            );
        }
    }
}

/// (a − b)·k, tensor by tensor.
fn scaled_difference(a: &[NamedTensor], b: &[NamedTensor], k: f32) -> Vec<NamedTensor> {
    a.iter()
        .zip(b)
        .map(|(x, y)| NamedTensor {
            name: x.name.clone(),
            shape: x.shape.clone(),
            data: x
                .data
                .iter()
                .zip(&y.data)
                .map(|(p, q)| (p - q) * k)
                .collect(),
        })
        .collect()
}

/// Equal control variates (c = c_i: no correction) train bit for bit as plain training
/// does, and the steps taken are epochs × batches.
#[test]
fn equal_control_variates_train_exactly_as_plain_training() {
    let (tr, _) = digits();
    let small = tr.subset(&(0..200).collect::<Vec<_>>());
    for (spec, lr) in [
        (model(Arch::Logreg, &[]), 0.1),
        (model(Arch::Mlp, &[32]), 0.1),
        (model(Arch::Cnn, &[]), 0.05),
    ] {
        let t = sgd(2, 16, lr);
        let w0 = init_model(&spec, 64, 10, 0).unwrap();
        let plain = train(&spec, &t, &w0, &small, 3).unwrap();
        assert_eq!(plain.steps, 2 * 200usize.div_ceil(16), "{:?}", spec.arch);
        for c in [zero_control(&w0), filled(&w0, 1.0)] {
            let same = train_with(&spec, &t, &w0, &small, 3, &scaffold(c.clone(), c)).unwrap();
            assert_eq!(same, plain, "{:?}", spec.arch);
        }
    }
}

/// With full batches and sgd the first step is w₀ − η(g₀ + c − c_i): exactly plain
/// training's step moved by −η(c − c_i).
#[test]
fn the_corrected_step_is_the_gradient_plus_c_minus_ci() {
    let (tr, _) = digits();
    let small = tr.subset(&(0..200).collect::<Vec<_>>());
    let spec = model(Arch::Mlp, &[16]);
    let lr = 0.1f32;
    let t = sgd(1, 200, f64::from(lr));
    let w0 = init_model(&spec, 64, 10, 0).unwrap();
    let (c, ci) = (filled(&w0, 0.5), filled(&w0, 2.0));
    let plain = train(&spec, &t, &w0, &small, 3).unwrap().weights;
    let corrected = train_with(&spec, &t, &w0, &small, 3, &scaffold(c.clone(), ci.clone()))
        .unwrap()
        .weights;
    let expected: Vec<NamedTensor> = plain
        .iter()
        .zip(scaled_difference(&c, &ci, lr))
        .map(|(p, d)| NamedTensor {
            data: p.data.iter().zip(&d.data).map(|(p, d)| p - d).collect(),
            ..p.clone()
        })
        .collect();
    assert_close(&corrected, &expected, 1e-6, "w₁ = w₀ − η(g₀ + c − c_i)");
}

/// c_i⁺ = c_i − c + (x − y)/(Kη) is the mean of the K plain gradients along the corrected
/// path, whatever c and c_i were: after one full-batch step it is g₀, after two (g₀ + g₁)/2
/// with g₁ taken at the corrected w₁. Δc_i = c_i⁺ − c_i.
#[test]
fn the_next_client_control_is_the_mean_plain_gradient() {
    let (tr, _) = digits();
    let small = tr.subset(&(0..200).collect::<Vec<_>>());
    let spec = model(Arch::Mlp, &[16]);
    let lr = 0.1f32;
    let x = init_model(&spec, 64, 10, 0).unwrap();
    let control = ControlVariates {
        server: filled(&x, 0.5),
        client: filled(&x, 2.0),
    };
    let objective = LocalObjective {
        proximal_mu: None,
        control: Some(control.clone()),
    };
    // The full-batch gradient at w: (w − one plain sgd step from w)/η.
    let gradient = |w: &[NamedTensor]| {
        let stepped = train(&spec, &sgd(1, 200, f64::from(lr)), w, &small, 3).unwrap();
        scaled_difference(w, &stepped.weights, 1.0 / lr)
    };
    let g0 = gradient(&x);

    let one = sgd(1, 200, f64::from(lr));
    let y1 = train_with(&spec, &one, &x, &small, 3, &objective).unwrap();
    assert_eq!(y1.steps, 1);
    let next = control.next(&one, &x, &y1.weights, y1.steps).unwrap();
    assert_close(&next.client, &g0, 1e-4, "c_i⁺ after one step");
    assert_close(
        &next.delta,
        &scaled_difference(&next.client, &control.client, 1.0),
        1e-6,
        "Δc_i = c_i⁺ − c_i",
    );

    let two = sgd(2, 200, f64::from(lr));
    let y2 = train_with(&spec, &two, &x, &small, 3, &objective).unwrap();
    assert_eq!(y2.steps, 2);
    let g1 = gradient(&y1.weights);
    let mean: Vec<NamedTensor> = g0
        .iter()
        .zip(&g1)
        .map(|(a, b)| NamedTensor {
            data: a
                .data
                .iter()
                .zip(&b.data)
                .map(|(p, q)| (p + q) / 2.0)
                .collect(),
            ..a.clone()
        })
        .collect();
    let next = control.next(&two, &x, &y2.weights, y2.steps).unwrap();
    assert_close(&next.client, &mean, 1e-4, "c_i⁺ after two steps");
}

#[test]
fn control_variates_that_do_not_fit_the_model_are_refused_naming_the_tensor() {
    let (tr, _) = digits();
    let small = tr.subset(&(0..50).collect::<Vec<_>>());
    let spec = model(Arch::Mlp, &[16]);
    let t = sgd(1, 16, 0.1);
    let w0 = init_model(&spec, 64, 10, 0).unwrap();
    let zeros = zero_control(&w0);

    let mut missing = zeros.clone();
    missing.retain(|t| t.name != "fc1.bias");
    let e = train_with(&spec, &t, &w0, &small, 3, &scaffold(missing, zeros.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fc1.bias") && e.contains("server control variate"),
        "{e}"
    );

    // fc0.weight [16, 64] flattened.
    let mut reshaped = zeros.clone();
    for t in reshaped.iter_mut().filter(|t| t.name == "fc0.weight") {
        t.shape = vec![t.data.len()];
    }
    let e = train_with(
        &spec,
        &t,
        &w0,
        &small,
        3,
        &scaffold(zeros.clone(), reshaped),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("fc0.weight") && e.contains("client control variate") && e.contains("[1024]"),
        "{e}"
    );

    let control = ControlVariates {
        server: zeros.clone(),
        client: zeros.clone(),
    };
    let adam = TrainingSpec {
        optimizer: OptimizerSpec::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
        },
        ..t.clone()
    };
    let e = control.next(&adam, &w0, &w0, 4).unwrap_err().to_string();
    assert!(e.contains("training.optimizer") && e.contains("sgd"), "{e}");
    let e = control.next(&t, &w0, &w0, 0).unwrap_err().to_string();
    assert!(e.contains("no local step"), "{e}");
}

/// Whole SCAFFOLD rounds in process, every party in every round (|S| = N): the server
/// steps x ← x + mean(Δy), c ← c + mean(Δc_i). Then c stays the mean of the parties' c_i
/// (the algorithm's invariant), and on a label-skewed split (α = 0.1) the model learns.
#[test]
fn simulated_rounds_keep_c_the_mean_of_the_client_controls_and_learn() {
    let (tr, te) = digits();
    let parties: Vec<Dataset> = partition_dirichlet(&tr.labels, 3, 0.1, 10, 5)
        .iter()
        .map(|idx| tr.subset(idx))
        .collect();
    let spec = model(Arch::Mlp, &[32]);
    let t = sgd(1, 16, 0.1);
    let mut x = init_model(&spec, 64, 10, 1).unwrap();
    let mut c = zero_control(&x);
    let mut clients: Vec<Vec<NamedTensor>> = parties.iter().map(|_| zero_control(&x)).collect();
    let n = parties.len() as f32;
    for round in 0..10u64 {
        let mut delta_y = zero_control(&x);
        let mut delta_c = zero_control(&x);
        for (p, data) in parties.iter().enumerate() {
            let control = ControlVariates {
                server: c.clone(),
                client: clients[p].clone(),
            };
            let objective = LocalObjective {
                proximal_mu: None,
                control: Some(control.clone()),
            };
            let y = train_with(&spec, &t, &x, data, round * 10 + p as u64, &objective).unwrap();
            let next = control.next(&t, &x, &y.weights, y.steps).unwrap();
            for (sum, d) in delta_y
                .iter_mut()
                .zip(scaled_difference(&y.weights, &x, 1.0))
            {
                sum.data
                    .iter_mut()
                    .zip(&d.data)
                    .for_each(|(s, d)| *s += d / n);
            }
            for (sum, d) in delta_c.iter_mut().zip(&next.delta) {
                sum.data
                    .iter_mut()
                    .zip(&d.data)
                    .for_each(|(s, d)| *s += d / n);
            }
            clients[p] = next.client;
        }
        for (w, d) in x.iter_mut().zip(&delta_y) {
            w.data.iter_mut().zip(&d.data).for_each(|(w, d)| *w += d);
        }
        for (cv, d) in c.iter_mut().zip(&delta_c) {
            cv.data.iter_mut().zip(&d.data).for_each(|(cv, d)| *cv += d);
        }
    }
    let mut mean = zero_control(&x);
    for ci in &clients {
        for (m, t) in mean.iter_mut().zip(ci) {
            m.data
                .iter_mut()
                .zip(&t.data)
                .for_each(|(m, v)| *m += v / n);
        }
    }
    assert_close(&c, &mean, 1e-4, "c = mean(c_i)");
    let accuracy = evaluate(&spec, &x, &te).unwrap().accuracy;
    eprintln!("scaffold, 3 parties at α = 0.1, 10 rounds: held-out accuracy {accuracy:.3}");
    assert!(accuracy >= 0.8, "held-out accuracy {accuracy:.3}");
}
