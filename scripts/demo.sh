#!/usr/bin/env bash
# Builds every binary and runs `cohort demo` (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/debug/cohort" demo "$@"
