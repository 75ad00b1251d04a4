# syntax=docker/dockerfile:1.7
# One image for every Cohort binary (job-scheduler, model-manager, client-selector, proxy,
# coordinator, task-manager, executor, cohort, ...), all under /usr/local/bin. The Helm
# charts in charts/ pick the binary per container with `command:`.
#
#   docker build -t cohort:0.1.0 .
#   docker build --build-arg CUDA=1 -t cohort:0.1.0-cuda .
#
# CUDA=1 builds the executor, task-manager and CLI with the `cuda` feature (training.device:
# cuda|auto trains on a GPU) on NVIDIA's CUDA images: the toolkit's devel image to build
# (nvcc compiles candle's kernels for CUDA_COMPUTE_CAP, 90 = H100, as no GPU is there to
# ask), its runtime image (cuBLAS, cuRAND, NVRTC) to run; the driver's libcuda comes from the
# host through the NVIDIA container runtime. CUDA=0 (default) needs no CUDA anywhere.
#
# NOTE: not built on the project's machines (no container engine there); see README,
# "Kubernetes".

ARG CUDA=0
ARG CUDA_VERSION=13.0.2
ARG RUST_IMAGE=rust:1.95-bookworm

FROM ${RUST_IMAGE} AS rust

FROM rust AS build-0

# The CUDA toolkit's image with the Rust toolchain of the plain build copied in.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-1
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:$PATH
# Kernels are compiled for this compute capability (candle-kernels); the libraries are
# linked against the toolkit's (libcuda through its stub: the driver provides it at run time).
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} CUDA_ROOT=/usr/local/cuda \
    RUSTFLAGS="-L native=/usr/local/cuda/lib64/stubs"

FROM build-${CUDA} AS build
ARG CUDA
WORKDIR /src
# aws-lc-sys (through the AWS SDK) builds C code; cmake and clang keep its build script happy.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake clang \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,id=cohort-target-cuda${CUDA} \
    features="" \
 && if [ "$CUDA" = 1 ]; then features="--features cohort-executor/cuda,cohort-task-manager/cuda,cohort-cli/cuda"; fi \
 && cargo build --release --locked --workspace --bins $features \
 && mkdir -p /out/bin \
 && find target/release -maxdepth 1 -type f -perm -u+x -exec cp {} /out/bin/ \; \
 && ls -l /out/bin

# glibc + libgcc, CA certificates, tzdata, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-0
# The CUDA libraries candle links (cuBLAS, cuRAND, NVRTC); not distroless.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-1
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime-${CUDA}
COPY --from=build /out/bin/ /usr/local/bin/
# Writable state belongs on volumes (the charts mount /var/lib/cohort and /tmp); the root
# filesystem can stay read-only.
WORKDIR /var/lib/cohort
USER 65532:65532
# Main gRPC ports of job-scheduler, model-manager, client-selector, proxy; health (plaintext).
EXPOSE 7001 7002 7003 7070 8081
ENTRYPOINT ["/usr/local/bin/cohort"]
CMD ["--help"]
