#!/usr/bin/env bash
# The whole product in one command: makes sure PostgreSQL answers on
# 127.0.0.1:5432 (see scripts/ensure-postgres.sh), then builds and runs
# `orderbridge demo`: the real daemon against in-process simulators of Kaspi,
# Avito and amoCRM, with generated orders and simulated managers. It prints a
# status line every few seconds and a summary when it stops (Ctrl-C, or --for).
# Logs go to orderbridge-demo.log. It uses a database of its own,
# orderbridge_demo, started afresh each run (--keep keeps it).
#
#   scripts/demo.sh                        # speed ×10, until Ctrl-C
#   scripts/demo.sh --speed 60 --for 2m    # extra arguments go to `orderbridge demo`
#
# DATABASE_URL names the server (default postgres://postgres@127.0.0.1:5432/orderbridge).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderbridge}"
scripts/ensure-postgres.sh

if ! command -v cargo >/dev/null 2>&1; then
    echo "demo.sh: cargo not found; install Rust (https://rustup.rs) first." >&2
    exit 1
fi
exec cargo run --release --locked -- demo "$@"
