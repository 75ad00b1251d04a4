//! The FedAvg fold alone: 10 updates of `COHORT_BENCH_PARAMS` parameters (default 4M, 16 MB
//! each) folded into one aggregate, into an f64 sum and into an f32 running mean (what models
//! over 16M parameters use), on one thread and on every core, one by one (as a coordinator
//! folds an update that lands) and all at once (`FedAvg::add_all`). Throughput is in update
//! bytes. `cohort bench aggregate` measures the same at any size, with the check apart.

use std::sync::Arc;

use cohort_core::NamedTensor;
use cohort_fl::{AggregationRules, FedAvg};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const UPDATES: usize = 10;

fn params() -> usize {
    std::env::var("COHORT_BENCH_PARAMS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(4_000_000)
}

fn tensors(params: usize, value: impl Fn(usize) -> f32) -> Vec<NamedTensor> {
    let each = params / 4;
    (0..4)
        .map(|l| {
            let n = if l == 3 { params - 3 * each } else { each };
            NamedTensor {
                name: format!("layer{l}"),
                shape: vec![n],
                data: (0..n).map(&value).collect(),
            }
        })
        .collect()
}

fn fold(c: &mut Criterion) {
    let params = params();
    let global = Arc::new(tensors(params, |_| 0.0));
    let updates: Vec<Vec<NamedTensor>> = (0..UPDATES)
        .map(|u| tensors(params, |k| ((k % 1024 + u) as f32 / 1024.0 - 0.5) * 1e-3))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("fedavg_fold");
    group.throughput(Throughput::Bytes((UPDATES * params * 4) as u64));
    group.sample_size(10);
    let runs = [
        (1, false, false),
        (cores, false, false),
        (1, true, false),
        (cores, true, false),
        (cores, false, true),
        (cores, true, true),
    ];
    for (threads, f32_mean, batched) in runs {
        let accumulator = if f32_mean { "f32_mean" } else { "f64_sum" };
        let how = if batched { "batched" } else { "one_by_one" };
        group.bench_function(
            format!("{UPDATES}x{params}/{accumulator}/{threads}_threads/{how}"),
            |b| {
                b.iter_batched(
                    || {
                        let fedavg = FedAvg::new(global.clone(), AggregationRules::default())
                            .with_fold_threads(threads);
                        let fedavg = if f32_mean {
                            fedavg.with_f32_mean()
                        } else {
                            fedavg
                        };
                        let check = fedavg.checker();
                        let checked: Vec<_> = updates
                            .iter()
                            .map(|u| check.check(u.clone()).expect("a valid update"))
                            .collect();
                        (fedavg, checked)
                    },
                    |(mut fedavg, checked)| {
                        let weighted = checked
                            .into_iter()
                            .enumerate()
                            .map(|(u, update)| (update, 100 + u as u64));
                        if batched {
                            fedavg.add_all(weighted.collect()).expect("fold");
                        } else {
                            for (update, weight) in weighted {
                                fedavg.add(update, weight).expect("fold");
                            }
                        }
                        fedavg
                    },
                    criterion::BatchSize::LargeInput,
                )
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fold);
criterion_main!(benches);
