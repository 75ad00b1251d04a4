#!/usr/bin/env bash
# The whole test suite: formatting, every binary built, every test run.
# Installs and starts what the tests need first (nothing beyond Rust yet).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "build every binary and test (target: ${CARGO_TARGET_DIR:-target})"
# Integration tests run the real binaries, so they are built first.
cargo build --locked --workspace --bins --tests

step "run the tests"
if cargo nextest --version >/dev/null 2>&1; then
    # No crate has doctests; nextest runs everything else.
    cargo nextest run --locked --workspace --no-tests=fail
else
    cargo test --locked --workspace
fi
