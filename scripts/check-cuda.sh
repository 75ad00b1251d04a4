#!/usr/bin/env bash
# Compile-checks the `cuda` cargo feature (candle's CUDA backend through cohort-train, the
# executor, task-manager and the CLI). It compiles the CUDA kernels with nvcc, so it needs the
# CUDA toolkit's compiler and headers: nvcc on PATH, or PyPI's nvidia-cuda-nvcc and
# nvidia-cuda-cccl, installed here into a virtual environment outside the repository when
# missing (bounded). It cannot link or run without the NVIDIA driver's libcuda, so this is
# `cargo check`, not a build: what runs on a GPU is checked where one is.
# Without nvcc and with no way to install it, it says so and passes, except under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${COHORT_NVCC_VENV:-$HOME/.cache/cohort-nvcc-venv}"
skip() {
    echo "cuda feature NOT checked: $*"
    if [ "${CI:-}" = "true" ]; then
        echo "under CI this is a failure"
        exit 1
    fi
    exit 0
}

if ! command -v nvcc >/dev/null 2>&1; then
    nvcc_dir=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu*/bin 2>/dev/null | head -n 1 || true)
    if [ -z "$nvcc_dir" ] || [ ! -x "$nvcc_dir/nvcc" ]; then
        echo "installing nvcc (nvidia-cuda-nvcc, nvidia-cuda-cccl) into $venv"
        if ! { python3 -m venv "$venv" &&
            timeout 600 "$venv/bin/pip" install --quiet nvidia-cuda-nvcc nvidia-cuda-cccl; }; then
            skip "nvcc is not on PATH and could not be installed into $venv"
        fi
        nvcc_dir=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu*/bin 2>/dev/null | head -n 1 || true)
        [ -n "$nvcc_dir" ] && [ -x "$nvcc_dir/nvcc" ] || skip "the installed packages have no nvcc"
    fi
    export PATH="$nvcc_dir:$PATH"
fi
echo "nvcc: $(command -v nvcc) ($(nvcc --version | tail -n 1))"

# Its own target directory: the CUDA build's artifacts do not displace the main build's.
export CARGO_TARGET_DIR="${COHORT_CUDA_TARGET_DIR:-$HOME/.cache/cohort-target-cuda}"
# No GPU to ask: the CUDA version cudarc binds to and the compute capability the kernels are
# compiled for (an H100's) are given.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
cargo check --locked --tests --features cuda \
    -p cohort-train -p cohort-executor -p cohort-task-manager -p cohort-cli
