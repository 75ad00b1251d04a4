#!/usr/bin/env bash
# The whole test suite: formatting, every binary built, every test run.
# Installs (when missing) and starts what the tests need first: PostgreSQL
# from Debian's packages and an S3-compatible server, stopped again on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/test-services.sh
source scripts/test-services.sh

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "render, lint and validate the Helm charts"
# The rendered executor Pod configs go where a Rust test loads them as task-manager would.
COHORT_TEST_CHART_RENDERS="$(pwd)/${CARGO_TARGET_DIR:-target}/chart-renders"
case "${CARGO_TARGET_DIR:-}" in /*) COHORT_TEST_CHART_RENDERS="$CARGO_TARGET_DIR/chart-renders" ;; esac
rm -rf "$COHORT_TEST_CHART_RENDERS"
export COHORT_TEST_CHART_RENDERS
COHORT_CHART_RENDERS="$COHORT_TEST_CHART_RENDERS" bash scripts/check-charts.sh

step "build every binary and test (target: ${CARGO_TARGET_DIR:-target})"
# Integration tests run the real binaries, so they are built first.
cargo build --locked --workspace --bins --tests

step "start PostgreSQL and S3 for the tests"
start_test_services
if [ -z "${COHORT_TEST_MONGODB_URL:-}" ]; then
    echo "no MongoDB server on this machine: the MongoDB store suite will report itself skipped"
    echo "(set COHORT_TEST_MONGODB_URL=mongodb://host:port to run it)"
fi

step "run the tests"
if cargo nextest --version >/dev/null 2>&1; then
    # No crate has doctests; nextest runs everything else.
    cargo nextest run --locked --workspace --no-tests=fail
else
    cargo test --locked --workspace
fi
