# Build: docker build --build-arg DWH_HELPER_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t dwh-helper .
# (without the argument `--version` and dwh_helper_build_info say "unknown": the
# context holds no .git). `.ci/run` builds, with no Docker daemon, exactly what
# the build stage's COPY lines take (scripts/docker-context.sh): keep every file
# the build needs in them.
FROM rust:1-bookworm AS build
WORKDIR /src
# librdkafka is built from source (rdkafka-sys): a C toolchain, make and OpenSSL headers.
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
ARG DWH_HELPER_GIT_COMMIT=unknown
ENV DWH_HELPER_GIT_COMMIT=${DWH_HELPER_GIT_COMMIT}
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked && strip target/release/dwh-helper

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/dwh-helper --create-home dwh
COPY --from=build /src/target/release/dwh-helper /usr/local/bin/dwh-helper
USER dwh
WORKDIR /var/lib/dwh-helper
EXPOSE 8000
ENTRYPOINT ["dwh-helper"]
CMD ["run"]
