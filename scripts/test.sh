#!/usr/bin/env bash
# The project's one test command: makes sure PostgreSQL answers on
# 127.0.0.1:5432 (starting or installing it if needed, see
# scripts/ensure-postgres.sh), then runs the whole test suite against it.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh outbox          # extra arguments go to `cargo test`
#
# DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres) names the
# server; tests create and drop their own scratch databases on it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
scripts/ensure-postgres.sh

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found; install Rust (https://rustup.rs) first." >&2
    exit 1
fi
exec cargo test --locked "$@"
