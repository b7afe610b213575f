#!/usr/bin/env bash
# Proof suites: `scripts/prove.sh SUITE [--short|--full] [extra args]`.
# SUITE: crash, replicas, db-faults, api-faults, load, security, bad-input (see README "Proving it"). --short is the
# version .ci/run runs (debug build, a few minutes at most); --full (the
# default) the one whose figures go into notes (release build).
# Makes sure PostgreSQL answers first (scripts/ensure-postgres.sh), like the
# other scripts; DATABASE_URL names the server (scratch databases are made
# and dropped on it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
scripts/ensure-postgres.sh

suite="${1:?usage: scripts/prove.sh SUITE [--short|--full] [args]}"
shift
mode=full
if [[ "${1:-}" == "--short" || "${1:-}" == "--full" ]]; then
  mode="${1#--}"
  shift
fi

case "$suite:$mode" in
  crash:short)    command=(crash --kills 5 --rate 2) ;;
  crash:full)     command=(crash --kills 50) ;;
  replicas:short) command=(crash --replicas 3 --kills 4 --rate 2) ;;
  replicas:full)  command=(crash --replicas 3 --kills 30) ;;
  db-faults:short) command=(db-faults --phase-secs 6 --down-secs 4 --rate 2) ;;
  db-faults:full)  command=(db-faults --phase-secs 30 --down-secs 10) ;;
  api-faults:short) command=(api-faults --phase-secs 5 --rate 2) ;;
  api-faults:full)  command=(api-faults --phase-secs 30) ;;
  load:short)      command=(load --backlogs 300 --flood-rate 300 --flood-secs 3) ;;
  load:full)       command=(load) ;;
  security:short)  command=(security --seconds 8) ;;
  security:full)   command=(security --seconds 30) ;;
  bad-input:short) exec cargo test --locked --test bad_input ;;
  bad-input:full)  PROPTEST_CASES=20000 exec cargo test --locked --release --test bad_input ;;
  *) echo "prove.sh: unknown suite '$suite' (known: crash, replicas, db-faults, api-faults, load, security, bad-input)" >&2; exit 2 ;;
esac

if [[ "$mode" == short ]]; then
  cargo build --locked --quiet
  bin="${CARGO_TARGET_DIR:-target}/debug/orderbridge"
else
  cargo build --locked --release --quiet
  bin="${CARGO_TARGET_DIR:-target}/release/orderbridge"
fi
RUST_LOG="${RUST_LOG:-error}" "$bin" prove "${command[@]}" "$@"
