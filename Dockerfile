# syntax=docker/dockerfile:1.7
# One image for every Cohort binary (job-scheduler, model-manager, client-selector, proxy,
# coordinator, task-manager, executor, cohort, ...), all under /usr/local/bin. The Helm
# charts in charts/ pick the binary per container with `command:`.
#
#   docker build -t cohort:0.1.0 .
#
# NOTE: not built on the project's machines (no container engine there); see README,
# "Kubernetes".

FROM rust:1.95-bookworm AS build
WORKDIR /src
# aws-lc-sys (through the AWS SDK) builds C code; cmake and clang keep its build script happy.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake clang \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir -p /out/bin \
 && find target/release -maxdepth 1 -type f -perm -u+x -exec cp {} /out/bin/ \; \
 && ls -l /out/bin

# glibc + libgcc, CA certificates, tzdata, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/ /usr/local/bin/
# Writable state belongs on volumes (the charts mount /var/lib/cohort and /tmp); the root
# filesystem can stay read-only.
WORKDIR /var/lib/cohort
USER 65532:65532
# Main gRPC ports of job-scheduler, model-manager, client-selector, proxy; health (plaintext).
EXPOSE 7001 7002 7003 7070 8081
ENTRYPOINT ["/usr/local/bin/cohort"]
CMD ["--help"]
