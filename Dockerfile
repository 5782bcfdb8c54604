# syntax=docker/dockerfile:1.7
#
# tickflow images. The workspace compiles once, in the `builder` stage, into every service
# binary and the tickflow CLI; each target below copies one binary into a distroless image:
#
#   docker build --target ingest    -t tickflow/ingest .
#   docker build --target transform -t tickflow/transform .
#   docker build --target engine    -t tickflow/engine .
#   docker build --target analytics -t tickflow/analytics .
#   docker build --target tickflow  -t tickflow/tickflow .     # `tickflow load`, `bench`, `serve`
#
# Building several targets (or `docker compose build`) reuses the one builder stage. Cargo's
# registry and target directory are BuildKit cache mounts, so a rebuild after a source change
# recompiles only the workspace crates, not the dependencies. protoc is not needed: the proto
# crate's build script uses the protoc that protoc-bin-vendored ships.
#
# The runtime is distroless `cc` (glibc, libgcc, CA certificates; no shell, no curl) on the
# builder's Debian release (bookworm = Debian 12), running as the `nonroot` user (65532).
# Health: `<binary> healthcheck` does a GET of the service's own /readyz on HTTP_ADDR.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG DISTROLESS_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        -p ingest -p transform -p engine -p analytics -p tickflow \
    && mkdir -p /out \
    && cp target/release/ingest target/release/transform target/release/engine \
        target/release/analytics target/release/tickflow /out/

FROM ${DISTROLESS_IMAGE} AS runtime
USER 65532:65532
ENV RUST_LOG=info

FROM runtime AS ingest
COPY --from=builder /out/ingest /usr/local/bin/ingest
EXPOSE 8080 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/ingest", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/ingest"]

FROM runtime AS transform
COPY --from=builder /out/transform /usr/local/bin/transform
# The demo reference data; set REFDATA_FILE to this path to load it at start.
COPY demo/instruments.json /usr/share/tickflow/instruments.json
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/transform", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/transform"]

FROM runtime AS engine
COPY --from=builder /out/engine /usr/local/bin/engine
EXPOSE 8082
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/engine", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/engine"]

FROM runtime AS analytics
COPY --from=builder /out/analytics /usr/local/bin/analytics
EXPOSE 8083
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/analytics", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/analytics"]

# The CLI: `tickflow load` (demo traffic into ingest's gRPC API), `tickflow serve <service>`,
# `tickflow healthcheck <service>`. No HTTP server of its own, so no HEALTHCHECK.
FROM runtime AS tickflow
COPY --from=builder /out/tickflow /usr/local/bin/tickflow
COPY demo/instruments.json /usr/share/tickflow/instruments.json
ENTRYPOINT ["/usr/local/bin/tickflow"]
CMD ["load", "--grpc", "http://ingest:50051"]
