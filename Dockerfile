# syntax=docker/dockerfile:1
# orderbridge: multi-stage build, non-root runtime.
#
#   docker build -t orderbridge .
#   docker run --rm -p 8080:8080 \
#     -e DATABASE_URL=postgres://user:password@db-host:5432/orderbridge \
#     -e ORDERBRIDGE_CONFIG=/etc/orderbridge/orderbridge.toml \
#     -v "$PWD/deploy/orderbridge.toml:/etc/orderbridge/orderbridge.toml:ro" \
#     orderbridge
#
# The built-in defaults (config/default.toml, compiled in) run as they are; an
# operator file is optional and is named by ORDERBRIDGE_CONFIG (same as
# --config). Secrets come from ORDERBRIDGE__… environment variables.

FROM rust:1-bookworm AS builder
WORKDIR /src
# The binary embeds config/default.toml and migrations/ at compile time.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY migrations ./migrations
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/orderbridge /usr/local/bin/orderbridge

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 orderbridge \
    && useradd --system --uid 10001 --gid orderbridge --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin orderbridge
COPY --from=builder /usr/local/bin/orderbridge /usr/local/bin/orderbridge
WORKDIR /app
# Relative paths in the configuration (e.g. shops.*.map) resolve from /app.
COPY config/ /app/config/
USER orderbridge
# Listen on all interfaces inside the container (the default is 127.0.0.1:8080).
ENV ORDERBRIDGE__HTTP__LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["orderbridge"]
CMD ["run"]
