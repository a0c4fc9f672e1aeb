# One image with the three gpualloc services; a Deployment picks one with
# `command:` (see deploy/). Built with BuildKit:
#
#   docker build -t gpualloc:dev .
#
# Dependencies are cached across builds by BuildKit cache mounts (the cargo
# registry and the target folder), so a change to one crate rebuilds that
# crate and its dependants only.

ARG RUST_VERSION=1.89
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
# libpq: diesel's PostgreSQL driver links it. No protoc: protos compile
# with protox, in Rust.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && cp target/release/gpualloc-allocation \
          target/release/gpualloc-resource-pool \
          target/release/gpualloc-viewer /out/

FROM debian:${DEBIAN}-slim AS runtime
# libpq at run time; CA certificates for JWKS URLs, OTLP and webhooks over
# TLS. Versions follow the Debian release (pinning them would break the
# build at the next security update).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/gpualloc-allocation /usr/local/bin/gpualloc-allocation
COPY --from=build /out/gpualloc-resource-pool /usr/local/bin/gpualloc-resource-pool
COPY --from=build /out/gpualloc-viewer /usr/local/bin/gpualloc-viewer
# Non-root, and nothing to write: the services keep their state in
# PostgreSQL, so the root filesystem can be mounted read-only.
USER 65532:65532
# gRPC 50051-50053, metrics 9091-9093 (the services' defaults).
EXPOSE 50051 50052 50053 9091 9092 9093
ENV GPUALLOC_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/gpualloc-allocation"]
