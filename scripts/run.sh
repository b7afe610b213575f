#!/usr/bin/env bash
# Runs the daemon (`orderbridge run`) against the local PostgreSQL: makes sure
# it answers on 127.0.0.1:5432 (see scripts/ensure-postgres.sh), then builds
# and starts orderbridge, which creates and migrates its database and serves
# /healthz, /readyz and /metrics on 127.0.0.1:8080. Stop it with Ctrl-C.
#
#   scripts/run.sh                           # built-in defaults
#   scripts/run.sh --config my.toml          # extra arguments go to `orderbridge run`
#
# DATABASE_URL defaults to postgres://postgres@127.0.0.1:5432/orderbridge.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderbridge}"
"$root/scripts/ensure-postgres.sh"

if ! command -v cargo >/dev/null 2>&1; then
    echo "run.sh: cargo not found; install Rust (https://rustup.rs) first." >&2
    exit 1
fi
# --manifest-path rather than cd: relative paths given by the caller
# (--config FILE) stay relative to the caller's directory.
exec cargo run --release --manifest-path "$root/Cargo.toml" -- run "$@"
