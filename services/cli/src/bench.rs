//! `cohort bench`: Cohort measuring its own machinery on the synthetic workload
//! (`cohort_fl::synthetic`), each result checked against the exact average computed apart.
//! `round` runs the whole federation as `cohort up` does (every service a process, mutual
//! TLS, embedded storage in a temporary directory) with a job of `model.arch: synthetic`;
//! `aggregate` times the FedAvg fold alone; `train` measures local training's samples/s on
//! the CPU or a GPU.

use std::time::{Duration, Instant};

mod round;
mod train;

use anyhow::Context;
use clap::Subcommand;
use cohort_fl::{AggregationRules, FedAvg, SyntheticModel, synthetic};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The FedAvg fold alone: N synthetic updates of P parameters folded into one aggregate,
    /// in GB/s of update bytes, `--batch` updates at a time. Needs about 4·(updates + 2)
    /// bytes of memory per parameter.
    Aggregate(AggregateArgs),
    /// Whole rounds of a real federation on this machine (the processes of `cohort up`, N
    /// parties) with a synthetic model of P parameters: per-round times, peak memory of
    /// every process, bytes moved, and the final model's error against the exact average.
    Round(RoundArgs),
    /// Local training throughput of a built-in model (samples/s) on `--device` (cpu, cuda,
    /// auto), on random data of the model's shape: e.g. `--arch mlp --hidden 4096,4096
    /// --batch-size 256`.
    Train(train::TrainArgs),
}

#[derive(Debug, clap::Args)]
pub struct RoundArgs {
    /// Parties, each a task-manager process with its executors.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=500))]
    parties: u32,
    /// float32 parameters of the model.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=cohort_core::spec::MAX_SYNTHETIC_PARAMS))]
    params: u64,
    /// Tensors the parameters are split into (the last takes the remainder).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    layers: u32,
    /// Rounds of the job (every party takes part in every round).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Where the federation keeps its files (default: a temporary directory, removed after).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Every process serves Prometheus metrics, as under `cohort up` (to measure their cost).
    #[arg(long)]
    metrics: bool,
    /// Run the job with secure aggregation (`privacy.secure_aggregation`, the default t and
    /// graph, clip 1.0): parties mask their updates, the coordinator unmasks only the sum;
    /// the model is checked against the equal-weight mean.
    #[arg(long)]
    secure_aggregation: bool,
    /// With secure aggregation: `privacy.secagg_neighbours`, the masking graph's degree k
    /// (N − 1 or more: the complete graph). Default: the spec's (complete up to 10 parties,
    /// 2⌈log₂ N⌉ + 2 above).
    #[arg(long, requires = "secure_aggregation", value_parser = clap::value_parser!(u32).range(2..=100_000))]
    secagg_neighbours: Option<u32>,
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
    /// Updates folded together, reading the aggregate once for all of them (default: all
    /// of them; 1 is how a coordinator folds an update the moment it lands).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch: Option<u32>,
    /// Times the updates are folded, each time into a fresh aggregate: the median is
    /// reported, and the first pass apart.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    passes: u32,
}

/// 1.5·10⁹ parameters need about 36 GB here: beyond that the bench would only swap.
const MAX_PARAMS: u64 = 1_500_000_000;

pub async fn run(command: BenchCommand, json: bool) -> anyhow::Result<i32> {
    match command {
        BenchCommand::Aggregate(args) => aggregate(&args, json),
        BenchCommand::Round(args) => round::run(&args, json).await,
        BenchCommand::Train(args) => train::run(&args, json),
    }
}

fn aggregate(args: &AggregateArgs, json: bool) -> anyhow::Result<i32> {
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t as usize,
    );
    let model = SyntheticModel {
        params: args.params,
        layers: args.layers,
    };
    let global = std::sync::Arc::new(model.zeros());
    // A fresh aggregate per pass, made (and its memory touched) before the clock starts,
    // as a coordinator makes it when the round opens.
    let fresh =
        || FedAvg::new(global.clone(), AggregationRules::default()).with_fold_threads(threads);
    let check = fresh().checker();
    let round = 1;
    let batch = args.batch.unwrap_or(args.updates).min(args.updates) as usize;
    let mut check_time = Duration::ZERO;
    let mut updates = Vec::with_capacity(args.updates as usize);
    for party in 0..u64::from(args.updates) {
        // Made before the clock starts: only the check and the fold are timed.
        let mut delta = model.zeros();
        for (layer, t) in delta.iter_mut().enumerate() {
            for (k, v) in t.data.iter_mut().enumerate() {
                *v = synthetic::delta(k as u64, party, round, layer as u64);
            }
        }
        let started = Instant::now();
        updates.push((check.check(delta)?, synthetic::weight(party)));
        check_time += started.elapsed();
        if !json {
            eprint!("\rchecked {} of {} updates", party + 1, args.updates);
        }
    }
    // The first pass reads updates just written, which this machine's caches still hold
    // dirty; later passes read them as the fold of a round's staged updates does.
    let mut passes = Vec::with_capacity(args.passes as usize);
    let mut last = None;
    for pass in 0..args.passes {
        drop(last.take());
        let mut fedavg = fresh();
        let started = Instant::now();
        for group in updates.chunks(batch) {
            fedavg.add_all(group.to_vec())?;
        }
        passes.push(started.elapsed());
        last = Some(fedavg);
        if !json {
            eprint!("\rfolded them, pass {} of {}", pass + 1, args.passes);
        }
    }
    if !json {
        eprintln!();
    }
    let fedavg = last.context("no pass was made")?;
    let accumulator = fedavg.accumulator();
    let first_pass = passes.first().copied().unwrap_or_default();
    passes.sort();
    let fold_time = passes[passes.len() / 2];
    let aggregate = fedavg.finish()?;
    let error = model.max_abs_error(&aggregate, u64::from(args.updates), round);
    let bytes = u64::from(args.updates) * args.params * 4;
    let gb_s = |time: Duration| bytes as f64 / time.as_secs_f64().max(1e-9) / 1e9;
    let (fold_gb_s, first_pass_gb_s) = (gb_s(fold_time), gb_s(first_pass));
    let check_gb_s = gb_s(check_time);
    if json {
        println!(
            "{}",
            json!({
                "updates": args.updates,
                "params": args.params,
                "layers": model.sizes().len(),
                "threads": threads,
                "batch": batch,
                "accumulator": accumulator,
                "update_bytes": bytes,
                "fold_s": fold_time.as_secs_f64(),
                "fold_gb_per_s": fold_gb_s,
                "passes": args.passes,
                "first_pass_s": first_pass.as_secs_f64(),
                "first_pass_gb_per_s": first_pass_gb_s,
                "check_s": check_time.as_secs_f64(),
                "check_gb_per_s": check_gb_s,
                "aggregate_max_abs_error": error,
            })
        );
    } else {
        println!(
            "{} updates × {} parameters ({:.2} GB), {threads} threads, {batch} at a time: fold {:.3} s ({fold_gb_s:.2} GB/s, \
             median of {} passes; the first {first_pass_gb_s:.2} GB/s), check {:.3} s ({check_gb_s:.2} GB/s), aggregate max abs error {error:.3e}",
            args.updates,
            args.params,
            bytes as f64 / 1e9,
            fold_time.as_secs_f64(),
            args.passes,
            check_time.as_secs_f64(),
        );
    }
    Ok(0)
}
