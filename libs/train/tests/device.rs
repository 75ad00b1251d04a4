//! `training.device`: the same seed gives the same model, whichever of the CPU paths trains
//! it; `cuda` without CUDA is refused by name; with the `cuda` feature and a GPU, the GPU's
//! model matches the CPU's within float tolerance.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use cohort_core::spec::{Arch, ModelSpec, OptimizerSpec, TrainingDevice, TrainingSpec};
use cohort_train::{
    CUDA_BUILT, DataFormat, Dataset, TrainError, TrainOutcome, device_name, init_model,
    load_dataset, select_device, train,
};

fn digits() -> Dataset {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/digits.csv");
    let all = load_dataset(&path, DataFormat::Csv, None, Some(1.0 / 16.0)).unwrap();
    let first: Vec<usize> = (0..600).collect();
    all.subset(&first)
}

fn mlp() -> ModelSpec {
    ModelSpec {
        arch: Arch::Mlp,
        hidden: vec![32],
        init: None,
        name: None,
        params: None,
        layers: None,
    }
}

fn train_on(device: TrainingDevice, data: &Dataset) -> Result<TrainOutcome, TrainError> {
    let training = TrainingSpec {
        epochs: 2,
        batch_size: 32,
        optimizer: OptimizerSpec::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
        },
        device,
        ..TrainingSpec::default()
    };
    let w0 = init_model(&mlp(), data.d, 10, 3).unwrap();
    train(&mlp(), &training, &w0, data, 11)
}

/// Largest |a − b| over every value of every tensor.
#[cfg(feature = "cuda")]
fn max_difference(a: &[cohort_train::NamedTensor], b: &[cohort_train::NamedTensor]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
            x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn the_same_seed_gives_the_same_model_on_the_cpu() {
    let data = digits();
    let first = train_on(TrainingDevice::Cpu, &data).unwrap();
    let second = train_on(TrainingDevice::Cpu, &data).unwrap();
    assert_eq!(first, second, "two CPU runs with one seed differ");
    assert!(first.accuracy > 0.5, "it learned: {}", first.accuracy);
}

#[test]
fn auto_without_a_gpu_trains_on_the_cpu_with_the_same_result() {
    let auto = select_device(TrainingDevice::Auto).unwrap();
    if device_name(&auto) != "cpu" {
        eprintln!(
            "skipped: a GPU opened here ({}), auto picks it",
            device_name(&auto)
        );
        return;
    }
    let data = digits();
    let cpu = train_on(TrainingDevice::Cpu, &data).unwrap();
    let auto = train_on(TrainingDevice::Auto, &data).unwrap();
    assert_eq!(cpu, auto);
}

#[test]
fn cuda_is_refused_by_name_where_it_cannot_run() {
    let gpu_opens = CUDA_BUILT && select_device(TrainingDevice::Cuda).is_ok();
    if gpu_opens {
        eprintln!("skipped: a GPU opened here");
        return;
    }
    let err = train_on(TrainingDevice::Cuda, &digits()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("training.device: \"cuda\" asked for"),
        "{text}"
    );
    if !CUDA_BUILT {
        assert!(text.contains("built without CUDA"), "{text}");
        assert!(text.contains("will not train on the CPU"), "{text}");
    }
}

/// With a GPU: CPU and CUDA train the same model within float tolerance (the kernels
/// differ in summation order, so bit equality is not expected).
#[cfg(feature = "cuda")]
#[test]
fn cpu_and_cuda_give_the_same_model_within_tolerance() {
    if select_device(TrainingDevice::Cuda).is_err() {
        eprintln!("skipped: built with cuda but no GPU opens here");
        return;
    }
    let data = digits();
    let cpu = train_on(TrainingDevice::Cpu, &data).unwrap();
    let gpu = train_on(TrainingDevice::Cuda, &data).unwrap();
    let diff = max_difference(&cpu.weights, &gpu.weights);
    assert!(diff < 1e-3, "largest weight difference {diff}");
    assert!(
        (cpu.loss - gpu.loss).abs() < 1e-3,
        "{} vs {}",
        cpu.loss,
        gpu.loss
    );
    assert_eq!(cpu.samples, gpu.samples);
}
