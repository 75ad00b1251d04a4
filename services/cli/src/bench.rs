//! `cohort bench`: Cohort measuring its own machinery. `aggregate` times the FedAvg fold
//! alone on a synthetic workload (the same per-element pattern `bench round` is specified
//! with), and checks the aggregate against the exact average computed apart.

use std::time::{Duration, Instant};

use clap::Subcommand;
use cohort_core::NamedTensor;
use cohort_fl::{AggregationRules, FedAvg};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The FedAvg fold alone: N synthetic updates of P parameters folded into one aggregate,
    /// in GB/s of update bytes. Needs about 24 bytes of memory per parameter.
    Aggregate(AggregateArgs),
}

#[derive(Debug, clap::Args)]
pub struct AggregateArgs {
    /// Updates folded (one party's each).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    updates: u32,
    /// float32 parameters of the model.
    #[arg(long, default_value_t = 25_000_000, value_parser = clap::value_parser!(u64).range(1..=MAX_PARAMS))]
    params: u64,
    /// Tensors the parameters are split into (the last takes the remainder).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    layers: u32,
    /// Threads a tensor's fold is split over (default: the machine's cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: Option<u32>,
}

/// 1.5·10⁹ parameters need about 36 GB here: beyond that the bench would only swap.
const MAX_PARAMS: u64 = 1_500_000_000;

pub fn run(command: BenchCommand, json: bool) -> anyhow::Result<i32> {
    match command {
        BenchCommand::Aggregate(args) => aggregate(&args, json),
    }
}

/// The synthetic update of party `party` (0-based) in round `round` (1-based) at element `k`
/// of layer `layer`, as `cohort bench` specifies it: small values in [-5e-4, 5e-4).
fn synthetic_delta(k: u64, party: u64, round: u64, layer: u64) -> f32 {
    let step = ((k % 1024) * 7 + party * 13 + round * 31 + layer * 17) % 1024;
    (1e-3 * (step as f64 / 1024.0 - 0.5)) as f32
}

/// The weight of party `party`'s update.
fn synthetic_weight(party: u64) -> u64 {
    100 + party
}

/// Element counts of the `layers` tensors of a `params`-parameter model.
fn layer_sizes(params: u64, layers: u32) -> Vec<usize> {
    let layers = u64::from(layers).min(params);
    let each = params / layers;
    (0..layers)
        .map(|l| {
            let n = if l + 1 == layers {
                params - each * (layers - 1)
            } else {
                each
            };
            usize::try_from(n).unwrap_or(usize::MAX)
        })
        .collect()
}

fn zeros(sizes: &[usize]) -> Vec<NamedTensor> {
    sizes
        .iter()
        .enumerate()
        .map(|(l, n)| NamedTensor {
            name: format!("layer{l}"),
            shape: vec![*n],
            data: vec![0.0; *n],
        })
        .collect()
}

fn aggregate(args: &AggregateArgs, json: bool) -> anyhow::Result<i32> {
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t as usize,
    );
    let sizes = layer_sizes(args.params, args.layers);
    let global = std::sync::Arc::new(zeros(&sizes));
    let mut fedavg = FedAvg::new(global, AggregationRules::default()).with_fold_threads(threads);
    let check = fedavg.checker();
    let round = 1;
    let (mut check_time, mut fold_time) = (Duration::ZERO, Duration::ZERO);
    for party in 0..u64::from(args.updates) {
        // Made before the clock starts: only the check and the fold are timed.
        let mut delta = zeros(&sizes);
        for (layer, t) in delta.iter_mut().enumerate() {
            for (k, v) in t.data.iter_mut().enumerate() {
                *v = synthetic_delta(k as u64, party, round, layer as u64);
            }
        }
        let started = Instant::now();
        let checked = check.check(delta)?;
        let checked_at = Instant::now();
        fedavg.add(checked, synthetic_weight(party))?;
        fold_time += checked_at.elapsed();
        check_time += checked_at - started;
        if !json {
            eprint!("\rfolded {} of {} updates", party + 1, args.updates);
        }
    }
    if !json {
        eprintln!();
    }
    let model = fedavg.finish()?;
    let error = max_abs_error(&model, u64::from(args.updates), round);
    let bytes = u64::from(args.updates) * args.params * 4;
    let fold_gb_s = bytes as f64 / fold_time.as_secs_f64().max(1e-9) / 1e9;
    let check_gb_s = bytes as f64 / check_time.as_secs_f64().max(1e-9) / 1e9;
    if json {
        println!(
            "{}",
            json!({
                "updates": args.updates,
                "params": args.params,
                "layers": sizes.len(),
                "threads": threads,
                "update_bytes": bytes,
                "fold_s": fold_time.as_secs_f64(),
                "fold_gb_per_s": fold_gb_s,
                "check_s": check_time.as_secs_f64(),
                "check_gb_per_s": check_gb_s,
                "aggregate_max_abs_error": error,
            })
        );
    } else {
        println!(
            "{} updates × {} parameters ({:.2} GB), {threads} threads: fold {:.3} s ({fold_gb_s:.2} GB/s), \
             check {:.3} s ({check_gb_s:.2} GB/s), aggregate max abs error {error:.3e}",
            args.updates,
            args.params,
            bytes as f64 / 1e9,
            fold_time.as_secs_f64(),
            check_time.as_secs_f64(),
        );
    }
    Ok(0)
}

/// The largest difference between `model` and the exact weighted average of the synthetic
/// updates (from zeros), which depends only on (layer, k mod 1024): computed in f64 apart
/// from the fold, per layer for the 1024 residues.
fn max_abs_error(model: &[NamedTensor], updates: u64, round: u64) -> f64 {
    let total: f64 = (0..updates).map(|p| synthetic_weight(p) as f64).sum();
    let mut worst = 0.0f64;
    for (layer, t) in model.iter().enumerate() {
        let expected: Vec<f64> = (0..1024u64)
            .map(|k| {
                (0..updates)
                    .map(|p| {
                        synthetic_weight(p) as f64
                            * f64::from(synthetic_delta(k, p, round, layer as u64))
                    })
                    .sum::<f64>()
                    / total
            })
            .collect();
        for (k, v) in t.data.iter().enumerate() {
            worst = worst.max((f64::from(*v) - expected[k % 1024]).abs());
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_split_the_parameters_the_last_taking_the_remainder() {
        assert_eq!(layer_sizes(10, 4), vec![2, 2, 2, 4]);
        assert_eq!(layer_sizes(3, 4), vec![1, 1, 1]);
        assert_eq!(layer_sizes(25_000_000, 4), vec![6_250_000; 4]);
    }

    #[test]
    fn the_error_is_measured_against_the_exact_average() {
        let sizes = layer_sizes(5000, 3);
        let mut fedavg = FedAvg::new(std::sync::Arc::new(zeros(&sizes)), Default::default());
        for party in 0..3 {
            let mut delta = zeros(&sizes);
            for (layer, t) in delta.iter_mut().enumerate() {
                for (k, v) in t.data.iter_mut().enumerate() {
                    *v = synthetic_delta(k as u64, party, 1, layer as u64);
                }
            }
            fedavg.fold(&delta, synthetic_weight(party)).unwrap();
        }
        let mut model = fedavg.finish().unwrap();
        assert!(max_abs_error(&model, 3, 1) < 1e-9);
        // A wrong element, or the average of another round, is seen.
        model[1].data[7] += 1e-4;
        assert!(max_abs_error(&model, 3, 1) > 9e-5);
        model[1].data[7] -= 1e-4;
        assert!(max_abs_error(&model, 3, 2) > 1e-5);
    }
}
