//! Real training on the bundled digits dataset: the accuracy the demo relies on.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use cohort_core::spec::{Arch, ModelSpec, OptimizerSpec, TrainingSpec};
use cohort_train::{
    DataFormat, Dataset, LocalObjective, NamedTensor, TrainError, evaluate, init_model,
    load_dataset, partition_dirichlet, split_train_test, train, train_with,
};

fn digits() -> Dataset {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/digits.csv");
    load_dataset(&path, DataFormat::Csv, None, Some(1.0 / 16.0)).unwrap()
}

/// Stratified 80/20 split of digits.
fn split() -> (Dataset, Dataset) {
    let ds = digits();
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

fn training(epochs: u32, batch_size: u32, optimizer: OptimizerSpec) -> TrainingSpec {
    TrainingSpec {
        epochs,
        batch_size,
        optimizer,
        ..TrainingSpec::default()
    }
}

fn train_and_test(spec: &ModelSpec, t: &TrainingSpec) -> f64 {
    let start = Instant::now();
    let (tr, te) = split();
    let w0 = init_model(spec, tr.d, 10, 1).unwrap();
    let out = train(spec, t, &w0, &tr, 7).unwrap();
    assert_eq!(out.samples, tr.n);
    let names = |w: &[NamedTensor]| {
        w.iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&out.weights), names(&w0));
    let eval = evaluate(spec, &out.weights, &te).unwrap();
    eprintln!(
        "{:?} {:?}: train loss {:.3} acc {:.3}, test loss {:.3} acc {:.3} ({:?})",
        spec.arch,
        t.optimizer,
        out.loss,
        out.accuracy,
        eval.loss,
        eval.accuracy,
        start.elapsed()
    );
    eval.accuracy
}

#[test]
fn mlp_sgd_learns_digits() {
    let acc = train_and_test(
        &model(Arch::Mlp, &[64]),
        &training(20, 32, OptimizerSpec::Sgd { lr: 0.1 }),
    );
    assert!(acc >= 0.93, "held-out accuracy {acc}");
}

#[test]
fn logreg_sgd_learns_digits() {
    let acc = train_and_test(
        &model(Arch::Logreg, &[]),
        &training(20, 32, OptimizerSpec::Sgd { lr: 0.1 }),
    );
    assert!(acc >= 0.90, "held-out accuracy {acc}");
}

#[test]
fn mlp_adam_learns_digits() {
    let acc = train_and_test(
        &model(Arch::Mlp, &[64]),
        &training(
            10,
            32,
            OptimizerSpec::Adam {
                lr: 0.003,
                beta1: 0.9,
                beta2: 0.999,
                weight_decay: 0.0,
            },
        ),
    );
    assert!(acc >= 0.90, "held-out accuracy {acc}");
}

#[test]
fn cnn_loss_decreases() {
    let (tr, _) = split();
    let small = tr.subset(&(0..256).collect::<Vec<_>>());
    let spec = model(Arch::Cnn, &[]);
    let w0 = init_model(&spec, 64, 10, 3).unwrap();
    let names: Vec<&str> = w0.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "conv0.bias",
            "conv0.weight",
            "conv1.bias",
            "conv1.weight",
            "fc0.bias",
            "fc0.weight"
        ]
    );
    let before = evaluate(&spec, &w0, &small).unwrap();
    let out = train(
        &spec,
        &training(3, 32, OptimizerSpec::Sgd { lr: 0.1 }),
        &w0,
        &small,
        1,
    )
    .unwrap();
    let after = evaluate(&spec, &out.weights, &small).unwrap();
    assert!(
        after.loss < before.loss * 0.8,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
}

#[test]
fn error_can_cross_threads() {
    fn check<T: Send + Sync + std::error::Error + 'static>() {}
    check::<TrainError>();
}

#[test]
fn init_is_deterministic() {
    let spec = model(Arch::Mlp, &[32, 16]);
    let a = init_model(&spec, 64, 10, 5).unwrap();
    assert_eq!(a, init_model(&spec, 64, 10, 5).unwrap());
    assert_ne!(a, init_model(&spec, 64, 10, 6).unwrap());
    let shapes: Vec<(&str, &[usize])> = a
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("fc0.bias", &[32][..]),
            ("fc0.weight", &[32, 64][..]),
            ("fc1.bias", &[16][..]),
            ("fc1.weight", &[16, 32][..]),
            ("fc2.bias", &[10][..]),
            ("fc2.weight", &[10, 16][..]),
        ]
    );
    // MNIST geometry: 28 → 14 → 7 after two pools.
    let cnn = init_model(&model(Arch::Cnn, &[]), 784, 10, 0).unwrap();
    let fc = cnn.iter().find(|t| t.name == "fc0.weight").unwrap();
    assert_eq!(fc.shape, vec![10, 32 * 7 * 7]);
    let e = init_model(&model(Arch::Cnn, &[]), 63, 10, 0).unwrap_err();
    assert!(e.to_string().contains("63 features"), "{e}");
}

#[test]
fn training_is_deterministic_and_validates_inputs() {
    let (tr, _) = split();
    let small = tr.subset(&(0..200).collect::<Vec<_>>());
    let spec = model(Arch::Logreg, &[]);
    let t = training(1, 16, OptimizerSpec::Sgd { lr: 0.1 });
    let w0 = init_model(&spec, 64, 10, 0).unwrap();
    let a = train(&spec, &t, &w0, &small, 3).unwrap();
    assert_eq!(a, train(&spec, &t, &w0, &small, 3).unwrap());

    // Caller's order is kept.
    let reversed: Vec<NamedTensor> = w0.iter().rev().cloned().collect();
    let r = train(&spec, &t, &reversed, &small, 3).unwrap();
    assert_eq!(r.weights[0].name, "fc0.weight");
    assert_eq!(r.weights[0], a.weights[1]);

    // Wrong shape names the tensor.
    let mut bad = w0.clone();
    bad[1].shape = vec![10, 63];
    bad[1].data.truncate(630);
    let e = train(&spec, &t, &bad, &small, 3).unwrap_err().to_string();
    assert!(
        e.contains("\"fc0.weight\"") && e.contains("[10, 64]"),
        "{e}"
    );

    // Weights of another model.
    let mlp = init_model(&model(Arch::Mlp, &[8]), 64, 10, 0).unwrap();
    let e = train(&spec, &t, &mlp, &small, 3).unwrap_err().to_string();
    assert!(e.contains("not part of a Logreg model"), "{e}");

    // A label the model cannot output.
    let five = init_model(&spec, 64, 5, 0).unwrap();
    let e = train(&spec, &t, &five, &small, 3).unwrap_err();
    assert!(matches!(e, TrainError::Label { classes: 5, .. }), "{e}");
    assert!(e.to_string().contains("5 output classes"), "{e}");
}

/// Weighted FedAvg over Dirichlet(0.5) shards, in the test: the demo's target is reachable.
/// Demo defaults: mlp [64], sgd lr 0.1, batch 16, 2 local epochs, 10 rounds.
#[test]
fn fedavg_over_dirichlet_shards_reaches_target() {
    let start = Instant::now();
    let (tr, te) = split();
    let spec = model(Arch::Mlp, &[64]);
    let t = training(2, 16, OptimizerSpec::Sgd { lr: 0.1 });
    let seed = 3;
    let shards: Vec<Dataset> = partition_dirichlet(&tr.labels, 3, 0.5, 10, seed)
        .iter()
        .map(|idx| tr.subset(idx))
        .collect();
    let mut global = init_model(&spec, tr.d, 10, seed).unwrap();
    let mut accs = Vec::new();
    for round in 0..10u64 {
        let updates: Vec<_> = shards
            .iter()
            .enumerate()
            .map(|(p, shard)| {
                train(
                    &spec,
                    &t,
                    &global,
                    shard,
                    seed * 1000 + round * 10 + p as u64,
                )
                .unwrap()
            })
            .collect();
        let total: f64 = updates.iter().map(|u| u.samples as f64).sum();
        for (i, g) in global.iter_mut().enumerate() {
            for (j, v) in g.data.iter_mut().enumerate() {
                *v = updates
                    .iter()
                    .map(|u| u.weights[i].data[j] as f64 * u.samples as f64 / total)
                    .sum::<f64>() as f32;
            }
        }
        accs.push(evaluate(&spec, &global, &te).unwrap().accuracy);
    }
    eprintln!(
        "FedAvg shards {:?}: held-out accuracy per round {:.3?} ({:?})",
        shards.iter().map(|s| s.n).collect::<Vec<_>>(),
        accs,
        start.elapsed()
    );
    let last = accs[accs.len() - 1];
    assert!(
        last >= 0.90,
        "FedAvg held-out accuracy {last} after 10 rounds"
    );
}

#[test]
fn parameter_count_matches_the_built_layout() {
    // The server limits model size with core's count before any model is built: it must
    // be exactly what training builds.
    for (spec, features, classes) in [
        (model(Arch::Logreg, &[]), 64, 10),
        (model(Arch::Mlp, &[32]), 64, 10),
        (model(Arch::Mlp, &[128, 7, 3]), 784, 10),
        (model(Arch::Cnn, &[]), 64, 10),
        (model(Arch::Cnn, &[]), 784, 10),
        (model(Arch::Cnn, &[]), 9, 3),
    ] {
        let built: usize = cohort_train::param_shapes(&spec, features, classes)
            .expect("layout")
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        assert_eq!(
            spec.parameter_count(features as u64, classes as u64),
            built as u64,
            "{spec:?} {features}x{classes}"
        );
    }
}

#[test]
fn weights_are_checked_against_the_data_shape() {
    let spec = model(Arch::Mlp, &[32]);
    let weights = cohort_train::init_model(&spec, 64, 10, 1).expect("init");
    cohort_train::check_weights(&spec, &weights, 64, 10).expect("fits its own shape");
    let err = cohort_train::check_weights(&spec, &weights, 32, 10)
        .expect_err("fewer features")
        .to_string();
    assert!(
        err.contains("fc0.weight") && err.contains("[32, 64]"),
        "{err}"
    );
    let err = cohort_train::check_weights(&spec, &weights, 64, 3)
        .expect_err("other classes")
        .to_string();
    assert!(
        err.contains("fc1.weight") && err.contains("[3, 32]"),
        "{err}"
    );
}

/// Euclidean distance between two models of the same layout.
fn distance(a: &[NamedTensor], b: &[NamedTensor]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.name, y.name);
            x.data.iter().zip(&y.data)
        })
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn prox(mu: f64) -> LocalObjective {
    LocalObjective {
        proximal_mu: Some(mu),
        control: None,
    }
}

#[test]
fn the_proximal_term_keeps_local_training_near_the_global_model() {
    let (tr, _) = split();
    let small = tr.subset(&(0..300).collect::<Vec<_>>());
    let adam = OptimizerSpec::Adam {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        weight_decay: 0.0,
    };
    for (spec, optimizer) in [
        (model(Arch::Logreg, &[]), OptimizerSpec::Sgd { lr: 0.1 }),
        (model(Arch::Logreg, &[]), adam.clone()),
        (model(Arch::Mlp, &[32]), OptimizerSpec::Sgd { lr: 0.1 }),
        (model(Arch::Mlp, &[32]), adam.clone()),
        (model(Arch::Cnn, &[]), OptimizerSpec::Sgd { lr: 0.05 }),
        (model(Arch::Cnn, &[]), adam.clone()),
    ] {
        let t = training(3, 16, optimizer);
        let w0 = init_model(&spec, 64, 10, 0).unwrap();
        let plain = train(&spec, &t, &w0, &small, 3).unwrap();
        // μ = 0 (and no term at all) is plain training, bit for bit.
        assert_eq!(
            train_with(&spec, &t, &w0, &small, 3, &prox(0.0)).unwrap(),
            plain
        );
        assert_eq!(
            train_with(&spec, &t, &w0, &small, 3, &LocalObjective::default()).unwrap(),
            plain
        );
        let pulled = train_with(&spec, &t, &w0, &small, 3, &prox(5.0)).unwrap();
        let (free, near) = (
            distance(&plain.weights, &w0),
            distance(&pulled.weights, &w0),
        );
        eprintln!(
            "{:?} {:?}: ‖w − w0‖ {free:.4} with μ = 0, {near:.4} with μ = 5",
            spec.arch, t.optimizer
        );
        assert!(
            near < 0.5 * free,
            "{:?} {:?}: μ = 5 moved {near} from the start, μ = 0 {free}",
            spec.arch,
            t.optimizer
        );
    }
}

/// The term's gradient is μ(w − w₀): with full batches and sgd the first step is plain
/// (w = w₀) and the second differs from plain training's by exactly −lr·μ·(w₁ − w₀).
#[test]
fn the_proximal_gradient_is_mu_times_the_distance() {
    let (tr, _) = split();
    let small = tr.subset(&(0..200).collect::<Vec<_>>());
    let spec = model(Arch::Logreg, &[]);
    let (lr, mu) = (0.1f32, 2.0f32);
    let w0 = init_model(&spec, 64, 10, 0).unwrap();
    let full = |epochs| training(epochs, 200, OptimizerSpec::Sgd { lr: f64::from(lr) });
    let w1 = train(&spec, &full(1), &w0, &small, 3).unwrap().weights;
    assert_eq!(
        train_with(&spec, &full(1), &w0, &small, 3, &prox(f64::from(mu)))
            .unwrap()
            .weights,
        w1,
        "no pull on the first step"
    );
    let plain = train(&spec, &full(2), &w0, &small, 3).unwrap().weights;
    let pulled = train_with(&spec, &full(2), &w0, &small, 3, &prox(f64::from(mu)))
        .unwrap()
        .weights;
    for (((p, q), a), b) in plain.iter().zip(&pulled).zip(&w1).zip(&w0) {
        for i in 0..p.data.len() {
            let expected = p.data[i] - lr * mu * (a.data[i] - b.data[i]);
            assert!(
                (q.data[i] - expected).abs() < 1e-5,
                "{}[{i}]: {} vs {expected}",
                p.name,
                q.data[i]
            );
        }
    }
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let e = train_with(&spec, &full(1), &w0, &small, 3, &prox(bad)).unwrap_err();
        assert!(e.to_string().contains("aggregation.mu"), "{e}");
    }
}
