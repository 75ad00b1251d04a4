#!/usr/bin/env bash
# Measures every row of BENCHMARKS.md on this machine: builds the release binaries, then runs
# `cohort bench round` for each workload, `cohort bench aggregate` for the fold and `cohort bench
# train` for local training (on CUDA too where `nvidia-smi` finds a GPU), one JSON
# object per line on stdout (progress on stderr). Needs about 10 GB of memory and 6 GB of free
# disk for the 600M-parameter row (the coordinator stages updates in $TMPDIR); skip it with
# COHORT_BENCH_SKIP_HUGE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
# With a GPU, the binaries are built with the cuda feature (nvcc and the driver needed).
gpu=""
if nvidia-smi -L >/dev/null 2>&1; then
    gpu=1
fi
cargo build --release --workspace --bins ${gpu:+--features cohort-cli/cuda,cohort-executor/cuda,cohort-task-manager/cuda} >&2
cohort=target/release/cohort
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    cohort="$CARGO_TARGET_DIR/release/cohort"
fi
rows=(
    "3 10000 10"
    "50 100000 5"
    "4 25000000 3"
    "4 150000000 3"
)
if [ -z "${COHORT_BENCH_SKIP_HUGE:-}" ]; then
    rows+=("2 600000000 2")
fi
for row in "${rows[@]}"; do
    read -r parties params rounds <<<"$row"
    echo "bench round: $parties parties, $params parameters, $rounds rounds" >&2
    "$cohort" bench round --parties "$parties" --params "$params" --rounds "$rounds" --json
done
# Secure aggregation against plain FedAvg (BENCHMARKS.md, issue 16).
for parties in 5 20; do
    for secure in "" "--secure-aggregation"; do
        echo "bench round: $parties parties, 1000000 parameters, 5 rounds $secure" >&2
        "$cohort" bench round --parties "$parties" --params 1000000 --rounds 5 $secure --json
    done
done
for batch in 10 1; do
    for threads in 1 2; do
        echo "bench aggregate: 10 updates of 25000000 parameters, $batch at a time, $threads thread(s)" >&2
        "$cohort" bench aggregate --updates 10 --params 25000000 --threads "$threads" --batch "$batch" --passes 5 --json
    done
done
# Local training (issue 17): samples/s of the 784→4096→4096→10 MLP at batch 256.
for device in cpu ${gpu:+cuda}; do
    echo "bench train: mlp 4096,4096, batch 256, on $device" >&2
    "$cohort" bench train --arch mlp --hidden 4096,4096 --batch-size 256 --device "$device" --json
done
