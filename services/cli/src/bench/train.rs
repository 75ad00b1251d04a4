//! `cohort bench train`: local training throughput of a built-in model on one device
//! (`--device cpu|cuda|auto`, as `training.device` picks it), in samples per second, on
//! random data of the model's shape. One untimed warm-up step first (kernel loading,
//! allocation), then `--epochs` timed epochs over `--samples` samples.

use std::time::Instant;

use anyhow::Context;
use cohort_core::spec::{Arch, ModelSpec, OptimizerSpec, TrainingDevice, TrainingSpec};
use cohort_train::{Dataset, device_name, init_model, select_device, train};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The model: logreg, mlp or cnn.
    #[arg(long, default_value = "mlp", value_parser = parse_arch)]
    arch: Arch,
    /// Hidden layer widths of an mlp, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,128")]
    hidden: Vec<u32>,
    /// Samples per training step.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    batch_size: u32,
    /// Where to train, as `training.device`: auto (CUDA when built with it and a GPU
    /// opens), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: TrainingDevice,
    /// Samples per epoch (random, of `--features` values and `--classes` labels).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    samples: u32,
    /// Features per sample (784: a 28×28 image, which the cnn needs).
    #[arg(long, default_value_t = 784, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    features: u32,
    /// Label classes (the model's outputs).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    classes: u32,
    /// Timed epochs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1000))]
    epochs: u32,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    match s {
        "logreg" => Ok(Arch::Logreg),
        "mlp" => Ok(Arch::Mlp),
        "cnn" => Ok(Arch::Cnn),
        other => Err(format!("{other:?} is not one of logreg, mlp, cnn")),
    }
}

fn parse_device(s: &str) -> Result<TrainingDevice, String> {
    match s {
        "auto" => Ok(TrainingDevice::Auto),
        "cpu" => Ok(TrainingDevice::Cpu),
        "cuda" => Ok(TrainingDevice::Cuda),
        other => Err(format!("{other:?} is not one of auto, cpu, cuda")),
    }
}

/// Random features in [0, 1) and labels below `classes`, from a fixed seed (splitmix64:
/// the values only need to be spread, not good random numbers).
fn random_data(n: usize, d: usize, classes: u32) -> Dataset {
    let mut state = 17u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let features = (0..n * d)
        .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32)
        .collect();
    let labels = (0..n)
        .map(|_| (next() % u64::from(classes)) as u32)
        .collect();
    Dataset {
        features,
        labels,
        n,
        d,
    }
}

pub fn run(args: &TrainArgs, json: bool) -> anyhow::Result<i32> {
    let device = select_device(args.device).context("--device")?;
    let model = ModelSpec {
        arch: args.arch,
        hidden: if args.arch == Arch::Mlp {
            args.hidden.clone()
        } else {
            Vec::new()
        },
        init: None,
        name: None,
        params: None,
        layers: None,
    };
    let (n, d) = (args.samples as usize, args.features as usize);
    let data = random_data(n, d, args.classes);
    let weights = init_model(&model, d, args.classes as usize, 1).context("the model")?;
    let params: usize = weights.iter().map(|t| t.numel()).sum();
    let training = |epochs: u32| TrainingSpec {
        epochs,
        batch_size: args.batch_size,
        optimizer: OptimizerSpec::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
        },
        device: args.device,
        ..TrainingSpec::default()
    };
    let warm_up = data.subset(&(0..n.min(args.batch_size as usize)).collect::<Vec<_>>());
    train(&model, &training(1), &weights, &warm_up, 1).context("warm-up step")?;
    let started = Instant::now();
    let outcome = train(&model, &training(args.epochs), &weights, &data, 1).context("training")?;
    let seconds = started.elapsed().as_secs_f64();
    let trained = u64::from(args.epochs) * n as u64;
    let samples_per_s = trained as f64 / seconds.max(1e-9);
    let device = device_name(&device);
    if json {
        println!(
            "{}",
            json!({
                "arch": format!("{:?}", args.arch).to_lowercase(),
                "hidden": model.hidden,
                "params": params,
                "batch_size": args.batch_size,
                "device": device,
                "cuda_built": cohort_train::CUDA_BUILT,
                "samples": n,
                "features": d,
                "classes": args.classes,
                "epochs": args.epochs,
                "steps": outcome.steps,
                "seconds": seconds,
                "samples_per_s": samples_per_s,
                "final_loss": outcome.loss,
            })
        );
    } else {
        println!(
            "{:?} {:?} ({params} parameters), batch {}, on {device}: {trained} samples in {seconds:.2} s \
             = {samples_per_s:.0} samples/s ({} steps, last epoch's loss {:.3})",
            args.arch, model.hidden, args.batch_size, outcome.steps, outcome.loss
        );
    }
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_small_bench_trains_and_reports() {
        let args = TrainArgs {
            arch: Arch::Mlp,
            hidden: vec![8],
            batch_size: 16,
            device: TrainingDevice::Cpu,
            samples: 64,
            features: 12,
            classes: 3,
            epochs: 1,
        };
        assert_eq!(run(&args, true).unwrap(), 0);
        assert_eq!(parse_arch("cnn"), Ok(Arch::Cnn));
        assert!(parse_device("gpu").unwrap_err().contains("auto, cpu, cuda"));
    }

    #[test]
    fn cuda_without_cuda_is_refused_naming_the_flag() {
        if cohort_train::CUDA_BUILT {
            return;
        }
        let args = TrainArgs {
            arch: Arch::Logreg,
            hidden: vec![],
            batch_size: 4,
            device: TrainingDevice::Cuda,
            samples: 8,
            features: 4,
            classes: 2,
            epochs: 1,
        };
        let err = format!("{:#}", run(&args, true).unwrap_err());
        assert!(err.starts_with("--device: training.device"), "{err}");
    }
}
