#!/usr/bin/env bash
# Measures every row of BENCHMARKS.md on this machine: builds the release binaries, then runs
# `cohort bench round` for each workload and `cohort bench aggregate` for the fold, one JSON
# object per line on stdout (progress on stderr). Needs about 10 GB of memory and 6 GB of free
# disk for the 600M-parameter row (the coordinator stages updates in $TMPDIR); skip it with
# COHORT_BENCH_SKIP_HUGE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins >&2
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
