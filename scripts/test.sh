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

# The dashboard's test drives Debian's headless Chromium; install it when
# missing (the test says it skipped the browser part only where this fails).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing chromium for the dashboard's browser test" >&2
    sudo_cmd=""
    if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo -n"; fi
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
        || { $sudo_cmd apt-get update -q >/dev/null 2>&1 \
             && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
        || echo "test.sh: could not install chromium; the dashboard test will skip its browser part" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found; install Rust (https://rustup.rs) first." >&2
    exit 1
fi
exec cargo test --locked "$@"
